//! Client-side encryption end to end: the receiver stores only ciphertext under keyed ids,
//! needs no key to accept, verify or heal, and hands out plaintext only with the right key
//! (restores in every format, NBD export, drills, the agent's rollback) after checking each
//! point's manifest MAC; dedup works within a keyring and never across keyrings.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, disk_of, run, Deployment, Receiver};
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;
const MARKER: &[u8] = b"REWIND-PLAINTEXT-MARKER-7f3a9c";

/// `rewind-agent key generate` with a passphrase file (argon2id at 8 MiB to keep tests quick);
/// returns (key file, passphrase file).
fn key(d: &Deployment, name: &str) -> (PathBuf, PathBuf) {
    let pass = d.path(&format!("{name}.pass"));
    std::fs::write(&pass, format!("passphrase of {name}\n")).unwrap();
    let file = d.path(&format!("{name}.key"));
    let o = run(Command::new(bin("rewind-agent"))
        .args(["key", "generate", "--json", "--kdf-mib", "8", "--out"])
        .arg(&file)
        .arg("--passphrase-file")
        .arg(&pass));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["passphrase"], true);
    (file, pass)
}

fn key_flags(k: &(PathBuf, PathBuf)) -> Vec<String> {
    vec![
        "--encryption-key".into(),
        k.0.display().to_string(),
        "--passphrase-file".into(),
        k.1.display().to_string(),
    ]
}

fn sync(
    d: &Deployment,
    rx: &Receiver,
    vm: &str,
    vda: &Path,
    k: Option<&(PathBuf, PathBuf)>,
) -> Output {
    let flags = k.map(key_flags).unwrap_or_default();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    d.sync(rx, "host1", vm, &[("vda", vda)], &flags)
}

fn sync_ok(d: &Deployment, rx: &Receiver, vm: &str, vda: &Path, k: &(PathBuf, PathBuf)) -> Value {
    rewind_tests::sync_report(&sync(d, rx, vm, vda, Some(k)))
}

/// `restore` of `vm`'s point to `out` with `extra` flags (key, format).
fn restore(d: &Deployment, vm: &str, point: u64, out: &Path, extra: &[String]) -> Output {
    let point = point.to_string();
    let select: Vec<&str> = ["--point", point.as_str()]
        .into_iter()
        .chain(extra.iter().map(String::as_str))
        .collect();
    d.restore(vm, "vda", &select, out)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir` (catalog, WAL, packs, staging).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn holds(file: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(file).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// A disk of 64 blocks: the marker repeated through 32 of them (compressible, as real text
/// is), random data in 16 more.
fn marked_disk(path: &Path) {
    disk::create(path, 8 * MIB);
    let mut block = Vec::with_capacity(BLOCK as usize);
    while block.len() < BLOCK as usize {
        block.extend_from_slice(MARKER);
        block.push(b' ');
    }
    block.truncate(BLOCK as usize);
    for i in 0..32u64 {
        block[0] = i as u8; // distinct blocks, each full of the marker
        disk::write_at(path, (i * 2) * BLOCK, &block);
    }
    disk::random_blocks(path, BLOCK, 80, 16, &mut rand::rng());
}

#[test]
fn the_store_holds_only_ciphertext_and_restores_need_the_key() {
    let d = Deployment::new();
    let rx = d.serve();
    let k = key(&d, "k1");
    let vda = d.path("vda.raw");
    marked_disk(&vda);
    let r1 = sync_ok(&d, &rx, "enc", &vda, &k);
    let p1 = r1["point"].as_u64().unwrap();
    assert_eq!(disk_of(&r1, "vda")["sent_chunks"], 48);
    let first = disk::digest(&vda);
    // An incremental: exactly the changed blocks travel.
    disk::random_blocks(&vda, BLOCK, 100, 3, &mut rand::rng());
    let r2 = sync_ok(&d, &rx, "enc", &vda, &k);
    let p2 = r2["point"].as_u64().unwrap();
    assert_eq!(disk_of(&r2, "vda")["changed_blocks"], 3);
    assert_eq!(disk_of(&r2, "vda")["sent_chunks"], 3);
    let second = disk::digest(&vda);
    drop(rx);

    // No file under the data folder holds the marker, nor a block's plain blake3 (its name
    // on a plain receiver): neither content nor a guess of it can be confirmed there.
    let mut block = vec![0u8; BLOCK as usize];
    std::fs::File::open(&vda)
        .unwrap()
        .read_exact_at(&mut block, 0)
        .unwrap();
    let plain_id = blake3::hash(&block);
    let all = files(&d.data());
    assert!(all.len() >= 2, "{all:?}");
    for f in &all {
        assert!(!holds(f, MARKER), "{} holds plaintext", f.display());
        assert!(
            !holds(f, plain_id.as_bytes()),
            "{} holds a plain id",
            f.display()
        );
    }

    // The listing says it is encrypted, with which keyring.
    let points = d.points("enc");
    let keyring = points[0]["encrypted"]["keyring"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(keyring.len(), 32);
    // The VM's configuration (here the disk's path on the host) is sealed too.
    let config = points[0]["config"].as_object().unwrap();
    assert_eq!(config.keys().collect::<Vec<_>>(), ["sealed"], "{config:?}");
    for f in &all {
        assert!(
            !holds(f, b"vda.raw"),
            "{} holds the disk's path",
            f.display()
        );
    }
    // `restore --all` with the key writes the configuration in the clear.
    let dir = d.path("all");
    let o = run(Command::new(bin("rewind-receiver"))
        .args(["restore", "--all", "--data"])
        .arg(d.data())
        .args(["--vm", "enc", "--point", &p1.to_string(), "--out-dir"])
        .arg(&dir)
        .args(key_flags(&k)));
    assert!(o.status.success(), "{}", stderr(&o));
    let point: Value =
        serde_json::from_slice(&std::fs::read(dir.join("point.json")).unwrap()).unwrap();
    assert_eq!(point["config"]["source"], "files", "{point}");
    assert_eq!(disk::digest(&dir.join("vda.raw")), first);

    // Without a key, with another keyring's key, with a wrong passphrase: refused, nothing
    // written.
    let out = d.path("out.raw");
    let o = restore(&d, "enc", p1, &out, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is encrypted") && stderr(&o).contains("--encryption-key"),
        "{}",
        stderr(&o)
    );
    let other = key(&d, "k2");
    let o = restore(&d, "enc", p1, &out, &key_flags(&other));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("encrypted with keyring {keyring}")),
        "{}",
        stderr(&o)
    );
    let wrong = d.path("wrong.pass");
    std::fs::write(&wrong, "not it\n").unwrap();
    let o = restore(
        &d,
        "enc",
        p1,
        &out,
        &[
            "--encryption-key".into(),
            k.0.display().to_string(),
            "--passphrase-file".into(),
            wrong.display().to_string(),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("wrong passphrase"), "{}", stderr(&o));
    assert!(!out.exists());

    // With the key: bit-exact, both points, raw and qcow2.
    for (p, want) in [(p1, &first), (p2, &second)] {
        let o = restore(&d, "enc", p, &out, &key_flags(&k));
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(&disk::digest(&out), want);
        std::fs::remove_file(&out).unwrap();
    }
    // Every other format goes through the NBD export: each converts back to the same bytes.
    for format in ["qcow2", "vmdk", "vhdx"] {
        let img = d.path(&format!("out.{format}"));
        let mut flags = key_flags(&k);
        flags.extend(["--format".into(), format.into()]);
        let o = restore(&d, "enc", p2, &img, &flags);
        assert!(o.status.success(), "{format}: {}", stderr(&o));
        let o = run(Command::new("qemu-img")
            .args(["convert", "-f", format, "-O", "raw"])
            .arg(&img)
            .arg(&out));
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(disk::digest(&out), second, "{format}");
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn padded_chunks_fill_whole_buckets_and_restore_exactly() {
    let d = Deployment::new();
    let rx = d.serve();
    let k = key(&d, "k1");
    let vda = d.path("vda.raw");
    marked_disk(&vda);
    let mut flags = key_flags(&k);
    flags.push("--pad-chunks".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let r = rewind_tests::sync_report(&d.sync(&rx, "host1", "pad", &[("vda", &vda)], &flags));
    // The marker blocks compress to a few hundred bytes; padded, each envelope holds a whole
    // 4 KiB bucket: the padded seed is larger than the plain one by at least half a bucket
    // for each of them.
    assert_eq!(disk_of(&r, "vda")["sent_chunks"], 48);
    let plain = rewind_tests::sync_report(&d.sync(&rx, "host1", "nopad", &[("vda", &vda)], &[]));
    let (padded, unpadded) = (
        r["sent_bytes"].as_u64().unwrap(),
        plain["sent_bytes"].as_u64().unwrap(),
    );
    assert!(padded >= unpadded + 32 * 2048, "{padded} vs {unpadded}");
    let out = d.path("out.raw");
    let o = restore(
        &d,
        "pad",
        r["point"].as_u64().unwrap(),
        &out,
        &key_flags(&k),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(disk::digest(&out), disk::digest(&vda));
}

#[test]
fn verify_without_a_key_catches_a_flipped_byte_and_the_agent_heals_it() {
    let d = Deployment::new();
    let rx = d.serve();
    let k = key(&d, "k1");
    let vda = d.path("vda.raw");
    disk::create(&vda, 4 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 16, &mut rand::rng());
    let p1 = sync_ok(&d, &rx, "enc", &vda, &k)["point"].as_u64().unwrap();
    let want = disk::digest(&vda);
    let verify = || {
        run(Command::new(bin("rewind-receiver"))
            .args(["verify", "--json", "--data"])
            .arg(d.data()))
    };
    let clean = verify();
    assert!(clean.status.success(), "{}", stderr(&clean));
    let v: Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!(v["chunks_checked"], 16);

    // One byte flipped inside the first chunk's ciphertext.
    d.flip_pack_byte(0x01);

    let bad = verify();
    assert!(!bad.status.success());
    let v: Value = serde_json::from_slice(&bad.stdout).unwrap();
    let found = v["bad"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{v}");
    assert!(
        found[0]["error"].as_str().unwrap().contains("check hash"),
        "{v}"
    );
    assert_eq!(found[0]["points"][0][1], p1);
    // The key holder's restore refuses the damaged point.
    let out = d.path("out.raw");
    let o = restore(&d, "enc", p1, &out, &key_flags(&k));
    assert!(!o.status.success());
    assert!(!out.exists());

    // The agent still holds the content: its next sync seals it again.
    let r = sync_ok(&d, &rx, "enc", &vda, &k);
    assert_eq!(disk_of(&r, "vda")["changed_blocks"], 0);
    assert_eq!(disk_of(&r, "vda")["healed_blocks"], 1);
    let healed = verify();
    assert!(
        healed.status.success(),
        "{}",
        String::from_utf8_lossy(&healed.stdout)
    );
    let o = restore(&d, "enc", p1, &out, &key_flags(&k));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(disk::digest(&out), want);
}

#[test]
fn one_keyring_dedups_two_keyrings_never_do() {
    let d = Deployment::new();
    let rx = d.serve();
    let (k1, k2) = (key(&d, "k1"), key(&d, "k2"));
    let a = d.path("a.raw");
    disk::create(&a, 4 * MIB);
    disk::random_blocks(&a, BLOCK, 0, 24, &mut rand::rng());
    let b = d.path("b.raw");
    std::fs::copy(&a, &b).unwrap();
    let first = sync_ok(&d, &rx, "a", &a, &k1);
    assert_eq!(disk_of(&first, "vda")["sent_chunks"], 24);
    // The same content under the same keyring: nothing travels.
    let same = sync_ok(&d, &rx, "b", &b, &k1);
    assert_eq!(disk_of(&same, "vda")["changed_blocks"], 24);
    assert_eq!(same["sent_bytes"], 0);
    assert_eq!(
        disk_of(&same, "vda")["root"],
        disk_of(&first, "vda")["root"]
    );
    // Under another keyring, or plain: every chunk travels, under other names.
    let c = d.path("c.raw");
    std::fs::copy(&a, &c).unwrap();
    let other = sync_ok(&d, &rx, "c", &c, &k2);
    assert_eq!(disk_of(&other, "vda")["sent_chunks"], 24);
    assert_ne!(
        disk_of(&other, "vda")["root"],
        disk_of(&first, "vda")["root"]
    );
    let p = d.path("p.raw");
    std::fs::copy(&a, &p).unwrap();
    let plain = d.sync_ok(&rx, "host1", "p", &[("vda", &p)]);
    assert_eq!(disk_of(&plain, "vda")["sent_chunks"], 24);
    let want = disk::digest(&a);
    for (vm, k, r) in [
        ("b", Some(&k1), &same),
        ("c", Some(&k2), &other),
        ("p", None, &plain),
    ] {
        let out = d.path(&format!("{vm}.out"));
        let flags = k.map(key_flags).unwrap_or_default();
        let o = restore(&d, vm, r["point"].as_u64().unwrap(), &out, &flags);
        assert!(o.status.success(), "{vm}: {}", stderr(&o));
        assert_eq!(disk::digest(&out), want, "{vm}");
    }
}

#[test]
fn encryption_is_fixed_by_a_vms_first_point() {
    let d = Deployment::new();
    let rx = d.serve();
    let (k1, k2) = (key(&d, "k1"), key(&d, "k2"));
    let vda = d.path("vda.raw");
    disk::create(&vda, 2 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 4, &mut rand::rng());
    sync_ok(&d, &rx, "enc", &vda, &k1);
    for (k, says) in [
        (None, "this agent sends plain"),
        (Some(&k2), "this agent sends encrypted"),
    ] {
        let o = sync(&d, &rx, "enc", &vda, k);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains(says) && stderr(&o).contains("fixed by a VM's first point"),
            "{}",
            stderr(&o)
        );
    }
    d.sync_ok(&rx, "host1", "plain", &[("vda", &vda)]);
    let o = sync(&d, &rx, "plain", &vda, Some(&k1));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is plain"), "{}", stderr(&o));
}

#[test]
fn a_paper_key_round_trips_and_restores() {
    let d = Deployment::new();
    let rx = d.serve();
    let k = key(&d, "k1");
    let vda = d.path("vda.raw");
    disk::create(&vda, 2 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 8, &mut rand::rng());
    let p = sync_ok(&d, &rx, "enc", &vda, &k)["point"].as_u64().unwrap();
    let o = run(Command::new(bin("rewind-agent"))
        .args(["key", "export", "--paper"])
        .arg(&k.0));
    assert!(o.status.success(), "{}", stderr(&o));
    let paper = d.path("paper.txt");
    // What a person types back: upper case, extra spaces.
    std::fs::write(
        &paper,
        String::from_utf8(o.stdout)
            .unwrap()
            .to_uppercase()
            .replace("  ", "   "),
    )
    .unwrap();
    let back = d.path("back.key");
    let o = run(Command::new(bin("rewind-agent"))
        .args(["key", "import", "--paper"])
        .arg(&paper)
        .arg("--out")
        .arg(&back));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.path("out.raw");
    let o = restore(&d, "enc", p, &out, &key_flags(&(back, k.1.clone())));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(disk::digest(&out), disk::digest(&vda));
}

#[test]
fn rollback_and_drills_use_the_key_only_when_given() {
    let d = Deployment::new();
    let rx = d.serve();
    let k = key(&d, "k1");
    let vda = d.path("vda.raw");
    disk::create(&vda, 4 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 32, &mut rand::rng());
    let p1 = sync_ok(&d, &rx, "enc", &vda, &k)["point"].as_u64().unwrap();
    let first = disk::digest(&vda);
    disk::random_blocks(&vda, BLOCK, 8, 5, &mut rand::rng());
    sync_ok(&d, &rx, "enc", &vda, &k);

    // A drill without the key proves ciphertext and structure, and says so.
    let drill = |extra: &[String]| {
        run(Command::new(bin("rewind-receiver"))
            .args(["drill", "--json", "--vm", "enc", "--data"])
            .arg(d.data())
            .args(extra))
    };
    let o = drill(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["checked"]
            .as_str()
            .unwrap()
            .starts_with("ciphertext only"),
        "{r}"
    );
    let o = drill(&key_flags(&k));
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["checked"].as_str().unwrap().starts_with("content"), "{r}");
    assert_eq!(r["blocks_verified"], 32);
    // A key check: one chunk decrypted, the MAC verified, nothing else read; another
    // keyring's key fails it.
    let mut check = key_flags(&k);
    check.push("--key-check".into());
    let o = drill(&check);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["checked"].as_str().unwrap().starts_with("key only"),
        "{r}"
    );
    assert_eq!(r["blocks_verified"], 1);
    let mut wrong = key_flags(&key(&d, "k2"));
    wrong.push("--key-check".into());
    let o = drill(&wrong);
    assert!(!o.status.success());
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("encrypted with keyring"),
        "{r}"
    );

    // Rollback: refused without the key, exact with it.
    let rollback = |extra: &[String]| {
        run(d
            .agent_cmd(&rx, "host1", "rollback")
            .args([
                "--json",
                "--vm",
                "enc",
                "--point",
                &p1.to_string(),
                "--disk",
            ])
            .arg(format!("vda={}", vda.display()))
            .args(extra))
    };
    let o = rollback(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is encrypted"), "{}", stderr(&o));
    let o = rollback(&key_flags(&k));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["disks"][0]["blocks_differing"], 5);
    assert_eq!(v["disks"][0]["verified"], true);
    assert_eq!(disk::digest(&vda), first);
}
