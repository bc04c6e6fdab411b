//! Where the agent's timing decisions read the time: the system's clocks in production, a
//! [`ManualClock`] that a test moves by hand, so tests drive time instead of sleeping.
//!
//! Two clocks, for two jobs. The monotonic clock ([`Clock::now`]) measures how long things
//! took (a cycle, the achieved RPO, the upload pace) and never jumps. The wall clock
//! ([`Clock::wall`]) gives the times recorded for `status` and the time of day of bandwidth
//! windows; it can be stepped, and a manual clock can step it alone to show what a step does.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// A source of time for decisions.
pub trait Clock: Send + Sync {
    /// The monotonic clock.
    fn now(&self) -> Instant;
    /// The wall clock.
    fn wall(&self) -> OffsetDateTime;
    /// Blocks the calling (non-async) thread for `d`.
    fn sleep(&self, d: Duration);
}

/// The system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A clock that moves only when told: [`ManualClock::advance`] moves both clocks, a
/// [`Clock::sleep`] advances them by the time slept and returns at once, and
/// [`ManualClock::step_wall`] moves the wall clock alone.
#[derive(Debug)]
pub struct ManualClock {
    origin: Instant,
    wall_origin: OffsetDateTime,
    /// Nanoseconds both clocks moved since the start.
    elapsed_ns: AtomicU64,
    /// Nanoseconds the wall clock was stepped by, on top.
    wall_step_ns: AtomicI64,
}

impl ManualClock {
    /// A clock whose wall clock reads `wall` now.
    pub fn new(wall: OffsetDateTime) -> ManualClock {
        ManualClock {
            origin: Instant::now(),
            wall_origin: wall,
            elapsed_ns: AtomicU64::new(0),
            wall_step_ns: AtomicI64::new(0),
        }
    }

    /// Lets `d` pass on both clocks.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.elapsed_ns.fetch_add(ns, Ordering::SeqCst);
    }

    /// Steps the wall clock by `by` (negative: backwards); the monotonic clock does not move.
    pub fn step_wall(&self, by: time::Duration) {
        let ns = i64::try_from(by.whole_nanoseconds()).unwrap_or(i64::MAX);
        self.wall_step_ns.fetch_add(ns, Ordering::SeqCst);
    }

    /// How long the monotonic clock moved since the start.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns.load(Ordering::SeqCst))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.origin + self.elapsed()
    }

    fn wall(&self) -> OffsetDateTime {
        let moved = time::Duration::nanoseconds(
            i64::try_from(self.elapsed_ns.load(Ordering::SeqCst)).unwrap_or(i64::MAX),
        );
        let stepped = time::Duration::nanoseconds(self.wall_step_ns.load(Ordering::SeqCst));
        self.wall_origin + moved + stepped
    }

    fn sleep(&self, d: Duration) {
        self.advance(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_a_wall_step_leaves_the_monotonic_clock() {
        let c = ManualClock::new(datetime!(2026-03-01 12:00 UTC));
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_millis(1500));
        c.sleep(Duration::from_millis(500));
        assert_eq!(c.now() - t0, Duration::from_secs(2));
        assert_eq!(c.wall(), datetime!(2026-03-01 12:00:02 UTC));
        c.step_wall(time::Duration::hours(-1));
        assert_eq!(c.now() - t0, Duration::from_secs(2));
        assert_eq!(c.wall(), datetime!(2026-03-01 11:00:02 UTC));
    }
}
