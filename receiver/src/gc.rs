//! Garbage collection: forget chunks no point and no open session references, then rewrite
//! packs that are mostly dead and delete packs that are entirely dead.
//!
//! Safe while `serve` accepts points:
//! - an upload indexes a chunk in the same transaction that stages the block using it, so a
//!   chunk is never visible unreferenced while its session is open; staged blocks of open
//!   sessions count as references; chunks written or re-sent within the grace period are kept
//!   too (an agent may reference a chunk it was told the receiver holds);
//! - only sealed packs are rewritten or deleted: a writer seals a pack in the transaction that
//!   indexes its last chunks, serve seals its packs at start (no upload survives a restart), and
//!   gc, holding the data folder's gc lock, seals those of a killed gc; pack ids are never
//!   reused;
//! - a pack's file is deleted only after the transaction that moved its live chunks elsewhere
//!   committed.
//!
//! Crash-safe: every step is a transaction or an idempotent file operation; a kill at any instant
//! leaves at worst an orphan pack (a file without its row), removed by the next run.

use crate::catalog::chunks as rows;
use crate::catalog::{events, now_us, packs, sessions};
use crate::chunks::format::RECORD_HEADER;
use crate::chunks::{self, ChunkReader, ChunkStore, ChunkWriter, PackId, ReadOrder};
use crate::error::StoreError;
use rewind_proto::BlockHash;
use rusqlite::Connection;
use serde::Serialize;
use std::path::Path;

/// An open session untouched this long is abandoned by gc.
const SESSION_EXPIRY_SECS: i64 = 7 * 24 * 3600;
/// A pack whose live bytes are below this share of its size is rewritten.
const REWRITE_BELOW: f64 = 0.5;

/// What a gc run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub sessions_expired: u64,
    pub chunks_removed: u64,
    pub packs_rewritten: u64,
    pub packs_deleted: u64,
    /// Small pack objects merged into full ones (object storage only).
    pub packs_repacked: u64,
    /// Requests sent to the object store (None with local packs).
    pub requests: Option<u64>,
    /// Pack files a killed gc had forgotten in the catalog but not yet unlinked.
    pub orphan_packs_removed: u64,
    /// Wrapped data keys of encrypted VMs that no stored chunk uses any more.
    pub wrapped_keys_dropped: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Removes packs whose catalog row is gone (a gc killed between forgetting a pack and
/// removing it). Pack ids are never reused (AUTOINCREMENT) and a pack's row is committed
/// before its file is created, so a pack with an id the catalog has handed out but holds no row
/// for is unreachable; a pack with a newer id may belong to a row not yet committed, and stays.
fn remove_orphan_packs(
    conn: &Connection,
    store: &dyn ChunkStore,
    deferred: &mut Vec<PackId>,
) -> Result<u64, StoreError> {
    let handed_out = packs::handed_out(conn)?;
    let mut removed = 0;
    for id in store.stored_packs()? {
        if id.0 > handed_out {
            continue;
        }
        if !packs::exists(conn, id)? {
            // An older catalog snapshot may still name it: on an object store it goes after
            // the next snapshot.
            if store.publishes() {
                deferred.push(id);
            } else {
                store.remove_pack(id)?;
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// The data folder's gc lock file (created if missing) and its path.
fn lock_file(data: &Path) -> Result<(std::fs::File, std::path::PathBuf), StoreError> {
    let lock_path = data.join("gc.lock");
    Ok((open_lock_file(&lock_path)?, lock_path))
}

/// Opens (creating) a lock file of the data folder, for `flock`.
pub(crate) fn open_lock_file(path: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| StoreError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Holds the data folder's gc lock shared while alive: a reader that resolves chunk locations
/// from one catalog snapshot and reads packs for a long time (a drill) keeps gc from moving
/// chunks under it. Waits for a running gc to finish.
pub fn read_lock(data: &Path) -> Result<std::fs::File, StoreError> {
    let (lock, lock_path) = lock_file(data)?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared).map_err(|e| {
        StoreError::Io {
            path: lock_path,
            source: e.into(),
        }
    })?;
    Ok(lock)
}

/// Runs one collection over the data folder.
pub fn gc(conn: &mut Connection, data: &Path, grace_secs: u64) -> Result<GcReport, StoreError> {
    let store = chunks::open(data)?;
    // One gc at a time; the lock ends with the process, so a killed gc does not block the next.
    let (lock, _) = lock_file(data)?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| StoreError::GcRunning)?;
    // Packs a killed gc left open can be collected now.
    crate::catalog::seal_orphans(conn, "gc")?;
    // A forward clock step must not shorten the grace period or a session's life.
    let now = crate::clock::cautious_now(conn)?;
    let cutoff = now - (grace_secs as i64) * 1_000_000;
    let mut deferred = Vec::new();
    let requests_before = store.objects().map(|p| p.requests());
    let mut report = GcReport {
        bytes_before: store.stored_bytes(),
        orphan_packs_removed: remove_orphan_packs(conn, &*store, &mut deferred)?,
        ..Default::default()
    };
    // 1. Forget unreferenced chunks (one transaction: serve's writes wait, then see the result).
    report.chunks_removed = forget_dead_chunks(conn, now, cutoff, &mut report)?;
    report.wrapped_keys_dropped = crate::catalog::keys::drop_unused(conn, cutoff)?;
    // 2. Packs: delete dead ones, rewrite mostly dead ones.
    // Only sealed packs: one a writer still appends to may not have all its rows yet.
    // Packs under Object Lock (a locked point's) are left alone until it passes.
    let sealed = packs::collectable(conn, now)?;
    let mut writer = store.writer();
    let mut reader = store.reader(ReadOrder::Sequential);
    for (id, created) in sealed {
        let mut io = Packs {
            store: &*store,
            reader: &mut *reader,
            writer: &mut *writer,
            deferred: &mut deferred,
        };
        collect_pack(conn, &mut io, (id, created), cutoff, &mut report)?;
    }
    // 3. On an object store, small packs are merged into full ones.
    let candidates = packs::collectable(conn, now)?;
    report.packs_repacked = crate::repack::repack(
        conn,
        &*store,
        &mut *reader,
        &mut *writer,
        (&candidates, cutoff),
        &mut deferred,
    )?;
    if !deferred.is_empty() {
        // The newest catalog snapshot must not name a pack about to be deleted.
        crate::snapshot::take(data)?;
        for id in deferred {
            store.remove_pack(id)?;
        }
    }
    writer.sync()?;
    writer.finish()?;
    for r in writer.take_retired() {
        crate::catalog::packs::seal(conn, &r)?;
    }
    if let Some(id) = writer.current() {
        crate::catalog::seal_pack(conn, id)?;
    }
    store.sync_removals();
    report.bytes_after = store.stored_bytes();
    report.requests = store
        .objects()
        .map(|p| p.requests() - requests_before.unwrap_or(0));
    let detail = serde_json::to_string(&report).unwrap_or_default();
    let event = events::NewEvent {
        vm: None,
        kind: "gc",
        point: None,
        detail: &detail,
        at_us: now_us(),
    };
    events::record(conn, &event)?;
    Ok(report)
}

/// Step 1: expires sessions idle for [`SESSION_EXPIRY_SECS`] and forgets every chunk older
/// than `cutoff` that no block of its owner uses (a point's or an open session's), in one
/// transaction. Returns how many chunks it forgot.
fn forget_dead_chunks(
    conn: &mut Connection,
    now: i64,
    cutoff: i64,
    report: &mut GcReport,
) -> Result<u64, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Sessions nobody touched for a week are abandoned: their staged blocks stop holding
    // chunks and the points they built on stop being protected. An agent coming back
    // later simply starts a new session.
    let expired = now - SESSION_EXPIRY_SECS * 1_000_000;
    report.sessions_expired = sessions::expire(&tx, expired)?;
    // Chunks are stored per owner: a chunk lives while a block of its owner's uses it.
    rows::mark_live(&tx)?;
    for dead in rows::dead_by_owner(&tx, cutoff)? {
        crate::catalog::add_usage(&tx, &dead.owner, -dead.chunks, -dead.bytes)?;
    }
    let removed = rows::forget_dead(&tx, cutoff)?;
    tx.commit()?;
    Ok(removed)
}

/// The chunk store, and the reader and writer gc moves live chunks with.
struct Packs<'a> {
    store: &'a dyn ChunkStore,
    reader: &'a mut dyn ChunkReader,
    writer: &'a mut dyn ChunkWriter,
    /// On an object store, packs to delete once a catalog snapshot no longer names them
    /// (see [`crate::snapshot`]); deleted at once otherwise.
    deferred: &'a mut Vec<crate::chunks::PackId>,
}

/// Step 2, for one sealed pack older than `cutoff`: a pack mostly dead has its live chunks
/// copied, made durable and repointed; a pack no row refers to any more is forgotten, then
/// removed from the store.
fn collect_pack(
    conn: &mut Connection,
    io: &mut Packs<'_>,
    (id, created): (PackId, i64),
    cutoff: i64,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    let (store, reader, writer) = (io.store, &mut *io.reader, &mut *io.writer);
    if created >= cutoff {
        return Ok(());
    }
    let stat = store.pack_stat(id);
    // A pack still being appended to (a long upload) is never touched.
    let recent = stat
        .and_then(|s| s.modified_us)
        .is_some_and(|t| t >= cutoff);
    if recent {
        return Ok(());
    }
    let size = stat.map_or(0, |s| s.size);
    let live = rows::in_pack(conn, id)?;
    let live_bytes: u64 = live
        .iter()
        .map(|c| u64::from(c.at.len) + RECORD_HEADER)
        .sum();
    if !live.is_empty() && (size == 0 || live_bytes as f64 >= REWRITE_BELOW * size as f64) {
        return Ok(());
    }
    if !live.is_empty() {
        // Copy the live chunks, make them durable, then repoint the catalog.
        let mut moved = Vec::new();
        for c in &live {
            let (owner, hash) = (&c.owner, &c.hash);
            let leaf = BlockHash::from_slice(hash)?;
            let frame = reader.read(c.at, &leaf)?;
            if writer.needs_pack() {
                let id = crate::catalog::new_pack(conn, "gc")?;
                writer.open_pack(id)?;
            }
            let at = writer.append(&leaf, &frame)?;
            moved.push((owner, hash, at));
        }
        writer.sync()?;
        // On an object store the copies go up before the catalog points at them (and before
        // the old pack's object is deleted).
        if store.publishes() {
            writer.finish()?;
        }
        rewind_proto::faults::point("gc-after-copy");
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (owner, hash, at) in &moved {
            rows::repoint(&tx, owner, hash, id, *at)?;
        }
        for full in writer.take_retired() {
            crate::catalog::packs::seal(&tx, &full)?;
        }
        tx.commit()?;
        rewind_proto::faults::point("gc-after-repoint");
        report.packs_rewritten += 1;
    }
    // No row refers to the pack any more (a chunk written meanwhile would be in a pack of
    // serve's own, never in this old one).
    if rows::count_in_pack(conn, id)? == 0 {
        packs::forget(conn, id)?;
        rewind_proto::faults::point("gc-before-unlink");
        if store.publishes() {
            io.deferred.push(id);
        } else {
            store.remove_pack(id)?;
        }
        report.packs_deleted += 1;
    }
    Ok(())
}
