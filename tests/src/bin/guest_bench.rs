//! `rewind-guest-bench`: what continuous replication costs a real guest, and what it achieves.
//!
//! Boots the test suite's Debian guest (cached image; `REWIND_TEST_ACCEL=kvm|tcg`), seeds it to a
//! receiver on loopback over mutual TLS, then runs the same rate-limited `fio` write workload
//! inside the guest twice: without replication, and while `rewind-agent sync --interval N
//! --guest-agent` takes an application-consistent point every N seconds. Prints the guest's
//! write latency (p50/p99) both ways and their ratio, the freeze time per point (p50/p99/max),
//! the RPO achieved (p50/p99), and bytes sent per byte the guest wrote; with `--drill`, the
//! boot drill's RTO to "application healthy" (guest-agent checks in the restored VM).
//!
//! Run it on release binaries: `cargo build --release --workspace && target/release/rewind-guest-bench`.

use anyhow::{ensure, Context, Result};
use clap::Parser;
use rewind_tests::benchkit::{self, spawn_receiver};
use rewind_tests::guest::{self, Accel, Guest};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Guest write latency with and without replication, freeze time, RPO achieved.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds each fio phase runs.
    #[arg(long, default_value_t = 120)]
    secs: u64,
    /// Seconds between points while replicating.
    #[arg(long, default_value_t = 5)]
    interval: u64,
    /// Writes per second the workload issues (4 KiB, O_DIRECT, each followed by fsync).
    #[arg(long, default_value_t = 50)]
    rate_iops: u64,
    /// Also run a boot drill of the newest point with application checks.
    #[arg(long)]
    drill: bool,
    /// Folder for the work files.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Print the figures as JSON too.
    #[arg(long)]
    json: bool,
    /// Nice value for the agent and the receiver (0-19): what a host gives its backup agent so
    /// that guests win the CPU (the receiver stands in for an offsite one here).
    #[arg(long, default_value_t = 0)]
    nice: i32,
}

/// Lowers a child's CPU priority to `nice` (0: unchanged).
fn renice(pid: u32, nice: i32) -> anyhow::Result<()> {
    if nice != 0 {
        let pid = rustix::process::Pid::from_raw(pid as i32).context("a child's pid")?;
        rustix::process::setpriority_process(Some(pid), nice)?;
    }
    Ok(())
}

/// The workload: 4 KiB random writes, O_DIRECT, each followed by an fsync, at a fixed rate, as
/// a database's commits are; the file is laid out first so the run writes in place.
fn fio_command(secs: u64, rate_iops: u64) -> String {
    format!(
        "fio --name=commits --filename=/var/tmp/fio.dat --size=256M --rw=randwrite --bs=4k \
         --ioengine=psync --direct=1 --fsync=1 --rate_iops={rate_iops} --time_based \
         --runtime={secs} --output-format=json --output=/root/fio.json"
    )
}

/// Latency figures of one fio run, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    sync_p99: f64,
    written: u64,
}

fn percentile_ms(v: &Value, p: &str) -> f64 {
    v["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1e6
}

fn parse_fio(text: &str) -> Result<Latency> {
    let v: Value = serde_json::from_str(text).context("fio's JSON")?;
    let job = &v["jobs"][0];
    let write = &job["write"];
    Ok(Latency {
        p50: percentile_ms(&write["clat_ns"], "50.000000"),
        p99: percentile_ms(&write["clat_ns"], "99.000000"),
        sync_p99: percentile_ms(&job["sync"]["lat_ns"], "99.000000"),
        written: write["io_bytes"].as_u64().unwrap_or(0),
    })
}

/// Runs the workload in the guest, detached from the guest agent (which then serves the
/// replication's freezes), and returns its figures once it ended.
fn run_fio(g: &mut Guest, a: &Args) -> Result<Latency> {
    let start = g.exec(&[
        "sh",
        "-c",
        &format!(
            "rm -f /root/fio.json /root/fio.done; setsid sh -c '{} >/root/fio.log 2>&1; \
             touch /root/fio.done' </dev/null >/dev/null 2>&1 & echo started",
            fio_command(a.secs, a.rate_iops)
        ),
    ])?;
    ensure!(start.success(), "starting fio: {start:?}");
    g.release_agent();
    std::thread::sleep(Duration::from_secs(a.secs));
    let deadline = Instant::now() + Duration::from_secs(a.secs + 300);
    loop {
        let r = g.exec(&[
            "sh",
            "-c",
            "if [ -e /root/fio.done ]; then cat /root/fio.json; else echo running; fi",
        ])?;
        if !r.stdout.starts_with("running") {
            let log = g.exec(&["cat", "/root/fio.log"])?;
            return parse_fio(&r.stdout).with_context(|| format!("fio said: {}", log.stdout));
        }
        ensure!(
            Instant::now() < deadline,
            "fio still runs long after its run time"
        );
        g.release_agent();
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn main() -> Result<()> {
    let a = Args::parse();
    let bins = rewind_tests::benchkit::bin_dir()?;
    let work = tempfile::Builder::new()
        .prefix("rewind-guest-bench.")
        .tempdir_in(&a.dir)?;
    let w = work.path();
    let rx_bin = bins.join("rewind-receiver");
    rewind_tests::benchkit::pki(&bins, &w.join("pki"))?;
    let (rx, addr) = spawn_receiver(
        Command::new(&rx_bin),
        &w.join("data"),
        &w.join("pki"),
        "127.0.0.1:0",
    )?;
    renice(rx.id(), a.nice)?;
    // Stopped on every exit, errors included.
    let _rx = rewind_tests::KillOnDrop(rx);

    let image = guest::image()?;
    std::fs::create_dir_all(w.join("guest"))?;
    let accel = Accel::from_env();
    let mut g = Guest::boot(&w.join("guest"), &image, accel)?;
    let booted = g.wait_ready(Duration::from_secs(600))?;
    eprintln!(
        "guest up under {} in {:.0} s",
        accel.name(),
        booted.as_secs_f64()
    );
    let prep = g.exec(&["sh", "-c", "fio --name=prep --filename=/var/tmp/fio.dat --size=256M --rw=write --bs=1M --direct=1 >/dev/null && sync"])?;
    ensure!(prep.success(), "laying out the fio file: {prep:?}");
    g.release_agent();

    let qga = w.join("guest/qga.sock").display().to_string();
    let qmp = g.agent_qmp();
    let live = |extra: &[&str]| {
        let mut c = benchkit::agent(&bins, w, &addr, "sync");
        c.args(["--vm", "guest", "--json", "--qmp"])
            .arg(&qmp)
            .args(["--guest-agent", &qga])
            .args(extra);
        c
    };
    eprintln!("seeding ...");
    let seed = live(&["--once"]).output()?;
    ensure!(
        seed.status.success(),
        "seed: {}",
        String::from_utf8_lossy(&seed.stderr)
    );

    eprintln!("fio without replication ({} s) ...", a.secs);
    let without = run_fio(&mut g, &a)?;

    eprintln!("fio with a point every {} s ({} s) ...", a.interval, a.secs);
    let mut agent = live(&["--interval", &a.interval.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    renice(agent.id(), a.nice)?;
    // Each report with when it arrived (its commit, give or take the pipe).
    let reports: Arc<Mutex<Vec<(Instant, Value)>>> = Arc::default();
    let reader = {
        let out = agent.stdout.take().context("agent stdout")?;
        let reports = reports.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if let Ok(mut r) = reports.lock() {
                        r.push((Instant::now(), v));
                    }
                }
            }
        })
    };
    let with = run_fio(&mut g, &a);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    let _ = agent.wait();
    let _ = reader.join();
    let with = with?;
    let timed = reports.lock().map(|r| r.clone()).unwrap_or_default();
    ensure!(!timed.is_empty(), "no point was taken while fio ran");
    // Achieved RPO of each point after the first: from the previous point's capture (its
    // commit less its cycle time) to this point's commit.
    let capture = |(at, r): &(Instant, Value)| {
        at.checked_sub(Duration::from_secs_f64(
            r["seconds"].as_f64().unwrap_or(0.0),
        ))
    };
    let achieved: Vec<f64> = timed
        .windows(2)
        .filter_map(|w| capture(&w[0]).map(|c| w[1].0.duration_since(c).as_secs_f64()))
        .collect();
    let reports: Vec<Value> = timed.into_iter().map(|(_, v)| v).collect();

    let freezes: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["freeze_ms"].as_f64())
        .collect();
    let held: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["frozen_ms"].as_f64())
        .collect();
    let app_consistent = reports
        .iter()
        .filter(|r| r["consistency"] == "application-consistent")
        .count();
    let sent: u64 = reports
        .iter()
        .filter_map(|r| r["sent_bytes"].as_u64())
        .sum();

    let mut drill = Value::Null;
    if a.drill {
        eprintln!("boot drill of the newest point with application checks ...");
        let _ = g.shutdown(Duration::from_secs(120));
        let o = Command::new(&rx_bin)
            .args([
                "drill",
                "--vm",
                "guest",
                "--boot",
                "--json",
                "--boot-timeout",
                "600",
            ])
            .args(["--accel", accel.name()])
            .args(["--expect-serial", guest::READY_MARKER])
            .args(["--check", "systemctl is-system-running --wait"])
            .args(["--check", "test -s /var/tmp/fio.dat"])
            .arg("--data")
            .arg(w.join("data"))
            .output()?;
        drill = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    }

    let ratio = with.p99 / without.p99;
    let figures = json!({
        "accel": accel.name(),
        "seconds": a.secs,
        "interval": a.interval,
        "rate_iops": a.rate_iops,
        "without": {"write_p50_ms": without.p50, "write_p99_ms": without.p99, "fsync_p99_ms": without.sync_p99},
        "with": {"write_p50_ms": with.p50, "write_p99_ms": with.p99, "fsync_p99_ms": with.sync_p99},
        "write_p99_ratio": ratio,
        "points": reports.len(),
        "application_consistent": app_consistent,
        "freeze_ms": {"p50": quantile(&freezes, 0.5), "p99": quantile(&freezes, 0.99), "max": quantile(&freezes, 1.0)},
        "frozen_ms": {"p50": quantile(&held, 0.5), "p99": quantile(&held, 0.99), "max": quantile(&held, 1.0)},
        "achieved_rpo_s": {"p50": quantile(&achieved, 0.5), "p99": quantile(&achieved, 0.99), "max": quantile(&achieved, 1.0)},
        "guest_bytes_written": with.written,
        "bytes_sent": sent,
        "sent_per_written": sent as f64 / with.written.max(1) as f64,
        "drill": drill,
    });
    println!("guest cost of continuous replication ({} guest, {} s per phase, {} writes/s of 4 KiB + fsync, a point every {} s)", accel.name(), a.secs, a.rate_iops, a.interval);
    println!(
        "  write latency without replication  p50 {:7.2} ms  p99 {:7.2} ms  (fsync p99 {:.2} ms)",
        without.p50, without.p99, without.sync_p99
    );
    println!(
        "  write latency with replication     p50 {:7.2} ms  p99 {:7.2} ms  (fsync p99 {:.2} ms)",
        with.p50, with.p99, with.sync_p99
    );
    println!("  p99 ratio                          {ratio:.2}x (target at most 1.2x)");
    println!(
        "  points                             {} ({} application-consistent)",
        reports.len(),
        app_consistent
    );
    println!(
        "  freeze per point, hooks included   p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
        quantile(&freezes, 0.5),
        quantile(&freezes, 0.99),
        quantile(&freezes, 1.0)
    );
    println!(
        "  file systems frozen per point      p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms (target p99 under 100 ms)",
        quantile(&held, 0.5),
        quantile(&held, 0.99),
        quantile(&held, 1.0)
    );
    println!(
        "  RPO achieved                       p50 {:.1} s  p99 {:.1} s  max {:.1} s",
        quantile(&achieved, 0.5),
        quantile(&achieved, 0.99),
        quantile(&achieved, 1.0)
    );
    println!(
        "  bytes sent per byte written        {:.2} ({} sent, {} written)",
        sent as f64 / with.written.max(1) as f64,
        sent,
        with.written
    );
    if a.drill {
        println!(
            "  boot drill                         {} in {} s to application healthy (boot {} s)",
            drill["result"], drill["rto_seconds"], drill["boot_seconds"]
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    }
    Ok(())
}
