//! What `serve`'s scheduled work has due now, as pure functions of the time and the state:
//! retention (prune, then gc) every `prune_interval`, and each VM's drill `every` seconds after
//! its last one. `serve` runs the loops that ask these and does the work they name.

use crate::config::{DrillSchedule, ReceiverFile};
use crate::retention::Policy;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Add;
use std::time::Duration;

/// Default seconds between scheduled prune + gc runs.
pub const PRUNE_INTERVAL: u64 = 3600;

/// When the retention run after the one at `last` is due under `file`: `prune_interval`
/// seconds later (default [`PRUNE_INTERVAL`], at least one second).
pub fn next_prune<T: Add<Duration, Output = T>>(last: T, file: &ReceiverFile) -> T {
    let every = file.prune_interval.unwrap_or(PRUNE_INTERVAL).max(1);
    last + Duration::from_secs(every)
}

/// The VMs a retention run prunes, each once, in name order, with its rules: those of `vms`
/// that have any rule. A run with none also skips gc.
pub fn prune_plan(
    file: &ReceiverFile,
    vms: impl IntoIterator<Item = String>,
) -> Vec<(String, Policy)> {
    vms.into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|vm| {
            let p = file.policy(&vm);
            (vm, p)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect()
}

/// What the drill scheduler knows besides the file, times in Unix microseconds.
#[derive(Debug, Clone, Default)]
pub struct DrillState {
    /// When `serve` started: a VM never drilled has its first drill one period after.
    pub serve_started_us: i64,
    /// The start of each VM's last recorded drill (None: never drilled). VMs without a
    /// schedule may be left out.
    pub last_drill_us: BTreeMap<String, Option<i64>>,
    /// When `serve` last started each VM's drill: a drill that leaves no record (it could not
    /// start, or was killed) is not retried before its period.
    pub attempted_us: HashMap<String, i64>,
}

/// The VMs whose scheduled drill is due at `now_us`, in name order, with their schedules.
pub fn drills_due(
    file: &ReceiverFile,
    now_us: i64,
    state: &DrillState,
) -> Vec<(String, DrillSchedule)> {
    let mut out = Vec::new();
    for (vm, last) in &state.last_drill_us {
        let Some(s) = file.drill(vm) else { continue };
        let since = last
            .unwrap_or(state.serve_started_us)
            .max(state.attempted_us.get(vm).copied().unwrap_or(i64::MIN));
        if now_us - since >= (s.every as i64).saturating_mul(1_000_000) {
            out.push((vm.clone(), s.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn file(text: &str) -> ReceiverFile {
        toml::from_str(text).expect("a valid file")
    }

    fn names(due: &[(String, DrillSchedule)]) -> Vec<&str> {
        due.iter().map(|(vm, _)| vm.as_str()).collect()
    }

    #[test]
    fn retention_runs_every_prune_interval_after_the_last_run() {
        let last = Duration::from_secs(1_000);
        let cases = [
            ("", 3_600),
            ("prune_interval = 60", 60),
            // A zero interval from the command line still waits a second.
            ("prune_interval = 0", 1),
        ];
        for (text, every) in cases {
            assert_eq!(
                next_prune(last, &file(text)),
                last + Duration::from_secs(every),
                "{text:?}"
            );
        }
    }

    #[test]
    fn retention_prunes_each_vm_with_rules_once_in_name_order() {
        let vms = || ["web", "db", "web", "cache"].map(String::from);
        assert!(prune_plan(&file(""), vms()).is_empty(), "no rules, no run");
        let plan = prune_plan(&file("[vm.db]\nretention = { last = 2 }"), vms());
        assert_eq!(plan.len(), 1);
        assert_eq!((plan[0].0.as_str(), plan[0].1.last), ("db", Some(2)));
        let plan = prune_plan(
            &file("[retention]\nlast = 5\n[vm.web]\nretention = { daily = 7 }"),
            vms(),
        );
        let got: Vec<_> = plan
            .iter()
            .map(|(vm, p)| (vm.as_str(), p.last, p.daily))
            .collect();
        assert_eq!(
            got,
            [
                ("cache", Some(5), None),
                ("db", Some(5), None),
                ("web", None, Some(7)),
            ]
        );
    }

    #[test]
    fn a_vm_never_drilled_is_due_one_period_after_serve_started() {
        let f = file("[drill]\nevery = 3600");
        let state = DrillState {
            serve_started_us: 100 * S,
            last_drill_us: [("web".to_owned(), None)].into(),
            ..DrillState::default()
        };
        assert!(drills_due(&f, 100 * S, &state).is_empty(), "not at start");
        assert!(drills_due(&f, 3_699 * S, &state).is_empty());
        let due = drills_due(&f, 3_700 * S, &state);
        assert_eq!(names(&due), ["web"]);
        assert_eq!(due[0].1.every, 3_600);
    }

    #[test]
    fn a_drill_is_due_every_period_after_the_last_recorded_one() {
        let f = file("[drill]\nevery = 60\n[vm.db]\ndrill = { every = 600 }");
        let state = DrillState {
            // A restart does not repeat a drill: the record counts, not serve's start.
            serve_started_us: 10_000 * S,
            last_drill_us: [
                ("db".to_owned(), Some(1_000 * S)),
                ("web".to_owned(), Some(1_000 * S)),
            ]
            .into(),
            ..DrillState::default()
        };
        assert!(drills_due(&f, 1_059 * S, &state).is_empty());
        assert_eq!(names(&drills_due(&f, 1_060 * S, &state)), ["web"]);
        assert_eq!(names(&drills_due(&f, 1_600 * S, &state)), ["db", "web"]);
    }

    #[test]
    fn a_drill_that_left_no_record_waits_a_period_before_its_retry() {
        let f = file("[drill]\nevery = 60");
        let mut state = DrillState {
            serve_started_us: 0,
            last_drill_us: [("web".to_owned(), Some(0))].into(),
            ..DrillState::default()
        };
        assert_eq!(names(&drills_due(&f, 60 * S, &state)), ["web"]);
        state.attempted_us.insert("web".to_owned(), 60 * S);
        assert!(drills_due(&f, 119 * S, &state).is_empty());
        assert_eq!(names(&drills_due(&f, 120 * S, &state)), ["web"]);
    }

    #[test]
    fn only_vms_with_a_schedule_are_drilled() {
        let f = file("[vm.db]\ndrill = { every = 60 }");
        let state = DrillState {
            serve_started_us: 0,
            last_drill_us: [("db".to_owned(), None), ("web".to_owned(), None)].into(),
            ..DrillState::default()
        };
        assert_eq!(names(&drills_due(&f, 3_600 * S, &state)), ["db"]);
        assert!(drills_due(&file(""), 3_600 * S, &state).is_empty());
    }
}
