//! Application-consistent points proven from inside a real Debian guest. The guest runs an
//! application that commits numbered transactions, each made durable (fsync) in an SQLite
//! database and a log file; the guest agent's fsfreeze hook pauses it between transactions and
//! records its last committed transaction just before the file systems freeze. Every point the
//! agent calls application-consistent must then restore to a file system that needs no journal
//! replay (`e2fsck` clean, no `needs_recovery`), whose database passes its integrity check and
//! holds exactly the transactions 1..N committed before that point's freeze, with the log file
//! agreeing; and the newest point, restored and booted, runs the database inside the guest.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::guest::{self, Accel, Guest, APP_DB, APP_LOG, FREEZE_LOG};
use rewind_tests::{disk_of, run, sync_report, wait_until, Deployment, KillOnDrop};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Points taken while the application writes.
const POINTS: usize = 3;
/// Start of the guest's root partition in its disk (the image's layout).
const PART_OFFSET: u64 = 1 << 20;

/// The application's last committed transaction, as it reports it (0 before the first).
fn app_last(g: &mut Guest) -> u64 {
    let r = g
        .exec(&["sh", "-c", "cat /run/rewind-app.last 2>/dev/null || echo 0"])
        .unwrap();
    assert!(r.success(), "{r:?}");
    r.stdout.trim().parse().unwrap()
}

/// Waits until the application committed `more` transactions beyond what it had.
fn app_commits(g: &mut Guest, more: u64) -> u64 {
    let from = app_last(g);
    let mut now = from;
    assert!(
        wait_until(Duration::from_secs(300), || {
            now = app_last(g);
            now >= from + more
        }),
        "the application committed {} transactions in 300 s, wanted {more}",
        now - from
    );
    now
}

/// An image file's partition as e2fsprogs names it (their unix I/O manager takes an offset).
fn partition(image: &Path) -> String {
    format!("{}?offset={PART_OFFSET}", image.display())
}

/// Copies a file out of the file system in `image` with `debugfs` (read-only, no mount).
fn dump(image: &Path, path: &str, to: &Path) {
    let out = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump {path} {}", to.display()))
        .arg(partition(image)));
    assert!(
        out.status.success() && to.exists(),
        "debugfs dump {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a restored point holds of the application.
#[derive(Debug)]
struct AppState {
    /// The last transaction in the database (all of 1..=last are there).
    last: u64,
    /// The last freeze the hook recorded: (last transaction, "quiet" or "busy").
    freeze: (u64, String),
    freezes: usize,
}

/// Checks a restored disk image offline: a clean file system that needs no journal replay, an
/// intact database holding transactions 1..N with no gap, a log file listing exactly 1..N, and
/// a freeze record as the last thing the hook wrote, naming N.
fn check_restored(image: &Path, scratch: &Path) -> AppState {
    let head = run(Command::new("dumpe2fs").arg("-h").arg(partition(image)));
    let head_text = String::from_utf8_lossy(&head.stdout).into_owned();
    assert!(head.status.success(), "dumpe2fs: {head:?}");
    let features = head_text
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default();
    assert!(
        !features.contains("needs_recovery"),
        "the restored file system needs a journal replay (not frozen at the point): {features}"
    );
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(partition(image)));
    assert!(
        fsck.status.success(),
        "e2fsck -fn of the restored file system: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    std::fs::create_dir_all(scratch).unwrap();
    let (db, log, freezes) = (
        scratch.join("app.db"),
        scratch.join("log.txt"),
        scratch.join("freeze.log"),
    );
    for (from, to) in [(APP_DB, &db), (APP_LOG, &log), (FREEZE_LOG, &freezes)] {
        let _ = std::fs::remove_file(to);
        dump(image, from, to);
    }
    // No journal file may be left beside the database (DELETE mode removes it at commit).
    let journal = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {APP_DB}-journal"))
        .arg(partition(image)));
    assert!(
        String::from_utf8_lossy(&journal.stderr).contains("not found"),
        "a rollback journal is left beside the database: a transaction was half-way"
    );

    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok", "the restored database is damaged");
    let (count, min, max) = conn
        .query_row(
            "SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0) FROM tx",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .unwrap();
    let (count, min, max) = (count as u64, min as u64, max as u64);
    assert!(count > 0, "the restored database holds no transaction");
    assert_eq!(
        (min, count),
        (1, max),
        "transactions are missing: ids {min}..={max}, {count} rows"
    );
    let short: i64 = conn
        .query_row(
            "SELECT count(*) FROM tx WHERE length(payload) != 16384",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(short, 0, "rows with a torn payload");

    let log_text = std::fs::read_to_string(&log).unwrap();
    let logged: Vec<u64> = log_text
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(
        logged,
        (1..=max).collect::<Vec<_>>(),
        "the log file does not list exactly the database's transactions"
    );

    let freeze_text = std::fs::read_to_string(&freezes).unwrap();
    let last_line = freeze_text.lines().last().unwrap_or_default();
    let words: Vec<&str> = last_line.split_whitespace().collect();
    assert!(
        words.len() == 4 && words[0] == "freeze",
        "the point was not taken inside a freeze: the hook's last record is {last_line:?}"
    );
    let frozen_last: u64 = words[2].strip_prefix("last=").unwrap().parse().unwrap();
    AppState {
        last: max,
        freeze: (frozen_last, words[3].to_owned()),
        freezes: freeze_text
            .lines()
            .filter(|l| l.starts_with("freeze"))
            .count(),
    }
}

#[test]
fn application_consistent_points_hold_every_transaction_committed_before_the_freeze() {
    let d = Deployment::new();
    let rx = d.serve();
    let image = guest::image().unwrap();
    std::fs::create_dir_all(d.path("guest")).unwrap();
    let mut g = Guest::boot(&d.path("guest"), &image, Accel::from_env()).unwrap();
    let t = g.wait_ready(Duration::from_secs(400)).unwrap();
    eprintln!("guest ready in {:.1} s", t.as_secs_f64());
    let started = g.exec(&["systemctl", "start", "rewind-app"]).unwrap();
    assert!(started.success(), "{started:?}");
    app_commits(&mut g, 5);

    let qga = g.dir.join("qga.sock").display().to_string();
    let mut points = Vec::new();
    for k in 1..=POINTS {
        let before = app_commits(&mut g, 3);
        g.release_agent();
        let t = Instant::now();
        let p = sync_report(&d.sync_live(&rx, "app1", &g.agent_qmp(), &["--guest-agent", &qga]));
        assert_eq!(p["consistency"], "application-consistent", "{p}");
        let frozen = p["freeze_ms"]
            .as_f64()
            .expect("a frozen point says how long");
        assert!(frozen > 0.0 && frozen < 45_000.0, "{p}");
        let held = p["frozen_ms"]
            .as_f64()
            .expect("and how long the file systems were");
        assert!(held > 0.0 && held <= frozen, "{p}");
        let after = app_last(&mut g);
        eprintln!(
            "point {k}: {} ({} changed blocks, {:.1} s, freeze {frozen:.0} ms, file systems frozen {held:.0} ms); the app was at \
             {before} before, {after} after",
            p["point"],
            disk_of(&p, "vda")["changed_blocks"],
            t.elapsed().as_secs_f64()
        );
        points.push((p["point"].as_u64().unwrap(), before, after));
    }

    let mut previous = 0;
    let mut first_last = 0;
    for (k, &(point, before, after)) in points.iter().enumerate() {
        let raw = d.path(&format!("restored-{point}.raw"));
        let out = d.restore("app1", "vda", &["--point", &point.to_string()], &raw);
        assert!(
            out.status.success(),
            "restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let state = check_restored(&raw, &d.path(&format!("scratch-{point}")));
        eprintln!("point {point} restored: {state:?}");
        assert_eq!(
            state.freeze,
            (state.last, "quiet".to_owned()),
            "point {point}: the database must hold exactly what was committed when the hook \
             quiesced the application"
        );
        assert!(
            (before..=after).contains(&state.last),
            "point {point} holds transaction {} but was taken between {before} and {after}",
            state.last
        );
        assert!(state.last > previous, "points go forward");
        assert_eq!(state.freezes, k + 1, "one freeze per point");
        previous = state.last;
        if k == 0 {
            first_last = state.last;
        }
        if k + 1 < points.len() {
            std::fs::remove_file(&raw).unwrap();
        }
    }

    // The newest point boots, and its database runs inside the restored guest.
    let (newest, _, _) = points[points.len() - 1];
    let stop = g.shutdown(Duration::from_secs(180)).unwrap();
    assert!(stop.success(), "{stop}");
    std::fs::create_dir_all(d.path("restored-guest")).unwrap();
    let raw = d.path(&format!("restored-{newest}.raw"));
    let mut r =
        Guest::boot_from(&d.path("restored-guest"), &raw, "raw", Accel::from_env()).unwrap();
    let t = r.wait_ready(Duration::from_secs(400)).unwrap();
    eprintln!("restored point {newest} booted in {:.1} s", t.as_secs_f64());
    let check = r
        .exec(&[
            "sqlite3",
            APP_DB,
            "PRAGMA integrity_check; SELECT max(id) FROM tx;",
        ])
        .unwrap();
    assert!(check.success(), "{check:?}");
    let lines: Vec<&str> = check.stdout.lines().collect();
    assert_eq!(lines, ["ok", previous.to_string().as_str()], "{check:?}");
    // No journal replay at mount: the kernel says so when it recovers one.
    let dmesg = r.exec(&["dmesg"]).unwrap();
    assert!(
        !dmesg.stdout.contains("recovery complete"),
        "the restored root file system was recovered at mount"
    );
    r.shutdown(Duration::from_secs(180)).unwrap();

    // A drill that tests the application: the restored VM's guest agent (an isolated channel)
    // runs the checks; the RTO runs to "application healthy".
    let checks = d.path("checks.toml");
    std::fs::write(
        &checks,
        format!(
            r#"[[check]]
name = "system"
command = ["sh", "-c", "systemctl is-system-running --wait || true"]
expect_output = "^(running|degraded)$"
[[check]]
name = "database"
command = ["sqlite3", "{APP_DB}", "PRAGMA integrity_check; SELECT count(*) FROM tx;"]
expect_output = '\Aok\n{previous}\n?\z'
"#
        ),
    )
    .unwrap();
    let out = run(Command::new(rewind_tests::bin("rewind-receiver"))
        .args([
            "drill",
            "--vm",
            "app1",
            "--boot",
            "--json",
            "--boot-timeout",
            "400",
        ])
        .args(["--accel", Accel::from_env().name()])
        .args(["--expect-serial", guest::READY_MARKER])
        .arg("--checks")
        .arg(&checks)
        .args(["--check", &format!("test -s {APP_LOG}")])
        .arg("--data")
        .arg(d.data()));
    let drill: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "drill printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!(
        "drill: {} boot {} s, healthy {} s, rto {} s; checks {}",
        drill["result"],
        drill["boot_seconds"],
        drill["healthy_seconds"],
        drill["rto_seconds"],
        drill["checks"]
    );
    assert!(out.status.success(), "{drill}");
    assert_eq!(drill["result"], "passed", "{drill}");
    let names: Vec<&str> = drill["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["passed"], true, "{c}");
            c["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        names,
        ["system", "database", format!("test -s {APP_LOG}").as_str()]
    );
    let (boot, healthy) = (
        drill["boot_seconds"].as_f64().unwrap(),
        drill["healthy_seconds"].as_f64().unwrap(),
    );
    assert!(healthy > boot, "healthy after the boot marker: {drill}");
    assert_eq!(drill["rto_seconds"].as_f64(), Some(healthy), "{drill}");

    // An instant clone at a point: the first point served over NBD and booted through a
    // throw-away overlay, nothing restored first; it runs with that point's transactions.
    let (first, _, _) = points[0];
    let sock = d.path("export.sock");
    let export = Command::new(rewind_tests::bin("rewind-receiver"))
        .args([
            "export",
            "--vm",
            "app1",
            "--point",
            &first.to_string(),
            "--data",
        ])
        .arg(d.data())
        .arg("--unix")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _export = KillOnDrop(export);
    assert!(
        wait_until(Duration::from_secs(60), || sock.exists()),
        "the export never listened"
    );
    std::fs::create_dir_all(d.path("clone")).unwrap();
    let uri = format!("nbd+unix:///vda?socket={}", sock.display());
    let mut c =
        Guest::boot_from(&d.path("clone"), Path::new(&uri), "raw", Accel::from_env()).unwrap();
    let t = c.wait_ready(Duration::from_secs(400)).unwrap();
    let q = c
        .exec(&[
            "sqlite3",
            APP_DB,
            "PRAGMA integrity_check; SELECT count(*) FROM tx;",
        ])
        .unwrap();
    assert_eq!(
        q.stdout.lines().collect::<Vec<_>>(),
        ["ok", first_last.to_string().as_str()],
        "{q:?}"
    );
    eprintln!(
        "instant clone of point {first} up in {:.1} s with its {first_last} transactions",
        t.as_secs_f64()
    );
    c.shutdown(Duration::from_secs(180)).unwrap();
}
