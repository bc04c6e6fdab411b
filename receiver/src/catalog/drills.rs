//! The `drills` table: one row per DR drill, with the report as JSON and its headline figures
//! as columns for status and metrics.

use rusqlite::{params, Connection};

/// One drill as it is recorded.
#[derive(Debug, Clone)]
pub struct NewDrill<'a> {
    pub vm: &'a str,
    pub point: Option<i64>,
    pub started_us: i64,
    pub point_age_s: Option<f64>,
    pub verified_s: Option<f64>,
    pub boot_s: Option<f64>,
    pub rto_s: Option<f64>,
    pub result: &'a str,
    pub reason: Option<&'a str>,
    /// The whole report, as JSON.
    pub detail: &'a str,
}

/// Records a drill; returns its id.
pub fn record(conn: &Connection, d: &NewDrill<'_>) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO drills(vm, point, started_us, point_age_s, verified_s, boot_s, rto_s,
                            result, reason, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            d.vm,
            d.point,
            d.started_us,
            d.point_age_s,
            d.verified_s,
            d.boot_s,
            d.rto_s,
            d.result,
            d.reason,
            d.detail
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// A recorded drill's id and report (JSON), oldest first, of one VM or all.
pub fn history(conn: &Connection, vm: Option<&str>) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut stmt =
        conn.prepare("SELECT id, detail FROM drills WHERE ?1 IS NULL OR vm = ?1 ORDER BY id")?;
    let rows = stmt.query_map(params![vm], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// When the VM's newest drill started, if it had one.
pub fn last_started(conn: &Connection, vm: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT MAX(started_us) FROM drills WHERE vm = ?1",
        [vm],
        |r| r.get(0),
    )
}

/// How many drills of one VM ended with one result.
#[derive(Debug, Clone)]
pub struct ResultCount {
    pub vm: String,
    pub result: String,
    pub count: i64,
}

/// Drills per VM and result, by VM, then result.
pub fn counts(conn: &Connection) -> rusqlite::Result<Vec<ResultCount>> {
    let mut stmt = conn.prepare(
        "SELECT vm, result, COUNT(*) FROM drills GROUP BY vm, result ORDER BY vm, result",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ResultCount {
            vm: r.get(0)?,
            result: r.get(1)?,
            count: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// The headline of a VM's newest drill.
#[derive(Debug, Clone)]
pub struct LastDrill {
    pub vm: String,
    pub result: String,
    pub rto_s: Option<f64>,
    pub point_age_s: Option<f64>,
    pub started_us: i64,
}

/// Each VM's newest drill, by VM.
pub fn last_per_vm(conn: &Connection) -> rusqlite::Result<Vec<LastDrill>> {
    let mut stmt = conn.prepare(
        "SELECT d.vm, d.result, d.rto_s, d.point_age_s, d.started_us FROM drills d
         WHERE d.id = (SELECT MAX(id) FROM drills e WHERE e.vm = d.vm) ORDER BY d.vm",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(LastDrill {
            vm: r.get(0)?,
            result: r.get(1)?,
            rto_s: r.get(2)?,
            point_age_s: r.get(3)?,
            started_us: r.get(4)?,
        })
    })?;
    rows.collect()
}
