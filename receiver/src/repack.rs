//! Repack on object storage, run by gc: an upload stream ends with a pack of whatever it sent
//! (an incremental's is often a few MiB), so small pack objects pile up. Sealed packs below
//! [`REPACK_BELOW`] older than the grace period are merged, a group at a time, into full packs.
//!
//! The rules are gc's rewrite rules: only sealed packs older than the grace period (so no
//! writer appends to them and no session may still be told they hold a chunk it then cannot
//! find); the live chunks are copied and the new pack is published (durable in the bucket)
//! before one transaction repoints them; an old pack's row goes only once no chunk refers to
//! it, and its object is deleted after the next catalog snapshot (deferred, as gc does).

use crate::catalog::chunks as rows;
use crate::catalog::packs;
use crate::chunks::format::{PACK_TARGET_BYTES, RECORD_HEADER};
use crate::chunks::{ChunkReader, ChunkStore, ChunkWriter, PackId};
use crate::error::StoreError;
use rewind_proto::BlockHash;
use rusqlite::Connection;

/// A sealed pack object smaller than this is merged with others.
pub const REPACK_BELOW: u64 = 16 << 20;

/// Small packs among `candidates` (sealed, created before `cutoff`) that may be merged, in
/// groups whose live bytes fill about one full pack.
fn groups(
    conn: &Connection,
    store: &dyn ChunkStore,
    candidates: &[(PackId, i64)],
    cutoff: i64,
) -> Result<Vec<Vec<PackId>>, StoreError> {
    let mut out = Vec::new();
    let mut group = Vec::new();
    let mut bytes = 0u64;
    for &(id, created) in candidates {
        if created >= cutoff {
            continue;
        }
        let Some(stat) = store.pack_stat(id) else {
            continue;
        };
        if stat.size >= REPACK_BELOW || stat.modified_us.is_some_and(|t| t >= cutoff) {
            continue;
        }
        let live: u64 = rows::in_pack(conn, id)?
            .iter()
            .map(|c| u64::from(c.at.len) + RECORD_HEADER)
            .sum();
        if bytes + live > PACK_TARGET_BYTES && !group.is_empty() {
            out.push(std::mem::take(&mut group));
            bytes = 0;
        }
        group.push(id);
        bytes += live;
    }
    out.push(group);
    // Merging one pack into one gains nothing.
    out.retain(|g| g.len() >= 2);
    Ok(out)
}

/// Merges the small packs of an object store; returns how many were merged away. Packs whose
/// objects are to be deleted go to `deferred`.
pub fn repack(
    conn: &mut Connection,
    store: &dyn ChunkStore,
    reader: &mut dyn ChunkReader,
    writer: &mut dyn ChunkWriter,
    (candidates, cutoff): (&[(PackId, i64)], i64),
    deferred: &mut Vec<PackId>,
) -> Result<u64, StoreError> {
    if !store.publishes() {
        return Ok(0);
    }
    let mut merged = 0;
    for group in groups(conn, store, candidates, cutoff)? {
        // A cached copy that is not the uploaded pack is never copied over the good object:
        // dropped, it is fetched again.
        if let Some(objects) = store.objects() {
            for &id in &group {
                if let (Some(d), Some(bytes)) = (packs::digest(conn, id)?, objects.cached_copy(id)?)
                {
                    if !d.matches(&bytes) {
                        tracing::warn!(pack = %id, "cached copy differs from the uploaded pack: dropped");
                        objects.drop_cached(id);
                    }
                }
            }
        }
        let mut moved = Vec::new();
        for &id in &group {
            for c in rows::in_pack(conn, id)? {
                let leaf = BlockHash::from_slice(&c.hash)?;
                let frame = reader.read(c.at, &leaf)?;
                if writer.needs_pack() {
                    let new = crate::catalog::new_pack(conn, "gc")?;
                    writer.open_pack(new)?;
                }
                let at = writer.append(&leaf, &frame)?;
                moved.push((c.owner, c.hash, id, at));
            }
        }
        // In the bucket before the catalog points at the copies.
        writer.sync()?;
        writer.finish()?;
        rewind_proto::faults::point("repack-after-copy");
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (owner, hash, old, at) in &moved {
            rows::repoint(&tx, owner, hash, *old, *at)?;
        }
        for full in writer.take_retired() {
            packs::seal(&tx, &full)?;
        }
        for &id in &group {
            // A chunk written meanwhile lands in a pack of serve's own, never in an old one.
            if rows::count_in_pack(&tx, id)? == 0 {
                packs::forget(&tx, id)?;
                deferred.push(id);
                merged += 1;
            }
        }
        tx.commit()?;
    }
    Ok(merged)
}
