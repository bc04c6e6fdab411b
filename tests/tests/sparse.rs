//! A sparse 64 GiB disk with a few MiB written replicates and restores without touching its
//! holes.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{disk, disk_of, Deployment};
use std::time::Instant;

const BLOCK: u64 = 64 * 1024;

#[test]
fn sparse_64_gib_disk() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("big.raw");
    let size = 64u64 << 30;
    disk::create(&vda, size);
    let mut rng = rand::rng();
    // A few MiB spread over the disk, including its very end.
    for at in [0u64, 1 << 30, 17 << 30, 40 << 30, (64 << 30) - 4 * BLOCK] {
        disk::random_blocks(&vda, BLOCK, at / BLOCK, 4, &mut rng);
    }
    let started = Instant::now();
    let r = d.sync_ok(&rx, "host1", "big", &[("vda", &vda)]);
    let seed_secs = started.elapsed().as_secs_f64();
    assert_eq!(disk_of(&r, "vda")["size"], size);
    assert_eq!(disk_of(&r, "vda")["changed_blocks"], 20);
    assert!(
        disk_of(&r, "vda")["read_bytes"].as_u64().unwrap() < 64 << 20,
        "holes are not read"
    );

    disk::random_blocks(&vda, BLOCK, (33u64 << 30) / BLOCK, 2, &mut rng);
    let r2 = d.sync_ok(&rx, "host1", "big", &[("vda", &vda)]);
    assert_eq!(disk_of(&r2, "vda")["changed_blocks"], 2);

    let out = d.path("restored.raw");
    let started = Instant::now();
    let o = d.restore("big", "vda", &["--point", &r2["point"].to_string()], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let restore_secs = started.elapsed().as_secs_f64();
    assert_eq!(disk::digest(&out), disk::digest(&vda));
    assert!(disk::allocated(&out) < 16 << 20, "restored image is sparse");
    eprintln!("64 GiB sparse: seed {seed_secs:.2}s, restore {restore_secs:.2}s");
}
