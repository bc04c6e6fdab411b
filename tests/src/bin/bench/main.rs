//! `rewind-bench`: seeds a realistic mixed disk image to a receiver on loopback over mutual TLS,
//! rewrites 1% of its blocks at random and runs an incremental point, then restores it; prints
//! wall time, MB/s, CPU seconds and peak memory of each side for every phase.
//!
//! Run it on release binaries: `cargo build --release && cargo run --release -p rewind-tests
//! --bin rewind-bench -- --size-gib 4`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::SeedableRng;
use rewind_tests::benchkit::{self, cpu_secs, spawn_receiver};
use rewind_tests::disk;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seed, incremental and restore figures for Rewind on this machine.
#[derive(Debug, Parser)]
struct Args {
    /// Size of the generated disk image, in GiB.
    #[arg(long, default_value_t = 4.0)]
    size_gib: f64,
    /// Share of blocks rewritten before the incremental point, in percent.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Folder for the image, the store and the restore (needs ~3x the image size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Size of the live-VM case's qcow2 disk in GiB (0 skips it).
    #[arg(long, default_value_t = 8.0)]
    live_gib: f64,
    /// Long fat link case: link rate in Mbit/s (0 skips it; needs root, ip and tc).
    #[arg(long, default_value_t = 1000)]
    wan_mbit: u64,
    /// Long fat link case: round-trip time added by the delaying proxy, in ms.
    #[arg(long, default_value_t = 50.0)]
    wan_rtt_ms: f64,
    /// Steady-state case: seconds the writer runs (0 skips it).
    #[arg(long, default_value_t = 120)]
    steady_secs: u64,
    /// Steady-state case: seconds between points.
    #[arg(long, default_value_t = 5)]
    steady_interval: u64,
    /// Steady-state case: MB/s the writer rewrites inside the VM.
    #[arg(long, default_value_t = 20.0)]
    steady_mbps: f64,
    /// Scale case: size of the sparse disk in GiB (0 skips it).
    #[arg(long, default_value_t = 1024)]
    scale_gib: u64,
    /// Scale case: GiB written into the sparse disk.
    #[arg(long, default_value_t = 2)]
    scale_written_gib: u64,
    /// Runs of the restore and of each rollback case; the row shows the median run.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Keep the work folder (image, store, PKI) for inspection.
    #[arg(long)]
    keep: bool,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
}

mod extra;

const BLOCK: u64 = 64 * 1024;

fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Measured {
    stdout: String,
    ok: bool,
    secs: f64,
    cpu: f64,
    peak_mib: f64,
}

/// Runs a command to completion, sampling its peak memory and reading its CPU time from the
/// zombie before reaping it.
fn measure(cmd: &mut Command) -> Result<Measured> {
    // Dirty pages left by an earlier phase would throttle this one's writes.
    rustix::fs::sync();
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut out = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while done.load(Ordering::Relaxed) == 0 {
                peak.fetch_max(peak_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let rpid = rustix::process::Pid::from_child(&child);
    rustix::process::waitid(
        rustix::process::WaitId::Pid(rpid),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid);
    done.store(1, Ordering::Relaxed);
    let _ = sampler.join();
    let status = child.wait()?;
    let stdout = reader.join().unwrap_or_default();
    Ok(Measured {
        stdout,
        ok: status.success(),
        secs,
        cpu,
        peak_mib: peak.load(Ordering::Relaxed) as f64 / 1024.0,
    })
}

struct Row {
    phase: &'static str,
    secs: f64,
    mbps: f64,
    agent_cpu: f64,
    agent_mib: f64,
    rx_cpu: f64,
    rx_mib: f64,
    moved_mb: f64,
    note: String,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let bins = rewind_tests::benchkit::bin_dir()?;
    let size = ((a.size_gib * (1u64 << 30) as f64) as u64) / BLOCK * BLOCK;
    let work = tempfile::Builder::new()
        .prefix("rewind-bench.")
        .tempdir_in(&a.dir)?;
    let w = work.path();
    let rx_bin = bins.join("rewind-receiver");
    let ag_bin = bins.join("rewind-agent");
    let ok = |o: std::process::Output| -> Result<()> {
        if !o.status.success() {
            bail!("{}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    };
    ok(Command::new(&rx_bin)
        .args(["pki", "init", "--dir"])
        .arg(w.join("pki"))
        .output()?)?;
    ok(Command::new(&rx_bin)
        .args(["pki", "issue", "--agent", "bench", "--dir"])
        .arg(w.join("pki"))
        .output()?)?;

    let image = w.join("disk.raw");
    eprintln!(
        "generating a {:.1} GiB mixed image in {} ...",
        a.size_gib,
        w.display()
    );
    let t = Instant::now();
    disk::mixed(&image, size, 42);
    eprintln!(
        "  {:.1}s, {} MiB allocated",
        t.elapsed().as_secs_f64(),
        disk::allocated(&image) >> 20
    );

    let (mut rx, addr) = spawn_receiver(
        Command::new(&rx_bin),
        &w.join("data"),
        &w.join("pki"),
        "127.0.0.1:0",
    )?;
    let rx_pid = rx.id();

    let disk_args = vec!["--disk".to_owned(), format!("vda={}", image.display())];
    let sync = |_label: &str| agent_sync(&ag_bin, w, &addr, rx_pid, "bench", &disk_args);
    let mb = |b: f64| b / 1e6;
    let mut rows = Vec::new();

    let (m, v, rx_cpu) = sync("seed")?;
    let note = format!(
        "{} blocks, {:.0} MB read",
        v["disks"][0]["changed_blocks"],
        mb(v["disks"][0]["read_bytes"].as_f64().unwrap_or(0.0))
    );
    rows.push(sync_row("seed", size, &m, &v, rx_cpu, rx_pid, note));

    let blocks = size / BLOCK;
    let count = ((blocks as f64) * a.change_percent / 100.0).round() as usize;
    disk::scatter_writes(&image, BLOCK, blocks, count, 7);
    let (m, v, rx_cpu) = sync("incremental")?;
    let note = format!(
        "{} blocks changed ({count} rewritten)",
        v["disks"][0]["changed_blocks"]
    );
    rows.push(sync_row("incremental", size, &m, &v, rx_cpu, rx_pid, note));
    let point = v["point"].to_string();

    let out = w.join("restored.raw");
    let image_digest = disk::digest(&image);
    let mut restores = Vec::new();
    for _ in 0..a.runs.max(1) {
        let m = restore_checked(
            &rx_bin,
            ("bench", &point),
            &w.join("data"),
            &out,
            &image_digest,
        )?;
        restores.push(local_row("restore", size, &m, &out, "verified bit-exact"));
        std::fs::remove_file(&out)?;
    }
    rows.push(median_row(restores));
    // A restore returns once its image is on the device; cp returns with it in the page cache,
    // so the copy followed by a sync of it is measured too.
    let references = [
        ("cp --sparse", false, "physical reference for restore"),
        (
            "cp + sync",
            true,
            "durable reference: the copy flushed to the device, as a restore is",
        ),
    ];
    for (phase, durable, note) in references {
        let cp = measure(&mut benchkit::sparse_copy(&image, &out, durable))?;
        rows.push(local_row(phase, size, &cp, &out, note));
        std::fs::remove_file(&out)?;
    }

    // Rollback after another 1% of the blocks changed (a different 1% each run), back to the
    // newest point.
    let mut rollbacks = Vec::new();
    for run in 0..a.runs.max(1) {
        let changed = disk::scatter_writes(&image, BLOCK, blocks, count, 8 + run as u64);
        let (mut row, v) = rollback_run(
            &bins,
            (w, &addr, rx_pid),
            ("rollback 1%", "bench", &point),
            &format!("vda={}", image.display()),
            size,
        )?;
        row.note = format!(
            "{} blocks differed ({} rewritten), verified {}",
            v["disks"][0]["blocks_differing"],
            changed.len(),
            v["disks"][0]["verified"],
        );
        rollbacks.push(row);
    }
    let mut row = median_row(rollbacks);
    row.note = format!(
        "{}; {:.3}x of restore time",
        row.note,
        row.secs / rows[2].secs
    );
    rows.push(row);

    let restore_secs = rows[2].secs;
    rows.extend(extra::qcow2_rollback_case(
        &a,
        w,
        &bins,
        &addr,
        rx_pid,
        &image,
        restore_secs,
    )?);
    if a.live_gib > 0.0 {
        rows.extend(live_case(&a, w, &ag_bin, &addr, rx_pid)?);
    }
    if a.steady_secs > 0 {
        rows.extend(extra::steady_case(&a, w, &bins, &addr, rx_pid)?);
    }
    if a.wan_mbit > 0 {
        rows.extend(extra::wan_case(&a, w, &bins, &image)?);
    }
    if a.scale_gib > 0 {
        rows.extend(extra::scale_case(&a, w, &bins)?);
    }
    let _ = rx.kill();
    let _ = rx.wait();

    let store = dir_bytes(&w.join("data"));
    println!(
        "Rewind benchmark: {:.1} GiB mixed image ({} MiB allocated), {}% blocks rewritten, loopback mTLS, {} cores",
        a.size_gib,
        disk::allocated(&image) >> 20,
        a.change_percent,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "{:<12} {:>8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}  note",
        "phase", "seconds", "MB/s", "agent CPU", "agent MiB", "recv CPU", "recv MiB", "moved MB"
    );
    for r in &rows {
        println!(
            "{:<12} {:>8.2} {:>9.0} {:>10.2} {:>10.0} {:>10.2} {:>10.0} {:>10.1}  {}",
            r.phase,
            r.secs,
            r.mbps,
            r.agent_cpu,
            r.agent_mib,
            r.rx_cpu,
            r.rx_mib,
            r.moved_mb,
            r.note
        );
    }
    println!(
        "store: {:.1} MB; restore / cp ratio {:.2} (restore / cp + sync {:.2}); MB/s is logical disk bytes per wall second",
        mb(store as f64),
        rows[2].secs / rows[3].secs,
        rows[2].secs / rows[4].secs
    );
    if a.keep {
        eprintln!("kept {}", work.keep().display());
    }
    if a.json {
        let j: Vec<Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"phase": r.phase, "seconds": r.secs, "mb_per_s": r.mbps,
                    "agent_cpu_s": r.agent_cpu, "agent_peak_mib": r.agent_mib,
                    "receiver_cpu_s": r.rx_cpu, "receiver_peak_mib": r.rx_mib,
                    "moved_mb": r.moved_mb, "note": r.note})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&j)?);
    }
    Ok(())
}

/// Restores disk `vda` of `vm` at `point` from the store in `data` to `out`, measured, and
/// checks that it holds the bytes of digest `want`.
fn restore_checked(
    rx_bin: &Path,
    (vm, point): (&str, &str),
    data: &Path,
    out: &Path,
    want: &disk::Digest,
) -> Result<Measured> {
    let m = measure(
        Command::new(rx_bin)
            .args([
                "restore", "--vm", vm, "--disk", "vda", "--point", point, "--data",
            ])
            .arg(data)
            .arg("--out")
            .arg(out),
    )?;
    if !m.ok {
        bail!("restore of {vm} failed");
    }
    if disk::digest(out) != *want {
        bail!("the restore of {vm} differs from the source");
    }
    Ok(m)
}

/// One measured `rewind-agent rollback --json` of `vm`'s `disk` to `point`, through the
/// receiver at `addr`: its row (the caller writes the note) and its JSON report.
fn rollback_run(
    bins: &Path,
    (w, addr, rx_pid): (&Path, &str, u32),
    (phase, vm, point): (&'static str, &str, &str),
    disk: &str,
    size: u64,
) -> Result<(Row, Value)> {
    let m = measure(
        benchkit::agent(bins, w, addr, "rollback")
            .args(["--json", "--vm", vm, "--point", point, "--disk", disk]),
    )?;
    if !m.ok {
        bail!("{phase} failed");
    }
    let v: Value = serde_json::from_str(&m.stdout)?;
    let row = Row {
        phase,
        secs: m.secs,
        mbps: size as f64 / 1e6 / m.secs,
        agent_cpu: m.cpu,
        agent_mib: m.peak_mib,
        rx_cpu: 0.0,
        rx_mib: peak_kib(rx_pid) as f64 / 1024.0,
        moved_mb: v["disks"][0]["bytes_fetched"].as_f64().unwrap_or(0.0) / 1e6,
        note: String::new(),
    };
    Ok((row, v))
}

/// The run of median wall time among `runs` (at least one), its note telling how many runs
/// there were and the range of their times.
fn median_row(mut runs: Vec<Row>) -> Row {
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let n = runs.len();
    let (fastest, slowest) = (runs[0].secs, runs[n - 1].secs);
    let mut row = runs.swap_remove(n / 2);
    if n > 1 {
        row.note = format!(
            "{}; median of {n} runs ({fastest:.2}-{slowest:.2} s)",
            row.note
        );
    }
    row
}

/// The row of a `size`-byte disk written to `out` on the receiver's side alone (a restore, or
/// a copy as its reference): its time, CPU and memory, and the bytes `out` holds.
fn local_row(phase: &'static str, size: u64, m: &Measured, out: &Path, note: &str) -> Row {
    Row {
        phase,
        secs: m.secs,
        mbps: size as f64 / 1e6 / m.secs,
        agent_cpu: 0.0,
        agent_mib: 0.0,
        rx_cpu: m.cpu,
        rx_mib: m.peak_mib,
        moved_mb: disk::allocated(out) as f64 / 1e6,
        note: note.into(),
    }
}

/// The row of one measured sync of a `size`-byte disk.
fn sync_row(
    phase: &'static str,
    size: u64,
    m: &Measured,
    v: &Value,
    rx_cpu: f64,
    rx_pid: u32,
    note: String,
) -> Row {
    Row {
        phase,
        secs: m.secs,
        mbps: size as f64 / 1e6 / m.secs,
        agent_cpu: m.cpu,
        agent_mib: m.peak_mib,
        rx_cpu,
        rx_mib: peak_kib(rx_pid) as f64 / 1024.0,
        moved_mb: v["sent_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        note,
    }
}

/// One `rewind-agent sync --once --json` of `vm` with `extra` flags, measured; also returns the
/// receiver's CPU seconds spent meanwhile.
fn agent_sync(
    ag_bin: &Path,
    w: &Path,
    addr: &str,
    rx_pid: u32,
    vm: &str,
    extra: &[String],
) -> Result<(Measured, Value, f64)> {
    let before = cpu_secs(rx_pid);
    let m = measure(&mut benchkit::agent_sync(
        ag_bin.parent().unwrap_or(Path::new(".")),
        w,
        addr,
        vm,
        extra,
    ))?;
    if !m.ok {
        bail!("sync of {vm} failed");
    }
    let v: Value = serde_json::from_str(&m.stdout)?;
    Ok((m, v, cpu_secs(rx_pid) - before))
}

/// The live-VM case: a qcow2 disk with the same kind of mixed content in a running QEMU, seeded
/// through the dirty-bitmap path, then 1% of its blocks rewritten by `qemu-io` and one cycle;
/// next to it, hash-scan mode on a raw copy with the same writes, and (where libvirt is
/// installed) the same disk as a libvirt domain, taken through pull-mode backup jobs.
fn live_case(a: &Args, w: &Path, ag_bin: &Path, addr: &str, rx_pid: u32) -> Result<Vec<Row>> {
    use rewind_tests::qemu::{Vm, VmDisk};
    let size = ((a.live_gib * (1u64 << 30) as f64) as u64) / BLOCK * BLOCK;
    let dir = w.join("live");
    std::fs::create_dir_all(&dir)?;
    let raw = dir.join("disk.raw");
    let qcow = dir.join("vda.qcow2");
    eprintln!(
        "live case: generating a {:.1} GiB mixed qcow2 ...",
        a.live_gib
    );
    disk::mixed(&raw, size, 43);
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()?;
    if !out.status.success() {
        bail!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    }
    let lv_qcow = dir.join("lv.qcow2");
    let with_libvirt = rewind_tests::libvirt::available();
    if with_libvirt {
        std::fs::copy(&qcow, &lv_qcow)?;
    }
    let mut vm = Vm::start(
        &dir,
        vec![VmDisk {
            id: "vda".into(),
            drive: "drive0".into(),
            path: qcow.clone(),
            size,
        }],
    );
    let sync =
        |vm_name: &str, extra: &[String]| agent_sync(ag_bin, w, addr, rx_pid, vm_name, extra);
    let qmp_args = vec!["--qmp".to_owned(), vm.agent_qmp().display().to_string()];
    let raw_args = vec!["--disk".to_owned(), format!("vda={}", raw.display())];
    let mb = |b: f64| b / 1e6;
    let row = |phase: &'static str, m: &Measured, v: &Value, rx_cpu: f64| {
        let note = format!(
            "{} changed, {:.1} MB read ({})",
            v["disks"][0]["changed_blocks"],
            mb(v["disks"][0]["read_bytes"].as_f64().unwrap_or(0.0)),
            v["disks"][0]["source"].as_str().unwrap_or("")
        );
        sync_row(phase, size, m, v, rx_cpu, rx_pid, note)
    };
    let mut rows = Vec::new();
    let (m, v, c) = sync("live", &qmp_args)?;
    rows.push(row("live seed", &m, &v, c));
    let (m, v, c) = sync("scan", &raw_args)?;
    rows.push(row("scan seed", &m, &v, c));

    // 1% of the blocks rewritten at random, through the device (as a guest would), and the
    // same bytes into the raw copy.
    let blocks = size / BLOCK;
    let count = ((blocks as f64) * a.change_percent / 100.0).round() as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < count {
        picked.insert(rand::Rng::random_range(&mut rng, 0..blocks));
    }
    let f = std::fs::OpenOptions::new().write(true).open(&raw)?;
    for (n, &b) in picked.iter().enumerate() {
        let pattern = (n % 250) as u8 + 1;
        vm.monitor.write("drive0", pattern, b * BLOCK, BLOCK);
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![pattern; BLOCK as usize], b * BLOCK)?;
    }
    f.sync_all()?;
    let (m, v, c) = sync("live", &qmp_args)?;
    rows.push(row("live 1%", &m, &v, c));
    let (m, v, c) = sync("scan", &raw_args)?;
    rows.push(row("scan 1%", &m, &v, c));
    drop(vm);
    if with_libvirt {
        // The same disk and the same writes under libvirt (writes through the monitor's
        // qemu-io, one virsh call each, outside the measured cycle).
        let lv = rewind_tests::libvirt::Libvirtd::start(&dir.join("libvirt"));
        lv.start_domain("benchlv", &[&lv_qcow], true);
        let lv_args = vec![
            "--libvirt".to_owned(),
            lv.uri(),
            "--domain".to_owned(),
            "benchlv".to_owned(),
        ];
        let (m, v, c) = sync("libvirt", &lv_args)?;
        rows.push(row("libvirt seed", &m, &v, c));
        for (n, &b) in picked.iter().enumerate() {
            lv.write("benchlv", 0, (n % 250) as u8 + 1, b * BLOCK, BLOCK);
        }
        let (m, v, c) = sync("libvirt", &lv_args)?;
        rows.push(row("libvirt 1%", &m, &v, c));
    } else {
        eprintln!("libvirt is not installed: the libvirt rows are skipped");
    }
    Ok(rows)
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
