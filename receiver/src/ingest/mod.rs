//! Turning an agent's upload into a point: begin a session, answer which chunks are missing,
//! verify and stage batches, and commit only when the receiver's roots equal the agent's.
//!
//! Ordering rules enforced here:
//! - a chunk is durable in its pack before the catalog refers to it (`write_new_chunks` syncs
//!   before the transaction that inserts its row);
//! - staged blocks live only in `session_blocks` and become visible in one transaction, after
//!   the recomputed roots equal the agent's; a crash at any instant leaves either no point or
//!   the whole point;
//! - a point builds only on its VM's newest point, so every disk generation is a linear chain;
//! - a large session's nodes are written before its point exists (`commit_in_steps`), only at
//!   an id above every point of its VM, while holding the VM's commit lock, and recorded in
//!   `pending_commits` first: a refused or interrupted commit's nodes are removed (at once, or
//!   by `Store::open`) before any other point of the VM can commit and read them;
//! - chunks are stored per owner: a block is staged only against its own agent's chunk rows,
//!   and what one agent sends never changes what another agent's points read.

use crate::catalog::points::VmId;
use crate::catalog::{now_us, rfc3339, sessions};
use crate::chunks::{ChunkLocation, ChunkWriter};
use crate::error::StoreError;
use crate::store::Store;
use rewind_proto::crypt::{Codec, KeyringId};
use rewind_proto::format::{
    DiskGeometry, MAX_BATCH_ENTRIES, MAX_CONFIG_BYTES, MAX_DISKS, MAX_QUERY_HASHES,
};
use rewind_proto::report::Chain;
use rewind_proto::tree::{self, NodeStore, Shape};
use rewind_proto::{names, BlockHash, DiskRoot};
use rusqlite::{Connection, Transaction};
use std::collections::{HashMap, HashSet};

mod commit;
mod pipeline;
mod session;
mod upload;

use commit::*;
pub use commit::{forget_pending_step, WHOLE_COMMIT_MAX, WHOLE_COMMIT_PARENTS};
pub use pipeline::{receive_upload, DecodedBatch, UploadError, UploadRoom};
use session::*;

/// One disk as the agent describes it.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub name: String,
    pub geometry: DiskGeometry,
}

/// What an agent asks for when it starts a point.
#[derive(Debug, Clone)]
pub struct BeginSpec {
    pub vm: String,
    pub disks: Vec<DiskSpec>,
    /// The last point the agent knows it committed.
    pub base_point: Option<i64>,
    /// A session to resume.
    pub resume: Option<String>,
    /// The keyring sealing the VM's chunks (None: plain), fixed by its first point.
    pub keyring: Option<KeyringId>,
    /// Data keys the session seals with, wrapped to recovery keys (kept before the answer).
    pub wrapped: Vec<rewind_proto::crypt::WrappedKey>,
    /// The source receiver, when a copy begins the point (None: an agent). A VM a copy
    /// writes is written by that copy only.
    pub copy_of: Option<String>,
}

/// How the agent must send a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMode {
    /// Only blocks that differ from the base point.
    Delta,
    /// Every non-zero block (a new generation of the disk).
    Full,
}

/// The receiver's answer to Begin.
#[derive(Debug, Clone)]
pub struct BeginPlan {
    pub session: String,
    pub base_point: Option<i64>,
    pub modes: Vec<(String, DiskMode)>,
    /// Set when the resumed session was already committed as this point.
    pub committed_point: Option<i64>,
    /// Damaged chunks the VM's points need (see [`crate::verify`]).
    pub heal: Vec<BlockHash>,
}

/// One block map entry of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub pos: u32,
    pub index: u64,
    pub leaf: BlockHash,
}

/// One chunk of a batch, as sent.
#[derive(Debug, Clone)]
pub struct IncomingChunk {
    pub hash: BlockHash,
    pub frame: bytes::Bytes,
}

/// A chunk appended to a pack: hash, where its frame is, data length.
type Placed = (BlockHash, ChunkLocation, usize);

/// A batch whose entries and chunks passed every check, ready to be written.
pub struct VerifiedBatch {
    session_id: String,
    session: Session,
    entries: Vec<Entry>,
    chunks: Vec<(BlockHash, bytes::Bytes, usize)>,
}

/// What one batch added.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchStats {
    pub entries: u64,
    pub chunks_stored: u64,
    pub chunk_bytes: u64,
}

/// What an agent says about a point besides its blocks.
#[derive(Debug, Clone, Default)]
pub struct PointMeta {
    /// The VM's configuration, a JSON object (empty: none).
    pub config: String,
    /// One of [`CONSISTENCY_LABELS`] (empty: "as-read").
    pub consistency: String,
    /// The agent's MAC of the point's manifest: 32 bytes for an encrypted VM, empty otherwise.
    pub mac: Vec<u8>,
    /// The agent's clock at commit, which the MAC binds (encrypted VMs; 0 otherwise).
    pub taken_us: i64,
}

/// The consistency labels a point may carry.
pub const CONSISTENCY_LABELS: [&str; 4] = [
    "application-consistent",
    "crash-consistent",
    "offline",
    "as-read",
];

impl PointMeta {
    fn validate(&self) -> Result<(Option<&str>, &str), StoreError> {
        let config = if self.config.is_empty() {
            None
        } else {
            let ok = self.config.len() <= MAX_CONFIG_BYTES
                && serde_json::from_str::<serde_json::Value>(&self.config)
                    .is_ok_and(|v| v.is_object());
            if !ok {
                return Err(StoreError::BadConfig {
                    max: MAX_CONFIG_BYTES,
                });
            }
            Some(self.config.as_str())
        };
        let consistency = if self.consistency.is_empty() {
            "as-read"
        } else if CONSISTENCY_LABELS.contains(&self.consistency.as_str()) {
            self.consistency.as_str()
        } else {
            return Err(StoreError::BadConsistency(self.consistency.clone()));
        };
        Ok((config, consistency))
    }
}

/// A committed point.
#[derive(Debug, Clone)]
pub struct Committed {
    pub point: i64,
    pub created: String,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Unknown,
    Open,
    Committed(i64),
}

struct SessionDisk {
    name: String,
    geometry: DiskGeometry,
    base_disk: Option<i64>,
}

struct Session {
    vm_id: VmId,
    vm: String,
    base_point: Option<i64>,
    disks: Vec<SessionDisk>,
    /// The VM's chunks are sealed (encrypted): the receiver checks envelopes, not content.
    sealed: bool,
}

/// The newest point of a VM.
pub fn latest_point(conn: &Connection, vm_id: VmId) -> rusqlite::Result<Option<i64>> {
    Ok(crate::catalog::points::newest(conn, vm_id)?.map(|p| p.0))
}

/// Checks that `caller` owns `vm` and returns its id. Another agent's VM is refused exactly as
/// one that does not exist: reads tell an agent nothing about VMs it does not own.
pub fn owned_vm(conn: &Connection, vm: &str, caller: &str) -> Result<VmId, StoreError> {
    match vm_row(conn, vm)? {
        Some((id, owner)) if owner == caller => Ok(id),
        _ => Err(StoreError::UnknownVm(names::shown(vm))),
    }
}

fn load_session(conn: &Connection, owner: &str, id: &str) -> Result<(Session, String), StoreError> {
    let Some(row) = sessions::get(conn, id)? else {
        return Err(StoreError::UnknownSession(names::shown(id)));
    };
    if row.owner != owner {
        return Err(StoreError::UnknownSession(names::shown(id)));
    }
    let disks = sessions::disks(conn, id)?
        .into_iter()
        .map(|d| {
            let geometry =
                DiskGeometry::new(d.size as u64, d.block_size as u64).map_err(|source| {
                    StoreError::Geometry {
                        disk: d.name.clone(),
                        source,
                    }
                })?;
            Ok(SessionDisk {
                name: d.name,
                geometry,
                base_disk: d.base_disk,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let (vm_id, vm, base_point, state) = (row.vm_id, row.vm, row.base_point, row.state);
    Ok((
        Session {
            vm_id,
            vm,
            base_point,
            disks,
            sealed: row.sealed,
        },
        state,
    ))
}

fn open_session(conn: &Connection, owner: &str, id: &str) -> Result<Session, StoreError> {
    let (session, state) = load_session(conn, owner, id)?;
    if state != "open" {
        return Err(StoreError::SessionClosed(names::shown(id)));
    }
    Ok(session)
}

#[cfg(test)]
mod tests;
