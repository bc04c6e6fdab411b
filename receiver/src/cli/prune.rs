//! `rewind-receiver prune`: remove points by keep rules (restic's `forget --keep-*` semantics).

use crate::{catalog, prune};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Receiver configuration file: its data folder and each VM's retention (the --keep-*
    /// flags override it for every VM).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data folder (overrides the file's).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The folder's object store, s3://BUCKET[/PREFIX]: checked against the one it recorded
    /// (its packs are read from there in any case).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
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
    let (file, data) = super::config_and_data(a.config.as_deref(), a.data.as_deref())?;
    crate::chunks::location::check(&data, a.store.as_deref())?;
    let policy = a.keep.policy();
    let mut conn = catalog::open_existing(&data)
        .with_context(|| format!("opening the catalog in {}", data.display()))?;
    let result = if a.config.is_some() && policy.is_empty() {
        // Each VM by its own rules from the file; VMs without rules are left alone.
        let vms: std::collections::BTreeSet<String> = crate::points::list(&conn, a.vm.as_deref())?
            .into_iter()
            .map(|p| p.vm)
            .collect();
        let mut all = Vec::new();
        for vm in vms {
            let p = file.policy(&vm);
            if !p.is_empty() {
                all.extend(prune::prune(&mut conn, Some(&vm), &p, a.dry_run)?);
            }
        }
        all
    } else {
        prune::prune(&mut conn, a.vm.as_deref(), &policy, a.dry_run)?
    };
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
