//! What a copying receiver took from its source: one row per source point, written before the
//! point's blocks are sent (with the local session) and completed when it commits, so a copy
//! interrupted at any instant resumes that session and never makes a point twice.
//!
//! Rows are kept per source history ([`history_id`]): a source rebuilt from a snapshot by
//! `recover` (or set up anew at the same address) hands point ids out again, so a source point
//! is the same point only within one history. On a source's new history the copy takes over
//! the rows of the points it still lists with the same id and creation time ([`carry_over`]);
//! the rows of other histories stay as the record of what was copied.

use rusqlite::{params, Connection, OptionalExtension};

/// This catalog's history id: random, made with the catalog, made anew by `recover`.
pub fn history_id(conn: &Connection) -> rusqlite::Result<String> {
    conn.query_row("SELECT id FROM history", [], |r| r.get(0))
}

/// Gives this catalog a new history id (`recover`: point ids after the snapshot's are handed
/// out again, so copies must not take them for points they hold).
pub fn new_history(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute("UPDATE history SET id = lower(hex(randomblob(16)))", [])
        .map(|_| ())
}

/// One source and history, as the copy's rows name it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub url: &'a str,
    pub history: &'a str,
}

/// Where the next copy run of `vm` from `source` starts: after the last source point copied,
/// or just before the oldest one begun and not committed (a run cut short), which is resumed.
pub fn copied_upto(conn: &Connection, source: Source<'_>, vm: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(
           (SELECT MIN(source_point) - 1 FROM copies
             WHERE source = ?1 AND vm = ?2 AND history = ?3 AND point IS NULL),
           (SELECT MAX(source_point) FROM copies WHERE source = ?1 AND vm = ?2 AND history = ?3),
           0)",
        params![source.url, vm, source.history],
        |r| r.get(0),
    )
}

/// Whether `vm` was copied from `source` under another history and not yet under `history`:
/// the source was rebuilt or replaced, and its points must be matched ([`carry_over`]) before
/// any is copied.
pub fn history_changed(conn: &Connection, source: Source<'_>, vm: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM copies WHERE source = ?1 AND vm = ?2 AND history <> ?3)
            AND NOT EXISTS(SELECT 1 FROM copies WHERE source = ?1 AND vm = ?2 AND history = ?3)",
        params![source.url, vm, source.history],
        |r| r.get(0),
    )
}

/// Takes over, under `source`'s current history, the committed copies of the source points
/// it lists (`listed`: id and creation time) that another history copied with the same id and
/// creation time (or with none recorded, when no history recorded one for that id: rows from
/// before histories were kept); returns how many. The others are new points to copy.
pub fn carry_over(
    conn: &mut Connection,
    source: Source<'_>,
    vm: &str,
    listed: &[(i64, i64)],
) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut taken = 0;
    {
        let mut stmt = tx.prepare(
            "INSERT OR IGNORE INTO copies(source, vm, history, source_point, source_created_us,
                                          session, point, copied_us)
             SELECT source, vm, ?3, source_point, ?5, session, point, copied_us FROM copies
              WHERE source = ?1 AND vm = ?2 AND history <> ?3 AND source_point = ?4
                AND point IS NOT NULL
                AND (source_created_us = ?5
                     OR source_created_us IS NULL AND NOT EXISTS (
                       SELECT 1 FROM copies WHERE source = ?1 AND vm = ?2 AND source_point = ?4
                          AND source_created_us IS NOT NULL))
              ORDER BY copied_us DESC LIMIT 1",
        )?;
        for &(id, created_us) in listed {
            taken += stmt.execute(params![source.url, vm, source.history, id, created_us])?;
        }
    }
    tx.commit()?;
    Ok(taken)
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
    source: Source<'_>,
    vm: &str,
    source_point: i64,
) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT session FROM copies
          WHERE source = ?1 AND vm = ?2 AND history = ?3 AND source_point = ?4 AND point IS NULL",
        params![source.url, vm, source.history, source_point],
        |r| r.get(0),
    )
    .optional()
}

/// Records that source point `source_point` is being copied as local session `session`.
pub fn begin(
    conn: &Connection,
    source: Source<'_>,
    vm: &str,
    (source_point, source_created_us): (i64, i64),
    session: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO copies(source, vm, history, source_point, source_created_us, session, point,
                            copied_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, 0)
         ON CONFLICT(source, vm, history, source_point) DO UPDATE SET session = excluded.session",
        params![
            source.url,
            vm,
            source.history,
            source_point,
            source_created_us,
            session
        ],
    )
    .map(|_| ())
}

/// Records that source point `source_point` is local point `point`.
pub fn done(
    conn: &Connection,
    source: Source<'_>,
    vm: &str,
    source_point: i64,
    point: i64,
    now_us: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE copies SET point = ?5, copied_us = ?6
          WHERE source = ?1 AND vm = ?2 AND history = ?3 AND source_point = ?4",
        params![source.url, vm, source.history, source_point, point, now_us],
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

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://primary:7443";

    fn source(history: &str) -> Source<'_> {
        Source { url: URL, history }
    }

    /// Committed copies of source points (id, creation time) under `history`.
    fn copied(conn: &Connection, history: &str, points: &[(i64, Option<i64>)]) {
        for (k, &(id, created)) in points.iter().enumerate() {
            conn.execute(
                "INSERT INTO copies(source, vm, history, source_point, source_created_us, session,
                                    point, copied_us)
                 VALUES (?1, 'vm1', ?2, ?3, ?4, ?5, ?6, 1)",
                params![
                    URL,
                    history,
                    id,
                    created,
                    format!("s{history}{id}"),
                    k as i64 + 1
                ],
            )
            .expect("row");
        }
    }

    /// Copies from before histories were kept (no creation time) are taken over by id; later
    /// ones only with the same creation time; a point the new history lists that matches none
    /// is left to copy, after the newest one taken over.
    #[test]
    fn a_new_history_takes_over_the_points_it_still_lists_and_no_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = crate::catalog::open_rw(dir.path()).expect("catalog");
        copied(&conn, "", &[(10, None), (20, None), (30, None)]);
        assert!(!history_changed(&conn, source(""), "vm1").expect("check"));
        assert!(history_changed(&conn, source("h1"), "vm1").expect("check"));

        // The source's catalog got a history id: 30 was lost, 25 made since.
        let listed = [(10, 100), (20, 200), (25, 250)];
        assert_eq!(
            carry_over(&mut conn, source("h1"), "vm1", &listed).expect("take"),
            2
        );
        assert!(!history_changed(&conn, source("h1"), "vm1").expect("check"));
        assert_eq!(copied_upto(&conn, source("h1"), "vm1").expect("upto"), 20);
        copied(&conn, "h1", &[(25, Some(250))]);

        // Rebuilt again: 20 is listed with another creation time (another point), 15 is new.
        let listed = [(10, 100), (15, 150), (20, 999)];
        assert_eq!(
            carry_over(&mut conn, source("h2"), "vm1", &listed).expect("take"),
            1
        );
        assert_eq!(copied_upto(&conn, source("h2"), "vm1").expect("upto"), 10);
        // Taking over again changes nothing; the rows of earlier histories stay.
        assert_eq!(
            carry_over(&mut conn, source("h2"), "vm1", &listed).expect("take"),
            0
        );
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM copies", [], |r| r.get(0))
            .expect("count");
        assert_eq!(rows, 3 + 3 + 1);
        assert_eq!(
            copied_from(&conn, "vm1").expect("from").as_deref(),
            Some(URL)
        );
    }

    /// `recover` gives the catalog a new history id.
    #[test]
    fn a_new_history_id_differs_from_the_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = crate::catalog::open_rw(dir.path()).expect("catalog");
        let old = history_id(&conn).expect("id");
        assert_eq!(old.len(), 32);
        new_history(&conn).expect("new");
        assert_ne!(history_id(&conn).expect("id"), old);
    }
}
