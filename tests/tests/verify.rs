//! Verify finds a flipped byte in a stored chunk, names the points it damages, quarantines it,
//! and the owning agent's next sync heals it; then verify is clean and every point restores.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, disk_of, run, Deployment};
use serde_json::Value;
use std::process::Command;

const BLOCK: u64 = 64 * 1024;

#[test]
fn a_bad_chunk_is_found_named_and_healed() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * 1024 * 1024);
    disk::random_blocks(&vda, BLOCK, 0, 16, &mut rand::rng());
    let p1 = d.sync_ok(&rx, "host1", "v", &[("vda", &vda)])["point"]
        .as_u64()
        .unwrap();
    let first = disk::digest(&vda);
    disk::random_blocks(&vda, BLOCK, 20, 4, &mut rand::rng());
    let p2 = d.sync_ok(&rx, "host1", "v", &[("vda", &vda)])["point"]
        .as_u64()
        .unwrap();
    let second = disk::digest(&vda);
    let verify = || {
        run(Command::new(bin("rewind-receiver"))
            .args(["verify", "--json", "--data"])
            .arg(d.data()))
    };
    let clean = verify();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let v: Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!(v["chunks_checked"], 20);

    // Flip one byte inside the first chunk of the first pack (one of the 16 blocks of point 1,
    // which point 2 still uses).
    d.flip_pack_byte(0xff);

    let bad = verify();
    assert!(
        !bad.status.success(),
        "verify fails while a point is damaged"
    );
    let v: Value = serde_json::from_slice(&bad.stdout).unwrap();
    let found = v["bad"].as_array().unwrap();
    assert_eq!(found.len(), 1);
    let points: Vec<(String, u64)> = found[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_u64().unwrap()))
        .collect();
    assert_eq!(points, vec![("v".to_owned(), p1), ("v".to_owned(), p2)]);
    let o = d.restore(
        "v",
        "vda",
        &["--point", &p1.to_string()],
        &d.path("broken.raw"),
    );
    assert!(
        !o.status.success(),
        "a damaged point does not restore silently"
    );
    // Neither the image nor the partial file it was written under is left behind.
    assert!(!d.path("broken.raw").exists());
    assert!(!d.path(".broken.raw.rewind-partial").exists());
    // Nor through the NBD export (qcow2 output): a block without its chunk is a read error,
    // never zeros.
    let o = d.restore(
        "v",
        "vda",
        &["--point", &p1.to_string(), "--format", "qcow2"],
        &d.path("broken.qcow2"),
    );
    assert!(
        !o.status.success(),
        "a damaged point does not convert silently: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!d.path("broken.qcow2").exists());
    assert!(!d.path(".broken.qcow2.rewind-partial").exists());
    // Still reported until healed.
    let again = verify();
    assert!(!again.status.success());
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["quarantined"].as_array().unwrap().len(), 1);

    // The agent's disk still holds that content: the next sync sends it again.
    let r = d.sync_ok(&rx, "host1", "v", &[("vda", &vda)]);
    assert_eq!(disk_of(&r, "vda")["changed_blocks"], 0);
    assert_eq!(disk_of(&r, "vda")["healed_blocks"], 1);
    assert!(r["sent_bytes"].as_u64().unwrap() >= BLOCK);
    let healed = verify();
    assert!(
        healed.status.success(),
        "{}",
        String::from_utf8_lossy(&healed.stdout)
    );
    assert_eq!(d.restored_digest("v", "vda", p1), first);
    assert_eq!(d.restored_digest("v", "vda", p2), second);
}
