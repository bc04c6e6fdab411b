//! `rewind-receiver points`: list committed points, oldest first.

use crate::{catalog, points};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PointsArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Only this VM's points.
    #[arg(long)]
    pub vm: Option<String>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PointsArgs) -> anyhow::Result<()> {
    let conn = catalog::open_ro(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let list = points::list(&conn, a.vm.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!("{:>6}  {:<16}  {:<32}  DISKS", "ID", "VM", "CREATED");
    for p in &list {
        let disks: Vec<String> = p
            .disks
            .iter()
            .map(|d| format!("{} ({} B, {} changed)", d.name, d.size, d.changed_blocks))
            .collect();
        println!(
            "{:>6}  {:<16}  {:<32}  {}",
            p.id,
            p.vm,
            p.created,
            disks.join(", ")
        );
    }
    Ok(())
}
