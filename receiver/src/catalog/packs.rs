//! Pack rows: ids handed out to writers (never reused), and sealing, which is what lets gc touch
//! a pack.

use super::now_us;
use crate::chunks::PackId;
use rusqlite::Connection;

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

/// The greatest pack id handed out so far (0 before the first).
pub fn handed_out(conn: &Connection) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'packs'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Whether the catalog has a row for pack `id`.
pub fn exists(conn: &Connection, id: PackId) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM packs WHERE id = ?1)",
        [id],
        |r| r.get(0),
    )
}

/// Sealed packs gc may rewrite or delete at `now_us`: not under Object Lock.
pub fn collectable(conn: &Connection, now_us: i64) -> rusqlite::Result<Vec<(PackId, i64)>> {
    let mut stmt = conn.prepare(
        "SELECT id, created_us FROM packs WHERE sealed = 1 AND retain_until_us <= ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([now_us], |r| Ok((PackId(r.get(0)?), r.get(1)?)))?;
    rows.collect()
}

/// Until when pack `id`'s object is retained (0: not at all, or no such pack).
pub fn retained_until(conn: &Connection, id: i64) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT retain_until_us FROM packs WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Records that pack `id`'s object is retained until `until_us`.
pub fn set_retained(conn: &Connection, id: i64, until_us: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE packs SET retain_until_us = MAX(retain_until_us, ?2) WHERE id = ?1",
        [id, until_us],
    )
    .map(|_| ())
}

/// Forgets pack `id`'s row. Only once no chunk row refers to it; its file goes after.
pub fn forget(conn: &Connection, id: PackId) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM packs WHERE id = ?1", [id])
        .map(|_| ())
}
