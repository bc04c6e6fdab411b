//! `rewind-crypt-bench`: client-side encryption next to plain replication, in one run on one
//! mixed image: seed, 1% incremental and restore, plain and encrypted (XChaCha20-Poly1305,
//! keyed blake3 ids), each case on a fresh receiver, in alternation, `--runs` times; prints
//! the medians and the ratios plain time / encrypted time (target: at least 0.9x in each).
//!
//! The key file is bare (no passphrase), so the timings hold the cipher's cost and not
//! argon2id's: unlocking a passphrase-protected key costs the same fixed time (printed) once
//! per command. Run on release binaries:
//! `cargo build --release --workspace --bins && target/release/rewind-crypt-bench --size-gib 4`.

use anyhow::{bail, Result};
use clap::Parser;
use rewind_tests::benchkit::{self, spawn_receiver, timed};
use rewind_tests::disk;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// Encrypted against plain replication on this machine.
#[derive(Debug, Parser)]
struct Args {
    /// Size of the generated mixed disk image, in GiB.
    #[arg(long, default_value_t = 4.0)]
    size_gib: f64,
    /// Share of blocks rewritten before the incremental point, in percent.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Runs of each case (medians are printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Folder for the image, the stores and the restores (needs ~4x the image size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
}

const BLOCK: u64 = 64 * 1024;
const GIB: f64 = (1u64 << 30) as f64;

/// One case's times: seed, incremental, restore.
type Times = (f64, f64, f64);

/// Seed, incremental and restore on a fresh receiver and agent state, with `key` flags.
fn case(bins: &Path, w: &Path, image: &Path, changed: usize, key: &[String]) -> Result<Times> {
    let data = w.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(w.join("state"));
    let vda = w.join("vda.raw");
    if !benchkit::sparse_copy(image, &vda, false)
        .status()?
        .success()
    {
        bail!("copying the image");
    }
    let (mut rx, addr) = spawn_receiver(
        Command::new(bins.join("rewind-receiver")),
        &data,
        &w.join("pki"),
        "127.0.0.1:0",
    )?;
    let mut flags = vec!["--disk".to_owned(), format!("vda={}", vda.display())];
    flags.extend(key.iter().cloned());
    let run = || -> Result<Times> {
        let (seed, _) = timed(&mut benchkit::agent_sync(bins, w, &addr, "bench", &flags))?;
        let blocks = std::fs::metadata(&vda)?.len() / BLOCK;
        disk::scatter_writes(&vda, BLOCK, blocks, changed, 7);
        let want = disk::digest(&vda);
        let (incr, out) = timed(&mut benchkit::agent_sync(bins, w, &addr, "bench", &flags))?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let restored = w.join("restored.raw");
        let (restore, _) = timed(
            Command::new(bins.join("rewind-receiver"))
                .args(["restore", "--vm", "bench", "--disk", "vda", "--point"])
                .arg(v["point"].to_string())
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&restored)
                .args(key)
                .env("REWIND_LOG", "warn"),
        )?;
        if disk::digest(&restored) != want {
            bail!("the restore differs from the source");
        }
        std::fs::remove_file(&restored)?;
        Ok((seed, incr, restore))
    };
    let r = run();
    let _ = rx.kill();
    let _ = rx.wait();
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Whether the CPU has AES instructions (XChaCha20-Poly1305 does not use them; AES-GCM would)
/// and AVX2 (which the chacha20 and poly1305 crates use when present).
fn cpu_flags() -> (bool, bool) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("")
        .to_owned();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    (has("aes"), has("avx2"))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let bins = benchkit::bin_dir()?;
    std::fs::create_dir_all(&a.dir)?;
    let work = tempfile::Builder::new()
        .prefix("rewind-crypt-bench")
        .tempdir_in(&a.dir)?;
    let w = work.path();
    let pki = w.join("pki");
    benchkit::pki(&bins, &pki)?;
    let key = w.join("bench.key");
    timed(
        Command::new(bins.join("rewind-agent"))
            .args(["key", "generate", "--no-passphrase", "--out"])
            .arg(&key),
    )?;
    // What a passphrase costs: `key rotate` opens a protected key and writes the new one
    // (argon2id, 64 MiB, 3 passes, twice).
    let locked = w.join("locked.key");
    let pass = w.join("pass");
    std::fs::write(&pass, "bench passphrase\n")?;
    timed(
        Command::new(bins.join("rewind-agent"))
            .args(["key", "generate", "--out"])
            .arg(&locked)
            .arg("--passphrase-file")
            .arg(&pass),
    )?;
    let (unlock, _) = timed(
        Command::new(bins.join("rewind-agent"))
            .args(["key", "rotate", "--key"])
            .arg(&locked)
            .arg("--passphrase-file")
            .arg(&pass)
            .arg("--out")
            .arg(w.join("rotated.key")),
    )?;

    let size = (a.size_gib * GIB) as u64 / BLOCK * BLOCK;
    eprintln!("generating a {:.1} GiB mixed image ...", size as f64 / GIB);
    let image = w.join("image.raw");
    disk::mixed(&image, size, 1);
    let changed = ((size / BLOCK) as f64 * a.change_percent / 100.0) as usize;
    let sealed = vec!["--encryption-key".to_owned(), key.display().to_string()];
    let (mut plain, mut enc) = (Vec::new(), Vec::new());
    for run in 0..a.runs {
        eprintln!("run {} of {}: plain, then encrypted ...", run + 1, a.runs);
        plain.push(case(&bins, w, &image, changed, &[])?);
        enc.push(case(&bins, w, &image, changed, &sealed)?);
    }
    let (aes, avx2) = cpu_flags();
    let mb = size as f64 / 1e6;
    println!(
        "encrypted vs plain, {:.1} GiB mixed image, {} runs (medians); cipher XChaCha20-Poly1305 \
         (RustCrypto chacha20poly1305), ids keyed blake3; CPU AES instructions: {}, AVX2: {}",
        size as f64 / GIB,
        a.runs,
        if aes {
            "yes (unused by this cipher)"
        } else {
            "no"
        },
        if avx2 { "yes" } else { "no" }
    );
    println!(
        "{:<20} {:>10} {:>12} {:>8} {:>10}",
        "phase", "plain s", "encrypted s", "ratio", "target"
    );
    let mut out = json!({"image_gib": size as f64 / GIB, "runs": a.runs, "cipher": "XChaCha20-Poly1305",
        "cpu_aes": aes, "cpu_avx2": avx2, "unlock_passphrase_key_secs": unlock});
    for (i, name) in ["seed", "incremental (1%)", "restore"].iter().enumerate() {
        let pick = |v: &[Times]| median(v.iter().map(|t| [t.0, t.1, t.2][i]).collect());
        let (p, e) = (pick(&plain), pick(&enc));
        println!(
            "{name:<20} {p:>10.2} {e:>12.2} {:>7.2}x {:>10}",
            p / e,
            ">= 0.9x"
        );
        out[*name] = json!({"plain_secs": p, "encrypted_secs": e, "ratio": p / e,
            "plain_mb_per_sec": mb / p, "encrypted_mb_per_sec": mb / e});
    }
    println!(
        "a passphrase-protected key: opened and rewritten (two argon2id runs, 64 MiB, 3 passes) \
         in {unlock:.2} s; a command that opens one pays half of that"
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
