//! `rewind-compare`: Rewind next to restic, borg and rsync on the same mixed disk image, each
//! scenario run several times with the tools in alternation, printing medians and ratios (peer
//! time / Rewind time), CPU seconds, peak memory and bytes moved or stored.
//!
//! Scenarios: seed (first full copy), incremental after 1% of the blocks were rewritten at
//! random, and restore of the newest copy (with `cp --sparse=always` as the physical
//! reference). It installs nothing: the peers come from Debian's `restic`, `borgbackup` and
//! `rsync` packages; a missing one is skipped. Run it on release binaries.

use anyhow::{bail, Context, Result};
use clap::Parser;
use rewind_tests::benchkit::{self, agent_sync, cpu_secs, spawn_receiver};
use rewind_tests::disk;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// Image size in GiB.
    #[arg(long, default_value_t = 4.0)]
    size_gib: f64,
    /// Runs per scenario and tool (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Work folder (needs about 4x the image size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
}

const BLOCK: u64 = 64 * 1024;

struct M {
    secs: f64,
    cpu: f64,
    peak_mib: f64,
    stdout: String,
}

/// Runs a command under `/usr/bin/time` for its CPU and peak memory (children included).
fn measure(cmd: &mut Command) -> Result<M> {
    rustix::fs::sync();
    let prog = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned())))
        .collect();
    let tfile = tempfile::NamedTempFile::new()?;
    let started = Instant::now();
    let mut timed = Command::new("/usr/bin/time");
    if let Some(dir) = cmd.get_current_dir() {
        timed.current_dir(dir);
    }
    let out = timed
        .arg("-f")
        .arg("%U %S %M")
        .arg("-o")
        .arg(tfile.path())
        .arg(&prog)
        .args(&args)
        .envs(envs)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {prog:?}"))?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{prog:?} {args:?} failed");
    }
    let t = std::fs::read_to_string(tfile.path())?;
    let v: Vec<f64> = t
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Ok(M {
        secs,
        cpu: v.first().copied().unwrap_or(0.0) + v.get(1).copied().unwrap_or(0.0),
        peak_mib: v.get(2).copied().unwrap_or(0.0) / 1024.0,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

fn du(p: &Path) -> u64 {
    let out = Command::new("du").args(["-sb"]).arg(p).output();
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
        })
        .unwrap_or(0)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[derive(Default, Clone)]
struct Sample {
    secs: Vec<f64>,
    cpu: Vec<f64>,
    peak: Vec<f64>,
    bytes: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// A child process killed and reaped when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One tool's state for a run: where its repository lives and how to drive it.
trait Tool {
    fn name(&self) -> &'static str;
    fn seed(&mut self, image: &Path) -> Result<(M, f64)>;
    fn incremental(&mut self, image: &Path) -> Result<(M, f64)>;
    /// Restores the newest copy; returns the measurement and the bytes it allocated.
    fn restore(&mut self, out: &Path) -> Result<(M, f64)>;
}

struct Rewind {
    bins: PathBuf,
    work: PathBuf,
    rx: Child,
    addr: String,
    point: String,
}

impl Rewind {
    fn start(bins: &Path, work: &Path) -> Result<Rewind> {
        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work)?;
        let rx_bin = bins.join("rewind-receiver");
        for args in [
            vec!["pki", "init"],
            vec!["pki", "issue", "--agent", "bench"],
        ] {
            let o = Command::new(&rx_bin)
                .args(&args)
                .arg("--dir")
                .arg(work.join("pki"))
                .output()?;
            if !o.status.success() {
                bail!("pki: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        let (rx, addr) = spawn_receiver(
            Command::new(&rx_bin),
            &work.join("data"),
            &work.join("pki"),
            "127.0.0.1:0",
        )?;
        Ok(Rewind {
            bins: bins.to_owned(),
            work: work.to_owned(),
            rx: Child(rx),
            addr,
            point: String::new(),
        })
    }

    fn sync(&mut self, image: &Path) -> Result<(M, f64)> {
        let rx_pid = self.rx.0.id();
        let before = cpu_secs(rx_pid);
        let w = &self.work;
        let disk = vec!["--disk".to_owned(), format!("vda={}", image.display())];
        let mut m = measure(&mut agent_sync(&self.bins, w, &self.addr, "bench", &disk))?;
        m.cpu += cpu_secs(rx_pid) - before;
        let v: Value = serde_json::from_str(&m.stdout)?;
        self.point = v["point"].to_string();
        let sent = v["sent_bytes"].as_f64().unwrap_or(0.0);
        Ok((m, sent))
    }
}

impl Tool for Rewind {
    fn name(&self) -> &'static str {
        "rewind"
    }
    fn seed(&mut self, image: &Path) -> Result<(M, f64)> {
        self.sync(image)
    }
    fn incremental(&mut self, image: &Path) -> Result<(M, f64)> {
        self.sync(image)
    }
    fn restore(&mut self, out: &Path) -> Result<(M, f64)> {
        let m = measure(
            Command::new(self.bins.join("rewind-receiver"))
                .args([
                    "restore",
                    "--vm",
                    "bench",
                    "--disk",
                    "vda",
                    "--point",
                    &self.point,
                    "--data",
                ])
                .arg(self.work.join("data"))
                .arg("--out")
                .arg(out),
        )?;
        Ok((m, disk::allocated(out) as f64))
    }
}

struct Restic {
    repo: PathBuf,
}

impl Restic {
    fn cmd(&self) -> Command {
        let mut c = Command::new("restic");
        c.arg("--repo")
            .arg(&self.repo)
            .arg("--quiet")
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", self.repo.with_extension("cache"));
        c
    }
}

impl Restic {
    /// One `restic backup` of the image, measured, with the bytes it added to the repository.
    fn backup(&self, image: &Path) -> Result<(M, f64)> {
        let before = du(&self.repo);
        let m = measure(
            self.cmd()
                .args(["backup", "--compression", "auto"])
                .arg(image),
        )?;
        Ok((m, du(&self.repo).saturating_sub(before) as f64))
    }
}

impl Tool for Restic {
    fn name(&self) -> &'static str {
        "restic"
    }
    fn seed(&mut self, image: &Path) -> Result<(M, f64)> {
        let _ = std::fs::remove_dir_all(&self.repo);
        let o = self.cmd().arg("init").output()?;
        if !o.status.success() {
            bail!("restic init: {}", String::from_utf8_lossy(&o.stderr));
        }
        self.backup(image)
    }
    fn incremental(&mut self, image: &Path) -> Result<(M, f64)> {
        self.backup(image)
    }
    fn restore(&mut self, out: &Path) -> Result<(M, f64)> {
        let dir = out.with_extension("restic");
        let _ = std::fs::remove_dir_all(&dir);
        let m = measure(self.cmd().args(["restore", "latest", "--target"]).arg(&dir))?;
        let bytes = du(&dir) as f64;
        let _ = std::fs::remove_dir_all(&dir);
        Ok((m, bytes))
    }
}

struct Borg {
    repo: PathBuf,
    n: u32,
}

impl Borg {
    fn cmd(&self) -> Command {
        let mut c = Command::new("borg");
        c.env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_BASE_DIR", self.repo.with_extension("base"));
        c
    }
}

impl Tool for Borg {
    fn name(&self) -> &'static str {
        "borg"
    }
    fn seed(&mut self, image: &Path) -> Result<(M, f64)> {
        let _ = std::fs::remove_dir_all(&self.repo);
        let _ = std::fs::remove_dir_all(self.repo.with_extension("base"));
        let o = self
            .cmd()
            .args(["init", "--encryption=none"])
            .arg(&self.repo)
            .output()?;
        if !o.status.success() {
            bail!("borg init: {}", String::from_utf8_lossy(&o.stderr));
        }
        self.incremental(image)
    }
    fn incremental(&mut self, image: &Path) -> Result<(M, f64)> {
        let before = du(&self.repo);
        self.n += 1;
        let m = measure(
            self.cmd()
                .args(["create", "--compression", "zstd,1", "--sparse"])
                .arg(format!("{}::a{}", self.repo.display(), self.n))
                .arg(image),
        )?;
        Ok((m, du(&self.repo).saturating_sub(before) as f64))
    }
    fn restore(&mut self, out: &Path) -> Result<(M, f64)> {
        let dir = out.with_extension("borg");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut c = self.cmd();
        c.current_dir(&dir)
            .args(["extract", "--sparse"])
            .arg(format!("{}::a{}", self.repo.display(), self.n));
        let m = measure(&mut c)?;
        let bytes = du(&dir) as f64;
        if bytes == 0.0 {
            bail!("borg extract produced nothing in {}", dir.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok((m, bytes))
    }
}

struct Rsync {
    dest: PathBuf,
    _daemon: Child,
    port: u16,
}

impl Rsync {
    fn start(root: &Path) -> Result<Rsync> {
        let dest = root.join("rsync-dest");
        std::fs::create_dir_all(&dest)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = root.join("rsyncd.conf");
        std::fs::write(&conf, format!("use chroot = no\n[bench]\n  path = {}\n  read only = no\n  uid = root\n  gid = root\n", dest.display()))?;
        let daemon = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Rsync {
            dest,
            _daemon: Child(daemon),
            port,
        })
    }
    fn copy(&self, image: &Path, extra: &[&str]) -> Result<(M, f64)> {
        let m = measure(
            Command::new("rsync")
                .args(["--stats", "--sparse", "--times"])
                .args(extra)
                .arg(image)
                .arg(format!("rsync://127.0.0.1:{}/bench/", self.port)),
        )?;
        let sent = m
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("Total bytes sent: "))
            .map(|v| v.replace(',', "").trim().parse::<f64>().unwrap_or(0.0))
            .unwrap_or(0.0);
        Ok((m, sent))
    }
}

impl Tool for Rsync {
    fn name(&self) -> &'static str {
        "rsync"
    }
    fn seed(&mut self, image: &Path) -> Result<(M, f64)> {
        let _ = std::fs::remove_dir_all(&self.dest);
        std::fs::create_dir_all(&self.dest)?;
        self.copy(image, &["--whole-file"])
    }
    fn incremental(&mut self, image: &Path) -> Result<(M, f64)> {
        self.copy(image, &["--no-whole-file", "--inplace", "--ignore-times"])
    }
    fn restore(&mut self, _out: &Path) -> Result<(M, f64)> {
        bail!("rsync keeps no points")
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let exe = std::env::current_exe()?;
    let bins = exe.parent().context("bin dir")?.to_owned();
    let size = ((a.size_gib * (1u64 << 30) as f64) as u64) / BLOCK * BLOCK;
    let work = tempfile::Builder::new()
        .prefix("rewind-compare.")
        .tempdir_in(&a.dir)?;
    let w = work.path();
    let base = w.join("base.raw");
    eprintln!("generating a {:.1} GiB mixed image ...", a.size_gib);
    disk::mixed(&base, size, 42);
    let image = w.join("disk.raw");
    let out = w.join("restored.raw");
    let blocks = size / BLOCK;
    let count = (blocks / 100) as usize;

    let mut tools: Vec<Box<dyn Tool>> = vec![Box::new(Rewind::start(&bins, &w.join("rewind"))?)];
    if have("restic") {
        tools.push(Box::new(Restic {
            repo: w.join("restic-repo"),
        }));
    } else {
        eprintln!("restic not installed: skipped");
    }
    if have("borg") {
        tools.push(Box::new(Borg {
            repo: w.join("borg-repo"),
            n: 0,
        }));
    } else {
        eprintln!("borg not installed: skipped");
    }
    if have("rsync") {
        tools.push(Box::new(Rsync::start(w)?));
    } else {
        eprintln!("rsync not installed: skipped");
    }

    let mut results: BTreeMap<(&'static str, &'static str), Sample> = BTreeMap::new();
    let mut push = |scenario: &'static str, tool: &'static str, m: &M, bytes: f64| {
        let s = results.entry((scenario, tool)).or_default();
        s.secs.push(m.secs);
        s.cpu.push(m.cpu);
        s.peak.push(m.peak_mib);
        s.bytes.push(bytes);
    };
    for run in 0..a.runs {
        eprintln!("run {} of {}", run + 1, a.runs);
        for t in tools.iter_mut() {
            if t.name() == "rewind" {
                // A fresh receiver and state each run: the seed is a real first copy.
                *t = Box::new(Rewind::start(&bins, &w.join("rewind"))?);
            }
            let o = Command::new("cp")
                .args(["--sparse=always"])
                .arg(&base)
                .arg(&image)
                .status()?;
            if !o.success() {
                bail!("cp failed");
            }
            let (m, b) = t.seed(&image)?;
            push("seed", t.name(), &m, b);
            disk::scatter_writes(&image, BLOCK, blocks, count, 1000 + run as u64);
            let (m, b) = t.incremental(&image)?;
            push("incremental 1%", t.name(), &m, b);
            let _ = std::fs::remove_file(&out);
            if let Ok((m, b)) = t.restore(&out) {
                push("restore", t.name(), &m, b);
            }
            let _ = std::fs::remove_file(&out);
        }
        // The durable reference too: a restore returns once its image is on the device.
        for (tool, durable) in [("cp --sparse", false), ("cp + sync", true)] {
            let m = measure(&mut benchkit::sparse_copy(&image, &out, durable))?;
            push("restore", tool, &m, disk::allocated(&out) as f64);
            let _ = std::fs::remove_file(&out);
        }
    }

    println!(
        "Rewind vs peers: {:.1} GiB mixed image ({} MiB allocated), {} runs, medians, loopback, {} cores",
        a.size_gib,
        disk::allocated(&base) >> 20,
        a.runs,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "{:<16} {:<12} {:>9} {:>8} {:>9} {:>9} {:>11}",
        "scenario", "tool", "seconds", "ratio", "CPU s", "peak MiB", "bytes MB"
    );
    for scenario in ["seed", "incremental 1%", "restore"] {
        let rewind = results
            .get(&(scenario, "rewind"))
            .map(|s| median(&s.secs))
            .unwrap_or(0.0);
        for ((sc, tool), s) in results.iter().filter(|((sc, _), _)| *sc == scenario) {
            let secs = median(&s.secs);
            println!(
                "{:<16} {:<12} {:>9.2} {:>8.2} {:>9.2} {:>9.0} {:>11.1}",
                sc,
                tool,
                secs,
                if rewind > 0.0 { secs / rewind } else { 0.0 },
                median(&s.cpu),
                median(&s.peak),
                median(&s.bytes) / 1e6
            );
        }
    }
    println!("ratio = tool time / Rewind time (above 1: Rewind is faster); Rewind CPU includes its receiver");
    Ok(())
}
