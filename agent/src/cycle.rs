//! One cycle of one VM as the agent's loops run it (`run`, for every VM of its configuration,
//! and `sync --interval`, for one): its health record (started, ended, achieved RPO on the
//! monotonic clock) and a stop that lets the point in flight finish within a grace period,
//! never cuts a guest freeze short, and leaves the VM clean; and when the loops' next cycle
//! is due.

use crate::clock::{Clock, SystemClock};
use crate::error::SyncError;
use crate::health;
use crate::sync::{SyncConfig, SyncReport};
use std::future::Future;
use std::ops::Add;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When a loop's next cycle is due: `interval` seconds (at least one) after `from`, which is
/// the start of the cycle for `run` (a cycle that ran longer is followed at once) and its end
/// for `sync --interval`. A reload that changes the interval asks again with the same `from`.
pub fn next_due<T: Add<Duration, Output = T>>(from: T, interval: u64) -> T {
    from + Duration::from_secs(interval.max(1))
}

/// How a cycle ended.
pub struct Ended {
    /// Its result; None when a stop dropped it (the point in flight was checkpointed and
    /// resumes on the next run).
    pub outcome: Option<Result<SyncReport, SyncError>>,
    /// Whether a stop came during the cycle.
    pub stopping: bool,
}

/// One VM's loop: what its cycles need to know of each other.
pub struct VmLoop {
    vm: String,
    /// Times the cycles and dates the health record.
    clock: Arc<dyn Clock>,
    /// When the cycle that took the newest point of this process started.
    last_capture: Option<Instant>,
}

impl VmLoop {
    pub fn new(vm: &str) -> VmLoop {
        VmLoop::with_clock(vm, Arc::new(SystemClock))
    }

    /// A loop whose cycles read the time from `clock`.
    pub fn with_clock(vm: &str, clock: Arc<dyn Clock>) -> VmLoop {
        VmLoop {
            vm: vm.to_owned(),
            clock,
            last_capture: None,
        }
    }

    /// Runs `cycle` with `rpo` (seconds) as the VM's target, recorded in the agent's `state`
    /// folder. When `stop` resolves first, the
    /// cycle gets `grace` to finish, then as long as a guest freeze is in flight (at most
    /// [`crate::live::FREEZE_PHASE_MAX`]); if it is dropped, what it left in the VM described by
    /// `release` is removed.
    #[allow(clippy::too_many_arguments)]
    pub async fn cycle(
        &mut self,
        state: &Path,
        rpo: u64,
        cycle: impl Future<Output = Result<SyncReport, SyncError>>,
        release: Option<&SyncConfig>,
        stop: impl Future<Output = ()>,
        grace: Duration,
    ) -> Ended {
        let started = self.clock.now();
        let started_us = health::unix_us(self.clock.wall());
        self.record(state, move |c, vm| {
            health::cycle_started(c, vm, rpo, started_us)
        })
        .await;
        // Boxed so that a stopped cycle can be dropped (closing its QMP connection) before the
        // VM is cleaned up.
        let mut cycle = Box::pin(cycle);
        let mut stopping = false;
        let outcome = tokio::select! {
            r = &mut cycle => Some(r),
            _ = stop => {
                stopping = true;
                tracing::info!(vm = %self.vm, grace = grace.as_secs(), "stopping: letting the point in flight finish");
                match tokio::time::timeout(grace, &mut cycle).await {
                    Ok(r) => Some(r),
                    // Never cut a cycle between a guest freeze and its thaw.
                    Err(_) => crate::sync::finish_freeze(&mut cycle).await,
                }
            }
        };
        let Some(outcome) = outcome else {
            drop(cycle);
            if let Some(cfg) = release {
                crate::sync::release_vm(cfg).await;
            }
            return Ended {
                outcome: None,
                stopping,
            };
        };
        let ended = self.clock.now();
        let ended_us = health::unix_us(self.clock.wall());
        let seconds = ended.saturating_duration_since(started).as_secs_f64();
        // The achieved RPO: from the previous point's capture (its cycle's start) to this
        // commit. A failed cycle leaves the previous capture in place.
        let since = self
            .last_capture
            .filter(|_| outcome.is_ok())
            .map(|t| ended.saturating_duration_since(t).as_secs_f64());
        if outcome.is_ok() {
            self.last_capture = Some(started);
        }
        // The record is written off the runtime; the outcome is shared with that task, so even
        // a task that panicked leaves the cycle's own result to report.
        let shared = Arc::new(outcome);
        let recorded = {
            let (state, vm, o) = (state.to_owned(), self.vm.clone(), shared.clone());
            tokio::task::spawn_blocking(move || {
                crate::state::open(&state)
                    .and_then(|c| health::cycle_ended(&c, &vm, rpo, seconds, since, &o, ended_us))
            })
            .await
        };
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %self.vm, error = %e, "could not record the cycle"),
            Err(e) => tracing::warn!(vm = %self.vm, error = %e, "recording the cycle failed"),
        }
        // The task has ended (joined), so ours is the only reference left.
        let outcome = Arc::try_unwrap(shared).unwrap_or_else(|_| {
            Err(SyncError::Worker(
                "the cycle's result is still shared".into(),
            ))
        });
        Ended {
            outcome: Some(outcome),
            stopping,
        }
    }

    /// Writes to the VM's health record off the async runtime; a failure is only logged.
    async fn record(
        &self,
        state: &Path,
        f: impl FnOnce(&rusqlite::Connection, &str) -> rusqlite::Result<()> + Send + 'static,
    ) {
        let (state, vm) = (state.to_owned(), self.vm.clone());
        let done = tokio::task::spawn_blocking(move || {
            crate::state::open(&state).and_then(|c| f(&c, &vm))
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(vm = %self.vm, error = %e, "could not record the cycle");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use time::macros::datetime;

    #[test]
    fn the_next_cycle_is_due_one_interval_later_and_never_sooner_than_a_second() {
        let s = Duration::from_secs;
        assert_eq!(next_due(s(100), 30), s(130));
        assert_eq!(next_due(s(100), 1), s(101));
        // An interval of 0 would spin: one second at least.
        assert_eq!(next_due(s(100), 0), s(101));
        // `run` counts from the cycle's start: one that took longer than the interval is
        // already due when it ends.
        let (start, end) = (s(100), s(145));
        assert!(next_due(start, 30) <= end);
        // A reload shortening the interval while waiting makes it due from the same start.
        assert_eq!(next_due(start, 10), s(110));
    }

    fn report(point: i64) -> SyncReport {
        SyncReport {
            vm: "vm1".into(),
            point,
            created: "2026-03-01T12:00:00Z".into(),
            base_point: None,
            session: String::new(),
            resumed: false,
            consistency: "crash-consistent".into(),
            freeze_ms: None,
            frozen_ms: None,
            disks: Vec::new(),
            sent_bytes: 0,
            seconds: 0.0,
        }
    }

    /// Runs one cycle that starts after `idle` and takes `took` on the clock, then ends with
    /// `outcome`.
    async fn cycle(
        l: &mut VmLoop,
        clock: &ManualClock,
        state: &Path,
        idle: u64,
        took: u64,
        outcome: Result<SyncReport, SyncError>,
    ) -> Ended {
        clock.advance(Duration::from_secs(idle));
        let work = async {
            clock.advance(Duration::from_secs(took));
            outcome
        };
        l.cycle(
            state,
            10,
            work,
            None,
            std::future::pending(),
            Duration::ZERO,
        )
        .await
    }

    fn status(state: &Path, clock: &ManualClock) -> health::VmStatus {
        let conn = crate::state::open(state).unwrap();
        let mut all = health::status(&conn, health::unix_us(clock.wall())).unwrap();
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    #[tokio::test]
    async fn the_achieved_rpo_runs_from_the_previous_capture_on_the_monotonic_clock() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let clock = Arc::new(ManualClock::new(datetime!(2026-03-01 12:00 UTC)));
        let mut l = VmLoop::with_clock("vm1", clock.clone());
        // RPO target 10 s. t=0..2: the first point, nothing before it.
        let e = cycle(&mut l, &clock, state, 0, 2, Ok(report(1))).await;
        assert!(matches!(e.outcome, Some(Ok(_))) && !e.stopping);
        let s = status(state, &clock);
        assert_eq!(s.achieved_rpo_seconds, None);
        assert_eq!(s.last_cycle_seconds, Some(2.0));
        // t=5..8: 8 s from the first capture to this commit.
        cycle(&mut l, &clock, state, 3, 3, Ok(report(2))).await;
        let s = status(state, &clock);
        assert_eq!(
            (s.state.as_str(), s.achieved_rpo_seconds),
            ("replicating", Some(8.0))
        );
        // t=10..11 fails: the newest capture is still the one at t=5.
        let failed = Err(SyncError::Config("broken".into()));
        cycle(&mut l, &clock, state, 2, 1, failed).await;
        assert_eq!(status(state, &clock).state, "failing");
        // The wall clock is stepped an hour ahead meanwhile: the RPO does not see it.
        clock.step_wall(time::Duration::hours(1));
        // t=15..17: 12 s since the capture at t=5, over the target.
        cycle(&mut l, &clock, state, 4, 2, Ok(report(3))).await;
        let s = status(state, &clock);
        assert_eq!(s.achieved_rpo_seconds, Some(12.0), "{s:?}");
        assert_eq!(s.state, "behind", "{s:?}");
        assert!(s.why.contains("12 s"), "{}", s.why);
        // Its point's age comes from the wall times of the same (stepped) clock.
        assert_eq!(s.last_point_age_seconds, Some(2.0));
        assert_eq!(s.achieved_rpo_p50_seconds, Some(8.0));
        assert_eq!(s.achieved_rpo_p99_seconds, Some(12.0));
        assert_eq!((s.cycles_ok, s.cycles_failed), (3, 1));
        // No point for 18 s more: the newest was captured exactly 2x the target ago, and
        // the alert starts a microsecond later.
        clock.advance(Duration::from_secs(18));
        let s = status(state, &clock);
        assert_eq!((s.state.as_str(), s.alert), ("behind", false));
        clock.advance(Duration::from_micros(1));
        let s = status(state, &clock);
        assert_eq!((s.state.as_str(), s.alert), ("behind", true));
    }
}
