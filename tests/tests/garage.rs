//! Packs on a real distributed S3 store: a three-node Garage 2.x cluster on loopback (built
//! once by the test command and cached). Seed, incrementals, cold restores, verify, prune + gc
//! and recover against it; a copy between two receivers whose packs both live on it; a node
//! killed mid-seed; wrong credentials refused at start.
//!
//! Garage 2.5 implements neither conditional writes (`If-None-Match: *` is ignored: a second
//! PUT replaces the object) nor Object Lock (`PUT ?retention` answers 501), so the create-only
//! and immutability tests run against moto (`s3.rs`); on Garage the pack names' uniqueness
//! rests on the catalog's never-reused pack ids (and `recover` moving past the bucket's).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::copying::{replica, wait_points};
use rewind_tests::garage::{self, Garage};
use rewind_tests::s3::{self, copy_digest, empty_cache, receiver, restored, serve};
use rewind_tests::{bin, disk, Deployment, Receiver};
use std::process::Command;
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

/// A deployment and a running three-node cluster with bucket `rewind`; None (skipped) when no
/// garage binary is installed.
fn with_garage() -> Option<(Deployment, Garage)> {
    if garage::binary().is_none() {
        eprintln!("garage is not installed: skipped (the test command builds it)");
        return None;
    }
    let d = Deployment::new();
    let g = Garage::start(&d.path("garage"));
    g.bucket("rewind");
    Some((d, g))
}

#[test]
fn seed_incrementals_restore_verify_gc_and_recover_on_a_garage_cluster() {
    let Some((d, g)) = with_garage() else {
        return;
    };
    let env = g.env();
    let url = "s3://rewind/site";
    let rx = serve(&d, url, &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 96 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 1200, &mut rng);
    let p1 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want1 = copy_digest(&d, &vda, "want1.raw");
    disk::random_blocks(&vda, BLOCK, 300, 40, &mut rng);
    let p2 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want2 = copy_digest(&d, &vda, "want2.raw");
    assert_eq!(p2["disks"][0]["changed_blocks"], 40, "{p2}");
    assert_eq!(p2["disks"][0]["sent_chunks"], 40, "{p2}");
    // A clean stop leaves a catalog snapshot in the bucket.
    assert!(rx
        .terminate(Duration::from_secs(60))
        .is_some_and(|s| s.success()));
    let keys = g.keys("rewind", "site/packs/");
    assert!((2..=4).contains(&keys.len()), "{keys:?}");

    // Cold restores from the cluster.
    let id = |p: &serde_json::Value| p["point"].as_u64().unwrap();
    empty_cache(&d);
    assert_eq!(restored(&d, &env, id(&p1)), want1);
    empty_cache(&d);
    assert_eq!(restored(&d, &env, id(&p2)), want2);

    // Verify reads nothing from the cluster (Garage keeps and reports each pack's SHA-256).
    let o = receiver(&d, &env, &["verify", "--json", "--store", url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["store"]["packs_checked"], keys.len() as u64, "{r}");
    assert_eq!(r["store"]["bytes_read"], 0, "{r}");

    // Prune the first point and collect: the second still restores cold.
    let o = receiver(
        &d,
        &env,
        &["prune", "--vm", "vm1", "--keep-last", "1", "--store", url],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = receiver(&d, &env, &["gc", "--grace", "0", "--store", url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    empty_cache(&d);
    assert_eq!(restored(&d, &env, id(&p2)), want2);

    // The site burns: a new data folder rebuilt from the cluster alone (from the snapshot of
    // the clean stop, or a newer one gc left before it deleted anything) restores the kept
    // point.
    std::fs::remove_dir_all(d.data()).unwrap();
    let o = rewind_tests::run(
        Command::new(bin("rewind-receiver"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["recover", "--store", url, "--data"])
            .arg(d.data()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(restored(&d, &env, id(&p2)), want2);
}

#[test]
fn a_copy_between_two_receivers_on_the_cluster_reads_and_writes_pack_objects() {
    let Some((d, g)) = with_garage() else {
        return;
    };
    let env = g.env();
    let rx = serve(&d, "s3://rewind/primary", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 32 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 200, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want1 = copy_digest(&d, &vda, "want1.raw");
    disk::random_blocks(&vda, BLOCK, 50, 3, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want2 = copy_digest(&d, &vda, "want2.raw");
    // The primary serves the copy's reads from the cluster, not from its cache.
    empty_cache(&d);
    let (copy, config) = replica(&d, rx.addr());
    let mut cmd = Command::new(bin("rewind-receiver"));
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let crx = Receiver::start_via(
        cmd,
        &copy.data(),
        &copy.pki(),
        "127.0.0.1:0",
        &[
            "--store",
            "s3://rewind/copy",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let got = wait_points(&copy, "vm1", 2);
    drop(crx);
    drop(rx);
    // The copy's packs are objects of its own prefix, and its points restore bit-exact from
    // them with its cache emptied.
    assert!(!g.keys("rewind", "copy/packs/").is_empty());
    empty_cache(&copy);
    let id = |p: &serde_json::Value| p["id"].as_u64().unwrap();
    assert_eq!(restored(&copy, &env, id(&got[0])), want1);
    assert_eq!(restored(&copy, &env, id(&got[1])), want2);
}

#[test]
fn a_seed_survives_a_garage_node_killed_mid_way() {
    let Some((d, g)) = with_garage() else {
        return;
    };
    let env = g.env();
    let rx = serve(&d, "s3://rewind", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 256 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 3600, &mut rng);
    let want = copy_digest(&d, &vda, "want.raw");

    // The seed runs while node 2 (not the one the receiver talks to) is killed as soon as the
    // first pack object is in the bucket. Two of three nodes are a quorum: the seed completes.
    // (Should it fail, the next sync must resume it without sending again what is durable.)
    let cluster = std::cell::RefCell::new(g);
    let published = || !cluster.borrow().keys("rewind", "packs/").is_empty();
    let kill = || cluster.borrow_mut().kill(2);
    let p = s3::seed_through_fault(&d, &rx, (&vda, 3600), published, kill, "");
    let mut g = cluster.into_inner();
    drop(rx);
    g.wait_down(2);
    g.restart(2);
    empty_cache(&d);
    assert_eq!(restored(&d, &env, p["point"].as_u64().unwrap()), want);
}

#[test]
fn wrong_garage_credentials_fail_serve_at_start_with_the_stores_refusal() {
    let Some((d, g)) = with_garage() else {
        return;
    };
    let start = |env: &[(&'static str, String)]| {
        rewind_tests::run(
            Command::new(bin("rewind-receiver"))
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .args(["serve", "--listen", "127.0.0.1:0", "--pki"])
                .arg(d.pki())
                .arg("--data")
                .arg(d.data())
                .args(["--store", "s3://rewind"]),
        )
    };
    let with = |name: &str, value: &str| {
        g.env()
            .into_iter()
            .map(|(k, v)| {
                if k == name {
                    (k, value.to_owned())
                } else {
                    (k, v)
                }
            })
            .collect::<Vec<_>>()
    };
    // A wrong secret: the signature is refused.
    let o = start(&with("AWS_SECRET_ACCESS_KEY", &"0".repeat(64)));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("AccessDenied") && err.contains("Invalid signature"),
        "{err}"
    );
    // A key the store does not know.
    let o = start(&with("AWS_ACCESS_KEY_ID", "GK0000000000000000000000ff"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("AccessDenied") && err.contains("No such key"),
        "{err}"
    );
    // Nothing was made of the folder's store: the right keys then start it.
    let rx = serve(&d, "s3://rewind", &g.env());
    drop(rx);
}
