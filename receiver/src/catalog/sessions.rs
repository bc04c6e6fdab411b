//! Upload sessions: their rows, the blocks they staged, and their expiry.

use super::VmId;
use rewind_proto::BlockHash;
use rusqlite::{params, Connection, OptionalExtension};

/// Abandons the open sessions untouched since `before_us`, dropping their staged blocks first;
/// returns how many it abandoned.
pub fn expire(conn: &Connection, before_us: i64) -> rusqlite::Result<u64> {
    conn.execute(
        "DELETE FROM session_blocks WHERE session_id IN
           (SELECT id FROM sessions WHERE state = 'open' AND updated_us < ?1)",
        [before_us],
    )?;
    Ok(conn.execute(
        "UPDATE sessions SET state = 'abandoned' WHERE state = 'open' AND updated_us < ?1",
        [before_us],
    )? as u64)
}

/// Drops the staged blocks of sessions that can never commit (no longer open).
pub fn drop_closed_staged(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM session_blocks WHERE session_id IN
           (SELECT id FROM sessions WHERE state <> 'open')",
        [],
    )
    .map(|_| ())
}

/// A `sessions` row with its VM's name.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub vm_id: VmId,
    pub vm: String,
    pub base_point: Option<i64>,
    /// "open", "committed" or "abandoned".
    pub state: String,
    pub owner: String,
    /// The VM's chunks are sealed with a keyring.
    pub sealed: bool,
}

/// Session `id`, if it exists. Every batch loads its session: the statement stays prepared.
pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<SessionRow>> {
    conn.prepare_cached(
        "SELECT s.vm_id, v.name, s.base_point, s.state, s.owner, v.keyring IS NOT NULL
         FROM sessions s JOIN vms v ON v.id = s.vm_id WHERE s.id = ?1",
    )?
    .query_row([id], |r| {
        Ok(SessionRow {
            vm_id: r.get(0)?,
            vm: r.get(1)?,
            base_point: r.get(2)?,
            state: r.get(3)?,
            owner: r.get(4)?,
            sealed: r.get(5)?,
        })
    })
    .optional()
}

/// A `session_disks` row.
#[derive(Debug, Clone)]
pub struct SessionDiskRow {
    pub name: String,
    pub size: i64,
    pub block_size: i64,
    /// The disk generation this one continues (a delta), if any.
    pub base_disk: Option<i64>,
}

/// The disks of session `id`, in their order.
pub fn disks(conn: &Connection, id: &str) -> rusqlite::Result<Vec<SessionDiskRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, size, block_size, base_disk FROM session_disks
         WHERE session_id = ?1 ORDER BY pos",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok(SessionDiskRow {
            name: r.get(0)?,
            size: r.get(1)?,
            block_size: r.get(2)?,
            base_disk: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// Whether `id` is an open session of `owner` for the VM named `vm`.
pub fn is_open_of(conn: &Connection, id: &str, owner: &str, vm: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sessions s JOIN vms v ON v.id = s.vm_id
             WHERE s.id = ?1 AND s.owner = ?2 AND s.state = 'open' AND v.name = ?3)",
        params![id, owner, vm],
        |r| r.get(0),
    )
}

/// A VM's open sessions: one seek in the index of open sessions, however many finished
/// sessions the VM has.
pub(super) const OPEN_OF_VM: &str = "SELECT id FROM sessions
     WHERE vm_id = ?1 AND state = 'open' AND id <> ?3 AND (?2 IS NULL OR owner = ?2)";

/// The open sessions of a VM (of one owner, if given) other than `keep`.
pub fn open_of_vm(
    conn: &Connection,
    vm_id: VmId,
    owner: Option<&str>,
    keep: &str,
) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(OPEN_OF_VM)?;
    let rows = stmt.query_map(params![vm_id, owner, keep], |r| r.get(0))?;
    rows.collect()
}

/// Abandons every open session of the VM.
pub fn abandon_all_of_vm(conn: &Connection, vm_id: VmId) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE sessions SET state = 'abandoned' WHERE vm_id = ?1 AND state = 'open'",
        [vm_id],
    )
    .map(|_| ())
}

/// Abandons `owner`'s open sessions of the VM other than `keep`.
pub fn abandon_others(
    conn: &Connection,
    vm_id: VmId,
    owner: &str,
    keep: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE sessions SET state = 'abandoned'
         WHERE vm_id = ?1 AND owner = ?2 AND state = 'open' AND id <> ?3",
        params![vm_id, owner, keep],
    )
    .map(|_| ())
}

/// How many sessions `owner` has open.
pub fn open_count(conn: &Connection, owner: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM sessions WHERE owner = ?1 AND state = 'open'",
        [owner],
        |r| r.get(0),
    )
}

/// Where a session ended up.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub owner: String,
    pub state: String,
    pub vm_id: VmId,
    /// The point it committed, once committed.
    pub point_id: Option<i64>,
}

/// Where session `id` stands, if it exists.
pub fn outcome(conn: &Connection, id: &str) -> rusqlite::Result<Option<Outcome>> {
    conn.query_row(
        "SELECT owner, state, vm_id, point_id FROM sessions WHERE id = ?1",
        [id],
        |r| {
            Ok(Outcome {
                owner: r.get(0)?,
                state: r.get(1)?,
                vm_id: r.get(2)?,
                point_id: r.get(3)?,
            })
        },
    )
    .optional()
}

/// Drops what a resumed session staged and its disks: it begins them again.
pub fn restart(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM session_blocks WHERE session_id = ?1", [id])?;
    conn.execute("DELETE FROM session_disks WHERE session_id = ?1", [id])?;
    Ok(())
}

/// Re-dates a resumed session on `base`, as if begun at `now_us`.
pub fn redate(conn: &Connection, id: &str, base: Option<i64>, now_us: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE sessions SET base_point = ?2, created_us = ?3, updated_us = ?3 WHERE id = ?1",
        params![id, base, now_us],
    )
    .map(|_| ())
}

/// Dates session `id` at `created_us` (a copied point keeps its source's creation time; the
/// commit still keeps a VM's points in order).
pub fn set_created(conn: &Connection, id: &str, created_us: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE sessions SET created_us = ?2 WHERE id = ?1",
        params![id, created_us],
    )
    .map(|_| ())
}

/// A new open session.
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    pub id: &'a str,
    pub vm_id: VmId,
    pub owner: &'a str,
    pub base_point: Option<i64>,
    pub now_us: i64,
}

/// Records a new open session.
pub fn insert(conn: &Connection, s: &NewSession<'_>) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO sessions(id, vm_id, owner, base_point, state, created_us, updated_us)
         VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?5)",
        params![s.id, s.vm_id, s.owner, s.base_point, s.now_us],
    )
    .map(|_| ())
}

/// Records disk number `pos` of a session.
pub fn add_disk(
    conn: &Connection,
    session: &str,
    pos: usize,
    d: &SessionDiskRow,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO session_disks(session_id, pos, name, size, block_size, base_disk)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            session,
            pos as i64,
            d.name,
            d.size,
            d.block_size,
            d.base_disk
        ],
    )
    .map(|_| ())
}

/// Stages block entries of sessions, on one statement prepared for a run of them.
pub struct Stager<'c>(rusqlite::CachedStatement<'c>);

impl<'c> Stager<'c> {
    pub fn new(conn: &'c Connection) -> rusqlite::Result<Stager<'c>> {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO session_blocks(session_id, pos, idx, hash)
                 VALUES (?1, ?2, ?3, ?4)",
        )
        .map(Stager)
    }

    /// Stages block `idx` of disk `pos` of `session` as `hash` (zero for an all-zero block).
    pub fn stage(
        &mut self,
        session: &str,
        pos: u32,
        idx: u64,
        hash: &BlockHash,
    ) -> rusqlite::Result<()> {
        self.0
            .execute(params![session, pos, idx as i64, &hash.0[..]])
            .map(|_| ())
    }
}

/// Marks the session as touched at `now_us` (it does not expire then).
pub fn touch(conn: &Connection, id: &str, now_us: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE sessions SET updated_us = ?2 WHERE id = ?1",
        params![id, now_us],
    )
    .map(|_| ())
}

/// Drops up to `step` of the session's staged rows; returns how many it dropped.
pub fn drop_staged_step(conn: &Connection, id: &str, step: usize) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM session_blocks WHERE session_id = ?1 AND (pos, idx) IN
           (SELECT pos, idx FROM session_blocks WHERE session_id = ?1 LIMIT ?2)",
    )?
    .execute(params![id, step as i64])
}

/// Whether the session staged more than `max_rows` rows, or rows under more than
/// `max_parents` level-1 nodes (of 256 leaves): too much for one commit transaction.
pub fn is_large(
    conn: &Connection,
    id: &str,
    max_rows: usize,
    max_parents: usize,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM session_blocks WHERE session_id = ?1 LIMIT 1 OFFSET ?2)
           OR (SELECT COUNT(DISTINCT idx / 256) FROM session_blocks WHERE session_id = ?1) > ?3",
    )?
    .query_row(params![id, max_rows as i64, max_parents as i64], |r| {
        r.get(0)
    })
}

/// Whether a block the session staged refers to a chunk (of `owner`) in a pack not sealed
/// yet: on an object store, a pack not in the bucket yet.
pub fn refers_to_unsealed(conn: &Connection, id: &str, owner: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM session_blocks b
           JOIN chunks c ON c.owner = ?2 AND c.hash = b.hash
           JOIN packs p ON p.id = c.pack_id
          WHERE b.session_id = ?1 AND p.sealed = 0)",
    )?
    .query_row(params![id, owner], |r| r.get(0))
}

/// Drops every row the session staged.
pub fn drop_staged(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM session_blocks WHERE session_id = ?1", [id])
        .map(|_| ())
}

/// When the session began.
pub fn created_us(conn: &Connection, id: &str) -> rusqlite::Result<i64> {
    conn.query_row("SELECT created_us FROM sessions WHERE id = ?1", [id], |r| {
        r.get(0)
    })
}

/// Indexes of disk `pos` the session staged after `after`, in order, at most `limit` (-1: all).
pub fn staged_after(
    conn: &Connection,
    id: &str,
    pos: usize,
    after: i64,
    limit: i64,
) -> rusqlite::Result<Vec<u64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx FROM session_blocks WHERE session_id = ?1 AND pos = ?2 AND idx > ?3
         ORDER BY idx LIMIT ?4",
    )?;
    let rows = stmt.query_map(params![id, pos as i64, after, limit], |r| {
        r.get::<_, i64>(0)
    })?;
    rows.map(|r| r.map(|i| i as u64)).collect()
}

/// Marks the session committed as `point`, at `now_us`.
pub fn mark_committed(
    conn: &Connection,
    id: &str,
    point: i64,
    now_us: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE sessions SET state = 'committed', point_id = ?2, updated_us = ?3 WHERE id = ?1",
        params![id, point, now_us],
    )
    .map(|_| ())
}
