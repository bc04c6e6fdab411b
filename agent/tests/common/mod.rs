//! Helpers the agent's integration tests share: running commands and serving an image with
//! `qemu-nbd`.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn sh(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn qemu_io(img: &Path, op: &str) {
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", op])
        .arg(img));
}

pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn serve(img: &Path, sock: &Path, bitmap: Option<&str>) -> Server {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "--read-only",
        "--persistent",
        "--format=qcow2",
        "--export-name=disk",
    ])
    .arg(format!("--socket={}", sock.display()));
    if let Some(b) = bitmap {
        cmd.arg(format!("--bitmap={b}"));
    }
    let child = cmd.arg(img).stdin(Stdio::null()).spawn().unwrap();
    // The socket file appears at bind(), before listen(): wait until a connection succeeds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sock.exists(), "qemu-nbd did not start");
    Server(child)
}
