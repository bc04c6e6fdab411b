//! `rewind-receiver restore`: write one disk of a point as a sparse raw image.

use crate::points::{self, PointSelector};
use crate::{catalog, restore};
use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").args(["point", "at"])))]
pub struct RestoreArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The VM.
    #[arg(long)]
    pub vm: String,
    /// The disk to restore.
    #[arg(long)]
    pub disk: String,
    /// Point id (default: the newest point).
    #[arg(long)]
    pub point: Option<i64>,
    /// The newest point created at or before this RFC 3339 time.
    #[arg(long)]
    pub at: Option<String>,
    /// Output raw image.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite the output if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: RestoreArgs) -> anyhow::Result<()> {
    let conn = catalog::open_ro(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let which = match (a.point, &a.at) {
        (Some(id), _) => PointSelector::Id(id),
        (None, Some(at)) => PointSelector::At(at.clone()),
        (None, None) => PointSelector::Newest,
    };
    let point = points::resolve(&conn, &a.vm, &which)?;
    let disk = point
        .disks
        .iter()
        .find(|d| d.name == a.disk)
        .ok_or_else(|| crate::error::StoreError::UnknownDisk {
            point: point.id,
            disk: a.disk.clone(),
        })?;
    let bar = ProgressBar::new(disk.size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("restore {}/{}@{}", a.vm, a.disk, point.id));
    let started = std::time::Instant::now();
    let stats = restore::restore_disk(&conn, &a.data, point.id, disk, &a.out, a.force, &|pos| {
        bar.set_position(pos)
    })
    .with_context(|| {
        format!(
            "restoring {} of point {} to {}",
            a.disk,
            point.id,
            a.out.display()
        )
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "vm": a.vm, "disk": a.disk, "point": point.id, "created": point.created,
                "out": a.out, "size": stats.size, "root": disk.root,
                "blocks_written": stats.blocks_written, "bytes_written": stats.bytes_written,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "restored {}/{} point {} ({}) to {}: {} bytes, {} blocks written, root {} verified, {:.2}s",
            a.vm, a.disk, point.id, point.created, a.out.display(), stats.size,
            stats.blocks_written, disk.root, secs
        );
    }
    Ok(())
}
