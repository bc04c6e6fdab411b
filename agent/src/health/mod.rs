//! What each VM's replication has been doing, kept in the agent's state database by every
//! cycle (`sync` and `run`), and read by `status` and the metrics endpoint, so both tell the
//! truth after a restart.
//!
//! States: `seeding` (no point yet), `replicating` (newest point within 2x the RPO target and
//! the last point within the target), `behind` (no point within 2x the RPO target, or cycles
//! stretched: the last point landed more than the RPO target after the one before),
//! `failing` (the last cycle failed). A VM is alert-worthy when it has no point within 2x its
//! RPO target.
//!
//! The achieved RPO of a point is the data a host loss would have cost just before it
//! committed: the time from the previous point's capture to this point's commit. When the
//! guest writes faster than the link carries, cycles stretch (they never overlap and never
//! give up for being slow), the achieved RPO grows past the target and the VM shows `behind`;
//! once the burst ends, the next short cycle brings it back to `replicating` by itself. The
//! last [`RPO_WINDOW`] values give the p50 and p99 that `status` and the metrics show.

use crate::error::SyncError;
use crate::sync::SyncReport;
use rewind_proto::report::chain;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

mod metrics;
pub use metrics::render;

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
CREATE TABLE IF NOT EXISTS health_rpo(
  vm TEXT NOT NULL, at_us INTEGER NOT NULL, achieved_s REAL NOT NULL);
CREATE INDEX IF NOT EXISTS health_rpo_vm ON health_rpo(vm);
CREATE TABLE IF NOT EXISTS health_failures(
  vm TEXT NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL,
  PRIMARY KEY(vm, kind)) WITHOUT ROWID;
";

/// Achieved RPOs kept per VM for the percentiles.
pub const RPO_WINDOW: usize = 100;

/// Microseconds since the Unix epoch, now by the system's wall clock.
pub fn now_us() -> i64 {
    unix_us(time::OffsetDateTime::now_utc())
}

/// `t` in microseconds since the Unix epoch, the unit of the health record's times.
pub fn unix_us(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
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

fn ensure(conn: &Connection, vm: &str, rpo_s: u64, now: i64) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute(
        "INSERT INTO health(vm, rpo_s, first_seen_us) VALUES (?1, ?2, ?3)
         ON CONFLICT(vm) DO UPDATE SET rpo_s = excluded.rpo_s",
        params![vm, rpo_s as i64, now],
    )?;
    Ok(())
}

/// Notes that a cycle of `vm` starts at `now` (Unix microseconds, wall clock).
pub fn cycle_started(conn: &Connection, vm: &str, rpo_s: u64, now: i64) -> rusqlite::Result<()> {
    ensure(conn, vm, rpo_s, now)?;
    conn.execute(
        "UPDATE health SET last_start_us = ?2 WHERE vm = ?1",
        params![vm, now],
    )?;
    Ok(())
}

/// Records how a cycle of `vm` ended at `now` (Unix microseconds, wall clock) after `seconds`.
/// `since_previous` is the time since the previous point's capture when this process took
/// that point too, on its monotonic clock (immune to clock steps); otherwise the achieved RPO
/// comes from the recorded wall-clock times.
pub fn cycle_ended(
    conn: &Connection,
    vm: &str,
    rpo_s: u64,
    seconds: f64,
    since_previous: Option<f64>,
    outcome: &Result<SyncReport, SyncError>,
    now: i64,
) -> rusqlite::Result<()> {
    ensure(conn, vm, rpo_s, now)?;
    match outcome {
        Ok(r) => {
            let read: u64 = r.disks.iter().map(|d| d.read_bytes).sum();
            let achieved = match since_previous {
                Some(s) => Some(s),
                None => {
                    // The previous point was captured when its cycle started.
                    let prev: Option<(Option<i64>, Option<f64>)> = conn
                        .query_row(
                            "SELECT last_ok_us, last_cycle_s FROM health
                             WHERE vm = ?1 AND last_point IS NOT NULL",
                            params![vm],
                            |row| Ok((row.get(0)?, row.get(1)?)),
                        )
                        .optional()?;
                    prev.and_then(|(ok, cycle)| ok.zip(cycle))
                        .map(|(ok, cycle)| (now - ok) as f64 / 1e6 + cycle)
                        .filter(|a| *a >= 0.0)
                }
            };
            if let Some(a) = achieved {
                conn.execute(
                    "INSERT INTO health_rpo(vm, at_us, achieved_s) VALUES (?1, ?2, ?3)",
                    params![vm, now, a],
                )?;
                conn.execute(
                    "DELETE FROM health_rpo WHERE vm = ?1 AND rowid NOT IN
                       (SELECT rowid FROM health_rpo WHERE vm = ?1 ORDER BY rowid DESC LIMIT ?2)",
                    params![vm, RPO_WINDOW as i64],
                )?;
            }
            conn.execute(
                "UPDATE health SET last_cycle_s = ?2, last_ok_us = ?3, last_point = ?4,
                   last_point_created_us = ?5, consecutive_failures = 0,
                   cycles_ok = cycles_ok + 1, bytes_read = bytes_read + ?6,
                   bytes_sent = bytes_sent + ?7
                 WHERE vm = ?1",
                params![
                    vm,
                    seconds,
                    now,
                    r.point,
                    parse_us(&r.created).unwrap_or(now),
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
                params![vm, seconds, chain(e), e.kind(), now],
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
    /// The newest point's achieved RPO: from the previous point's capture to its commit.
    pub achieved_rpo_seconds: Option<f64>,
    /// Over the last [`RPO_WINDOW`] points.
    pub achieved_rpo_p50_seconds: Option<f64>,
    pub achieved_rpo_p99_seconds: Option<f64>,
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

/// The failures of a VM's latest cycles, for its state.
struct Failures<'a> {
    /// Consecutive failed cycles.
    count: i64,
    kind: Option<&'a str>,
    error: Option<&'a str>,
}

/// A VM's state and why, from what its health record says: failing (its latest cycles
/// failed), seeding (no point yet), behind (the newest point is `overdue`, i.e. older than 2x
/// the RPO target, or the last point landed later than the target after the one before), or
/// replicating.
fn state_of(
    failures: Failures<'_>,
    has_point: bool,
    overdue: Option<f64>,
    age: Option<f64>,
    rpo: u64,
    last_achieved: Option<f64>,
) -> (&'static str, String) {
    if failures.count > 0 {
        (
            "failing",
            format!(
                "the last {} cycle(s) failed ({}): {}",
                failures.count,
                failures.kind.unwrap_or("unknown"),
                failures.error.unwrap_or("")
            ),
        )
    } else if !has_point {
        ("seeding", "no point committed yet".to_owned())
    } else if let Some(old) = overdue {
        (
            "behind",
            format!("newest point is {old:.0} s old, more than 2x the {rpo} s RPO target"),
        )
    } else if let Some(a) = last_achieved.filter(|a| *a > rpo as f64) {
        (
            "behind",
            format!(
                "cycles take longer than the interval: the newest point landed {a:.0} s \
                 after the one before, over the {rpo} s RPO target (it catches up by itself \
                 when writes slow down)"
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
    }
}

/// The achieved RPOs of a VM's recent points, oldest first.
fn achieved_rpos(conn: &Connection, vm: &str) -> rusqlite::Result<Vec<f64>> {
    let mut s =
        conn.prepare_cached("SELECT achieved_s FROM health_rpo WHERE vm = ?1 ORDER BY rowid")?;
    let rows = s.query_map([vm], |r| r.get::<_, f64>(0))?;
    rows.collect()
}

/// How many cycles of a VM failed, by kind.
fn failures_by_kind(conn: &Connection, vm: &str) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut s =
        conn.prepare_cached("SELECT kind, count FROM health_failures WHERE vm = ?1 ORDER BY kind")?;
    let rows = s.query_map([vm], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    rows.map(|r| r.map(|(k, n)| (k, n as u64))).collect()
}

/// The status of every VM this agent has run a cycle for, at `now` (Unix microseconds, wall
/// clock).
pub fn status(conn: &Connection, now: i64) -> rusqlite::Result<Vec<VmStatus>> {
    conn.execute_batch(SCHEMA)?;
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
        let achieved = achieved_rpos(conn, &vm)?;
        let last_achieved = achieved.last().copied();
        let (p50, p99) = (percentile(&achieved, 0.50), percentile(&achieved, 0.99));
        let (state, why) = state_of(
            Failures {
                count: fails,
                kind: kind.as_deref(),
                error: err.as_deref(),
            },
            point.is_some(),
            alert.then_some(age.unwrap_or(0.0)),
            age,
            rpo,
            last_achieved,
        );
        let failures_by_kind = failures_by_kind(conn, &vm)?;
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
            achieved_rpo_seconds: last_achieved,
            achieved_rpo_p50_seconds: p50,
            achieved_rpo_p99_seconds: p99,
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

/// The `q` quantile of `values` (nearest rank), None when there are none.
fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied()
}

/// Forgets a VM no longer configured (its points stay on the receiver).
pub fn forget(conn: &Connection, vm: &str) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute("DELETE FROM health WHERE vm = ?1", [vm])?;
    conn.execute("DELETE FROM health_failures WHERE vm = ?1", [vm])?;
    conn.execute("DELETE FROM health_rpo WHERE vm = ?1", [vm])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_decided_from_the_record_alone() {
        let none = || Failures {
            count: 0,
            kind: None,
            error: None,
        };
        let failing = Failures {
            count: 2,
            kind: Some("disk"),
            error: Some("gone"),
        };
        let s =
            |f, point, overdue, achieved| state_of(f, point, overdue, Some(3.0), 10, achieved).0;
        assert_eq!(s(failing, true, None, None), "failing");
        assert_eq!(s(none(), false, None, None), "seeding");
        assert_eq!(s(none(), true, Some(25.0), None), "behind");
        assert_eq!(s(none(), true, None, Some(12.0)), "behind");
        assert_eq!(s(none(), true, None, Some(9.0)), "replicating");
        let (_, why) = state_of(
            Failures {
                count: 2,
                kind: Some("disk"),
                error: Some("gone"),
            },
            true,
            None,
            None,
            10,
            None,
        );
        assert_eq!(why, "the last 2 cycle(s) failed (disk): gone");
    }

    /// The test's wall-clock times: `secs(s)` is `s` seconds after an arbitrary origin, in
    /// Unix microseconds.
    fn secs(s: i64) -> i64 {
        const ORIGIN: i64 = 1_772_366_400_000_000; // 2026-03-01 12:00 UTC
        ORIGIN + s * 1_000_000
    }

    fn point(n: i64) -> Result<SyncReport, SyncError> {
        Ok(SyncReport {
            vm: "vm1".into(),
            point: n,
            created: text_us(secs(0)),
            base_point: None,
            session: String::new(),
            resumed: false,
            consistency: "crash-consistent".into(),
            freeze_ms: None,
            frozen_ms: None,
            disks: Vec::new(),
            sent_bytes: 0,
            seconds: 0.1,
        })
    }

    /// The one VM's status at `now`.
    fn only(conn: &Connection, now: i64) -> VmStatus {
        let mut all = status(conn, now).unwrap();
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    #[test]
    fn stretched_cycles_show_behind_with_the_achieved_rpo_and_recover() {
        let conn = Connection::open_in_memory().unwrap();
        // RPO target 10 s. The first point has no previous one: nothing achieved yet.
        cycle_ended(&conn, "vm1", 10, 0.1, None, &point(1), secs(1)).unwrap();
        let s = only(&conn, secs(1));
        assert_eq!(
            (s.state.as_str(), s.achieved_rpo_seconds),
            ("replicating", None)
        );
        cycle_ended(&conn, "vm1", 10, 0.1, Some(5.5), &point(2), secs(6)).unwrap();
        assert_eq!(only(&conn, secs(6)).state, "replicating");
        // A burst: cycles stretch to 30 s and 40 s, none fails.
        cycle_ended(&conn, "vm1", 10, 30.0, Some(35.0), &point(3), secs(36)).unwrap();
        let s = only(&conn, secs(36));
        assert_eq!(s.state, "behind", "{s:?}");
        // The point holds data captured 30 s ago, over 2x the target.
        assert!(s.alert);
        assert_eq!(s.last_point_age_seconds, Some(30.0));
        assert_eq!(s.achieved_rpo_seconds, Some(35.0));
        // A 6 s cycle: the data is fresh, yet the point landed 15 s after the one before.
        cycle_ended(&conn, "vm1", 10, 6.0, Some(15.0), &point(31), secs(50)).unwrap();
        let s = only(&conn, secs(50));
        assert_eq!(s.state, "behind", "{s:?}");
        assert!(!s.alert, "fresh data: behind, but not alert-worthy");
        assert!(s.why.contains("15 s"), "{}", s.why);
        cycle_ended(&conn, "vm1", 10, 40.0, Some(45.0), &point(4), secs(95)).unwrap();
        // The burst ends: the next short cycle is within the target again.
        cycle_ended(&conn, "vm1", 10, 0.2, Some(5.2), &point(5), secs(100)).unwrap();
        let s = only(&conn, secs(100));
        assert_eq!(s.state, "replicating", "{s:?}");
        assert_eq!(s.achieved_rpo_seconds, Some(5.2));
        // 5.5, 35, 15, 45, 5.2
        assert_eq!(s.achieved_rpo_p50_seconds, Some(15.0));
        assert_eq!(s.achieved_rpo_p99_seconds, Some(45.0));
        assert_eq!((s.cycles_ok, s.cycles_failed), (6, 0));
        let metrics = render(&conn, secs(100)).unwrap();
        for line in [
            "rewind_agent_behind{vm=\"vm1\"} 0",
            "rewind_agent_achieved_rpo_seconds{vm=\"vm1\"} 5.2",
            "rewind_agent_achieved_rpo_p99_seconds{vm=\"vm1\"} 45",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
    }

    #[test]
    fn the_alert_and_behind_start_just_past_twice_and_once_the_target() {
        let conn = Connection::open_in_memory().unwrap();
        // RPO target 10 s: the alert is for no point within 20 s.
        cycle_started(&conn, "vm1", 10, secs(0)).unwrap();
        // No point yet: the alert starts 20 s after the VM was first seen.
        let s = only(&conn, secs(20));
        assert_eq!((s.state.as_str(), s.alert), ("seeding", false));
        let s = only(&conn, secs(20) + 1);
        assert_eq!((s.state.as_str(), s.alert), ("seeding", true));
        // A point captured at 30 s by a cycle of 2.5 s: it is 20 s old at 50 s.
        cycle_ended(&conn, "vm1", 10, 2.5, None, &point(1), secs(32) + 500_000).unwrap();
        let s = only(&conn, secs(50));
        assert_eq!(
            (s.state.as_str(), s.alert, s.last_point_age_seconds),
            ("replicating", false, Some(20.0))
        );
        let s = only(&conn, secs(50) + 1);
        assert_eq!((s.state.as_str(), s.alert), ("behind", true), "{s:?}");
        assert!(s.why.contains("more than 2x the 10 s"), "{}", s.why);
        // An achieved RPO of exactly the target meets it; a microsecond more does not.
        cycle_ended(&conn, "vm1", 10, 1.0, Some(10.0), &point(2), secs(60)).unwrap();
        let s = only(&conn, secs(60));
        assert_eq!((s.state.as_str(), s.alert), ("replicating", false));
        cycle_ended(&conn, "vm1", 10, 1.0, Some(10.000_001), &point(3), secs(70)).unwrap();
        let s = only(&conn, secs(70));
        assert_eq!((s.state.as_str(), s.alert), ("behind", false), "{s:?}");
        assert!(s.why.contains("longer than the interval"), "{}", s.why);
    }

    #[test]
    fn without_a_monotonic_measure_the_achieved_rpo_comes_from_the_recorded_times() {
        let conn = Connection::open_in_memory().unwrap();
        // Captured at 98 s, committed at 100 s.
        cycle_ended(&conn, "vm1", 10, 2.0, None, &point(1), secs(100)).unwrap();
        // The next point commits at 130 s: the data of the last 32 s was at risk before it.
        cycle_ended(&conn, "vm1", 10, 0.5, None, &point(2), secs(130)).unwrap();
        assert_eq!(only(&conn, secs(130)).achieved_rpo_seconds, Some(32.0));
        // A wall clock stepped back before the previous commit: no value rather than a
        // negative one.
        cycle_ended(&conn, "vm1", 10, 0.5, None, &point(3), secs(100)).unwrap();
        let s = only(&conn, secs(100));
        assert_eq!(s.cycles_ok, 3);
        assert_eq!(s.achieved_rpo_seconds, Some(32.0));
    }

    #[test]
    fn the_window_keeps_the_newest_values() {
        let conn = Connection::open_in_memory().unwrap();
        for i in 0..(RPO_WINDOW + 20) {
            let p = point(i as i64);
            cycle_ended(&conn, "vm1", 10, 0.1, Some(i as f64), &p, secs(i as i64)).unwrap();
        }
        let n: i64 = conn
            .query_row("SELECT count(*) FROM health_rpo", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, RPO_WINDOW as i64);
        let now = secs(RPO_WINDOW as i64 + 20);
        assert_eq!(only(&conn, now).achieved_rpo_p50_seconds, Some(69.0));
        forget(&conn, "vm1").unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM health_rpo", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }
}
