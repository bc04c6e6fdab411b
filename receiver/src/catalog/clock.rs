//! The `clock_steps` table: wall-clock steps `serve` saw (see [`crate::clock`]).

use rusqlite::{params, Connection};

/// Records a step of `step_us` seen at `at_us`.
pub fn record_step(conn: &Connection, at_us: i64, step_us: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO clock_steps(at_us, step_us) VALUES (?1, ?2)",
        params![at_us, step_us],
    )
    .map(|_| ())
}

/// The sum of the forward steps seen after `since_us`.
pub fn forward_since(conn: &Connection, since_us: i64) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(SUM(step_us), 0) FROM clock_steps WHERE step_us > 0 AND at_us > ?1",
        [since_us],
        |r| r.get(0),
    )
}

/// How many steps were recorded, and the newest one.
pub fn summary(conn: &Connection) -> rusqlite::Result<(i64, Option<i64>)> {
    conn.query_row(
        "SELECT COUNT(*), (SELECT step_us FROM clock_steps ORDER BY rowid DESC LIMIT 1) FROM clock_steps",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}
