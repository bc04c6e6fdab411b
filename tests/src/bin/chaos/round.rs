//! One round: write to every VM's disks, run their syncs while the round's faults strike at
//! their instants, then recover: start again what was killed and sync until each VM has its
//! point.

use crate::cluster::{check, Cluster};
use crate::figures::Figures;
use crate::machines::{Machine, Snapshot};
use crate::plan::{LinkEvent, LinkFault, RoundPlan, Trigger, KEEP_LAST, PRUNE_VM};
use crate::Violation;
use anyhow::{Context, Result};
use rewind_tests::faultlink::LinkMode;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Bytes up a link past which an agent is uploading chunks, not just handshaking and asking.
const UPLOADING: u64 = 64 * 1024;
/// Longest a round's syncs may take while faults strike before the run calls it a hang.
const FAULT_PHASE_LIMIT: Duration = Duration::from_secs(240);
/// Longest one recovery sync may take.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);
/// Recovery syncs per VM before the run gives up on it.
const RECOVERY_TRIES: u32 = 8;

/// A successful sync: its report and which of the round's disk contents it was taken of.
pub struct Success {
    pub report: Value,
    pub snap: usize,
}

/// A SIGKILL that struck a running process.
pub struct Kill {
    pub process: &'static str,
    pub vm: Option<usize>,
    pub phase: &'static str,
    /// How long the process had run (the receiver: since the round's syncs started).
    pub after: Duration,
}

pub struct RoundResult {
    /// Per VM, the disk contents of the round in order: after the round's writes, then after
    /// writes made while its agent was down.
    pub snaps: Vec<Vec<Snapshot>>,
    pub success: Vec<Success>,
    pub kills: Vec<Kill>,
    /// Per VM: what struck its round's first sync while it ran ("agent", "receiver", "link",
    /// "qemu"), or "failure" for a sync that failed with nothing injected. Empty: a fault-free
    /// cycle.
    pub struck: Vec<BTreeSet<&'static str>>,
    /// Per VM: bytes up its link during the round.
    pub up: Vec<u64>,
    /// Per VM: chunk bytes its uploads added to the store during the round.
    pub stored: Vec<u64>,
}

struct SyncRun {
    vm: usize,
    child: Child,
    started: Instant,
    up0: u64,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
}

struct OfflineRun {
    process: &'static str,
    args: Vec<String>,
    child: Child,
    err: PathBuf,
    started: Instant,
    status: Option<ExitStatus>,
    killed: bool,
}

enum Event {
    KillAgent(usize),
    KillQemu(usize),
    KillReceiver(Duration),
    RestartReceiver,
    Link(LinkEvent),
    LinkPass(Option<usize>),
    Start(&'static str, Option<Duration>),
    KillOffline(&'static str),
}

/// The state of the fault phase: what runs, and when each scheduled event strikes.
struct Faults<'a> {
    cl: &'a mut Cluster,
    ms: &'a mut [Machine],
    fig: &'a mut Figures,
    logs: &'a Path,
    round: u64,
    syncs: Vec<SyncRun>,
    offline: Vec<OfflineRun>,
    events: Vec<(Duration, Event)>,
    /// Events that strike once a link carried this many bytes in the round.
    on_bytes: Vec<(usize, u64, Event)>,
    /// Bytes up each link at the start of the round.
    up0: Vec<u64>,
    t0: Instant,
    /// Time skipped while nothing ran that an event could strike.
    skipped: Duration,
    kills: Vec<Kill>,
    struck: Vec<BTreeSet<&'static str>>,
}

pub fn run(
    cl: &mut Cluster,
    ms: &mut [Machine],
    plan: &RoundPlan,
    round: u64,
    logs: &Path,
    fig: &mut Figures,
) -> Result<RoundResult> {
    let mut snaps = Vec::new();
    for (m, p) in ms.iter_mut().zip(&plan.vms) {
        m.ensure_running();
        m.apply(&p.writes);
        snaps.push(vec![m.snapshot()]);
    }
    let up0: Vec<u64> = cl.links.iter().map(|l| l.bytes_up()).collect();
    let stored0 = cl.stored_bytes()?;
    let prune_args = vec![
        "prune".to_owned(),
        "--vm".to_owned(),
        ms[PRUNE_VM].name.clone(),
        "--keep-last".to_owned(),
        KEEP_LAST.to_string(),
        "--json".to_owned(),
    ];

    let n = ms.len();
    let mut f = Faults {
        cl,
        ms,
        fig,
        logs,
        round,
        syncs: Vec::new(),
        offline: Vec::new(),
        events: Vec::new(),
        on_bytes: Vec::new(),
        up0: up0.clone(),
        t0: Instant::now(),
        skipped: Duration::ZERO,
        kills: Vec::new(),
        struck: vec![BTreeSet::new(); n],
    };
    for (vm, p) in plan.vms.iter().enumerate() {
        if let Some(t) = p.kill_agent {
            f.schedule(t, Event::KillAgent(vm));
        }
        if let Some(at) = p.kill_qemu {
            f.events.push((at, Event::KillQemu(vm)));
        }
    }
    if let Some(k) = plan.receiver {
        f.schedule(k.when, Event::KillReceiver(k.down_for));
    }
    for l in &plan.links {
        f.events.push((l.at, Event::Link(*l)));
    }
    if let Some(g) = plan.gc {
        f.events.push((g.start, Event::Start("gc", g.kill_after)));
    }
    if let Some(p) = plan.prune {
        f.events
            .push((p.start, Event::Start("prune", p.kill_after)));
    }
    for vm in 0..n {
        let s = f.spawn_sync(vm, plan.vms[vm].bwlimit, "a0")?;
        f.syncs.push(s);
    }
    f.fault_phase(&prune_args)?;
    for o in &f.offline {
        let status = o.status.context("offline run not reaped")?;
        if !o.killed && !status.success() {
            return Err(Violation::new(format!(
                "{} failed by itself ({status}) while the syncs ran: {}",
                o.args.join(" "),
                std::fs::read_to_string(&o.err).unwrap_or_default().trim()
            ))
            .into());
        }
    }

    let mut success = f.first_outcomes()?;
    f.recover(plan, &mut snaps, &mut success)?;
    let done: Vec<Success> = success.into_iter().flatten().collect();

    // gc and prune that were killed run again to the end.
    for o in std::mem::take(&mut f.offline) {
        if o.killed {
            let args: Vec<&str> = o.args.iter().map(String::as_str).collect();
            check(f.cl.offline(&args).output()?, &o.args.join(" "))
                .map_err(|e| Violation::new(format!("{} after a kill: {e:#}", o.process)))?;
        }
    }
    let up =
        f.cl.links
            .iter()
            .zip(&up0)
            .map(|(l, u)| l.bytes_up() - u)
            .collect();
    let stored = stored_during(f.cl, f.ms, &stored0)?;
    Ok(RoundResult {
        snaps,
        success: done,
        kills: std::mem::take(&mut f.kills),
        struck: std::mem::take(&mut f.struck),
        up,
        stored,
    })
}

fn stored_during(
    cl: &Cluster,
    ms: &[Machine],
    before: &std::collections::BTreeMap<String, u64>,
) -> Result<Vec<u64>> {
    let after = cl.stored_bytes()?;
    Ok(ms
        .iter()
        .map(|m| {
            let b = before.get(&m.name).copied().unwrap_or(0);
            after.get(&m.name).copied().unwrap_or(0).saturating_sub(b)
        })
        .collect())
}

/// The report of a finished sync, or why it failed.
fn outcome(s: &SyncRun) -> Result<std::result::Result<Value, String>> {
    let status = s.status.context("sync not reaped")?;
    if status.success() {
        let out = std::fs::read(&s.out)?;
        let v = serde_json::from_slice(&out).map_err(|e| {
            Violation::new(format!(
                "sync of VM #{} succeeded but printed no JSON report ({e}): {}",
                s.vm,
                String::from_utf8_lossy(&out)
            ))
        })?;
        return Ok(Ok(v));
    }
    let err = std::fs::read_to_string(&s.err).unwrap_or_default();
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_owned();
    Ok(Err(match status.signal() {
        Some(sig) => format!("killed by signal {sig}"),
        None => format!("{status}: {last}"),
    }))
}

impl Faults<'_> {
    /// The reports of the round's first syncs; a failure with no fault injected on its VM is
    /// noted as unexplained.
    fn first_outcomes(&mut self) -> Result<Vec<Option<Success>>> {
        let mut success: Vec<Option<Success>> = self.ms.iter().map(|_| None).collect();
        for s in std::mem::take(&mut self.syncs) {
            self.fig.sync_attempts += 1;
            match outcome(&s)? {
                Ok(report) => success[s.vm] = Some(Success { report, snap: 0 }),
                Err(msg) => {
                    self.fig.sync_failures += 1;
                    if self.struck[s.vm].is_empty() {
                        self.fig.unexplained.push(format!(
                            "round {} {}: {msg}",
                            self.round + 1,
                            self.ms[s.vm].name
                        ));
                        self.struck[s.vm].insert("failure");
                    }
                }
            }
        }
        Ok(success)
    }

    /// Brings QEMU back, makes the writes a VM does while its agent is down, then syncs each VM
    /// that has no point yet until it has one; with no fault injected any more, a VM that
    /// still gets none is a finding.
    fn recover(
        &mut self,
        plan: &RoundPlan,
        snaps: &mut [Vec<Snapshot>],
        success: &mut [Option<Success>],
    ) -> Result<()> {
        for vm in 0..self.ms.len() {
            if success[vm].is_none() {
                self.ms[vm].ensure_running();
                let outage = &plan.vms[vm].outage_writes;
                if !outage.is_empty() {
                    self.ms[vm].apply(outage);
                    snaps[vm].push(self.ms[vm].snapshot());
                    self.fig.outage_writes += 1;
                }
            }
        }
        let mut last_error = vec![String::new(); self.ms.len()];
        for attempt in 1..=RECOVERY_TRIES {
            let pending: Vec<usize> = (0..self.ms.len())
                .filter(|&vm| success[vm].is_none())
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if attempt > 1 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let mut runs = Vec::new();
            for &vm in &pending {
                runs.push(self.spawn_sync(vm, None, &format!("r{attempt}"))?);
            }
            for mut s in runs {
                let deadline = Instant::now() + RECOVERY_LIMIT;
                while s.child.try_wait()?.is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if s.child.try_wait()?.is_none() {
                    let _ = s.child.kill();
                    s.child.wait()?;
                    return Err(Violation::new(format!(
                        "{}: a recovery sync with no fault injected ran for more than {} s",
                        self.ms[s.vm].name,
                        RECOVERY_LIMIT.as_secs()
                    ))
                    .into());
                }
                s.status = Some(s.child.wait()?);
                self.fig.sync_attempts += 1;
                self.fig.recovery_attempts += 1;
                match outcome(&s)? {
                    Ok(report) => {
                        let snap = snaps[s.vm].len() - 1;
                        success[s.vm] = Some(Success { report, snap });
                    }
                    Err(msg) => {
                        self.fig.sync_failures += 1;
                        last_error[s.vm] = msg;
                    }
                }
            }
        }
        match (0..self.ms.len()).find(|&vm| success[vm].is_none()) {
            None => Ok(()),
            Some(vm) => Err(Violation::new(format!(
                "{}: no sync succeeded in {RECOVERY_TRIES} tries after the faults: {}",
                self.ms[vm].name, last_error[vm]
            ))
            .into()),
        }
    }

    fn clock(&self) -> Duration {
        self.t0.elapsed() + self.skipped
    }

    fn schedule(&mut self, t: Trigger, ev: Event) {
        match t {
            Trigger::At(at) => self.events.push((at, ev)),
            Trigger::Uploaded(link, bytes) => self.on_bytes.push((link, bytes, ev)),
        }
    }

    /// The first event waiting on bytes whose link carried them, or whose link's sync ended
    /// (it then strikes at once: the agent is gone, the receiver idle or serving others).
    fn bytes_due(&self) -> Option<usize> {
        self.on_bytes.iter().position(|(link, bytes, _)| {
            self.cl.links[*link].bytes_up() - self.up0[*link] >= *bytes
                || self.running_sync(*link).is_none()
        })
    }

    fn spawn_sync(&mut self, vm: usize, bwlimit: Option<u32>, tag: &str) -> Result<SyncRun> {
        let name = &self.ms[vm].name;
        let out = self
            .logs
            .join(format!("r{:04}-{name}-{tag}.json", self.round + 1));
        let err = self
            .logs
            .join(format!("r{:04}-{name}-{tag}.log", self.round + 1));
        let child = self
            .cl
            .sync(vm, name, &self.ms[vm].target(), bwlimit)
            .env("REWIND_LOG", "info")
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?)
            .spawn()
            .context("spawning rewind-agent")?;
        Ok(SyncRun {
            vm,
            child,
            started: Instant::now(),
            up0: self.cl.links[vm].bytes_up(),
            out,
            err,
            status: None,
        })
    }

    fn running_sync(&self, vm: usize) -> Option<&SyncRun> {
        self.syncs.iter().find(|s| s.vm == vm && s.status.is_none())
    }

    fn poll(&mut self) -> Result<()> {
        for s in &mut self.syncs {
            if s.status.is_none() {
                s.status = s.child.try_wait()?;
            }
        }
        for o in &mut self.offline {
            if o.status.is_none() {
                o.status = o.child.try_wait()?;
            }
        }
        self.cl.check_serve()
    }

    fn fault_phase(&mut self, prune_args: &[String]) -> Result<()> {
        loop {
            self.poll()?;
            let syncs = self.syncs.iter().any(|s| s.status.is_none());
            let offline = self.offline.iter().any(|o| o.status.is_none());
            let restart_due = self
                .events
                .iter()
                .any(|(_, e)| matches!(e, Event::RestartReceiver));
            if let Some(i) = self.bytes_due() {
                let (_, _, ev) = self.on_bytes.swap_remove(i);
                self.strike(ev, prune_args)?;
                continue;
            }
            if self.events.is_empty() && !syncs && !offline {
                return Ok(());
            }
            if self.t0.elapsed() > FAULT_PHASE_LIMIT {
                let stuck: Vec<String> = self
                    .syncs
                    .iter_mut()
                    .filter(|s| s.status.is_none())
                    .map(|s| {
                        let _ = s.child.kill();
                        format!(
                            "{} (since {:.1} s)",
                            s.vm,
                            s.started.elapsed().as_secs_f64()
                        )
                    })
                    .collect();
                return Err(Violation::new(format!(
                    "syncs of VM #{} still running after {} s of faults: a hang",
                    stuck.join(", #"),
                    FAULT_PHASE_LIMIT.as_secs()
                ))
                .into());
            }
            let Some(i) = (0..self.events.len()).min_by_key(|&i| self.events[i].0) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let at = self.events[i].0;
            let now = self.clock();
            if at > now {
                if !syncs && !offline && !restart_due {
                    // Nothing for the event to strike but the idle receiver: skip the wait.
                    self.skipped += at - now;
                } else {
                    std::thread::sleep((at - now).min(Duration::from_millis(5)));
                }
                continue;
            }
            let (_, ev) = self.events.swap_remove(i);
            self.strike(ev, prune_args)?;
        }
    }

    fn strike(&mut self, ev: Event, prune_args: &[String]) -> Result<()> {
        match ev {
            Event::KillAgent(vm) => {
                let Some(s) = self.running_sync(vm) else {
                    self.fig.miss("agent");
                    return Ok(());
                };
                let up = self.cl.links[vm].bytes_up() - s.up0;
                let after = s.started.elapsed();
                let phase = if up == 0 {
                    "starting"
                } else if up < UPLOADING {
                    "begin"
                } else {
                    "uploading"
                };
                let s = self
                    .syncs
                    .iter_mut()
                    .find(|s| s.vm == vm && s.status.is_none())
                    .context("sync")?;
                let _ = s.child.kill();
                let status = s.child.wait()?;
                s.status = Some(status);
                if status.signal() == Some(9) {
                    self.struck[vm].insert("agent");
                    self.kills.push(Kill {
                        process: "agent",
                        vm: Some(vm),
                        phase,
                        after,
                    });
                } else {
                    self.fig.miss("agent");
                }
            }
            Event::KillQemu(vm) => {
                let hit = self.running_sync(vm).is_some();
                if self.ms[vm].kill_qemu() {
                    if hit {
                        self.struck[vm].insert("qemu");
                    }
                    self.kills.push(Kill {
                        process: "qemu",
                        vm: Some(vm),
                        phase: if hit { "mid-sync" } else { "idle" },
                        after: self.t0.elapsed(),
                    });
                }
            }
            Event::KillReceiver(down_for) => {
                let phase = self.receiver_phase();
                for vm in 0..self.ms.len() {
                    if self.running_sync(vm).is_some() {
                        self.struck[vm].insert("receiver");
                    }
                }
                self.cl.kill_serve()?;
                self.kills.push(Kill {
                    process: "receiver",
                    vm: None,
                    phase,
                    after: self.t0.elapsed(),
                });
                self.events
                    .push((self.clock() + down_for, Event::RestartReceiver));
            }
            Event::RestartReceiver => self.cl.restart_serve()?,
            Event::Link(l) => {
                let links: Vec<usize> = match l.link {
                    Some(i) => vec![i],
                    None => (0..self.cl.links.len()).collect(),
                };
                let hit = links.iter().any(|&i| self.running_sync(i).is_some());
                for &i in &links {
                    if self.running_sync(i).is_some() {
                        self.struck[i].insert("link");
                    }
                    let link = &self.cl.links[i];
                    match l.fault {
                        LinkFault::Cut => link.cut(),
                        LinkFault::Down(_) => link.set(LinkMode::Down),
                        LinkFault::Stall(_) => link.set(LinkMode::Stall),
                        LinkFault::Trickle(bytes_per_sec, _) => {
                            link.set(LinkMode::Trickle { bytes_per_sec })
                        }
                    }
                }
                self.fig.link_fault(l.fault.name(), hit);
                if let LinkFault::Down(d) | LinkFault::Stall(d) | LinkFault::Trickle(_, d) = l.fault
                {
                    self.events
                        .push((self.clock() + d, Event::LinkPass(l.link)));
                }
            }
            Event::LinkPass(link) => {
                for (i, l) in self.cl.links.iter().enumerate() {
                    if link.is_none_or(|j| j == i) {
                        l.set(LinkMode::Pass);
                    }
                }
            }
            Event::Start(process, kill_after) => {
                let args: Vec<String> = if process == "gc" {
                    ["gc", "--grace", "0", "--json"].map(String::from).to_vec()
                } else {
                    prune_args.to_vec()
                };
                let err = self
                    .logs
                    .join(format!("r{:04}-{process}.log", self.round + 1));
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let child = self
                    .cl
                    .offline(&a)
                    .env("REWIND_LOG", "warn")
                    .stdout(std::process::Stdio::null())
                    .stderr(File::create(&err)?)
                    .spawn()?;
                self.offline.push(OfflineRun {
                    process,
                    args,
                    child,
                    err,
                    started: Instant::now(),
                    status: None,
                    killed: false,
                });
                if let Some(k) = kill_after {
                    self.events
                        .push((self.clock() + k, Event::KillOffline(process)));
                }
            }
            Event::KillOffline(process) => {
                let o = self
                    .offline
                    .iter_mut()
                    .find(|o| o.process == process)
                    .context("offline run")?;
                if o.status.is_some() {
                    self.fig.miss(process);
                    return Ok(());
                }
                let phase = match store_writes(o.child.id()) {
                    Some(0) => "before-writing",
                    Some(_) => "writing",
                    None => "unknown",
                };
                let after = o.started.elapsed();
                let _ = o.child.kill();
                let status = o.child.wait()?;
                o.status = Some(status);
                if status.signal() == Some(9) {
                    o.killed = true;
                    self.kills.push(Kill {
                        process,
                        vm: None,
                        phase,
                        after,
                    });
                } else {
                    self.fig.miss(process);
                }
            }
        }
        Ok(())
    }

    /// What the receiver was doing at a kill, seen from outside: serving nobody, syncs that
    /// have not uploaded much yet, or uploads.
    fn receiver_phase(&self) -> &'static str {
        let running: Vec<&SyncRun> = self.syncs.iter().filter(|s| s.status.is_none()).collect();
        if running.is_empty() {
            "idle"
        } else if running
            .iter()
            .any(|s| self.cl.links[s.vm].bytes_up() - s.up0 >= UPLOADING)
        {
            "uploads-in-flight"
        } else {
            "syncs-starting"
        }
    }
}

impl Drop for Faults<'_> {
    fn drop(&mut self) {
        // Reaps what an early return (a finding) left running, and heals the links.
        for s in &mut self.syncs {
            if s.status.is_none() {
                let _ = s.child.kill();
                let _ = s.child.wait();
            }
        }
        for o in &mut self.offline {
            if o.status.is_none() {
                let _ = o.child.kill();
                let _ = o.child.wait();
            }
        }
        for l in &self.cl.links {
            l.set(LinkMode::Pass);
        }
    }
}

/// Bytes of files the process has written so far (`write_bytes` of /proc/PID/io: page-cache
/// pages it dirtied and direct writes; its stdout is /dev/null and it logs nothing below
/// warnings, so these are the store's catalog and packs).
fn store_writes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// After the last round: one sync of every VM with nothing written since its last point. The
/// agent's state and the receiver must agree: no block changed, nothing sent.
pub fn quiet(cl: &mut Cluster, ms: &mut [Machine], round: u64, logs: &Path) -> Result<RoundResult> {
    let mut snaps = Vec::new();
    let mut success = Vec::new();
    let mut up = Vec::new();
    let stored0 = cl.stored_bytes()?;
    for (vm, m) in ms.iter_mut().enumerate() {
        m.ensure_running();
        snaps.push(vec![m.snapshot()]);
        let up0 = cl.links[vm].bytes_up();
        let out = cl
            .sync(vm, &m.name, &m.target(), None)
            .env("REWIND_LOG", "info")
            .stderr(File::create(
                logs.join(format!("r{round:04}-{}-quiet.log", m.name)),
            )?)
            .output()?;
        up.push(cl.links[vm].bytes_up() - up0);
        if !out.status.success() {
            return Err(Violation::new(format!(
                "{}: the final sync failed ({}); see {}",
                m.name,
                out.status,
                logs.display()
            ))
            .into());
        }
        let report: Value = serde_json::from_slice(&out.stdout)?;
        let changed = report["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["changed_blocks"] != 0);
        if changed || report["sent_bytes"] != 0 {
            return Err(Violation::new(format!(
                "{}: nothing was written since its last point, yet the final sync found \
                 changes: {report}",
                m.name
            ))
            .into());
        }
        success.push(Success { report, snap: 0 });
    }
    let stored = stored_during(cl, ms, &stored0)?;
    Ok(RoundResult {
        snaps,
        success,
        kills: Vec::new(),
        struck: vec![BTreeSet::new(); ms.len()],
        up,
        stored,
    })
}
