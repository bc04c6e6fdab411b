//! What a copying receiver took from its source: one row per source point, written before the
//! point's blocks are sent (with the local session) and completed when it commits, so a copy
//! interrupted at any instant resumes that session and never makes a point twice.

use rusqlite::{params, Connection, OptionalExtension};

/// Where the next copy run of `vm` from `source` starts: after the last source point copied,
/// or just before the oldest one begun and not committed (a run cut short), which is resumed.
pub fn copied_upto(conn: &Connection, source: &str, vm: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(
           (SELECT MIN(source_point) - 1 FROM copies
             WHERE source = ?1 AND vm = ?2 AND point IS NULL),
           (SELECT MAX(source_point) FROM copies WHERE source = ?1 AND vm = ?2),
           0)",
        params![source, vm],
        |r| r.get(0),
    )
}

/// Whether `source` ever copied into `vm` (a VM of this receiver's own agents is never
/// written by a copy).
pub fn is_copied(conn: &Connection, source: &str, vm: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM copies WHERE source = ?1 AND vm = ?2)",
        params![source, vm],
        |r| r.get(0),
    )
}

/// The source that copies into `vm`, if one does.
pub fn copied_from(conn: &Connection, vm: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT source FROM copies WHERE vm = ?1 LIMIT 1")?
        .query_row([vm], |r| r.get(0))
        .optional()
}

/// The local session of a source point begun and not committed yet.
pub fn pending(
    conn: &Connection,
    source: &str,
    vm: &str,
    source_point: i64,
) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT session FROM copies WHERE source = ?1 AND vm = ?2 AND source_point = ?3 AND point IS NULL",
        params![source, vm, source_point],
        |r| r.get(0),
    )
    .optional()
}

/// Records that source point `source_point` is being copied as local session `session`.
pub fn begin(
    conn: &Connection,
    source: &str,
    vm: &str,
    source_point: i64,
    session: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO copies(source, vm, source_point, session, point, copied_us)
         VALUES (?1, ?2, ?3, ?4, NULL, 0)
         ON CONFLICT(source, vm, source_point) DO UPDATE SET session = excluded.session",
        params![source, vm, source_point, session],
    )
    .map(|_| ())
}

/// Records that source point `source_point` is local point `point`.
pub fn done(
    conn: &Connection,
    source: &str,
    vm: &str,
    source_point: i64,
    point: i64,
    now_us: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE copies SET point = ?4, copied_us = ?5 WHERE source = ?1 AND vm = ?2 AND source_point = ?3",
        params![source, vm, source_point, point, now_us],
    )
    .map(|_| ())
}

/// What the last copy run saw of a source's VM: the newest source point's creation time, and
/// the creation time of the newest one copied (for the lag metric).
pub fn record_seen(
    conn: &Connection,
    source: &str,
    vm: &str,
    newest_us: i64,
    copied_us: i64,
    now_us: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO copy_lag(source, vm, newest_us, copied_us, checked_us) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(source, vm) DO UPDATE SET newest_us = excluded.newest_us,
           copied_us = excluded.copied_us, checked_us = excluded.checked_us",
        params![source, vm, newest_us, copied_us, now_us],
    )
    .map(|_| ())
}

/// One VM's copy lag as the last run saw it.
#[derive(Debug, Clone)]
pub struct Lag {
    pub source: String,
    pub vm: String,
    pub newest_us: i64,
    pub copied_us: i64,
    pub checked_us: i64,
}

/// Every VM's copy lag.
pub fn lags(conn: &Connection) -> rusqlite::Result<Vec<Lag>> {
    let mut stmt = conn.prepare(
        "SELECT source, vm, newest_us, copied_us, checked_us FROM copy_lag ORDER BY source, vm",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Lag {
            source: r.get(0)?,
            vm: r.get(1)?,
            newest_us: r.get(2)?,
            copied_us: r.get(3)?,
            checked_us: r.get(4)?,
        })
    })?;
    rows.collect()
}
