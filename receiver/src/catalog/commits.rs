//! The record of a stepped commit in flight (`pending_commits`): the point id it reserved and
//! the disk generations it wrote, so whatever it left can be removed if it never finishes.

use super::VmId;
use rusqlite::{params, Connection, OptionalExtension};

/// One pending commit.
#[derive(Debug, Clone)]
pub struct Pending {
    pub session_id: String,
    pub vm_id: VmId,
    pub point: i64,
    /// The disk generations it writes nodes to, as JSON (a list of ids).
    pub disks: String,
    /// Those of them it created, as JSON.
    pub new_disks: String,
}

/// Records a stepped commit before it writes any node.
pub fn record(conn: &Connection, p: &Pending) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO pending_commits(session_id, vm_id, point, disks, new_disks)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![p.session_id, p.vm_id, p.point, p.disks, p.new_disks],
    )
    .map(|_| ())
}

/// Removes the record of the session's commit at `point`, once that point is visible;
/// returns how many records it removed (1 unless something removed it meanwhile).
pub fn finish(conn: &Connection, session_id: &str, point: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM pending_commits WHERE session_id = ?1 AND point = ?2",
        params![session_id, point],
    )
}

/// One pending commit of VM `vm_id` (of any VM when None).
pub fn next(conn: &Connection, vm_id: Option<VmId>) -> rusqlite::Result<Option<Pending>> {
    conn.query_row(
        "SELECT session_id, point, disks, new_disks, vm_id FROM pending_commits
         WHERE ?1 IS NULL OR vm_id = ?1 LIMIT 1",
        [vm_id],
        |r| {
            Ok(Pending {
                session_id: r.get(0)?,
                vm_id: r.get(4)?,
                point: r.get(1)?,
                disks: r.get(2)?,
                new_disks: r.get(3)?,
            })
        },
    )
    .optional()
}

/// Forgets the session's pending record.
pub fn forget(conn: &Connection, session_id: &str) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM pending_commits WHERE session_id = ?1",
        [session_id],
    )
    .map(|_| ())
}
