//! Prune by keep rules: exactly the points the rules do not keep go (never a locked or the
//! newest one), `--dry-run` shows exactly that and changes nothing, and every kept point still
//! restores bit-exact (removed points' block versions are folded into the next kept point).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, run, Deployment};
use serde_json::Value;
use std::process::{Command, Output};

const BLOCK: u64 = 64 * 1024;

fn rx_cmd(d: &Deployment, args: &[&str]) -> Output {
    run(Command::new(bin("rewind-receiver"))
        .args(args)
        .arg("--data")
        .arg(d.data()))
}

fn removed(v: &Value) -> Vec<u64> {
    v["vms"][0]["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn prune_keeps_what_the_rules_say_and_kept_points_restore() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * 1024 * 1024);
    let mut digests = Vec::new();
    for round in 0..6u64 {
        // Round 0 writes blocks that never change again; later rounds overwrite some.
        if round == 0 {
            disk::random_blocks(&vda, BLOCK, 0, 32, &mut rand::rng());
        } else {
            disk::scatter_writes(&vda, BLOCK, 64, 6, round);
            disk::write_at(&vda, (40 + round) * BLOCK, &vec![0u8; BLOCK as usize]);
        }
        let r = d.sync_ok(&rx, "host1", "ret", &[("vda", &vda)]);
        digests.push((r["point"].as_u64().unwrap(), disk::digest(&vda)));
    }
    let ids: Vec<u64> = digests.iter().map(|(p, _)| *p).collect();

    let o = rx_cmd(
        &d,
        &[
            "lock",
            "--vm",
            "ret",
            "--point",
            &ids[1].to_string(),
            "--until",
            "2099-01-01T00:00:00Z",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = rx_cmd(&d, &["prune", "--vm", "ret"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no keep rule"));

    let o = rx_cmd(
        &d,
        &[
            "prune",
            "--vm",
            "ret",
            "--keep-last",
            "2",
            "--dry-run",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dry: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(removed(&dry), vec![ids[0], ids[2], ids[3]]);
    assert_eq!(d.points("ret").len(), 6, "a dry run removes nothing");

    let o = rx_cmd(&d, &["prune", "--vm", "ret", "--keep-last", "2", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let done: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        removed(&done),
        removed(&dry),
        "prune did what the dry run showed"
    );
    let left: Vec<u64> = d
        .points("ret")
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(left, vec![ids[1], ids[4], ids[5]]);
    assert!(d.points("ret")[0]["locked_until"]
        .as_str()
        .unwrap()
        .starts_with("2099-01-01"));
    for (p, want) in &digests {
        if left.contains(p) {
            assert_eq!(&d.restored_digest("ret", "vda", *p), want, "point {p}");
        }
    }

    // The newest point always stays, and so does the locked one.
    let o = rx_cmd(&d, &["prune", "--vm", "ret", "--keep-last", "0", "--json"]);
    assert!(o.status.success());
    let left: Vec<u64> = d
        .points("ret")
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(left, vec![ids[1], ids[5]]);
    for (p, want) in &digests {
        if left.contains(p) {
            assert_eq!(&d.restored_digest("ret", "vda", *p), want, "point {p}");
        }
    }
    // New points still build on the newest one.
    disk::scatter_writes(&vda, BLOCK, 64, 3, 99);
    let r = d.sync_ok(&rx, "host1", "ret", &[("vda", &vda)]);
    assert_eq!(r["disks"][0]["mode"], "delta");
    assert_eq!(
        d.restored_digest("ret", "vda", r["point"].as_u64().unwrap()),
        disk::digest(&vda)
    );
}

#[test]
fn gc_after_prune_frees_exactly_the_dead_chunks() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 8 * 1024 * 1024);
    disk::random_blocks(&vda, BLOCK, 0, 32, &mut rand::rng());
    d.sync_ok(&rx, "host1", "gc", &[("vda", &vda)]);
    // Twice overwrite the same 16 blocks: after pruning all but the newest point, 32 chunks die.
    for _ in 0..2 {
        disk::random_blocks(&vda, BLOCK, 0, 16, &mut rand::rng());
        d.sync_ok(&rx, "host1", "gc", &[("vda", &vda)]);
    }
    let newest = d.points("gc").last().unwrap()["id"].as_u64().unwrap();
    let want = disk::digest(&vda);
    let before = d.pack_bytes();
    // With the default grace period nothing this young is collected.
    let o = rx_cmd(&d, &["gc", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.pack_bytes(), before);
    assert!(rx_cmd(&d, &["prune", "--vm", "gc", "--keep-last", "1"])
        .status
        .success());
    // Until gc runs, prune frees nothing.
    assert_eq!(d.pack_bytes(), before);
    let o = rx_cmd(&d, &["gc", "--grace", "0", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["chunks_removed"], 32);
    let after = d.pack_bytes();
    // 32 live random chunks (64 KiB plus a few bytes each) remain, give or take pack headers.
    let live = 32 * (BLOCK + 40 + 16);
    assert!(
        after >= 32 * BLOCK && after <= live + 4096,
        "after {after}, expected about {live}"
    );
    assert!(before - after >= 32 * BLOCK, "freed {}", before - after);
    assert_eq!(d.restored_digest("gc", "vda", newest), want);
    // A second run finds nothing to do, and the store still takes points.
    let o = rx_cmd(&d, &["gc", "--grace", "0", "--json"]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["chunks_removed"], 0);
    disk::random_blocks(&vda, BLOCK, 40, 2, &mut rand::rng());
    let p = d.sync_ok(&rx, "host1", "gc", &[("vda", &vda)]);
    assert_eq!(
        d.restored_digest("gc", "vda", p["point"].as_u64().unwrap()),
        disk::digest(&vda)
    );
}

#[test]
fn gc_racing_a_live_sync_and_kills_at_random_moments_lose_nothing() {
    use rand::Rng;
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 96 * 1024 * 1024);
    disk::random_blocks(&vda, BLOCK, 0, 64, &mut rand::rng());
    d.sync_ok(&rx, "host1", "race", &[("vda", &vda)]);
    disk::random_blocks(&vda, BLOCK, 0, 64, &mut rand::rng());
    let p2 = d.sync_ok(&rx, "host1", "race", &[("vda", &vda)]);
    // The kept point stays listed until a (killed) prune manages to remove it: remember it.
    let p2 = (p2["point"].as_u64().unwrap(), disk::digest(&vda));
    assert!(rx_cmd(&d, &["prune", "--vm", "race", "--keep-last", "1"])
        .status
        .success());

    // A large sync in flight while gc (no grace at all) runs again and again.
    disk::random_blocks(&vda, BLOCK, 100, 1200, &mut rand::rng());
    let want = disk::digest(&vda);
    let mut agent = d
        .sync_cmd(&rx, "host1", "race", &[("vda", &vda)], &["--bwlimit", "40"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut runs = 0;
    while agent.try_wait().unwrap().is_none() {
        let o = rx_cmd(&d, &["gc", "--grace", "0"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        runs += 1;
    }
    let out = agent.wait_with_output().unwrap();
    assert!(out.status.success(), "the sync survived {runs} gc runs");
    assert!(runs >= 3, "gc ran during the sync ({runs})");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        d.restored_digest("race", "vda", r["point"].as_u64().unwrap()),
        want
    );

    // SIGKILL prune and gc at random moments: every kept point restores, every time.
    let mut rng = rand::rng();
    let mut digests = std::collections::HashMap::new();
    digests.insert(p2.0, p2.1);
    digests.insert(r["point"].as_u64().unwrap(), want);
    for round in 0..10u64 {
        disk::random_blocks(&vda, BLOCK, rng.random_range(0..1400), 24, &mut rng);
        let p = d.sync_ok(&rx, "host1", "race", &[("vda", &vda)]);
        digests.insert(p["point"].as_u64().unwrap(), disk::digest(&vda));
        for args in [
            vec!["prune", "--vm", "race", "--keep-last", "2"],
            vec!["gc", "--grace", "0"],
        ] {
            let mut child = Command::new(bin("rewind-receiver"))
                .args(&args)
                .arg("--data")
                .arg(d.data())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(rng.random_range(0..40)));
            let _ = child.kill();
            child.wait().unwrap();
        }
        for p in d.points("race") {
            let id = p["id"].as_u64().unwrap();
            assert_eq!(
                &d.restored_digest("race", "vda", id),
                &digests[&id],
                "round {round}: point {id}"
            );
        }
    }
    assert!(rx_cmd(&d, &["prune", "--vm", "race", "--keep-last", "2"])
        .status
        .success());
    assert!(rx_cmd(&d, &["gc", "--grace", "0"]).status.success());
    for p in d.points("race") {
        let id = p["id"].as_u64().unwrap();
        assert_eq!(&d.restored_digest("race", "vda", id), &digests[&id]);
    }
}

#[test]
fn serve_applies_retention_on_schedule_and_exports_metrics() {
    let d = Deployment::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let rx = rewind_tests::Receiver::start_with(
        &d.data(),
        &d.pki(),
        &[
            "--keep-last",
            "1",
            "--retention",
            "other:last=2",
            "--prune-interval",
            "1",
            "--metrics",
            &metrics_addr,
        ],
    );
    let vda = d.path("vda.raw");
    disk::create(&vda, 4 * 1024 * 1024);
    for i in 0..3 {
        disk::random_blocks(&vda, BLOCK, i * 4, 4, &mut rand::rng());
        d.sync_ok(&rx, "host1", "sched", &[("vda", &vda)]);
        d.sync_ok(&rx, "host1", "other", &[("vda", &vda)]);
    }
    assert!(
        rewind_tests::wait_until(std::time::Duration::from_secs(20), || {
            d.points("sched").len() == 1 && d.points("other").len() == 2
        }),
        "scheduled retention did not apply the default and the per-VM rules"
    );
    let newest = d.points("sched")[0]["id"].as_u64().unwrap();
    assert_eq!(
        d.restored_digest("sched", "vda", newest),
        disk::digest(&vda)
    );
    assert!(rx_cmd(&d, &["verify"]).status.success());
    let scrape = || rewind_tests::scrape_metrics(&metrics_addr);
    let m = scrape();
    assert!(m.contains("rewind_points{vm=\"sched\"} 1"), "{m}");
    assert!(m.contains("rewind_prune_points_removed_total 3"), "{m}");
    assert!(
        m.contains("rewind_verify_chunks_checked_last 4")
            || m.contains("rewind_verify_chunks_checked_last 12"),
        "{m}"
    );
    assert!(m.contains("rewind_verify_chunks_bad_last 0"), "{m}");
    assert!(
        m.contains("rewind_last_point_age_seconds{vm=\"sched\"}"),
        "{m}"
    );
}
