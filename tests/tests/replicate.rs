//! Full then incremental points of a two-disk VM with random writes in between: every point
//! restores bit-exact, `changed_blocks` is exactly the set of blocks written, and unchanged data
//! is never sent again.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::disk::{self, Digest};
use rewind_tests::{disk_of, Deployment};

const BLOCK: u64 = 64 * 1024;

#[test]
fn full_then_incremental_points_restore_bit_exact() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    let vdb = d.path("vdb.raw");
    // vda: 32 MiB with 8 MiB of random data and a partial last block; vdb: 16 MiB, some data.
    disk::create(&vda, 32 * 1024 * 1024 + 4096);
    disk::create(&vdb, 16 * 1024 * 1024);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 128, &mut rng);
    disk::write_at(&vda, 32 * 1024 * 1024, &[7u8; 4096]);
    disk::random_blocks(&vdb, BLOCK, 100, 20, &mut rng);
    let disks = [("vda", vda.as_path()), ("vdb", vdb.as_path())];

    let mut expected: Vec<(u64, Digest, Digest)> = Vec::new();
    let first = d.sync_ok(&rx, "host1", "web1", &disks);
    assert_eq!(disk_of(&first, "vda")["mode"], "full");
    assert_eq!(disk_of(&first, "vda")["changed_blocks"], 129);
    assert_eq!(disk_of(&first, "vdb")["changed_blocks"], 20);
    assert!(disk_of(&first, "vda")["sent_bytes"].as_u64().unwrap() > 8 * 1024 * 1024);
    expected.push((
        first["point"].as_u64().unwrap(),
        disk::digest(&vda),
        disk::digest(&vdb),
    ));

    for round in 0..3u64 {
        let va = disk::scatter_writes(&vda, BLOCK, 512, 17 + round as usize, round * 2 + 1);
        let vb = disk::scatter_writes(&vdb, BLOCK, 256, 5, round * 2 + 2);
        // Zero one block that held data: it must count as changed and restore as zeros.
        let zeroed = 3 + round;
        let held_data = !va.contains(&zeroed);
        disk::write_at(&vda, zeroed * BLOCK, &vec![0u8; BLOCK as usize]);
        let r = d.sync_ok(&rx, "host1", "web1", &disks);
        assert_eq!(disk_of(&r, "vda")["mode"], "delta");
        let want_a = va.len() as u64 + u64::from(held_data);
        assert_eq!(
            disk_of(&r, "vda")["changed_blocks"],
            want_a,
            "round {round}"
        );
        assert_eq!(
            disk_of(&r, "vdb")["changed_blocks"],
            vb.len() as u64,
            "round {round}"
        );
        // Only the new random blocks travel (zstd cannot shrink random data).
        let sent = disk_of(&r, "vda")["sent_bytes"].as_u64().unwrap();
        assert!(
            sent >= va.len() as u64 * BLOCK && sent < (va.len() as u64 + 1) * BLOCK + 4096,
            "sent {sent}"
        );
        expected.push((
            r["point"].as_u64().unwrap(),
            disk::digest(&vda),
            disk::digest(&vdb),
        ));
    }

    // An unchanged re-sync sends nothing and changes nothing.
    let same = d.sync_ok(&rx, "host1", "web1", &disks);
    assert_eq!(same["sent_bytes"], 0);
    assert_eq!(disk_of(&same, "vda")["changed_blocks"], 0);
    assert_eq!(
        disk_of(&same, "vda")["root"],
        disk_of(&expected_last_report(&d), "vda")["root"]
    );

    let points = d.points("web1");
    assert_eq!(points.len(), expected.len() + 1);
    for (point, a, b) in &expected {
        assert_eq!(
            &d.restored_digest("web1", "vda", *point),
            a,
            "vda of point {point}"
        );
        assert_eq!(
            &d.restored_digest("web1", "vdb", *point),
            b,
            "vdb of point {point}"
        );
    }
}

fn expected_last_report(d: &Deployment) -> serde_json::Value {
    let points = d.points("web1");
    points[points.len() - 2].clone()
}

#[test]
fn restore_at_picks_newest_point_at_or_before_and_is_sparse() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * 1024 * 1024);
    disk::random_blocks(&vda, BLOCK, 10, 4, &mut rand::rng());
    let p1 = d.sync_ok(&rx, "host1", "web1", &[("vda", &vda)]);
    let first = disk::digest(&vda);
    disk::scatter_writes(&vda, BLOCK, 128, 3, 9);
    let p2 = d.sync_ok(&rx, "host1", "web1", &[("vda", &vda)]);
    let second = disk::digest(&vda);
    assert_ne!(first, second);

    let points = d.points("web1");
    assert_eq!(points.len(), 2);
    assert_eq!(points[0]["id"], p1["point"]);
    assert_eq!(points[1]["id"], p2["point"]);
    assert_eq!(points[0]["created"], p1["created"]);
    for p in &points {
        assert_eq!(p["vm"], "web1");
        assert_eq!(p["disks"][0]["size"], 8 * 1024 * 1024);
        assert_eq!(p["disks"][0]["root"].as_str().unwrap().len(), 64);
    }

    let out = d.path("at.raw");
    let created1 = points[0]["created"].as_str().unwrap();
    let o = d.restore("web1", "vda", &["--at", created1], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(disk::digest(&out), first);
    // 4 blocks of data: the image is sparse.
    assert!(
        disk::allocated(&out) <= 8 * BLOCK,
        "allocated {}",
        disk::allocated(&out)
    );

    let o = d.restore(
        "web1",
        "vda",
        &["--at", "2099-01-01T00:00:00Z", "--force"],
        &out,
    );
    assert!(o.status.success());
    assert_eq!(disk::digest(&out), second);

    let o = d.restore(
        "web1",
        "vda",
        &["--at", "2001-01-01T00:00:00Z", "--force"],
        &out,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no point created at or before"));

    // Refuses to overwrite without --force.
    let first = d.points("web1")[0]["id"].as_u64().unwrap().to_string();
    let o = d.restore("web1", "vda", &["--point", &first], &out);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
}

#[test]
fn diff_lists_exactly_the_changed_extents() {
    use std::collections::BTreeSet;
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * 1024 * 1024);
    disk::random_blocks(&vda, BLOCK, 0, 10, &mut rand::rng());
    let p = |r: &serde_json::Value| r["point"].as_u64().unwrap();
    let p1 = p(&d.sync_ok(&rx, "host1", "dv", &[("vda", &vda)]));
    let mut s2 = disk::scatter_writes(&vda, BLOCK, 128, 5, 77);
    disk::write_at(&vda, 3 * BLOCK, &vec![0u8; BLOCK as usize]);
    s2.insert(3);
    let p2 = p(&d.sync_ok(&rx, "host1", "dv", &[("vda", &vda)]));
    disk::random_blocks(&vda, BLOCK, 40, 1, &mut rand::rng());
    let p3 = p(&d.sync_ok(&rx, "host1", "dv", &[("vda", &vda)]));
    disk::write_at(&vda, 40 * BLOCK, &vec![0u8; BLOCK as usize]);
    let p4 = p(&d.sync_ok(&rx, "host1", "dv", &[("vda", &vda)]));

    let diff = |a: u64, b: u64| -> BTreeSet<u64> {
        let out = rewind_tests::run(
            std::process::Command::new(rewind_tests::bin("rewind-receiver"))
                .args([
                    "diff",
                    "--vm",
                    "dv",
                    "--json",
                    "--from",
                    &a.to_string(),
                    "--to",
                    &b.to_string(),
                    "--data",
                ])
                .arg(d.data()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let disk = &v["disks"][0];
        let mut blocks = BTreeSet::new();
        for e in disk["extents"].as_array().unwrap() {
            let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            assert_eq!(off % BLOCK, 0);
            for b in off / BLOCK..(off + len) / BLOCK {
                blocks.insert(b);
            }
        }
        assert_eq!(disk["changed_blocks"], blocks.len() as u64);
        assert_eq!(disk["changed_bytes"], blocks.len() as u64 * BLOCK);
        blocks
    };
    assert_eq!(diff(p1, p2), s2);
    assert_eq!(diff(p2, p3), BTreeSet::from([40]));
    let mut s13 = s2.clone();
    s13.insert(40);
    assert_eq!(diff(p1, p3), s13);
    assert_eq!(diff(p3, p1), s13, "diff is symmetric");
    assert!(diff(p2, p2).is_empty());
    assert!(diff(p2, p4).is_empty(), "block 40 changed and changed back");
    let out = d.restore("dv", "vda", &["--point", "99"], &d.path("x.raw"));
    assert!(!out.status.success());
}

/// Restores write straight to the device (O_DIRECT) where they can: a disk whose size is not a
/// multiple of 4 KiB (its short last block goes through the page cache) and a restore onto
/// tmpfs (no O_DIRECT at all) both come back bit for bit.
#[test]
fn restores_of_odd_sizes_and_onto_tmpfs_are_exact() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("odd.raw");
    let size = 3 * BLOCK + 7 * 512; // the last block is 3.5 KiB
    disk::create(&vda, size);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 2, &mut rng);
    let mut tail = vec![0u8; 7 * 512];
    rand::RngCore::fill_bytes(&mut rng, &mut tail);
    disk::write_at(&vda, 3 * BLOCK, &tail);
    let p = d.sync_ok(&rx, "host1", "odd", &[("vda", &vda)])["point"]
        .as_u64()
        .unwrap();
    let out = d.path("odd-restored.raw");
    let o = d.restore("odd", "vda", &["--point", &p.to_string()], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert_eq!(disk::digest(&out), disk::digest(&vda));

    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        let on_tmpfs = shm.join(format!("rewind-test-{}.raw", std::process::id()));
        let o = d.restore("odd", "vda", &["--point", &p.to_string()], &on_tmpfs);
        let same = disk::digest(&on_tmpfs) == disk::digest(&vda);
        let _ = std::fs::remove_file(&on_tmpfs);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(same);
    }
}

/// A disk that grows (an online resize) continues its chain as a delta when its old size was a
/// whole number of blocks: only what was written is read and sent, and every point before and
/// after restores bit-exact, also after the smaller point is pruned. A disk that grows from a
/// partial last block, or shrinks, starts again as a full point that sends only unknown chunks.
#[test]
fn a_disk_that_grows_continues_as_a_delta() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    const MIB: u64 = 1024 * 1024;
    disk::create(&vda, 8 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 40, &mut rng);
    let disks = [("vda", vda.as_path())];
    let mut points = Vec::new();
    let r = d.sync_ok(&rx, "host1", "grow", &disks);
    points.push((r["point"].as_u64().unwrap(), disk::digest(&vda)));

    // 8 MiB -> 12 MiB: one old block and one block in the new area written.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vda)
        .unwrap()
        .set_len(12 * MIB)
        .unwrap();
    disk::random_blocks(&vda, BLOCK, 3, 1, &mut rng);
    disk::random_blocks(&vda, BLOCK, 150, 1, &mut rng);
    let r = d.sync_ok(&rx, "host1", "grow", &disks);
    let v = disk_of(&r, "vda");
    assert_eq!(v["mode"], "delta", "{r}");
    assert_eq!(v["size"], 12 * MIB);
    assert_eq!(v["changed_blocks"], 2, "{r}");
    let sent = v["sent_bytes"].as_u64().unwrap();
    assert!((2 * BLOCK..3 * BLOCK).contains(&sent), "sent {sent}: {r}");
    points.push((r["point"].as_u64().unwrap(), disk::digest(&vda)));

    // Growth that adds only zeros: a delta with no changed block.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vda)
        .unwrap()
        .set_len(16 * MIB + 4096)
        .unwrap();
    let r = d.sync_ok(&rx, "host1", "grow", &disks);
    let v = disk_of(&r, "vda");
    assert_eq!(v["mode"], "delta", "{r}");
    assert_eq!(v["changed_blocks"], 0, "{r}");
    assert_eq!(r["sent_bytes"], 0, "{r}");
    points.push((r["point"].as_u64().unwrap(), disk::digest(&vda)));

    // From a partial last block: a new disk generation, only the new data sent.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vda)
        .unwrap()
        .set_len(20 * MIB)
        .unwrap();
    disk::random_blocks(&vda, BLOCK, 300, 1, &mut rng);
    let r = d.sync_ok(&rx, "host1", "grow", &disks);
    let v = disk_of(&r, "vda");
    assert_eq!(v["mode"], "full", "{r}");
    let sent = v["sent_bytes"].as_u64().unwrap();
    assert!(
        sent < 3 * BLOCK,
        "only unknown chunks are sent: {sent}: {r}"
    );
    points.push((r["point"].as_u64().unwrap(), disk::digest(&vda)));

    // A shrink: also a new generation.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vda)
        .unwrap()
        .set_len(6 * MIB)
        .unwrap();
    let r = d.sync_ok(&rx, "host1", "grow", &disks);
    assert_eq!(disk_of(&r, "vda")["mode"], "full", "{r}");
    assert_eq!(r["sent_bytes"], 0, "{r}");
    points.push((r["point"].as_u64().unwrap(), disk::digest(&vda)));

    for (p, want) in &points {
        assert_eq!(&d.restored_digest("grow", "vda", *p), want, "point {p}");
    }
    let verify = rewind_tests::run(
        std::process::Command::new(rewind_tests::bin("rewind-receiver"))
            .args(["verify", "--json", "--data"])
            .arg(d.data()),
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Pruning the smaller points moves their nodes to the grown ones: those stay exact.
    let prune = rewind_tests::run(
        std::process::Command::new(rewind_tests::bin("rewind-receiver"))
            .args([
                "prune",
                "--json",
                "--vm",
                "grow",
                "--keep-last",
                "3",
                "--data",
            ])
            .arg(d.data()),
    );
    assert!(
        prune.status.success(),
        "{}",
        String::from_utf8_lossy(&prune.stderr)
    );
    for (p, want) in &points[2..] {
        assert_eq!(
            &d.restored_digest("grow", "vda", *p),
            want,
            "point {p} after prune"
        );
    }
}
