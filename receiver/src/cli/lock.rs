//! `rewind-receiver lock`: protect a point from prune until a date (locks only extend).

use crate::{catalog, prune};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct LockArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The VM.
    #[arg(long)]
    pub vm: String,
    /// The point to lock.
    #[arg(long)]
    pub point: i64,
    /// Locked until this RFC 3339 time.
    #[arg(long)]
    pub until: String,
}

pub fn run(a: LockArgs) -> anyhow::Result<()> {
    let conn = catalog::open_existing(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let until = prune::lock(&conn, &a.vm, a.point, &a.until)?;
    println!("point {} of {} is locked until {until}", a.point, a.vm);
    // On an object store, its packs go under Object Lock now (serve retries if this fails).
    let store = crate::chunks::open(&a.data)?;
    let n = crate::object_lock::apply(&conn, &*store).with_context(|| {
        "the lock is recorded, but its packs are not yet under Object Lock (serve retries \
         every 30 s)"
    })?;
    if store.publishes() {
        println!("{n} pack objects put under Object Lock (COMPLIANCE) until {until}");
    }
    Ok(())
}
