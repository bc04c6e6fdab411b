//! The agent's local state (SQLite under `--state`): for each VM, the last point the receiver
//! committed, the leaves of every disk at that point, the dirty bitmap that continues it, and
//! the session in flight.
//!
//! Ordering rule: the leaves of a new point replace the old ones only after the receiver
//! acknowledged its commit (`apply_pending`); until then they wait in `pending`, so a crash at
//! any instant leaves the state describing a point the receiver really has.
//!
//! Several VMs' cycles (threads of one `run`, or several processes) share the database. Every
//! write transaction starts IMMEDIATE: it takes the write lock before reading, waiting on the
//! busy timeout. A deferred one that read first and then wrote would fail at once with
//! "database is locked" if another writer committed in between (SQLite cannot upgrade a read
//! snapshot that is no longer the newest, and its busy handler does not help).

use rewind_proto::format::DiskGeometry;
use rewind_proto::BlockHash;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

/// The state database's file inside `--state`.
pub const STATE_FILE: &str = "agent.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms(
  vm TEXT PRIMARY KEY,
  base_point INTEGER,
  pending_session TEXT);
CREATE TABLE IF NOT EXISTS disks(
  vm TEXT NOT NULL, disk TEXT NOT NULL, size INTEGER NOT NULL, block_size INTEGER NOT NULL,
  PRIMARY KEY(vm, disk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks(
  vm TEXT NOT NULL, disk TEXT NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
  PRIMARY KEY(vm, disk, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_disks(
  vm TEXT NOT NULL, disk TEXT NOT NULL, size INTEGER NOT NULL, block_size INTEGER NOT NULL,
  full INTEGER NOT NULL,
  PRIMARY KEY(vm, disk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending(
  vm TEXT NOT NULL, disk TEXT NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
  PRIMARY KEY(vm, disk, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chain_bitmaps(
  vm TEXT NOT NULL, disk TEXT NOT NULL, name TEXT NOT NULL,
  PRIMARY KEY(vm, disk)) WITHOUT ROWID;
";

/// Opens (creating) the state database in `dir`.
pub fn open(dir: &Path) -> rusqlite::Result<Connection> {
    std::fs::create_dir_all(dir).map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("{}: {e}", dir.display())),
        )
    })?;
    let conn = Connection::open(dir.join(STATE_FILE))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// What the state says about a VM.
#[derive(Debug, Clone, Default)]
pub struct VmState {
    pub base_point: Option<i64>,
    pub pending_session: Option<String>,
}

pub fn vm_state(conn: &Connection, vm: &str) -> rusqlite::Result<VmState> {
    Ok(conn
        .query_row(
            "SELECT base_point, pending_session FROM vms WHERE vm = ?1",
            [vm],
            |r| {
                Ok(VmState {
                    base_point: r.get(0)?,
                    pending_session: r.get(1)?,
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}

/// Remembers the session in flight (so a crashed agent resumes it) and clears older pending
/// leaves.
pub fn start_pending(
    conn: &mut Connection,
    vm: &str,
    session: &str,
    disks: &[(String, DiskGeometry, bool)],
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO vms(vm, pending_session) VALUES (?1, ?2)
         ON CONFLICT(vm) DO UPDATE SET pending_session = excluded.pending_session",
        params![vm, session],
    )?;
    tx.execute("DELETE FROM pending WHERE vm = ?1", [vm])?;
    tx.execute("DELETE FROM pending_disks WHERE vm = ?1", [vm])?;
    for (name, g, full) in disks {
        tx.execute(
            "INSERT INTO pending_disks(vm, disk, size, block_size, full) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![vm, name, g.size as i64, g.block_size.bytes() as i64, *full],
        )?;
    }
    tx.commit()
}

/// The stored geometry of a disk at the base point.
pub fn disk_geometry(
    conn: &Connection,
    vm: &str,
    disk: &str,
) -> rusqlite::Result<Option<(u64, u64)>> {
    conn.query_row(
        "SELECT size, block_size FROM disks WHERE vm = ?1 AND disk = ?2",
        params![vm, disk],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .optional()
}

/// The bitmap the last capture of `disk` created (see [`set_chain_bitmaps`]), if any.
pub fn chain_bitmap(conn: &Connection, vm: &str, disk: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT name FROM chain_bitmaps WHERE vm = ?1 AND disk = ?2",
        params![vm, disk],
        |r| r.get(0),
    )
    .optional()
}

/// Records, per disk, the bitmap a capture just created. From the capture on, that bitmap
/// together with the disk's other `rewind-*` bitmaps records every write since the base point,
/// whatever the cycle's outcome: after a commit it alone covers the writes since the new base;
/// after a failure the older bitmaps are merged into it; after a crash they are all still
/// there. A disk whose bitmaps do not include it was replaced or changed outside this chain
/// (an older copy of the image, a restore): its bitmaps are not trusted (see `live::plan`).
/// Written after the capture: an agent killed before this write leaves the older bitmap
/// recorded, which is still on the disk.
pub fn set_chain_bitmaps(
    conn: &mut Connection,
    vm: &str,
    bitmaps: &[(&str, &str)],
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for (disk, name) in bitmaps {
        tx.execute(
            "INSERT OR REPLACE INTO chain_bitmaps(vm, disk, name) VALUES (?1, ?2, ?3)",
            params![vm, disk, name],
        )?;
    }
    tx.commit()
}

/// Records changed leaves of the point in flight. Its write transaction opens at the first leaf
/// and commits at every [`PendingWriter::checkpoint`] and at the latest [`PENDING_HOLD`] after
/// it opened, so other VMs' cycles (which share this database) never wait on a scan for long;
/// rows of an unfinished scan are harmless: the next start of a session clears them.
pub struct PendingWriter<'c> {
    conn: &'c Connection,
    vm: String,
    /// When the open write transaction began.
    open: Option<std::time::Instant>,
}

/// Longest a scan holds the state's write lock.
const PENDING_HOLD: Duration = Duration::from_millis(200);

impl<'c> PendingWriter<'c> {
    pub fn new(conn: &'c Connection, vm: &str) -> rusqlite::Result<Self> {
        Ok(Self {
            conn,
            vm: vm.to_owned(),
            open: None,
        })
    }

    pub fn add(&mut self, disk: &str, idx: u64, leaf: &BlockHash) -> rusqlite::Result<()> {
        let since = match self.open {
            Some(t) => t,
            None => {
                self.conn.execute_batch("BEGIN IMMEDIATE")?;
                let now = std::time::Instant::now();
                self.open = Some(now);
                now
            }
        };
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO pending(vm, disk, idx, hash) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![self.vm, disk, idx as i64, &leaf.0[..]])?;
        if since.elapsed() >= PENDING_HOLD {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Commits what was added so far (before the scan waits on anything).
    pub fn checkpoint(&mut self) -> rusqlite::Result<()> {
        if self.open.take().is_some() {
            self.conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> rusqlite::Result<()> {
        self.checkpoint()
    }
}

impl Drop for PendingWriter<'_> {
    fn drop(&mut self) {
        if self.open.is_some() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// Makes the pending point the base: its leaves replace the old ones, in one transaction.
pub fn apply_pending(conn: &mut Connection, vm: &str, point: i64) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let disks: Vec<(String, i64, i64, bool)> = {
        let mut stmt =
            tx.prepare("SELECT disk, size, block_size, full FROM pending_disks WHERE vm = ?1")?;
        let rows = stmt.query_map([vm], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut keep = Vec::new();
    for (disk, size, bs, full) in &disks {
        if *full {
            tx.execute(
                "DELETE FROM blocks WHERE vm = ?1 AND disk = ?2",
                params![vm, disk],
            )?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO disks(vm, disk, size, block_size) VALUES (?1, ?2, ?3, ?4)",
            params![vm, disk, size, bs],
        )?;
        keep.push(disk.clone());
    }
    // Disks the VM no longer has are forgotten.
    let known: Vec<String> = {
        let mut stmt = tx.prepare("SELECT disk FROM disks WHERE vm = ?1")?;
        let rows = stmt.query_map([vm], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for d in known.iter().filter(|d| !keep.contains(d)) {
        tx.execute(
            "DELETE FROM blocks WHERE vm = ?1 AND disk = ?2",
            params![vm, d],
        )?;
        tx.execute(
            "DELETE FROM disks WHERE vm = ?1 AND disk = ?2",
            params![vm, d],
        )?;
        tx.execute(
            "DELETE FROM chain_bitmaps WHERE vm = ?1 AND disk = ?2",
            params![vm, d],
        )?;
    }
    tx.execute(
        "DELETE FROM blocks WHERE (vm, disk, idx) IN
           (SELECT vm, disk, idx FROM pending WHERE vm = ?1 AND hash = zeroblob(32))",
        [vm],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO blocks(vm, disk, idx, hash)
         SELECT vm, disk, idx, hash FROM pending WHERE vm = ?1 AND hash != zeroblob(32)",
        [vm],
    )?;
    tx.execute("DELETE FROM pending WHERE vm = ?1", [vm])?;
    tx.execute("DELETE FROM pending_disks WHERE vm = ?1", [vm])?;
    tx.execute(
        "UPDATE vms SET base_point = ?2, pending_session = NULL WHERE vm = ?1",
        params![vm, point],
    )?;
    tx.commit()
}

/// Forgets everything about a VM except the session in flight: the next point is a full
/// (deduplicated) read. Used when the receiver's root disagrees with ours.
pub fn forget(conn: &mut Connection, vm: &str) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for table in [
        "blocks",
        "disks",
        "pending",
        "pending_disks",
        "chain_bitmaps",
    ] {
        tx.execute(&format!("DELETE FROM {table} WHERE vm = ?1"), [vm])?;
    }
    tx.execute("UPDATE vms SET base_point = NULL WHERE vm = ?1", [vm])?;
    tx.commit()
}

/// The leaves of one disk at the base point, read in index order a page at a time so memory
/// stays bounded whatever the disk size. Absent leaves are zero.
pub struct OldLeaves<'c> {
    conn: &'c Connection,
    vm: String,
    disk: String,
    buf: VecDeque<(u64, BlockHash)>,
    next_from: u64,
    done: bool,
}

const PAGE: i64 = 65_536;

impl<'c> OldLeaves<'c> {
    /// `None` as the disk reads as all zeros (a full send).
    pub fn new(conn: &'c Connection, vm: &str, disk: Option<&str>) -> Self {
        Self {
            conn,
            vm: vm.to_owned(),
            disk: disk.unwrap_or_default().to_owned(),
            buf: VecDeque::new(),
            next_from: 0,
            done: disk.is_none(),
        }
    }

    fn fill(&mut self) -> rusqlite::Result<()> {
        if self.done || !self.buf.is_empty() {
            return Ok(());
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT idx, hash FROM blocks WHERE vm = ?1 AND disk = ?2 AND idx >= ?3
             ORDER BY idx LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![self.vm, self.disk, self.next_from as i64, PAGE],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)),
        )?;
        for row in rows {
            let (idx, hash) = row?;
            let leaf = BlockHash::from_slice(&hash).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    rusqlite::types::Type::Blob,
                    Box::new(e),
                )
            })?;
            self.buf.push_back((idx, leaf));
        }
        match self.buf.back() {
            Some(&(last, _)) => self.next_from = last + 1,
            None => self.done = true,
        }
        Ok(())
    }

    /// The next old non-zero leaves below `end`, in order, at most a page; empty once none
    /// are left.
    pub fn next_page(&mut self, end: u64) -> rusqlite::Result<Vec<(u64, BlockHash)>> {
        self.fill()?;
        let n = self.buf.iter().take_while(|(i, _)| *i < end).count();
        Ok(self.buf.drain(..n).collect())
    }

    /// Passes every old non-zero leaf below `end` (in order) to `f` and forgets it.
    pub fn drain_below(
        &mut self,
        end: u64,
        mut f: impl FnMut(u64, BlockHash),
    ) -> rusqlite::Result<()> {
        loop {
            self.fill()?;
            match self.buf.front() {
                Some(&(i, l)) if i < end => {
                    f(i, l);
                    self.buf.pop_front();
                }
                _ => return Ok(()),
            }
        }
    }

    /// The old leaf of block `idx`; blocks must be asked in increasing order. Old non-zero
    /// leaves skipped over are passed to `skipped`.
    pub fn leaf_at(
        &mut self,
        idx: u64,
        mut skipped: impl FnMut(u64, BlockHash),
    ) -> rusqlite::Result<BlockHash> {
        loop {
            self.fill()?;
            match self.buf.front() {
                Some(&(i, l)) if i < idx => {
                    skipped(i, l);
                    self.buf.pop_front();
                }
                Some(&(i, l)) if i == idx => {
                    self.buf.pop_front();
                    return Ok(l);
                }
                _ => return Ok(BlockHash::ZERO),
            }
        }
    }
}
