//! Pieces the benchmark commands share: CPU time of a running process and the agent's sync
//! command line against a benchmark deployment.

use anyhow::Context;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// The folder holding the running binary, with the agent and receiver built next to it.
pub fn bin_dir() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("binary folder")?.to_owned();
    for b in ["rewind-agent", "rewind-receiver"] {
        if !dir.join(b).exists() {
            anyhow::bail!(
                "{} is missing: cargo build --workspace --bins first (with --release for a \
                 release run)",
                dir.join(b).display()
            );
        }
    }
    Ok(dir)
}

/// Runs a command to its end; fails unless it succeeded. Returns its wall time and output.
pub fn timed(cmd: &mut Command) -> anyhow::Result<(f64, std::process::Output)> {
    let t = std::time::Instant::now();
    let out = cmd.output().context("running a command")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        anyhow::bail!(
            "{:?} failed: {}",
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((secs, out))
}

/// Runs a command to its end; fails unless it succeeded. Returns its wall time and the CPU
/// time (user and system, every thread) it used, read from its exit status's process entry
/// before it is reaped. Its output is discarded (its errors shown on failure).
pub fn timed_cpu(cmd: &mut Command) -> anyhow::Result<(f64, f64)> {
    let mut err = tempfile::tempfile().context("a file for the command's errors")?;
    let t = std::time::Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.try_clone()?)
        .spawn()
        .context("running a command")?;
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::waitid(
        rustix::process::WaitId::Pid(pid),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
    )
    .context("waiting for the command")?;
    let secs = t.elapsed().as_secs_f64();
    let cpu =
        crate::procfs::cpu_ticks(child.id()) as f64 / crate::procfs::ticks_per_second() as f64;
    let status = child.wait()?;
    if !status.success() {
        use std::io::{Read, Seek};
        let mut text = String::new();
        err.seek(std::io::SeekFrom::Start(0))?;
        err.read_to_string(&mut text)?;
        anyhow::bail!("{:?} failed: {text}", cmd.get_args().collect::<Vec<_>>());
    }
    Ok((secs, cpu))
}

/// A throw-away PKI in `dir`: a CA, the receiver's certificate and agent `bench`'s.
pub fn pki(bins: &Path, dir: &Path) -> anyhow::Result<()> {
    for args in [
        vec!["pki", "init", "--dir"],
        vec!["pki", "issue", "--agent", "bench", "--dir"],
    ] {
        timed(
            Command::new(bins.join("rewind-receiver"))
                .args(args)
                .arg(dir),
        )?;
    }
    Ok(())
}

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + system, waited-for children included) a process has used so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12) + t(13) + t(14)) / TICKS
}

/// `rewind-agent sync --once --json` of `vm` as agent `bench` of the PKI under `work`, with its
/// state in `work/state`, and `extra` flags (the disks or `--qmp`).
pub fn agent_sync(bins: &Path, work: &Path, addr: &str, vm: &str, extra: &[String]) -> Command {
    let mut c = agent(bins, work, addr, "sync");
    c.args(["--once", "--json", "--vm", vm]).args(extra);
    c
}

/// `rewind-agent SUBCOMMAND` as agent `bench` with the receiver, credentials and state set.
pub fn agent(bins: &Path, work: &Path, addr: &str, subcommand: &str) -> Command {
    let mut c = Command::new(bins.join("rewind-agent"));
    c.args([subcommand, "--receiver"])
        .arg(format!("https://{addr}"))
        .arg("--ca")
        .arg(work.join("pki/ca.pem"))
        .arg("--cert")
        .arg(work.join("pki/bench.pem"))
        .arg("--key")
        .arg(work.join("pki/bench.key"))
        .arg("--state")
        .arg(work.join("state"))
        .env("REWIND_LOG", "warn");
    c
}

/// Starts `rewind-receiver serve` through `cmd` (the binary, or a wrapper that runs it) and
/// returns it with the address it printed.
pub fn spawn_receiver(
    mut cmd: Command,
    data: &Path,
    pki: &Path,
    listen: &str,
) -> anyhow::Result<(std::process::Child, String)> {
    let mut rx = cmd
        .args(["serve", "--listen", listen, "--data"])
        .arg(data)
        .arg("--pki")
        .arg(pki)
        .env("REWIND_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(rx.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .context("receiver address")?
        .to_owned();
    Ok((rx, addr))
}

/// `cp --sparse=always SRC DST`, followed by a sync of the copy when `durable`.
pub fn sparse_copy(src: &Path, dst: &Path, durable: bool) -> Command {
    let script = if durable {
        "cp --sparse=always \"$0\" \"$1\" && sync \"$1\""
    } else {
        "exec cp --sparse=always \"$0\" \"$1\""
    };
    let mut c = Command::new("sh");
    c.args(["-c", script]).arg(src).arg(dst);
    c
}
