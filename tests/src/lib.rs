//! Harness for end-to-end tests: runs the real `rewind-receiver` and `rewind-agent` binaries
//! with a throw-away PKI, and builds disk images with known content.

#![allow(clippy::unwrap_used)]

pub mod benchkit;
pub mod copying;
pub mod disk;
pub mod faultlink;
pub mod garage;
pub mod grpc;
pub mod guest;
pub mod h2raw;
pub mod libvirt;
pub mod procfs;
pub mod qemu;
pub mod s3;
pub mod s3proxy;
pub mod wan;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary, next to the test executable's `deps` folder.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The JSON report of a `sync --once --json` that must have succeeded (panics otherwise).
pub fn sync_report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "sync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("sync --json prints JSON")
}

/// A child process killed and reaped when dropped, so a panicking test or a failing command
/// leaves no server behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command and returns its output (never panics on failure status).
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("spawn")
}

/// A scratch deployment: a temporary folder with a PKI (agents `host1` and `host2`), a data
/// folder for the receiver and one state folder per agent.
pub struct Deployment {
    pub dir: tempfile::TempDir,
}

impl Deployment {
    pub fn new() -> Deployment {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        let ok = |o: Output| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        ok(run(Command::new(bin("rewind-receiver"))
            .args(["pki", "init", "--dir"])
            .arg(&pki)));
        for agent in ["host1", "host2"] {
            ok(run(Command::new(bin("rewind-receiver"))
                .args(["pki", "issue", "--dir"])
                .arg(&pki)
                .args(["--agent", agent])));
        }
        Deployment { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    pub fn data(&self) -> PathBuf {
        self.path("data")
    }

    /// Starts `serve` on a free loopback port.
    pub fn serve(&self) -> Receiver {
        Receiver::start(&self.data(), &self.pki())
    }

    /// `rewind-agent sync --once --json` as `agent`, with extra flags.
    pub fn sync(
        &self,
        rx: &Receiver,
        agent: &str,
        vm: &str,
        disks: &[(&str, &Path)],
        extra: &[&str],
    ) -> Output {
        run(&mut self.sync_cmd(rx, agent, vm, disks, extra))
    }

    /// The command line of [`Deployment::sync`], to spawn it in the background.
    pub fn sync_cmd(
        &self,
        rx: &Receiver,
        agent: &str,
        vm: &str,
        disks: &[(&str, &Path)],
        extra: &[&str],
    ) -> Command {
        let mut cmd = self.agent_cmd(rx, agent, "sync");
        cmd.args(["--vm", vm, "--once", "--json"]);
        for (name, path) in disks {
            cmd.arg("--disk").arg(format!("{name}={}", path.display()));
        }
        cmd.args(extra);
        cmd
    }

    /// `rewind-agent SUBCOMMAND` as `agent`, with the receiver, credentials and state folder set.
    pub fn agent_cmd(&self, rx: &Receiver, agent: &str, subcommand: &str) -> Command {
        let pki = self.pki();
        let mut cmd = Command::new(bin("rewind-agent"));
        cmd.arg(subcommand)
            .arg("--receiver")
            .arg(rx.url())
            .arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join(format!("{agent}.pem")))
            .arg("--key")
            .arg(pki.join(format!("{agent}.key")))
            .arg("--state")
            .arg(self.path(&format!("state-{agent}")));
        cmd
    }

    /// `rewind-agent sync` in continuous mode (a point every `interval` seconds), running in the
    /// background with its output discarded; kill the child to stop it.
    pub fn spawn_continuous(
        &self,
        rx: &Receiver,
        vm: &str,
        disks: &[(&str, &Path)],
        interval: u32,
    ) -> Child {
        self.spawn_continuous_with(rx, vm, disks, &["--interval", &interval.to_string()])
    }

    /// `rewind-agent sync` as `host1` in continuous mode with `extra` flags, in the background
    /// with its output discarded; kill the child to stop it.
    pub fn spawn_continuous_with(
        &self,
        rx: &Receiver,
        vm: &str,
        disks: &[(&str, &Path)],
        extra: &[&str],
    ) -> Child {
        let cmd = self.sync_cmd(rx, "host1", vm, disks, extra);
        let args: Vec<_> = cmd
            .get_args()
            .filter(|a| *a != "--once")
            .map(|a| a.to_owned())
            .collect();
        Command::new(cmd.get_program())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent")
    }

    /// XORs one byte inside the first chunk of the first pack file (by name) with `xor`:
    /// damage only a read of that chunk sees.
    pub fn flip_pack_byte(&self, xor: u8) {
        use std::os::unix::fs::FileExt;
        let mut packs: Vec<_> = std::fs::read_dir(self.data().join("packs"))
            .expect("packs")
            .map(|e| e.expect("entry").path())
            .collect();
        packs.sort();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&packs[0])
            .expect("open pack");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 8 + 40 + 1000).expect("read");
        f.write_all_at(&[b[0] ^ xor], 8 + 40 + 1000).expect("write");
    }

    /// Bytes in the receiver's pack files.
    pub fn pack_bytes(&self) -> u64 {
        std::fs::read_dir(self.data().join("packs"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// `rewind-agent sync --once --json --qmp SOCKET` as `host1`, with extra flags.
    pub fn sync_live(&self, rx: &Receiver, vm: &str, qmp: &Path, extra: &[&str]) -> Output {
        let mut cmd = self.sync_cmd(rx, "host1", vm, &[], extra);
        cmd.arg("--qmp").arg(qmp);
        run(&mut cmd)
    }

    /// Like [`Deployment::sync_live`], but panics unless it succeeded; returns the report.
    pub fn sync_live_ok(&self, rx: &Receiver, vm: &str, qmp: &Path) -> Value {
        sync_report(&self.sync_live(rx, vm, qmp, &[]))
    }

    /// Like [`Deployment::sync`], but panics unless it succeeded, and returns its JSON report.
    pub fn sync_ok(&self, rx: &Receiver, agent: &str, vm: &str, disks: &[(&str, &Path)]) -> Value {
        sync_report(&self.sync(rx, agent, vm, disks, &[]))
    }

    /// `points --json` for a VM.
    pub fn points(&self, vm: &str) -> Vec<Value> {
        self.try_points(vm)
            .unwrap_or_else(|e| panic!("points --vm {vm} failed: {e}"))
    }

    /// `points --json` for a VM, or its error message (e.g. while the VM does not exist yet).
    pub fn try_points(&self, vm: &str) -> Result<Vec<Value>, String> {
        let out = run(Command::new(bin("rewind-receiver"))
            .args(["points", "--data"])
            .arg(self.data())
            .args(["--vm", vm, "--json"]));
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("JSON array"))
    }

    /// Restores a disk of a point (`--point ID` or `--at TIME`) to `out`.
    pub fn restore(&self, vm: &str, disk: &str, select: &[&str], out: &Path) -> Output {
        run(Command::new(bin("rewind-receiver"))
            .args(["restore", "--data"])
            .arg(self.data())
            .args(["--vm", vm, "--disk", disk])
            .args(select)
            .arg("--out")
            .arg(out))
    }

    /// Restores a point's disk and returns the content digest of the image.
    pub fn restored_digest(&self, vm: &str, disk: &str, point: u64) -> disk::Digest {
        let out = self.path(&format!("restore-{vm}-{disk}-{point}.raw"));
        let o = self.restore(vm, disk, &["--point", &point.to_string()], &out);
        assert!(
            o.status.success(),
            "restore failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let d = disk::digest(&out);
        std::fs::remove_file(&out).expect("remove restored image");
        d
    }
}

impl Default for Deployment {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `rewind-receiver serve`, killed with SIGKILL when dropped.
pub struct Receiver {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Receiver {
    pub fn start(data: &Path, pki: &Path) -> Receiver {
        Receiver::start_with(data, pki, &[])
    }

    /// Starts `serve` with extra flags.
    pub fn start_with(data: &Path, pki: &Path, extra: &[&str]) -> Receiver {
        Receiver::start_via(
            Command::new(bin("rewind-receiver")),
            data,
            pki,
            "127.0.0.1:0",
            extra,
        )
    }

    /// Starts `serve` on `listen` through `cmd`: the receiver binary, or a wrapper that runs it
    /// (such as `ip netns exec NS rewind-receiver`), with `extra` flags.
    pub fn start_via(
        mut cmd: Command,
        data: &Path,
        pki: &Path,
        listen: &str,
        extra: &[&str],
    ) -> Receiver {
        let mut child = cmd
            .args(["serve", "--listen", listen, "--data"])
            .arg(data)
            .arg("--pki")
            .arg(pki)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn receiver");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("receiver did not print its address: {line:?}"));
        Receiver {
            child: Some(child),
            addr,
        }
    }

    /// An address where no receiver runs (to test an unreachable receiver).
    pub fn dead(addr: SocketAddr) -> Receiver {
        Receiver { child: None, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The receiver's process id (0 for a dead one).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits up to `timeout` for the receiver to exit on its own (a fault point, a signal) and
    /// returns how it ended, or `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().expect("poll receiver");
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGTERM, as systemd stops the service: in-flight calls finish first. Returns how it
    /// ended, or `None` if it still runs after `timeout` (then it is killed when dropped).
    pub fn terminate(mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_ref().expect("a running receiver");
        rustix::process::kill_process(
            rustix::process::Pid::from_child(child),
            rustix::process::Signal::TERM,
        )
        .expect("SIGTERM");
        self.wait_exit(timeout)
    }

    /// SIGKILL, as a crash or power cut would.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("a running receiver");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback TCP port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// The `disks` entry named `name` of a sync report or point.
pub fn disk_of<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no disk {name} in {v}"))
}

/// The body of `GET /metrics` from a receiver's metrics address.
pub fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    out
}
