//! `rewind-receiver drill` (prove a point restores, boots and runs its application; record RPO
//! and RTO) and `rewind-receiver drills` (the record).

use crate::catalog;
use crate::drill::{self, DrillOptions, DrillReport};
use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct DrillArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The folder's object store, s3://BUCKET[/PREFIX]: checked against the one it recorded
    /// (its packs are read from there in any case).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// The VM.
    #[arg(long)]
    pub vm: String,
    /// Point id (default: the newest point).
    #[arg(long)]
    pub point: Option<i64>,
    /// Boot the point in an isolated QEMU after verifying it.
    #[arg(long)]
    pub boot: bool,
    /// Seconds to wait for the boot marker.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// Regular expression the serial console must show (default: any console output).
    #[arg(long)]
    pub expect_serial: Option<String>,
    /// Memory for the drill's QEMU at most (the VM's captured memory when smaller), in MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_memory_mib: u64,
    /// QEMU's accelerator: auto (KVM when /dev/kvm opens, TCG when QEMU fails to start under
    /// it), kvm, or tcg (choose tcg where nested KVM is present but slow).
    #[arg(long, value_enum, default_value_t = drill::Accel::Auto)]
    pub accel: drill::Accel,
    /// TOML file of `[[check]]` tables: application checks run in the booted guest through an
    /// isolated guest-agent channel (qemu-ga), in order, before the --check ones.
    #[arg(long, value_name = "FILE", requires = "boot")]
    pub checks: Option<PathBuf>,
    /// A command run with `/bin/sh -c` in the booted guest; it must exit 0 (repeatable).
    #[arg(long = "check", value_name = "CMD", requires = "boot")]
    pub check: Vec<String>,
    #[command(flatten)]
    pub encryption: super::EncryptionArgs,
    /// Only check that the key given still opens the point: its manifest MAC and one chunk
    /// decrypted and checked (no full verify, no boot).
    #[arg(long, conflicts_with = "boot")]
    pub key_check: bool,
    /// Print the drill's record as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DrillsArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Only this VM's drills.
    #[arg(long)]
    pub vm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn line(r: &DrillReport) -> String {
    let secs = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.1}s"));
    let checks = if r.checks.is_empty() {
        String::new()
    } else {
        format!(
            " checks {}/{} healthy {}",
            r.checks.iter().filter(|c| c.passed).count(),
            r.checks.len(),
            secs(r.healthy_seconds)
        )
    };
    format!(
        "drill {} {} point {} {}: age {} verified {} ({} blocks){checks} rto {}{}",
        r.id,
        r.vm,
        r.point.map_or("-".to_owned(), |p| p.to_string()),
        r.result.to_uppercase(),
        secs(r.point_age_seconds),
        secs(r.verified_seconds),
        r.blocks_verified,
        secs(r.rto_seconds),
        r.reason
            .as_deref()
            .map_or(String::new(), |why| format!("\n  reason: {why}"))
    )
}

pub fn run(a: DrillArgs) -> anyhow::Result<()> {
    crate::chunks::location::check(&a.data, a.store.as_deref())?;
    let expect_serial = a
        .expect_serial
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .context("--expect-serial is not a valid regular expression")?;
    let mut checks = match &a.checks {
        Some(path) => drill::load_checks(path).context("--checks")?,
        None => Vec::new(),
    };
    for c in &a.check {
        checks.push(drill::Check::shell(c).context("--check")?);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, cancel.clone()).context("installing signal handlers")?;
    }
    let bar = if a.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "verify [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let opts = DrillOptions {
        point: a.point,
        boot: a.boot,
        boot_timeout: Duration::from_secs(a.boot_timeout),
        expect_serial,
        cancel,
        max_memory_mib: a.max_memory_mib.max(16),
        accel: a.accel,
        checks,
        key: a.encryption.key()?,
        key_check: a.key_check,
        progress: {
            let bar = bar.clone();
            Arc::new(move |done, total| {
                bar.set_length(total);
                bar.set_position(done);
                if done >= total {
                    bar.finish_and_clear();
                }
            })
        },
    };
    if !a.json {
        let then = match (a.boot, opts.checks.len()) {
            (false, _) => String::new(),
            (true, 0) => ", then booting".to_owned(),
            (true, n) => format!(", then booting and running {n} check(s)"),
        };
        eprintln!("drill of {}: verifying every block{then} ...", a.vm);
    }
    let r = drill::run(&a.data, &a.vm, &opts)?;
    tracing::info!(vm = %r.vm, point = ?r.point, result = %r.result, rto = ?r.rto_seconds, healthy = ?r.healthy_seconds, reason = ?r.reason, "drill");
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", line(&r));
    }
    if !r.passed() {
        bail!(
            "drill of {} failed: {}",
            r.vm,
            r.reason.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}

pub fn list(a: DrillsArgs) -> anyhow::Result<()> {
    // Read-write: a catalog from before drills existed is migrated, not refused.
    let conn = catalog::open_existing(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let all = drill::history(&conn, a.vm.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no drills recorded");
    } else {
        for r in &all {
            println!("{}", line(r));
        }
    }
    Ok(())
}
