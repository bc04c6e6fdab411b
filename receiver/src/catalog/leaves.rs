//! The store's central rule, written once: the value of node (level, idx) of a disk at point P
//! is its newest version not after P (no row, or a NULL hash, is the all-zero subtree).
//! Leaves are level 0. Every reader of "the leaves of this disk at this point in this range"
//! (restore, the NBD export, readback, diff, drills, the commit's tree update) goes through
//! [`at_point`].

use super::{CatalogError, DiskId, PointId};
use crate::chunks::ChunkLocation;
use rewind_proto::BlockHash;
use rusqlite::{params, Connection, OptionalExtension};
use std::ops::{ControlFlow, Range};

/// The rule as SQL: per index of one level of one disk in `?3..?4`, the row with the greatest
/// point not after `?5`. Grouped along the primary key (disk_id, level, idx, point), so rows
/// come out in index order without a sort and stream without being collected.
macro_rules! newest_not_after {
    () => {
        "SELECT idx, hash, MAX(point) FROM nodes
         WHERE disk_id = ?1 AND level = ?2 AND idx >= ?3 AND idx < ?4 AND point <= ?5
         GROUP BY idx"
    };
}

/// Non-zero nodes in index order. Zero ones are skipped as they stream (not in SQL): a
/// `WHERE` around the grouped rows would need a sort, and a caller that stops early would
/// still pay for the rest of the range.
const NODES: &str = concat!(newest_not_after!(), " ORDER BY idx");

/// One node, by a lookup of its newest version alone: a range of one index costs one seek,
/// however many versions it has (diff asks this for every candidate block).
const ONE_NODE: &str = "SELECT hash FROM nodes
     WHERE disk_id = ?1 AND level = ?2 AND idx = ?3 AND point <= ?5
     ORDER BY point DESC LIMIT 1";

/// One level's nodes in a short range (a parent's children, as a commit's tree update reads
/// them), found by seeks: each index present in turn, then its newest version not after
/// `?5`. The upper levels gain a version at almost every point, so grouping all versions as
/// [`NODES`] does would cost more with every point kept; this costs two seeks per index.
const CHILDREN: &str = "WITH RECURSIVE ids(i) AS (
       SELECT (SELECT idx FROM nodes WHERE disk_id = ?1 AND level = ?2 AND idx >= ?3
               AND idx < ?4 ORDER BY idx LIMIT 1)
       UNION ALL
       SELECT (SELECT idx FROM nodes WHERE disk_id = ?1 AND level = ?2 AND idx > ids.i
               AND idx < ?4 ORDER BY idx LIMIT 1)
       FROM ids WHERE ids.i IS NOT NULL)
     SELECT i, (SELECT hash FROM nodes WHERE disk_id = ?1 AND level = ?2 AND idx = ids.i
                AND point <= ?5 ORDER BY point DESC LIMIT 1)
     FROM ids WHERE i IS NOT NULL";

/// Non-zero nodes with where the disk's owner holds each chunk, in index order. A chunk the
/// owner does not hold (quarantined, lost) comes back without a location. SQLite does not carry
/// the grouped rows' order through the join: the `ORDER BY` sorts them (in a temporary b-tree,
/// spilled to disk past the cache, as restore's walk always did).
const LOCATED: &str = concat!(
    "SELECT n.idx, n.hash, c.pack_id, c.offset, c.clen FROM (",
    newest_not_after!(),
    ") n
     LEFT JOIN chunks c ON c.hash = n.hash AND c.owner =
       (SELECT v.owner FROM disks d JOIN vms v ON v.id = d.vm_id WHERE d.id = ?1)
     WHERE n.hash IS NOT NULL ORDER BY n.idx"
);

/// Which nodes to read: one level of one disk as at one point, indexes in `blocks`.
#[derive(Debug, Clone)]
pub struct Span {
    pub disk: DiskId,
    pub point: PointId,
    pub level: u32,
    pub blocks: Range<u64>,
}

impl Span {
    /// The leaves (level 0) of `disk` at `point` with index in `blocks`.
    pub fn leaves(disk: DiskId, point: PointId, blocks: Range<u64>) -> Span {
        Span {
            disk,
            point,
            level: 0,
            blocks,
        }
    }

    /// Every leaf of `disk` at `point`.
    pub fn all_leaves(disk: DiskId, point: PointId) -> Span {
        Span::leaves(disk, point, 0..u64::MAX)
    }
}

/// Whether [`at_point`] also looks up where each leaf's chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    /// Index and hash only.
    Hashes,
    /// Index, hash and the chunk's location among the disk's owner's chunks.
    Located,
}

/// One non-zero node at the point.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub idx: u64,
    pub hash: BlockHash,
    /// Where the chunk is; None when not asked for ([`Columns::Hashes`]) or not held.
    pub at: Option<ChunkLocation>,
}

/// Calls `f` with every non-zero node of `span`, in index order, until it breaks. Rows stream
/// from one cached statement: memory does not grow with the range.
pub fn at_point<E: From<CatalogError>>(
    conn: &Connection,
    span: &Span,
    columns: Columns,
    mut f: impl FnMut(Node) -> Result<ControlFlow<()>, E>,
) -> Result<(), E> {
    let sql = |e: rusqlite::Error| E::from(CatalogError::Sql(e));
    let first = clamp(span.blocks.start);
    let end = clamp(span.blocks.end);
    if first >= end {
        return Ok(());
    }
    let args = params![span.disk, span.level, first, end, span.point];
    if columns == Columns::Hashes && end - first == 1 {
        let mut stmt = conn.prepare_cached(ONE_NODE).map_err(sql)?;
        let hash = stmt
            .query_row(args, |r| r.get::<_, Option<Vec<u8>>>(0))
            .optional()
            .map_err(sql)?
            .flatten();
        if let Some(h) = hash {
            let hash = BlockHash::from_slice(&h).map_err(|e| E::from(CatalogError::from(e)))?;
            let _ = f(Node {
                idx: span.blocks.start,
                hash,
                at: None,
            })?;
        }
        return Ok(());
    }
    let text = match columns {
        Columns::Hashes => NODES,
        Columns::Located => LOCATED,
    };
    let mut stmt = conn.prepare_cached(text).map_err(sql)?;
    let mut rows = stmt.query(args).map_err(sql)?;
    while let Some(r) = rows.next().map_err(sql)? {
        let Some(h) = r.get::<_, Option<Vec<u8>>>(1).map_err(sql)? else {
            continue;
        };
        let at = match columns {
            Columns::Hashes => None,
            Columns::Located => location(r).map_err(sql)?,
        };
        let node = Node {
            idx: r.get::<_, i64>(0).map_err(sql)? as u64,
            hash: BlockHash::from_slice(&h).map_err(|e| E::from(CatalogError::from(e)))?,
            at,
        };
        if f(node)?.is_break() {
            break;
        }
    }
    Ok(())
}

/// Up to `limit` non-zero nodes of `span`, in index order: one bounded page.
pub fn page(
    conn: &Connection,
    span: &Span,
    columns: Columns,
    limit: usize,
) -> Result<Vec<Node>, CatalogError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    at_point(conn, span, columns, |node| {
        out.push(node);
        Ok::<_, CatalogError>(if out.len() >= limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })?;
    Ok(out)
}

/// Records the value of node (`level`, `node.idx`) of `disk` as of `point` (a zero node as
/// NULL), replacing one the same point wrote before.
pub fn put(
    conn: &Connection,
    disk: DiskId,
    point: PointId,
    level: u32,
    node: &Node,
) -> rusqlite::Result<()> {
    let hash = (!node.hash.is_zero()).then_some(&node.hash.0[..]);
    conn.prepare_cached(
        "INSERT OR REPLACE INTO nodes(disk_id, level, idx, point, hash)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![disk, level, node.idx as i64, point, hash])?;
    Ok(())
}

/// Writes the leaves disk `pos` of `session` staged in `(after, last]` as versions at `point`
/// of `disk` (an all-zero hash as NULL); returns how many.
pub fn put_staged(
    conn: &Connection,
    disk: DiskId,
    point: PointId,
    (session, pos): (&str, usize),
    after: i64,
    last: u64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO nodes(disk_id, level, idx, point, hash)
         SELECT ?1, 0, idx, ?2, CASE WHEN hash = zeroblob(32) THEN NULL ELSE hash END
         FROM session_blocks WHERE session_id = ?3 AND pos = ?4 AND idx > ?5 AND idx <= ?6",
    )?
    .execute(params![
        disk,
        point,
        session,
        pos as i64,
        after,
        last as i64
    ])
}

/// Deletes up to `limit` node rows of `disk` at `point` (a commit that never became a point);
/// returns how many.
pub fn drop_point_step(
    conn: &Connection,
    disk: DiskId,
    point: PointId,
    limit: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM nodes WHERE (disk_id, level, idx, point) IN
           (SELECT disk_id, level, idx, point FROM nodes
            WHERE disk_id = ?1 AND point = ?2 LIMIT ?3)",
    )?
    .execute(params![disk, point, limit])
}

/// Removes `point` from `disk`'s history; `prev` is the disk's point before it that stays
/// (None: none) and `next` the one after it. The rule reads "newest not after P", which needs
/// no point of a row's id to exist, so the rows in `(prev, point]` stay as they are, except
/// those `next` no longer sees: for each node with a version in `(point, next]`, its version
/// in `(prev, point]` goes (at most one per node: each removal keeps it so). No remaining point
/// sees such a row: those up to `prev` never did, those from `next` on see the newer one. The
/// cost follows the rows in `(point, next]` (what changed after `point`), never the disk's
/// size nor the history before it. Returns the rows deleted.
pub fn fold_into(
    conn: &Connection,
    disk: DiskId,
    (prev, point, next): (Option<PointId>, PointId, PointId),
) -> rusqlite::Result<u64> {
    Ok(conn.execute(
        "DELETE FROM nodes WHERE (disk_id, level, idx, point) IN
           (SELECT o.disk_id, o.level, o.idx, o.point FROM nodes y JOIN nodes o
              ON o.disk_id = y.disk_id AND o.level = y.level AND o.idx = y.idx
             AND o.point > ?2 AND o.point <= ?3
            WHERE y.disk_id = ?1 AND y.point > ?3 AND y.point <= ?4)",
        params![disk, prev.map_or(-1, |p| p.0), point, next],
    )? as u64)
}

/// Deletes every row of `disk` in `(prev, point]`: `point` is the disk's last point and goes,
/// and no remaining point sees those rows. Returns how many.
pub fn drop_point(
    conn: &Connection,
    disk: DiskId,
    prev: Option<PointId>,
    point: PointId,
) -> rusqlite::Result<u64> {
    Ok(conn.execute(
        "DELETE FROM nodes WHERE disk_id = ?1 AND point > ?2 AND point <= ?3",
        params![disk, prev.map_or(-1, |p| p.0), point],
    )? as u64)
}

/// The non-zero nodes of `span` in index order, each found by seeks ([`CHILDREN`]): for
/// short ranges of levels with many versions per node.
pub fn children(conn: &Connection, span: &Span) -> Result<Vec<(u64, BlockHash)>, CatalogError> {
    let (first, end) = (clamp(span.blocks.start), clamp(span.blocks.end));
    let mut stmt = conn.prepare_cached(CHILDREN)?;
    let mut rows = stmt.query(params![span.disk, span.level, first, end, span.point])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        if let Some(h) = r.get::<_, Option<Vec<u8>>>(1)? {
            out.push((r.get::<_, i64>(0)? as u64, BlockHash::from_slice(&h)?));
        }
    }
    Ok(out)
}

/// The leaf of block `idx` of `disk` at `point`, None when it is zero.
pub fn one(
    conn: &Connection,
    disk: DiskId,
    point: PointId,
    idx: u64,
) -> Result<Option<BlockHash>, CatalogError> {
    let span = Span::leaves(disk, point, idx..idx.saturating_add(1));
    Ok(page(conn, &span, Columns::Hashes, 1)?
        .first()
        .map(|n| n.hash))
}

/// Indexes of the blocks of `disk` with a version in `(after, upto]` (any version up to `upto`
/// when `after` is None): the only blocks that can differ between those two points.
pub fn touched_between(
    conn: &Connection,
    disk: DiskId,
    after: Option<PointId>,
    upto: PointId,
) -> rusqlite::Result<std::collections::BTreeSet<u64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT idx FROM nodes WHERE disk_id = ?1 AND level = 0 AND point > ?2 AND point <= ?3",
    )?;
    let rows = stmt.query_map(params![disk, after.map_or(-1, |p| p.0), upto], |r| {
        r.get::<_, i64>(0)
    })?;
    rows.map(|r| r.map(|i| i as u64)).collect()
}

/// A block index as SQLite's signed integer; past `i64::MAX` means "to the end".
fn clamp(idx: u64) -> i64 {
    i64::try_from(idx).unwrap_or(i64::MAX)
}

fn location(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<ChunkLocation>> {
    Ok(
        match (
            r.get::<_, Option<i64>>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, Option<i64>>(4)?,
        ) {
            (Some(p), Some(o), Some(l)) => Some(ChunkLocation::from_columns(p, o, l)),
            _ => None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        super::super::schema::migrate(&conn).expect("schema");
        conn.execute_batch(
            "INSERT INTO vms(id, name, owner, created_us) VALUES (1, 'v', 'a', 0);
             INSERT INTO disks(id, vm_id, name, size, block_size) VALUES (1, 1, 'vda', 65536, 4096);
             INSERT INTO nodes(disk_id, level, idx, point, hash) VALUES
               (1, 0, 0, 1, x'0101010101010101010101010101010101010101010101010101010101010101'),
               (1, 0, 0, 3, NULL),
               (1, 0, 2, 1, x'0202020202020202020202020202020202020202020202020202020202020202'),
               (1, 0, 2, 2, x'0303030303030303030303030303030303030303030303030303030303030303'),
               (1, 0, 5, 4, x'0404040404040404040404040404040404040404040404040404040404040404');
             INSERT INTO chunks(owner, hash, pack_id, offset, clen, ulen) VALUES
               ('a', x'0303030303030303030303030303030303030303030303030303030303030303', 7, 40, 9, 4096);",
        )
        .expect("rows");
        conn
    }

    fn leaves(conn: &Connection, point: i64, blocks: Range<u64>) -> Vec<(u64, u8)> {
        page(
            conn,
            &Span::leaves(DiskId(1), PointId(point), blocks),
            Columns::Hashes,
            100,
        )
        .expect("page")
        .into_iter()
        .map(|n| (n.idx, n.hash.0[0]))
        .collect()
    }

    #[test]
    fn a_block_is_its_newest_version_not_after_the_point() {
        let conn = catalog();
        assert_eq!(leaves(&conn, 1, 0..u64::MAX), vec![(0, 1), (2, 2)]);
        assert_eq!(leaves(&conn, 2, 0..u64::MAX), vec![(0, 1), (2, 3)]);
        // A NULL version is a zero block again; a block written later is not there yet.
        assert_eq!(leaves(&conn, 3, 0..u64::MAX), vec![(2, 3)]);
        assert_eq!(leaves(&conn, 4, 3..6), vec![(5, 4)]);
        // One block at a time agrees with the range.
        for p in 1..=4 {
            let one: Vec<_> = (0..8).flat_map(|i| leaves(&conn, p, i..i + 1)).collect();
            assert_eq!(one, leaves(&conn, p, 0..8), "point {p}");
        }
    }

    #[test]
    fn pages_stop_at_their_limit_and_locations_come_from_the_owner() {
        let conn = catalog();
        let span = Span::all_leaves(DiskId(1), PointId(4));
        let first = page(&conn, &span, Columns::Located, 1).expect("page");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].idx, 2);
        assert_eq!(first[0].at, Some(ChunkLocation::from_columns(7, 40, 9)));
        let all = page(&conn, &span, Columns::Located, 10).expect("page");
        assert_eq!(all.iter().map(|n| n.idx).collect::<Vec<_>>(), vec![2, 5]);
        assert_eq!(all[1].at, None);
    }
}
