//! Interrupted points resume: SIGKILL of the receiver or of the agent in the middle of a large
//! point, then the next run finishes the same session without re-sending stored chunks, no
//! partial point is ever listed, and earlier points still restore.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{disk, disk_of, wait_until, Deployment};
use std::process::Stdio;
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;
const BIG_BLOCKS: u64 = 2560; // 160 MiB of random data

fn setup(d: &Deployment, rx: &rewind_tests::Receiver) -> (std::path::PathBuf, u64, disk::Digest) {
    let vda = d.path("vda.raw");
    disk::create(&vda, 200 * 1024 * 1024);
    disk::random_blocks(&vda, BLOCK, 0, 64, &mut rand::rng());
    let p1 = d.sync_ok(rx, "host1", "web1", &[("vda", &vda)]);
    let first = disk::digest(&vda);
    disk::random_blocks(&vda, BLOCK, 100, BIG_BLOCKS, &mut rand::rng());
    (vda, p1["point"].as_u64().unwrap(), first)
}

fn finish_and_check(
    d: &Deployment,
    rx: &rewind_tests::Receiver,
    vda: &std::path::Path,
    p1: u64,
    first: &disk::Digest,
    stored_before: u64,
) {
    let r = d.sync_ok(rx, "host1", "web1", &[("vda", vda)]);
    assert_eq!(
        r["resumed"], true,
        "the interrupted session is resumed: {r}"
    );
    assert_eq!(disk_of(&r, "vda")["changed_blocks"], BIG_BLOCKS);
    // The resumed run skips what was stored. (`stored_before` is read right after the kill,
    // while the receiver may still stage batches it had received, up to its pipeline's room:
    // so only this bound is exact. That everything arrived is what the bit-exact restore
    // below checks.)
    let sent = r["sent_bytes"].as_u64().unwrap();
    let full = BIG_BLOCKS * BLOCK;
    assert!(
        sent < full - stored_before / 2,
        "resumed run sent {sent} of {full} ({stored_before} already stored)"
    );
    let points = d.points("web1");
    assert_eq!(points.len(), 2);
    assert_eq!(d.restored_digest("web1", "vda", p1), *first);
    assert_eq!(
        d.restored_digest("web1", "vda", r["point"].as_u64().unwrap()),
        disk::digest(vda)
    );
}

/// A sync of the big change, limited to 24 MB/s so that it can be interrupted midway.
fn spawn_slow_sync(
    d: &Deployment,
    rx: &rewind_tests::Receiver,
    vda: &std::path::Path,
) -> std::process::Child {
    d.sync_cmd(rx, "host1", "web1", &[("vda", vda)], &["--bwlimit", "24"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agent")
}

#[test]
fn receiver_killed_mid_point() {
    let d = Deployment::new();
    let rx = d.serve();
    let (vda, p1, first) = setup(&d, &rx);
    let base = d.pack_bytes();
    let mut agent = spawn_slow_sync(&d, &rx, &vda);
    assert!(
        wait_until(Duration::from_secs(60), || d.pack_bytes()
            > base + 48 * 1024 * 1024),
        "the upload never got going"
    );
    rx.kill9();
    let status = agent.wait().expect("agent exits");
    assert!(!status.success(), "the agent must notice the receiver died");
    let stored = d.pack_bytes() - base;
    assert!(
        stored < BIG_BLOCKS * BLOCK,
        "killed before the end ({stored} stored)"
    );

    let rx = d.serve();
    assert_eq!(d.points("web1").len(), 1, "no partial point is listed");
    finish_and_check(&d, &rx, &vda, p1, &first, stored);
}

#[test]
fn agent_killed_mid_point() {
    let d = Deployment::new();
    let rx = d.serve();
    let (vda, p1, first) = setup(&d, &rx);
    let base = d.pack_bytes();
    let mut agent = spawn_slow_sync(&d, &rx, &vda);
    assert!(wait_until(Duration::from_secs(60), || d.pack_bytes()
        > base + 48 * 1024 * 1024));
    agent.kill().expect("kill -9 agent");
    agent.wait().expect("reap");
    let stored = d.pack_bytes() - base;
    assert!(stored < BIG_BLOCKS * BLOCK);
    assert_eq!(d.points("web1").len(), 1, "no partial point is listed");
    finish_and_check(&d, &rx, &vda, p1, &first, stored);
}
