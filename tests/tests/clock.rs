//! Clock steps: the receiver's or the agent's wall clock jumps back an hour or forward a day
//! between points (libfaketime, with the monotonic clock left real, as an NTP step does). No
//! point is mis-ordered or pruned early, `--at` picks the right point, and the RPO figures stay
//! sensible.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, run, wait_until, Deployment, Receiver};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
const MIB: u64 = 1 << 20;

/// A wall clock offset that a test changes while the processes using it run.
struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path) -> FakeClock {
        assert!(
            Path::new(LIBFAKETIME).exists(),
            "libfaketime is missing: .ci/run installs the faketime package"
        );
        let c = FakeClock {
            file: dir.join("clock-offset"),
        };
        c.set("+0");
        c
    }

    /// Offsets from the real clock, in libfaketime's syntax: "+0", "-1h", "+1d".
    fn set(&self, offset: &str) {
        std::fs::write(&self.file, offset).unwrap();
    }

    /// Makes `cmd` read this clock (its monotonic clock stays real).
    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME_TIMESTAMP_FILE", &self.file)
            .env("FAKETIME_NO_CACHE", "1")
            .env("DONT_FAKE_MONOTONIC", "1")
    }
}

fn receiver_cmd(d: &Deployment, clock: &FakeClock, args: &[&str]) -> Value {
    let mut cmd = Command::new(bin("rewind-receiver"));
    clock.apply(&mut cmd).args(args).arg("--data").arg(d.data());
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Clock steps the receiver recorded.
fn steps(d: &Deployment) -> Vec<i64> {
    let conn = rusqlite::Connection::open(d.data().join("catalog.sqlite")).unwrap();
    let mut stmt = conn
        .prepare("SELECT step_us FROM clock_steps ORDER BY rowid")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn created(p: &Value) -> String {
    p["created"].as_str().unwrap().to_owned()
}

/// An RFC 3339 UTC time that sorts as text (its fraction padded to nanoseconds: the receiver
/// prints `…52.58973Z` for `…52.589730Z`).
fn sortable(t: &str) -> String {
    let t = t.trim_end_matches('Z');
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    format!("{whole}.{frac:0<9}")
}

/// Whether the points' times strictly increase.
fn increasing(times: &[String]) -> bool {
    times.windows(2).all(|w| sortable(&w[0]) < sortable(&w[1]))
}

fn ids(points: &[Value]) -> Vec<u64> {
    points.iter().map(|p| p["id"].as_u64().unwrap()).collect()
}

fn restore_at(d: &Deployment, at: &str) -> u64 {
    let out = d.path("at.raw");
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new(bin("rewind-receiver"));
    cmd.args([
        "restore", "--json", "--vm", "web1", "--disk", "vda", "--at", at,
    ])
    .arg("--data")
    .arg(d.data())
    .arg("--out")
    .arg(&out);
    let o = run(&mut cmd);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["point"].as_u64().unwrap()
}

#[test]
fn the_receivers_clock_steps_back_an_hour_then_forward_a_day() {
    let d = Deployment::new();
    let clock = FakeClock::new(d.dir.path());
    let mut cmd = Command::new(bin("rewind-receiver"));
    clock.apply(&mut cmd);
    let rx = Receiver::start_via(cmd, &d.data(), &d.pki(), "127.0.0.1:0", &[]);
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * MIB);
    let mut digests = Vec::new();
    let sync = |digests: &mut Vec<(u64, disk::Digest)>| {
        disk::random_blocks(
            &vda,
            64 * 1024,
            digests.len() as u64 * 4,
            4,
            &mut rand::rng(),
        );
        let r = d.sync_ok(&rx, "host1", "web1", &[("vda", &vda)]);
        digests.push((r["point"].as_u64().unwrap(), disk::digest(&vda)));
    };
    sync(&mut digests);
    sync(&mut digests);

    // Back an hour: the next points still come after the first ones.
    clock.set("-1h");
    assert!(
        wait_until(Duration::from_secs(30), || steps(&d).len() == 1),
        "serve records the step"
    );
    let back = steps(&d)[0];
    assert!((-3_610_000_000..=-3_590_000_000).contains(&back), "{back}");
    sync(&mut digests);
    sync(&mut digests);
    let points = d.points("web1");
    assert_eq!(
        ids(&points),
        digests.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    let times: Vec<String> = points.iter().map(created).collect();
    assert!(
        increasing(&times),
        "point times keep the order the points were taken in: {times:?}"
    );
    // --at picks each point by its time.
    for (p, t) in points.iter().zip(&times) {
        assert_eq!(restore_at(&d, t), p["id"].as_u64().unwrap(), "--at {t}");
    }
    // The newest point is not from the future: its age is zero, not negative, and not behind.
    let status = receiver_cmd(&d, &clock, &["status", "--json"]);
    assert_eq!(status["state"], "replicating", "{status}");

    // Forward a day. A point locked for one more (real) hour must survive a prune that keeps
    // only the newest point, though the receiver's clock says the lock ended 23 hours ago.
    let locked = digests[2].0;
    let until = Command::new("date")
        .args(["-u", "-d", "+1 hour", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    let until = String::from_utf8(until.stdout).unwrap().trim().to_owned();
    receiver_cmd(
        &d,
        &clock,
        &[
            "lock",
            "--vm",
            "web1",
            "--point",
            &locked.to_string(),
            "--until",
            &until,
        ],
    );
    clock.set("+1d");
    assert!(
        wait_until(Duration::from_secs(30), || steps(&d).len() == 2),
        "serve records the step"
    );
    let forward = steps(&d)[1];
    assert!(
        (89_990_000_000..=90_010_000_000).contains(&forward),
        "{forward}"
    );
    sync(&mut digests);
    let status = receiver_cmd(&d, &clock, &["status", "--json"]);
    assert_eq!(status["state"], "replicating", "{status}");
    let pruned = receiver_cmd(
        &d,
        &clock,
        &["prune", "--json", "--vm", "web1", "--keep-last", "1"],
    );
    let left = ids(&d.points("web1"));
    assert_eq!(
        left,
        vec![locked, digests[4].0],
        "the locked point and the newest survive: {pruned}"
    );
    // Every point left restores bit-exact; --at still picks the newest by its time.
    for (p, want) in digests.iter().filter(|(p, _)| left.contains(p)) {
        assert_eq!(d.restored_digest("web1", "vda", *p), *want, "point {p}");
    }
    let newest = d.points("web1").last().map(created).unwrap();
    assert_eq!(restore_at(&d, &newest), digests[4].0);
    // The metrics say what happened.
    let conn = rusqlite::Connection::open(d.data().join("catalog.sqlite")).unwrap();
    let events: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM events WHERE kind = 'clock-step'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(events, 2);
    eprintln!(
        "clock steps seen by serve: {:.0} s, {:.0} s; points in order; locked point kept",
        back as f64 / 1e6,
        forward as f64 / 1e6
    );
}

#[test]
fn the_agents_clock_steps_back_an_hour_then_forward_a_day() {
    let d = Deployment::new();
    let clock = FakeClock::new(d.dir.path());
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * MIB);
    // The agent service takes a point every second under the fake clock.
    let mut cmd = d.sync_cmd(&rx, "host1", "web1", &[("vda", vda.as_path())], &[]);
    let args: Vec<_> = cmd
        .get_args()
        .filter(|a| *a != "--once")
        .map(|a| a.to_owned())
        .collect();
    let mut agent_cmd = Command::new(cmd.get_program());
    clock
        .apply(&mut agent_cmd)
        .args(args)
        .args(["--interval", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut agent = agent_cmd.spawn().unwrap();
    let _ = &mut cmd;
    // The guest keeps writing, so every cycle has a point to take.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let vda = vda.clone();
        std::thread::spawn(move || {
            let mut rng = rand::rng();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                disk::random_blocks(&vda, 64 * 1024, i % 128, 1, &mut rng);
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let count = |d: &Deployment| d.try_points("web1").map(|p| p.len()).unwrap_or(0);
    assert!(wait_until(Duration::from_secs(60), || count(&d) >= 2));
    for offset in ["-1h", "+1d"] {
        clock.set(offset);
        let before = count(&d);
        assert!(
            wait_until(Duration::from_secs(60), || count(&d) >= before + 3),
            "the agent keeps its interval after its clock jumps {offset}"
        );
        // The agent's own status: replicating, newest point a few seconds old at most.
        let mut st = Command::new(bin("rewind-agent"));
        clock
            .apply(&mut st)
            .args(["status", "--json", "--state"])
            .arg(d.path("state-host1"));
        let out = run(&mut st);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let age = v["last_point_age_seconds"].as_f64().unwrap();
        assert!((0.0..30.0).contains(&age), "after a jump of {offset}: {v}");
        assert_eq!(v["state"], "replicating", "{v}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    // One last point of the final content.
    d.sync_ok(&rx, "host1", "web1", &[("vda", &vda)]);
    // Points are in order and the newest restores bit-exact.
    let points = d.points("web1");
    let times: Vec<String> = points.iter().map(created).collect();
    assert!(increasing(&times), "{times:?}");
    let newest = points.last().unwrap()["id"].as_u64().unwrap();
    assert_eq!(d.restored_digest("web1", "vda", newest), disk::digest(&vda));
}
