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
//!
//! What QEMU gets comes from the point's captured configuration: memory (at most
//! `max_memory_mib`) and vCPUs, and for a libvirt domain also its machine family (`pc` or
//! `q35`) and its disks' boot order; a domain that boots UEFI is refused (drills have no
//! OVMF). The report says what was booted (`memory_mib`, `cpus`, `machine`, `disk_order`).
//!
//! `run` reads as the drill's list of steps, one module each: `verify` (every block and
//! root), `plan` (what QEMU gets), `boot` (overlays, QEMU, the console marker) with `health`
//! (the application checks of `checks` in the guest), and `record` (the report stored in the
//! catalog).

use crate::catalog::{self, now_us, rfc3339};
use crate::error::StoreError;
use crate::points::{self, PointInfo, PointSelector};
use rewind_proto::crypt::Codec;
use rewind_proto::report::Chain;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod boot;
mod checks;
mod health;
mod plan;
mod record;
mod verify;

pub use checks::{load_checks, Check, CheckError, CheckReport, CheckSpec, ChecksFile};
pub use record::{history, Damage, DrillReport};

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
    /// Only check that the key opens the point (its manifest MAC, one chunk decrypted and
    /// checked): no full verify, no boot.
    pub key_check: bool,
    /// The key of an encrypted VM, given on purpose: with it the drill checks content (and
    /// can boot); without it an encrypted point's drill checks ciphertext and structure only.
    pub key: crate::keys::Key,
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
        memory_mib: None,
        cpus: None,
        machine: None,
        disk_order: Vec::new(),
        serial_tail: None,
        checks: opts.checks.iter().map(CheckReport::not_run).collect(),
        healthy_seconds: None,
        result: "failed".into(),
        reason: None,
        checked: None,
    };
    let outcome = drill(data, &conn, &point, opts, started, &mut report);
    drop(conn);
    match outcome {
        Ok(()) => report.result = "passed".into(),
        Err(reason) => report.reason = Some(reason),
    }
    report.id = record::record(data, &report)?;
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
    let need = if opts.boot || opts.key_check {
        crate::keys::Need::Plaintext
    } else {
        crate::keys::Need::CiphertextOk
    };
    if opts.key_check && point.encrypted.is_none() {
        return Err(format!(
            "point {} of {} is not encrypted: there is no key to check",
            point.id, point.vm
        ));
    }
    let codec = crate::keys::codec_for(conn, point, &opts.key, need)
        .map_err(|e| format!("{}", Chain(&e)))?;
    let opened = crate::keys::open_point(point, &codec).map_err(|e| format!("{}", Chain(&e)))?;
    let point = &opened;
    report.checked = Some(
        match codec {
            Codec::Plain => "content",
            Codec::Sealed { .. } => "content (decrypted with the key given, manifest MAC verified)",
            Codec::Locked => {
                "ciphertext only (encrypted, no key given): every chunk's envelope and check \
                 hash, the leaves and roots; not the content"
            }
        }
        .to_owned(),
    );
    if opts.key_check {
        let bytes = verify::key_check(data, conn, point, &codec)?;
        report.blocks_verified = 1;
        report.bytes_verified = bytes;
        report.checked = Some(
            "key only: the manifest MAC verified and one chunk decrypted and hashed to its id \
             (no other block read)"
                .to_owned(),
        );
        report.verified_seconds = Some(started.elapsed().as_secs_f64());
        return Ok(());
    }
    verify::verify_point(data, conn, point, (opts, &codec), report)?;
    report.verified_seconds = Some(started.elapsed().as_secs_f64());
    if !opts.boot {
        // Without a boot, recovery is ready once the data is proven.
        report.rto_seconds = report.verified_seconds;
        return Ok(());
    }
    let plan = plan::plan(point, opts.max_memory_mib).map_err(|e| e.reason())?;
    report.memory_mib = Some(plan.memory_mib);
    report.cpus = Some(plan.cpus);
    report.machine = Some(plan.machine.as_str().to_owned());
    report.disk_order = plan.disk_order.clone();
    let boot = boot::boot_point((data, &codec), point, &plan, opts, started)?;
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

/// The last `n` bytes, as lossy UTF-8.
fn tail(bytes: &[u8], n: usize) -> String {
    let start = bytes.len().saturating_sub(n);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
