//! `rewind-receiver diff`: which extents changed between two points, from the catalog alone.

use crate::{catalog, diff};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The VM.
    #[arg(long)]
    pub vm: String,
    /// One point.
    #[arg(long)]
    pub from: i64,
    /// The other point.
    #[arg(long)]
    pub to: i64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DiffArgs) -> anyhow::Result<()> {
    let conn = catalog::open_ro(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let d = diff::diff(&conn, &a.vm, a.from, a.to)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    println!(
        "{} point {} → {}: {} bytes differ",
        d.vm, d.from, d.to, d.changed_bytes
    );
    for disk in &d.disks {
        println!(
            "  {:<8} {:>9} blocks {:>14} bytes in {} extents{}",
            disk.name,
            disk.changed_blocks,
            disk.changed_bytes,
            disk.extents.len(),
            disk.note
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
