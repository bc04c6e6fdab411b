//! Offline qcow2 images (a stopped VM): the same bitmap lifecycle as a live VM, driven with
//! `qemu-img bitmap`, and the image read through `qemu-nbd -B` so the chain of incremental
//! points continues while the VM is down. The image must not be in use: qemu-img takes QEMU's
//! write lock and refuses otherwise.

use crate::live::{BitmapInfo, DiskCapture, LiveDisk};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long qemu-nbd may take to open an image once it listens.
const OPEN_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// qemu-img or qemu-nbd failed (e.g. the image is in use by a running VM).
    #[error("{tool} on {path}: {message}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        message: String,
    },
}

fn run(tool: &'static str, path: &Path, args: &[&str]) -> Result<String, OfflineError> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| OfflineError::Tool {
            tool,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if message.contains("lock") {
            message.push_str(" (is the VM running? use --qmp for running VMs)");
        }
        return Err(OfflineError::Tool {
            tool,
            path: path.to_owned(),
            message,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Reads an image's size and bitmaps with `qemu-img info`.
pub fn inspect(name: &str, path: &Path) -> Result<LiveDisk, OfflineError> {
    let text = run(
        "qemu-img",
        path,
        &["info", "--output=json", "-f", "qcow2", &path_str(path)],
    )?;
    parse_info(name, path, &text)
}

/// Reads an image's size and bitmaps from the output of `qemu-img info --output=json`.
pub fn parse_info(name: &str, path: &Path, text: &str) -> Result<LiveDisk, OfflineError> {
    let v: Value = serde_json::from_str(text).map_err(|e| OfflineError::Tool {
        tool: "qemu-img",
        path: path.to_owned(),
        message: format!("unreadable info: {e}"),
    })?;
    let bitmaps = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let flags: Vec<&str> = b["flags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            BitmapInfo {
                name: b["name"].as_str().unwrap_or_default().to_owned(),
                recording: flags.contains(&"auto"),
                inconsistent: flags.contains(&"in-use"),
                persistent: true,
            }
        })
        .collect();
    Ok(LiveDisk {
        name: name.to_owned(),
        node: String::new(),
        drive: String::new(),
        qdev: String::new(),
        size: v["virtual-size"].as_u64().unwrap_or(0),
        allocated: v["actual-size"].as_u64().unwrap_or(0),
        format: "qcow2".into(),
        file: path_str(path),
        bitmaps,
    })
}

/// Applies a plan to the image: drops inconsistent bitmaps, adds the new one, disables the old
/// ones and merges them into the one that will be read.
pub fn capture(path: &Path, cap: &mut DiskCapture) -> Result<(), OfflineError> {
    let bad: Vec<String> = cap
        .disk
        .bitmaps
        .iter()
        .filter(|b| b.inconsistent && b.name.starts_with(crate::live::PREFIX))
        .map(|b| b.name.clone())
        .collect();
    for b in &bad {
        let p = path_str(path);
        run(
            "qemu-img",
            path,
            &["bitmap", "--remove", "-f", "qcow2", &p, b],
        )?;
    }
    cap.old_bitmaps.retain(|b| !bad.contains(b));
    let p = path_str(path);
    run(
        "qemu-img",
        path,
        &["bitmap", "--add", "-f", "qcow2", &p, &cap.new_bitmap],
    )?;
    for b in cap
        .disk
        .bitmaps
        .iter()
        .filter(|b| cap.old_bitmaps.contains(&b.name) && b.recording)
    {
        run(
            "qemu-img",
            path,
            &["bitmap", "--disable", "-f", "qcow2", &p, &b.name],
        )?;
    }
    if let Some(target) = cap.read_bitmap.clone() {
        for other in cap.old_bitmaps.iter().filter(|b| **b != target) {
            run(
                "qemu-img",
                path,
                &["bitmap", "--merge", other, "-f", "qcow2", &p, &target],
            )?;
        }
    }
    Ok(())
}

/// Settles bitmaps after the cycle: merged into the new one unless the point was committed,
/// then removed.
pub fn finish(path: &Path, cap: &DiskCapture, committed: bool) -> Result<(), OfflineError> {
    let p = path_str(path);
    for b in &cap.old_bitmaps {
        if !committed {
            run(
                "qemu-img",
                path,
                &["bitmap", "--merge", b, "-f", "qcow2", &p, &cap.new_bitmap],
            )?;
        }
        run(
            "qemu-img",
            path,
            &["bitmap", "--remove", "-f", "qcow2", &p, b],
        )?;
    }
    Ok(())
}

/// A read-only `qemu-nbd` serving one image, killed on drop.
pub struct NbdServer {
    child: Child,
    pub socket: PathBuf,
}

impl NbdServer {
    pub fn start(
        path: &Path,
        socket: &Path,
        export: &str,
        bitmap: Option<&str>,
    ) -> Result<NbdServer, OfflineError> {
        Self::spawn(path, socket, export, bitmap.as_slice(), false, "qcow2")
    }

    /// A read-only server of an image in `format` (`qcow2`, `raw`), with `bitmap` exported.
    pub fn start_format(
        path: &Path,
        socket: &Path,
        export: &str,
        bitmap: Option<&str>,
        format: &str,
    ) -> Result<NbdServer, OfflineError> {
        Self::spawn(path, socket, export, bitmap.as_slice(), false, format)
    }

    /// A writable server (for rollback) that also exports `bitmaps`; enabled persistent
    /// bitmaps record its writes.
    pub fn start_writable(
        path: &Path,
        socket: &Path,
        export: &str,
        bitmaps: &[&str],
    ) -> Result<NbdServer, OfflineError> {
        Self::spawn(path, socket, export, bitmaps, true, "qcow2")
    }

    fn spawn(
        path: &Path,
        socket: &Path,
        export: &str,
        bitmaps: &[&str],
        writable: bool,
        format: &str,
    ) -> Result<NbdServer, OfflineError> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("qemu-nbd");
        if !writable {
            cmd.arg("--read-only");
        }
        cmd.args(["--persistent", "--shared=4"])
            .arg(format!("--format={format}"))
            .arg(format!("--export-name={export}"))
            .arg(format!("--socket={}", socket.display()));
        for b in bitmaps {
            cmd.arg(format!("--bitmap={b}"));
        }
        let mut child = cmd
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| OfflineError::Tool {
                tool: "qemu-nbd",
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        // The socket must appear within 15 s; the image may then take up to OPEN_LIMIT to open.
        let deadline = Instant::now() + Duration::from_secs(15);
        let exited = |child: &mut Child, status: std::process::ExitStatus| {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            OfflineError::Tool {
                tool: "qemu-nbd",
                path: path.to_owned(),
                message: format!("exited with {status}: {}", err.trim()),
            }
        };
        // qemu-nbd listens before it opens the image, and greets a connection only once the
        // image is open: it is ready when a connection gets the greeting. A connection that
        // is dropped instead means it failed (e.g. on the lock a running QEMU holds).
        loop {
            if let Ok(mut probe) = std::os::unix::net::UnixStream::connect(socket) {
                // Opening may take long: an image left dirty by a crash is repaired first.
                let mut magic = [0u8; 8];
                let greeting = probe
                    .set_read_timeout(Some(OPEN_LIMIT))
                    .and_then(|()| std::io::Read::read_exact(&mut probe, &mut magic));
                if greeting.is_ok() && &magic == b"NBDMAGIC" {
                    break;
                }
                let timed_out = greeting.as_ref().is_err_and(|e| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                });
                // Not greeted: qemu-nbd is exiting (it says why), or hangs (killed below).
                let gone = Instant::now() + Duration::from_secs(1);
                while !timed_out && Instant::now() < gone {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(exited(&mut child, status));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(OfflineError::Tool {
                    tool: "qemu-nbd",
                    path: path.to_owned(),
                    message: if timed_out {
                        format!("did not open the image within {} s", OPEN_LIMIT.as_secs())
                    } else {
                        "closed a connection without greeting it".into()
                    },
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(exited(&mut child, status));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(OfflineError::Tool {
                    tool: "qemu-nbd",
                    path: path.to_owned(),
                    message: "did not start within 15 s".into(),
                });
            }
            // qemu-nbd needs about 10 ms to start: a coarser poll would add half of that.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(NbdServer {
            child,
            socket: socket.to_owned(),
        })
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        // SIGTERM first: qemu-nbd then closes the image cleanly, storing its persistent bitmaps.
        // Killed outright, a writable export leaves them flagged in-use (inconsistent), and the
        // next cycle would have to read the whole disk.
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
