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
