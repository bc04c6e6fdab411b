//! DR drills: a replicated disk with a real boot sector boots under SeaBIOS in an isolated
//! QEMU from the store (NBD export + throw-away overlay), with its RPO and RTO recorded; a
//! damaged chunk fails the drill naming the block; a disk that never shows the marker times
//! out; SIGTERM stops a drill; nothing is left behind and the store is never modified.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::disk::boot_sector;
use rewind_tests::{bin, disk, run, Deployment};
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;
const MARKER: &str = "REWIND-DRILL-OK";

fn drill(d: &Deployment, vm: &str, extra: &[&str], tmp: &Path) -> (Output, Value) {
    let o = run(Command::new(bin("rewind-receiver"))
        .args(["drill", "--json", "--vm", vm, "--data"])
        .arg(d.data())
        .args(extra)
        .env("TMPDIR", tmp));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        panic!(
            "drill printed no JSON: {} / {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o, v)
}

fn drills(d: &Deployment, vm: &str) -> Vec<Value> {
    let o = run(Command::new(bin("rewind-receiver"))
        .args(["drills", "--json", "--vm", vm, "--data"])
        .arg(d.data()));
    assert!(o.status.success());
    serde_json::from_slice::<Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn pack_digest(d: &Deployment) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(d.data().join("packs"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let h = blake3::hash(&std::fs::read(&p).unwrap())
                .to_hex()
                .to_string();
            (p.display().to_string(), h)
        })
        .collect();
    v.sort();
    v
}

fn qemu_running(vm: &str) -> bool {
    rewind_tests::qemu::drill_running(vm)
}

fn empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

#[test]
fn a_replicated_boot_disk_boots_and_the_drill_is_recorded() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 16 << 20);
    disk::write_at(&vda, 0, &boot_sector(MARKER));
    disk::random_blocks(&vda, BLOCK, 100, 50, &mut rand::rng());
    let p = d.sync_ok(&rx, "host1", "bootme", &[("vda", &vda)]);
    let point = p["point"].as_i64().unwrap();
    let before = pack_digest(&d);
    let tmp = d.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    let (o, v) = drill(
        &d,
        "bootme",
        &[
            "--boot",
            "--boot-timeout",
            "60",
            "--expect-serial",
            "DRILL-OK",
        ],
        &tmp,
    );
    assert!(o.status.success(), "{v}");
    assert_eq!(v["result"], "passed");
    assert_eq!(v["point"], point);
    assert_eq!(v["booted"], true);
    assert_eq!(v["blocks_verified"], 51);
    assert_eq!(v["bytes_verified"], 51 * BLOCK);
    assert_eq!(v["damaged_blocks"], 0);
    assert!(v["serial_tail"].as_str().unwrap().contains(MARKER), "{v}");
    let age = v["point_age_seconds"].as_f64().unwrap();
    let verified = v["verified_seconds"].as_f64().unwrap();
    let boot = v["boot_seconds"].as_f64().unwrap();
    let rto = v["rto_seconds"].as_f64().unwrap();
    assert!((0.0..600.0).contains(&age), "{v}");
    assert!(verified > 0.0 && boot > 0.0, "{v}");
    assert!(rto >= verified + boot - 0.5 && rto >= boot, "{v}");
    assert!(["kvm", "tcg"].contains(&v["accel"].as_str().unwrap()));

    // Without --expect-serial, the first console output is the marker; --accel picks QEMU's
    // accelerator (nested KVM can be present and far slower than TCG).
    let (o, v2) = drill(
        &d,
        "bootme",
        &["--boot", "--boot-timeout", "60", "--accel", "tcg"],
        &tmp,
    );
    assert!(o.status.success(), "{v2}");
    assert_eq!(v2["accel"], "tcg", "{v2}");

    // Recorded, in order; the store is unchanged; nothing left behind.
    let h = drills(&d, "bootme");
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["id"], v["id"]);
    assert_eq!(h[0]["rto_seconds"], v["rto_seconds"]);
    assert_eq!(h[1]["result"], "passed");
    assert_eq!(pack_digest(&d), before);
    assert!(empty_dir(&tmp), "the overlay and socket are removed");
    assert!(!qemu_running("bootme"));
    drop(rx);
}

#[test]
fn a_damaged_chunk_fails_the_drill_naming_the_block() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 16 << 20);
    disk::write_at(&vda, 0, &boot_sector(MARKER));
    disk::random_blocks(&vda, BLOCK, 10, 20, &mut rand::rng());
    d.sync_ok(&rx, "host1", "dmg", &[("vda", &vda)]);
    drop(rx);

    // The chunk of block 17, found through the catalog; one byte in the middle of its frame.
    let mut block = vec![0u8; BLOCK as usize];
    std::fs::File::open(&vda)
        .unwrap()
        .read_exact_at(&mut block, 17 * BLOCK)
        .unwrap();
    let hash = blake3::hash(&block);
    let conn = rusqlite::Connection::open(d.data().join("catalog.sqlite")).unwrap();
    let (pack, offset, clen): (i64, i64, i64) = conn
        .query_row(
            "SELECT pack_id, offset, clen FROM chunks WHERE hash = ?1",
            [&hash.as_bytes()[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    drop(conn);
    let path = d.data().join("packs").join(format!("{pack:016x}.pack"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = (offset + clen / 2) as u64;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    drop(f);
    let before = pack_digest(&d);

    let tmp = d.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let (o, v) = drill(&d, "dmg", &["--boot"], &tmp);
    assert!(!o.status.success(), "{v}");
    assert_eq!(v["result"], "failed");
    assert_eq!(v["damaged_blocks"], 1, "{v}");
    assert_eq!(v["damaged"][0]["disk"], "vda");
    assert_eq!(v["damaged"][0]["block"], 17);
    assert_eq!(v["damaged"][0]["hash"], hash.to_hex().as_str());
    assert!(v["booted"].is_null(), "a damaged point is not booted");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("vda block 17"), "{reason}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("vda block 17"), "{err}");
    assert_eq!(drills(&d, "dmg")[0]["result"], "failed");
    assert_eq!(pack_digest(&d), before, "a drill never repairs or rewrites");

    // The receiver's status shows the VM failing, and exits non-zero for it.
    let st = run(Command::new(bin("rewind-receiver"))
        .args(["status", "--json", "--data"])
        .arg(d.data()));
    assert!(!st.status.success());
    let line: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(line["state"], "failing", "{line}");
    assert!(
        line["why"].as_str().unwrap().contains("last drill failed"),
        "{line}"
    );
    assert!(String::from_utf8_lossy(&st.stderr).contains("dmg"));
}

#[test]
fn no_marker_times_out_and_sigterm_stops_a_drill() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 16 << 20);
    // No boot sector: SeaBIOS finds nothing to boot and the console stays silent.
    disk::random_blocks(&vda, BLOCK, 10, 4, &mut rand::rng());
    d.sync_ok(&rx, "host1", "silent", &[("vda", &vda)]);
    drop(rx);
    let tmp = d.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    let started = Instant::now();
    let (o, v) = drill(
        &d,
        "silent",
        &["--boot", "--boot-timeout", "3", "--expect-serial", "login:"],
        &tmp,
    );
    assert!(!o.status.success());
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(v["booted"], false);
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("boot timed out after 3 s"), "{reason}");
    assert!(reason.contains("\"login:\" did not appear"), "{reason}");
    assert!(empty_dir(&tmp));
    assert!(!qemu_running("silent"));

    // SIGTERM while QEMU waits for a marker that never comes.
    let child = Command::new(bin("rewind-receiver"))
        .args([
            "drill",
            "--json",
            "--vm",
            "silent",
            "--boot",
            "--boot-timeout",
            "300",
            "--data",
        ])
        .arg(d.data())
        .env("TMPDIR", &tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(rewind_tests::wait_until(Duration::from_secs(30), || {
        qemu_running("silent")
    }));
    let stopped = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(10));
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["reason"].as_str().unwrap().contains("cancelled"), "{v}");
    assert!(!qemu_running("silent"));
    assert!(empty_dir(&tmp));
    assert_eq!(drills(&d, "silent").len(), 2);
}

#[test]
fn qemu_dies_with_a_killed_drill() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 4 << 20);
    disk::random_blocks(&vda, BLOCK, 3, 2, &mut rand::rng());
    d.sync_ok(&rx, "host1", "orphan", &[("vda", &vda)]);
    drop(rx);
    let mut child = Command::new(bin("rewind-receiver"))
        .args([
            "drill",
            "--vm",
            "orphan",
            "--boot",
            "--boot-timeout",
            "300",
            "--data",
        ])
        .arg(d.data())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(rewind_tests::wait_until(Duration::from_secs(30), || {
        qemu_running("orphan")
    }));
    child.kill().unwrap(); // SIGKILL: no cleanup code runs
    child.wait().unwrap();
    assert!(
        rewind_tests::wait_until(Duration::from_secs(10), || !qemu_running("orphan")),
        "QEMU outlived its drill"
    );
}

#[test]
fn an_encrypted_point_boots_with_its_key_and_not_without() {
    let d = Deployment::new();
    let rx = d.serve();
    let pass = d.path("k.pass");
    std::fs::write(&pass, "drill key\n").unwrap();
    let key = d.path("k.key");
    let o = run(Command::new(bin("rewind-agent"))
        .args(["key", "generate", "--kdf-mib", "8", "--out"])
        .arg(&key)
        .arg("--passphrase-file")
        .arg(&pass));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (key, pass) = (key.to_str().unwrap(), pass.to_str().unwrap());
    let vda = d.path("vda.raw");
    disk::create(&vda, 16 << 20);
    disk::write_at(&vda, 0, &boot_sector(MARKER));
    disk::random_blocks(&vda, BLOCK, 100, 20, &mut rand::rng());
    let o = d.sync(
        &rx,
        "host1",
        "encboot",
        &[("vda", &vda)],
        &["--encryption-key", key, "--passphrase-file", pass],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tmp = d.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let boot = [
        "--boot",
        "--boot-timeout",
        "60",
        "--expect-serial",
        "DRILL-OK",
    ];

    // Without the key a boot drill cannot read the disk: it fails, saying why.
    let (o, v) = drill(&d, "encboot", &boot, &tmp);
    assert!(!o.status.success(), "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("is encrypted"),
        "{v}"
    );
    assert_ne!(v["booted"], true);

    // With it: every block decrypted and checked, then the guest boots from the store.
    let mut with_key = boot.to_vec();
    with_key.extend(["--encryption-key", key, "--passphrase-file", pass]);
    let (o, v) = drill(&d, "encboot", &with_key, &tmp);
    assert!(o.status.success(), "{v}");
    assert_eq!(v["booted"], true);
    assert_eq!(v["blocks_verified"], 21);
    assert!(v["checked"].as_str().unwrap().starts_with("content"), "{v}");
    assert!(v["serial_tail"].as_str().unwrap().contains(MARKER), "{v}");
    assert!(empty_dir(&tmp));
    assert!(!qemu_running("encboot"));
    drop(rx);
}
