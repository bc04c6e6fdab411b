//! `rewind-receiver prune`: remove points by keep rules (restic's `forget --keep-*` semantics).

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
    #[command(flatten)]
    pub keep: super::KeepArgs,
    /// Show exactly what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PruneArgs) -> anyhow::Result<()> {
    let policy = a.keep.policy();
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
