//! Graceful RPO degradation: when the guest writes faster than the link carries, cycles stretch
//! instead of failing, `status` says `behind` with the achieved RPO, and the agent recovers by
//! itself once the burst ends; the newest point is still bit-exact.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, run, wait_until, Deployment};
use serde_json::Value;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;
/// 16 MiB disk.
const BLOCKS: u64 = 256;

fn status(d: &Deployment) -> Value {
    let out = run(Command::new(bin("rewind-agent"))
        .args(["status", "--json", "--state"])
        .arg(d.path("state-host1")));
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().next() {
        Some(line) => serde_json::from_str(line).unwrap(),
        None => Value::Null,
    }
}

#[test]
fn a_burst_faster_than_the_link_stretches_cycles_then_recovers() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, BLOCKS * BLOCK);
    // A point a second (RPO target 2 s) over a 1 MB/s link.
    let mut agent = d.spawn_continuous_with(
        &rx,
        "web1",
        &[("vda", &vda)],
        &["--interval", "1", "--bwlimit", "1"],
    );
    let count = |d: &Deployment| d.try_points("web1").map(|p| p.len()).unwrap_or(0);
    assert!(wait_until(Duration::from_secs(60), || count(&d) >= 2));
    assert!(
        wait_until(Duration::from_secs(30), || status(&d)["state"]
            == "replicating"),
        "an idle VM replicates within its target: {}",
        status(&d)
    );

    // The burst: about 3 MB/s of incompressible writes against a 1 MB/s link.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, vda) = (stop.clone(), written.clone(), vda.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rng();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                disk::random_blocks(&vda, BLOCK, (i * 7) % BLOCKS, 1, &mut rng);
                written.fetch_add(BLOCK, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // While a stretched cycle is still running, the newest point may first be reported as
    // overdue ("more than 2x the RPO target"); once a stretched point has landed, status names
    // the cause: cycles take longer than the interval.
    let mut behind = Value::Null;
    assert!(
        wait_until(Duration::from_secs(180), || {
            behind = status(&d);
            behind["state"] == "behind"
                && behind["achieved_rpo_seconds"].as_f64().unwrap_or(0.0) > 2.0
                && behind["why"]
                    .as_str()
                    .is_some_and(|w| w.contains("longer than the interval"))
        }),
        "the burst never showed as cycles longer than the interval: {behind}"
    );
    eprintln!("during the burst: {behind}");
    assert_eq!(behind["cycles_failed"], 0, "{behind}");
    // Cycles stretched: at least two more points land during the burst, none failing.
    let during = count(&d);
    assert!(
        wait_until(Duration::from_secs(180), || count(&d) >= during + 2),
        "no point landed during the burst"
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!(
        "burst: {:.1} MiB written",
        written.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
    );

    // The burst is over: the agent catches up by itself.
    let mut after = Value::Null;
    assert!(
        wait_until(Duration::from_secs(180), || {
            after = status(&d);
            after["state"] == "replicating"
        }),
        "the agent did not recover after the burst: {after}"
    );
    eprintln!("after the burst: {after}");
    assert_eq!(after["cycles_failed"], 0, "no cycle failed: {after}");
    assert!(
        after["achieved_rpo_seconds"].as_f64().unwrap() <= 2.0,
        "{after}"
    );
    assert!(
        after["achieved_rpo_p99_seconds"].as_f64().unwrap() > 2.0,
        "{after}"
    );

    // The disk no longer changes: the next point equals it.
    let want = disk::digest(&vda);
    let settled = count(&d);
    assert!(wait_until(Duration::from_secs(60), || count(&d) > settled));
    agent.kill().unwrap();
    agent.wait().unwrap();
    let newest = d.points("web1").last().unwrap()["id"].as_u64().unwrap();
    assert_eq!(d.restored_digest("web1", "vda", newest), want);
}
