//! Running as a service: `rewind-agent run --config` protects several VMs, reloads on SIGHUP,
//! checkpoints the point in flight on SIGTERM, serves metrics, and `status` tells the state of
//! each VM (non-zero exit when one has no point within 2x its RPO target);
//! `rewind-receiver serve --config` picks up drill schedules and retention on SIGHUP.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, disk_of, free_port, run, wait_until, Deployment, Receiver};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;

/// A running `rewind-agent run`, its stdout lines collected, and its log lines (passed on to
/// the test's stderr).
struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn start(config: &Path, extra: &[&str]) -> Agent {
        let mut child = Command::new(bin("rewind-agent"))
            .args(["run", "--json", "--config"])
            .arg(config)
            .args(extra)
            // Logs to stderr, never to a journal the test runner may have.
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |r: Box<dyn std::io::Read + Send>, echo: bool| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let l = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("{line}");
                    }
                    l.lock().unwrap().push(line);
                }
            });
            lines
        };
        let lines = collect(Box::new(child.stdout.take().unwrap()), false);
        let log = collect(Box::new(child.stderr.take().unwrap()), true);
        Agent { child, lines, log }
    }

    /// Whether a log line so far contains `text`.
    fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Committed points of `vm` printed so far.
    fn points(&self, vm: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["vm"] == vm)
            .collect()
    }

    fn metrics_addr(&self) -> Option<String> {
        self.lines.lock().unwrap().iter().find_map(|l| {
            l.strip_prefix("rewind-agent metrics on http://")
                .and_then(|r| r.strip_suffix("/metrics"))
                .map(str::to_owned)
        })
    }

    fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), sig).unwrap();
    }

    /// SIGTERM, then the exit status and how long it took.
    fn stop(mut self) -> (std::process::ExitStatus, Duration) {
        let t = Instant::now();
        self.signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s, t.elapsed());
            }
            assert!(Instant::now() < deadline, "the agent did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The agent configuration of host1 against `rx`, with `vms` as TOML `[[vm]]` entries.
fn agent_config(d: &Deployment, rx: &Receiver, globals: &str, vms: &str) -> String {
    let pki = d.pki();
    format!(
        "state = \"{}\"\n{globals}\n[receiver]\nurl = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n{vms}",
        d.path("state-host1").display(),
        rx.url(),
        pki.join("ca.pem").display(),
        pki.join("host1.pem").display(),
        pki.join("host1.key").display(),
    )
}

fn vm(name: &str, disk: &Path, extra: &str) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\ndisks = [\"vda={}\"]\n{extra}\n",
        disk.display()
    )
}

fn status(config: &Path) -> (Output, Vec<Value>) {
    let o = run(Command::new(bin("rewind-agent"))
        .args(["status", "--json", "--config"])
        .arg(config));
    let v = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (o, v)
}

#[test]
fn run_protects_vms_reloads_on_sighup_and_reports_metrics() {
    let d = Deployment::new();
    let rx = d.serve();
    let (a, b) = (d.path("a.raw"), d.path("b.raw"));
    for (p, first) in [(&a, 0), (&b, 7)] {
        disk::create(p, 4 << 20);
        disk::random_blocks(p, BLOCK, first, 5, &mut rand::rng());
    }
    let cfg = d.path("agent.toml");
    let globals = "metrics = \"127.0.0.1:0\"\ninterval = 1\nrpo = 60";
    std::fs::write(&cfg, agent_config(&d, &rx, globals, &vm("a", &a, ""))).unwrap();
    let agent = Agent::start(&cfg, &[]);
    assert!(wait_until(Duration::from_secs(60), || agent
        .points("a")
        .len()
        >= 2));
    assert!(agent.points("b").is_empty());
    assert_eq!(disk_of(&agent.points("a")[0], "vda")["changed_blocks"], 5);

    // A second VM appears on SIGHUP; a bad file is refused and the running one kept.
    std::fs::write(&cfg, "this is not toml [").unwrap();
    agent.signal(rustix::process::Signal::HUP);
    assert!(
        wait_until(Duration::from_secs(30), || agent.logged("reload refused")),
        "the bad file was not refused"
    );
    let vms = vm("a", &a, "") + &vm("b", &b, "interval = 2");
    std::fs::write(&cfg, agent_config(&d, &rx, globals, &vms)).unwrap();
    agent.signal(rustix::process::Signal::HUP);
    assert!(wait_until(Duration::from_secs(60), || !agent
        .points("b")
        .is_empty()));
    assert_eq!(disk_of(&agent.points("b")[0], "vda")["changed_blocks"], 5);
    let n_a = agent.points("a").len();
    assert!(
        wait_until(Duration::from_secs(30), || agent.points("a").len() > n_a),
        "a goes on"
    );

    // Metrics, from the state database.
    let addr = agent.metrics_addr().expect("metrics address printed");
    let m = http_get(&addr, "/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    for series in [
        "rewind_agent_last_point_age_seconds{vm=\"a\"}",
        "rewind_agent_rpo_target_seconds{vm=\"b\"} 60",
        "rewind_agent_alert{vm=\"a\"} 0",
        "rewind_agent_cycles_total{vm=\"b\"}",
        "rewind_agent_bytes_read_total{vm=\"a\"}",
        "rewind_agent_bytes_sent_total{vm=\"a\"}",
        "rewind_agent_last_cycle_seconds{vm=\"b\"}",
    ] {
        assert!(m.contains(series), "{series} missing:\n{m}");
    }

    // status: both replicating, exit 0.
    let (o, st) = status(&cfg);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(st.len(), 2);
    for s in &st {
        assert_eq!(s["state"], "replicating", "{s}");
        assert_eq!(s["alert"], false);
    }

    let (exit, took) = agent.stop();
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    // The points restore.
    let last_b = d.points("b").last().unwrap()["id"].as_u64().unwrap();
    assert_eq!(d.restored_digest("b", "vda", last_b), disk::digest(&b));
}

#[test]
fn sigterm_checkpoints_the_point_in_flight() {
    let d = Deployment::new();
    let rx = d.serve();
    let big = d.path("big.raw");
    disk::create(&big, 96 << 20);
    disk::random_blocks(&big, BLOCK, 0, 1536, &mut rand::rng());
    let cfg = d.path("agent.toml");
    // 96 MiB of random data at 8 MB/s: the first point takes ~12 s.
    std::fs::write(
        &cfg,
        agent_config(&d, &rx, "bwlimit = 8", &vm("slow", &big, "")),
    )
    .unwrap();
    let agent = Agent::start(&cfg, &["--stop-grace", "1"]);
    // Stopped once a third of the point is stored, with most of it still to send.
    let full = 1536 * BLOCK;
    assert!(
        wait_until(Duration::from_secs(60), || d.pack_bytes() >= full / 3),
        "the upload never got going"
    );
    let (exit, took) = agent.stop();
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    assert!(d.points("slow").is_empty(), "nothing half-committed");

    // The next cycle resumes the checkpointed session and sends only what is missing.
    let r = d.sync_ok(&rx, "host1", "slow", &[("vda", &big)]);
    assert_eq!(r["resumed"], true, "{r}");
    assert!(
        r["sent_bytes"].as_u64().unwrap() < full * 3 / 4,
        "sent {} of {full}",
        r["sent_bytes"]
    );
    assert_eq!(
        d.restored_digest("slow", "vda", r["point"].as_u64().unwrap()),
        disk::digest(&big)
    );
}

#[test]
fn status_says_behind_and_failing_and_exits_non_zero() {
    let d = Deployment::new();
    let rx = d.serve();
    let a = d.path("a.raw");
    disk::create(&a, 2 << 20);
    disk::random_blocks(&a, BLOCK, 0, 2, &mut rand::rng());
    let cfg = d.path("agent.toml");
    let vms = vm("fine", &a, "rpo = 2\ninterval = 3600")
        + &vm(
            "broken",
            Path::new("/nonexistent/disk.raw"),
            "interval = 3600",
        );
    std::fs::write(&cfg, agent_config(&d, &rx, "", &vms)).unwrap();
    let agent = Agent::start(&cfg, &[]);
    let state_of = |vm: &str| {
        let (o, st) = status(&cfg);
        let s = st.iter().find(|s| s["vm"] == vm).cloned();
        (o, st, s.map(|s| s["state"].clone()))
    };
    // The agent records its point after the receiver lists it: wait on the agent's status.
    assert!(
        wait_until(Duration::from_secs(60), || state_of("fine").2
            == Some("replicating".into())),
        "the agent's status never said replicating: {:?}",
        state_of("fine").1
    );
    assert!(!agent.points("fine").is_empty());
    let (exit, _) = agent.stop();
    assert!(exit.success());

    // Once 2x the 2 s RPO target passes without a new point, the status says behind.
    assert!(
        wait_until(Duration::from_secs(60), || state_of("fine").2
            == Some("behind".into())),
        "the status never said behind: {:?}",
        state_of("fine").1
    );
    let (o, st, _) = state_of("fine");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("fine"), "{err}");
    let fine = st.iter().find(|s| s["vm"] == "fine").unwrap();
    assert_eq!(fine["state"], "behind", "{fine}");
    assert_eq!(fine["alert"], true);
    let broken = st.iter().find(|s| s["vm"] == "broken").unwrap();
    assert_eq!(broken["state"], "failing", "{broken}");
    assert_eq!(broken["last_error_kind"], "disk", "{broken}");
    assert!(broken["why"].as_str().unwrap().contains("nonexistent"));
}

#[test]
fn serve_config_reload_schedules_drills_and_retention() {
    let d = Deployment::new();
    let cfg = d.path("receiver.toml");
    std::fs::write(&cfg, "rpo = 600\n").unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let rx = Receiver::start_with(
        &d.data(),
        &d.pki(),
        &["--config", cfg.to_str().unwrap(), "--metrics", &metrics],
    );
    let vda = d.path("vda.raw");
    disk::create(&vda, 4 << 20);
    disk::write_at(&vda, 0, &disk::boot_sector("SCHEDULED-OK"));
    for i in 0..3 {
        disk::random_blocks(&vda, BLOCK, 10 + i, 1, &mut rand::rng());
        d.sync_ok(&rx, "host1", "sched", &[("vda", &vda)]);
    }
    assert_eq!(d.points("sched").len(), 3);
    let drills = || {
        let o = run(Command::new(bin("rewind-receiver"))
            .args(["drills", "--json", "--vm", "sched", "--data"])
            .arg(d.data()));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    assert_eq!(drills(), serde_json::json!([]));

    std::fs::write(
        &cfg,
        "rpo = 600\nprune_interval = 1\n[vm.sched]\nretention = { last = 1 }\n\
         drill = { every = 1, boot = true, boot_timeout = 60, expect_serial = \"SCHEDULED-OK\" }\n",
    )
    .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(rx.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(90), || drills()
            .as_array()
            .is_some_and(|a| !a.is_empty())),
        "a scheduled drill ran"
    );
    let first = &drills()[0];
    assert_eq!(first["result"], "passed", "{first}");
    assert!(first["serial_tail"]
        .as_str()
        .unwrap()
        .contains("SCHEDULED-OK"));
    let m = http_get(&metrics, "/metrics");
    for series in [
        "rewind_drill_last_passed{vm=\"sched\"} 1",
        "rewind_drills_total{vm=\"sched\",result=\"passed\"}",
        "rewind_drill_last_rto_seconds{vm=\"sched\"}",
        "rewind_drill_last_point_age_seconds{vm=\"sched\"}",
        "rewind_store_reduction_ratio",
        "rewind_dedup_ratio",
        "rewind_vm_stored_bytes_total{vm=\"sched\"}",
    ] {
        assert!(m.contains(series), "{series} missing:\n{m}");
    }
    assert!(
        wait_until(Duration::from_secs(30), || d.points("sched").len() == 1),
        "scheduled retention kept 1 point"
    );
    let status = run(Command::new(bin("rewind-receiver"))
        .args(["status", "--json", "--data"])
        .arg(d.data())
        .arg("--config")
        .arg(&cfg));
    assert!(status.status.success());
    let v: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["state"], "replicating", "{v}");
    assert_eq!(v["rpo_seconds"], 600);
    assert!(v["last_drill"].as_str().unwrap().starts_with("passed"));
}

#[test]
fn a_long_seed_does_not_hold_up_other_vms() {
    let d = Deployment::new();
    let rx = d.serve();
    let big = d.path("big.raw");
    disk::create(&big, 64 << 20);
    disk::random_blocks(&big, BLOCK, 0, 1024, &mut rand::rng());
    let small = d.path("small.raw");
    disk::create(&small, 2 << 20);
    disk::random_blocks(&small, BLOCK, 0, 3, &mut rand::rng());
    let cfg = d.path("agent.toml");
    // The big seed takes ~32 s at 2 MB/s; the small VM cycles every second meanwhile, sharing
    // the agent's state database (a scan holding its write lock would stall it for the 30 s
    // busy timeout, then fail it).
    let vms = vm("big", &big, "bwlimit = 2") + &vm("small", &small, "interval = 1");
    std::fs::write(&cfg, agent_config(&d, &rx, "", &vms)).unwrap();
    let agent = Agent::start(&cfg, &[]);
    assert!(
        wait_until(Duration::from_secs(25), || agent.points("small").len() >= 3),
        "small VM points: {}",
        agent.points("small").len()
    );
    assert!(
        agent.points("big").is_empty(),
        "the big seed is still running"
    );
    assert!(wait_until(Duration::from_secs(90), || !agent
        .points("big")
        .is_empty()));
    let (exit, _) = agent.stop();
    assert!(exit.success());
    let p = agent_points_last(&d, "big");
    assert_eq!(d.restored_digest("big", "vda", p), disk::digest(&big));
}

fn agent_points_last(d: &Deployment, vm: &str) -> u64 {
    d.points(vm).last().unwrap()["id"].as_u64().unwrap()
}

#[test]
fn sigterm_stops_continuous_sync_and_the_next_run_resumes() {
    let d = Deployment::new();
    let rx = d.serve();
    let big = d.path("big.raw");
    disk::create(&big, 64 << 20);
    disk::random_blocks(&big, BLOCK, 0, 1024, &mut rand::rng());
    let mut child = d.spawn_continuous_with(&rx, "cont", &[("vda", &big)], &["--bwlimit", "4"]);
    // Stopped once the point's upload is under way (64 MiB at 4 MB/s take ~17 s).
    assert!(
        wait_until(Duration::from_secs(60), || d.pack_bytes() >= 8 << 20),
        "the upload never got going"
    );
    let t = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(d.points("cont").is_empty());
    let r = d.sync_ok(&rx, "host1", "cont", &[("vda", &big)]);
    assert_eq!(r["resumed"], true, "{r}");
    assert_eq!(
        d.restored_digest("cont", "vda", r["point"].as_u64().unwrap()),
        disk::digest(&big)
    );
}
