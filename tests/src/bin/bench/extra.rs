//! The benchmark's link, steady-state and scale cases.

use super::{
    agent_sync, local_row, median_row, peak_kib, restore_checked, rollback_run, sync_row, Args,
    Row, BLOCK,
};
use anyhow::{bail, Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use rewind_tests::benchkit::spawn_receiver;
use rewind_tests::qemu::{Monitor, Vm};
use rewind_tests::{benchkit, disk, wan};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seed of `image` through a rate-capped link with a delaying proxy: throughput against the cap.
pub fn wan_case(a: &Args, w: &Path, bins: &Path, image: &Path) -> Result<Vec<Row>> {
    if !wan::available() {
        eprintln!("long fat link skipped: it needs root, ip and tc");
        return Ok(Vec::new());
    }
    eprintln!(
        "long fat link: {} Mbit/s, {} ms RTT ...",
        a.wan_mbit, a.wan_rtt_ms
    );
    let ns = wan::Netns::create("rwbench", 77, a.wan_mbit)?;
    let (mut rx, addr) = spawn_receiver(
        ns.command(&bins.join("rewind-receiver")),
        &w.join("data-wan"),
        &w.join("pki"),
        &format!("{}:0", ns.ns_addr),
    )?;
    let upstream = addr.parse().context("receiver address")?;
    let proxy = wan::DelayProxy::start(upstream, Duration::from_secs_f64(a.wan_rtt_ms / 2000.0))?;
    let disk_args = vec!["--disk".to_owned(), format!("vda={}", image.display())];
    let size = std::fs::metadata(image)?.len();
    let run = agent_sync(
        &bins.join("rewind-agent"),
        w,
        &proxy.addr.to_string(),
        rx.id(),
        "wan",
        &disk_args,
    );
    let rx_pid = rx.id();
    let rx_peak = peak_kib(rx_pid) as f64 / 1024.0;
    let _ = rx.kill();
    let _ = rx.wait();
    drop(proxy);
    drop(ns);
    let (m, v, rx_cpu) = run?;
    let sent = v["sent_bytes"].as_f64().unwrap_or(0.0);
    let cap = a.wan_mbit as f64 * 1e6 / 8.0;
    let note = format!(
        "{:.0} MB/s sent = {:.0}% of the {} Mbit/s cap at {} ms RTT",
        sent / m.secs / 1e6,
        100.0 * sent / m.secs / cap,
        a.wan_mbit,
        a.wan_rtt_ms
    );
    let mut row = sync_row("seed WAN", size, &m, &v, rx_cpu, 0, note);
    row.rx_mib = rx_peak;
    Ok(vec![row])
}

/// Points of a continuous agent as they arrive: when, its cycle seconds, its JSON.
type Points = Arc<Mutex<Vec<(Instant, f64, Value)>>>;

/// Rollback of an offline qcow2 image that carries Rewind's persistent dirty bitmap: the same
/// mixed content, a point, 1% of its blocks rewritten by `qemu-io` (which records them in the
/// bitmap), then rollback to the point, which reads only the dirty blocks and the blocks where
/// the base and the target differ. Compared with the time of the raw restore.
pub fn qcow2_rollback_case(
    a: &Args,
    w: &Path,
    bins: &Path,
    addr: &str,
    rx_pid: u32,
    image: &Path,
    restore_secs: f64,
) -> Result<Vec<Row>> {
    let qcow = w.join("rollback.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(image)
        .arg(&qcow)
        .output()?;
    if !out.status.success() {
        bail!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    }
    let spec = vec!["--disk".to_owned(), format!("vda=qcow2:{}", qcow.display())];
    let size = std::fs::metadata(image)?.len();
    let blocks = size / BLOCK;
    let count = ((blocks as f64) * a.change_percent / 100.0).round() as u64;
    let mut runs = Vec::new();
    for run in 0..a.runs.max(1) {
        // Each run starts from a fresh point, whose bitmap then records only this run's writes.
        let (_, v, _) = agent_sync(&bins.join("rewind-agent"), w, addr, rx_pid, "qrb", &spec)?;
        let point = v["point"].to_string();
        let mut rng = rand::rngs::StdRng::seed_from_u64(12 + run as u64);
        let mut picked = std::collections::BTreeSet::new();
        while (picked.len() as u64) < count {
            picked.insert(rng.random_range(0..blocks));
        }
        let mut io = Command::new("qemu-io");
        io.args(["-f", "qcow2"]);
        for (n, b) in picked.iter().enumerate() {
            io.arg("-c")
                .arg(format!("write -P {} {} {BLOCK}", n % 250 + 1, b * BLOCK));
        }
        let out = io.arg(&qcow).output()?;
        if !out.status.success() {
            bail!("qemu-io: {}", String::from_utf8_lossy(&out.stderr));
        }
        let (mut row, v) = rollback_run(
            bins,
            (w, addr, rx_pid),
            ("rollback qcow2", "qrb", &point),
            &format!("vda=qcow2:{}", qcow.display()),
            size,
        )?;
        let d = &v["disks"][0];
        row.note = format!(
            "{} blocks differed ({count} rewritten), {:.1} MB read ({}), verified {}",
            d["blocks_differing"],
            d["bytes_read"].as_f64().unwrap_or(0.0) / 1e6,
            d["compared"].as_str().unwrap_or(""),
            d["verified"],
        );
        runs.push(row);
    }
    let _ = std::fs::remove_file(&qcow);
    let mut row = median_row(runs);
    row.note = format!(
        "{}; {:.3}x of restore time",
        row.note,
        row.secs / restore_secs
    );
    Ok(vec![row])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Continuous replication of a running VM at `--steady-interval` while a writer rewrites
/// `--steady-mbps` through the VM's disk device: the replication lag actually achieved.
///
/// Lag at instant t = t - the capture time of the newest point committed by t, sampled every
/// 100 ms while the writer runs. A point's capture time is taken as its commit time (when its
/// JSON line arrives) minus its cycle duration: a cycle captures first thing, so this is at most
/// the Begin round trip early.
pub fn steady_case(a: &Args, w: &Path, bins: &Path, addr: &str, rx_pid: u32) -> Result<Vec<Row>> {
    let dir = w.join("steady");
    std::fs::create_dir_all(&dir)?;
    let size = 4u64 << 30;
    let vm = Vm::create(&dir, &[size]);
    eprintln!(
        "steady state: {} s at {} s interval, writer {} MB/s ...",
        a.steady_secs, a.steady_interval, a.steady_mbps
    );
    let mut agent = benchkit::agent(bins, w, addr, "sync")
        .args(["--json", "--vm", "steady", "--interval"])
        .arg(a.steady_interval.to_string())
        .arg("--qmp")
        .arg(vm.agent_qmp())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let agent_pid = agent.id();
    let points: Points = Arc::default();
    let reader = {
        let points = points.clone();
        let out = agent.stdout.take().context("agent stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let secs = v["seconds"].as_f64().unwrap_or(0.0);
                    if let Ok(mut p) = points.lock() {
                        p.push((Instant::now(), secs, v));
                    }
                }
            }
        })
    };
    let count = |p: &Points| p.lock().map_or(0, |v| v.len());
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&points) == 0 {
        if Instant::now() > deadline {
            let _ = agent.kill();
            bail!("the steady-state VM's first point did not arrive");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The writer: 1 MiB pieces at random offsets through the device, paced to the rate.
    let mut mon = Monitor::connect(&dir.join("aux.qmp"));
    let piece = 1u64 << 20;
    let every = Duration::from_secs_f64(piece as f64 / (a.steady_mbps * 1e6));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let start = Instant::now();
    let stop = start + Duration::from_secs(a.steady_secs);
    let mut written = 0u64;
    let mut k = 0u32;
    while Instant::now() < stop {
        let due = start + every * k;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let off = rng.random_range(0..size / piece) * piece;
        mon.write("drive0", rng.random_range(1..=255u8), off, piece);
        written += piece;
        k += 1;
    }
    let wrote_for = start.elapsed().as_secs_f64();
    // The point in flight when the writer stopped, and one more.
    std::thread::sleep(Duration::from_secs_f64(
        2.0 * a.steady_interval as f64 + 2.0,
    ));
    let agent_peak = peak_kib(agent_pid) as f64 / 1024.0;
    let agent_cpu = benchkit::cpu_secs(agent_pid);
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = reader.join();
    drop(vm);

    let pts = points.lock().map(|p| p.clone()).unwrap_or_default();
    let captured: Vec<(Instant, Instant)> = pts
        .iter()
        .map(|(at, secs, _)| {
            (
                *at,
                at.checked_sub(Duration::from_secs_f64(*secs))
                    .unwrap_or(*at),
            )
        })
        .collect();
    let mut lags = Vec::new();
    let mut t = start;
    while t <= start + Duration::from_secs_f64(wrote_for) {
        if let Some((_, cap)) = captured.iter().rev().find(|(at, _)| *at <= t) {
            lags.push(t.duration_since(*cap).as_secs_f64());
        }
        t += Duration::from_millis(100);
    }
    lags.sort_by(f64::total_cmp);
    let mut cycles: Vec<f64> = pts.iter().skip(1).map(|(_, s, _)| *s).collect();
    cycles.sort_by(f64::total_cmp);
    let sent: f64 = pts
        .iter()
        .skip(1)
        .map(|(_, _, v)| v["sent_bytes"].as_f64().unwrap_or(0.0))
        .sum();
    let note = format!(
        "lag p50 {:.1} s, p99 {:.1} s, max {:.1} s (target p99 <= {} s); {} points, cycle p50 {:.2} s; writer {:.1} MB/s",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(f64::NAN),
        2 * a.steady_interval,
        pts.len().saturating_sub(1),
        percentile(&cycles, 0.5),
        written as f64 / wrote_for / 1e6,
    );
    Ok(vec![Row {
        phase: "steady",
        secs: wrote_for,
        mbps: written as f64 / wrote_for / 1e6,
        agent_cpu,
        agent_mib: agent_peak,
        rx_cpu: 0.0,
        rx_mib: peak_kib(rx_pid) as f64 / 1024.0,
        moved_mb: sent / 1e6,
        note,
    }])
}

/// A sparse disk of `--scale-gib` with `--scale-written-gib` of mixed data in 1 MiB regions
/// spread over it: seed, one incremental (1% of the written blocks rewritten), restore; each
/// side's peak memory, with a receiver of its own so its peak is this case's.
pub fn scale_case(a: &Args, w: &Path, bins: &Path) -> Result<Vec<Row>> {
    let size = a.scale_gib << 30;
    let dir = w.join("scale");
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("disk.raw");
    eprintln!(
        "scale: {} GiB sparse disk with {} GiB written ...",
        a.scale_gib, a.scale_written_gib
    );
    disk::create(&image, size);
    let region = 1u64 << 20;
    let regions = (a.scale_written_gib << 30) / region;
    let stride = size / regions / region * region;
    let f = std::fs::OpenOptions::new().write(true).open(&image)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut buf = vec![0u8; region as usize];
    for r in 0..regions {
        match r % 4 {
            0 => rng.fill_bytes(&mut buf),
            1 => buf
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i / 64) as u8 | 1),
            2 => {
                let text = b"GET /index.html 200 OK user session\n";
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = text[i % text.len()]);
            }
            _ => buf
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 251) as u8 ^ r as u8),
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, r * stride)?;
    }
    f.sync_all()?;

    let (mut rx, addr) = spawn_receiver(
        Command::new(bins.join("rewind-receiver")),
        &dir.join("data"),
        &w.join("pki"),
        "127.0.0.1:0",
    )?;
    let rx_pid = rx.id();
    let disk_args = vec!["--disk".to_owned(), format!("vda={}", image.display())];
    let ag_bin = bins.join("rewind-agent");
    let mut rows = Vec::new();
    let result = (|| -> Result<()> {
        let (m, v, c) = agent_sync(&ag_bin, w, &addr, rx_pid, "scale", &disk_args)?;
        let note = format!(
            "{} blocks, {:.0} MB read",
            v["disks"][0]["changed_blocks"],
            v["disks"][0]["read_bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
        rows.push(sync_row("scale seed", size, &m, &v, c, rx_pid, note));
        // 1% of the written blocks, rewritten in place.
        let written_blocks: Vec<u64> = (0..regions)
            .flat_map(|r| {
                let first = r * stride / BLOCK;
                first..first + region / BLOCK
            })
            .collect();
        let n = written_blocks.len() / 100;
        let mut block = vec![0u8; BLOCK as usize];
        for _ in 0..n {
            let b = written_blocks[rng.random_range(0..written_blocks.len())];
            rng.fill_bytes(&mut block);
            std::os::unix::fs::FileExt::write_all_at(&f, &block, b * BLOCK)?;
        }
        f.sync_all()?;
        let (m, v, c) = agent_sync(&ag_bin, w, &addr, rx_pid, "scale", &disk_args)?;
        let note = format!(
            "{} blocks changed, {:.0} MB read",
            v["disks"][0]["changed_blocks"],
            v["disks"][0]["read_bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
        let point = v["point"].to_string();
        rows.push(sync_row("scale incr", size, &m, &v, c, rx_pid, note));
        let _ = rx.kill();
        let _ = rx.wait();
        let out = dir.join("restored.raw");
        let m = restore_checked(
            &bins.join("rewind-receiver"),
            ("scale", &point),
            &dir.join("data"),
            &out,
            &disk::digest(&image),
        )?;
        rows.push(local_row(
            "scale restore",
            size,
            &m,
            &out,
            "verified bit-exact",
        ));
        Ok(())
    })();
    let _ = rx.kill();
    let _ = rx.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(rows)
}
