//! `rewind-figures`: gathers the evidence that Rewind survives faults and prints it as one table
//! (or JSON): kills survived by process and phase, link faults and the re-sent share, disk-full
//! cases, clock steps, fault points, fuzz executions per target, points lost and points checked
//! bit-exact. It runs the real things: `rewind-chaos`, and the fault, link, disk-full, clock and
//! fuzz test suites through cargo (from the workspace this binary was built in).
//!
//! ```text
//! cargo build --workspace --bins && target/debug/rewind-figures            # about 15 min
//! target/debug/rewind-figures --quick                                     # about 4 min
//! target/debug/rewind-figures --rounds 300 --live --fuzz-cases 200000     # a long run
//! ```

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Parser)]
#[command(
    about = "Run the fault evidence (chaos, fault points, link faults, full disks, clock \
                   steps, fuzzing) and print one table of figures"
)]
struct Args {
    /// The chaos schedule's seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Chaos rounds (default 40; 8 with --quick).
    #[arg(long)]
    rounds: Option<u64>,
    /// Raw VMs in the chaos run.
    #[arg(long, default_value_t = 3)]
    vms: u64,
    /// Add a live QEMU VM to the chaos run.
    #[arg(long)]
    live: bool,
    /// Mutations per fuzz target (default 50,000; 5,000 with --quick).
    #[arg(long)]
    fuzz_cases: Option<u64>,
    /// A short run: fewer rounds and mutations.
    #[arg(long)]
    quick: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

/// The workspace this binary was built from.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A sibling binary of this one (target/PROFILE/NAME).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .context("this binary has no folder")?;
    if !path.exists() {
        bail!(
            "{} is missing: cargo build --workspace --bins",
            path.display()
        );
    }
    Ok(path)
}

/// One test suite's outcome: its tests by name, and the lines its tests printed.
struct Suite {
    passed: Vec<String>,
    failed: Vec<String>,
    lines: Vec<String>,
    seconds: f64,
}

/// Runs `cargo test -p PACKAGE --test TARGET -- --nocapture` and collects what it printed.
fn suite(package: &str, target: &str, env: &[(&str, String)]) -> Result<Suite> {
    eprintln!("running {package} --test {target} ...");
    let started = Instant::now();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace())
        .args(["test", "-p", package, "--test", target, "--"])
        .args(["--nocapture", "--test-threads", "2"])
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running cargo test --test {target}"))?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut s = Suite {
        passed: Vec::new(),
        failed: Vec::new(),
        lines: Vec::new(),
        seconds: started.elapsed().as_secs_f64(),
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some(name) = rest.strip_suffix(" ... ok") {
                s.passed.push(name.to_owned());
                continue;
            }
            if let Some(name) = rest.strip_suffix(" ... FAILED") {
                s.failed.push(name.to_owned());
                continue;
            }
        }
        s.lines.push(line.to_owned());
    }
    if s.passed.is_empty() && s.failed.is_empty() {
        bail!("cargo test --test {target} ran no test:\n{}", tail(&text));
    }
    Ok(s)
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Fuzz lines: `TARGET: N ... 0 panics`.
fn fuzz_lines(s: &Suite) -> Vec<(String, u64, String)> {
    s.lines
        .iter()
        .filter(|l| l.contains(" panics"))
        .filter_map(|l| {
            let (target, rest) = l.split_once(": ")?;
            let n: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((target.trim().to_owned(), n, rest.to_owned()))
        })
        .collect()
}

fn main() -> Result<()> {
    let a = Args::parse();
    let rounds = a.rounds.unwrap_or(if a.quick { 8 } else { 40 });
    let cases = a.fuzz_cases.unwrap_or(if a.quick { 5_000 } else { 50_000 });
    let started = Instant::now();

    // 1. Chaos.
    eprintln!(
        "running rewind-chaos --seed {} --rounds {rounds} ...",
        a.seed
    );
    let mut chaos = Command::new(sibling("rewind-chaos")?);
    chaos
        .args([
            "--seed",
            &a.seed.to_string(),
            "--rounds",
            &rounds.to_string(),
        ])
        .args(["--vms", &a.vms.to_string(), "--json"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if a.live {
        chaos.arg("--live");
    }
    let out = chaos.output().context("running rewind-chaos")?;
    let chaos: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "rewind-chaos printed no JSON (exit {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let chaos_ok = out.status.success();

    // 2. Test suites with figures.
    let faults = suite("rewind-tests", "faults", &[])?;
    let links = suite("rewind-tests", "link_faults", &[])?;
    let full_rx = suite("rewind-tests", "disk_full", &[])?;
    let full_fleece = suite("rewind-tests", "fleecing", &[])?;
    let clock = suite("rewind-tests", "clock", &[])?;
    let fuzz_env = [("REWIND_FUZZ_CASES", cases.to_string())];
    let fuzz_agent = suite("rewind-agent", "fuzz", &fuzz_env)?;
    let fuzz_receiver = suite("rewind-receiver", "fuzz", &fuzz_env)?;

    let suites = [
        ("fault points", &faults),
        ("link faults", &links),
        ("full disks", &full_rx),
        ("full fleecing folder", &full_fleece),
        ("clock steps", &clock),
        ("fuzz (agent)", &fuzz_agent),
        ("fuzz (receiver)", &fuzz_receiver),
    ];
    let failed: Vec<String> = suites
        .iter()
        .flat_map(|(_, s)| s.failed.iter().cloned())
        .collect();
    let fuzz: Vec<(String, u64, String)> = fuzz_lines(&fuzz_agent)
        .into_iter()
        .chain(fuzz_lines(&fuzz_receiver))
        .collect();
    let link_lines: Vec<&String> = links
        .lines
        .iter()
        .filter(|l| l.starts_with("link-faults:"))
        .collect();
    let points_lost = chaos["points"]["lost"].as_u64().unwrap_or(u64::MAX);
    let ok = chaos_ok && failed.is_empty() && points_lost == 0;

    if a.json {
        let suites: serde_json::Map<String, Value> = suites
            .iter()
            .map(|(name, s)| {
                (
                    name.to_string(),
                    json!({"passed": s.passed, "failed": s.failed, "seconds": s.seconds}),
                )
            })
            .collect();
        println!(
            "{}",
            json!({
                "ok": ok,
                "chaos": chaos,
                "suites": suites,
                "link_faults": link_lines,
                "fuzz": fuzz.iter().map(|(t, n, line)| json!({"target": t, "cases": n, "detail": line})).collect::<Vec<_>>(),
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        print!("{}", table(&chaos, &suites, &link_lines, &fuzz));
        println!(
            "\n{} in {:.0} s{}",
            if ok { "all survived" } else { "FAILURES" },
            started.elapsed().as_secs_f64(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(": {}", failed.join(", "))
            }
        );
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

fn table(
    chaos: &Value,
    suites: &[(&str, &Suite)],
    link_lines: &[&String],
    fuzz: &[(String, u64, String)],
) -> String {
    let mut s = String::new();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    s += &format!(
        "chaos (seed {}, {} rounds, {} raw VM(s){}, {:.0} s)\n",
        chaos["seed"],
        chaos["rounds"],
        chaos["raw_vms"],
        if chaos["live"] == true {
            " + 1 live VM"
        } else {
            ""
        },
        chaos["seconds"].as_f64().unwrap_or(0.0)
    );
    s += "  kills survived      total  by phase\n";
    if let Some(kills) = chaos["kills"].as_object() {
        for (process, k) in kills {
            let phases: Vec<String> = k["phases"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(p, c)| format!("{p} {c}"))
                .collect();
            s += &format!(
                "    {process:<16} {:>6}  {}\n",
                n(&k["total"]),
                phases.join(", ")
            );
        }
    }
    if let Some(link) = chaos["link_faults"].as_object() {
        for (kind, l) in link {
            s += &format!(
                "  link {kind:<14} {:>6}  ({} mid-sync, {} idle)\n",
                n(&l["hit"]) + n(&l["idle"]),
                n(&l["hit"]),
                n(&l["idle"])
            );
        }
    }
    let b = &chaos["bytes"];
    s += &format!(
        "  re-sent share       {:>5.1}%  of stored bytes ({:.1}% of the faulted cycles' bytes)\n",
        b["resent_share"].as_f64().unwrap_or(0.0) * 100.0,
        b["resent_share_of_faulted_cycles"].as_f64().unwrap_or(0.0) * 100.0
    );
    let p = &chaos["points"];
    s += &format!(
        "  points             committed {}, pruned {}, locked {}, checked bit-exact {} ({} restores), LOST {}\n",
        n(&p["committed"]),
        n(&p["pruned"]),
        n(&p["locked"]),
        n(&p["checked"]),
        n(&p["restores_bit_exact"]),
        n(&p["lost"])
    );
    s += &format!("  verify clean        {:>6}\n", n(&chaos["verify_clean"]));
    s += "\nsuites                 passed failed  seconds\n";
    for (name, suite) in suites {
        s += &format!(
            "  {name:<21} {:>6} {:>6} {:>8.0}\n",
            suite.passed.len(),
            suite.failed.len(),
            suite.seconds
        );
    }
    if !link_lines.is_empty() {
        s += "\nlink faults\n";
        for l in link_lines {
            s += &format!("  {}\n", l.trim_start_matches("link-faults:").trim());
        }
    }
    s += "\nfuzz target              executions  crashes\n";
    for (target, cases, _) in fuzz {
        s += &format!("  {target:<24} {cases:>10}  0\n");
    }
    s
}
