//! The receiver's wall clock can be stepped (NTP correcting a wrong clock, an operator, a host
//! resumed from a pause). Every decision that waits for time to pass must survive a step:
//!
//! - `serve` watches for steps: the wall clock minus the monotonic clock stays constant unless
//!   the wall clock is stepped; a change of more than [`STEP_THRESHOLD`] is recorded in the
//!   catalog (`clock_steps`, and an event), logged, and counted in the metrics;
//! - anything that expires by time (point locks, gc's grace period, a VM's claim, abandoned
//!   sessions, the age of the newest point in the metrics) reads [`cautious_now`]: the wall
//!   clock minus every forward step of the last [`STEP_MEMORY_DAYS`] days, so a forward step
//!   never shortens them (a backward step only lengthens them);
//! - point times never go backwards within a VM (see `ingest::record_point`), so listings,
//!   retention and `--at` keep the order the points were taken in.

use crate::catalog::{self, events, now_us};
use rusqlite::Connection;
use std::time::{Duration, Instant};

/// A change of wall-minus-monotonic offset above this is a step, not drift.
pub const STEP_THRESHOLD: Duration = Duration::from_secs(2);
/// How long a forward step keeps delaying what expires by time.
pub const STEP_MEMORY_DAYS: i64 = 30;
/// How often `serve` compares the clocks.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Watches the wall clock against the monotonic clock.
pub struct Watch {
    origin: Instant,
    offset_us: i64,
}

impl Default for Watch {
    fn default() -> Self {
        Self::new()
    }
}

impl Watch {
    pub fn new() -> Watch {
        let origin = Instant::now();
        Watch {
            origin,
            offset_us: now_us() - origin.elapsed().as_micros() as i64,
        }
    }

    /// The step (positive: forward) since the last call, if the wall clock was stepped.
    pub fn check(&mut self) -> Option<i64> {
        let offset = now_us() - self.origin.elapsed().as_micros() as i64;
        let step = offset - self.offset_us;
        if step.unsigned_abs() > STEP_THRESHOLD.as_micros() as u64 {
            self.offset_us = offset;
            Some(step)
        } else {
            None
        }
    }
}

/// Records a step seen now.
pub fn record(conn: &Connection, step_us: i64) -> rusqlite::Result<()> {
    let now = now_us();
    catalog::clock::record_step(conn, now, step_us)?;
    let detail = serde_json::json!({"step_seconds": step_us as f64 / 1e6}).to_string();
    let event = events::NewEvent {
        vm: None,
        kind: "clock-step",
        point: None,
        detail: &detail,
        at_us: now,
    };
    events::record(conn, &event).map(|_| ())
}

/// The wall clock minus the forward steps recorded in the last [`STEP_MEMORY_DAYS`] days: what
/// "now" is for anything that expires by time.
pub fn cautious_now(conn: &Connection) -> rusqlite::Result<i64> {
    let now = now_us();
    let forward = catalog::clock::forward_since(conn, now - STEP_MEMORY_DAYS * 86_400 * 1_000_000)?;
    Ok(now - forward)
}

/// Steps recorded so far and the newest one (seconds), for the metrics.
pub fn summary(conn: &Connection) -> rusqlite::Result<(i64, Option<f64>)> {
    let (count, last) = catalog::clock::summary(conn)?;
    Ok((count, last.map(|s| s as f64 / 1e6)))
}

/// `serve`'s watcher: compares the clocks every [`CHECK_EVERY`] and records each step.
pub async fn watch(data: std::path::PathBuf) {
    let mut w = Watch::new();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        let Some(step) = w.check() else { continue };
        tracing::warn!(
            step_seconds = step as f64 / 1e6,
            "the wall clock was stepped: point times stay in order, and for {STEP_MEMORY_DAYS} days \
             locks, grace periods and claims wait out any forward step"
        );
        let data = data.clone();
        let r = tokio::task::spawn_blocking(move || {
            crate::catalog::open_rw(&data).and_then(|c| record(&c, step))
        })
        .await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::error!("could not record the clock step in the catalog");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_steps_delay_now_for_a_while() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE clock_steps(at_us INTEGER NOT NULL, step_us INTEGER NOT NULL);
             CREATE TABLE events(id INTEGER PRIMARY KEY, vm_id INTEGER, kind TEXT NOT NULL,
               point INTEGER, detail TEXT NOT NULL, created_us INTEGER NOT NULL);",
        )
        .unwrap();
        let before = now_us();
        assert!(cautious_now(&conn).unwrap() >= before);
        record(&conn, 86_400_000_000).unwrap();
        record(&conn, -3_600_000_000).unwrap();
        let c = cautious_now(&conn).unwrap();
        assert!(c <= now_us() - 86_400_000_000 && c >= before - 86_400_000_000);
        // A step older than the memory no longer counts.
        conn.execute(
            "UPDATE clock_steps SET at_us = at_us - ?1",
            [(STEP_MEMORY_DAYS + 1) * 86_400_000_000],
        )
        .unwrap();
        assert!(cautious_now(&conn).unwrap() >= before);
        assert_eq!(summary(&conn).unwrap().0, 2);
    }
}
