//! The `events` table: what happened to the store (prune, verify, rollback, clock steps), one
//! JSON detail per row.

use super::points::VmId;
use rusqlite::{params, Connection, OptionalExtension};

/// One event as it is recorded.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// The VM it concerns, or None for the whole store.
    pub vm: Option<VmId>,
    pub kind: &'a str,
    pub point: Option<i64>,
    /// JSON.
    pub detail: &'a str,
    pub at_us: i64,
}

/// Records an event; returns its id.
pub fn record(conn: &Connection, e: &NewEvent<'_>) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO events(vm_id, kind, point, detail, created_us) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![e.vm, e.kind, e.point, e.detail, e.at_us])?;
    Ok(conn.last_insert_rowid())
}

/// How many events of `kind` the VM has.
pub fn count_of_vm(conn: &Connection, vm: VmId, kind: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM events WHERE vm_id = ?1 AND kind = ?2",
        params![vm, kind],
        |r| r.get(0),
    )
}

/// The number of event `id` among the VM's own events (1 for its first).
pub fn number_in_vm(conn: &Connection, vm: VmId, id: i64) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM events WHERE vm_id = ?1 AND id <= ?2",
        params![vm, id],
        |r| r.get(0),
    )
}

/// The details of every event of `kind`, oldest first.
pub fn details(conn: &Connection, kind: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT detail FROM events WHERE kind = ?1")?;
    let rows = stmt.query_map([kind], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// The detail of the newest event of `kind`.
pub fn last_detail(conn: &Connection, kind: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT detail FROM events WHERE kind = ?1 ORDER BY id DESC LIMIT 1",
        [kind],
        |r| r.get(0),
    )
    .optional()
}

/// How many events of `kind` there are.
pub fn count(conn: &Connection, kind: &str) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COUNT(*) FROM events WHERE kind = ?1", [kind], |r| {
        r.get(0)
    })
}
