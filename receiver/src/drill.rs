//! DR drills: prove that a point restores and boots, and record how long that took.
//!
//! A drill checks every block of the point against its hash and each disk's root (reading the
//! store, writing nothing), then, with `boot`, serves the point over NBD on a private socket,
//! puts a throw-away qcow2 overlay on each disk and boots the VM's captured configuration in an
//! isolated QEMU (no network devices), watching the serial console for a marker. With
//! application checks, QEMU also gets a guest-agent channel (a `virtserialport` on a socket in
//! the drill's private folder), and after the marker each check's command runs in the guest
//! through qemu-ga ([`crate::guest_agent`]), retried until it passes or its timeout passes. The
//! overlay, the sockets and QEMU are removed whatever happens (success, timeout, cancel, error).
//!
//! Times, from the drill's start: `verified_seconds` (data proven intact), `healthy_seconds`
//! (every check passed) and `rto_seconds` (the application healthy when there are checks, else
//! the boot marker seen); `boot_seconds` is QEMU's start to the marker. `point_age_seconds` is
//! the RPO at that moment: how old the newest data was when the drill began.

use crate::catalog::leaves::{self, Columns};
use crate::catalog::{self, drills, now_us, rfc3339, PointId};
use crate::chunks::{self, ReadOrder};
use crate::error::StoreError;
use crate::guest_agent::{AgentError, Exited, GuestAgent};
use crate::nbd_server::{self, Exports};
use crate::points::{self, PointDisk, PointInfo, PointSelector};
use rayon::prelude::*;
use rewind_proto::format::DiskGeometry;
use rewind_proto::report::chain;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::{chunk, Leaf};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Blocks decoded per parallel batch while verifying.
const BATCH_BLOCKS: usize = 256;
/// Most damaged blocks listed in one report (the count is always exact).
const MAX_LISTED: usize = 100;
/// Serial console bytes kept for the report.
const SERIAL_TAIL: usize = 2048;
/// Console bytes held while booting: the guest decides how much it prints, and the marker is
/// looked for every 50 ms, long before this much scrolls past.
const CONSOLE_KEPT: usize = 1 << 20;
/// Bytes of the end of each of a check's stdout and stderr kept in the report.
const OUTPUT_TAIL: usize = 1024;
/// Bytes of the end of each output quoted in a failed check's reason.
const REASON_TAIL: usize = 200;
/// Between the starts of two attempts of a check that has not passed yet.
const CHECK_RETRY: Duration = Duration::from_secs(1);
/// Between two questions whether a check's command has exited.
const EXEC_POLL: Duration = Duration::from_millis(200);
/// The guest-agent channel's socket in the drill's private folder.
const QGA_SOCKET: &str = "qga.sock";

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

/// What a drill does.
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
    /// Application checks run in the booted guest, in order (they need `boot`).
    pub checks: Vec<Check>,
    /// Called with (bytes verified, bytes to verify) as verification goes.
    pub progress: Arc<dyn Fn(u64, u64) + Send + Sync>,
}

/// An application check as written in a checks file (`[[check]]`) or a drill schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Names the check in reports (default: the command).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The program (a path in the guest, or a name on qemu-ga's PATH) and its arguments.
    pub command: Vec<String>,
    /// The exit code that passes.
    #[serde(default)]
    pub expect_exit: i64,
    /// A regular expression that must match somewhere in stdout (multi-line mode: `^` and `$`
    /// match at each line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_output: Option<String>,
    /// Seconds to keep retrying until it passes (default: the drill's boot timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// A checks file: `[[check]]` tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksFile {
    #[serde(default)]
    pub check: Vec<CheckSpec>,
}

/// Why checks could not be read. The underlying error is part of the message, not a source, so
/// `{:#}` does not print it twice.
#[derive(Debug, Error)]
pub enum CheckError {
    /// A check with no program to run.
    #[error("check {name:?}: the command is empty")]
    EmptyCommand { name: String },
    /// `expect_output` is not a regular expression.
    #[error("check {name:?}: expect_output: {error}")]
    BadRegex { name: String, error: regex::Error },
    /// `timeout = 0` leaves no time to run.
    #[error("check {name:?}: timeout must be positive (seconds)")]
    ZeroTimeout { name: String },
    /// The checks file could not be read.
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The checks file is not TOML of `[[check]]` tables.
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    /// The checks file holds no check.
    #[error("{path}: no [[check]] table")]
    NoChecks { path: PathBuf },
}

/// A check ready to run: its command has a program and its expected output is compiled.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    /// The program, then its arguments.
    program: String,
    args: Vec<String>,
    pub expect_exit: i64,
    pub expect_output: Option<regex::Regex>,
    /// None: the drill's boot timeout.
    pub timeout: Option<Duration>,
}

impl Check {
    /// Checks a spec and compiles it.
    pub fn parse(spec: &CheckSpec) -> Result<Check, CheckError> {
        let name = if spec.name.is_empty() {
            spec.command.join(" ")
        } else {
            spec.name.clone()
        };
        let Some((program, args)) = spec
            .command
            .split_first()
            .filter(|(p, _)| !p.trim().is_empty())
        else {
            return Err(CheckError::EmptyCommand { name });
        };
        let expect_output = match &spec.expect_output {
            None => None,
            Some(re) => Some(
                regex::RegexBuilder::new(re)
                    .multi_line(true)
                    .build()
                    .map_err(|error| CheckError::BadRegex {
                        name: name.clone(),
                        error,
                    })?,
            ),
        };
        if spec.timeout == Some(0) {
            return Err(CheckError::ZeroTimeout { name });
        }
        Ok(Check {
            program: program.clone(),
            args: args.to_vec(),
            expect_exit: spec.expect_exit,
            expect_output,
            timeout: spec.timeout.map(Duration::from_secs),
            name,
        })
    }

    /// `/bin/sh -c COMMAND`, passing on exit 0, named for the command.
    pub fn shell(command: &str) -> Result<Check, CheckError> {
        if command.trim().is_empty() {
            return Err(CheckError::EmptyCommand {
                name: command.to_owned(),
            });
        }
        Check::parse(&CheckSpec {
            name: command.to_owned(),
            command: vec!["/bin/sh".into(), "-c".into(), command.to_owned()],
            expect_exit: 0,
            expect_output: None,
            timeout: None,
        })
    }

    /// The program and its arguments.
    pub fn command(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }

    /// Why a run of the check's command does not pass it, or None when it passes.
    fn judge(&self, out: &Exited) -> Option<String> {
        let exit_ok = out.exit_code == Some(self.expect_exit);
        let output_ok = self
            .expect_output
            .as_ref()
            .is_none_or(|re| re.is_match(&String::from_utf8_lossy(&out.stdout)));
        if exit_ok && output_ok {
            return None;
        }
        let mut problem = format!("expected exit {}", self.expect_exit);
        if let Some(re) = &self.expect_output {
            problem += &format!(" and stdout matching {:?}", re.as_str());
        }
        problem += &match (out.exit_code, out.signal) {
            (Some(code), _) => format!(", got exit {code}"),
            (None, Some(sig)) => format!(", got killed by signal {sig}"),
            (None, None) => ", got no exit code".to_owned(),
        };
        if exit_ok {
            problem += " and stdout not matching";
        }
        for (what, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            let end = tail(bytes, REASON_TAIL);
            let end = end.trim();
            if !end.is_empty() {
                problem += &format!("; {what} ends {end:?}");
            }
        }
        Some(problem)
    }
}

/// Reads a checks file: one or more `[[check]]` tables.
pub fn load_checks(path: &Path) -> Result<Vec<Check>, CheckError> {
    let text = std::fs::read_to_string(path).map_err(|error| CheckError::Read {
        path: path.to_owned(),
        error,
    })?;
    let file: ChecksFile = toml::from_str(&text).map_err(|error| CheckError::Parse {
        path: path.to_owned(),
        error: Box::new(error),
    })?;
    if file.check.is_empty() {
        return Err(CheckError::NoChecks {
            path: path.to_owned(),
        });
    }
    file.check.iter().map(Check::parse).collect()
}

/// What one application check did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckReport {
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    pub passed: bool,
    /// Times the command was tried (0: not run).
    pub attempts: u32,
    /// Of the last run that exited (None: none did, or a signal ended it).
    pub exit_code: Option<i64>,
    /// The end of the last run's stdout (lossy UTF-8).
    pub stdout: String,
    /// The end of the last run's stderr (lossy UTF-8).
    pub stderr: String,
    /// Seconds from the drill's start to the check passing.
    pub passed_seconds: Option<f64>,
    /// Why it did not pass (the last attempt's problem), or "not run".
    pub problem: Option<String>,
}

impl CheckReport {
    fn not_run(check: &Check) -> CheckReport {
        CheckReport {
            name: check.name.clone(),
            command: check.command(),
            problem: Some("not run".into()),
            ..CheckReport::default()
        }
    }
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
    /// The application checks, in order (empty without any).
    #[serde(default)]
    pub checks: Vec<CheckReport>,
    /// Seconds from the drill's start until every check passed.
    #[serde(default)]
    pub healthy_seconds: Option<f64>,
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
        checks: opts.checks.iter().map(CheckReport::not_run).collect(),
        healthy_seconds: None,
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
    if !opts.boot && !opts.checks.is_empty() {
        return Err("application checks need a boot drill".into());
    }
    let total: u64 = point.disks.iter().map(|d| d.size).sum();
    let mut before = 0u64;
    for disk in &point.disks {
        let report_progress = |done: u64| (opts.progress)(before + done, total);
        let v = verify_disk(conn, data, point.id, disk, &opts.cancel, &report_progress)
            .map_err(|e| format!("verifying {}: {}", disk.name, chain(&e)))?;
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
        Accel::Kvm => boot(data, point, opts, started, "kvm")?,
        Accel::Tcg => boot(data, point, opts, started, "tcg")?,
        Accel::Auto if !kvm_usable() => boot(data, point, opts, started, "tcg")?,
        Accel::Auto => {
            let b = boot(data, point, opts, started, "kvm")?;
            if b.started {
                b
            } else {
                tracing::warn!(
                    error = b.result.as_ref().err().map(String::as_str).unwrap_or(""),
                    "QEMU did not start under KVM: drilling under TCG"
                );
                boot(data, point, opts, started, "tcg")?
            }
        }
    };
    report.accel = Some(boot.accel.to_owned());
    report.serial_tail = Some(boot.serial_tail);
    report.booted = Some(boot.result.is_ok());
    if !boot.checks.is_empty() {
        report.checks = boot.checks;
    }
    boot.result?;
    report.boot_seconds = Some(boot.boot_seconds);
    match boot.healthy {
        // Without checks, recovery is ready once the guest boots.
        None => report.rto_seconds = Some(started.elapsed().as_secs_f64()),
        // With them, once the application answers as it should.
        Some(Ok(healthy)) => {
            report.healthy_seconds = Some(healthy);
            report.rto_seconds = Some(healthy);
        }
        Some(Err(reason)) => return Err(reason),
    }
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
    let mut reader = chunks::open(data).reader(ReadOrder::Sequential);
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
    let span = leaves::Span::all_leaves(disk.disk_id, PointId(point));
    leaves::at_point(conn, &span, Columns::Located, |node| {
        let (idx, leaf, loc) = (node.idx, node.hash, node.at);
        let Some(len) = geometry.block_len(idx) else {
            return Ok(ControlFlow::Continue(()));
        };
        builder.push_zeros(idx - next);
        builder.push(leaf);
        next = idx + 1;
        let frame = match loc {
            None => Err("its chunk is missing from the store".to_owned()),
            Some(at) => reader.read(at, &leaf).map_err(|e| chain(&e)),
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
        Ok(ControlFlow::Continue(()))
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
    /// The checks' reports once they ran (empty when they did not).
    checks: Vec<CheckReport>,
    /// None without checks or when the boot failed; else the seconds from the drill's start
    /// until every check passed, or the failed check's reason.
    healthy: Option<Result<f64, String>>,
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
                if v.len() > 2 * CONSOLE_KEPT {
                    let cut = v.len() - CONSOLE_KEPT;
                    v.drain(..cut);
                }
            }
        }
    });
    buf
}

/// The last `n` bytes, as lossy UTF-8.
fn tail(bytes: &[u8], n: usize) -> String {
    let start = bytes.len().saturating_sub(n);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

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

/// Boots the point's disks (through overlays on our NBD export) until the console shows the
/// marker, the timeout passes, QEMU exits or the drill is cancelled; then runs the checks, if
/// any, in the running guest. QEMU is killed and the folder removed before it returns.
fn boot(
    data: &Path,
    point: &PointInfo,
    opts: &DrillOptions,
    started: Instant,
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
    let qga = dir.path().join(QGA_SOCKET);
    if !opts.checks.is_empty() {
        // The guest agent's channel: a serial port on a socket only this drill can reach (its
        // folder is private), not a network.
        let path = qga.display().to_string().replace(',', ",,");
        cmd.arg("-chardev")
            .arg(format!("socket,id=qga0,path={path},server=on,wait=off"))
            .args(["-device", "virtio-serial"])
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]);
    }
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
                tail(&seen(&stderr), SERIAL_TAIL).trim()
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
                tail(&console, SERIAL_TAIL)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let boot_seconds = boot_started.elapsed().as_secs_f64();
    let (checks, healthy) = if result.is_ok() && !opts.checks.is_empty() {
        let (reports, healthy) =
            run_checks(&qga, &opts.checks, opts.boot_timeout, started, &opts.cancel);
        (reports, Some(healthy))
    } else {
        (Vec::new(), None)
    };
    drop(qemu);
    Ok(Boot {
        accel,
        started: !exited_silent,
        serial_tail: tail(&seen(&serial), SERIAL_TAIL),
        boot_seconds,
        result,
        checks,
        healthy,
    })
}

/// Runs `checks` in order through the guest agent on `sock`, each retried until it passes or its
/// timeout (default `default_timeout`) passes, and stops at the first that fails. Returns every
/// check's report (those after a failure stay "not run") and the seconds from `started` until
/// all passed, or the failed check's reason.
fn run_checks(
    sock: &Path,
    checks: &[Check],
    default_timeout: Duration,
    started: Instant,
    cancel: &Arc<AtomicBool>,
) -> (Vec<CheckReport>, Result<f64, String>) {
    let mut reports: Vec<CheckReport> = checks.iter().map(CheckReport::not_run).collect();
    let mut agent = None;
    for (check, report) in checks.iter().zip(reports.iter_mut()) {
        let began = Instant::now();
        let timeout = check.timeout.unwrap_or(default_timeout);
        *report = run_check(&mut agent, sock, check, timeout, started, cancel);
        if !report.passed {
            let reason = format!(
                "check {:?} failed ({} attempt(s) in {:.0} s): {}",
                report.name,
                report.attempts,
                began.elapsed().as_secs_f64(),
                report.problem.as_deref().unwrap_or("unknown")
            );
            return (reports, Err(reason));
        }
    }
    (reports, Ok(started.elapsed().as_secs_f64()))
}

/// Tries one check about once a second until it passes, `timeout` passes, the guest breaks the
/// protocol or the drill is cancelled. The agent connection is made on first use and kept.
fn run_check(
    agent: &mut Option<GuestAgent>,
    sock: &Path,
    check: &Check,
    timeout: Duration,
    started: Instant,
    cancel: &Arc<AtomicBool>,
) -> CheckReport {
    // u32::MAX seconds (136 years) is as good as no limit, and the clock can add it.
    let deadline = Instant::now() + timeout.min(Duration::from_secs(u32::MAX.into()));
    let mut report = CheckReport::not_run(check);
    loop {
        let attempt_began = Instant::now();
        report.attempts += 1;
        match attempt(agent, sock, check, deadline, cancel) {
            Ok(out) => {
                report.exit_code = out.exit_code;
                report.stdout = tail(&out.stdout, OUTPUT_TAIL);
                report.stderr = tail(&out.stderr, OUTPUT_TAIL);
                report.problem = check.judge(&out);
                if report.problem.is_none() {
                    report.passed = true;
                    report.passed_seconds = Some(started.elapsed().as_secs_f64());
                    return report;
                }
            }
            Err(e) => {
                report.problem = Some(chain(&e));
                if e.is_final() {
                    return report;
                }
            }
        }
        let next = (attempt_began + CHECK_RETRY).max(Instant::now());
        if next >= deadline {
            return report;
        }
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            if cancel.load(Ordering::Relaxed) {
                report.problem = Some(AgentError::Cancelled.to_string());
                return report;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

/// One run of a check's command (connecting to the agent first if need be).
fn attempt(
    agent: &mut Option<GuestAgent>,
    sock: &Path,
    check: &Check,
    deadline: Instant,
    cancel: &Arc<AtomicBool>,
) -> Result<Exited, AgentError> {
    let connected = match agent.take() {
        Some(a) => a,
        None => GuestAgent::connect(sock, deadline, Some(cancel.clone()))?,
    };
    agent
        .insert(connected)
        .run(&check.program, &check.args, EXEC_POLL, deadline)
}

/// Stores a drill's record; returns its id.
fn record(data: &Path, r: &DrillReport) -> Result<i64, StoreError> {
    let conn = catalog::open_rw(data)?;
    let detail = serde_json::to_string(r).unwrap_or_default();
    let row = drills::NewDrill {
        vm: &r.vm,
        point: r.point,
        started_us: catalog::parse_rfc3339(&r.started).unwrap_or_else(|_| now_us()),
        point_age_s: r.point_age_seconds,
        verified_s: r.verified_seconds,
        boot_s: r.boot_seconds,
        rto_s: r.rto_seconds,
        result: &r.result,
        reason: r.reason.as_deref(),
        detail: &detail,
    };
    Ok(drills::record(&conn, &row)?)
}

/// Recorded drills, oldest first (of one VM, or all).
pub fn history(conn: &Connection, vm: Option<&str>) -> Result<Vec<DrillReport>, StoreError> {
    let mut out = Vec::new();
    for (id, detail) in drills::history(conn, vm)? {
        if let Ok(mut r) = serde_json::from_str::<DrillReport>(&detail) {
            r.id = id;
            out.push(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_agent::fake::{self, Fake, Run};
    use crate::guest_agent::MAX_REPLY;

    fn spec(toml_text: &str) -> Result<Vec<Check>, CheckError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("checks.toml");
        std::fs::write(&p, toml_text).expect("write");
        load_checks(&p)
    }

    fn exits(code: i64, stdout: &'static [u8]) -> Run {
        Run::Exits {
            code,
            stdout,
            stderr: b"",
        }
    }

    /// A socket in a fresh folder where `fake` answers the first connection.
    fn agent_socket(f: Fake) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(QGA_SOCKET);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                fake::serve(f, stream);
            }
        });
        (dir, path)
    }

    fn check(text: &str) -> Check {
        spec(text)
            .expect("valid")
            .into_iter()
            .next()
            .expect("one check")
    }

    fn run(sock: &Path, checks: &[Check]) -> (Vec<CheckReport>, Result<f64, String>) {
        let cancel = Arc::new(AtomicBool::new(false));
        run_checks(
            sock,
            checks,
            Duration::from_secs(10),
            Instant::now(),
            &cancel,
        )
    }

    #[test]
    fn a_checks_file_parses_with_defaults() {
        let checks = spec(
            r#"
            [[check]]
            name = "database"
            command = ["sqlite3", "/var/lib/app/app.db", "PRAGMA integrity_check"]
            expect_exit = 0
            expect_output = "^ok$"
            timeout = 120

            [[check]]
            command = ["systemctl", "is-system-running"]
            "#,
        )
        .expect("valid");
        assert_eq!(checks[0].name, "database");
        assert_eq!(
            checks[0].command(),
            ["sqlite3", "/var/lib/app/app.db", "PRAGMA integrity_check"]
        );
        assert_eq!(checks[0].timeout, Some(Duration::from_secs(120)));
        assert_eq!(checks[1].name, "systemctl is-system-running");
        assert_eq!((checks[1].expect_exit, checks[1].timeout), (0, None));
        assert!(checks[1].expect_output.is_none());
    }

    #[test]
    fn bad_checks_are_refused_with_a_named_reason() {
        let cases = [
            (
                "[[check]]\nname = \"a\"\ncommand = []",
                "\"a\": the command is empty",
            ),
            ("[[check]]\ncommand = [\"\", \"x\"]", "the command is empty"),
            (
                "[[check]]\nname = \"r\"\ncommand = [\"x\"]\nexpect_output = \"(\"",
                "\"r\": expect_output",
            ),
            (
                "[[check]]\ncommand = [\"x\"]\ntimeout = 0",
                "timeout must be positive",
            ),
            ("[[check]]\ncommand = [\"x\"]\nexit = 1", "exit"),
            ("[[check]]\nname = \"no command\"", "command"),
            ("[[check]]\ncommand = \"ls -l\"", "command"),
            ("", "no [[check]] table"),
            ("[check]\ncommand = [\"x\"]", "check"),
        ];
        for (text, want) in cases {
            let e = spec(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = load_checks(Path::new("/nonexistent/checks.toml")).expect_err("missing");
        assert!(matches!(e, CheckError::Read { .. }), "{e}");
        assert!(matches!(
            Check::shell("  "),
            Err(CheckError::EmptyCommand { .. })
        ));
    }

    #[test]
    fn a_shell_check_runs_sh_and_expects_exit_0() {
        let c = Check::shell("test -f /etc/hostname").expect("valid");
        assert_eq!(c.name, "test -f /etc/hostname");
        assert_eq!(c.command(), ["/bin/sh", "-c", "test -f /etc/hostname"]);
        assert_eq!(c.expect_exit, 0);
        assert!(c.expect_output.is_none() && c.timeout.is_none());
    }

    #[test]
    fn a_checks_file_round_trips_through_toml() {
        let specs = vec![
            CheckSpec {
                name: "db".into(),
                command: vec!["sqlite3".into(), "a b.db".into(), "PRAGMA \"x\"".into()],
                expect_exit: 2,
                expect_output: Some("^ok$".into()),
                timeout: Some(7),
            },
            CheckSpec {
                name: String::new(),
                command: vec!["true".into()],
                expect_exit: 0,
                expect_output: None,
                timeout: None,
            },
        ];
        let text = toml::to_string(&ChecksFile {
            check: specs.clone(),
        })
        .expect("serializes");
        let back: ChecksFile = toml::from_str(&text).expect("parses");
        assert_eq!(back.check, specs);
    }

    #[test]
    fn judging_names_what_was_expected_and_what_came() {
        let c = check("[[check]]\ncommand = [\"x\"]\nexpect_output = \"^ok$\"");
        let out = |code: Option<i64>, stdout: &[u8]| Exited {
            exit_code: code,
            signal: None,
            stdout: stdout.to_vec(),
            stderr: b"disk I/O error\n".to_vec(),
        };
        assert_eq!(
            c.judge(&out(Some(0), b"row 1\nok\nrow 3\n")),
            None,
            "multi-line"
        );
        let p = c.judge(&out(Some(0), b"not ok\n")).expect("no match");
        assert_eq!(
            p,
            "expected exit 0 and stdout matching \"^ok$\", got exit 0 and stdout not matching; \
             stdout ends \"not ok\"; stderr ends \"disk I/O error\""
        );
        let p = c.judge(&out(Some(1), b"ok")).expect("exit 1");
        assert!(p.contains("got exit 1;"), "{p}");
        let killed = Exited {
            signal: Some(9),
            ..Exited::default()
        };
        let p = c.judge(&killed).expect("killed");
        assert!(p.contains("got killed by signal 9"), "{p}");
        let long = [b'x'; 5000];
        let p = c.judge(&out(Some(1), &long)).expect("long");
        assert!(p.len() < 2 * REASON_TAIL + 200, "{}", p.len());
    }

    #[test]
    fn checks_pass_after_retries_in_order() {
        let (_dir, sock) = agent_socket(Fake {
            ignore_syncs: 1,
            runs: vec![exits(1, b"starting\n"), exits(0, b"running\n")],
            polls_running: 1,
            ..Fake::default()
        });
        let checks = [
            check("[[check]]\nname = \"up\"\ncommand = [\"systemctl\", \"is-system-running\"]\nexpect_output = \"^running$\""),
            Check::shell("true").expect("valid"),
        ];
        let started = Instant::now();
        let (reports, healthy) = run(&sock, &checks);
        let healthy = healthy.expect("healthy");
        assert_eq!(reports.len(), 2);
        let up = &reports[0];
        assert!(up.passed && up.problem.is_none(), "{up:?}");
        assert_eq!(up.attempts, 2, "retried once: the system was starting");
        assert_eq!(up.exit_code, Some(0));
        assert_eq!(up.stdout, "running\n");
        assert_eq!(up.command, ["systemctl", "is-system-running"]);
        let second = &reports[1];
        assert!(second.passed && second.attempts == 1, "{second:?}");
        assert_eq!(second.command, ["/bin/sh", "-c", "true"]);
        let (p1, p2) = (
            up.passed_seconds.expect("passed"),
            second.passed_seconds.expect("passed"),
        );
        assert!(p1 <= p2 && p2 <= healthy, "{p1} {p2} {healthy}");
        assert!(healthy <= started.elapsed().as_secs_f64());
    }

    #[test]
    fn a_failing_check_fails_the_rest_unrun_and_names_why() {
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![
                exits(0, b"ok\n"),
                exits(0, b"*** in database main ***\nerror\n"),
            ],
            ..Fake::default()
        });
        let checks = [
            check("[[check]]\nname = \"first\"\ncommand = [\"true\"]"),
            check("[[check]]\nname = \"database\"\ncommand = [\"sqlite3\"]\nexpect_output = \"^ok$\"\ntimeout = 2"),
            check("[[check]]\nname = \"third\"\ncommand = [\"true\"]"),
        ];
        let began = Instant::now();
        let (reports, healthy) = run(&sock, &checks);
        let reason = healthy.expect_err("fails");
        assert!(began.elapsed() < Duration::from_secs(5), "its own timeout");
        assert!(
            reason.starts_with("check \"database\" failed (2 attempt(s) in ")
                && reason.contains(" s): expected exit 0 and stdout matching \"^ok$\", got exit 0 and stdout not matching; stdout ends"),
            "{reason}"
        );
        assert!(reports[0].passed);
        assert!(!reports[1].passed && reports[1].passed_seconds.is_none());
        assert_eq!(reports[1].stdout, "*** in database main ***\nerror\n");
        assert_eq!(reports[2].attempts, 0);
        assert_eq!(reports[2].problem.as_deref(), Some("not run"));
    }

    #[test]
    fn a_wrong_exit_code_or_a_signal_fails() {
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![exits(3, b""), Run::Signal(9)],
            ..Fake::default()
        });
        let c = check("[[check]]\nname = \"svc\"\ncommand = [\"svc\"]\ntimeout = 2");
        let (reports, healthy) = run(&sock, &[c]);
        let reason = healthy.expect_err("fails");
        assert!(reason.contains("got killed by signal 9"), "{reason}");
        assert_eq!(reports[0].exit_code, None, "the last run ended by a signal");
        assert_eq!(reports[0].attempts, 2);
    }

    #[test]
    fn a_command_that_never_exits_times_out() {
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![Run::Never],
            ..Fake::default()
        });
        let c = check("[[check]]\nname = \"hang\"\ncommand = [\"sleep\", \"inf\"]\ntimeout = 1");
        let began = Instant::now();
        let (reports, healthy) = run(&sock, &[c]);
        let reason = healthy.expect_err("times out");
        assert!(began.elapsed() < Duration::from_secs(3));
        assert!(reason.contains("had not exited after"), "{reason}");
        assert_eq!(reports[0].exit_code, None);
    }

    #[test]
    fn an_agent_that_never_answers_times_out_by_the_checks_timeout() {
        let (_dir, sock) = agent_socket(Fake {
            ignore_syncs: usize::MAX,
            ..Fake::default()
        });
        let c = check("[[check]]\nname = \"db\"\ncommand = [\"x\"]\ntimeout = 2");
        let (_reports, healthy) = run(&sock, &[c]);
        let reason = healthy.expect_err("no agent");
        assert!(
            reason.starts_with("check \"db\" failed (")
                && reason.ends_with("the guest agent did not answer within 2 s"),
            "{reason}"
        );
    }

    #[test]
    fn a_missing_channel_fails_without_hanging() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = check("[[check]]\ncommand = [\"x\"]\ntimeout = 1");
        let (_reports, healthy) = run(&dir.path().join(QGA_SOCKET), &[c]);
        let reason = healthy.expect_err("no socket");
        assert!(
            reason.contains("connecting to the guest agent's socket")
                && reason.contains("No such file"),
            "{reason}"
        );
    }

    #[test]
    fn a_hostile_reply_fails_the_check_at_once() {
        let mut huge = vec![b'x'; MAX_REPLY + 1];
        huge.push(b'\n');
        let (_dir, sock) = agent_socket(Fake {
            exec_reply: Some(huge),
            ..Fake::default()
        });
        let c = check("[[check]]\nname = \"flood\"\ncommand = [\"x\"]\ntimeout = 60");
        let began = Instant::now();
        let (reports, healthy) = run(&sock, &[c]);
        let reason = healthy.expect_err("too long");
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "not retried to the timeout"
        );
        assert_eq!(reports[0].attempts, 1);
        assert!(
            reason.ends_with(&format!(
                "a reply from the guest agent is longer than {MAX_REPLY} bytes"
            )),
            "{reason}"
        );
    }

    #[test]
    fn kept_output_is_the_bounded_lossy_end() {
        let mut out = vec![b'a'; 5000];
        out.extend(b"\xff\xfeend\n");
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![Run::Exits {
                code: 0,
                stdout: out.leak(),
                stderr: b"\xc3",
            }],
            ..Fake::default()
        });
        let (reports, healthy) = run(&sock, &[Check::shell("cat big").expect("valid")]);
        healthy.expect("passes");
        let r = &reports[0];
        assert!(
            r.stdout.ends_with("\u{fffd}\u{fffd}end\n"),
            "{:?}",
            r.stdout
        );
        assert_eq!(
            r.stdout.chars().filter(|&c| c == 'a').count(),
            OUTPUT_TAIL - 6
        );
        assert_eq!(r.stderr, "\u{fffd}");
    }

    #[test]
    fn cancel_stops_the_checks() {
        let (_dir, sock) = agent_socket(Fake {
            runs: vec![exits(1, b"")],
            ..Fake::default()
        });
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            c.store(true, Ordering::Relaxed);
        });
        let began = Instant::now();
        let (_r, healthy) = run_checks(
            &sock,
            &[Check::shell("false").expect("valid")],
            Duration::from_secs(60),
            Instant::now(),
            &cancel,
        );
        assert!(healthy
            .expect_err("cancelled")
            .ends_with("cancelled (signal)"));
        assert!(began.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn records_from_before_checks_still_load() {
        let old = r#"{"id":3,"vm":"web1","point":7,"point_created":"2024-01-01T00:00:00Z",
            "started":"2024-01-02T00:00:00Z","point_age_seconds":86400.0,"verified_seconds":1.5,
            "blocks_verified":10,"bytes_verified":40960,"damaged_blocks":0,"damaged":[],
            "booted":true,"boot_seconds":3.0,"rto_seconds":4.5,"accel":"tcg",
            "serial_tail":"login:","result":"passed","reason":null}"#;
        let r: DrillReport = serde_json::from_str(old).expect("old record loads");
        assert!(r.checks.is_empty() && r.healthy_seconds.is_none());
        let with = serde_json::to_value(DrillReport {
            checks: vec![CheckReport {
                name: "db".into(),
                passed: true,
                ..CheckReport::default()
            }],
            healthy_seconds: Some(9.0),
            ..r
        })
        .expect("json");
        assert_eq!(with["healthy_seconds"], 9.0);
        let c = &with["checks"][0];
        for key in [
            "name",
            "command",
            "passed",
            "attempts",
            "exit_code",
            "stdout",
            "stderr",
            "passed_seconds",
            "problem",
        ] {
            assert!(c.get(key).is_some(), "{key} in {c}");
        }
    }
}
