//! The service side: `systemd-analyze verify` accepts the units (with the real binaries in
//! place of /usr/local/bin), and `serve` tells systemd it is ready over `$NOTIFY_SOCKET`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, run, Deployment};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for (file, as_name) in [
        ("rewind-receiver.service", "rewind-receiver.service"),
        ("rewind-agent@.service", "rewind-agent@web1.service"),
    ] {
        let text = std::fs::read_to_string(units.join(file)).unwrap();
        let text = text
            .replace(
                "/usr/local/bin/rewind-receiver",
                bin("rewind-receiver").to_str().unwrap(),
            )
            .replace(
                "/usr/local/bin/rewind-agent",
                bin("rewind-agent").to_str().unwrap(),
            );
        let path = dir.path().join(as_name);
        std::fs::write(&path, text).unwrap();
        let out = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path));
        let err = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("rewind")).collect();
        assert!(out.status.success() && ours.is_empty(), "{as_name}: {err}");
    }
}

#[test]
fn serve_notifies_readiness() {
    let d = Deployment::new();
    let sock_path = d.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(bin("rewind-receiver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(d.data())
        .arg("--pki")
        .arg(d.pki())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    let n = sock.recv(&mut buf).unwrap();
    let second = String::from_utf8_lossy(&buf[..n]).into_owned();
    // SIGTERM: the receiver says it is stopping, then exits cleanly.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let mut stopping = false;
    for _ in 0..20 {
        let Ok(n) = sock.recv(&mut buf) else { break };
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(first.starts_with("READY=1"), "{first}");
    assert_eq!(second, "WATCHDOG=1");
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    assert!(status.success(), "{status}");
}
