//! Chunk rows: where each owner's copy of a chunk lives.

use super::VmId;
use crate::chunks::{ChunkLocation, PackId};
use rewind_proto::BlockHash;
use rusqlite::{params, Connection, OptionalExtension};

/// Where `owner`'s chunk `hash` is, if it holds one.
pub fn location(
    conn: &Connection,
    owner: &str,
    hash: &[u8],
) -> rusqlite::Result<Option<ChunkLocation>> {
    conn.prepare_cached("SELECT pack_id, offset, clen FROM chunks WHERE owner = ?1 AND hash = ?2")?
        .query_row(params![owner, hash], |r| {
            Ok(ChunkLocation::from_columns(r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()
}

/// An owner's chunk row as verify reads it.
#[derive(Debug, Clone)]
pub struct ChunkRow {
    pub owner: String,
    pub hash: Vec<u8>,
    pub at: ChunkLocation,
    /// Stored (compressed) length, as the row holds it.
    pub clen: i64,
    /// Uncompressed length.
    pub ulen: i64,
}

/// The chunks a verify checks (`?1` a VM's name or NULL for every chunk, `?2` one point of it
/// or NULL): without a scope every chunk; with one, the VM's owner's chunks that any version
/// up to the point of its leaves names.
macro_rules! in_scope {
    () => {
        "?1 IS NULL OR (c.owner = (SELECT owner FROM vms WHERE name = ?1) AND c.hash IN
   (SELECT n.hash FROM nodes n JOIN point_disks pd ON pd.disk_id = n.disk_id
    JOIN points p ON p.id = pd.point_id JOIN vms v ON v.id = p.vm_id
    WHERE v.name = ?1 AND (?2 IS NULL OR p.id = ?2) AND n.level = 0
      AND n.point <= p.id AND n.hash IS NOT NULL))"
    };
}

/// Uncompressed bytes of the chunks in scope (a VM's name and one point of it, or all).
pub fn bytes_in_scope(
    conn: &Connection,
    (vm, point): (Option<&str>, Option<i64>),
) -> rusqlite::Result<i64> {
    conn.query_row(
        concat!(
            "SELECT COALESCE(SUM(c.ulen), 0) FROM chunks c WHERE ",
            in_scope!()
        ),
        params![vm, point],
        |r| r.get(0),
    )
}

/// The packs holding the chunks in scope.
pub fn packs_in_scope(
    conn: &Connection,
    (vm, point): (Option<&str>, Option<i64>),
) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT DISTINCT c.pack_id FROM chunks c WHERE ",
        in_scope!()
    ))?;
    let rows = stmt.query_map(params![vm, point], |r| r.get(0))?;
    rows.collect()
}

/// Up to `limit` chunk rows in scope after the location `after` (pack, offset), in pack order.
pub fn page_in_scope(
    conn: &Connection,
    (vm, point): (Option<&str>, Option<i64>),
    after: (i64, i64),
    limit: usize,
) -> rusqlite::Result<Vec<ChunkRow>> {
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT c.owner, c.hash, c.pack_id, c.offset, c.clen, c.ulen FROM chunks c
             WHERE (",
        in_scope!(),
        ") AND (c.pack_id, c.offset) > (?3, ?4)
             ORDER BY c.pack_id, c.offset LIMIT ?5"
    ))?;
    let rows = stmt.query_map(params![vm, point, after.0, after.1, limit as i64], |r| {
        Ok(ChunkRow {
            owner: r.get(0)?,
            hash: r.get(1)?,
            at: ChunkLocation::from_columns(r.get(2)?, r.get(3)?, r.get(4)?),
            clen: r.get(4)?,
            ulen: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// `owner`'s row of chunk `hash` as it is now, if any.
pub fn row(conn: &Connection, owner: &str, hash: &[u8]) -> rusqlite::Result<Option<ChunkRow>> {
    conn.query_row(
        "SELECT pack_id, offset, clen, ulen FROM chunks WHERE owner = ?1 AND hash = ?2",
        params![owner, hash],
        |r| {
            let clen = r.get(2)?;
            Ok(ChunkRow {
                owner: owner.to_owned(),
                hash: hash.to_vec(),
                at: ChunkLocation::from_columns(r.get(0)?, r.get(1)?, clen),
                clen,
                ulen: r.get(3)?,
            })
        },
    )
    .optional()
}

/// The (VM, point) pairs of `owner`'s VMs whose content names chunk `hash`, by point.
pub fn points_using(
    conn: &Connection,
    owner: &str,
    hash: &[u8],
) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT v.name, pd.point_id FROM nodes n
         JOIN point_disks pd ON pd.disk_id = n.disk_id AND pd.point_id >= n.point
         JOIN points p ON p.id = pd.point_id JOIN vms v ON v.id = p.vm_id
         WHERE n.level = 0 AND n.hash = ?1 AND v.owner = ?2
           AND NOT EXISTS (SELECT 1 FROM nodes n2 WHERE n2.disk_id = n.disk_id AND n2.level = 0
                           AND n2.idx = n.idx AND n2.point > n.point AND n2.point <= pd.point_id)
         ORDER BY pd.point_id",
    )?;
    let rows = stmt.query_map(params![hash, owner], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Removes `owner`'s row of `hash` only if it is still at `at`; returns whether it was.
pub fn remove_at(
    conn: &Connection,
    owner: &str,
    hash: &[u8],
    at: ChunkLocation,
) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "DELETE FROM chunks WHERE owner = ?1 AND hash = ?2 AND pack_id = ?3 AND offset = ?4",
        params![owner, hash, at.pack, at.offset as i64],
    )?;
    Ok(n > 0)
}

/// Records `owner`'s chunk `hash` as quarantined, found bad at `found_us` with `detail`.
pub fn quarantine(
    conn: &Connection,
    owner: &str,
    hash: &[u8],
    found_us: i64,
    detail: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO bad_chunks(owner, hash, found_us, detail) VALUES (?1, ?2, ?3, ?4)",
        params![owner, hash, found_us, detail],
    )
    .map(|_| ())
}

/// A quarantined chunk.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub owner: String,
    pub hash: Vec<u8>,
    /// Why it was found bad.
    pub detail: String,
}

/// Every quarantined chunk, oldest finding first.
pub fn quarantined(conn: &Connection) -> rusqlite::Result<Vec<Quarantined>> {
    let mut stmt = conn.prepare("SELECT owner, hash, detail FROM bad_chunks ORDER BY found_us")?;
    let rows = stmt.query_map([], |r| {
        Ok(Quarantined {
            owner: r.get(0)?,
            hash: r.get(1)?,
            detail: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// Quarantined chunks of the VM's owner that any version of the VM's leaves names. Finding
/// them walks the VM's leaves, so only when the owner has a quarantined chunk at all: every
/// Begin asks, and its cost must not follow the disk's size in the usual case of none.
pub fn to_heal(conn: &Connection, vm_id: VmId) -> rusqlite::Result<Vec<Vec<u8>>> {
    let any: bool = conn
        .prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM bad_chunks
               WHERE owner = (SELECT owner FROM vms WHERE id = ?1))",
        )?
        .query_row([vm_id], |r| r.get(0))?;
    if !any {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT b.hash FROM bad_chunks b JOIN nodes n ON n.hash = b.hash AND n.level = 0
         JOIN disks d ON d.id = n.disk_id JOIN vms v ON v.id = d.vm_id
         WHERE d.vm_id = ?1 AND b.owner = v.owner",
    )?;
    let rows = stmt.query_map([vm_id], |r| r.get(0))?;
    rows.collect()
}

/// Chunk rows (of every owner) that refer to pack `id`.
pub fn count_in_pack(conn: &Connection, id: PackId) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM chunks WHERE pack_id = ?1",
        [id],
        |r| r.get(0),
    )
}

/// One chunk row of a pack gc looks at.
#[derive(Debug, Clone)]
pub struct InPack {
    pub owner: String,
    pub hash: Vec<u8>,
    pub at: ChunkLocation,
}

/// The chunk rows in pack `id`.
pub fn in_pack(conn: &Connection, id: PackId) -> rusqlite::Result<Vec<InPack>> {
    let mut stmt =
        conn.prepare_cached("SELECT owner, hash, offset, clen FROM chunks WHERE pack_id = ?1")?;
    let rows = stmt.query_map([id], |r| {
        Ok(InPack {
            owner: r.get(0)?,
            hash: r.get(1)?,
            at: ChunkLocation::from_columns(id.0, r.get(2)?, r.get(3)?),
        })
    })?;
    rows.collect()
}

/// Points `owner`'s row of `hash` at its copy `to`, if it still is in pack `from`.
pub fn repoint(
    conn: &Connection,
    owner: &str,
    hash: &[u8],
    from: PackId,
    to: ChunkLocation,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE chunks SET pack_id = ?3, offset = ?4
         WHERE owner = ?1 AND hash = ?2 AND pack_id = ?5",
        params![owner, hash, to.pack, to.offset as i64, from],
    )
    .map(|_| ())
}

/// Chunks and compressed bytes of one owner.
#[derive(Debug, Clone)]
pub struct OwnerChunks {
    pub owner: String,
    pub chunks: i64,
    pub bytes: i64,
}

/// Fills the temporary table of live (owner, hash) pairs: every leaf version of the owner's
/// VMs, and every block an open session of the owner staged.
pub fn mark_live(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS gc_owned_live(owner TEXT, hash BLOB,
           PRIMARY KEY(owner, hash)) WITHOUT ROWID;
         DELETE FROM gc_owned_live;
         INSERT OR IGNORE INTO gc_owned_live SELECT v.owner, n.hash FROM nodes n
           JOIN disks d ON d.id = n.disk_id JOIN vms v ON v.id = d.vm_id
           WHERE n.level = 0 AND n.hash IS NOT NULL;
         INSERT OR IGNORE INTO gc_owned_live SELECT s.owner, b.hash FROM session_blocks b
           JOIN sessions s ON s.id = b.session_id WHERE s.state = 'open';",
    )
}

/// Chunk rows created before `?1` that [`mark_live`] did not find.
macro_rules! dead {
    () => {
        "created_us < ?1 AND NOT EXISTS
           (SELECT 1 FROM gc_owned_live g WHERE g.owner = chunks.owner AND g.hash = chunks.hash)"
    };
}

/// Per owner, the dead chunks (see [`mark_live`]) created before `cutoff`.
pub fn dead_by_owner(conn: &Connection, cutoff: i64) -> rusqlite::Result<Vec<OwnerChunks>> {
    let mut stmt = conn.prepare(concat!(
        "SELECT owner, COUNT(*), SUM(clen) FROM chunks WHERE ",
        dead!(),
        " GROUP BY owner"
    ))?;
    let rows = stmt.query_map([cutoff], |r| {
        Ok(OwnerChunks {
            owner: r.get(0)?,
            chunks: r.get(1)?,
            bytes: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// Deletes the dead chunk rows created before `cutoff`, then empties the live table; returns
/// how many rows it deleted.
pub fn forget_dead(conn: &Connection, cutoff: i64) -> rusqlite::Result<u64> {
    let removed = conn.execute(concat!("DELETE FROM chunks WHERE ", dead!()), [cutoff])?;
    conn.execute("DELETE FROM temp.gc_owned_live", [])?;
    Ok(removed as u64)
}

/// The hashes among `hashes` (zero ones skipped) that `owner` holds no chunk of.
pub fn missing(
    conn: &Connection,
    owner: &str,
    hashes: &[BlockHash],
) -> rusqlite::Result<Vec<BlockHash>> {
    let mut held = Held::new(conn)?;
    let mut out = Vec::new();
    for h in hashes {
        if h.is_zero() {
            continue;
        }
        if !held.holds(owner, h)? {
            out.push(*h);
        }
    }
    Ok(out)
}

/// Whether an owner holds a chunk, on one statement prepared for a run of questions.
pub struct Held<'c>(rusqlite::CachedStatement<'c>);

impl<'c> Held<'c> {
    pub fn new(conn: &'c Connection) -> rusqlite::Result<Held<'c>> {
        conn.prepare_cached("SELECT 1 FROM chunks WHERE owner = ?1 AND hash = ?2")
            .map(Held)
    }

    /// Whether `owner` holds chunk `hash`.
    pub fn holds(&mut self, owner: &str, hash: &BlockHash) -> rusqlite::Result<bool> {
        self.0.exists(params![owner, &hash.0[..]])
    }
}

/// The length of the block `owner`'s chunk `hash` holds, on one statement prepared for a run
/// of lookups.
pub struct Lengths<'c>(rusqlite::CachedStatement<'c>);

impl<'c> Lengths<'c> {
    pub fn new(conn: &'c Connection) -> rusqlite::Result<Lengths<'c>> {
        conn.prepare_cached("SELECT ulen FROM chunks WHERE owner = ?1 AND hash = ?2")
            .map(Lengths)
    }

    /// The uncompressed length of `owner`'s chunk `hash`, if it holds one.
    pub fn of(&mut self, owner: &str, hash: &BlockHash) -> rusqlite::Result<Option<i64>> {
        self.0
            .query_row(params![owner, &hash.0[..]], |r| r.get(0))
            .optional()
    }
}

/// Renews the gc grace of `owner`'s chunks `hashes` (re-sent ones) to `now_us`.
pub fn renew<'h>(
    conn: &Connection,
    owner: &str,
    hashes: impl IntoIterator<Item = &'h BlockHash>,
    now_us: i64,
) -> rusqlite::Result<()> {
    let mut touch =
        conn.prepare_cached("UPDATE chunks SET created_us = ?3 WHERE owner = ?1 AND hash = ?2")?;
    for hash in hashes {
        touch.execute(params![owner, &hash.0[..], now_us])?;
    }
    Ok(())
}

/// Whether `owner` has any quarantined chunk.
pub fn any_quarantined(conn: &Connection, owner: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS(SELECT 1 FROM bad_chunks WHERE owner = ?1)")?
        .query_row([owner], |r| r.get(0))
}

/// Drops the quarantine records of `owner`'s chunks `hashes` (sent again); returns the ones
/// that had one.
pub fn heal<'h>(
    conn: &Connection,
    owner: &str,
    hashes: impl IntoIterator<Item = &'h BlockHash>,
) -> rusqlite::Result<Vec<BlockHash>> {
    let mut healed =
        conn.prepare_cached("DELETE FROM bad_chunks WHERE owner = ?1 AND hash = ?2")?;
    let mut out = Vec::new();
    for hash in hashes {
        if healed.execute(params![owner, &hash.0[..]])? > 0 {
            out.push(*hash);
        }
    }
    Ok(out)
}

/// Indexes `owner`'s chunks placed at their locations (hash, where, uncompressed length),
/// created `now_us`, each with the id of the data key that sealed it (`key_of`; None for a
/// plain frame); a row that exists already is kept. Returns the rows added and their
/// compressed bytes.
pub fn index(
    conn: &Connection,
    owner: &str,
    placed: &[(BlockHash, ChunkLocation, usize)],
    key_of: &dyn Fn(&BlockHash) -> Option<[u8; 8]>,
    now_us: i64,
) -> rusqlite::Result<(i64, i64)> {
    let mut ins = conn.prepare_cached(
        "INSERT OR IGNORE INTO chunks(owner, hash, pack_id, offset, clen, ulen, created_us, key_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let (mut added, mut bytes) = (0i64, 0i64);
    for (hash, at, ulen) in placed {
        let key_id = key_of(hash);
        let n = ins.execute(params![
            owner,
            &hash.0[..],
            at.pack,
            at.offset as i64,
            i64::from(at.len),
            *ulen as i64,
            now_us,
            key_id.as_ref().map(|k| &k[..])
        ])?;
        if n > 0 {
            added += 1;
            bytes += i64::from(at.len);
        }
    }
    Ok((added, bytes))
}
