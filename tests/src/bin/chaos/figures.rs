//! What a run survived and checked, counted as it goes, printed as a table or as JSON.

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// For one kind of cycle (a VM's round): bytes up the links, bytes the committed points
/// reported sent, and chunk bytes the uploads added to the store.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bytes {
    pub up: u64,
    pub sent: u64,
    pub stored: u64,
}

impl Bytes {
    pub fn add(&mut self, up: u64, sent: u64, stored: u64) {
        self.up += up;
        self.sent += sent;
        self.stored += stored;
    }
}

/// `a / b`, 0 when `b` is.
fn ratio(a: f64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a / b as f64
    }
}

#[derive(Debug, Default)]
pub struct Figures {
    pub seed: u64,
    pub rounds: u64,
    pub raw_vms: usize,
    pub live: bool,
    /// Confirmed SIGKILLs (the process died of it), by process and by what it was doing.
    pub kills: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Kill instants that found the process already finished.
    pub missed: BTreeMap<&'static str, u64>,
    /// Link faults by kind: (struck while the link's sync ran, struck an idle link).
    pub link: BTreeMap<&'static str, (u64, u64)>,
    pub sync_attempts: u64,
    pub sync_failures: u64,
    /// Failed syncs with no injected fault on their VM (a gc or prune racing them, say).
    pub unexplained: Vec<String>,
    pub recovery_attempts: u64,
    pub outage_writes: u64,
    pub points_committed: u64,
    /// Committed by a run that died before it could report it (adopted by the next run).
    pub points_unreported: u64,
    pub points_pruned: u64,
    pub points_lost: u64,
    pub points_locked: u64,
    pub restores_bit_exact: u64,
    pub points_checked: u64,
    pub verify_clean: u64,
    pub resumed: u64,
    pub resumed_sent: u64,
    pub resumed_full_copy: u64,
    pub clean: Bytes,
    pub faulted: Bytes,
    pub seconds: f64,
}

impl Figures {
    pub fn kill(&mut self, process: &'static str, phase: &'static str) {
        *self
            .kills
            .entry(process)
            .or_default()
            .entry(phase)
            .or_default() += 1;
    }

    pub fn miss(&mut self, process: &'static str) {
        *self.missed.entry(process).or_default() += 1;
    }

    pub fn link_fault(&mut self, kind: &'static str, hit: bool) {
        let e = self.link.entry(kind).or_default();
        if hit {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    fn kills_of(&self, process: &str) -> u64 {
        self.kills.get(process).map_or(0, |m| m.values().sum())
    }

    fn all(&self) -> Bytes {
        Bytes {
            up: self.clean.up + self.faulted.up,
            sent: self.clean.sent + self.faulted.sent,
            stored: self.clean.stored + self.faulted.stored,
        }
    }

    /// Bytes up per byte stored beyond 1 in fault-free cycles: TLS, gRPC, hashes, requests.
    fn overhead(&self) -> f64 {
        ratio(
            self.clean.up as f64 - self.clean.stored as f64,
            self.clean.stored,
        )
    }

    /// Bytes that went up in faulted cycles beyond what they stored and the usual overhead:
    /// uploads lost to a kill or a cut before the receiver indexed them, sent again.
    fn resent(&self) -> f64 {
        self.faulted.up as f64 - self.faulted.stored as f64 * (1.0 + self.overhead())
    }

    /// Bytes up beyond what the committed points reported sent, per byte they reported.
    fn up_over_reported(&self) -> f64 {
        let all = self.all();
        ratio(all.up as f64 - all.sent as f64, all.sent)
    }

    pub fn json(&self) -> Value {
        let processes = ["agent", "receiver", "gc", "prune", "qemu"];
        let kills: serde_json::Map<String, Value> = processes
            .iter()
            .map(|p| {
                (
                    p.to_string(),
                    json!({
                        "total": self.kills_of(p),
                        "phases": self.kills.get(p).cloned().unwrap_or_default(),
                        "missed": self.missed.get(p).copied().unwrap_or(0),
                    }),
                )
            })
            .collect();
        let link: serde_json::Map<String, Value> = self
            .link
            .iter()
            .map(|(k, (hit, idle))| (k.to_string(), json!({"hit": hit, "idle": idle})))
            .collect();
        json!({
            "seed": self.seed,
            "rounds": self.rounds,
            "raw_vms": self.raw_vms,
            "live": self.live,
            "seconds": self.seconds,
            "kills": kills,
            "link_faults": link,
            "bytes": {
                "up": self.all().up,
                "stored": self.all().stored,
                "points_reported_sent": self.all().sent,
                "overhead_fault_free": self.overhead(),
                "resent": self.resent(),
                "resent_share": ratio(self.resent(), self.all().stored),
                "resent_share_of_faulted_cycles": ratio(self.resent(), self.faulted.stored),
                "up_beyond_reported_share": self.up_over_reported(),
            },
            "syncs": {
                "attempts": self.sync_attempts,
                "failed": self.sync_failures,
                "recovery_attempts": self.recovery_attempts,
                "unexplained_failures": self.unexplained,
                "outage_writes": self.outage_writes,
                "resumed": self.resumed,
                "resumed_sent_bytes": self.resumed_sent,
                "resumed_full_copy_bytes": self.resumed_full_copy,
            },
            "points": {
                "committed": self.points_committed,
                "unreported": self.points_unreported,
                "pruned": self.points_pruned,
                "locked": self.points_locked,
                "lost": self.points_lost,
                "checked": self.points_checked,
                "restores_bit_exact": self.restores_bit_exact,
            },
            "verify_clean": self.verify_clean,
        })
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "rewind-chaos --seed {}: {} rounds, {} raw VM(s){}, {:.0} s\n\n",
            self.seed,
            self.rounds,
            self.raw_vms,
            if self.live { " + 1 live QEMU VM" } else { "" },
            self.seconds
        );
        s += "kills survived   total  by phase (missed: the process had already finished)\n";
        for p in ["agent", "receiver", "gc", "prune", "qemu"] {
            let phases: Vec<String> = self
                .kills
                .get(p)
                .into_iter()
                .flatten()
                .map(|(ph, n)| format!("{ph} {n}"))
                .collect();
            s += &format!(
                "  {p:<13} {:>6}  {} (missed {})\n",
                self.kills_of(p),
                phases.join(", "),
                self.missed.get(p).copied().unwrap_or(0)
            );
        }
        s += "link faults        hit  idle\n";
        for (k, (hit, idle)) in &self.link {
            s += &format!("  {k:<13} {hit:>6} {idle:>5}\n");
        }
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let all = self.all();
        s += &format!(
            "bytes up the links {:.1} MiB for {:.1} MiB of chunks stored (overhead in fault-free \
             cycles {:.1}%); re-sent after kills and cuts {:.1} MiB: {:.1}% of all stored, \
             {:.1}% of what faulted cycles stored\n",
            mib(all.up),
            mib(all.stored),
            100.0 * self.overhead(),
            self.resent() / (1 << 20) as f64,
            100.0 * ratio(self.resent(), all.stored),
            100.0 * ratio(self.resent(), self.faulted.stored),
        );
        s += &format!(
            "  (the committed points' own reports say {:.1} MiB: a run that finishes a killed \
             one's session reports only what it sent itself; up beyond that {:.1}%)\n",
            mib(all.sent),
            100.0 * self.up_over_reported()
        );
        s += &format!(
            "syncs {} ({} failed, {} recovery attempts, {} with writes during the outage); \
             resumed {}: sent {:.1} MiB where full copies are {:.1} MiB\n",
            self.sync_attempts,
            self.sync_failures,
            self.recovery_attempts,
            self.outage_writes,
            self.resumed,
            mib(self.resumed_sent),
            mib(self.resumed_full_copy)
        );
        s += &format!(
            "failed syncs without an injected fault: {}\n",
            self.unexplained.len()
        );
        for u in &self.unexplained {
            s += &format!("  {u}\n");
        }
        s += &format!(
            "points committed {} ({} committed by a run killed before it reported them), \
             pruned {}, locked {}, lost {}\n",
            self.points_committed,
            self.points_unreported,
            self.points_pruned,
            self.points_locked,
            self.points_lost
        );
        s += &format!(
            "points checked bit-exact {} ({} restores), verify runs clean {}\n",
            self.points_checked, self.restores_bit_exact, self.verify_clean
        );
        s
    }
}
