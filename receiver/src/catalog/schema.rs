//! The catalog's schema as an ordered chain of migrations: a new catalog gets the base schema
//! (version 2) and every later step; an older one gets the steps above its `user_version`, in
//! one transaction. The on-disk format is exactly what these steps produce, in this order.

use rusqlite::Connection;

/// Schema version, kept in `PRAGMA user_version`: the last step's.
pub const VERSION: i64 = 13;

/// The version [`SCHEMA`] creates.
const BASE_VERSION: i64 = 2;

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

/// From version 5 to 6: until when a pack's object is under Object Lock (0: never), so gc
/// leaves it alone.
const MIGRATE_5_6: &str = "
ALTER TABLE packs ADD COLUMN retain_until_us INTEGER NOT NULL DEFAULT 0;
";

/// From version 6 to 7: what an object store holds of each published pack (its size and the
/// MD5 and SHA-256 of its bytes, checked by `verify` against what the store reports) and when
/// a deep verify last read it back from the store (0: never).
const MIGRATE_6_7: &str = "
ALTER TABLE packs ADD COLUMN bytes INTEGER;
ALTER TABLE packs ADD COLUMN md5 BLOB;
ALTER TABLE packs ADD COLUMN sha256 BLOB;
ALTER TABLE packs ADD COLUMN deep_verified_us INTEGER NOT NULL DEFAULT 0;
";

/// From version 7 to 8: what a copying receiver took from its source ([`super::copies`]).
const MIGRATE_7_8: &str = "
CREATE TABLE copies(
  source TEXT NOT NULL,
  vm TEXT NOT NULL,
  source_point INTEGER NOT NULL,
  session TEXT NOT NULL,
  point INTEGER,
  copied_us INTEGER NOT NULL,
  PRIMARY KEY(source, vm, source_point)) WITHOUT ROWID;
CREATE TABLE copy_lag(
  source TEXT NOT NULL,
  vm TEXT NOT NULL,
  newest_us INTEGER NOT NULL,
  copied_us INTEGER NOT NULL,
  checked_us INTEGER NOT NULL,
  PRIMARY KEY(source, vm)) WITHOUT ROWID;
";

/// From version 8 to 9: client-side encryption. A VM's keyring (its public id; NULL for a
/// plain VM) is fixed by its first point; each point of an encrypted VM keeps the agent's MAC
/// of its manifest and the agent's clock at commit, which the MAC binds. Data keys wrapped to
/// recovery keys are kept per owner and keyring (`data_keys`) while a chunk row names them
/// (`chunks.key_id`: the data key that sealed an encrypted VM's stored frame).
const MIGRATE_8_9: &str = "
ALTER TABLE vms ADD COLUMN keyring BLOB;
ALTER TABLE points ADD COLUMN mac BLOB;
ALTER TABLE points ADD COLUMN taken_us INTEGER;
CREATE TABLE data_keys(
  owner TEXT NOT NULL,
  keyring BLOB NOT NULL,
  key_id BLOB NOT NULL,
  recovery BLOB NOT NULL,
  blob BLOB NOT NULL,
  created_us INTEGER NOT NULL,
  PRIMARY KEY(owner, keyring, key_id, recovery)) WITHOUT ROWID;
ALTER TABLE chunks ADD COLUMN key_id BLOB;
CREATE INDEX chunks_by_key ON chunks(owner, key_id) WHERE key_id IS NOT NULL;
";

/// From version 9 to 10: indexes that keep a commit, a Begin and a prune's cost flat as
/// points (and their finished sessions) accumulate: without them, listing a VM's points for
/// retention checked every session for each point, and removing a point scanned every point
/// and every disk row for its children and its disk's next point.
const MIGRATE_9_10: &str = "
CREATE INDEX points_by_parent ON points(parent) WHERE parent IS NOT NULL;
CREATE INDEX point_disks_by_disk ON point_disks(disk_id, point_id);
CREATE INDEX sessions_by_vm ON sessions(vm_id, updated_us);
CREATE INDEX sessions_open_by_owner ON sessions(owner) WHERE state = 'open';
CREATE INDEX sessions_open_by_base ON sessions(base_point) WHERE state = 'open';
CREATE INDEX events_by_kind ON events(kind, id);
";

/// From version 10 to 11: the version id a bucket that keeps versions gave each pack's
/// object at upload, so reads, checks, locks and removals name that version; and copies by
/// VM, which every Begin asks (a copied VM is written by its copy only).
const MIGRATE_10_11: &str = "
ALTER TABLE packs ADD COLUMN version TEXT;
CREATE INDEX copies_by_vm ON copies(vm, source);
";

/// From version 11 to 12: the catalog's history id (a new one when `recover` rebuilds it from
/// a snapshot, after which point ids are handed out again), and copies keyed by the source's
/// history, each with the source point's creation time: a copy of a rebuilt source takes over
/// the points it already holds (same id, same creation time) and copies the others as new
/// points, where it would have taken a reused id for one it holds.
const MIGRATE_11_12: &str = "
CREATE TABLE history(id TEXT NOT NULL);
INSERT INTO history(id) VALUES (lower(hex(randomblob(16))));
CREATE TABLE copies_12(
  source TEXT NOT NULL,
  vm TEXT NOT NULL,
  history TEXT NOT NULL,
  source_point INTEGER NOT NULL,
  source_created_us INTEGER,
  session TEXT NOT NULL,
  point INTEGER,
  copied_us INTEGER NOT NULL,
  PRIMARY KEY(source, vm, history, source_point)) WITHOUT ROWID;
INSERT INTO copies_12(source, vm, history, source_point, session, point, copied_us)
  SELECT source, vm, '', source_point, session, point, copied_us FROM copies;
DROP TABLE copies;
ALTER TABLE copies_12 RENAME TO copies;
CREATE INDEX copies_by_vm ON copies(vm, source);
";

/// From version 12 to 13: indexes that keep a Begin and a commit flat as a VM's points (and
/// finished sessions) accumulate: a Begin looked for the VM's open sessions among all its
/// sessions, and a commit for the VM's newest creation time among all its points.
const MIGRATE_12_13: &str = "
CREATE INDEX sessions_open_by_vm ON sessions(vm_id) WHERE state = 'open';
CREATE INDEX points_by_vm_created ON points(vm_id, created_us);
";

/// Version 2's schema, the base of a new catalog; [`STEPS`] above version 2 follow it.
pub(super) const SCHEMA: &str = "
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

/// The migration chain: each step takes the catalog from the version before it to its version.
const STEPS: &[(i64, &str)] = &[
    (2, MIGRATE_1_2),
    (3, MIGRATE_2_3),
    (4, MIGRATE_3_4),
    (5, MIGRATE_4_5),
    (6, MIGRATE_5_6),
    (7, MIGRATE_6_7),
    (8, MIGRATE_7_8),
    (9, MIGRATE_8_9),
    (10, MIGRATE_9_10),
    (11, MIGRATE_10_11),
    (12, MIGRATE_11_12),
    (13, MIGRATE_12_13),
];

/// Brings the catalog to [`VERSION`]: a new one (version 0) gets [`SCHEMA`] and the steps
/// after it; an older one the steps above its version, and its new version, in one
/// transaction. A catalog at or above [`VERSION`] is left as it is.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == 0 {
        conn.execute_batch(SCHEMA)?;
        for (_, sql) in STEPS.iter().filter(|(to, _)| *to > BASE_VERSION) {
            conn.execute_batch(sql)?;
        }
        conn.pragma_update(None, "user_version", VERSION)?;
    } else if version < VERSION {
        let tx = conn.unchecked_transaction()?;
        for (_, sql) in STEPS.iter().filter(|(to, _)| *to > version) {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", VERSION)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{open_rw, CATALOG_FILE};

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
        assert_eq!(v, VERSION);
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
}
