//! Real QEMU VMs for live tests (TCG, no guest OS): disks as qcow2 files, a monitor socket for
//! the agent and one for the test, guest writes through `qemu-io` on the device's drive (they
//! pass through the dirty bitmap and the fleecing filter exactly as a guest's writes do), and a
//! model of every write to build the expected image.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A synchronous QMP connection.
pub struct Monitor {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Monitor {
    pub fn connect(path: &Path) -> Monitor {
        let deadline = Instant::now() + Duration::from_secs(20);
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("QMP {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // A hung QEMU fails the test instead of hanging it.
        sock.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let mut m = Monitor {
            reader: BufReader::new(sock.try_clone().expect("clone")),
            writer: sock,
        };
        // The greeting (a late one is skipped by `execute` too).
        m.read();
        m.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        m
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read QMP");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("bad QMP line {line:?}"))
    }

    /// Runs a command; `Err` carries QEMU's error description.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").expect("write QMP");
        loop {
            let v = self.read();
            // Events, and a greeting read late (QEMU under load), are not the reply.
            if v.get("event").is_some() || v.get("QMP").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(match v["error"]["desc"].as_str() {
                Some(desc) => desc.to_owned(),
                None => format!("unexpected QMP reply {v}"),
            });
        }
    }

    /// A guest write: `qemu-io DRIVE "write -P PATTERN OFFSET LEN"`.
    pub fn write(&mut self, drive: &str, pattern: u8, offset: u64, len: u64) {
        let line = format!("qemu-io {drive} \"write -P {pattern} {offset} {len}\"");
        let out = self
            .execute("human-monitor-command", json!({"command-line": line}))
            .expect("qemu-io");
        assert!(
            !out.as_str().unwrap_or("").contains("error"),
            "qemu-io: {out}"
        );
    }

    /// Names of block nodes, exports and jobs Rewind may leave behind (`rewind-*`).
    pub fn leftovers(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (cmd, key) in [
            ("query-named-block-nodes", "node-name"),
            ("query-block-exports", "id"),
            ("query-block-jobs", "device"),
        ] {
            let v = self.execute(cmd, json!({})).expect(cmd);
            for item in v.as_array().into_iter().flatten() {
                if let Some(n) = item[key].as_str().filter(|n| n.starts_with("rewind-")) {
                    out.push(format!("{cmd}: {n}"));
                }
            }
        }
        out
    }

    /// Names of the Rewind bitmaps on a drive.
    pub fn bitmaps(&mut self, drive: &str) -> Vec<String> {
        let v = self.execute("query-block", json!({})).expect("query-block");
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["device"] == drive)
            .flat_map(|d| {
                d["inserted"]["dirty-bitmaps"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|b| b["name"].as_str().map(str::to_owned))
            .filter(|n| n.starts_with("rewind-"))
            .collect()
    }
}

/// Whether a drill's QEMU for `vm` runs (it is named `rewind-drill-VM`).
pub fn drill_running(vm: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", &format!("rewind-drill-{vm}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One disk of a test VM: device id `vdX`, drive id `driveX`, a qcow2 file.
#[derive(Debug, Clone)]
pub struct VmDisk {
    pub id: String,
    pub drive: String,
    pub path: PathBuf,
    pub size: u64,
}

/// A running QEMU, killed (SIGKILL) on drop.
pub struct Vm {
    pub dir: PathBuf,
    pub disks: Vec<VmDisk>,
    pid: u32,
    pub monitor: Monitor,
}

impl Vm {
    /// Creates the disks (qcow2, sizes in bytes) and boots nothing: `-S`, no guest needed.
    pub fn create(dir: &Path, sizes: &[u64]) -> Vm {
        let disks: Vec<VmDisk> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let letter = (b'a' + i as u8) as char;
                let path = dir.join(format!("vd{letter}.qcow2"));
                let out = Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(size.to_string())
                    .output()
                    .expect("qemu-img");
                assert!(out.status.success());
                VmDisk {
                    id: format!("vd{letter}"),
                    drive: format!("drive{i}"),
                    path,
                    size,
                }
            })
            .collect();
        Vm::start(dir, disks)
    }

    /// Starts QEMU on existing disks.
    pub fn start(dir: &Path, disks: Vec<VmDisk>) -> Vm {
        let pidfile = dir.join("qemu.pid");
        let _ = std::fs::remove_file(&pidfile);
        for s in ["agent.qmp", "test.qmp", "aux.qmp"] {
            let _ = std::fs::remove_file(dir.join(s));
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "pc",
            "-S",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-daemonize",
        ])
        .args(["-name", "testvm"])
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("agent.qmp").display()
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("test.qmp").display()
        ))
        // A QMP socket serves one client at a time: a third one for a concurrent writer.
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("aux.qmp").display()
        ));
        // A guest agent channel (nothing answers on it: there is no guest OS).
        let _ = std::fs::remove_file(dir.join("qga.sock"));
        cmd.arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                dir.join("qga.sock").display()
            ))
            .args([
                "-device",
                "virtio-serial",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]);
        for d in &disks {
            cmd.arg("-drive").arg(format!(
                "file={},format=qcow2,if=none,id={}",
                d.path.display(),
                d.drive
            ));
            cmd.arg("-device")
                .arg(format!("virtio-blk-pci,drive={},id={}", d.drive, d.id));
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("qemu-system-x86_64");
        assert!(
            out.status.success(),
            "QEMU failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .expect("pidfile")
            .trim()
            .parse()
            .expect("pid");
        let monitor = Monitor::connect(&dir.join("test.qmp"));
        Vm {
            dir: dir.to_owned(),
            disks,
            pid,
            monitor,
        }
    }

    pub fn agent_qmp(&self) -> PathBuf {
        self.dir.join("agent.qmp")
    }

    /// SIGKILL, as a host crash would (persistent bitmaps come back inconsistent).
    pub fn kill9(self) -> Vec<VmDisk> {
        let disks = self.disks.clone();
        drop(self);
        disks
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Every write made to one disk, replayable into an expected raw image.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub size: u64,
    pub writes: Vec<(u64, u64, u8)>,
}

impl Model {
    pub fn new(size: u64) -> Model {
        Model {
            size,
            writes: Vec::new(),
        }
    }

    pub fn write(&mut self, offset: u64, len: u64, pattern: u8) {
        self.writes.push((offset, len, pattern));
    }

    /// Writes the expected image and returns its digest.
    pub fn digest(&self, scratch: &Path) -> crate::disk::Digest {
        crate::disk::create(scratch, self.size);
        for &(off, len, p) in &self.writes {
            crate::disk::write_at(scratch, off, &vec![p; len as usize]);
        }
        let d = crate::disk::digest(scratch);
        std::fs::remove_file(scratch).expect("remove scratch");
        d
    }
}
