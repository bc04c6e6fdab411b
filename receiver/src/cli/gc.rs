//! `rewind-receiver gc`: free the space of chunks no point references.

use crate::{catalog, gc};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The folder's object store, s3://BUCKET[/PREFIX]: checked against the one it recorded
    /// (its packs are read from there in any case).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Never collect chunks or packs written in the last SECONDS (uploads in flight).
    #[arg(long, default_value_t = 6 * 3600)]
    pub grace: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GcArgs) -> anyhow::Result<()> {
    crate::chunks::location::check(&a.data, a.store.as_deref())?;
    let mut conn = catalog::open_existing(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let r = gc::gc(&mut conn, &a.data, a.grace)?;
    tracing::info!(
        chunks = r.chunks_removed,
        packs_rewritten = r.packs_rewritten,
        packs_deleted = r.packs_deleted,
        freed = r.bytes_before.saturating_sub(r.bytes_after),
        "gc"
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "gc: {} chunks removed, {} packs rewritten, {} packs deleted, {} small packs merged, {} bytes freed ({} -> {})",
            r.chunks_removed,
            r.packs_rewritten,
            r.packs_deleted,
            r.packs_repacked,
            r.bytes_before.saturating_sub(r.bytes_after),
            r.bytes_before,
            r.bytes_after
        );
    }
    Ok(())
}
