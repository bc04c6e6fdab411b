//! DR drills: prove that a point restores and boots, and record how long that took.
//!
//! A drill checks every block of the point against its hash and each disk's root (reading the
//! store, writing nothing), then, with `boot`, serves the point over NBD on a private socket,
//! puts a throw-away qcow2 overlay on each disk and boots the VM's captured configuration in an
//! isolated QEMU (no network devices), watching the serial console for a marker. The overlay,
//! the socket and QEMU are removed whatever happens (success, timeout, cancel, error).
//!
//! Times, from the drill's start: `verified_seconds` (data proven intact) and `rto_seconds`
//! (boot marker seen); `boot_seconds` is QEMU's start to the marker. `point_age_seconds` is the
//! RPO at that moment: how old the newest data was when the drill began.

use crate::catalog::{self, now_us, rfc3339};
use crate::error::StoreError;
use crate::nbd_server::{self, Exports};
use crate::packs::PackReader;
use crate::points::{self, PointDisk, PointInfo, PointSelector};
use crate::restore::for_each_block;
use crate::store::PACKS_DIR;
use rayon::prelude::*;
use rewind_proto::format::DiskGeometry;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::{chunk, Leaf};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Blocks decoded per parallel batch while verifying.
const BATCH_BLOCKS: usize = 256;
/// Most damaged blocks listed in one report (the count is always exact).
const MAX_LISTED: usize = 100;
/// Serial console bytes kept for the report.
const SERIAL_TAIL: usize = 2048;

/// What a drill does.
/// Which accelerator a boot drill's QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when /dev/kvm opens, else TCG; TCG again when QEMU fails to start under KVM.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone)]
pub struct DrillOptions {
    /// The point (default: the VM's newest).
    pub point: Option<i64>,
    /// Boot the point in QEMU after verifying it.
    pub boot: bool,
    pub boot_timeout: Duration,
    /// Text the console must show; without it, any console output counts as booted.
    pub expect_serial: Option<regex::Regex>,
    /// Set from a signal handler: the drill stops, cleans up and fails.
    pub cancel: Arc<AtomicBool>,
    /// Memory for QEMU at most, in MiB (a drill should not starve the backup host).
    pub max_memory_mib: u64,
    /// The accelerator (nested KVM can be present and far slower than TCG: choose `tcg`).
    pub accel: Accel,
    /// Called with (bytes verified, bytes to verify) as verification goes.
    pub progress: Arc<dyn Fn(u64, u64) + Send + Sync>,
}

/// One damaged block of a point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Damage {
    pub disk: String,
    /// None: the disk as a whole (its blocks do not give its root).
    pub block: Option<u64>,
    pub hash: String,
    pub problem: String,
}

/// A drill's record, as `drill --json` and `drills --json` print it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    pub id: i64,
    pub vm: String,
    pub point: Option<i64>,
    pub point_created: Option<String>,
    pub started: String,
    pub point_age_seconds: Option<f64>,
    pub verified_seconds: Option<f64>,
    pub blocks_verified: u64,
    pub bytes_verified: u64,
    pub damaged_blocks: u64,
    pub damaged: Vec<Damage>,
    pub booted: Option<bool>,
    pub boot_seconds: Option<f64>,
    pub rto_seconds: Option<f64>,
    /// "kvm" or "tcg" when booted.
    pub accel: Option<String>,
    pub serial_tail: Option<String>,
    /// "passed" or "failed".
    pub result: String,
    /// Why it failed.
    pub reason: Option<String>,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.result == "passed"
    }
}

/// Runs a drill of `vm` and records it in the catalog (also when it fails). Errors are only
/// for drills that could not start (unknown VM or point, unreadable catalog).
pub fn run(data: &Path, vm: &str, opts: &DrillOptions) -> Result<DrillReport, StoreError> {
    let started = Instant::now();
    let started_us = now_us();
    // gc must not move chunks while the drill reads them through one catalog snapshot.
    let _gc = crate::gc::read_lock(data)?;
    let conn = catalog::open_ro(data)?;
    let which = opts.point.map_or(PointSelector::Newest, PointSelector::Id);
    let point = points::resolve(&conn, vm, &which)?;
    let created_us = catalog::parse_rfc3339(&point.created).unwrap_or(started_us);
    let mut report = DrillReport {
        id: 0,
        vm: vm.to_owned(),
        point: Some(point.id),
        point_created: Some(point.created.clone()),
        started: rfc3339(started_us),
        point_age_seconds: Some((started_us - created_us).max(0) as f64 / 1e6),
        verified_seconds: None,
        blocks_verified: 0,
        bytes_verified: 0,
        damaged_blocks: 0,
        damaged: Vec::new(),
        booted: None,
        boot_seconds: None,
        rto_seconds: None,
        accel: None,
        serial_tail: None,
        result: "failed".into(),
        reason: None,
    };
    let outcome = drill(data, &conn, &point, opts, started, &mut report);
    drop(conn);
    match outcome {
        Ok(()) => report.result = "passed".into(),
        Err(reason) => report.reason = Some(reason),
    }
    report.id = record(data, &report)?;
    Ok(report)
}

/// The drill's steps; Err is the reason it failed.
fn drill(
    data: &Path,
    conn: &Connection,
    point: &PointInfo,
    opts: &DrillOptions,
    started: Instant,
    report: &mut DrillReport,
) -> Result<(), String> {
    let total: u64 = point.disks.iter().map(|d| d.size).sum();
    let mut before = 0u64;
    for disk in &point.disks {
        let report_progress = |done: u64| (opts.progress)(before + done, total);
        let v = verify_disk(conn, data, point.id, disk, &opts.cancel, &report_progress)
            .map_err(|e| format!("verifying {}: {e}", disk.name))?;
        before += disk.size;
        rewind_proto::faults::point("drill-after-verify");
        report.blocks_verified += v.blocks;
        report.bytes_verified += v.bytes;
        report.damaged_blocks += v.damaged;
        for d in v.listed {
            if report.damaged.len() < MAX_LISTED {
                report.damaged.push(d);
            }
        }
        if opts.cancel.load(Ordering::Relaxed) {
            return Err("cancelled (signal) while verifying".into());
        }
    }
    if !report.damaged.is_empty() {
        let first: Vec<String> = report
            .damaged
            .iter()
            .take(5)
            .map(|d| match d.block {
                Some(b) => format!("{} block {} ({}): {}", d.disk, b, d.hash, d.problem),
                None => format!("{}: {}", d.disk, d.problem),
            })
            .collect();
        return Err(format!(
            "{} damaged block(s): {}",
            report.damaged_blocks,
            first.join("; ")
        ));
    }
    report.verified_seconds = Some(started.elapsed().as_secs_f64());
    if !opts.boot {
        // Without a boot, recovery is ready once the data is proven.
        report.rto_seconds = report.verified_seconds;
        return Ok(());
    }
    let boot = match opts.accel {
        Accel::Kvm => boot(data, point, opts, "kvm")?,
        Accel::Tcg => boot(data, point, opts, "tcg")?,
        Accel::Auto if !kvm_usable() => boot(data, point, opts, "tcg")?,
        Accel::Auto => {
            let b = boot(data, point, opts, "kvm")?;
            if b.started {
                b
            } else {
                tracing::warn!(
                    error = b.result.as_ref().err().map(String::as_str).unwrap_or(""),
                    "QEMU did not start under KVM: drilling under TCG"
                );
                boot(data, point, opts, "tcg")?
            }
        }
    };
    report.accel = Some(boot.accel.to_owned());
    report.serial_tail = Some(boot.serial_tail);
    report.booted = Some(boot.result.is_ok());
    boot.result?;
    report.boot_seconds = Some(boot.boot_seconds);
    report.rto_seconds = Some(started.elapsed().as_secs_f64());
    Ok(())
}

struct Verified {
    blocks: u64,
    bytes: u64,
    damaged: u64,
    listed: Vec<Damage>,
}

/// Reads and checks every block of one disk of a point: each chunk decompresses to its block's
/// length and hash, and the leaves give the disk's root.
fn verify_disk(
    conn: &Connection,
    data: &Path,
    point: i64,
    disk: &PointDisk,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64),
) -> Result<Verified, StoreError> {
    let geometry =
        DiskGeometry::new(disk.size, disk.block_size).map_err(|source| StoreError::Geometry {
            disk: disk.name.clone(),
            source,
        })?;
    let mut reader = PackReader::sequential(&data.join(PACKS_DIR));
    let mut builder = Builder::new(Shape::of(&geometry));
    let mut next = 0u64;
    let mut out = Verified {
        blocks: 0,
        bytes: 0,
        damaged: 0,
        listed: Vec::new(),
    };
    let mut batch: Vec<(u64, Leaf, Result<Vec<u8>, String>)> = Vec::with_capacity(BATCH_BLOCKS);
    let check = |batch: Vec<(u64, Leaf, Result<Vec<u8>, String>)>, out: &mut Verified| {
        let problems: Vec<(u64, Leaf, String)> = batch
            .into_par_iter()
            .filter_map(|(idx, leaf, frame)| {
                let len = geometry.block_len(idx).unwrap_or(0);
                let problem = match frame {
                    Err(e) => Some(e),
                    Ok(f) => chunk::open(leaf, &f, len).err().map(|e| e.to_string()),
                };
                problem.map(|p| (idx, leaf, p))
            })
            .collect();
        for (idx, leaf, problem) in problems {
            out.damaged += 1;
            if out.listed.len() < MAX_LISTED {
                out.listed.push(Damage {
                    disk: disk.name.clone(),
                    block: Some(idx),
                    hash: leaf.to_hex(),
                    problem,
                });
            }
        }
    };
    for_each_block(conn, disk.disk_id, point, |idx, leaf, loc| {
        let Some(len) = geometry.block_len(idx) else {
            return Ok(());
        };
        builder.push_zeros(idx - next);
        builder.push(leaf);
        next = idx + 1;
        let frame = match loc {
            None => Err("its chunk is missing from the store".to_owned()),
            Some((pack, offset, clen)) => reader
                .read(pack, offset, clen, &leaf)
                .map_err(|e| e.to_string()),
        };
        batch.push((idx, leaf, frame));
        out.blocks += 1;
        out.bytes += len as u64;
        if batch.len() == BATCH_BLOCKS {
            check(std::mem::take(&mut batch), &mut out);
            progress(geometry.offset(idx) + len as u64);
            if cancel.load(Ordering::Relaxed) {
                return Err(StoreError::Cancelled);
            }
        }
        Ok(())
    })?;
    check(batch, &mut out);
    progress(geometry.size);
    let root = tree::root(&geometry, builder.finish());
    if root != disk.root_leaf {
        out.damaged += 1;
        out.listed.push(Damage {
            disk: disk.name.clone(),
            block: None,
            hash: root.to_hex(),
            problem: format!(
                "the catalog's leaves give root {root}, the point was committed with {}",
                disk.root_leaf
            ),
        });
    }
    Ok(out)
}

struct Boot {
    accel: &'static str,
    /// QEMU ran: it did not exit before showing anything on the console.
    started: bool,
    serial_tail: String,
    boot_seconds: f64,
    result: Result<(), String>,
}

/// Kills and reaps QEMU when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether KVM can be used (the device exists and opens read-write).
fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Collects a pipe's bytes on a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut v) = b.lock() {
                v.extend_from_slice(&chunk[..n]);
            }
        }
    });
    buf
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(SERIAL_TAIL);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Boots the point's disks (through overlays on our NBD export) until the console shows the
/// marker, the timeout passes, QEMU exits or the drill is cancelled.
/// Prefix of a drill's temporary folder: `rewind-drill.PID.` then random characters.
const TEMP_PREFIX: &str = "rewind-drill.";

/// Removes the temporary folders of drills that were killed (their process is gone), so a
/// SIGKILLed drill leaves nothing behind once the next one runs.
fn remove_stale_folders() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn boot(
    data: &Path,
    point: &PointInfo,
    opts: &DrillOptions,
    accel: &'static str,
) -> Result<Boot, String> {
    remove_stale_folders();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}.", std::process::id()))
        .tempdir()
        .map_err(|e| format!("creating the drill's folder: {e}"))?;
    let sock = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock)
        .map_err(|e| format!("binding {}: {e}", sock.display()))?;
    let exports = Exports::of_point(data, point);
    std::thread::spawn(move || nbd_server::serve_unix(listener, exports));

    let config = point.config.clone().unwrap_or(serde_json::Value::Null);
    let mem_mib = config["memory_bytes"]
        .as_u64()
        .map_or(256, |b| (b >> 20).max(64))
        .min(opts.max_memory_mib);
    let cpus = config["cpus"].as_u64().unwrap_or(1).max(1);
    // QEMU dies with the drill even when the drill is SIGKILLed (setpriv sets the parent-death
    // signal, then runs QEMU); without setpriv, only the drill's own cleanup stops it.
    let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"]);
        c
    } else {
        Command::new("qemu-system-x86_64")
    };
    cmd.args(["-name", &format!("rewind-drill-{}", point.vm)])
        .args(["-machine", "pc", "-accel", accel])
        .args(["-m", &mem_mib.to_string(), "-smp", &cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        // Isolated: no network device at all, console on stdout.
        .args(["-nic", "none", "-serial", "stdio", "-no-reboot"]);
    for (i, d) in point.disks.iter().enumerate() {
        let overlay = dir.path().join(format!("{}.qcow2", d.name));
        let backing = format!("nbd+unix:///{}?socket={}", d.name, sock.display());
        let out = Command::new("qemu-img")
            .args([
                "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", &backing,
            ])
            .arg(&overlay)
            .arg(d.size.to_string())
            .output()
            .map_err(|e| format!("running qemu-img: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "creating the overlay of {}: {}",
                d.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        cmd.arg("-drive").arg(format!(
            "file={},format=qcow2,if=none,id=drive-{}",
            overlay.display(),
            d.name
        ));
        cmd.arg("-device").arg(format!(
            "virtio-blk-pci,drive=drive-{},id={},bootindex={i}",
            d.name, d.name
        ));
    }
    let boot_started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
    let serial = child.stdout.take().map(collect).unwrap_or_default();
    let stderr = child.stderr.take().map(collect).unwrap_or_default();
    let mut qemu = Qemu(child);
    rewind_proto::faults::point("drill-mid-boot");
    let seen = |buf: &Arc<Mutex<Vec<u8>>>| buf.lock().map(|b| b.clone()).unwrap_or_default();
    let mut exited_silent = false;
    let result = loop {
        let console = seen(&serial);
        let hit = match &opts.expect_serial {
            Some(re) => re.is_match(&String::from_utf8_lossy(&console)),
            None => !console.is_empty(),
        };
        if hit {
            break Ok(());
        }
        if let Ok(Some(status)) = qemu.0.try_wait() {
            exited_silent = console.is_empty();
            break Err(format!(
                "QEMU exited ({status}) before the boot marker: {}",
                tail(&seen(&stderr)).trim()
            ));
        }
        if opts.cancel.load(Ordering::Relaxed) {
            break Err("cancelled (signal) while booting".into());
        }
        if boot_started.elapsed() >= opts.boot_timeout {
            let what = match &opts.expect_serial {
                Some(re) => format!("{:?} did not appear", re.as_str()),
                None => "no console output".to_owned(),
            };
            break Err(format!(
                "boot timed out after {} s: {what}; the console showed last: {:?}",
                opts.boot_timeout.as_secs(),
                tail(&console)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let boot_seconds = boot_started.elapsed().as_secs_f64();
    drop(qemu);
    Ok(Boot {
        accel,
        started: !exited_silent,
        serial_tail: tail(&seen(&serial)),
        boot_seconds,
        result,
    })
}

/// Stores a drill's record; returns its id.
fn record(data: &Path, r: &DrillReport) -> Result<i64, StoreError> {
    let conn = catalog::open_rw(data)?;
    let detail = serde_json::to_string(r).unwrap_or_default();
    conn.execute(
        "INSERT INTO drills(vm, point, started_us, point_age_s, verified_s, boot_s, rto_s,
                            result, reason, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            r.vm,
            r.point,
            catalog::parse_rfc3339(&r.started).unwrap_or_else(|_| now_us()),
            r.point_age_seconds,
            r.verified_seconds,
            r.boot_seconds,
            r.rto_seconds,
            r.result,
            r.reason,
            detail
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Recorded drills, oldest first (of one VM, or all).
pub fn history(conn: &Connection, vm: Option<&str>) -> Result<Vec<DrillReport>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT id, detail FROM drills WHERE ?1 IS NULL OR vm = ?1 ORDER BY id")?;
    let rows = stmt
        .query_map(params![vm], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (id, detail) in rows {
        if let Ok(mut r) = serde_json::from_str::<DrillReport>(&detail) {
            r.id = id;
            out.push(r);
        }
    }
    Ok(out)
}
