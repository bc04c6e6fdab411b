//! `rewind-receiver verify`: re-read and re-hash chunks; quarantine bad ones and name the points
//! they damage. Exits non-zero while any point is damaged.

use crate::{catalog, verify};
use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The folder's object store, s3://BUCKET[/PREFIX]: checked against the one it recorded
    /// (its packs are read from there in any case).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Only the chunks this VM's points reference.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only the chunks this point references (with --vm).
    #[arg(long, requires = "vm")]
    pub point: Option<i64>,
    /// On object storage: also read packs back from the bucket (the longest unread first) and
    /// re-hash them, up to --budget-mib per run. Without it nothing is read from the bucket:
    /// packs are checked against the checksums the store keeps, and re-hashed from the local
    /// cache where it holds them.
    #[arg(long)]
    pub deep: bool,
    /// Bytes a deep verify may read from the bucket in this run (MiB).
    #[arg(long, default_value_t = 1024, requires = "deep")]
    pub budget_mib: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: VerifyArgs) -> anyhow::Result<()> {
    crate::chunks::location::check(&a.data, a.store.as_deref())?;
    let mut conn = catalog::open_existing(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "verify [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let scope = a.vm.as_deref().map(|vm| (vm, a.point));
    let deep = a.deep.then(|| a.budget_mib.saturating_mul(1 << 20));
    let r = verify::verify(&mut conn, &a.data, scope, deep, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    tracing::info!(
        chunks = r.chunks_checked,
        bad = r.bad.len(),
        quarantined = r.quarantined.len(),
        "verify"
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "verify: {} chunks ({} bytes) checked, {} bad",
            r.chunks_checked,
            r.bytes_checked,
            r.bad.len()
        );
        if let Some(s) = &r.store {
            println!(
                "  object store: {} packs checked ({} without a recorded digest), {} re-hashed from the cache, {} read back; {} requests, {} bytes read",
                s.packs_checked, s.packs_without_digest, s.packs_rehashed_locally, s.packs_read_back, s.requests, s.bytes_read
            );
        }
        for b in r.bad.iter().chain(&r.quarantined) {
            let pts: Vec<String> = b.points.iter().map(|(vm, p)| format!("{vm}@{p}")).collect();
            println!(
                "  chunk {} ({}) damages {}",
                b.hash,
                b.error,
                pts.join(", ")
            );
        }
    }
    let damaged = r.bad.len() + r.quarantined.len();
    if damaged > 0 {
        bail!("{damaged} damaged chunk(s): the owning agents' next sync re-sends what their disks still hold");
    }
    Ok(())
}
