//! Verify: re-read every chunk the selected points reference (or every chunk), check that it
//! decompresses to its length and hashes to its name, and quarantine the bad ones.
//!
//! A bad chunk is removed from the chunk index (its bytes cannot be trusted) and recorded in
//! `bad_chunks`; the points that reference it are reported damaged. The owning agent's next
//! sync is told (Begin's heal list) to send that content again if its disk still has it; the
//! chunk is then stored anew, the points that reference it by hash are whole again, and the
//! quarantine entry is dropped.

use crate::catalog::now_us;
use crate::chunks::{self, ChunkLocation, ChunkReader, ReadOrder};
use crate::error::StoreError;
use rewind_proto::report::chain;
use rewind_proto::{chunk, Leaf};
use rusqlite::{params, Connection, OptionalExtension};
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

/// What a verify run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub bad: Vec<BadChunk>,
    /// Chunks still quarantined from earlier runs (not yet healed).
    pub quarantined: Vec<BadChunk>,
}

/// Chunk rows read per page.
const PAGE_ROWS: usize = 4096;

/// The chunks a verify checks (`?1` a VM's name or NULL for every chunk, `?2` one point of it
/// or NULL): without a scope every chunk; with one, the VM's owner's chunks its points use.
const IN_SCOPE: &str =
    "?1 IS NULL OR (c.owner = (SELECT owner FROM vms WHERE name = ?1) AND c.hash IN
   (SELECT n.hash FROM nodes n JOIN point_disks pd ON pd.disk_id = n.disk_id
    JOIN points p ON p.id = pd.point_id JOIN vms v ON v.id = p.vm_id
    WHERE v.name = ?1 AND (?2 IS NULL OR p.id = ?2) AND n.level = 0
      AND n.point <= p.id AND n.hash IS NOT NULL))";

/// One chunk row: its owner, hash, location and length.
struct Row {
    owner: String,
    hash: Vec<u8>,
    at: ChunkLocation,
    ulen: i64,
}

/// Reads a chunk at `at` and checks that it decompresses to `ulen` bytes hashing to `leaf`.
fn check(
    reader: &mut dyn ChunkReader,
    leaf: &Leaf,
    at: ChunkLocation,
    ulen: i64,
) -> Result<(), String> {
    let frame = reader.read(at, leaf).map_err(|e| chain(&e))?;
    chunk::open(*leaf, &frame, ulen as usize)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Points of `owner`'s VMs whose content references `hash`.
fn points_using(
    conn: &Connection,
    owner: &str,
    hash: &[u8],
) -> Result<Vec<(String, i64)>, StoreError> {
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
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Checks chunks and quarantines bad ones. `scope` limits the check to chunks referenced by
/// the points of a VM (and one point of it).
pub fn verify(
    conn: &mut Connection,
    data: &Path,
    scope: Option<(&str, Option<i64>)>,
    progress: &dyn Fn(u64, u64),
) -> Result<VerifyReport, StoreError> {
    let (vm, point) = scope.map_or((None, None), |(vm, p)| (Some(vm), p));
    let total: u64 = conn.query_row(
        &format!("SELECT COALESCE(SUM(c.ulen), 0) FROM chunks c WHERE {IN_SCOPE}"),
        params![vm, point],
        |r| r.get::<_, i64>(0),
    )? as u64;
    let mut reader = chunks::open(data).reader(ReadOrder::Sequential);
    let mut report = VerifyReport::default();
    let mut bad = Vec::new();
    // Pages in pack order, so memory stays bounded whatever the store's size.
    let mut after = (-1i64, -1i64);
    loop {
        let page = page(conn, (vm, point), after)?;
        let Some(last) = page.last() else { break };
        after = (last.at.pack.0, last.at.offset as i64);
        if report.chunks_checked == 0 {
            rewind_proto::faults::point("verify-after-listing");
        }
        for row in page {
            let leaf = Leaf::from_slice(&row.hash)?;
            report.chunks_checked += 1;
            report.bytes_checked += row.ulen as u64;
            if let Err(error) = check(&mut *reader, &leaf, row.at, row.ulen) {
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
    report.quarantined = still_quarantined(conn, scope, &report.bad)?;
    conn.execute(
        "INSERT INTO events(vm_id, kind, point, detail, created_us) VALUES (NULL, 'verify', NULL, ?1, ?2)",
        params![
            serde_json::json!({"chunks_checked": report.chunks_checked, "bytes_checked": report.bytes_checked,
                "bad": report.bad.len(), "quarantined": report.quarantined.len()}).to_string(),
            now_us()
        ],
    )?;
    Ok(report)
}

/// The chunk rows in scope (a VM's name and one point of it, or every chunk) after the
/// location `after`, in pack order, a page at a time.
fn page(
    conn: &Connection,
    (vm, point): (Option<&str>, Option<i64>),
    after: (i64, i64),
) -> Result<Vec<Row>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT c.owner, c.hash, c.pack_id, c.offset, c.clen, c.ulen FROM chunks c
             WHERE ({IN_SCOPE}) AND (c.pack_id, c.offset) > (?3, ?4)
             ORDER BY c.pack_id, c.offset LIMIT ?5"
    ))?;
    let rows = stmt.query_map(
        params![vm, point, after.0, after.1, PAGE_ROWS as i64],
        |r| {
            Ok(Row {
                owner: r.get(0)?,
                hash: r.get(1)?,
                at: ChunkLocation::from_columns(r.get(2)?, r.get(3)?, r.get(4)?),
                ulen: r.get(5)?,
            })
        },
    )?;
    let page = rows.collect::<rusqlite::Result<_>>()?;
    Ok(page)
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
    let now: Option<(ChunkLocation, i64, i64)> = conn
        .query_row(
            "SELECT pack_id, offset, clen, ulen FROM chunks WHERE owner = ?1 AND hash = ?2",
            params![row.owner, row.hash],
            |r| {
                let clen = r.get(2)?;
                let at = ChunkLocation::from_columns(r.get(0)?, r.get(1)?, clen);
                Ok((at, clen, r.get(3)?))
            },
        )
        .optional()?;
    let (at, clen, error) = match now {
        None => return Ok(None), // collected by gc meanwhile: no point needs it
        Some((at, clen, _)) if at == row.at => (at, clen, error),
        Some((at, clen, ulen)) => {
            let leaf = Leaf::from_slice(&row.hash)?;
            match check(reader, &leaf, at, ulen) {
                Ok(()) => return Ok(None),
                Err(e) => (at, clen, e),
            }
        }
    };
    let (owner, hash) = (row.owner, row.hash);
    let points = points_using(conn, &owner, &hash)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = tx.execute(
        "DELETE FROM chunks WHERE owner = ?1 AND hash = ?2 AND pack_id = ?3 AND offset = ?4",
        params![owner, hash, at.pack, at.offset as i64],
    )?;
    if n == 0 {
        // Moved again while it was re-read: the next verify checks its new copy.
        return Ok(None);
    }
    crate::catalog::add_usage(&tx, &owner, -1, -clen)?;
    tx.execute(
        "INSERT OR REPLACE INTO bad_chunks(owner, hash, found_us, detail) VALUES (?1, ?2, ?3, ?4)",
        params![owner, hash, now_us(), error],
    )?;
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
    let earlier: Vec<(String, Vec<u8>, String)> = {
        let mut stmt =
            conn.prepare("SELECT owner, hash, detail FROM bad_chunks ORDER BY found_us")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for (owner, hash, error) in earlier {
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
pub fn heal_list(conn: &Connection, vm_id: i64) -> Result<Vec<Leaf>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT b.hash FROM bad_chunks b JOIN nodes n ON n.hash = b.hash AND n.level = 0
         JOIN disks d ON d.id = n.disk_id JOIN vms v ON v.id = d.vm_id
         WHERE d.vm_id = ?1 AND b.owner = v.owner",
    )?;
    let rows = stmt.query_map([vm_id], |r| r.get::<_, Vec<u8>>(0))?;
    let mut out = Vec::new();
    for r in rows {
        out.push(Leaf::from_slice(&r?)?);
    }
    Ok(out)
}
