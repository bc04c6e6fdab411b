//! What each VM's replication has been doing, kept in the agent's state database by every
//! cycle (`sync` and `run`), and read by `status` and the metrics endpoint, so both tell the
//! truth after a restart.
//!
//! States: `seeding` (no point yet), `replicating` (newest point within 2x the RPO target),
//! `behind` (no point within 2x the RPO target), `failing` (the last cycle failed). A VM is
//! alert-worthy when it has no point within 2x its RPO target.

use crate::error::SyncError;
use crate::sync::SyncReport;
use rusqlite::{params, Connection};
use serde::Serialize;
use std::fmt::Write as _;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS health(
  vm TEXT PRIMARY KEY,
  rpo_s INTEGER NOT NULL,
  first_seen_us INTEGER NOT NULL,
  last_start_us INTEGER,
  last_cycle_s REAL,
  last_ok_us INTEGER,
  last_point INTEGER,
  last_point_created_us INTEGER,
  last_error TEXT,
  last_error_kind TEXT,
  last_error_us INTEGER,
  consecutive_failures INTEGER NOT NULL DEFAULT 0,
  cycles_ok INTEGER NOT NULL DEFAULT 0,
  cycles_failed INTEGER NOT NULL DEFAULT 0,
  bytes_read INTEGER NOT NULL DEFAULT 0,
  bytes_sent INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS health_failures(
  vm TEXT NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL,
  PRIMARY KEY(vm, kind)) WITHOUT ROWID;
";

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

fn parse_us(rfc3339: &str) -> Option<i64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
}

fn text_us(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| us.to_string())
}

fn ensure(conn: &Connection, vm: &str, rpo_s: u64) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute(
        "INSERT INTO health(vm, rpo_s, first_seen_us) VALUES (?1, ?2, ?3)
         ON CONFLICT(vm) DO UPDATE SET rpo_s = excluded.rpo_s",
        params![vm, rpo_s as i64, now_us()],
    )?;
    Ok(())
}

/// Notes that a cycle of `vm` starts.
pub fn cycle_started(conn: &Connection, vm: &str, rpo_s: u64) -> rusqlite::Result<()> {
    ensure(conn, vm, rpo_s)?;
    conn.execute(
        "UPDATE health SET last_start_us = ?2 WHERE vm = ?1",
        params![vm, now_us()],
    )?;
    Ok(())
}

/// Records how a cycle of `vm` ended.
pub fn cycle_ended(
    conn: &Connection,
    vm: &str,
    rpo_s: u64,
    seconds: f64,
    outcome: &Result<SyncReport, SyncError>,
) -> rusqlite::Result<()> {
    ensure(conn, vm, rpo_s)?;
    match outcome {
        Ok(r) => {
            let read: u64 = r.disks.iter().map(|d| d.read_bytes).sum();
            conn.execute(
                "UPDATE health SET last_cycle_s = ?2, last_ok_us = ?3, last_point = ?4,
                   last_point_created_us = ?5, consecutive_failures = 0,
                   cycles_ok = cycles_ok + 1, bytes_read = bytes_read + ?6,
                   bytes_sent = bytes_sent + ?7
                 WHERE vm = ?1",
                params![
                    vm,
                    seconds,
                    now_us(),
                    r.point,
                    parse_us(&r.created).unwrap_or_else(now_us),
                    read as i64,
                    r.sent_bytes as i64
                ],
            )?;
        }
        Err(e) => {
            conn.execute(
                "UPDATE health SET last_cycle_s = ?2, last_error = ?3, last_error_kind = ?4,
                   last_error_us = ?5, consecutive_failures = consecutive_failures + 1,
                   cycles_failed = cycles_failed + 1
                 WHERE vm = ?1",
                params![vm, seconds, e.to_string(), e.kind(), now_us()],
            )?;
            conn.execute(
                "INSERT INTO health_failures(vm, kind, count) VALUES (?1, ?2, 1)
                 ON CONFLICT(vm, kind) DO UPDATE SET count = count + 1",
                params![vm, e.kind()],
            )?;
        }
    }
    Ok(())
}

/// One VM's line of `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmStatus {
    pub vm: String,
    /// seeding, replicating, behind or failing.
    pub state: String,
    pub why: String,
    /// No point within 2x the RPO target.
    pub alert: bool,
    pub rpo_seconds: u64,
    pub last_point: Option<i64>,
    pub last_point_created: Option<String>,
    pub last_point_age_seconds: Option<f64>,
    pub last_cycle_seconds: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_kind: Option<String>,
    pub consecutive_failures: u64,
    pub cycles_ok: u64,
    pub cycles_failed: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    #[serde(skip)]
    pub failures_by_kind: Vec<(String, u64)>,
}

/// The status of every VM this agent has run a cycle for.
pub fn status(conn: &Connection) -> rusqlite::Result<Vec<VmStatus>> {
    conn.execute_batch(SCHEMA)?;
    let now = now_us();
    let mut stmt = conn.prepare(
        "SELECT vm, rpo_s, first_seen_us, last_cycle_s, last_point, last_point_created_us,
                last_error, last_error_kind, consecutive_failures, cycles_ok, cycles_failed,
                bytes_read, bytes_sent, last_ok_us
         FROM health ORDER BY vm",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<f64>>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?,
                (
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, i64>(11)?,
                    r.get::<_, i64>(12)?,
                ),
                r.get::<_, Option<i64>>(13)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (vm, rpo, first_seen, cycle_s, point, created, err, kind, counts, last_ok) in rows {
        let (fails, ok, failed, read, sent) = counts;
        let rpo = rpo.max(1) as u64;
        let limit = 2.0 * rpo as f64;
        // The newest point's age by this host's clock alone (it was taken when its cycle
        // started), so a receiver whose clock differs does not make it look old or young; a
        // step of this clock shows until the next point, and never as a negative age.
        let taken = last_ok.map(|ok| ok - (cycle_s.unwrap_or(0.0) * 1e6) as i64);
        let age = point
            .and(taken.or(created))
            .map(|t| (now - t).max(0) as f64 / 1e6);
        let since_seen = (now - first_seen).max(0) as f64 / 1e6;
        let alert = match age {
            Some(a) => a > limit,
            None => since_seen > limit,
        };
        let (state, why) = if fails > 0 {
            (
                "failing",
                format!(
                    "the last {fails} cycle(s) failed ({}): {}",
                    kind.as_deref().unwrap_or("unknown"),
                    err.as_deref().unwrap_or("")
                ),
            )
        } else if point.is_none() {
            ("seeding", "no point committed yet".to_owned())
        } else if alert {
            (
                "behind",
                format!(
                    "newest point is {:.0} s old, more than 2x the {rpo} s RPO target",
                    age.unwrap_or(0.0)
                ),
            )
        } else {
            (
                "replicating",
                format!(
                    "newest point is {:.0} s old (RPO target {rpo} s)",
                    age.unwrap_or(0.0)
                ),
            )
        };
        let failures_by_kind = {
            let mut s = conn.prepare_cached(
                "SELECT kind, count FROM health_failures WHERE vm = ?1 ORDER BY kind",
            )?;
            let rows = s.query_map([&vm], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            rows.map(|r| r.map(|(k, n)| (k, n as u64)))
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        out.push(VmStatus {
            vm,
            state: state.to_owned(),
            why,
            alert,
            rpo_seconds: rpo,
            last_point: point,
            last_point_created: created.map(text_us),
            last_point_age_seconds: age,
            last_cycle_seconds: cycle_s,
            last_error: err,
            last_error_kind: kind,
            consecutive_failures: fails as u64,
            cycles_ok: ok as u64,
            cycles_failed: failed as u64,
            bytes_read: read as u64,
            bytes_sent: sent as u64,
            failures_by_kind,
        });
    }
    Ok(out)
}

/// Forgets a VM no longer configured (its points stay on the receiver).
pub fn forget(conn: &Connection, vm: &str) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute("DELETE FROM health WHERE vm = ?1", [vm])?;
    conn.execute("DELETE FROM health_failures WHERE vm = ?1", [vm])?;
    Ok(())
}

/// The agent's metrics in Prometheus' text format.
pub fn render(conn: &Connection) -> rusqlite::Result<String> {
    let all = status(conn)?;
    let mut out = String::new();
    type Get = fn(&VmStatus) -> Option<f64>;
    let gauges: [(&str, &str, &str, Get); 9] = [
        (
            "rewind_agent_last_point_age_seconds",
            "gauge",
            "Age of the VM's newest committed point.",
            |s| s.last_point_age_seconds,
        ),
        (
            "rewind_agent_rpo_target_seconds",
            "gauge",
            "The VM's RPO target.",
            |s| Some(s.rpo_seconds as f64),
        ),
        (
            "rewind_agent_lag_ratio",
            "gauge",
            "Newest point's age over the RPO target (alert above 2).",
            |s| s.last_point_age_seconds.map(|a| a / s.rpo_seconds as f64),
        ),
        (
            "rewind_agent_alert",
            "gauge",
            "1 when the VM has no point within 2x its RPO target.",
            |s| Some(f64::from(u8::from(s.alert))),
        ),
        (
            "rewind_agent_last_cycle_seconds",
            "gauge",
            "Duration of the VM's last cycle.",
            |s| s.last_cycle_seconds,
        ),
        (
            "rewind_agent_bytes_read_total",
            "counter",
            "Disk bytes read by cycles that committed.",
            |s| Some(s.bytes_read as f64),
        ),
        (
            "rewind_agent_bytes_sent_total",
            "counter",
            "Compressed chunk bytes sent by cycles that committed.",
            |s| Some(s.bytes_sent as f64),
        ),
        (
            "rewind_agent_cycles_total",
            "counter",
            "Cycles that committed a point.",
            |s| Some(s.cycles_ok as f64),
        ),
        (
            "rewind_agent_consecutive_failures",
            "gauge",
            "Cycles failed in a row.",
            |s| Some(s.consecutive_failures as f64),
        ),
    ];
    for (name, kind, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in &all {
            if let Some(v) = get(s) {
                let _ = writeln!(out, "{name}{{vm=\"{}\"}} {v}", s.vm);
            }
        }
    }
    let name = "rewind_agent_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Failed cycles by kind.\n# TYPE {name} counter"
    );
    for s in &all {
        for (kind, n) in &s.failures_by_kind {
            let _ = writeln!(out, "{name}{{vm=\"{}\",kind=\"{kind}\"}} {n}", s.vm);
        }
    }
    Ok(out)
}
