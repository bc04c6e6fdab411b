//! The record of every committed point and the disk content it must restore to, and the
//! invariants checked against the receiver after every round.

use crate::cluster::Cluster;
use crate::figures::Figures;
use crate::machines::{Machine, Snapshot};
use crate::plan::{BLOCK, KEEP_LAST, PRUNE_VM};
use crate::round::RoundResult;
use crate::Violation;
use anyhow::{Context, Result};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Points besides the round's new ones that each round restores, picked at random.
const SAMPLE: usize = 2;
/// Bytes a sync may send per changed block beyond the block itself (chunk framing).
const CHUNK_OVERHEAD: u64 = 256;

/// How much a check restores and verifies.
#[derive(Debug, Clone, Copy)]
pub struct Depth {
    /// Picks the older points restored besides the round's new ones.
    pub sample_seed: u64,
    /// Restore every listed point instead.
    pub all: bool,
    /// Run `verify` over the whole store.
    pub verify: bool,
}

struct Entry {
    vm: usize,
    round: u64,
    /// Which of the round's disk contents it holds.
    snap: usize,
    want: Snapshot,
    /// Roots the sync reported, per disk; `None` for a point committed by a run that was
    /// killed before it could report it.
    roots: Option<Vec<String>>,
}

pub struct Ledger {
    points: BTreeMap<u64, Entry>,
    locked: BTreeSet<u64>,
    pruned: BTreeSet<u64>,
    /// Per VM: the newest point recorded before the current round.
    before: Vec<u64>,
    checked: BTreeSet<u64>,
}

fn violation(msg: String) -> anyhow::Error {
    Violation::new(msg).into()
}

fn u64_of(v: &Value, what: &str) -> Result<u64> {
    v.as_u64()
        .ok_or_else(|| violation(format!("{what} is not a number: {v}")))
}

impl Ledger {
    pub fn new(vms: usize) -> Ledger {
        Ledger {
            points: BTreeMap::new(),
            locked: BTreeSet::new(),
            pruned: BTreeSet::new(),
            before: vec![0; vms],
            checked: BTreeSet::new(),
        }
    }

    /// Records the round's reported points, checking each report: a new id newer than every
    /// earlier point of its VM, no more bytes sent than its changed blocks hold, and a resumed
    /// delta well under a full copy.
    pub fn record(
        &mut self,
        round: u64,
        res: &RoundResult,
        ms: &[Machine],
        fig: &mut Figures,
    ) -> Result<()> {
        for (vm, s) in res.success.iter().enumerate() {
            let m = &ms[vm];
            let r = &s.report;
            let id = u64_of(&r["point"], "a report's point")?;
            if r["vm"] != m.name.as_str() {
                return Err(violation(format!(
                    "sync of {} reported VM {}: {r}",
                    m.name, r["vm"]
                )));
            }
            if self.points.contains_key(&id) {
                return Err(violation(format!(
                    "{}: point {id} reported a second time",
                    m.name
                )));
            }
            if id <= self.before[vm] {
                return Err(violation(format!(
                    "{}: point {id} of round {} is not newer than point {} of an earlier \
                     round",
                    m.name,
                    round + 1,
                    self.before[vm]
                )));
            }
            let disks = r["disks"].as_array().cloned().unwrap_or_default();
            let names: Vec<&str> = disks.iter().filter_map(|d| d["name"].as_str()).collect();
            let want: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
            if names != want {
                return Err(violation(format!(
                    "{}: point {id} has disks {names:?}, not {want:?}",
                    m.name
                )));
            }
            let sent = u64_of(&r["sent_bytes"], "sent_bytes")?;
            let mut blocks = 0;
            for d in &disks {
                blocks += d["changed_blocks"].as_u64().unwrap_or(0)
                    + d["healed_blocks"].as_u64().unwrap_or(0);
            }
            if sent > blocks * (BLOCK + CHUNK_OVERHEAD) {
                return Err(violation(format!(
                    "{}: point {id} sent {sent} bytes for {blocks} changed blocks: chunks sent \
                     twice",
                    m.name
                )));
            }
            if r["resumed"] == true {
                let full = m.full_copy_bytes();
                fig.resumed += 1;
                fig.resumed_sent += sent;
                fig.resumed_full_copy += full;
                let delta = disks.iter().all(|d| d["mode"] == "delta");
                if delta && sent >= full {
                    return Err(violation(format!(
                        "{}: resumed point {id} sent {sent} bytes, a full copy is {full}",
                        m.name
                    )));
                }
            }
            let roots = disks
                .iter()
                .map(|d| d["root"].as_str().unwrap_or("").to_owned())
                .collect();
            self.points.insert(
                id,
                Entry {
                    vm,
                    round,
                    snap: s.snap,
                    want: res.snaps[vm][s.snap].clone(),
                    roots: Some(roots),
                },
            );
            fig.points_committed += 1;
            let bytes = if !res.struck[vm].is_empty() {
                &mut fig.faulted
            } else {
                &mut fig.clean
            };
            bytes.add(res.up[vm], sent, res.stored[vm]);
        }
        Ok(())
    }

    /// Checks the receiver against the record after round `round`; `snaps` are the round's disk
    /// contents. Returns, per VM, the points found committed but never reported.
    pub fn check(
        &mut self,
        cl: &Cluster,
        ms: &[Machine],
        round: u64,
        snaps: &[Vec<Snapshot>],
        depth: Depth,
        fig: &mut Figures,
    ) -> Result<Vec<u64>> {
        let all = depth.all;
        let mut unreported = vec![0; ms.len()];
        let mut restore = Vec::new();
        let mut older = Vec::new();
        for (vm, m) in ms.iter().enumerate() {
            let listed = cl.points(&m.name)?;
            let mut ids = Vec::new();
            let mut prev_created = String::new();
            for p in &listed {
                let id = u64_of(&p["id"], "a listed point's id")?;
                if ids.last().is_some_and(|&last| id <= last) {
                    return Err(violation(format!(
                        "{}: points are listed out of order: {id} after {:?}",
                        m.name,
                        ids.last()
                    )));
                }
                let created = p["created"].as_str().unwrap_or("").to_owned();
                if created < prev_created {
                    return Err(violation(format!(
                        "{}: point {id} was created at {created}, before the point listed \
                         ahead of it ({prev_created})",
                        m.name
                    )));
                }
                prev_created = created;
                if self.pruned.contains(&id) {
                    return Err(violation(format!(
                        "{}: pruned point {id} is listed again",
                        m.name
                    )));
                }
                if !self.points.contains_key(&id) {
                    // Committed by a sync killed before it reported: only this round can have.
                    if id <= self.before[vm] {
                        return Err(violation(format!(
                            "{}: point {id} is listed but no sync of this run committed it",
                            m.name
                        )));
                    }
                    let got = self.restore(cl, m, id, fig)?;
                    let snap = snaps[vm].iter().position(|s| *s == got).ok_or_else(|| {
                        violation(format!(
                            "{}: point {id}, committed in round {} by a sync that did not \
                             report it, restores to none of the round's disk contents",
                            m.name,
                            round + 1
                        ))
                    })?;
                    self.points.insert(
                        id,
                        Entry {
                            vm,
                            round,
                            snap,
                            want: got,
                            roots: None,
                        },
                    );
                    unreported[vm] += 1;
                    fig.points_unreported += 1;
                    fig.points_committed += 1;
                }
                let e = &self.points[&id];
                if e.vm != vm {
                    return Err(violation(format!(
                        "point {id} is listed for {} but was committed for {}",
                        m.name, ms[e.vm].name
                    )));
                }
                if let Some(roots) = &e.roots {
                    let listed_roots: Vec<String> = p["disks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|d| d["root"].as_str().unwrap_or("").to_owned())
                        .collect();
                    if &listed_roots != roots {
                        return Err(violation(format!(
                            "{}: point {id} is listed with roots {listed_roots:?}, its sync \
                             reported {roots:?}",
                            m.name
                        )));
                    }
                }
                if self.locked.contains(&id) && p["locked_until"].is_null() {
                    return Err(violation(format!(
                        "{}: point {id} was locked, the listing shows no lock",
                        m.name
                    )));
                }
                if all || (e.round == round && e.roots.is_some()) {
                    restore.push((vm, id));
                } else if e.round < round {
                    older.push((vm, id));
                }
                ids.push(id);
            }
            for w in ids.windows(2) {
                let (a, b) = (&self.points[&w[0]], &self.points[&w[1]]);
                if (a.round, a.snap) > (b.round, b.snap) {
                    return Err(violation(format!(
                        "{}: point {} (round {}) is listed before point {} (round {}): ids \
                         out of the order of the rounds",
                        m.name,
                        w[0],
                        a.round + 1,
                        w[1],
                        b.round + 1
                    )));
                }
            }
            self.missing(vm, m, &ids, fig)?;
            self.before[vm] = ids.last().copied().unwrap_or(0).max(self.before[vm]);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(depth.sample_seed);
        restore.extend(older.choose_multiple(&mut rng, SAMPLE).copied());
        for (vm, id) in restore {
            let got = self.restore(cl, &ms[vm], id, fig)?;
            let e = &self.points[&id];
            if got != e.want {
                let differ: Vec<&str> = ms[vm]
                    .disks
                    .iter()
                    .zip(got.iter().zip(&e.want))
                    .filter(|(_, (g, w))| g != w)
                    .map(|(d, _)| d.name.as_str())
                    .collect();
                return Err(violation(format!(
                    "{}: point {id} (round {}, disk content #{} of the round) does not restore \
                     bit-exact: disk(s) {} differ from what the VM held",
                    ms[vm].name,
                    e.round + 1,
                    e.snap,
                    differ.join(", ")
                )));
            }
        }
        fig.points_checked = self.checked.len() as u64;
        if !depth.verify {
            return Ok(unreported);
        }
        let v = cl
            .offline_json(&["verify", "--json"])
            .map_err(|e| violation(format!("verify: {e:#}")))?;
        let empty = |k: &str| v[k].as_array().is_some_and(Vec::is_empty);
        if !empty("bad") || !empty("quarantined") {
            return Err(violation(format!("verify found damage: {v}")));
        }
        fig.verify_clean += 1;
        Ok(unreported)
    }

    /// Every recorded point of a VM that is no longer listed must have been one prune was
    /// allowed to remove: of the prune target, not locked, not among its newest.
    fn missing(&mut self, vm: usize, m: &Machine, listed: &[u64], fig: &mut Figures) -> Result<()> {
        let listed: BTreeSet<u64> = listed.iter().copied().collect();
        let mine: Vec<u64> = self
            .points
            .iter()
            .filter(|(_, e)| e.vm == vm)
            .map(|(id, _)| *id)
            .collect();
        let newest: BTreeSet<u64> = mine.iter().rev().take(KEEP_LAST).copied().collect();
        for id in mine {
            if listed.contains(&id) || self.pruned.contains(&id) {
                continue;
            }
            let why = if vm != PRUNE_VM {
                Some("nothing prunes this VM")
            } else if self.locked.contains(&id) {
                Some("it is locked")
            } else if newest.contains(&id) {
                Some("it is among the VM's newest points")
            } else {
                None
            };
            match why {
                None => {
                    self.pruned.insert(id);
                    fig.points_pruned += 1;
                }
                Some(why) => {
                    fig.points_lost += 1;
                    let e = &self.points[&id];
                    return Err(violation(format!(
                        "{}: point {id} (round {}) is gone, though {why}",
                        m.name,
                        e.round + 1
                    )));
                }
            }
        }
        Ok(())
    }

    fn restore(
        &mut self,
        cl: &Cluster,
        m: &Machine,
        id: u64,
        fig: &mut Figures,
    ) -> Result<Snapshot> {
        let got = m
            .disks
            .iter()
            .map(|d| cl.restored(&m.name, &d.name, id))
            .collect::<Result<Snapshot>>()?;
        fig.restores_bit_exact += 1;
        self.checked.insert(id);
        Ok(got)
    }

    /// Locks a listed point of the prune target (`pick` in [0, 1) chooses which) until 2099.
    pub fn lock(&mut self, cl: &Cluster, m: &Machine, pick: f64, fig: &mut Figures) -> Result<()> {
        let listed: Vec<u64> = cl
            .points(&m.name)?
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .collect();
        let Some(&id) = listed.get((pick * listed.len() as f64) as usize) else {
            return Ok(());
        };
        if !self.locked.insert(id) {
            return Ok(());
        }
        let out = cl
            .offline(&["lock", "--vm", &m.name, "--until", "2099-01-01T00:00:00Z"])
            .args(["--point", &id.to_string()])
            .output()?;
        crate::cluster::check(out, "lock").context("locking a point")?;
        fig.points_locked += 1;
        Ok(())
    }
}
