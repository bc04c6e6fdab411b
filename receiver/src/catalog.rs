//! The receiver's catalog: one SQLite database (WAL, synchronous=FULL) naming VMs, disks,
//! points, sessions, chunks and the versioned Merkle nodes of every disk.
//!
//! Versioned nodes: the value of node (level, idx) of a disk at point P is the row with the
//! greatest `point` not after P; no row, or a NULL hash, means the all-zero subtree. A point
//! therefore writes rows only for the blocks it changed and the inner nodes above them.
//! A disk generation (`disks` row) is a linear chain: a point may only build on its VM's newest
//! point, and a disk whose size or block size changes starts a new generation.

use crate::chunks::PackId;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The catalog's file inside the data folder.
pub const CATALOG_FILE: &str = "catalog.sqlite";
/// Schema version, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 5;

/// From version 1 (the first release of the catalog) to 2: point metadata, events, locks, and
/// the index prune needs to find a point's node rows without scanning the disk's.
const MIGRATE_1_2: &str = "
ALTER TABLE points ADD COLUMN consistency TEXT NOT NULL DEFAULT 'as-read';
ALTER TABLE points ADD COLUMN config TEXT;
ALTER TABLE points ADD COLUMN locked_until_us INTEGER;
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY,
  vm_id INTEGER REFERENCES vms(id),
  kind TEXT NOT NULL,
  point INTEGER,
  detail TEXT NOT NULL,
  created_us INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS nodes_by_point ON nodes(disk_id, point);
ALTER TABLE chunks ADD COLUMN created_us INTEGER NOT NULL DEFAULT 0;
ALTER TABLE packs ADD COLUMN writer TEXT NOT NULL DEFAULT 'serve';
ALTER TABLE packs ADD COLUMN sealed INTEGER NOT NULL DEFAULT 1;
CREATE TABLE IF NOT EXISTS bad_chunks(
  hash BLOB PRIMARY KEY,
  found_us INTEGER NOT NULL,
  detail TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack_id);
";

/// From version 2 to 3: the record of DR drills, and what each VM added to the store.
const MIGRATE_2_3: &str = "
CREATE TABLE IF NOT EXISTS drills(
  id INTEGER PRIMARY KEY,
  vm TEXT NOT NULL,
  point INTEGER,
  started_us INTEGER NOT NULL,
  point_age_s REAL,
  verified_s REAL,
  boot_s REAL,
  rto_s REAL,
  result TEXT NOT NULL,
  reason TEXT,
  detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS drills_by_vm ON drills(vm, id);
CREATE TABLE IF NOT EXISTS vm_stats(
  vm_id INTEGER PRIMARY KEY,
  chunks_stored INTEGER NOT NULL DEFAULT 0,
  bytes_stored INTEGER NOT NULL DEFAULT 0);
";

/// From version 3 to 4: chunks are stored per owner. Dedup spans the points, disks and VMs of
/// one agent, never two: a frame one agent sent is never what another agent's points read,
/// and whether a chunk is stored (and how fast an upload of it is) depends only on the asking
/// agent's own data. Chunks several owners shared keep their one frame (it was verified at
/// ingest), now named by one row per owner; gc copies such a frame once per row.
const MIGRATE_3_4: &str = "
CREATE TABLE owned_chunks(
  owner TEXT NOT NULL,
  hash BLOB NOT NULL,
  pack_id INTEGER NOT NULL,
  offset INTEGER NOT NULL,
  clen INTEGER NOT NULL,
  ulen INTEGER NOT NULL,
  created_us INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(owner, hash)) WITHOUT ROWID;
INSERT INTO owned_chunks SELECT o.owner, c.hash, c.pack_id, c.offset, c.clen, c.ulen, c.created_us
  FROM chunk_owners o JOIN chunks c ON c.hash = o.hash;
-- A heal in version 3 restored the ownership row of the healing agent only; the points of
-- every owner that use a chunk keep it.
INSERT OR IGNORE INTO owned_chunks SELECT v.owner, c.hash, c.pack_id, c.offset, c.clen, c.ulen, c.created_us
  FROM nodes n JOIN disks d ON d.id = n.disk_id JOIN vms v ON v.id = d.vm_id
  JOIN chunks c ON c.hash = n.hash WHERE n.level = 0 AND n.hash IS NOT NULL;
INSERT OR IGNORE INTO owned_chunks SELECT s.owner, c.hash, c.pack_id, c.offset, c.clen, c.ulen, c.created_us
  FROM session_blocks b JOIN sessions s ON s.id = b.session_id
  JOIN chunks c ON c.hash = b.hash WHERE s.state = 'open';
DROP TABLE chunks;
DROP TABLE chunk_owners;
ALTER TABLE owned_chunks RENAME TO chunks;
CREATE INDEX chunks_by_pack ON chunks(pack_id);
CREATE INDEX IF NOT EXISTS events_by_vm ON events(vm_id, id);
CREATE TABLE owned_bad_chunks(
  owner TEXT NOT NULL,
  hash BLOB NOT NULL,
  found_us INTEGER NOT NULL,
  detail TEXT NOT NULL,
  PRIMARY KEY(owner, hash)) WITHOUT ROWID;
INSERT OR IGNORE INTO owned_bad_chunks SELECT v.owner, b.hash, b.found_us, b.detail
  FROM bad_chunks b JOIN nodes n ON n.hash = b.hash AND n.level = 0
  JOIN disks d ON d.id = n.disk_id JOIN vms v ON v.id = d.vm_id;
DROP TABLE bad_chunks;
ALTER TABLE owned_bad_chunks RENAME TO bad_chunks;
CREATE TABLE owner_usage(
  owner TEXT PRIMARY KEY,
  chunks INTEGER NOT NULL,
  bytes INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO owner_usage SELECT owner, COUNT(*), SUM(clen) FROM chunks GROUP BY owner;
CREATE TABLE pending_commits(
  session_id TEXT PRIMARY KEY,
  vm_id INTEGER NOT NULL,
  point INTEGER NOT NULL,
  disks TEXT NOT NULL,
  new_disks TEXT NOT NULL) WITHOUT ROWID;
";

/// From version 4 to 5: the wall-clock steps `serve` saw (see [`crate::clock`]).
const MIGRATE_4_5: &str = "
CREATE TABLE clock_steps(
  at_us INTEGER NOT NULL,
  step_us INTEGER NOT NULL);
";

/// Version 2's schema; a new catalog also gets [`MIGRATE_2_3`], [`MIGRATE_3_4`] and
/// [`MIGRATE_4_5`].
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms(
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  created_us INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS disks(
  id INTEGER PRIMARY KEY,
  vm_id INTEGER NOT NULL REFERENCES vms(id),
  name TEXT NOT NULL,
  size INTEGER NOT NULL,
  block_size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS points(
  id INTEGER PRIMARY KEY,
  vm_id INTEGER NOT NULL REFERENCES vms(id),
  parent INTEGER,
  created_us INTEGER NOT NULL,
  committed_us INTEGER NOT NULL,
  session TEXT NOT NULL UNIQUE,
  consistency TEXT NOT NULL DEFAULT 'as-read',
  config TEXT,
  locked_until_us INTEGER);
CREATE INDEX IF NOT EXISTS points_by_vm ON points(vm_id, id);
CREATE TABLE IF NOT EXISTS point_disks(
  point_id INTEGER NOT NULL REFERENCES points(id),
  name TEXT NOT NULL,
  disk_id INTEGER NOT NULL REFERENCES disks(id),
  size INTEGER NOT NULL,
  block_size INTEGER NOT NULL,
  root BLOB NOT NULL,
  changed_blocks INTEGER NOT NULL,
  PRIMARY KEY(point_id, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes(
  disk_id INTEGER NOT NULL,
  level INTEGER NOT NULL,
  idx INTEGER NOT NULL,
  point INTEGER NOT NULL,
  hash BLOB,
  PRIMARY KEY(disk_id, level, idx, point)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nodes_by_point ON nodes(disk_id, point);
CREATE TABLE IF NOT EXISTS packs(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  created_us INTEGER NOT NULL,
  writer TEXT NOT NULL DEFAULT 'serve',
  sealed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chunks(
  hash BLOB PRIMARY KEY,
  pack_id INTEGER NOT NULL,
  offset INTEGER NOT NULL,
  clen INTEGER NOT NULL,
  ulen INTEGER NOT NULL,
  created_us INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack_id);
CREATE TABLE IF NOT EXISTS chunk_owners(
  owner TEXT NOT NULL,
  hash BLOB NOT NULL,
  PRIMARY KEY(owner, hash)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions(
  id TEXT PRIMARY KEY,
  vm_id INTEGER NOT NULL REFERENCES vms(id),
  owner TEXT NOT NULL,
  base_point INTEGER,
  state TEXT NOT NULL,
  point_id INTEGER,
  created_us INTEGER NOT NULL,
  updated_us INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_disks(
  session_id TEXT NOT NULL,
  pos INTEGER NOT NULL,
  name TEXT NOT NULL,
  size INTEGER NOT NULL,
  block_size INTEGER NOT NULL,
  base_disk INTEGER,
  PRIMARY KEY(session_id, pos)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY,
  vm_id INTEGER REFERENCES vms(id),
  kind TEXT NOT NULL,
  point INTEGER,
  detail TEXT NOT NULL,
  created_us INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bad_chunks(
  hash BLOB PRIMARY KEY,
  found_us INTEGER NOT NULL,
  detail TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_blocks(
  session_id TEXT NOT NULL,
  pos INTEGER NOT NULL,
  idx INTEGER NOT NULL,
  hash BLOB NOT NULL,
  PRIMARY KEY(session_id, pos, idx)) WITHOUT ROWID;
";

/// Adds `chunks` and `bytes` (negative to remove) to what `owner` holds, the figure its storage
/// quota is checked against; every insert and delete of chunk rows goes with one.
pub fn add_usage(conn: &Connection, owner: &str, chunks: i64, bytes: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO owner_usage(owner, chunks, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT(owner) DO UPDATE SET chunks = chunks + excluded.chunks,
           bytes = bytes + excluded.bytes",
    )?
    .execute(rusqlite::params![owner, chunks, bytes])
    .map(|_| ())
}

/// Opens (and creates or migrates) the catalog for writing.
pub fn open_rw(data: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(data.join(CATALOG_FILE))?;
    configure(&conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == 0 {
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(MIGRATE_2_3)?;
        conn.execute_batch(MIGRATE_3_4)?;
        conn.execute_batch(MIGRATE_4_5)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    } else if version < SCHEMA_VERSION {
        let tx = conn.unchecked_transaction()?;
        if version < 2 {
            tx.execute_batch(MIGRATE_1_2)?;
        }
        if version < 3 {
            tx.execute_batch(MIGRATE_2_3)?;
        }
        if version < 4 {
            tx.execute_batch(MIGRATE_3_4)?;
        }
        tx.execute_batch(MIGRATE_4_5)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
    }
    Ok(conn)
}

/// Opens an existing catalog for writing (migrating it). A folder without one is an error, so a
/// mistyped `--data` never creates an empty store.
pub fn open_existing(data: &Path) -> rusqlite::Result<Connection> {
    if !data.join(CATALOG_FILE).is_file() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "{} holds no Rewind catalog ({CATALOG_FILE})",
                data.display()
            )),
        ));
    }
    open_rw(data)
}

/// Allocates a pack id for `writer` ("serve" or "gc"). Ids are never reused (AUTOINCREMENT),
/// so a deleted pack's name never comes back.
pub fn new_pack(conn: &Connection, writer: &str) -> rusqlite::Result<PackId> {
    conn.execute(
        "INSERT INTO packs(created_us, writer, sealed) VALUES (?1, ?2, 0)",
        rusqlite::params![now_us(), writer],
    )?;
    Ok(PackId(conn.last_insert_rowid()))
}

/// Marks a pack complete: no writer appends to it any more, so gc may rewrite or delete it.
pub fn seal_pack(conn: &Connection, id: PackId) -> rusqlite::Result<()> {
    conn.execute("UPDATE packs SET sealed = 1 WHERE id = ?1", [id])
        .map(|_| ())
}

/// Seals every pack of `writer`: called when no process of that kind can still be writing
/// (serve at start; gc at start, holding the gc lock).
pub fn seal_orphans(conn: &Connection, writer: &str) -> rusqlite::Result<()> {
    conn.execute("UPDATE packs SET sealed = 1 WHERE writer = ?1", [writer])
        .map(|_| ())
}

/// Opens the catalog for reading only, safe while `serve` writes to it.
pub fn open_ro(data: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        data.join(CATALOG_FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn)?;
    Ok(conn)
}

/// Opens the catalog for reading only, as one of several readers inside `serve`: with a small
/// page cache of its own (the writer's connection keeps the large one).
pub fn open_reader(data: &Path) -> rusqlite::Result<Connection> {
    let conn = open_ro(data)?;
    conn.pragma_update(None, "cache_size", -4096)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(30))?;
    // FULL: NORMAL can lose the last commit on power loss, and a commit acknowledged to an agent
    // must survive.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    Ok(())
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// RFC 3339 UTC text of a microsecond timestamp.
pub fn rfc3339(us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| us.to_string())
}

/// Parses RFC 3339 text into microseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Result<i64, time::error::Parse> {
    let t = OffsetDateTime::parse(text, &Rfc3339)?;
    Ok((t.unix_timestamp_nanos() / 1000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_2_catalog_is_migrated_to_3() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join(CATALOG_FILE)).expect("open");
            conn.execute_batch(SCHEMA).expect("v2 schema");
            conn.pragma_update(None, "user_version", 2)
                .expect("version");
            conn.execute(
                "INSERT INTO vms(name, owner, created_us) VALUES ('v', 'a', 1)",
                [],
            )
            .expect("row");
        }
        let conn = open_rw(dir.path()).expect("migrate");
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(v, SCHEMA_VERSION);
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM drills", [], |r| r.get(0))
            .expect("drills table");
        assert_eq!(n, 0);
        let vms: i64 = conn
            .query_row("SELECT COUNT(*) FROM vms", [], |r| r.get(0))
            .expect("vms kept");
        assert_eq!(vms, 1);
        drop(conn);
        // Opening again changes nothing.
        open_rw(dir.path()).expect("reopen");
    }

    #[test]
    fn a_version_3_catalog_gives_each_owner_its_own_chunk_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join(CATALOG_FILE)).expect("open");
            conn.execute_batch(SCHEMA).expect("v2 schema");
            conn.execute_batch(MIGRATE_2_3).expect("v3 schema");
            conn.pragma_update(None, "user_version", 3)
                .expect("version");
            conn.execute_batch(
                "INSERT INTO chunks(hash, pack_id, offset, clen, ulen, created_us)
                   VALUES (x'01', 1, 40, 10, 4096, 5), (x'02', 1, 90, 12, 4096, 6);
                 INSERT INTO chunk_owners(owner, hash) VALUES ('a', x'01'), ('b', x'01'), ('b', x'02');
                 INSERT INTO vms(id, name, owner, created_us) VALUES (1, 'vb', 'b', 1);
                 INSERT INTO disks(id, vm_id, name, size, block_size) VALUES (1, 1, 'vda', 8192, 4096);
                 INSERT INTO nodes(disk_id, level, idx, point, hash) VALUES (1, 0, 0, 1, x'02');
                 INSERT INTO bad_chunks(hash, found_us, detail) VALUES (x'02', 1, 'torn');",
            )
            .expect("rows");
        }
        let conn = open_rw(dir.path()).expect("migrate");
        let rows: Vec<(String, Vec<u8>, i64)> = conn
            .prepare("SELECT owner, hash, offset FROM chunks ORDER BY owner, hash")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert_eq!(
            rows,
            vec![
                ("a".to_owned(), vec![1], 40),
                ("b".to_owned(), vec![1], 40),
                ("b".to_owned(), vec![2], 90)
            ]
        );
        let bad: (String, Vec<u8>) = conn
            .query_row("SELECT owner, hash FROM bad_chunks", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("bad chunk kept, with its owner");
        assert_eq!(bad, ("b".to_owned(), vec![2]));
    }

    #[test]
    fn time_roundtrip() {
        let us = 1_795_000_000_123_456;
        assert_eq!(parse_rfc3339(&rfc3339(us)).expect("parse"), us);
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
