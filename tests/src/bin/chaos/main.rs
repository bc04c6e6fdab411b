//! `rewind-chaos`: continuous replication under random faults. Several VMs (raw image files,
//! and with `--live` one live QEMU VM) replicate round after round through links that are cut,
//! stalled and taken down, while a seeded schedule SIGKILLs the agent, the receiver, gc, prune
//! and QEMU at random instants. After every round the receiver is checked against a record of
//! what each VM's disks held: every listed point restores bit-exact to the content of the round
//! that produced it, ids follow the rounds, locked and recent points survive prune, verify is
//! clean, and resumed syncs send less than a full copy.
//!
//! One seed decides the whole schedule (what is written, which process dies at which instant or
//! after how many uploaded bytes, which link fails how); a failure prints the command that
//! replays it. The machine's timing still decides what exactly a kill interrupts, so a replay
//! repeats the schedule, not every interleaving. Long run (binaries built with
//! `cargo build --release --workspace --bins` first):
//! `cargo run --release -p rewind-tests --bin rewind-chaos -- --seed 1 --rounds 300 --live`.
//!
//! Modules: `plan` draws the schedule, `cluster` runs the receiver and the links, `machines`
//! holds the VMs and their expected content, `round` runs one round's faults and recovery,
//! `ledger` records the points and checks the invariants, `figures` counts and prints.

mod cluster;
mod figures;
mod ledger;
mod machines;
mod plan;
mod round;

use anyhow::{bail, Result};
use clap::Parser;
use figures::Figures;
use machines::Machine;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Replication under random SIGKILLs and link faults, checked every round")]
struct Args {
    /// Seed of the schedule (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Rounds: each writes to every VM, syncs it under the round's faults, recovers, checks.
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Raw VMs (one 32-64 MiB image file each).
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// Add a live QEMU VM (two qcow2 disks; skipped if qemu-system-x86_64 is missing).
    #[arg(long)]
    live: bool,
    /// Print the figures as JSON on stdout (the progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run `verify` over the whole store after every Nth round (and at the end). Its cost grows
    /// with the store; every round's new points are restored bit-exact either way.
    #[arg(long, default_value_t = 1)]
    verify_every: u64,
    /// Keep every round's agent, gc and prune logs in WORK/logs (default: the last round's).
    #[arg(long)]
    keep_logs: bool,
    /// Never SIGKILL QEMU (the rest of the schedule stays the same).
    #[arg(long)]
    no_qemu_kills: bool,
    /// Work folder (kept); default: a temporary one, kept only if the run fails.
    #[arg(long)]
    work: Option<PathBuf>,
}

/// A broken invariant: the run's finding, as opposed to a failure of the harness itself.
#[derive(Debug)]
pub struct Violation(String);

impl Violation {
    pub fn new(msg: String) -> Violation {
        Violation(msg)
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Violation {}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000)
            .unwrap_or(1)
    });
    let live = args.live && qemu_available();
    if args.live && !live {
        eprintln!("rewind-chaos: qemu-system-x86_64 or qemu-img is missing: no live VM");
    }
    let flags = format!(
        "--vms {}{}{}",
        args.vms,
        if live { " --live" } else { "" },
        if args.no_qemu_kills {
            " --no-qemu-kills"
        } else {
            ""
        }
    );
    let rerun =
        move |rounds: u64| format!("rerun: rewind-chaos --seed {seed} --rounds {rounds} {flags}");
    eprintln!("rewind-chaos: seed {seed}");
    // A panic inside the harness (QEMU not starting, say) still names the schedule.
    let hook = std::panic::take_hook();
    let r = rerun(args.rounds);
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        eprintln!("{r}");
    }));

    let mut at = 0;
    let mut kept = None;
    match run(&args, seed, live, &mut at, &mut kept) {
        Ok(fig) => {
            if args.json {
                println!("{}", fig.json());
                eprint!("{}", fig.table());
            } else {
                print!("{}", fig.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let violation = e.downcast_ref::<Violation>().is_some();
            let round = if at < args.rounds {
                format!("round {}/{}", at + 1, args.rounds)
            } else {
                "the final check".to_owned()
            };
            eprintln!(
                "\n{} in {round}: {e:#}",
                if violation {
                    "INVARIANT VIOLATED"
                } else {
                    "HARNESS ERROR"
                }
            );
            eprintln!("{}", rerun((at + 1).min(args.rounds)));
            if let Some(dir) = kept {
                eprintln!(
                    "work folder kept: {} (receiver.log, logs/ of the round)",
                    dir.display()
                );
            }
            ExitCode::from(if violation { 1 } else { 2 })
        }
    }
}

fn qemu_available() -> bool {
    ["qemu-system-x86_64", "qemu-img"].iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn run(
    args: &Args,
    seed: u64,
    live: bool,
    at: &mut u64,
    kept: &mut Option<PathBuf>,
) -> Result<Figures> {
    let bins = rewind_tests::benchkit::bin_dir()?;
    let tmp;
    let work = match &args.work {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            if std::fs::read_dir(w)?.next().is_some() {
                bail!("--work {} is not empty", w.display());
            }
            *kept = Some(w.clone());
            w.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("rewind-chaos-").tempdir()?;
            let path = tmp.path().to_owned();
            let result = rounds(args, seed, live, &bins, &path, at);
            if result.is_err() {
                *kept = Some(tmp.keep());
            }
            return result;
        }
    };
    rounds(args, seed, live, &bins, &work, at)
}

fn rounds(
    args: &Args,
    seed: u64,
    live: bool,
    bins: &Path,
    work: &Path,
    at: &mut u64,
) -> Result<Figures> {
    let started = Instant::now();
    let shapes = plan::shapes(seed, args.vms, live);
    if shapes.is_empty() {
        bail!("no VM to replicate: --vms 0 and no live VM");
    }
    let mut fig = Figures {
        seed,
        rounds: args.rounds,
        raw_vms: args.vms,
        live,
        ..Figures::default()
    };
    let mut cl = cluster::Cluster::start(bins, work, shapes.len())?;
    let mut ms: Vec<Machine> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Machine::new(work, i, s))
        .collect();
    let mut ledger = ledger::Ledger::new(ms.len());
    let logs = work.join("logs");

    for r in 0..args.rounds {
        *at = r;
        let t = Instant::now();
        if !args.keep_logs {
            let _ = std::fs::remove_dir_all(&logs);
        }
        std::fs::create_dir_all(&logs)?;
        let mut p = plan::round(seed, r, &shapes);
        if args.no_qemu_kills {
            p.vms.iter_mut().for_each(|v| v.kill_qemu = None);
        }
        let res = round::run(&mut cl, &mut ms, &p, r, &logs, &mut fig)?;
        let struck: Vec<String> = res
            .kills
            .iter()
            .map(|k| {
                let after = k.after.as_millis();
                match k.vm {
                    Some(vm) => format!("{}({}:{}@{after}ms)", k.process, ms[vm].name, k.phase),
                    None => format!("{}({}@{after}ms)", k.process, k.phase),
                }
            })
            .collect();
        // The round's events come before its check, so a failing round shows them too.
        eprint!(
            "round {}/{}: kills [{}], {} link fault(s), {:.1} s",
            r + 1,
            args.rounds,
            struck.join(" "),
            p.links.len(),
            t.elapsed().as_secs_f64()
        );
        let checking = Instant::now();
        ledger.record(r, &res, &ms, &mut fig)?;
        let depth = ledger::Depth {
            sample_seed: p.sample_seed,
            all: false,
            verify: (r + 1) % args.verify_every.max(1) == 0,
        };
        let unreported = ledger.check(&cl, &ms, r, &res.snaps, depth, &mut fig)?;
        for k in &res.kills {
            // A kill that left a committed point nobody reported struck after the commit: the
            // agent's own, or the receiver's when nothing else struck that VM's sync.
            let after_commit = match (k.process, k.vm) {
                ("agent", Some(vm)) => unreported[vm] > 0,
                ("receiver", None) => (0..ms.len())
                    .any(|vm| unreported[vm] > 0 && res.struck[vm].iter().eq(["receiver"].iter())),
                _ => false,
            };
            fig.kill(
                k.process,
                if after_commit {
                    "after-commit"
                } else {
                    k.phase
                },
            );
        }
        if let Some(pick) = p.lock {
            ledger.lock(&cl, &ms[plan::PRUNE_VM], pick, &mut fig)?;
        }
        eprintln!(
            "; checked in {:.1} s{}",
            checking.elapsed().as_secs_f64(),
            match unreported.iter().sum::<u64>() {
                0 => String::new(),
                n => format!(" ({n} point(s) committed by a killed run, adopted)"),
            }
        );
    }

    // The end: a sync with nothing new, prune and gc to completion, then every point restored.
    *at = args.rounds;
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let res = round::quiet(&mut cl, &mut ms, args.rounds, &logs)?;
    ledger.record(args.rounds, &res, &ms, &mut fig)?;
    let keep = plan::KEEP_LAST.to_string();
    for a in [
        vec![
            "prune",
            "--vm",
            ms[plan::PRUNE_VM].name.as_str(),
            "--keep-last",
            &keep,
            "--json",
        ],
        vec!["gc", "--grace", "0", "--json"],
    ] {
        cl.offline_json(&a)
            .map_err(|e| Violation::new(format!("final {}: {e:#}", a[0])))?;
    }
    eprintln!("final check: restoring every listed point");
    let depth = ledger::Depth {
        sample_seed: 0,
        all: true,
        verify: true,
    };
    ledger.check(&cl, &ms, args.rounds, &res.snaps, depth, &mut fig)?;
    fig.seconds = started.elapsed().as_secs_f64();
    Ok(fig)
}
