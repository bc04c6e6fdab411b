//! A real Debian guest: the cached image boots, reaches a running system, runs commands through
//! its guest agent, keeps a file it wrote, and powers off on `guest-shutdown`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::guest::{self, Accel, Guest};
use std::time::{Duration, Instant};

#[test]
fn a_debian_guest_boots_runs_commands_and_shuts_down() {
    let t = Instant::now();
    let image = guest::image().unwrap();
    eprintln!(
        "guest image in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        image.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let accel = Accel::from_env();
    let mut g = Guest::boot(dir.path(), &image, accel).unwrap();
    let boot = g.wait_ready(Duration::from_secs(300)).unwrap();
    eprintln!(
        "booted under {} in {:.1} s",
        accel.name(),
        boot.as_secs_f64()
    );

    let uname = g.exec(&["uname", "-r"]).unwrap();
    assert!(uname.success(), "{uname:?}");
    assert!(uname.stdout.trim().ends_with("-cloud-amd64"), "{uname:?}");

    let t = Instant::now();
    let state = g
        .exec(&["systemctl", "is-system-running", "--wait"])
        .unwrap();
    let state = state.stdout.trim().to_owned();
    if state == "degraded" {
        let failed = g.exec(&["systemctl", "--failed", "--no-legend"]).unwrap();
        eprintln!("degraded; failed units:\n{}", failed.stdout);
    }
    assert!(
        ["running", "degraded"].contains(&state.as_str()),
        "system state {state:?}"
    );
    eprintln!(
        "{state} {:.1} s after the marker, kernel {}",
        t.elapsed().as_secs_f64(),
        uname.stdout.trim()
    );

    let w = g.exec(&["sh", "-c", "echo hi > /root/x && sync"]).unwrap();
    assert!(w.success(), "{w:?}");
    let r = g.exec(&["cat", "/root/x"]).unwrap();
    assert!(r.success(), "{r:?}");
    assert_eq!(r.stdout, "hi\n");
    let missing = g.exec(&["cat", "/root/nothing"]).unwrap();
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(missing.stderr.contains("No such file"), "{missing:?}");

    let t = Instant::now();
    let status = g.shutdown(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "QEMU exited with {status}");
    eprintln!("powered off in {:.1} s", t.elapsed().as_secs_f64());
}
