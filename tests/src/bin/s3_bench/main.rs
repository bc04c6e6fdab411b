//! `rewind-s3-bench`: the object-storage figures next to the local-pack receiver, in one run on
//! one mixed image: seed, 1% incremental and restore to and from local packs and from a bucket
//! (cold cache), PUTs per GiB stored, the bytes a default verify reads from the bucket, the time
//! `recover` takes to rebuild the catalog, and a second receiver's copy throughput through a
//! rate-capped link with a delaying proxy.
//!
//! The bucket is a three-node Garage cluster on loopback when the cached garage binary is there
//! (`.ci/run` builds it), else moto_server. Run on release binaries:
//! `cargo build --release --workspace --bins && target/release/rewind-s3-bench --size-gib 4`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use rewind_tests::benchkit::{self, spawn_receiver, timed};
use rewind_tests::{disk, garage, procfs, s3, wan};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Object-storage figures for Rewind on this machine.
#[derive(Debug, Parser)]
struct Args {
    /// Size of the generated mixed disk image, in GiB.
    #[arg(long, default_value_t = 4.0)]
    size_gib: f64,
    /// Share of blocks rewritten before the incremental point, in percent.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Folder for the image, the stores and the restores (needs ~4x the image size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The copy's link: rate in Mbit/s (0: no copy case; the cap needs root, ip and tc).
    #[arg(long, default_value_t = 1000)]
    wan_mbit: u64,
    /// The copy's link: round-trip time added by the delaying proxy, in ms.
    #[arg(long, default_value_t = 50.0)]
    wan_rtt_ms: f64,
    /// Scale case: points of small changes on a simulated 1 TiB disk (0 skips it); figures
    /// at 10, 100, 1000, ... points.
    #[arg(long, default_value_t = 1000)]
    scale_points: u64,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
    /// Runs only the scale case (no image, no copy).
    #[arg(long)]
    scale_only: bool,
    /// Runs only the copy case (a local-pack primary seeded with the image and one
    /// incremental, copied `--copy-runs` times).
    #[arg(long)]
    copy_only: bool,
    /// Copies of the primary in the copy case (each into a fresh receiver); each is printed
    /// and the median is shown.
    #[arg(long, default_value_t = 1)]
    copy_runs: usize,
    /// The copy's chunk reads in flight (`parallel` of its configuration; the receiver's
    /// default when not given).
    #[arg(long)]
    copy_parallel: Option<usize>,
    /// Runs the scale case with local packs instead of the bucket (with --scale-only).
    #[arg(long)]
    scale_local: bool,
    /// Keeps the work folder (data folders, catalogs) for a look afterwards.
    #[arg(long)]
    keep_dir: bool,
    /// Restores of each kind (local, bucket with a cold cache); the median is shown.
    #[arg(long, default_value_t = 3)]
    restore_runs: usize,
    /// Garage's `compression_level` (`none`, or a zstd level). Rewind's packs hold zstd
    /// frames already, so compressing them again only spends the store's CPU.
    #[arg(long, default_value = "none")]
    garage_compression: String,
}

mod ceiling;
mod scale;

const BLOCK: u64 = 64 * 1024;
const GIB: f64 = (1u64 << 30) as f64;

/// The receiver binary with the bucket's environment.
fn receiver(bins: &Path, env: &[(&'static str, String)]) -> Command {
    let mut c = Command::new(bins.join("rewind-receiver"));
    c.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("REWIND_LOG", "warn");
    c
}

/// `serve` on a free loopback port with the bucket's environment and `extra` flags; returns
/// the process and its address.
fn serve(
    bins: &Path,
    env: &[(&'static str, String)],
    data: &Path,
    pki: &Path,
    extra: &[&str],
) -> Result<(Child, String)> {
    use std::io::BufRead;
    let mut rx = receiver(bins, env)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .arg("--pki")
        .arg(pki)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(rx.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .context("address")?
        .to_owned();
    Ok((rx, addr))
}

/// Stops a receiver cleanly (SIGTERM: an object store's catalog snapshot is taken).
fn stop(rx: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &rx.id().to_string()])
        .status();
    let _ = rx.wait();
}

/// One restore: its wall time, the receiver's CPU time, and the store's CPU time meanwhile.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    secs: f64,
    cpu: f64,
    store_cpu: f64,
}

/// Restores the point into `out`, timed, and checks it against `want`; `store_cpu` reads the
/// store's CPU seconds so far (0 for local packs).
fn restore(
    bins: &Path,
    env: &[(&'static str, String)],
    data: &Path,
    (point, out): (&str, &Path),
    want: &disk::Digest,
    store_cpu: &dyn Fn() -> f64,
) -> Result<Run> {
    let store_before = store_cpu();
    let (secs, cpu) = benchkit::timed_cpu(
        receiver(bins, env)
            .args([
                "restore", "--vm", "bench", "--disk", "vda", "--point", point, "--data",
            ])
            .arg(data)
            .arg("--out")
            .arg(out),
    )?;
    let store_cpu = store_cpu() - store_before;
    eprintln!("  restore: {secs:.2} s, receiver CPU {cpu:.2} s, store CPU {store_cpu:.2} s");
    if disk::digest(out) != *want {
        bail!("the restore differs from the source");
    }
    std::fs::remove_file(out)?;
    Ok(Run {
        secs,
        cpu,
        store_cpu,
    })
}

/// The run of median wall time of `runs` (at least one) by `run`.
fn median(runs: usize, mut run: impl FnMut() -> Result<Run>) -> Result<Run> {
    let mut t = (0..runs.max(1))
        .map(|_| run())
        .collect::<Result<Vec<Run>>>()?;
    t.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    Ok(t[t.len() / 2])
}

/// Bytes of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The bucket: a Garage cluster, or moto_server; its environment and name.
enum Bucket {
    Garage(garage::Garage),
    Moto(s3::Moto),
}

impl Bucket {
    fn start(dir: &Path, compression: &str) -> Result<Bucket> {
        if garage::binary().is_some() {
            let level = match compression {
                "none" => "\"none\"".to_owned(),
                n => n
                    .parse::<i32>()
                    .context("--garage-compression")?
                    .to_string(),
            };
            let g = garage::Garage::start_with(
                &dir.join("garage"),
                &format!("compression_level = {level}"),
            );
            g.bucket("bench");
            return Ok(Bucket::Garage(g));
        }
        if s3::available() {
            let m = s3::Moto::start(dir);
            m.bucket("bench", false);
            return Ok(Bucket::Moto(m));
        }
        bail!("neither garage nor moto_server is installed (bash .ci/run installs both)")
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Bucket::Garage(g) => g.env(),
            Bucket::Moto(m) => m.env(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Bucket::Garage(_) => "Garage 2.5, 3 nodes, one box",
            Bucket::Moto(_) => "moto_server",
        }
    }

    /// CPU seconds the store's processes have used so far.
    fn cpu_secs(&self) -> f64 {
        let pids = match self {
            Bucket::Garage(g) => g.pids(),
            Bucket::Moto(m) => vec![m.pid()],
        };
        let ticks: u64 = pids.into_iter().map(procfs::cpu_ticks).sum();
        ticks as f64 / procfs::ticks_per_second() as f64
    }

    fn objects(&self, prefix: &str) -> usize {
        match self {
            Bucket::Garage(g) => g.keys("bench", prefix).len(),
            Bucket::Moto(m) => m.keys("bench", prefix).len(),
        }
    }
}

/// A second receiver copying `primary_data`'s points through the link; returns (secs, bytes).
fn copy_case(a: &Args, w: &Path, bins: &Path, primary_data: &Path) -> Result<Option<(f64, u64)>> {
    if a.wan_mbit == 0 {
        return Ok(None);
    }
    if !wan::available() {
        eprintln!("copy case skipped: the link needs root, ip and tc");
        return Ok(None);
    }
    let o = Command::new(bins.join("rewind-receiver"))
        .args(["pki", "issue", "--replica", "--agent", "copy1", "--dir"])
        .arg(w.join("pki"))
        .output()?;
    if !o.status.success() {
        bail!(
            "issuing the replica identity: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let ns = wan::Netns::create("rwcopy", 78, a.wan_mbit)?;
    let (mut primary, addr) = spawn_receiver(
        ns.command(&bins.join("rewind-receiver")),
        primary_data,
        &w.join("pki"),
        &format!("{}:0", ns.ns_addr),
    )?;
    let proxy = wan::DelayProxy::start(
        addr.parse().context("primary address")?,
        Duration::from_secs_f64(a.wan_rtt_ms / 2000.0),
    )?;
    let pki = w.join("pki");
    let config = w.join("copy.toml");
    std::fs::write(
        &config,
        format!(
            "[copy]\nfrom = \"https://{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nevery = 1\n{}",
            proxy.addr,
            pki.join("ca.pem").display(),
            pki.join("copy1.pem").display(),
            pki.join("copy1.key").display(),
            a.copy_parallel
                .map_or(String::new(), |n| format!("parallel = {n}\n"))
        ),
    )?;
    let runs = (|| -> Result<Vec<(f64, u64)>> {
        let mut runs = Vec::new();
        for run in 0..a.copy_runs.max(1) {
            let copy_data = w.join("data-copy");
            if copy_data.exists() {
                std::fs::remove_dir_all(&copy_data)?;
            }
            let (secs, bytes) = copy_run(bins, &config, &pki, &copy_data)?;
            if a.copy_runs > 1 {
                eprintln!(
                    "  copy run {}: {:.0} MB in {secs:.2} s = {:.0} Mbit/s",
                    run + 1,
                    bytes as f64 / 1e6,
                    bytes as f64 * 8.0 / secs / 1e6
                );
            }
            runs.push((secs, bytes));
        }
        Ok(runs)
    })();
    // The primary, the proxy and the namespace go however the runs ended.
    let _ = primary.kill();
    let _ = primary.wait();
    drop(proxy);
    drop(ns);
    let mut runs = runs?;
    runs.sort_by(|x, y| x.0.total_cmp(&y.0));
    Ok(Some(runs[runs.len() / 2]))
}

/// One copy into a fresh receiver at `copy_data`, timed until it holds both points; returns
/// (secs, chunk bytes copied).
fn copy_run(bins: &Path, config: &Path, pki: &Path, copy_data: &Path) -> Result<(f64, u64)> {
    let mut copy = Command::new(bins.join("rewind-receiver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(copy_data)
        .arg("--pki")
        .arg(pki)
        .arg("--config")
        .arg(config)
        .env("REWIND_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(3600);
    let done = loop {
        let o = Command::new(bins.join("rewind-receiver"))
            .args(["points", "--vm", "bench", "--json", "--data"])
            .arg(copy_data)
            .output()?;
        let n = serde_json::from_slice::<Vec<Value>>(&o.stdout).map_or(0, |v| v.len());
        if n >= 2 {
            break t.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            stop(&mut copy);
            bail!("the copy did not finish within an hour");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop(&mut copy);
    let conn = rusqlite::Connection::open(copy_data.join("catalog.sqlite"))?;
    let bytes: i64 = conn.query_row(
        "SELECT COALESCE(SUM(json_extract(detail, '$.chunk_bytes')), 0) FROM events WHERE kind = 'copy'",
        [],
        |r| r.get(0),
    )?;
    Ok((done, bytes as u64))
}

/// The copy's figures.
fn print_copy(a: &Args, secs: f64, bytes: u64) {
    let mbit = bytes as f64 * 8.0 / secs / 1e6;
    println!(
        "copy: {:.0} MB in {secs:.1} s = {mbit:.0} Mbit/s, {:.0}% of the {} Mbit/s cap at {} ms RTT (target 80%)",
        bytes as f64 / 1e6,
        100.0 * mbit / a.wan_mbit as f64,
        a.wan_mbit,
        a.wan_rtt_ms
    );
}

/// Removes every cached pack of the data folder: the next read fetches from the bucket.
fn empty_cache(data: &Path) -> Result<()> {
    for e in std::fs::read_dir(data.join("object-cache/packs"))? {
        std::fs::remove_file(e?.path())?;
    }
    Ok(())
}

/// A fresh copy of `image` at `disk`, and the agent's state forgotten (a new receiver).
fn fresh_disk(w: &Path, image: &Path, disk: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(w.join("state"));
    if !benchkit::sparse_copy(image, disk, false)
        .status()?
        .success()
    {
        bail!("copying the image");
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let bins = benchkit::bin_dir()?;
    std::fs::create_dir_all(&a.dir)?;
    let work = tempfile::Builder::new()
        .prefix("rewind-s3-bench")
        .tempdir_in(&a.dir)?;
    let w = work.path();
    let pki = w.join("pki");
    benchkit::pki(&bins, &pki)?;
    if a.scale_only {
        let bucket = Bucket::start(w, &a.garage_compression)?;
        let url = if a.scale_local {
            ""
        } else {
            "s3://bench/scale"
        };
        let scale = scale::run(&bins, w, &bucket.env(), url, a.scale_points)?;
        print_scale(&scale, a.scale_local);
        if a.keep_dir {
            eprintln!("work folder kept: {}", work.keep().display());
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&scale)?);
        }
        return Ok(());
    }
    let size = (a.size_gib * GIB) as u64 / BLOCK * BLOCK;
    eprintln!("generating a {:.1} GiB mixed image ...", size as f64 / GIB);
    let image = w.join("image.raw");
    disk::mixed(&image, size, 1);
    let vda = w.join("vda.raw");
    let blocks = size / BLOCK;
    let changed = ((blocks as f64) * a.change_percent / 100.0) as usize;
    let out = w.join("restored.raw");

    eprintln!(
        "local packs: seed, {}% incremental, restore ...",
        a.change_percent
    );
    fresh_disk(w, &image, &vda)?;
    let local = w.join("data-local");
    let (l_seed, l_incr, l_point, want) = seed_incr(&bins, w, &[], &local, &[], &vda, changed)?;
    if a.copy_only {
        eprintln!("copy between two receivers through the link ...");
        if let Some((secs, bytes)) = copy_case(&a, w, &bins, &local)? {
            print_copy(&a, secs, bytes);
        }
        if a.keep_dir {
            eprintln!("work folder kept: {}", work.keep().display());
        }
        return Ok(());
    }
    let l_run = median(a.restore_runs, || {
        restore(&bins, &[], &local, (&l_point, &out), &want, &|| 0.0)
    })?;
    let l_restore = l_run.secs;

    let bucket = Bucket::start(w, &a.garage_compression)?;
    eprintln!(
        "object store ({}): seed, incremental, cold restore ...",
        bucket.name()
    );
    let env = bucket.env();
    let url = "s3://bench/site";
    fresh_disk(w, &image, &vda)?;
    let data = w.join("data-s3");
    let (s_seed, s_incr, s_point, want2) =
        seed_incr(&bins, w, &env, &data, &["--store", url], &vda, changed)?;
    let stored = dir_bytes(&data.join("object-cache/packs"));
    let packs = bucket.objects("site/packs/");
    let snapshots = bucket.objects("site/catalog/");
    eprintln!("the store alone: the same pack objects up and down ...");
    let alone = ceiling::measure(&env, w, &data.join("object-cache/packs"))?;
    let s_run = median(a.restore_runs, || {
        empty_cache(&data)?;
        restore(&bins, &env, &data, (&s_point, &out), &want2, &|| {
            bucket.cpu_secs()
        })
    })?;
    let s_restore = s_run.secs;

    eprintln!("verify, recover ...");
    let (v_secs, o) = timed(
        receiver(&bins, &env)
            .args(["verify", "--json", "--store", url, "--data"])
            .arg(&data),
    )?;
    let v: Value = serde_json::from_slice(&o.stdout)?;
    let recovered = w.join("data-recovered");
    let (r_secs, _) = timed(
        receiver(&bins, &env)
            .args(["recover", "--store", url, "--data"])
            .arg(&recovered),
    )?;
    let catalog_mb = std::fs::metadata(recovered.join("catalog.sqlite"))
        .map(|m| m.len())
        .unwrap_or(0) as f64
        / 1e6;

    eprintln!("copy between two receivers through the link ...");
    let copy = copy_case(&a, w, &bins, &local)?;
    let scale = if a.scale_points > 0 {
        eprintln!(
            "scale: {} points of small changes on a simulated 1 TiB disk ...",
            a.scale_points
        );
        scale::run(&bins, w, &env, "s3://bench/scale", a.scale_points)?
    } else {
        Vec::new()
    };

    let mb = size as f64 / 1e6;
    // Both the receiver and the store run on this machine's cores: their CPU time together,
    // spread over every core, is the least wall time a cold restore can take here.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let floor = (s_run.cpu + s_run.store_cpu) / cores as f64;
    let puts_per_gib = (packs + snapshots) as f64 / (stored as f64 / GIB).max(1e-9);
    let r = json!({
        "image_gib": size as f64 / GIB,
        "bucket": bucket.name(),
        "garage_compression": a.garage_compression,
        "local": {"seed_secs": l_seed, "incr_secs": l_incr, "restore_secs": l_restore},
        "object_store": {"seed_secs": s_seed, "incr_secs": s_incr, "cold_restore_secs": s_restore,
            "stored_bytes": stored, "pack_objects": packs, "catalog_snapshots": snapshots,
            "puts_per_gib_stored": puts_per_gib},
        "ratios": {"seed_speed": l_seed / s_seed, "incr_speed": l_incr / s_incr,
            "cold_restore_speed": l_restore / s_restore},
        "restore_cpu": {"local_secs": l_run.cpu, "cold_secs": s_run.cpu, "store_secs": s_run.store_cpu,
            "cores": cores, "cold_floor_secs": floor},
        "verify": {"secs": v_secs, "bytes_read": v["store"]["bytes_read"], "requests": v["store"]["requests"],
            "packs_checked": v["store"]["packs_checked"]},
        "recover": {"secs": r_secs, "catalog_mb": catalog_mb},
        "store_alone": {"objects": alone.objects, "bytes": alone.bytes, "in_flight": ceiling::IN_FLIGHT,
            "put_secs": alone.put_secs, "get_secs": alone.get_secs,
            "seed_over_put": s_seed / alone.put_secs, "restore_over_get": s_restore / alone.get_secs},
        "copy": copy.map(|(secs, bytes)| json!({"secs": secs, "bytes": bytes,
            "mbit_per_sec": bytes as f64 * 8.0 / secs / 1e6,
            "share_of_cap": bytes as f64 * 8.0 / secs / 1e6 / a.wan_mbit as f64,
            "cap_mbit": a.wan_mbit, "rtt_ms": a.wan_rtt_ms})),
    });
    println!(
        "object storage vs local packs, {:.1} GiB mixed image, bucket: {}{}",
        size as f64 / GIB,
        bucket.name(),
        match bucket {
            Bucket::Garage(_) => format!(" (compression_level {})", a.garage_compression),
            Bucket::Moto(_) => String::new(),
        }
    );
    println!(
        "{:<28} {:>10} {:>10} {:>8}",
        "phase", "local s", "bucket s", "ratio"
    );
    for (name, l, s) in [
        ("seed", l_seed, s_seed),
        ("incremental (1%)", l_incr, s_incr),
        ("restore (cold cache, median)", l_restore, s_restore),
    ] {
        println!("{name:<28} {l:>10.2} {s:>10.2} {:>7.2}x", l / s);
    }
    println!(
        "seed speed {:.0} MB/s local, {:.0} MB/s to the bucket (target >= 0.8x); cold restore target >= 0.7x",
        mb / l_seed,
        mb / s_seed
    );
    println!(
        "restore CPU (median runs): local {:.2} s in {:.2} s; cold: receiver {:.2} s + store {:.2} s in {:.2} s, \
         {:.2} of {cores} cores busy (that CPU needs at least {floor:.2} s here: at best {:.2}x the local restore)",
        l_run.cpu,
        l_restore,
        s_run.cpu,
        s_run.store_cpu,
        s_restore,
        (s_run.cpu + s_run.store_cpu) / s_restore,
        l_restore / floor
    );
    println!(
        "the store alone ({} requests in flight): PUT of the seed's {} pack objects ({:.2} GiB) {:.2} s, GET {:.2} s; \
         the bucket seed took {:.2}x that PUT, the cold restore {:.2}x that GET",
        ceiling::IN_FLIGHT,
        alone.objects,
        alone.bytes as f64 / GIB,
        alone.put_secs,
        alone.get_secs,
        s_seed / alone.put_secs,
        s_restore / alone.get_secs
    );
    println!(
        "PUTs: {packs} pack objects + {snapshots} catalog snapshots for {:.2} GiB stored = {puts_per_gib:.1} per GiB (target <= 64)",
        stored as f64 / GIB
    );
    println!(
        "default verify: {:.2} s, {} requests, {} bytes read from the bucket (target 0)",
        v_secs, v["store"]["requests"], v["store"]["bytes_read"]
    );
    println!("recover: {r_secs:.2} s for a {catalog_mb:.1} MB catalog");
    if let Some((secs, bytes)) = copy {
        print_copy(&a, secs, bytes);
    }
    print_scale(&scale, false);
    let mut r = r;
    r["scale"] = serde_json::to_value(&scale)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    if a.keep_dir {
        eprintln!("work folder kept: {}", work.keep().display());
    }
    Ok(())
}

/// Seed of `vda`, `changed` blocks rewritten, incremental: (seed secs, incr secs, point, the
/// digest of the disk at the incremental point).
fn seed_incr(
    bins: &Path,
    w: &Path,
    env: &[(&'static str, String)],
    data: &Path,
    serve_extra: &[&str],
    vda: &Path,
    changed: usize,
) -> Result<(f64, f64, String, disk::Digest)> {
    let (mut rx, addr) = serve(bins, env, data, &w.join("pki"), serve_extra)?;
    let arg = vec!["--disk".to_owned(), format!("vda={}", vda.display())];
    let result = (|| {
        let (seed, _) = timed(&mut benchkit::agent_sync(bins, w, &addr, "bench", &arg))?;
        let blocks = std::fs::metadata(vda)?.len() / BLOCK;
        disk::scatter_writes(vda, BLOCK, blocks, changed, 7);
        let want = disk::digest(vda);
        let (incr, out) = timed(&mut benchkit::agent_sync(bins, w, &addr, "bench", &arg))?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok((seed, incr, v["point"].to_string(), want))
    })();
    stop(&mut rx);
    result
}

fn print_scale(scale: &[scale::Figures], local: bool) {
    if scale.is_empty() {
        return;
    }
    println!(
        "scale, simulated 1 TiB disk, 16 changed blocks a point, {}:",
        if local {
            "local packs"
        } else {
            "packs in the bucket"
        }
    );
    println!(
        "{:>8} {:>10} {:>10} {:>11} {:>13} {:>13}",
        "points", "begin ms", "commit ms", "catalog MB", "kB per point", "prune one ms"
    );
    for s in scale {
        println!(
            "{:>8} {:>10.1} {:>10.1} {:>11.2} {:>13.1} {:>13.1}",
            s.points,
            s.begin_ms,
            s.commit_ms,
            s.catalog_mb,
            s.catalog_mb * 1e3 / s.points as f64,
            s.prune_ms
        );
    }
}
