//! `rewind-receiver recover`: a receiver's data folder rebuilt from its object store alone
//! (the newest catalog snapshot; see [`crate::snapshot`]).

use crate::chunks::location::{Location, StoreTable};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The object store to rebuild from, s3://BUCKET[/PREFIX] (endpoint and keys from
    /// AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
    #[arg(long, value_name = "URL")]
    pub store: String,
    /// The new data folder: missing, or holding no catalog.
    #[arg(long)]
    pub data: PathBuf,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: RecoverArgs) -> anyhow::Result<()> {
    let loc = Location::new(&a.store, &StoreTable::default())?;
    let r = crate::snapshot::recover(&a.data, &loc)
        .with_context(|| format!("recovering {} from {}", a.data.display(), loc.shown()))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "recovered {} points of {} VMs from {} (taken {} s ago); {} packs in the bucket, \
             {} packs the snapshot named but the bucket lacks were dropped ({} chunk rows)",
            r.points,
            r.vms,
            r.snapshot,
            r.snapshot_age_secs,
            r.packs_in_bucket,
            r.packs_dropped,
            r.chunks_dropped
        );
    }
    Ok(())
}
