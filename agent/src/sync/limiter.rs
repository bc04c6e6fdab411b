//! The upload's pace: a message goes once the bytes before it are paid for at the limit in
//! force, read again before every batch (a time-of-day window may open or close mid-cycle).

use super::Bandwidth;
use crate::clock::Clock;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Keeps the send rate under the limit in force (which may change between batches): a
/// message goes once the bytes before it are paid for at the rate they were booked at, so
/// over any stretch of time at one rate R the bytes sent stay within R times its length plus
/// one message. Idle time earns no credit, and unlimited time forgets any debt.
pub(super) struct RateLimiter {
    limit: Bandwidth,
    /// Reads the limit's time of day, paces and waits.
    clock: Arc<dyn Clock>,
    /// When the bytes already spent are paid for.
    next: Instant,
}

impl RateLimiter {
    pub(super) fn new(limit: Bandwidth, clock: Arc<dyn Clock>) -> Self {
        Self {
            limit,
            next: clock.now(),
            clock,
        }
    }

    /// Blocks the calling (non-async) thread until the bytes spent before fit under the
    /// limit, then books `bytes` at the current rate.
    pub(super) fn spend(&mut self, bytes: u64) {
        let now = self.clock.now();
        let Some(rate) = self.limit.at(self.clock.wall()) else {
            self.next = now;
            return;
        };
        if self.next > now {
            self.clock.sleep(self.next - now);
        }
        self.next = self.next.max(self.clock.now())
            + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use time::macros::datetime;

    const MIB: u64 = 1 << 20;

    /// A limiter on a manual clock whose limit (bytes per second, 0: none) the test sets.
    fn limiter() -> (RateLimiter, Arc<ManualClock>, Arc<AtomicU64>) {
        let clock = Arc::new(ManualClock::new(datetime!(2026-03-01 12:00 UTC)));
        let rate = Arc::new(AtomicU64::new(0));
        let r = rate.clone();
        let limit = Bandwidth(Arc::new(move |_| {
            Some(r.load(Ordering::SeqCst)).filter(|&v| v > 0)
        }));
        (RateLimiter::new(limit, clock.clone()), clock, rate)
    }

    /// When each of `sizes` was let through, from the start of the clock.
    fn send_times(l: &mut RateLimiter, clock: &ManualClock, sizes: &[u64]) -> Vec<Duration> {
        sizes
            .iter()
            .map(|&b| {
                l.spend(b);
                clock.elapsed()
            })
            .collect()
    }

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn at_one_rate_each_message_goes_once_the_ones_before_are_paid_for() {
        let (mut l, clock, rate) = limiter();
        rate.store(MIB, Ordering::SeqCst);
        // Quarter-MiB messages at 1 MiB/s: one every 250 ms, the first at once.
        let sent = send_times(&mut l, &clock, &[MIB / 4; 5]);
        assert_eq!(sent, ms(&[0, 250, 500, 750, 1000]));
        // A message's size is paid after it: a large one delays the next, not itself.
        let sent = send_times(&mut l, &clock, &[2 * MIB, MIB / 4, 1]);
        assert_eq!(sent, ms(&[1250, 3250, 3500]));
    }

    #[test]
    fn idle_time_earns_no_burst() {
        let (mut l, clock, rate) = limiter();
        rate.store(MIB, Ordering::SeqCst);
        l.spend(MIB / 2);
        // Ten idle seconds: the debt is long paid, and no credit piles up.
        clock.advance(Duration::from_secs(10));
        let sent = send_times(&mut l, &clock, &[MIB / 2, MIB / 2, MIB / 2]);
        assert_eq!(sent, ms(&[10_000, 10_500, 11_000]));
    }

    #[test]
    fn the_rate_limit_in_force_applies_from_the_next_batch() {
        let (mut l, clock, rate) = limiter();
        // Unlimited: 100 MB go at once.
        assert_eq!(
            send_times(&mut l, &clock, &[50_000_000, 50_000_000]),
            ms(&[0, 0])
        );
        // A window opens: 1 MiB/s. The first message goes at once and is booked.
        rate.store(MIB, Ordering::SeqCst);
        assert_eq!(send_times(&mut l, &clock, &[MIB, MIB / 2]), ms(&[0, 1000]));
        // The rate doubles: what was booked at 1 MiB/s is still waited for, then 2 MiB/s.
        rate.store(2 * MIB, Ordering::SeqCst);
        assert_eq!(send_times(&mut l, &clock, &[MIB, 1]), ms(&[1500, 2000]));
        // The window closes with a debt outstanding: it is forgotten, nothing waits.
        rate.store(0, Ordering::SeqCst);
        assert_eq!(
            send_times(&mut l, &clock, &[10_000_000, 10_000_000]),
            ms(&[2000, 2000])
        );
        // Reopened, it starts afresh from now.
        rate.store(MIB, Ordering::SeqCst);
        assert_eq!(send_times(&mut l, &clock, &[MIB, 1]), ms(&[2000, 3000]));
    }

    #[test]
    fn a_bandwidth_window_of_the_file_opens_and_closes_on_the_wall_clock() {
        let f: crate::config::AgentFile = toml::from_str(
            r#"
            state = "/nonexistent"
            [[bandwidth]]
            start = "09:00"
            end = "10:00"
            mbps = 1
            [[vm]]
            name = "a"
            qmp = "/q"
            "#,
        )
        .unwrap();
        let limit = f.cycle(&f.vm[0]).unwrap().bwlimit;
        let clock = Arc::new(ManualClock::new(datetime!(2026-03-01 08:59:58 UTC)));
        let mut l = RateLimiter::new(limit, clock.clone());
        // Before 09:00 nothing is limited.
        assert_eq!(
            send_times(&mut l, &clock, &[100_000_000, 100_000_000]),
            ms(&[0, 0])
        );
        // At 09:00 the window opens: 1 MB/s.
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            send_times(&mut l, &clock, &[500_000, 500_000, 1]),
            ms(&[2000, 2500, 3000])
        );
        // A step of the wall clock past 10:00 closes it, from the next message on, and the
        // debt booked in it is forgotten.
        clock.step_wall(time::Duration::hours(1));
        assert_eq!(send_times(&mut l, &clock, &[1, 1]), ms(&[3000, 3000]));
    }

    /// Against a reference: at any one rate, every message waits until all the bytes of the
    /// messages before it (since the rate was set or the limiter was last idle past its debt)
    /// are paid for, and never longer.
    #[test]
    fn random_sends_never_beat_the_rate_and_never_wait_longer_than_needed() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        for _ in 0..50 {
            let (mut l, clock, rate) = limiter();
            let r: u64 = rng.random_range(1_000..10_000_000);
            rate.store(r, Ordering::SeqCst);
            // The reference: when the bytes sent so far are paid for, in nanoseconds.
            let mut paid_ns: u128 = 0;
            for _ in 0..200 {
                if rng.random_bool(0.2) {
                    clock.advance(Duration::from_micros(rng.random_range(0..2_000_000)));
                }
                let bytes: u64 = rng.random_range(1..4 * MIB);
                let before = clock.elapsed().as_nanos();
                l.spend(bytes);
                let sent = clock.elapsed().as_nanos();
                let due = paid_ns.max(before);
                // Each message's cost is rounded to the nanosecond once.
                assert!(
                    sent.abs_diff(due) <= 1,
                    "sent at {sent} ns, due at {due} ns"
                );
                paid_ns = sent + bytes as u128 * 1_000_000_000 / u128::from(r);
            }
        }
    }
}
