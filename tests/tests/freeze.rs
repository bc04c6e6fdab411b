//! Guest freezes against a real Debian guest and its `qemu-guest-agent`: a slow fsfreeze hook
//! bounds the cycle and still ends thawed; a stopped (SIGTERM) `sync --once` thaws before it
//! exits; a killed (SIGKILL) one leaves a freeze that the next run thaws first; a freeze that
//! another tool holds is neither thawed nor counted as application-consistent.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::guest::{self, Accel, Guest, GuestAgent};
use rewind_tests::{sync_report, Deployment};
use rustix::process::{kill_process, Pid, Signal};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Seconds the slow hook sleeps before the guest agent freezes.
const HOOK_SECS: u64 = 30;

fn boot(d: &Deployment) -> Guest {
    let image = guest::image().unwrap();
    std::fs::create_dir_all(d.path("guest")).unwrap();
    let mut g = Guest::boot(&d.path("guest"), &image, Accel::from_env()).unwrap();
    let t = g.wait_ready(Duration::from_secs(400)).unwrap();
    eprintln!("guest ready in {:.1} s", t.as_secs_f64());
    g
}

fn qga_path(g: &Guest) -> PathBuf {
    g.dir.join("qga.sock")
}

/// A connection of the test's own to the guest agent (the agent under test needs the socket
/// free: drop it before running the agent).
fn qga(g: &Guest) -> GuestAgent {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match GuestAgent::connect(&qga_path(g), Duration::from_secs(10)) {
            Ok(a) => return a,
            Err(e) if Instant::now() < deadline => {
                eprintln!("guest agent not answering yet: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!("guest agent: {e:#}"),
        }
    }
}

fn freeze_status(g: &Guest) -> String {
    let mut a = qga(g);
    let s = a.execute("guest-fsfreeze-status", json!({})).unwrap();
    s.as_str().unwrap().to_owned()
}

/// A write in the guest succeeds within `limit` (a frozen file system blocks it).
fn guest_writes(g: &Guest, limit: Duration) {
    let t = Instant::now();
    let mut a = qga(g);
    let w = a
        .exec(&["sh", "-c", "echo x > /root/probe && sync"], limit)
        .unwrap();
    assert!(w.success(), "{w:?}");
    eprintln!("guest write done in {:.1} s", t.elapsed().as_secs_f64());
}

fn qga_arg(g: &Guest) -> String {
    qga_path(g).display().to_string()
}

fn marker(d: &Deployment, vm: &str) -> PathBuf {
    d.path(&format!("state-host1/live/{vm}/guest-frozen-by-rewind"))
}

/// `sync --once` with the guest agent, paused (SIGSTOP) right after its freeze succeeded.
fn spawn_paused(d: &Deployment, rx: &rewind_tests::Receiver, vm: &str, g: &Guest) -> Child {
    let mut cmd = d.sync_cmd(rx, "host1", vm, &[], &["--guest-agent", &qga_arg(g)]);
    cmd.arg("--qmp")
        .arg(g.agent_qmp())
        .env("REWIND_PAUSE", "frozen")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while state(child.id()) != Some('T') {
        assert!(
            Instant::now() < deadline,
            "the agent did not reach the frozen point"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// The state letter of /proc/PID/stat (`T` when stopped).
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn signal(child: &Child, sig: Signal) {
    kill_process(Pid::from_raw(child.id() as i32).unwrap(), sig).unwrap();
}

/// Waits up to `limit` for the child to exit; returns its output and how long it took.
fn wait_exit(mut child: Child, limit: Duration) -> (std::process::Output, Duration) {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("the agent still runs {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), t.elapsed())
}

fn write_guest_file(a: &mut GuestAgent, path: &str, text: &str) {
    let w = a
        .exec(
            &[
                "sh",
                "-c",
                &format!("mkdir -p $(dirname {path}) && printf '%s' \"$0\" > {path}"),
                text,
            ],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(w.success(), "{w:?}");
}

/// Makes the guest agent run `/etc/qemu/fsfreeze-hook` (Debian's qemu-ga runs no hook unless
/// started with `--fsfreeze-hook`), with a hook in its `.d` folder that sleeps `secs` before a
/// freeze.
fn install_slow_hook(g: &Guest, secs: u64) {
    let mut a = qga(g);
    write_guest_file(
        &mut a,
        "/etc/qemu/fsfreeze-hook.d/slow",
        &format!("#!/bin/sh\n[ \"$1\" = freeze ] && sleep {secs}\nexit 0\n"),
    );
    write_guest_file(
        &mut a,
        "/etc/systemd/system/qemu-guest-agent.service.d/hook.conf",
        "[Service]\nExecStart=\nExecStart=-/usr/sbin/qemu-ga --fsfreeze-hook=/etc/qemu/fsfreeze-hook\n",
    );
    let r = a
        .exec(
            &[
                "sh",
                "-c",
                "chmod +x /etc/qemu/fsfreeze-hook.d/slow && systemctl daemon-reload",
            ],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(r.success(), "{r:?}");
    // The restart ends this guest agent: queue it and do not wait for its answer.
    a.execute(
        "guest-exec",
        json!({"path": "systemctl", "arg": ["--no-block", "restart", "qemu-guest-agent"]}),
    )
    .unwrap();
    drop(a);
    std::thread::sleep(Duration::from_secs(3));
    let mut a = qga(g);
    let cmd = a
        .exec(
            &["systemctl", "show", "-p", "ExecStart", "qemu-guest-agent"],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(cmd.stdout.contains("fsfreeze-hook"), "{cmd:?}");
}

#[test]
fn a_slow_fsfreeze_hook_makes_a_bounded_crash_consistent_point_and_the_guest_ends_thawed() {
    let d = Deployment::new();
    let rx = d.serve();
    let g = boot(&d);
    let p1 =
        sync_report(&d.sync_live(&rx, "vm1", &g.agent_qmp(), &["--guest-agent", &qga_arg(&g)]));
    assert_eq!(p1["consistency"], "application-consistent", "{p1}");

    install_slow_hook(&g, HOOK_SECS);
    let t = Instant::now();
    let out = d.sync_live(&rx, "vm1", &g.agent_qmp(), &["--guest-agent", &qga_arg(&g)]);
    let wall = t.elapsed();
    let p2 = sync_report(&out);
    let cycle = p2["seconds"].as_f64().unwrap();
    eprintln!(
        "slow hook: cycle {cycle:.1} s, process {:.1} s\n{}",
        wall.as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p2["consistency"], "crash-consistent", "{p2}");
    // The freeze gives up at 10 s; the rest of the cycle is a small incremental point.
    assert!(cycle < 22.0, "the cycle took {cycle:.1} s");
    // The process stays until the thaw is confirmed (after the hook's 30 s), not much longer.
    assert!(wall < Duration::from_secs(HOOK_SECS + 30), "{wall:?}");
    let t = Instant::now();
    assert_eq!(freeze_status(&g), "thawed");
    eprintln!(
        "status thawed {:.1} s after the agent exited",
        t.elapsed().as_secs_f64()
    );
    assert!(!marker(&d, "vm1").exists());
    guest_writes(&g, Duration::from_secs(10));
}

#[test]
fn stopped_killed_and_foreign_freezes_end_thawed_or_untouched() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut g = boot(&d);

    // A freeze another tool holds: not thawed, and the point is crash-consistent.
    {
        let mut a = qga(&g);
        let n = a.execute("guest-fsfreeze-freeze", json!({})).unwrap();
        assert!(n.as_u64().unwrap() > 0, "{n}");
    }
    let out = d.sync_live(&rx, "vm2", &g.agent_qmp(), &["--guest-agent", &qga_arg(&g)]);
    let p = sync_report(&out);
    assert_eq!(p["consistency"], "crash-consistent", "{p}");
    assert_eq!(
        freeze_status(&g),
        "frozen",
        "the agent thawed another tool's freeze"
    );
    {
        let mut a = qga(&g);
        a.execute("guest-fsfreeze-thaw", json!({})).unwrap();
    }
    guest_writes(&g, Duration::from_secs(10));

    // SIGTERM between freeze and thaw: the agent thaws, then exits.
    let child = spawn_paused(&d, &rx, "vm2", &g);
    assert!(marker(&d, "vm2").exists());
    signal(&child, Signal::TERM);
    signal(&child, Signal::CONT);
    let (out, took) = wait_exit(child, Duration::from_secs(60));
    eprintln!(
        "SIGTERM: exited ({}) {:.1} s after the signal\n{}",
        out.status,
        took.as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "a stopped --once reports no point");
    assert!(
        g.monitor.leftovers().is_empty(),
        "the stopped cycle left {:?} in QEMU",
        g.monitor.leftovers()
    );
    guest_writes(&g, Duration::from_secs(5));
    assert_eq!(freeze_status(&g), "thawed");
    assert!(!marker(&d, "vm2").exists());

    // SIGKILL there: the guest stays frozen until the next run, which thaws it first.
    let mut child = spawn_paused(&d, &rx, "vm2", &g);
    signal(&child, Signal::KILL);
    child.wait().unwrap();
    assert_eq!(freeze_status(&g), "frozen");
    assert!(marker(&d, "vm2").exists());
    let out = d.sync_live(&rx, "vm2", &g.agent_qmp(), &["--guest-agent", &qga_arg(&g)]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let p = sync_report(&out);
    assert!(stderr.contains("earlier run of the agent"), "{stderr}");
    assert_eq!(p["consistency"], "application-consistent", "{p}");
    assert_eq!(freeze_status(&g), "thawed");
    assert!(!marker(&d, "vm2").exists());
    guest_writes(&g, Duration::from_secs(5));
}
