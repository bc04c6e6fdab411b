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

use crate::catalog::{now_us, rfc3339};
use crate::error::StoreError;
use crate::packs::PackWriter;
use crate::store::Store;
use rewind_proto::chunk;
use rewind_proto::format::{
    DiskGeometry, MAX_BATCH_ENTRIES, MAX_CONFIG_BYTES, MAX_DISKS, MAX_QUERY_HASHES,
};
use rewind_proto::report::Chain;
use rewind_proto::tree::{self, NodeStore, Shape};
use rewind_proto::{names, Leaf};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::{HashMap, HashSet};

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
    pub heal: Vec<Leaf>,
}

/// One block map entry of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub pos: u32,
    pub index: u64,
    pub leaf: Leaf,
}

/// One chunk of a batch, as sent.
#[derive(Debug, Clone)]
pub struct IncomingChunk {
    pub hash: Leaf,
    pub frame: bytes::Bytes,
}

/// A chunk appended to a pack: hash, pack, offset of its frame, frame length, data length.
type Placed = (Leaf, i64, u64, usize, usize);

/// A batch whose entries and chunks passed every check, ready to be written.
pub struct VerifiedBatch {
    session_id: String,
    session: Session,
    entries: Vec<Entry>,
    chunks: Vec<(Leaf, bytes::Bytes, usize)>,
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
    vm_id: i64,
    vm: String,
    base_point: Option<i64>,
    disks: Vec<SessionDisk>,
}

fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn validate_begin(spec: &BeginSpec) -> Result<(), StoreError> {
    names::vm(&spec.vm)?;
    if spec.disks.is_empty() || spec.disks.len() > MAX_DISKS {
        return Err(StoreError::DiskCount {
            got: spec.disks.len(),
            max: MAX_DISKS,
        });
    }
    let mut seen = HashSet::new();
    for d in &spec.disks {
        names::disk(&d.name)?;
        if !seen.insert(d.name.as_str()) {
            return Err(StoreError::DuplicateDisk(d.name.clone()));
        }
    }
    Ok(())
}

/// The VM's id and owner, if it exists.
fn vm_row(conn: &Connection, vm: &str) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row("SELECT id, owner FROM vms WHERE name = ?1", [vm], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// Largest random step between two point ids of a VM.
const POINT_ID_STEP: i64 = 1 << 16;
/// First point ids of VMs are drawn below this: ids stay below 2^53, exact in any JSON reader.
const FIRST_POINT_ID_MAX: i64 = 1 << 40;

/// The id of a VM's next point, after its newest point `latest`. Ids only grow within a VM
/// (versioned nodes need that), but by a random step, and a VM's first id is random: the ids
/// an agent sees say nothing about how many points other agents committed meanwhile.
fn new_point_id(conn: &Connection, latest: Option<i64>) -> rusqlite::Result<i64> {
    let mut taken = conn.prepare_cached("SELECT 1 FROM points WHERE id = ?1")?;
    loop {
        let id = match latest {
            Some(p) => p + rand::random_range(1..=POINT_ID_STEP),
            None => rand::random_range(1..FIRST_POINT_ID_MAX),
        };
        if !taken.exists([id])? {
            return Ok(id);
        }
    }
}

/// Whether a VM with no point has seen no session progress for `timeout`: its name is then
/// free for another agent.
fn claim_expired(
    conn: &Connection,
    vm_id: i64,
    timeout: std::time::Duration,
) -> rusqlite::Result<bool> {
    if latest_point(conn, vm_id)?.is_some() {
        return Ok(false);
    }
    let last: i64 = conn.query_row(
        "SELECT MAX(COALESCE((SELECT MAX(updated_us) FROM sessions WHERE vm_id = ?1), 0), created_us)
         FROM vms WHERE id = ?1",
        [vm_id],
        |r| r.get(0),
    )?;
    Ok(crate::clock::cautious_now(conn)? - last >= timeout.as_micros() as i64)
}

/// The open sessions of a VM (of one owner, if given) other than `keep`.
fn open_sessions_of(
    conn: &Connection,
    vm_id: i64,
    owner: Option<&str>,
    keep: &str,
) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM sessions WHERE vm_id = ?1 AND state = 'open' AND id <> ?3
           AND (?2 IS NULL OR owner = ?2)",
    )?;
    let rows = stmt.query_map(params![vm_id, owner, keep], |r| r.get(0))?;
    rows.collect()
}

/// Hands a VM with no point to `owner`, abandoning its former owner's sessions (their staged
/// rows are the caller's to drop, outside the transaction).
fn release_claim(conn: &Connection, vm_id: i64, owner: &str) -> rusqlite::Result<Vec<String>> {
    let abandoned = open_sessions_of(conn, vm_id, None, "")?;
    conn.execute(
        "UPDATE sessions SET state = 'abandoned' WHERE vm_id = ?1 AND state = 'open'",
        [vm_id],
    )?;
    conn.execute(
        "UPDATE vms SET owner = ?2, created_us = ?3 WHERE id = ?1",
        params![vm_id, owner, now_us()],
    )?;
    Ok(abandoned)
}

fn check_vm_quota(
    conn: &Connection,
    owner: &str,
    quota: &crate::config::Quota,
) -> Result<(), StoreError> {
    if let Some(max) = quota.vms {
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM vms WHERE owner = ?1", [owner], |r| {
            r.get(0)
        })?;
        if n as u64 >= max {
            return Err(StoreError::Quota {
                agent: owner.to_owned(),
                what: format!("{n} VMs"),
                key: "vms",
                limit: max,
            });
        }
    }
    Ok(())
}

/// The newest point of a VM.
pub fn latest_point(conn: &Connection, vm_id: i64) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT MAX(id) FROM points WHERE vm_id = ?1",
        [vm_id],
        |r| r.get(0),
    )
}

/// Checks that `caller` owns `vm` and returns its id. Another agent's VM is refused exactly as
/// one that does not exist: reads tell an agent nothing about VMs it does not own.
pub fn owned_vm(conn: &Connection, vm: &str, caller: &str) -> Result<i64, StoreError> {
    match vm_row(conn, vm)? {
        Some((id, owner)) if owner == caller => Ok(id),
        _ => Err(StoreError::UnknownVm(names::shown(vm))),
    }
}

fn load_session(conn: &Connection, owner: &str, id: &str) -> Result<(Session, String), StoreError> {
    // Every batch loads its session: the statements are kept prepared.
    let row: Option<(i64, String, Option<i64>, String, String)> = conn
        .prepare_cached(
            "SELECT s.vm_id, v.name, s.base_point, s.state, s.owner
             FROM sessions s JOIN vms v ON v.id = s.vm_id WHERE s.id = ?1",
        )?
        .query_row([id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((vm_id, vm, base_point, state, session_owner)) = row else {
        return Err(StoreError::UnknownSession(names::shown(id)));
    };
    if session_owner != owner {
        return Err(StoreError::UnknownSession(names::shown(id)));
    }
    let mut stmt = conn.prepare_cached(
        "SELECT name, size, block_size, base_disk FROM session_disks
         WHERE session_id = ?1 ORDER BY pos",
    )?;
    let disks = stmt
        .query_map([id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?
        .map(|row| {
            let (name, size, bs, base_disk) = row?;
            let geometry = DiskGeometry::new(size as u64, bs as u64).map_err(|source| {
                StoreError::Geometry {
                    disk: name.clone(),
                    source,
                }
            })?;
            Ok(SessionDisk {
                name,
                geometry,
                base_disk,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok((
        Session {
            vm_id,
            vm,
            base_point,
            disks,
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

impl Store {
    /// Opens a session for the VM's next point (creating the VM, owned by `owner`, on first
    /// use), or resumes `spec.resume`. On error nothing is written.
    pub fn begin(&self, owner: &str, spec: &BeginSpec) -> Result<BeginPlan, StoreError> {
        validate_begin(spec)?;
        let rules = self.rules();
        let quota = rules.quota(owner);
        if let Some(resume) = &spec.resume {
            // The rows a resumed session staged before are dropped (the agent re-sends its
            // whole delta), in bounded steps before the begin's own transaction.
            let mine: bool = self.conn().query_row(
                "SELECT EXISTS(SELECT 1 FROM sessions s JOIN vms v ON v.id = s.vm_id
                     WHERE s.id = ?1 AND s.owner = ?2 AND s.state = 'open' AND v.name = ?3)",
                params![resume, owner, spec.vm],
                |r| r.get(0),
            )?;
            if mine {
                self.drop_staged(resume)?;
            }
        }
        let mut dead: Vec<String> = Vec::new();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let vm_id = match vm_row(&tx, &spec.vm)? {
            Some((id, o)) if o == owner => id,
            Some((id, _)) if claim_expired(&tx, id, rules.claim_timeout)? => {
                check_vm_quota(&tx, owner, &quota)?;
                dead.extend(release_claim(&tx, id, owner)?);
                tracing::info!(vm = %spec.vm, agent = owner, "an unfinished claim on a VM name expired; the name passes to this agent");
                id
            }
            Some(_) => {
                return Err(StoreError::NotOwner {
                    vm: spec.vm.clone(),
                    caller: owner.to_owned(),
                })
            }
            None => {
                check_vm_quota(&tx, owner, &quota)?;
                tx.execute(
                    "INSERT INTO vms(name, owner, created_us) VALUES (?1, ?2, ?3)",
                    params![spec.vm, owner, now_us()],
                )?;
                tx.last_insert_rowid()
            }
        };
        let latest = latest_point(&tx, vm_id)?;

        let mut session_id = None;
        if let Some(resume) = &spec.resume {
            let found: Option<(String, String, i64, Option<i64>)> = tx
                .query_row(
                    "SELECT owner, state, vm_id, point_id FROM sessions WHERE id = ?1",
                    [resume],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            match found {
                Some((o, state, v, point)) if o == owner && v == vm_id => {
                    if state == "committed" {
                        return Ok(BeginPlan {
                            session: resume.clone(),
                            base_point: latest,
                            modes: vec![],
                            committed_point: point,
                            heal: Vec::new(),
                        });
                    }
                    if state == "open" {
                        // Staged entries are dropped: the agent re-sends its whole delta (the
                        // disk may have changed since), but chunks already stored stay held.
                        tx.execute("DELETE FROM session_blocks WHERE session_id = ?1", [resume])?;
                        tx.execute("DELETE FROM session_disks WHERE session_id = ?1", [resume])?;
                        session_id = Some(resume.clone());
                    }
                }
                _ => {}
            }
        }

        // A new session supersedes the agent's other open sessions of this VM: only one of them
        // could ever commit, and a crashed agent must not fill its session quota with them.
        let keep = session_id.as_deref().unwrap_or("");
        dead.extend(open_sessions_of(&tx, vm_id, Some(owner), keep)?);
        tx.execute(
            "UPDATE sessions SET state = 'abandoned'
             WHERE vm_id = ?1 AND owner = ?2 AND state = 'open' AND id <> ?3",
            params![vm_id, owner, keep],
        )?;
        if session_id.is_none() {
            if let Some(max) = quota.sessions {
                let open: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM sessions WHERE owner = ?1 AND state = 'open'",
                    [owner],
                    |r| r.get(0),
                )?;
                if open as u64 >= max {
                    return Err(StoreError::Quota {
                        agent: owner.to_owned(),
                        what: format!("{open} open sessions"),
                        key: "sessions",
                        limit: max,
                    });
                }
            }
        }

        let latest_disks: HashMap<String, (i64, u64, u64)> = match latest {
            Some(p) if spec.base_point == Some(p) => {
                let mut stmt = tx.prepare(
                    "SELECT name, disk_id, size, block_size FROM point_disks WHERE point_id = ?1",
                )?;
                let rows = stmt.query_map([p], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        (
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)? as u64,
                            r.get::<_, i64>(3)? as u64,
                        ),
                    ))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            }
            _ => HashMap::new(),
        };

        let now = now_us();
        let id = match session_id {
            Some(id) => {
                tx.execute(
                    "UPDATE sessions SET base_point = ?2, created_us = ?3, updated_us = ?3 WHERE id = ?1",
                    params![id, latest, now],
                )?;
                id
            }
            None => {
                let id = new_session_id();
                tx.execute(
                    "INSERT INTO sessions(id, vm_id, owner, base_point, state, created_us, updated_us)
                     VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?5)",
                    params![id, vm_id, owner, latest, now],
                )?;
                id
            }
        };
        let mut modes = Vec::new();
        for (pos, d) in spec.disks.iter().enumerate() {
            let base_disk = latest_disks.get(&d.name).and_then(|&(disk_id, size, bs)| {
                continues(size, bs, &d.geometry).then_some(disk_id)
            });
            tx.execute(
                "INSERT INTO session_disks(session_id, pos, name, size, block_size, base_disk)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    pos as i64,
                    d.name,
                    d.geometry.size as i64,
                    d.geometry.block_size.bytes() as i64,
                    base_disk
                ],
            )?;
            let mode = if base_disk.is_some() {
                DiskMode::Delta
            } else {
                DiskMode::Full
            };
            modes.push((d.name.clone(), mode));
        }
        let heal = crate::verify::heal_list(&tx, vm_id)?;
        tx.commit()?;
        drop(conn);
        // Superseded sessions' staged rows, in bounded steps now that the begin is done.
        for id in dead {
            if let Err(e) = self.drop_staged(&id) {
                tracing::warn!(error = %Chain(&e), "dropping a superseded session's staged rows failed");
            }
        }
        Ok(BeginPlan {
            session: id,
            base_point: latest,
            modes,
            committed_point: None,
            heal,
        })
    }

    /// The hashes among `hashes` that `owner` does not hold. Chunks are stored per owner, so the
    /// answer never depends on other agents' data.
    pub fn missing(
        &self,
        owner: &str,
        session: &str,
        hashes: &[Leaf],
    ) -> Result<Vec<Leaf>, StoreError> {
        if hashes.len() > MAX_QUERY_HASHES {
            return Err(StoreError::TooLarge {
                what: "hashes in one question",
                got: hashes.len(),
                max: MAX_QUERY_HASHES,
            });
        }
        // A reader connection: questions never wait for, or hold up, the writer.
        let conn = self.reader()?;
        open_session(&conn, owner, session)?;
        let mut stmt =
            conn.prepare_cached("SELECT 1 FROM chunks WHERE owner = ?1 AND hash = ?2")?;
        let mut out = Vec::new();
        for h in hashes {
            if h.is_zero() {
                continue;
            }
            if !stmt.exists(params![owner, &h.0[..]])? {
                out.push(*h);
            }
        }
        Ok(out)
    }

    /// Verifies one batch and stages it: see [`Store::verify_batch`] and [`Store::stage_batch`].
    pub fn ingest(
        &self,
        owner: &str,
        session_id: &str,
        entries: Vec<Entry>,
        chunks: Vec<IncomingChunk>,
        writer: &mut PackWriter,
    ) -> Result<BatchStats, StoreError> {
        let batch = self.verify_batch(owner, session_id, entries, chunks)?;
        self.stage_batch(owner, batch, writer)
    }

    /// Checks every entry against its disk and decompresses and hashes every chunk. Writes
    /// nothing, so batches of one stream can be verified while the previous one is written.
    pub fn verify_batch(
        &self,
        owner: &str,
        session_id: &str,
        entries: Vec<Entry>,
        chunks: Vec<IncomingChunk>,
    ) -> Result<VerifiedBatch, StoreError> {
        if entries.len() > MAX_BATCH_ENTRIES {
            return Err(StoreError::TooLarge {
                what: "block entries in one batch",
                got: entries.len(),
                max: MAX_BATCH_ENTRIES,
            });
        }
        // Staging checks the session again in its own transaction.
        let session = open_session(&*self.reader()?, owner, session_id)?;
        // Expected length of each referenced chunk, from the blocks that use it.
        let mut expected: HashMap<Leaf, usize> = HashMap::new();
        for e in &entries {
            let disk = session
                .disks
                .get(e.pos as usize)
                .ok_or(StoreError::NoSuchDisk {
                    pos: e.pos,
                    disks: session.disks.len(),
                })?;
            let len =
                disk.geometry
                    .block_len(e.index)
                    .ok_or_else(|| StoreError::BlockOutOfRange {
                        disk: disk.name.clone(),
                        index: e.index,
                        blocks: disk.geometry.blocks(),
                    })?;
            if !e.leaf.is_zero() {
                expected.entry(e.leaf).or_insert(len);
            }
        }
        let mut verified = Vec::with_capacity(chunks.len());
        for c in chunks {
            let len = *expected
                .get(&c.hash)
                .ok_or(StoreError::UnreferencedChunk(c.hash))?;
            chunk::verify(c.hash, &c.frame, len)?;
            verified.push((c.hash, c.frame, len));
        }
        Ok(VerifiedBatch {
            session_id: session_id.to_owned(),
            session,
            entries,
            chunks: verified,
        })
    }

    /// Makes a verified batch's new chunks durable, then stages its entries in one
    /// transaction. A refused batch changes nothing visible.
    pub fn stage_batch(
        &self,
        owner: &str,
        batch: VerifiedBatch,
        writer: &mut PackWriter,
    ) -> Result<BatchStats, StoreError> {
        self.stage_batches(owner, vec![batch], writer)
    }

    /// Group commit: makes the new chunks of several verified batches durable with one pack
    /// sync, then stages all their entries in one transaction (one catalog sync). A receiver
    /// that falls behind its stream thus pays two syncs per group, not per batch. A refused
    /// batch refuses the group and changes nothing visible.
    pub fn stage_batches(
        &self,
        owner: &str,
        batches: Vec<VerifiedBatch>,
        writer: &mut PackWriter,
    ) -> Result<BatchStats, StoreError> {
        // What the store adds is counted per VM: a group spans one session.
        if batches
            .windows(2)
            .any(|w| w[0].session_id != w[1].session_id)
        {
            let mut total = BatchStats::default();
            for batch in batches {
                let s = self.stage_batches(owner, vec![batch], writer)?;
                total.entries += s.entries;
                total.chunks_stored += s.chunks_stored;
                total.chunk_bytes += s.chunk_bytes;
            }
            return Ok(total);
        }
        let all: Vec<&(Leaf, bytes::Bytes, usize)> =
            batches.iter().flat_map(|b| &b.chunks).collect();
        let (placed, bytes) = self.write_new_chunks(owner, &all, writer)?;
        let stored = placed.len() as u64;
        // Chunks this group placed: indexed and owned once the transaction commits, with the
        // length they were verified at, so their blocks need no catalog lookup. (A re-sent
        // chunk the store already had is looked up: gc may have removed it meanwhile.)
        let sent: HashMap<Leaf, usize> = placed.iter().map(|p| (p.0, p.4)).collect();

        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Self::index_chunks(&tx, owner, &all, &placed)?;
        for full in writer.take_retired() {
            crate::catalog::seal_pack(&tx, full)?;
        }
        let mut entries_total = 0u64;
        for (n, batch) in batches.iter().enumerate() {
            let session_id = batch.session_id.as_str();
            let session = &batch.session;
            // The session may have been committed, or resumed with other disks, by a racing
            // stream while we verified: the entries were checked against the disks of then.
            if n == 0 || batches[n - 1].session_id != batch.session_id {
                let now = open_session(&tx, owner, session_id)?;
                let same = now.disks.len() == session.disks.len()
                    && now
                        .disks
                        .iter()
                        .zip(&session.disks)
                        .all(|(a, b)| a.name == b.name && a.geometry == b.geometry);
                if !same {
                    return Err(StoreError::SessionClosed(names::shown(session_id)));
                }
            }
            let mut held =
                tx.prepare_cached("SELECT ulen FROM chunks WHERE owner = ?1 AND hash = ?2")?;
            let mut stage = tx.prepare_cached(
                "INSERT OR REPLACE INTO session_blocks(session_id, pos, idx, hash)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for e in &batch.entries {
                let disk = &session.disks[e.pos as usize];
                if !e.leaf.is_zero() {
                    let ulen = match sent.get(&e.leaf) {
                        Some(&ulen) => Some(ulen as i64),
                        None => held
                            .query_row(params![owner, &e.leaf.0[..]], |r| r.get(0))
                            .optional()?,
                    };
                    let Some(ulen) = ulen else {
                        return Err(StoreError::ChunkNotHeld {
                            disk: disk.name.clone(),
                            index: e.index,
                            hash: e.leaf,
                        });
                    };
                    let want = disk.geometry.block_len(e.index).unwrap_or(0);
                    if ulen as usize != want {
                        return Err(StoreError::ChunkLength {
                            disk: disk.name.clone(),
                            index: e.index,
                            hash: e.leaf,
                            expected: want,
                            stored: ulen as usize,
                        });
                    }
                }
                stage.execute(params![session_id, e.pos, e.index as i64, &e.leaf.0[..]])?;
            }
            entries_total += batch.entries.len() as u64;
            if n + 1 < batches.len() {
                rewind_proto::faults::point("between-batches");
            }
            tx.execute(
                "UPDATE sessions SET updated_us = ?2 WHERE id = ?1",
                params![session_id, now_us()],
            )?;
        }
        // What this VM's uploads added to the store, for metrics.
        if let Some(first) = batches.first() {
            tx.execute(
                "INSERT INTO vm_stats(vm_id, chunks_stored, bytes_stored) VALUES (?1, ?2, ?3)
                 ON CONFLICT(vm_id) DO UPDATE SET chunks_stored = chunks_stored + excluded.chunks_stored,
                   bytes_stored = bytes_stored + excluded.bytes_stored",
                params![first.session.vm_id, stored as i64, bytes as i64],
            )?;
        }
        tx.commit()?;
        Ok(BatchStats {
            entries: entries_total,
            chunks_stored: stored,
            chunk_bytes: bytes,
        })
    }

    /// Appends the chunks `owner` does not hold yet to a pack and syncs it; the caller indexes
    /// them in the transaction that stages the blocks using them. What other owners hold plays
    /// no part: the work (and so the time) of an upload depends on the uploader's data alone.
    fn write_new_chunks(
        &self,
        owner: &str,
        chunks: &[&(Leaf, bytes::Bytes, usize)],
        writer: &mut PackWriter,
    ) -> Result<(Vec<Placed>, u64), StoreError> {
        if chunks.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let fresh: Vec<&(Leaf, bytes::Bytes, usize)> = {
            let conn = self.conn();
            let mut stmt =
                conn.prepare_cached("SELECT 1 FROM chunks WHERE owner = ?1 AND hash = ?2")?;
            let mut fresh = Vec::new();
            let mut seen = HashSet::new();
            for &c in chunks {
                if seen.insert(c.0) && !stmt.exists(params![owner, &c.0 .0[..]])? {
                    fresh.push(c);
                }
            }
            if let Some(mib) = self.rules().quota(owner).stored_mib {
                let held: i64 = conn
                    .prepare_cached(
                        "SELECT COALESCE(SUM(bytes), 0) FROM owner_usage WHERE owner = ?1",
                    )?
                    .query_row([owner], |r| r.get(0))?;
                let adding: u64 = fresh.iter().map(|c| c.1.len() as u64).sum();
                if held.max(0) as u64 + adding > mib << 20 {
                    return Err(StoreError::Quota {
                        agent: owner.to_owned(),
                        what: format!(
                            "{} MiB stored, {} MiB more sent",
                            held >> 20,
                            adding.div_ceil(1 << 20)
                        ),
                        key: "stored_mib",
                        limit: mib,
                    });
                }
            }
            fresh
        };
        let mut placed = Vec::with_capacity(fresh.len());
        let mut bytes = 0u64;
        for (hash, frame, ulen) in fresh {
            if writer.needs_pack() {
                let id = crate::catalog::new_pack(&self.conn(), "serve")?;
                writer.open_pack(id)?;
            }
            let (pack, offset) = writer.append(hash, frame)?;
            bytes += frame.len() as u64;
            placed.push((*hash, pack, offset, frame.len(), *ulen));
        }
        // Durable before referenced.
        writer.sync()?;
        rewind_proto::faults::point("after-pack-sync");
        Ok((placed, bytes))
    }

    /// Indexes placed chunks and renews the gc grace of re-sent ones, inside the caller's
    /// transaction (the one that also stages the blocks using them, so gc never sees them
    /// unreferenced).
    fn index_chunks(
        tx: &Transaction<'_>,
        owner: &str,
        sent: &[&(Leaf, bytes::Bytes, usize)],
        placed: &[Placed],
    ) -> Result<(), StoreError> {
        let now = now_us();
        // Chunks placed now are indexed with `now` below; only re-sent ones need renewing.
        let new: HashSet<Leaf> = placed.iter().map(|p| p.0).collect();
        let mut touch =
            tx.prepare_cached("UPDATE chunks SET created_us = ?3 WHERE owner = ?1 AND hash = ?2")?;
        for (hash, _, _) in sent {
            if !new.contains(hash) {
                touch.execute(params![owner, &hash.0[..], now])?;
            }
        }
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO chunks(owner, hash, pack_id, offset, clen, ulen, created_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let any_bad: bool = tx
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM bad_chunks WHERE owner = ?1)")?
            .query_row([owner], |r| r.get(0))?;
        if any_bad {
            let mut healed =
                tx.prepare_cached("DELETE FROM bad_chunks WHERE owner = ?1 AND hash = ?2")?;
            for (hash, _, _, _, _) in placed {
                if healed.execute(params![owner, &hash.0[..]])? > 0 {
                    tracing::info!(chunk = %hash, "damaged chunk healed");
                }
            }
        }
        // What the owner now holds more, for its storage quota (a row a racing stream of the
        // same owner inserted first is not counted twice).
        let (mut added, mut bytes) = (0i64, 0i64);
        for (hash, pack, offset, clen, ulen) in placed {
            let n = ins.execute(params![
                owner,
                &hash.0[..],
                pack,
                *offset as i64,
                *clen as i64,
                *ulen as i64,
                now
            ])?;
            if n > 0 {
                added += 1;
                bytes += *clen as i64;
            }
        }
        if added > 0 {
            crate::catalog::add_usage(tx, owner, added, bytes)?;
        }
        Ok(())
    }

    /// Seals the pack an upload stream was writing, once the stream ended.
    pub fn finish_upload(&self, writer: &mut PackWriter) -> Result<(), StoreError> {
        let conn = self.conn();
        for id in writer.take_retired().into_iter().chain(writer.current()) {
            crate::catalog::seal_pack(&conn, id)?;
        }
        Ok(())
    }

    /// Makes the session a point if, for every disk, the root recomputed from the stored nodes
    /// equals the agent's. Either the whole point becomes visible, or nothing does.
    ///
    /// A session of up to [`WHOLE_COMMIT_MAX`] staged blocks commits in one transaction. A larger
    /// one writes its nodes in transactions of bounded size first (see [`Store::commit_in_steps`]),
    /// so one agent's huge commit never holds the catalog's writer for long.
    pub fn commit(
        &self,
        owner: &str,
        session_id: &str,
        roots: &[(String, Leaf)],
        meta: &PointMeta,
    ) -> Result<Committed, StoreError> {
        let (config, consistency) = meta.validate()?;
        let vm_id = open_session(&self.conn(), owner, session_id)?.vm_id;
        // One commit of a VM at a time: a stepped commit's nodes exist before its point does,
        // and no other point of the VM may commit over them. A second commit of the VM is
        // refused rather than parked on a thread.
        let lock = self.vm_lock(vm_id);
        let _held = match lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(StoreError::CommitRunning(names::shown(session_id)))
            }
        };
        // Whatever an earlier stepped commit of the VM left goes first: no commit starts while
        // such nodes exist.
        self.forget_pending(Some(vm_id))?;
        // The cost of one transaction grows with the staged rows and with the level-1 nodes
        // they touch (each reads its 256 children): past either bound, commit in steps.
        let large: bool = self
            .conn()
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM session_blocks WHERE session_id = ?1 LIMIT 1 OFFSET ?2)
                   OR (SELECT COUNT(DISTINCT idx / 256) FROM session_blocks WHERE session_id = ?1) > ?3",
            )?
            .query_row(
                params![session_id, WHOLE_COMMIT_MAX as i64, WHOLE_COMMIT_PARENTS as i64],
                |r| r.get(0),
            )?;
        let meta = (config, consistency);
        if large {
            self.commit_in_steps(owner, session_id, roots, meta)
        } else {
            self.commit_whole(owner, session_id, roots, meta)
        }
    }

    fn commit_whole(
        &self,
        owner: &str,
        session_id: &str,
        roots: &[(String, Leaf)],
        (config, consistency): (Option<&str>, &str),
    ) -> Result<Committed, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (session, agent_roots, created) = commit_checks(&tx, owner, session_id, roots)?;
        let point = new_point_id(&tx, session.base_point)?;
        let mut tops = Vec::new();
        for (pos, disk) in session.disks.iter().enumerate() {
            let disk_id = disk_row(&tx, &session, disk)?;
            let edge = grown_edge(&tx, &session, disk)?;
            let (changed, top, _) =
                write_leaves(&tx, session_id, pos, disk, disk_id, point, -1, None, edge)?;
            tops.push((disk_id, top, changed));
        }
        record_point(
            &tx,
            &session,
            session_id,
            point,
            created,
            &agent_roots,
            &tops,
            (config, consistency),
        )?;
        tx.execute(
            "DELETE FROM session_blocks WHERE session_id = ?1",
            [session_id],
        )?;
        tx.commit()?;
        Ok(Committed {
            point,
            created: rfc3339(created),
        })
    }

    /// A large commit in steps, none of which holds the catalog's writer for long:
    /// 1. reserve the point's id and its new disk generations, recorded in `pending_commits`;
    /// 2. write the leaves and the inner nodes above them at that id, a bounded group of
    ///    leaves per transaction (nodes at an id no point has yet are read by nobody: every
    ///    read is of a committed point, and ids only grow within a VM);
    /// 3. one short transaction checks the roots and makes the point visible;
    /// 4. the staged rows are dropped in bounded deletes.
    ///
    /// If step 3 refuses (wrong root, session superseded), or the receiver dies before it, the
    /// nodes written in step 2 are removed (at once, or by [`Store::open`] from the pending
    /// record) before any other point of the VM can commit over them.
    fn commit_in_steps(
        &self,
        owner: &str,
        session_id: &str,
        roots: &[(String, Leaf)],
        meta: (Option<&str>, &str),
    ) -> Result<Committed, StoreError> {
        let (session, point, disk_ids) = {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (session, _, _) = commit_checks(&tx, owner, session_id, roots)?;
            let point = new_point_id(&tx, session.base_point)?;
            let mut ids = Vec::new();
            for disk in &session.disks {
                ids.push(disk_row(&tx, &session, disk)?);
            }
            let new_generations: Vec<i64> = session
                .disks
                .iter()
                .zip(&ids)
                .filter(|(d, _)| d.base_disk.is_none())
                .map(|(_, id)| *id)
                .collect();
            tx.execute(
                "INSERT INTO pending_commits(session_id, vm_id, point, disks, new_disks)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    session_id,
                    session.vm_id,
                    point,
                    serde_json::to_string(&ids).unwrap_or_default(),
                    serde_json::to_string(&new_generations).unwrap_or_default()
                ],
            )?;
            tx.commit()?;
            (session, point, ids)
        };
        let done = (|| {
            let mut tops = Vec::new();
            for (pos, disk) in session.disks.iter().enumerate() {
                let disk_id = disk_ids[pos];
                let mut edge = grown_edge(&self.conn(), &session, disk)?;
                let (mut changed, mut after) = (0, -1i64);
                let top = loop {
                    let mut conn = self.conn();
                    let tx =
                        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let (n, top, last) = write_leaves(
                        &tx,
                        session_id,
                        pos,
                        disk,
                        disk_id,
                        point,
                        after,
                        Some(COMMIT_STEP_PARENTS),
                        edge.take(),
                    )?;
                    tx.commit()?;
                    // Another agent's write waiting for the writer goes next.
                    parking_lot::MutexGuard::unlock_fair(conn);
                    rewind_proto::faults::point("commit-between-steps");
                    changed += n;
                    match last {
                        Some(l) => after = l as i64,
                        None => break top,
                    }
                };
                tops.push((disk_id, top, changed));
            }
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (session, agent_roots, created) = commit_checks(&tx, owner, session_id, roots)?;
            record_point(
                &tx,
                &session,
                session_id,
                point,
                created,
                &agent_roots,
                &tops,
                meta,
            )?;
            // The record of the steps must still be there: had anything removed it (and so
            // the nodes written under it), the point would be missing blocks.
            let n = tx.execute(
                "DELETE FROM pending_commits WHERE session_id = ?1 AND point = ?2",
                params![session_id, point],
            )?;
            if n != 1 {
                return Err(StoreError::CommitRunning(names::shown(session_id)));
            }
            tx.commit()?;
            Ok(Committed {
                point,
                created: rfc3339(created),
            })
        })();
        match done {
            Ok(c) => {
                // The point is committed: a failure to drop the staged rows now only leaves
                // them for the next start.
                if let Err(e) = self.drop_staged(session_id) {
                    tracing::warn!(error = %Chain(&e), "dropping a committed session's staged rows failed");
                }
                Ok(c)
            }
            Err(e) => {
                // Under the VM's lock: if this fails, the next commit of the VM retries it
                // before it starts (and refuses to start while it fails).
                if let Err(undo) = self.forget_pending(Some(session.vm_id)) {
                    tracing::error!(error = %Chain(&undo), "removing the nodes of a refused commit failed; the VM's next commit removes them first");
                }
                Err(e)
            }
        }
    }

    /// Removes, in bounded steps, what stepped commits of `vm_id` (or of every VM) left before
    /// their point existed.
    pub fn forget_pending(&self, vm_id: Option<i64>) -> Result<(), StoreError> {
        loop {
            let mut conn = self.conn();
            let more = forget_pending_step(&mut conn, vm_id)?;
            parking_lot::MutexGuard::unlock_fair(conn);
            if !more {
                return Ok(());
            }
        }
    }

    /// The lock that serialises the commits of one VM.
    fn vm_lock(&self, vm_id: i64) -> std::sync::Arc<std::sync::Mutex<()>> {
        self.commit_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vm_id)
            .or_default()
            .clone()
    }

    /// Drops a session's staged rows, a bounded delete per transaction.
    pub fn drop_staged(&self, session_id: &str) -> Result<(), StoreError> {
        loop {
            let conn = self.conn();
            let n = conn
                .prepare_cached(
                    "DELETE FROM session_blocks WHERE session_id = ?1 AND (pos, idx) IN
                       (SELECT pos, idx FROM session_blocks WHERE session_id = ?1 LIMIT ?2)",
                )?
                .execute(params![session_id, STAGED_DELETE_STEP as i64])?;
            parking_lot::MutexGuard::unlock_fair(conn);
            if n < STAGED_DELETE_STEP {
                return Ok(());
            }
        }
    }

    /// Where a session of `owner` stands.
    pub fn session_state(&self, owner: &str, session_id: &str) -> Result<SessionState, StoreError> {
        let conn = self.reader()?;
        let row: Option<(String, String, Option<i64>)> = conn
            .query_row(
                "SELECT owner, state, point_id FROM sessions WHERE id = ?1",
                [session_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(match row {
            Some((o, state, point)) if o == owner => match (state.as_str(), point) {
                ("committed", Some(p)) => SessionState::Committed(p),
                ("open", _) => SessionState::Open,
                _ => SessionState::Unknown,
            },
            _ => SessionState::Unknown,
        })
    }
}

/// Most staged blocks committed in one transaction; larger sessions commit in steps.
pub const WHOLE_COMMIT_MAX: usize = 65_536;
/// Most level-1 nodes one transaction's commit recomputes (each reads its 256 children); a
/// session touching more commits in steps, however few its blocks.
pub const WHOLE_COMMIT_PARENTS: usize = 1024;
/// Most level-1 nodes one step of a stepped commit recomputes (each reads up to 256 leaves):
/// a step writes at most 16 Ki leaves before other writers get a turn. (With 256, an honest
/// sync beside a 2 M-block commit took 1.1-1.3 s instead of 0.3-0.5 s, for the same total.)
const COMMIT_STEP_PARENTS: usize = 64;
/// Staged rows dropped per transaction.
const STAGED_DELETE_STEP: usize = 16_384;

/// The checks every commit makes in its final transaction: the session is the caller's and
/// open, its base is still the VM's newest point, and the roots name exactly its disks.
/// Returns the session, the agent's roots by disk and when the session was created.
fn commit_checks<'a>(
    conn: &Connection,
    owner: &str,
    session_id: &str,
    roots: &'a [(String, Leaf)],
) -> Result<(Session, HashMap<&'a str, Leaf>, i64), StoreError> {
    let session = open_session(conn, owner, session_id)?;
    let latest = latest_point(conn, session.vm_id)?;
    if latest != session.base_point {
        return Err(StoreError::BaseMoved {
            vm: session.vm.clone(),
            expected: session.base_point.unwrap_or(0),
            actual: latest.unwrap_or(0),
        });
    }
    let mut agent_roots: HashMap<&str, Leaf> = HashMap::new();
    for (name, root) in roots {
        if !session.disks.iter().any(|d| &d.name == name) {
            return Err(StoreError::RootSet(names::shown(name)));
        }
        agent_roots.insert(name.as_str(), *root);
    }
    for d in &session.disks {
        if !agent_roots.contains_key(d.name.as_str()) {
            return Err(StoreError::RootSet(d.name.clone()));
        }
    }
    let created: i64 = conn.query_row(
        "SELECT created_us FROM sessions WHERE id = ?1",
        [session_id],
        |r| r.get(0),
    )?;
    Ok((session, agent_roots, created))
}

/// Whether a disk of `geometry` continues the base point's disk of `size` and `block_size` as
/// a delta: the same geometry, or a disk grown online from a whole number of blocks (its old
/// blocks keep their indexes and leaves; the new area is zeros until written, and the commit
/// recomputes the old right edge of the tree, see [`grown_edge`]). Any other change (a
/// shrink, a new block size, growth from a partial last block, whose leaf would change
/// without a write) starts a new disk generation: a full read that sends only unknown chunks.
fn continues(size: u64, block_size: u64, geometry: &DiskGeometry) -> bool {
    let bs = geometry.block_size.bytes();
    block_size == bs
        && (size == geometry.size || (size < geometry.size && bs > 0 && size.is_multiple_of(bs)))
}

/// For a disk that grew since the session's base point, the old last leaf's index: its path to
/// the top is where the tree's shape changed (right-edge nodes gained children, new levels
/// above the old top), so the commit recomputes it even when no block there was written.
fn grown_edge(
    conn: &Connection,
    session: &Session,
    disk: &SessionDisk,
) -> rusqlite::Result<Option<u64>> {
    let (Some(base), Some(_)) = (session.base_point, disk.base_disk) else {
        return Ok(None);
    };
    let old: Option<i64> = conn
        .query_row(
            "SELECT size FROM point_disks WHERE point_id = ?1 AND name = ?2",
            params![base, disk.name],
            |r| r.get(0),
        )
        .optional()?;
    let bs = disk.geometry.block_size.bytes();
    Ok(match old {
        Some(old) if (old as u64) < disk.geometry.size && old > 0 => {
            Some((old as u64).div_ceil(bs) - 1)
        }
        _ => None,
    })
}

/// The disk generation a session's disk writes to: its base's, or a new one.
fn disk_row(conn: &Connection, session: &Session, disk: &SessionDisk) -> rusqlite::Result<i64> {
    match disk.base_disk {
        Some(id) => Ok(id),
        None => {
            conn.execute(
                "INSERT INTO disks(vm_id, name, size, block_size) VALUES (?1, ?2, ?3, ?4)",
                params![
                    session.vm_id,
                    disk.name,
                    disk.geometry.size as i64,
                    disk.geometry.block_size.bytes() as i64
                ],
            )?;
            Ok(conn.last_insert_rowid())
        }
    }
}

/// Writes the staged leaves of disk `pos` after block `after` as nodes at `point`, and the
/// inner nodes above them. With `max_parents`, stops before the leaves of the group would
/// touch more than that many level-1 nodes. Returns the leaves written, the tree's top after
/// them, and the last block written (None: no leaf was left). `edge`, a leaf whose path to the
/// top is recomputed although it was not written (see [`grown_edge`]).
#[allow(clippy::too_many_arguments)]
fn write_leaves(
    conn: &Connection,
    session_id: &str,
    pos: usize,
    disk: &SessionDisk,
    disk_id: i64,
    point: i64,
    after: i64,
    max_parents: Option<usize>,
    edge: Option<u64>,
) -> Result<(usize, Leaf, Option<u64>), StoreError> {
    let limit = max_parents.map_or(-1, |p| (p as i64) * tree_fanout());
    let idxs: Vec<u64> = {
        let mut stmt = conn.prepare_cached(
            "SELECT idx FROM session_blocks WHERE session_id = ?1 AND pos = ?2 AND idx > ?3
             ORDER BY idx LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![session_id, pos as i64, after, limit], |r| {
            r.get::<_, i64>(0)
        })?;
        rows.map(|r| r.map(|i| i as u64))
            .collect::<rusqlite::Result<_>>()?
    };
    let mut group = idxs;
    if let Some(max) = max_parents {
        let fanout = tree_fanout() as u64;
        let mut parents = 0;
        let mut last_parent = None;
        let cut = group.iter().position(|&i| {
            if last_parent != Some(i / fanout) {
                last_parent = Some(i / fanout);
                parents += 1;
            }
            parents > max
        });
        if let Some(c) = cut {
            group.truncate(c);
        }
    }
    let last = group.last().copied();
    let changed = match last {
        Some(l) => conn
            .prepare_cached(
                "INSERT OR REPLACE INTO nodes(disk_id, level, idx, point, hash)
                 SELECT ?1, 0, idx, ?2, CASE WHEN hash = zeroblob(32) THEN NULL ELSE hash END
                 FROM session_blocks WHERE session_id = ?3 AND pos = ?4 AND idx > ?5 AND idx <= ?6",
            )?
            .execute(params![
                disk_id, point, session_id, pos as i64, after, l as i64
            ])?,
        None => 0,
    };
    let mut nodes = SqlNodes {
        conn,
        disk_id,
        point,
    };
    let top = tree::update(
        Shape::of(&disk.geometry),
        group.into_iter().chain(edge),
        &mut nodes,
    )?;
    Ok((changed, top, last))
}

fn tree_fanout() -> i64 {
    rewind_proto::format::TREE_FANOUT as i64
}

/// Checks each disk's recomputed root against the agent's and makes the point visible: its
/// row, its disks, and the session marked committed.
#[allow(clippy::too_many_arguments)]
fn record_point(
    conn: &Connection,
    session: &Session,
    session_id: &str,
    point: i64,
    created: i64,
    agent_roots: &HashMap<&str, Leaf>,
    tops: &[(i64, Leaf, usize)],
    (config, consistency): (Option<&str>, &str),
) -> Result<(), StoreError> {
    // Point times never go backwards within a VM, whatever the clock did since the last point
    // (see crate::clock): listings, retention and `--at` keep the order points were taken in.
    let previous: Option<i64> = conn.query_row(
        "SELECT MAX(created_us) FROM points WHERE vm_id = ?1",
        [session.vm_id],
        |r| r.get(0),
    )?;
    let created = match previous {
        Some(p) if created <= p => {
            tracing::warn!(
                vm = %session.vm,
                behind_seconds = (p - created) as f64 / 1e6,
                "the clock is behind the VM's newest point (stepped back?): the new point is \
                 dated just after it"
            );
            p + 1
        }
        _ => created,
    };
    conn.execute(
        "INSERT INTO points(id, vm_id, parent, created_us, committed_us, session, consistency, config)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            point,
            session.vm_id,
            session.base_point,
            created,
            now_us(),
            session_id,
            consistency,
            config
        ],
    )?;
    for (disk, &(disk_id, top, changed)) in session.disks.iter().zip(tops) {
        let root = tree::root(&disk.geometry, top);
        let agent = agent_roots
            .get(disk.name.as_str())
            .copied()
            .ok_or_else(|| StoreError::RootSet(disk.name.clone()))?;
        if root != agent {
            return Err(StoreError::RootMismatch {
                disk: disk.name.clone(),
                agent,
                stored: root,
            });
        }
        conn.execute(
            "INSERT INTO point_disks(point_id, name, disk_id, size, block_size, root, changed_blocks)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                point,
                disk.name,
                disk_id,
                disk.geometry.size as i64,
                disk.geometry.block_size.bytes() as i64,
                &root.0[..],
                changed as i64
            ],
        )?;
    }
    conn.execute(
        "UPDATE sessions SET state = 'committed', point_id = ?2, updated_us = ?3 WHERE id = ?1",
        params![session_id, point, now_us()],
    )?;
    Ok(())
}

/// Node rows one cleanup step deletes.
const CLEANUP_STEP: i64 = 16_384;

/// One bounded step of removing what stepped commits (of VM `vm_id`, or of any VM) wrote before
/// their point existed: nodes at the reserved id, then the disk generations they created, then
/// the pending record. Returns whether any pending record is left. A record whose point was
/// committed (same id and session) only loses the record.
pub fn forget_pending_step(conn: &mut Connection, vm_id: Option<i64>) -> Result<bool, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let row: Option<(String, i64, String, String)> = tx
        .query_row(
            "SELECT session_id, point, disks, new_disks FROM pending_commits
             WHERE ?1 IS NULL OR vm_id = ?1 LIMIT 1",
            [vm_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((session, point, disks, new_disks)) = row else {
        return Ok(false);
    };
    let disks: Vec<i64> = serde_json::from_str(&disks).unwrap_or_default();
    let new_disks: Vec<i64> = serde_json::from_str(&new_disks).unwrap_or_default();
    let committed: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM points WHERE id = ?1 AND session = ?2)",
        params![point, session],
        |r| r.get(0),
    )?;
    let mut deleted = 0;
    if !committed {
        for d in &disks {
            deleted += tx
                .prepare_cached(
                    "DELETE FROM nodes WHERE (disk_id, level, idx, point) IN
                       (SELECT disk_id, level, idx, point FROM nodes
                        WHERE disk_id = ?1 AND point = ?2 LIMIT ?3)",
                )?
                .execute(params![d, point, CLEANUP_STEP])?;
        }
    }
    if deleted == 0 {
        if !committed {
            for d in &new_disks {
                tx.execute(
                    "DELETE FROM disks WHERE id = ?1 AND NOT EXISTS
                       (SELECT 1 FROM point_disks WHERE disk_id = ?1)",
                    [d],
                )?;
            }
        }
        tx.execute(
            "DELETE FROM pending_commits WHERE session_id = ?1",
            [&session],
        )?;
    }
    tx.commit()?;
    Ok(true)
}

/// The versioned nodes of one disk at one point, as the tree update reads and writes them.
struct SqlNodes<'a> {
    conn: &'a Connection,
    disk_id: i64,
    point: i64,
}

impl NodeStore for SqlNodes<'_> {
    type Error = StoreError;

    fn children(
        &mut self,
        level: u32,
        first: u64,
        end: u64,
    ) -> Result<Vec<(u64, Leaf)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT idx, hash, MAX(point) FROM nodes
             WHERE disk_id = ?1 AND level = ?2 AND idx >= ?3 AND idx < ?4 AND point <= ?5
             GROUP BY idx",
        )?;
        let rows = stmt.query_map(
            params![self.disk_id, level, first as i64, end as i64, self.point],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?)),
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, hash) = row?;
            if let Some(h) = hash {
                out.push((idx as u64, Leaf::from_slice(&h)?));
            }
        }
        Ok(out)
    }

    fn put(&mut self, level: u32, index: u64, value: Leaf) -> Result<(), StoreError> {
        let hash = (!value.is_zero()).then_some(&value.0[..]);
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO nodes(disk_id, level, idx, point, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![self.disk_id, level, index as i64, self.point, hash])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8) -> (Leaf, IncomingChunk) {
        let data = vec![byte; 4096];
        let hash = Leaf::of(&data);
        let frame = chunk::compress(&data).expect("compress");
        (
            hash,
            IncomingChunk {
                hash,
                frame: frame.into(),
            },
        )
    }

    fn entry(index: u64, leaf: Leaf) -> Entry {
        Entry {
            pos: 0,
            index,
            leaf,
        }
    }

    fn staged(store: &Store, session: &str) -> i64 {
        store
            .conn()
            .query_row(
                "SELECT count(*) FROM session_blocks WHERE session_id = ?1",
                [session],
                |r| r.get(0),
            )
            .expect("count")
    }

    fn open() -> (tempfile::TempDir, Store, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let spec = BeginSpec {
            vm: "vm".into(),
            disks: vec![DiskSpec {
                name: "vda".into(),
                geometry: DiskGeometry::new(16 * 4096, 4096).expect("geometry"),
            }],
            base_point: None,
            resume: None,
        };
        let session = store.begin("agent", &spec).expect("begin").session;
        (dir, store, session)
    }

    #[test]
    fn a_group_stages_blocks_using_chunks_sent_by_another_batch_of_it() {
        let (_dir, store, session) = open();
        let (a, ca) = block(1);
        let (b, cb) = block(2);
        let first = store
            .verify_batch(
                "agent",
                &session,
                vec![entry(0, a), entry(1, b)],
                vec![ca, cb],
            )
            .expect("verify first");
        // The second batch only refers to chunks the first one sends.
        let second = store
            .verify_batch("agent", &session, vec![entry(2, a), entry(3, b)], vec![])
            .expect("verify second");
        let mut w = PackWriter::new(&store.packs_dir());
        let stats = store
            .stage_batches("agent", vec![first, second], &mut w)
            .expect("stage");
        assert_eq!((stats.entries, stats.chunks_stored), (4, 2));
        assert_eq!(staged(&store, &session), 4);
    }

    /// Stages `leaves` (index -> leaf) for a session of a `blocks`-block disk of 4 KiB blocks,
    /// in batches of at most MAX_BATCH_ENTRIES, sending the chunks with the first batch.
    fn stage_all(store: &Store, session: &str, leaves: &[(u64, Leaf)], chunks: Vec<IncomingChunk>) {
        let mut chunks = Some(chunks);
        let mut w = PackWriter::new(&store.packs_dir());
        for part in leaves.chunks(MAX_BATCH_ENTRIES) {
            let entries = part.iter().map(|&(i, l)| entry(i, l)).collect();
            let b = store
                .verify_batch("agent", session, entries, chunks.take().unwrap_or_default())
                .expect("verify");
            store
                .stage_batches("agent", vec![b], &mut w)
                .expect("stage");
        }
        store.finish_upload(&mut w).expect("finish");
    }

    fn reference_root(geometry: &DiskGeometry, leaves: &[(u64, Leaf)]) -> Leaf {
        let mut b = tree::Builder::new(Shape::of(geometry));
        let mut next = 0;
        for &(i, l) in leaves {
            b.push_zeros(i - next);
            b.push(l);
            next = i + 1;
        }
        tree::root(geometry, b.finish())
    }

    fn nodes_at(store: &Store, point: i64) -> i64 {
        store
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM nodes WHERE point = ?1",
                [point],
                |r| r.get(0),
            )
            .expect("count")
    }

    #[test]
    fn a_large_session_commits_in_steps_to_the_same_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let blocks = 600_000u64;
        let geometry = DiskGeometry::new(blocks * 4096, 4096).expect("geometry");
        let spec = BeginSpec {
            vm: "vm".into(),
            disks: vec![DiskSpec {
                name: "vda".into(),
                geometry,
            }],
            base_point: None,
            resume: None,
        };
        let (a, ca) = block(1);
        let (b, cb) = block(2);
        // A dense run, then scattered blocks (one per level-1 node: the costly shape).
        let mut leaves: Vec<(u64, Leaf)> = (0..70_000)
            .map(|i| (i, if i % 3 == 0 { b } else { a }))
            .collect();
        leaves.extend((300..2_000).map(|k| (k * 256 + 7, a)));
        let root = reference_root(&geometry, &leaves);

        // A wrong root: refused, and nothing of the steps stays behind.
        let session = store.begin("agent", &spec).expect("begin").session;
        stage_all(&store, &session, &leaves, vec![ca.clone(), cb.clone()]);
        let before: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM nodes", [], |r| r.get(0))
            .expect("count");
        let err = store
            .commit(
                "agent",
                &session,
                &[("vda".into(), Leaf([9; 32]))],
                &PointMeta::default(),
            )
            .expect_err("wrong root");
        assert!(matches!(err, StoreError::RootMismatch { .. }), "{err}");
        let after: i64 = store
            .conn()
            .query_row(
                "SELECT (SELECT COUNT(*) FROM nodes) + (SELECT COUNT(*) FROM pending_commits)
                   + (SELECT COUNT(*) FROM disks) + (SELECT COUNT(*) FROM points)",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(after, before, "a refused stepped commit leaves nothing");

        // The right root commits, and the point holds exactly the staged leaves.
        let done = store
            .commit(
                "agent",
                &session,
                &[("vda".into(), root)],
                &PointMeta::default(),
            )
            .expect("commit in steps");
        assert_eq!(staged(&store, &session), 0, "staged rows dropped");
        let mut got = Vec::new();
        let mut start = 0;
        loop {
            let page = store
                .point_leaves("agent", "vm", done.point, "vda", start, 65_536)
                .expect("leaves");
            assert_eq!(page.root, root);
            got.extend(page.leaves);
            match page.next {
                Some(n) => start = n,
                None => break,
            }
        }
        assert_eq!(got, leaves);
        let pending: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM pending_commits", [], |r| r.get(0))
            .expect("count");
        assert_eq!(pending, 0);
    }

    /// A disk that grew since its base continues the same generation; in one transaction or
    /// in steps, the commit recomputes the old right edge and the root is the grown disk's.
    #[test]
    fn a_grown_disk_commits_as_a_delta_whole_and_in_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let spec = |blocks: u64, base: Option<i64>| BeginSpec {
            vm: "vm".into(),
            disks: vec![DiskSpec {
                name: "vda".into(),
                geometry: DiskGeometry::new(blocks * 4096, 4096).expect("geometry"),
            }],
            base_point: base,
            resume: None,
        };
        let (a, ca) = block(1);
        let (b, cb) = block(2);
        let mut leaves: Vec<(u64, Leaf)> = (0..300).map(|i| (i, a)).collect();
        let mut base = None;
        for (blocks, new, chunks) in [
            (300u64, leaves.clone(), vec![ca]),
            // Grown, nothing written: only the edge changes the tree.
            (1_000, Vec::new(), Vec::new()),
            // Grown past a stepped commit's size, with writes old and new.
            (
                600_000,
                (0..70_000u64)
                    .map(|i| (i * 8 + 5, b))
                    .chain([(17, b)])
                    .collect(),
                vec![cb],
            ),
        ] {
            let plan = store.begin("agent", &spec(blocks, base)).expect("begin");
            let want = if base.is_some() {
                DiskMode::Delta
            } else {
                DiskMode::Full
            };
            assert_eq!(
                plan.modes,
                vec![("vda".to_owned(), want)],
                "{blocks} blocks"
            );
            let mut staged_now = new.clone();
            staged_now.sort_by_key(|&(i, _)| i);
            stage_all(&store, &plan.session, &staged_now, chunks);
            for (i, l) in new {
                match leaves.binary_search_by_key(&i, |&(j, _)| j) {
                    Ok(k) => leaves[k].1 = l,
                    Err(k) => leaves.insert(k, (i, l)),
                }
            }
            let geometry = spec(blocks, None).disks[0].geometry;
            let root = reference_root(&geometry, &leaves);
            let done = store
                .commit(
                    "agent",
                    &plan.session,
                    &[("vda".into(), root)],
                    &PointMeta::default(),
                )
                .unwrap_or_else(|e| panic!("{blocks} blocks: {e}"));
            base = Some(done.point);
        }
        let disks: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM disks", [], |r| r.get(0))
            .expect("count");
        assert_eq!(disks, 1, "one disk generation for the whole chain");
        // A shrink starts a new generation.
        let plan = store.begin("agent", &spec(500, base)).expect("begin");
        assert_eq!(plan.modes, vec![("vda".to_owned(), DiskMode::Full)]);
    }

    #[test]
    fn a_commit_first_removes_what_an_earlier_stepped_commit_of_its_vm_left() {
        let (_dir, store, s1) = open();
        let geometry = DiskGeometry::new(16 * 4096, 4096).expect("geometry");
        let (a, ca) = block(1);
        let first = vec![(0, a)];
        stage_all(&store, &s1, &first, vec![ca]);
        let p1 = store
            .commit(
                "agent",
                &s1,
                &[("vda".into(), reference_root(&geometry, &first))],
                &PointMeta::default(),
            )
            .expect("first point")
            .point;
        // A stepped commit that failed and could not clean up: its nodes at the next id.
        let (b, _) = block(2);
        {
            let conn = store.conn();
            let disk: i64 = conn
                .query_row(
                    "SELECT disk_id FROM point_disks WHERE point_id = ?1",
                    [p1],
                    |r| r.get(0),
                )
                .expect("disk");
            for idx in 0..16 {
                conn.execute(
                    "INSERT INTO nodes(disk_id, level, idx, point, hash) VALUES (?1, 0, ?2, ?3, ?4)",
                    params![disk, idx, p1 + 1, &b.0[..]],
                )
                .expect("orphan");
            }
            conn.execute(
                "INSERT INTO pending_commits(session_id, vm_id, point, disks, new_disks)
                 VALUES ('gone', 1, ?1, ?2, '[]')",
                params![p1 + 1, format!("[{disk}]")],
            )
            .expect("pending");
        }
        let spec = BeginSpec {
            vm: "vm".into(),
            disks: vec![DiskSpec {
                name: "vda".into(),
                geometry,
            }],
            base_point: Some(p1),
            resume: None,
        };
        let s2 = store.begin("agent", &spec).expect("begin").session;
        let second = vec![(1, a)];
        stage_all(&store, &s2, &second, vec![]);
        let both = vec![(0, a), (1, a)];
        store
            .commit(
                "agent",
                &s2,
                &[("vda".into(), reference_root(&geometry, &both))],
                &PointMeta::default(),
            )
            .expect("the orphans are gone before the commit reads its tree");
        let orphans: i64 = store
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM nodes WHERE hash = ?1",
                [&b.0[..]],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(orphans, 0);
    }

    #[test]
    fn nodes_of_a_commit_cut_short_are_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, point) = {
            let store = Store::open(dir.path()).expect("store");
            let conn = store.conn();
            conn.execute_batch(
                "INSERT INTO vms(id, name, owner, created_us) VALUES (1, 'vm', 'agent', 1);
                 INSERT INTO disks(id, vm_id, name, size, block_size) VALUES (7, 1, 'vda', 8192, 4096);
                 INSERT INTO nodes(disk_id, level, idx, point, hash) VALUES (7, 0, 0, 42, x'01'), (7, 1, 0, 42, x'02');
                 INSERT INTO pending_commits(session_id, vm_id, point, disks, new_disks) VALUES ('s', 1, 42, '[7]', '[7]');",
            )
            .expect("a commit cut short after its steps");
            ((), 42)
        };
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(nodes_at(&store, point), 0);
        let left: i64 = store
            .conn()
            .query_row(
                "SELECT (SELECT COUNT(*) FROM pending_commits) + (SELECT COUNT(*) FROM disks)",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(left, 0);
    }

    #[test]
    fn a_refused_batch_refuses_its_whole_group() {
        let (_dir, store, session) = open();
        let (a, ca) = block(1);
        let (never_sent, _) = block(3);
        let first = store
            .verify_batch("agent", &session, vec![entry(0, a)], vec![ca])
            .expect("verify first");
        let second = store
            .verify_batch("agent", &session, vec![entry(1, never_sent)], vec![])
            .expect("verify second");
        let mut w = PackWriter::new(&store.packs_dir());
        let err = store
            .stage_batches("agent", vec![first, second], &mut w)
            .expect_err("a block whose chunk nobody sent");
        assert!(
            matches!(err, StoreError::ChunkNotHeld { index: 1, hash, .. } if hash == never_sent),
            "{err}"
        );
        assert_eq!(staged(&store, &session), 0);
        let indexed: i64 = store
            .conn()
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .expect("count");
        assert_eq!(indexed, 0, "nothing of the group is visible");
    }
}
