//! Retention rules as a pure function: which points to keep, with the same meaning as restic's
//! `forget --keep-*`: `last` keeps the N newest points; each period rule keeps the newest point
//! of each of the last N periods (hours, days, ISO weeks, months, years) that have points.
//! Besides the rules, a locked point, the newest point and a point an unfinished session builds
//! on are never removed.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How many of each kind to keep; `None` means the rule is not used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
}

impl Policy {
    /// True when no rule is given: pruning with it would remove everything not protected.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// What retention needs to know about a point.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub id: i64,
    pub created: OffsetDateTime,
    /// Locked until a future date.
    pub locked: bool,
    /// An unfinished session builds on it.
    pub in_use: bool,
}

/// The verdict for one point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub id: i64,
    pub keep: bool,
    /// Why it is kept ("last", "hourly", ..., "locked", "newest", "in use").
    pub reasons: Vec<&'static str>,
}

type Bucket = fn(OffsetDateTime) -> (i32, u32);

fn hour(t: OffsetDateTime) -> (i32, u32) {
    (t.year(), t.ordinal() as u32 * 24 + u32::from(t.hour()))
}
fn day(t: OffsetDateTime) -> (i32, u32) {
    (t.year(), t.ordinal() as u32)
}
fn week(t: OffsetDateTime) -> (i32, u32) {
    let (y, w, _) = t.to_iso_week_date();
    (y, u32::from(w))
}
fn month(t: OffsetDateTime) -> (i32, u32) {
    (t.year(), t.month() as u32)
}
fn year(t: OffsetDateTime) -> (i32, u32) {
    (t.year(), 0)
}

/// Decides for every point of one VM. The result is in the order of `points`.
pub fn decide(points: &[Candidate], policy: &Policy) -> Vec<Verdict> {
    // Newest first; ties by id so the decision is deterministic.
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        points[b]
            .created
            .cmp(&points[a].created)
            .then(points[b].id.cmp(&points[a].id))
    });
    let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); points.len()];
    if let Some(n) = policy.last {
        for &i in order.iter().take(n as usize) {
            reasons[i].push("last");
        }
    }
    let rules: [(Option<u32>, Bucket, &'static str); 5] = [
        (policy.hourly, hour, "hourly"),
        (policy.daily, day, "daily"),
        (policy.weekly, week, "weekly"),
        (policy.monthly, month, "monthly"),
        (policy.yearly, year, "yearly"),
    ];
    for (count, bucket, name) in rules {
        let Some(mut left) = count else { continue };
        let mut last = None;
        for &i in &order {
            if left == 0 {
                break;
            }
            let b = bucket(points[i].created);
            if last != Some(b) {
                reasons[i].push(name);
                last = Some(b);
                left -= 1;
            }
        }
    }
    if let Some(&newest) = order.first() {
        reasons[newest].push("newest");
    }
    for (i, p) in points.iter().enumerate() {
        if p.locked {
            reasons[i].push("locked");
        }
        if p.in_use {
            reasons[i].push("in use");
        }
    }
    points
        .iter()
        .zip(reasons)
        .map(|(p, r)| Verdict {
            id: p.id,
            keep: !r.is_empty(),
            reasons: r,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use time::macros::datetime;

    fn pts(times: &[OffsetDateTime]) -> Vec<Candidate> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| Candidate {
                id: i as i64 + 1,
                created: t,
                locked: false,
                in_use: false,
            })
            .collect()
    }

    fn kept(v: &[Verdict]) -> Vec<i64> {
        v.iter().filter(|x| x.keep).map(|x| x.id).collect()
    }

    #[test]
    fn table() {
        let times = [
            datetime!(2026-01-01 10:00 UTC),
            datetime!(2026-01-01 10:30 UTC),
            datetime!(2026-01-01 11:10 UTC),
            datetime!(2026-01-02 09:00 UTC),
            datetime!(2026-01-09 09:00 UTC),
            datetime!(2026-02-01 09:00 UTC),
        ];
        let p = pts(&times);
        let only = |policy: Policy| kept(&decide(&p, &policy));
        assert_eq!(
            only(Policy {
                last: Some(2),
                ..Default::default()
            }),
            vec![5, 6]
        );
        assert_eq!(
            only(Policy {
                hourly: Some(3),
                ..Default::default()
            }),
            vec![4, 5, 6]
        );
        assert_eq!(
            only(Policy {
                daily: Some(4),
                ..Default::default()
            }),
            vec![3, 4, 5, 6]
        );
        assert_eq!(
            only(Policy {
                weekly: Some(2),
                ..Default::default()
            }),
            vec![5, 6]
        );
        assert_eq!(
            only(Policy {
                monthly: Some(2),
                ..Default::default()
            }),
            vec![5, 6]
        );
        assert_eq!(
            only(Policy {
                yearly: Some(5),
                ..Default::default()
            }),
            vec![6]
        );
        assert_eq!(
            only(Policy {
                daily: Some(10),
                ..Default::default()
            }),
            vec![3, 4, 5, 6]
        );
        // The newest point is always kept, even with a rule that keeps nothing.
        assert_eq!(
            only(Policy {
                last: Some(0),
                ..Default::default()
            }),
            vec![6]
        );
        let mut locked = p.clone();
        locked[0].locked = true;
        locked[1].in_use = true;
        assert_eq!(
            kept(&decide(
                &locked,
                &Policy {
                    last: Some(1),
                    ..Default::default()
                }
            )),
            vec![1, 2, 6]
        );
    }

    /// The period of `t` for rule `rule` (hour, day, week, month, year), computed from the unix
    /// time alone, independently of the code's bucket functions: whole hours and days since
    /// the epoch, Monday-based weeks (1970-01-05 was a Monday), and the civil calendar's month
    /// and year from the day number (Howard Hinnant's `civil_from_days`).
    fn period(t: OffsetDateTime, rule: usize) -> (i32, u32) {
        let secs = t.unix_timestamp();
        let days = secs.div_euclid(86_400);
        let (y, m) = {
            let z = days + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let m = if mp < 10 { mp + 3 } else { mp - 9 };
            (yoe + era * 400 + i64::from(m <= 2), m)
        };
        let key = match rule {
            0 => secs.div_euclid(3600),
            1 => days,
            2 => (days - 4).div_euclid(7),
            3 => y * 12 + m,
            _ => y,
        };
        (0, key as u32)
    }

    #[test]
    fn independent_periods_agree_on_known_dates() {
        // 2024-12-30 is a Monday in ISO week 1 of 2025; 2024-12-29 a Sunday of week 52.
        let mon = datetime!(2024-12-30 10:00 UTC);
        let sun = datetime!(2024-12-29 23:00 UTC);
        assert_ne!(period(mon, 2), period(sun, 2));
        assert_eq!(period(mon, 2), period(datetime!(2025-01-05 23:59 UTC), 2));
        assert_eq!(period(mon, 3), period(datetime!(2024-12-01 00:00 UTC), 3));
        assert_ne!(period(mon, 3), period(datetime!(2025-01-01 00:00 UTC), 3));
        assert_ne!(period(mon, 4), period(datetime!(2025-01-01 00:00 UTC), 4));
        assert_eq!(
            period(datetime!(2024-02-29 12:00 UTC), 3),
            period(datetime!(2024-02-01 00:00 UTC), 3)
        );
    }

    proptest! {
        #[test]
        fn kept_set_satisfies_every_rule(
            offsets in proptest::collection::vec(0i64..(3 * 365 * 24 * 3600), 1..60),
            last in proptest::option::of(0u32..5),
            rules in proptest::collection::vec(proptest::option::of(0u32..6), 5),
            locked in proptest::collection::vec(any::<bool>(), 60),
        ) {
            let base = datetime!(2024-01-01 00:00 UTC);
            let mut p = pts(&offsets.iter().map(|&s| base + time::Duration::seconds(s)).collect::<Vec<_>>());
            for (i, c) in p.iter_mut().enumerate() {
                c.locked = locked[i] && i % 7 == 0;
            }
            let policy = Policy { last, hourly: rules[0], daily: rules[1], weekly: rules[2], monthly: rules[3], yearly: rules[4] };
            let v = decide(&p, &policy);
            let keep: BTreeSet<i64> = kept(&v).into_iter().collect();
            let mut newest_first = p.clone();
            newest_first.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
            // Nothing locked or newest is removed.
            prop_assert!(keep.contains(&newest_first[0].id));
            for c in &p {
                if c.locked { prop_assert!(keep.contains(&c.id)); }
            }
            // keep-last N: the N newest.
            for c in newest_first.iter().take(last.unwrap_or(0) as usize) {
                prop_assert!(keep.contains(&c.id));
            }
            // Each period rule: the newest point of each of the N newest periods.
            for (rule, n) in rules.iter().enumerate() {
                let Some(n) = n else { continue };
                let mut newest_in: BTreeMap<(i32, u32), i64> = BTreeMap::new();
                let mut periods = Vec::new();
                for c in &newest_first {
                    let b = period(c.created, rule);
                    if let std::collections::btree_map::Entry::Vacant(e) = newest_in.entry(b) {
                        e.insert(c.id);
                        periods.push(b);
                    }
                }
                for b in periods.iter().take(*n as usize) {
                    prop_assert!(keep.contains(&newest_in[b]));
                }
            }
            // Nothing is kept without a reason.
            for x in &v {
                prop_assert_eq!(x.keep, !x.reasons.is_empty());
            }
        }
    }
}
