//! Keys people can keep: a write-only agent adds points (seed, incrementals, a resume after
//! SIGKILL, a heal) that only the recovery key reads; rotating an agent's data key and the
//! recovery key re-reads and re-sends no disk and leaves every point readable; an encrypted
//! VM's second offsite copy holds only ciphertext and restores with the key.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, disk_of, run, wait_until, Deployment, Receiver};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

fn agent_key(args: &[&str]) -> Value {
    let o = run(Command::new(bin("rewind-agent"))
        .arg("key")
        .args(args)
        .args(["--json", "--kdf-mib", "8"]));
    assert!(o.status.success(), "key {args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `key generate --recovery`: a recovery key at `out` under passphrase file `pass`.
fn recovery_key(out: &Path, pass: &Path) -> Value {
    agent_key(&[
        "generate",
        "--recovery",
        "--out",
        s(out),
        "--passphrase-file",
        s(pass),
    ])
}

/// `key generate`: a keyring at `out` under passphrase file `pass`, its data keys wrapped to
/// recovery key `wrap_to` when given.
fn keyring(out: &Path, pass: &Path, wrap_to: Option<&Path>) -> Value {
    let mut args = vec!["generate", "--out", s(out), "--passphrase-file", s(pass)];
    if let Some(r) = wrap_to {
        args.extend(["--wrap-to", s(r)]);
    }
    agent_key(&args)
}

/// A passphrase file.
fn pass(d: &Deployment, name: &str) -> PathBuf {
    let p = d.path(&format!("{name}.pass"));
    std::fs::write(&p, format!("passphrase {name}\n")).unwrap();
    p
}

fn sync(d: &Deployment, rx: &Receiver, vm: &str, vda: &Path, extra: &[&str]) -> Value {
    rewind_tests::sync_report(&d.sync(rx, "host1", vm, &[("vda", vda)], extra))
}

/// `restore` of `vm`'s point to a fresh file with `extra` flags; the digest, or the error.
fn restore(d: &Deployment, vm: &str, point: u64, extra: &[&str]) -> Result<disk::Digest, String> {
    let out = d.path(&format!("r-{vm}-{point}-{}.raw", rand::random::<u32>()));
    let point = point.to_string();
    let select: Vec<&str> = ["--point", point.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let o = d.restore(vm, "vda", &select, &out);
    if !o.status.success() {
        return Err(stderr(&o));
    }
    let digest = disk::digest(&out);
    std::fs::remove_file(&out).unwrap();
    Ok(digest)
}

#[test]
fn a_write_only_agent_adds_points_only_the_recovery_key_reads() {
    let d = Deployment::new();
    let rx = d.serve();
    let (kp, rp) = (pass(&d, "k"), pass(&d, "r"));
    let (k, r, w) = (d.path("k.key"), d.path("r.key"), d.path("w.key"));
    keyring(&k, &kp, None);
    let rec = recovery_key(&r, &rp);
    let wo = agent_key(&[
        "write-only",
        "--key",
        s(&k),
        "--passphrase-file",
        s(&kp),
        "--recovery",
        s(&r),
        "--out",
        s(&w),
        "--no-passphrase",
    ]);
    assert_eq!(wo["kind"], "write-only");
    let write_only = ["--encryption-key", s(&w)];
    let recovery = ["--recovery-key", s(&r), "--passphrase-file", s(&rp)];

    let vda = d.path("vda.raw");
    disk::create(&vda, 64 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 32, &mut rand::rng());
    // The VM is seeded with the full keyring; the write-only agent takes over from there, and
    // its points reuse the chunks the full keyring sealed.
    let full = ["--encryption-key", s(&k), "--passphrase-file", s(&kp)];
    let p1 = sync(&d, &rx, "wo", &vda, &full)["point"].as_u64().unwrap();
    let first = disk::digest(&vda);
    disk::random_blocks(&vda, BLOCK, 40, 3, &mut rand::rng());
    let r2 = sync(&d, &rx, "wo", &vda, &write_only);
    assert_eq!(disk_of(&r2, "vda")["changed_blocks"], 3);
    assert_eq!(disk_of(&r2, "vda")["sent_chunks"], 3);
    let p2 = r2["point"].as_u64().unwrap();
    // Until a session re-seals one of them, the seed's chunks are the full key file's to read.
    assert_eq!(restore(&d, "wo", p1, &full).unwrap(), first);
    let second = disk::digest(&vda);

    // A large change, the agent SIGKILLed part way: the next run resumes the session with a
    // new data key, and sends only what was not stored.
    disk::random_blocks(&vda, BLOCK, 100, 640, &mut rand::rng());
    let base = d.pack_bytes();
    let mut cmd = d.sync_cmd(&rx, "host1", "wo", &[("vda", &vda)], &write_only);
    let mut agent = cmd
        .args(["--bwlimit", "8"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || d.pack_bytes() > base + 12 * MIB),
        "the upload never got going"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    let r3 = sync(&d, &rx, "wo", &vda, &write_only);
    assert_eq!(r3["resumed"], true, "{r3}");
    assert!(
        r3["sent_bytes"].as_u64().unwrap() < 640 * BLOCK - 6 * MIB,
        "{r3}"
    );
    let p3 = r3["point"].as_u64().unwrap();
    let third = disk::digest(&vda);

    // A flipped byte: verify (no key) finds it, the write-only agent heals it.
    d.flip_pack_byte(0x80);
    let verify = || {
        run(Command::new(bin("rewind-receiver"))
            .args(["verify", "--data"])
            .arg(d.data()))
    };
    assert!(!verify().status.success());
    let healed = sync(&d, &rx, "wo", &vda, &write_only);
    assert_eq!(disk_of(&healed, "vda")["healed_blocks"], 1);
    assert!(verify().status.success());

    // The write-only key reads nothing; the keyring's own key file does not read what the
    // sessions sealed (the heal above re-sealed one of the seed's chunks too); the recovery
    // key reads every point, the seed's chunks included (through the keyring's data key the
    // write-only file carries).
    let e = restore(&d, "wo", p1, &write_only).unwrap_err();
    assert!(e.contains("write-only"), "{e}");
    let e = restore(&d, "wo", p2, &full).unwrap_err();
    assert!(e.contains("which this key file does not hold"), "{e}");
    for (p, want) in [(p1, &first), (p2, &second), (p3, &third)] {
        assert_eq!(&restore(&d, "wo", p, &recovery).unwrap(), want, "point {p}");
    }
    // The operator can pin the keyring a recovery key reads.
    let kid = d.points("wo")[0]["encrypted"]["keyring"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut pinned = recovery.to_vec();
    pinned.extend(["--keyring", kid.as_str()]);
    assert_eq!(restore(&d, "wo", p3, &pinned).unwrap(), third);
    let other = "00".repeat(16);
    let mut pinned = recovery.to_vec();
    pinned.extend(["--keyring", other.as_str()]);
    let e = restore(&d, "wo", p3, &pinned).unwrap_err();
    assert!(e.contains("not the keyring given"), "{e}");
    // One wrapped key per session the write-only agent began (three syncs and the killed
    // one), and the keyring's data key it carries.
    let o = run(Command::new(bin("rewind-receiver"))
        .args(["keys", "--json", "--data"])
        .arg(d.data()));
    assert!(o.status.success(), "{}", stderr(&o));
    let keys: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(keys[0]["keys"], 5, "{keys}");
    assert_eq!(keys[0]["recovery"], rec["id"]);

    // Rollback: refused with the write-only key, exact with the recovery key.
    let rollback = |extra: &[&str]| {
        run(d
            .agent_cmd(&rx, "host1", "rollback")
            .args(["--json", "--vm", "wo", "--point", &p2.to_string(), "--disk"])
            .arg(format!("vda={}", vda.display()))
            .args(extra))
    };
    let o = rollback(&write_only);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs the recovery key"),
        "{}",
        stderr(&o)
    );
    let o = rollback(&[
        "--recovery-key",
        s(&r),
        "--recovery-passphrase-file",
        s(&rp),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(disk::digest(&vda), second);
}

#[test]
fn rotating_keys_moves_no_disk_data_and_keeps_every_point_readable() {
    let d = Deployment::new();
    let rx = d.serve();
    let (kp, rp) = (pass(&d, "k"), pass(&d, "r"));
    let (k1, r1, r2) = (d.path("k1.key"), d.path("r1.key"), d.path("r2.key"));
    recovery_key(&r1, &rp);
    recovery_key(&r2, &rp);
    keyring(&k1, &kp, Some(&r1));
    let key1 = ["--encryption-key", s(&k1), "--passphrase-file", s(&kp)];
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 40, &mut rand::rng());
    let p1 = sync(&d, &rx, "rot", &vda, &key1)["point"].as_u64().unwrap();
    let first = disk::digest(&vda);

    // A new data key for the agent: the unchanged disk sends nothing, a change sends only
    // its blocks.
    let k2 = d.path("k2.key");
    agent_key(&[
        "rotate",
        "--key",
        s(&k1),
        "--passphrase-file",
        s(&kp),
        "--out",
        s(&k2),
    ]);
    let key2 = ["--encryption-key", s(&k2), "--passphrase-file", s(&kp)];
    let same = sync(&d, &rx, "rot", &vda, &key2);
    assert_eq!(same["sent_bytes"], 0);
    disk::random_blocks(&vda, BLOCK, 50, 2, &mut rand::rng());
    let r = sync(&d, &rx, "rot", &vda, &key2);
    assert_eq!(disk_of(&r, "vda")["sent_chunks"], 2);
    let p2 = r["point"].as_u64().unwrap();
    let second = disk::digest(&vda);
    // The new file reads old and new points; the old file only what was sealed before.
    assert_eq!(restore(&d, "rot", p1, &key2).unwrap(), first);
    assert_eq!(restore(&d, "rot", p2, &key2).unwrap(), second);
    assert_eq!(restore(&d, "rot", p1, &key1).unwrap(), first);
    let e = restore(&d, "rot", p2, &key1).unwrap_err();
    assert!(e.contains("which this key file does not hold"), "{e}");

    // The recovery key reads both; rewrapped to a new recovery key, the new one reads both
    // and the old one none. Nothing is re-read: the packs are untouched.
    let rec1 = ["--recovery-key", s(&r1), "--passphrase-file", s(&rp)];
    let rec2 = ["--recovery-key", s(&r2), "--passphrase-file", s(&rp)];
    assert_eq!(restore(&d, "rot", p2, &rec1).unwrap(), second);
    let packs_before = d.pack_bytes();
    let o = run(Command::new(bin("rewind-receiver"))
        .args(["keys", "rewrap", "--json", "--data"])
        .arg(d.data())
        .args([
            "--recovery-key",
            s(&r1),
            "--passphrase-file",
            s(&rp),
            "--to",
            s(&r2),
        ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["rewrapped"], 2, "{v}");
    assert_eq!(d.pack_bytes(), packs_before);
    assert_eq!(restore(&d, "rot", p1, &rec2).unwrap(), first);
    assert_eq!(restore(&d, "rot", p2, &rec2).unwrap(), second);
    let e = restore(&d, "rot", p1, &rec1).unwrap_err();
    assert!(e.contains("wrapped to recovery key"), "{e}");
}

#[test]
fn an_encrypted_vms_copy_holds_ciphertext_and_restores_with_the_key() {
    let d = Deployment::new();
    let rx = d.serve();
    let (kp, rp) = (pass(&d, "k"), pass(&d, "r"));
    let (k, r) = (d.path("k.key"), d.path("r.key"));
    recovery_key(&r, &rp);
    keyring(&k, &kp, Some(&r));
    let key = ["--encryption-key", s(&k), "--passphrase-file", s(&kp)];
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 24, &mut rand::rng());
    let p = sync(&d, &rx, "cp", &vda, &key)["point"].as_u64().unwrap();
    let want = disk::digest(&vda);

    let o = run(Command::new(bin("rewind-receiver"))
        .args(["pki", "issue", "--replica", "--agent", "copy1", "--dir"])
        .arg(d.pki()));
    assert!(o.status.success(), "{}", stderr(&o));
    let copy = Deployment::new();
    let config = copy.path("copy.toml");
    let pki = d.pki();
    std::fs::write(
        &config,
        format!(
            "[copy]\nfrom = \"https://{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nevery = 1\n",
            rx.addr(),
            pki.join("ca.pem").display(),
            pki.join("copy1.pem").display(),
            pki.join("copy1.key").display()
        ),
    )
    .unwrap();
    let crx = Receiver::start_with(&copy.data(), &copy.pki(), &["--config", s(&config)]);
    assert!(
        wait_until(Duration::from_secs(120), || copy
            .try_points("cp")
            .is_ok_and(|p| p.len() == 1)),
        "the copy never took the point"
    );
    drop(crx);
    let points = copy.points("cp");
    assert_eq!(points[0]["encrypted"], d.points("cp")[0]["encrypted"]);
    let cp = points[0]["id"].as_u64().unwrap();
    let e = restore(&copy, "cp", cp, &[]).unwrap_err();
    assert!(e.contains("is encrypted"), "{e}");
    // The key's MAC check passes on the copy (same manifest); so does the recovery key.
    assert_eq!(restore(&copy, "cp", cp, &key).unwrap(), want);
    assert_eq!(
        restore(
            &copy,
            "cp",
            cp,
            &["--recovery-key", s(&r), "--passphrase-file", s(&rp)]
        )
        .unwrap(),
        want
    );
    assert_eq!(restore(&d, "cp", p, &key).unwrap(), want);
}

#[test]
fn gc_forgets_the_wrapped_keys_no_stored_chunk_uses() {
    let d = Deployment::new();
    let rx = d.serve();
    let (kp, rp) = (pass(&d, "k"), pass(&d, "r"));
    let (k, r, w) = (d.path("k.key"), d.path("r.key"), d.path("w.key"));
    keyring(&k, &kp, None);
    recovery_key(&r, &rp);
    agent_key(&[
        "write-only",
        "--key",
        s(&k),
        "--passphrase-file",
        s(&kp),
        "--recovery",
        s(&r),
        "--out",
        s(&w),
        "--no-passphrase",
    ]);
    let write_only = ["--encryption-key", s(&w)];
    let recovery = ["--recovery-key", s(&r), "--passphrase-file", s(&rp)];
    let keys = || {
        let o = run(Command::new(bin("rewind-receiver"))
            .args(["keys", "--json", "--data"])
            .arg(d.data()));
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v[0]["keys"].as_u64().unwrap_or(0)
    };
    // Three points, each rewriting the same 4 blocks: each session seals its own chunks
    // under its own data key.
    let vda = d.path("vda.raw");
    disk::create(&vda, 2 * MIB);
    let mut last = 0;
    for _ in 0..3 {
        disk::random_blocks(&vda, BLOCK, 0, 4, &mut rand::rng());
        let r = sync(&d, &rx, "gck", &vda, &write_only);
        assert_eq!(disk_of(&r, "vda")["sent_chunks"], 4);
        last = r["point"].as_u64().unwrap();
    }
    // Three session keys and the carried one.
    assert_eq!(keys(), 4);
    let o = run(Command::new(bin("rewind-receiver"))
        .args(["prune", "--vm", "gck", "--keep-last", "1", "--data"])
        .arg(d.data()));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(Command::new(bin("rewind-receiver"))
        .args(["gc", "--grace", "0", "--json", "--data"])
        .arg(d.data()));
    assert!(o.status.success(), "{}", stderr(&o));
    let g: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(g["chunks_removed"], 8, "{g}");
    // Only the newest session's key seals a stored chunk now.
    assert_eq!(g["wrapped_keys_dropped"], 3, "{g}");
    assert_eq!(keys(), 1);
    assert_eq!(
        restore(&d, "gck", last, &recovery).unwrap(),
        disk::digest(&vda)
    );
    // The next session sends its keys again (the carried one among them).
    sync(&d, &rx, "gck", &vda, &write_only);
    assert_eq!(keys(), 3);
}
