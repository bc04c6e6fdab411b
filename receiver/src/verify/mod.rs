//! Verify: re-read every chunk the selected points reference (or every chunk), check that it
//! decompresses to its length and hashes to its name, and quarantine the bad ones.
//!
//! A bad chunk is removed from the chunk index (its bytes cannot be trusted) and recorded in
//! `bad_chunks`; the points that reference it are reported damaged. The owning agent's next
//! sync is told (Begin's heal list) to send that content again if its disk still has it; the
//! chunk is then stored anew, the points that reference it by hash are whole again, and the
//! quarantine entry is dropped.
//!
//! On object storage, packs are checked against what the store keeps instead of being read
//! back ([`objects`]).

mod objects;

use crate::catalog::chunks::{self as rows, ChunkRow as Row};
use crate::catalog::{events, now_us, VmId};
use crate::chunks::{self, ChunkLocation, ChunkReader, ReadOrder};
use crate::error::StoreError;
use rewind_proto::crypt::Codec;
use rewind_proto::report::chain;
use rewind_proto::BlockHash;
use rusqlite::Connection;
use serde::Serialize;
use std::path::Path;

/// One bad chunk and what it damages.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    pub hash: String,
    pub error: String,
    /// (VM, point) pairs whose content needs it.
    pub points: Vec<(String, i64)>,
}

/// What a verify of packs on object storage cost and found, pack by pack.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreReport {
    /// Packs whose object the store was asked about (a HEAD each).
    pub packs_checked: u64,
    /// Packs with no digest recorded (published by a process that died before sealing them,
    /// or rebuilt by `recover`): only their size and presence are checked.
    pub packs_without_digest: u64,
    /// Packs not published yet (their chunks are staged locally), not checked this run.
    pub packs_unpublished: u64,
    /// Packs whose cached copy had its chunks re-hashed.
    pub packs_rehashed_locally: u64,
    /// Cached copies that were not the uploaded bytes (dropped; the bucket's copy counts).
    pub cache_copies_dropped: u64,
    /// Packs a deep verify read back from the bucket.
    pub packs_read_back: u64,
    /// Requests sent to the store, of which GETs and HEADs.
    pub requests: u64,
    pub gets: u64,
    pub heads: u64,
    /// Bytes read from the bucket.
    pub bytes_read: u64,
}

/// What a verify run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Chunk rows checked (on object storage: by their pack's check, re-hashed where a copy
    /// was at hand).
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// On object storage: what the store was asked, and what it cost.
    pub store: Option<StoreReport>,
    pub bad: Vec<BadChunk>,
    /// Chunks still quarantined from earlier runs (not yet healed).
    pub quarantined: Vec<BadChunk>,
}

/// Chunk rows read per page.
const PAGE_ROWS: usize = 4096;

/// Reads a chunk at `at` and checks that it decompresses to `ulen` bytes hashing to `leaf`.
fn check(
    reader: &mut dyn ChunkReader,
    leaf: &BlockHash,
    at: ChunkLocation,
    ulen: i64,
) -> Result<(), String> {
    let frame = reader.read(at, leaf).map_err(|e| chain(&e))?;
    check_frame(leaf, &frame, ulen)
}

/// Checks that `frame` decompresses to `ulen` bytes hashing to `leaf`; an encrypted VM's
/// envelope, that its check hash matches its bytes (no key is needed or used).
fn check_frame(leaf: &BlockHash, frame: &[u8], ulen: i64) -> Result<(), String> {
    Codec::check_any(*leaf, frame, ulen as usize).map_err(|e| e.to_string())
}

/// Points of `owner`'s VMs whose content references `hash`.
fn points_using(
    conn: &Connection,
    owner: &str,
    hash: &[u8],
) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(rows::points_using(conn, owner, hash)?)
}

/// Checks chunks and quarantines bad ones. `scope` limits the check to chunks referenced by
/// the points of a VM (and one point of it). On object storage, `deep_budget` (bytes) lets it
/// read packs back from the bucket.
pub fn verify(
    conn: &mut Connection,
    data: &Path,
    scope: Option<(&str, Option<i64>)>,
    deep_budget: Option<u64>,
    progress: &dyn Fn(u64, u64),
) -> Result<VerifyReport, StoreError> {
    let (vm, point) = scope.map_or((None, None), |(vm, p)| (Some(vm), p));
    let total = rows::bytes_in_scope(conn, (vm, point))? as u64;
    let store = chunks::open(data)?;
    let mut reader = store.reader(ReadOrder::Sequential);
    let mut remote = match store.objects() {
        Some(packs) => {
            let in_scope = rows::packs_in_scope(conn, (vm, point))?;
            Some(objects::PackChecks::new(
                conn,
                packs,
                &in_scope,
                deep_budget,
            )?)
        }
        None => None,
    };
    let mut report = VerifyReport::default();
    let mut bad = Vec::new();
    // Pages in pack order, so memory stays bounded whatever the store's size.
    let mut after = (-1i64, -1i64);
    loop {
        let page = rows::page_in_scope(conn, (vm, point), after, PAGE_ROWS)?;
        let Some(last) = page.last() else { break };
        after = (last.at.pack.0, last.at.offset as i64);
        if report.chunks_checked == 0 {
            rewind_proto::faults::point("verify-after-listing");
        }
        for row in page {
            let leaf = BlockHash::from_slice(&row.hash)?;
            report.chunks_checked += 1;
            report.bytes_checked += row.ulen as u64;
            let checked = match &mut remote {
                Some(r) => r.check(conn, &row)?,
                None => check(&mut *reader, &leaf, row.at, row.ulen),
            };
            if let Err(error) = checked {
                bad.push((row, error));
            }
            progress(report.bytes_checked, total);
        }
    }
    for (row, error) in bad {
        if let Some(b) = quarantine(conn, &mut *reader, row, error)? {
            report.bad.push(b);
        }
    }
    report.store = remote.map(objects::PackChecks::finish);
    report.quarantined = still_quarantined(conn, scope, &report.bad)?;
    let detail = serde_json::json!({"chunks_checked": report.chunks_checked, "bytes_checked": report.bytes_checked,
        "bad": report.bad.len(), "quarantined": report.quarantined.len(), "store": report.store}).to_string();
    let event = events::NewEvent {
        vm: None,
        kind: "verify",
        point: None,
        detail: &detail,
        at_us: now_us(),
    };
    events::record(conn, &event)?;
    Ok(report)
}

/// Quarantines the chunk of `row` that failed with `error`, unless gc moved it meanwhile
/// and its new copy is good; returns what it quarantined.
fn quarantine(
    conn: &mut Connection,
    reader: &mut dyn ChunkReader,
    row: Row,
    error: String,
) -> Result<Option<BadChunk>, StoreError> {
    // Gc may have moved the chunk since it was listed (copy, repoint, unlink the old
    // pack): what failed is then the old copy. Only the copy the catalog points at now
    // can be bad, and only that one is quarantined.
    let now = rows::row(conn, &row.owner, &row.hash)?.map(|r| (r.at, r.clen, r.ulen));
    let (at, clen, error) = match now {
        None => return Ok(None), // collected by gc meanwhile: no point needs it
        Some((at, clen, _)) if at == row.at => (at, clen, error),
        Some((at, clen, ulen)) => {
            let leaf = BlockHash::from_slice(&row.hash)?;
            match check(reader, &leaf, at, ulen) {
                Ok(()) => return Ok(None),
                Err(e) => (at, clen, e),
            }
        }
    };
    let (owner, hash) = (row.owner, row.hash);
    let points = points_using(conn, &owner, &hash)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !rows::remove_at(&tx, &owner, &hash, at)? {
        // Moved again while it was re-read: the next verify checks its new copy.
        return Ok(None);
    }
    crate::catalog::add_usage(&tx, &owner, -1, -clen)?;
    rows::quarantine(&tx, &owner, &hash, now_us(), &error)?;
    tx.commit()?;
    tracing::error!(chunk = %hex::encode(&hash), %error, points = points.len(), "bad chunk quarantined");
    Ok(Some(BadChunk {
        hash: hex::encode(&hash),
        error,
        points,
    }))
}

/// Chunks quarantined by earlier runs and not healed yet, in `scope`, except those `found`
/// again by this run.
fn still_quarantined(
    conn: &Connection,
    scope: Option<(&str, Option<i64>)>,
    found: &[BadChunk],
) -> Result<Vec<BadChunk>, StoreError> {
    let mut out = Vec::new();
    for q in rows::quarantined(conn)? {
        let (owner, hash, error) = (q.owner, q.hash, q.detail);
        let hex_hash = hex::encode(&hash);
        let points = points_using(conn, &owner, &hash)?;
        if found
            .iter()
            .any(|b| b.hash == hex_hash && b.points == points)
        {
            continue;
        }
        let in_scope = match scope {
            None => true,
            Some((vm, p)) => points
                .iter()
                .any(|(v, id)| v == vm && p.is_none_or(|p| p == *id)),
        };
        if in_scope {
            out.push(BadChunk {
                hash: hex_hash,
                error,
                points,
            });
        }
    }
    Ok(out)
}

/// Quarantined chunks a VM's points need: the agent should send them again.
pub fn heal_list(conn: &Connection, vm_id: VmId) -> Result<Vec<BlockHash>, StoreError> {
    let rows = rows::to_heal(conn, vm_id)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(BlockHash::from_slice(&r)?);
    }
    Ok(out)
}
