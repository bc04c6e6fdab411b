//! Removing points by retention rules, and locking points against removal.
//!
//! Removing point P of a disk whose remaining points around it are B (before; maybe none) and N
//! (next; the very next one, even if it is to be removed too) deletes the versions in (B, P]
//! that a version in (P, N] replaces: no remaining point sees them. The others stay under P's
//! id (a reader takes a node's newest version not after its point, whether or not a point of
//! that id still exists), so N sees them as it did. The cost follows the rows in (P, N] (what
//! changed after P), never the disk size nor the history before P: removing the oldest point
//! of a long history, which holds the whole disk, costs what its successor changed. Each point
//! is removed in its own transaction, so a crash between two leaves every remaining point
//! whole.
//!
//! Ordering rule: prune removes references before gc removes chunks; chunks are never touched
//! here.

use crate::catalog::points::{self as rows, VmId};
use crate::catalog::{events, leaves, now_us, parse_rfc3339, rfc3339, PointId};
use crate::error::StoreError;
use crate::retention::{self, Candidate, Policy, Verdict};
use rusqlite::Connection;
use serde::Serialize;
use time::OffsetDateTime;

/// What prune decided (and did, unless a dry run) for one VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmPrune {
    pub vm: String,
    pub kept: Vec<Verdict>,
    pub removed: Vec<i64>,
    /// Node rows deleted: the work done, proportional to what changed after the removed points.
    pub rows_touched: u64,
}

fn vms(conn: &Connection, only: Option<&str>) -> Result<Vec<(VmId, String)>, StoreError> {
    let rows = rows::vms(conn, only)?;
    if let Some(vm) = only {
        if rows.is_empty() {
            return Err(StoreError::UnknownVm(vm.to_owned()));
        }
    }
    Ok(rows)
}

fn candidates(conn: &Connection, vm: VmId) -> Result<Vec<Candidate>, StoreError> {
    // A forward clock step must not end a lock early.
    let now = crate::clock::cautious_now(conn)?;
    Ok(rows::keep_rows(conn, vm)?
        .into_iter()
        .map(|k| Candidate {
            id: k.id.0,
            created: OffsetDateTime::from_unix_timestamp_nanos(i128::from(k.created_us) * 1000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            locked: k.locked_until_us > now,
            in_use: k.in_use,
        })
        .collect())
}

/// Applies `policy` to every VM (or one); with `dry_run` only reports.
pub fn prune(
    conn: &mut Connection,
    only: Option<&str>,
    policy: &Policy,
    dry_run: bool,
) -> Result<Vec<VmPrune>, StoreError> {
    if policy.is_empty() {
        return Err(StoreError::NoPolicy);
    }
    let mut out = Vec::new();
    for (vm_id, vm) in vms(conn, only)? {
        let verdicts = retention::decide(&candidates(conn, vm_id)?, policy);
        let removed: Vec<i64> = verdicts.iter().filter(|v| !v.keep).map(|v| v.id).collect();
        let mut rows = 0;
        if !dry_run {
            // Newest first: each removed point's rows then move once, straight to the point
            // that stays after it.
            for &p in removed.iter().rev() {
                rows += remove_point(conn, p)?;
                rewind_proto::faults::point("prune-between-points");
            }
        }
        out.push(VmPrune {
            vm,
            kept: verdicts.into_iter().filter(|v| v.keep).collect(),
            removed,
            rows_touched: rows,
        });
    }
    Ok(out)
}

/// Removes one point in one transaction, folding its node versions into the next kept point of
/// each of its disks. Re-checks, inside the transaction, that it is not locked, not the newest
/// and not the base of an open session (serve may have changed that since the decision).
fn remove_point(conn: &mut Connection, point: i64) -> Result<u64, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let id = PointId(point);
    let Some((vm_id, keep)) = rows::protection(&tx, id)? else {
        return Ok(0);
    };
    let newest = rows::newest(&tx, vm_id)?;
    if keep.locked_until_us > crate::clock::cautious_now(&tx)? || keep.in_use || newest == Some(id)
    {
        return Err(StoreError::Protected(point));
    }
    let mut touched = 0u64;
    for disk in rows::disk_ids(&tx, id)? {
        // The very next point of this disk, even one this prune will remove too: a version
        // replaced only after it is still what it sees, and a prune killed before removing it
        // must leave it whole. Its own removal then drops what its successor replaces.
        let (prev, next) = rows::neighbours_with_disk(&tx, disk, id)?;
        touched += match next {
            Some(next) => leaves::fold_into(&tx, disk, (prev, id, next))?,
            None => leaves::drop_point(&tx, disk, prev, id)?,
        };
    }
    rows::delete(&tx, id)?;
    let detail = format!("{{\"rows\": {touched}}}");
    let event = events::NewEvent {
        vm: Some(vm_id),
        kind: "prune",
        point: Some(point),
        detail: &detail,
        at_us: now_us(),
    };
    events::record(&tx, &event)?;
    tx.commit()?;
    Ok(touched)
}

/// Locks a point against prune until `until` (RFC 3339). A lock can only be extended.
pub fn lock(conn: &Connection, vm: &str, point: i64, until: &str) -> Result<String, StoreError> {
    let until_us = parse_rfc3339(until).map_err(|_| StoreError::BadTime(until.to_owned()))?;
    let p = crate::points::resolve(conn, vm, &crate::points::PointSelector::Id(point))?;
    Ok(rfc3339(rows::extend_lock(conn, PointId(p.id), until_us)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;
    use std::collections::BTreeMap;

    /// Leaves (level 0) of disk 1 as point `p` sees them.
    fn view(conn: &Connection, p: i64) -> BTreeMap<i64, Vec<u8>> {
        let mut stmt = conn
            .prepare(
                "SELECT idx, hash, MAX(point) FROM nodes WHERE disk_id = 1 AND level = 0
                 AND point <= ?1 GROUP BY idx",
            )
            .expect("prepare");
        stmt.query_map([p], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .expect("query")
            .map(|r| r.expect("row"))
            .collect()
    }

    /// Node rows of disk 1, and the versions some remaining point sees: a removal must leave
    /// none that no point sees (a leak that would keep chunks alive forever).
    fn rows_and_seen(conn: &Connection, remaining: &[i64]) -> (usize, usize) {
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM nodes WHERE disk_id = 1", [], |r| {
                r.get(0)
            })
            .expect("count");
        let mut seen = std::collections::BTreeSet::new();
        for &q in remaining {
            let mut stmt = conn
                .prepare(
                    "SELECT level, idx, MAX(point) FROM nodes WHERE disk_id = 1 AND point <= ?1
                     GROUP BY level, idx",
                )
                .expect("prepare");
            let versions = stmt
                .query_map([q], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .expect("query");
            seen.extend(versions.map(|v| v.expect("row")));
        }
        (rows as usize, seen.len())
    }

    /// A catalog with points 1..=5 of one disk, each rewriting some of 16 blocks (overlapping).
    fn five_points() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = crate::catalog::open_rw(dir.path()).expect("catalog");
        conn.execute_batch(
            "INSERT INTO vms(id, name, owner, created_us) VALUES (1, 'v', 'a', 0);
             INSERT INTO disks(id, vm_id, name, size, block_size) VALUES (1, 1, 'vda', 1048576, 65536);",
        )
        .expect("vm");
        let writes: [&[i64]; 5] = [
            &[0, 1, 2, 3, 4, 5],
            &[1, 2, 9],
            &[2, 3, 10],
            &[0, 9, 11],
            &[4, 12],
        ];
        for (k, blocks) in writes.iter().enumerate() {
            let p = k as i64 + 1;
            conn.execute(
                "INSERT INTO points(id, vm_id, parent, created_us, committed_us, session)
                 VALUES (?1, 1, ?2, ?1, ?1, ?3)",
                params![p, (p > 1).then_some(p - 1), format!("s{p}")],
            )
            .expect("point");
            conn.execute(
                "INSERT INTO point_disks(point_id, name, disk_id, size, block_size, root, changed_blocks)
                 VALUES (?1, 'vda', 1, 1048576, 65536, x'00', ?2)",
                params![p, blocks.len() as i64],
            )
            .expect("point disk");
            for &b in *blocks {
                conn.execute(
                    "INSERT INTO nodes(disk_id, level, idx, point, hash) VALUES (1, 0, ?1, ?2, ?3)",
                    params![b, p, vec![p as u8, b as u8]],
                )
                .expect("node");
            }
        }
        (dir, conn)
    }

    /// Removes points in `order` from a fresh [`five_points`] catalog, one transaction at a
    /// time, checking after each that every remaining point sees exactly the leaves it saw
    /// before and that no row is left that no remaining point sees.
    fn remove_checking(order: &[i64]) {
        let (_dir, mut conn) = five_points();
        let before: Vec<_> = (1..=5).map(|p| view(&conn, p)).collect();
        let mut remaining: Vec<i64> = (1..=5).collect();
        for &p in order {
            remove_point(&mut conn, p).expect("remove");
            remaining.retain(|&q| q != p);
            for &q in &remaining {
                assert_eq!(
                    view(&conn, q),
                    before[q as usize - 1],
                    "order {order:?}: point {q} after removing {p}"
                );
            }
            let (rows, seen) = rows_and_seen(&conn, &remaining);
            assert_eq!(
                rows, seen,
                "order {order:?}: leaked rows after removing {p}"
            );
        }
    }

    /// Every state a prune of points 1..=4 of 5 passes through (it may be killed after any
    /// removal) leaves each remaining point seeing exactly the leaves it saw before, and no
    /// row that no remaining point sees.
    #[test]
    fn every_step_of_a_prune_leaves_the_remaining_points_whole() {
        let (_dir, mut conn) = five_points();
        let policy = Policy {
            last: Some(1),
            ..Policy::default()
        };
        let plan = prune(&mut conn, Some("v"), &policy, true).expect("dry run");
        assert_eq!(plan[0].removed, vec![1, 2, 3, 4]);
        // The removals prune makes (newest first), in its order.
        remove_checking(&[4, 3, 2, 1]);
    }

    /// Any order of removals (oldest first, from the middle out, ...) keeps every remaining
    /// point whole and leaves no row that no remaining point sees.
    #[test]
    fn removals_in_any_order_keep_the_rest_whole_and_leak_no_row() {
        for order in [[1, 2, 3, 4], [2, 3, 1, 4], [3, 1, 4, 2], [4, 1, 3, 2]] {
            remove_checking(&order);
        }
    }
}
