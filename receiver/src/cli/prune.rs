//! `rewind-receiver prune`: remove points by keep rules (restic's `forget --keep-*` semantics).

use crate::retention::Policy;
use crate::{catalog, prune};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Only this VM (default: every VM).
    #[arg(long)]
    pub vm: Option<String>,
    /// Keep the N newest points.
    #[arg(long)]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N hours that have points.
    #[arg(long)]
    pub keep_hourly: Option<u32>,
    /// ... of each of the last N days.
    #[arg(long)]
    pub keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    /// ... of each of the last N years.
    #[arg(long)]
    pub keep_yearly: Option<u32>,
    /// Show exactly what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PruneArgs) -> anyhow::Result<()> {
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    let mut conn = catalog::open_rw(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let result = prune::prune(&mut conn, a.vm.as_deref(), &policy, a.dry_run)?;
    for r in &result {
        tracing::info!(vm = %r.vm, removed = r.removed.len(), kept = r.kept.len(), rows = r.rows_touched, dry_run = a.dry_run, "prune");
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"dry_run": a.dry_run, "vms": result})
        );
    } else {
        for r in &result {
            println!(
                "{}: {} {} point(s) {:?}, keeping {:?}",
                r.vm,
                if a.dry_run { "would remove" } else { "removed" },
                r.removed.len(),
                r.removed,
                r.kept.iter().map(|k| k.id).collect::<Vec<_>>()
            );
        }
    }
    Ok(())
}
