//! Packs on S3-compatible object storage, against a real S3 server on loopback (moto_server):
//! the receiver's packs are objects in the bucket, written create-only; every point restores
//! bit-exact from the bucket alone (the local cache emptied); an unreachable store fails the
//! sync clearly and the next sync resumes; bad settings fail `serve` at start.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::faultlink::{FaultLink, LinkMode};
use rewind_tests::s3::{
    self, copy_digest, empty_cache, receiver, restored, serve, verify_json, with_moto,
};
use rewind_tests::{bin, disk, sync_report};
use std::process::{Command, Output};

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

#[test]
fn packs_live_in_the_bucket_and_every_point_restores_from_it() {
    let Some((d, moto, env)) = with_moto() else {
        return;
    };
    let rx = serve(&d, "s3://rewind/site-a", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 96 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 1200, &mut rng);
    let p1 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want1 = copy_digest(&d, &vda, "want1.raw");
    disk::random_blocks(&vda, BLOCK, 300, 40, &mut rng);
    disk::random_blocks(&vda, BLOCK, 1400, 3, &mut rng);
    let p2 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want2 = copy_digest(&d, &vda, "want2.raw");
    assert_eq!(p2["disks"][0]["changed_blocks"], 43);

    // The packs are objects under the prefix, nothing is left staged, and no local pack
    // folder exists.
    let keys = moto.keys("rewind", "site-a/packs/");
    assert!(!keys.is_empty());
    assert!(keys
        .iter()
        .all(|k| k.starts_with("site-a/packs/") && k.ends_with(".pack")));
    let staging = d.data().join("object-cache/staging");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
    assert!(!d.data().join("packs").exists());
    // A 75 MiB seed of incompressible data fills about two 64 MiB packs, not one object per
    // chunk.
    assert!(keys.len() <= 4, "{keys:?}");

    // Every point restores bit-exact from the bucket, with the local cache emptied (cold).
    drop(rx);
    empty_cache(&d);
    let id = |p: &serde_json::Value| p["point"].as_u64().unwrap();
    assert_eq!(restored(&d, &env, id(&p1)), want1);
    empty_cache(&d);
    assert_eq!(restored(&d, &env, id(&p2)), want2);
    let v = receiver(&d, &env, &["verify", "--store", "s3://rewind/site-a"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // A command given another store than the folder's is refused, naming both.
    let o = receiver(&d, &env, &["verify", "--store", "s3://rewind/elsewhere"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("keeps its packs in s3://rewind/site-a, not s3://rewind/elsewhere"),
        "{err}"
    );
}

/// The cache is written without a sync: a crash can leave a cached pack short or empty under
/// its name. A read finds it is not the size uploaded, drops it and fetches the pack again, so
/// the point restores bit-exact.
#[test]
fn a_cached_pack_cut_short_by_a_crash_is_fetched_again() {
    let Some((d, _moto, env)) = with_moto() else {
        return;
    };
    let rx = serve(&d, "s3://rewind/torn", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 16 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 100, &mut rand::rng());
    let p = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want = copy_digest(&d, &vda, "want.raw");
    rx.kill9();
    let cache = d.data().join("object-cache/packs");
    let mut sizes = Vec::new();
    for (k, e) in std::fs::read_dir(&cache).unwrap().enumerate() {
        let path = e.unwrap().path();
        let len = std::fs::metadata(&path).unwrap().len();
        // One copy cut in half, the others emptied.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(if k == 0 { len / 2 } else { 0 }).unwrap();
        sizes.push((path, len));
    }
    assert!(!sizes.is_empty());
    assert_eq!(restored(&d, &env, p["point"].as_u64().unwrap()), want);
    for (path, len) in sizes {
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len,
            "{}",
            path.display()
        );
    }
}

#[test]
fn an_unreachable_store_fails_the_sync_clearly_and_the_next_sync_resumes() {
    let Some((d, moto, _)) = with_moto() else {
        return;
    };
    let link = FaultLink::start(moto.addr).unwrap();
    let mut env = moto.env();
    env[0].1 = format!("http://{}", link.addr);
    let rx = serve(&d, "s3://rewind", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 32 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 200, &mut rng);
    let p1 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);

    // The store goes away: the next sync fails, saying the object store is unreachable, and
    // no point is made.
    disk::random_blocks(&vda, BLOCK, 100, 20, &mut rng);
    link.set(LinkMode::Down);
    let o = d.sync(&rx, "host1", "vm1", &[("vda", &vda)], &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("object store") || err.contains("not in the object store"),
        "{err}"
    );
    assert_eq!(d.points("vm1").len(), 1);

    // Back: the next sync makes the point, and both points restore from the bucket alone.
    link.set(LinkMode::Pass);
    let p2 = sync_report(&d.sync(&rx, "host1", "vm1", &[("vda", &vda)], &[]));
    let want2 = copy_digest(&d, &vda, "want2.raw");
    // What the failed sync sent was durable here (staged, indexed): it is not sent again, and
    // its pack went up before the point committed.
    assert_eq!(p2["disks"][0]["changed_blocks"], 20, "{p2}");
    assert_eq!(p2["disks"][0]["sent_chunks"], 0, "{p2}");
    assert_eq!(
        std::fs::read_dir(d.data().join("object-cache/staging"))
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "pack"))
            .count(),
        0
    );
    drop(rx);
    empty_cache(&d);
    assert_eq!(restored(&d, &env, p2["point"].as_u64().unwrap()), want2);
    assert!(p1["point"].as_u64().unwrap() < p2["point"].as_u64().unwrap());
}

#[test]
fn bad_store_settings_fail_serve_at_start_with_a_clear_error() {
    let Some((d, moto, _)) = with_moto() else {
        return;
    };
    let serve_once = |url: &str, env: &[(&'static str, String)]| {
        rewind_tests::run(
            Command::new(bin("rewind-receiver"))
                .env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY")
                .env_remove("AWS_ENDPOINT_URL")
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .args(["serve", "--listen", "127.0.0.1:0", "--pki"])
                .arg(d.pki())
                .arg("--data")
                .arg(d.data())
                .args(["--store", url]),
        )
    };
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // No keys.
    let env: Vec<_> = moto
        .env()
        .into_iter()
        .filter(|(k, _)| !k.contains("KEY"))
        .collect();
    let o = serve_once("s3://rewind", &env);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no credentials"), "{}", stderr(&o));
    // A bucket that does not exist: the store's refusal, named.
    let o = serve_once("s3://no-such-bucket", &moto.env());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("NoSuchBucket"), "{}", stderr(&o));
    // Not an s3:// URL.
    let o = serve_once("/var/lib/rewind", &moto.env());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("expected s3://BUCKET"),
        "{}",
        stderr(&o)
    );

    // A folder that recorded one bucket refuses another.
    let rx = serve(&d, "s3://rewind/a", &moto.env());
    drop(rx);
    moto.bucket("other", false);
    let o = serve_once("s3://other/a", &moto.env());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("keeps its packs in s3://rewind/a"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn gc_on_the_bucket_deletes_dead_packs_and_keeps_every_kept_point_whole() {
    let Some((d, moto, env)) = with_moto() else {
        return;
    };
    // A bucket that keeps versions (Object Lock needs them), where a plain DELETE only hides
    // an object: gc must remove every version of what it deletes, or the bytes stay billed.
    moto.bucket("versioned", true);
    let rx = serve(&d, "s3://versioned/gc", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 32 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 64, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    // Each point rewrites the same 32 blocks: after pruning all but the newest, the older
    // points' versions of them are dead.
    for _ in 0..2 {
        disk::random_blocks(&vda, BLOCK, 0, 32, &mut rng);
        d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    }
    let newest = d.points("vm1").last().unwrap()["id"].as_u64().unwrap();
    let want = copy_digest(&d, &vda, "want.raw");
    let before = moto.keys("versioned", "gc/packs/");
    let o = receiver(&d, &env, &["prune", "--vm", "vm1", "--keep-last", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = receiver(&d, &env, &["gc", "--grace", "0", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["chunks_removed"], 64, "{r}");
    let after = moto.keys("versioned", "gc/packs/");
    // Every pack of the first two points held dead chunks: each is gone from the bucket
    // (deleted, or rewritten into a new object first).
    assert!(
        before.iter().any(|k| !after.contains(k)),
        "{before:?} {after:?}"
    );
    assert!(after.iter().all(|k| k.ends_with(".pack")));
    // Before deleting pack objects, gc left a catalog snapshot that names none of them.
    assert!(!moto.keys("versioned", "gc/catalog/").is_empty());
    // Nothing gc deleted (packs, older catalog snapshots) left a version or a delete marker
    // behind: the bucket's versions are exactly its objects.
    let mut versions = moto.versions("versioned", "gc/");
    let mut current = moto.keys("versioned", "gc/");
    versions.sort();
    current.sort();
    assert_eq!(versions, current);
    drop(rx);
    empty_cache(&d);
    assert_eq!(restored(&d, &env, newest), want);
    let v = receiver(&d, &env, &["verify"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn a_receiver_rebuilt_from_its_bucket_restores_every_snapshotted_point_and_agents_heal_the_gap() {
    let Some((d, moto, env)) = with_moto() else {
        return;
    };
    let rx = serve(&d, "s3://rewind/dr", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 32 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 200, &mut rng);
    let p1 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want1 = copy_digest(&d, &vda, "want1.raw");
    disk::random_blocks(&vda, BLOCK, 100, 10, &mut rng);
    let p2 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want2 = copy_digest(&d, &vda, "want2.raw");
    // A clean stop leaves a catalog snapshot in the bucket.
    let stopped = rx.terminate(std::time::Duration::from_secs(60));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    assert_eq!(moto.keys("rewind", "dr/catalog/").len(), 1);

    // One more point, then the receiver dies before a snapshot of it is due, and the site
    // burns: the data folder is gone.
    let rx = serve(&d, "s3://rewind/dr", &env);
    disk::random_blocks(&vda, BLOCK, 300, 5, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    rx.kill9();
    assert_eq!(moto.keys("rewind", "dr/catalog/").len(), 1);
    std::fs::remove_dir_all(d.data()).unwrap();

    let o = receiver(
        &d,
        &env,
        &["recover", "--store", "s3://rewind/dr", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["points"], 2, "{r}");
    assert_eq!(r["vms"], 1, "{r}");
    assert_eq!(r["packs_dropped"], 0, "{r}");
    let id = |p: &serde_json::Value| p["point"].as_u64().unwrap();
    assert_eq!(restored(&d, &env, id(&p1)), want1);
    assert_eq!(restored(&d, &env, id(&p2)), want2);
    // Recovering into a folder that holds a catalog is refused.
    let o = receiver(&d, &env, &["recover", "--store", "s3://rewind/dr"]);
    assert!(!o.status.success());

    // The agent's state names the lost third point: its next sync reads the disk in full and
    // sends only what the rebuilt receiver lacks (the 5 blocks of the lost point, 2 new). Its
    // packs get ids past the lost point's packs, still in the bucket (a taken name would be
    // refused by the create-only write).
    let rx = serve(&d, "s3://rewind/dr", &env);
    disk::random_blocks(&vda, BLOCK, 400, 2, &mut rng);
    let p4 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    assert_eq!(p4["disks"][0]["sent_chunks"], 7, "{p4}");
    let want4 = copy_digest(&d, &vda, "want4.raw");
    drop(rx);
    assert_eq!(restored(&d, &env, id(&p4)), want4);
}

/// A copy of a receiver that `recover` rebuilt: a VM's point ids grow by a random step from its
/// newest point, so the rebuilt receiver's next point gets an id below those of the points it
/// lost, which the copy holds. The copy matches points by id and creation time, keeps the
/// lost points, and copies the new one as a new point (it asked only for ids past the newest
/// it held, and never saw it).
#[test]
fn a_copy_of_a_rebuilt_receiver_copies_the_points_made_below_the_lost_ids() {
    let Some((d, moto, env)) = with_moto() else {
        return;
    };
    let rx = serve(&d, "s3://rewind/dr", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 16 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 100, &mut rng);
    let id = |p: &serde_json::Value| p["point"].as_u64().unwrap();
    let p1 = id(&d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]));
    let mut want = vec![copy_digest(&d, &vda, "want1.raw")];
    // A clean stop leaves a catalog snapshot holding point 1.
    let stopped = rx.terminate(std::time::Duration::from_secs(60));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");

    // Points are made and copied until the newest is past any id the next point after point
    // 1 can get; then the primary dies before a snapshot of them is due, and its site burns.
    let rx = serve(&d, "s3://rewind/dr", &env);
    let (copy, config) = rewind_tests::copying::replica(&d, rx.addr());
    let start_copy = || {
        rewind_tests::Receiver::start_with(
            &copy.data(),
            &copy.pki(),
            &["--config", config.to_str().unwrap()],
        )
    };
    let crx = start_copy();
    let mut lost = p1;
    while lost <= p1 + (1 << 16) {
        disk::random_blocks(&vda, BLOCK, 50, 2, &mut rng);
        lost = id(&d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]));
        want.push(copy_digest(
            &d,
            &vda,
            &format!("want{}.raw", want.len() + 1),
        ));
    }
    rewind_tests::copying::wait_points(&copy, "vm1", want.len());
    let addr = rx.addr();
    rx.kill9();
    drop(crx);
    assert_eq!(moto.keys("rewind", "dr/catalog/").len(), 1);
    std::fs::remove_dir_all(d.data()).unwrap();
    let o = receiver(&d, &env, &["recover", "--store", "s3://rewind/dr"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The rebuilt primary, where its agents and its copy reach it, gets its next point an id
    // below the newest lost one.
    let rx = s3::serve_at(&d, "s3://rewind/dr", &env, &addr.to_string());
    disk::random_blocks(&vda, BLOCK, 120, 4, &mut rng);
    let next = id(&d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]));
    want.push(copy_digest(&d, &vda, "want-next.raw"));
    assert!(next < lost, "{next} {lost}");

    // The copy keeps every point it holds and copies the new one, reading only the chunks it
    // lacks (the 4 new blocks').
    let crx = start_copy();
    let kept = rewind_tests::copying::wait_points(&copy, "vm1", want.len());
    drop(crx);
    assert_eq!(kept.len(), want.len(), "{kept:?}");
    let newest = kept[want.len() - 1]["id"].as_i64().unwrap();
    let conn = rusqlite::Connection::open(copy.data().join("catalog.sqlite")).unwrap();
    let (listed, held, chunks): (i64, i64, i64) = conn
        .query_row(
            "SELECT json_extract(h.detail, '$.listed'), json_extract(h.detail, '$.held'),
                    json_extract(c.detail, '$.chunks')
               FROM events h, events c
              WHERE h.kind = 'copy-history' AND c.kind = 'copy' AND c.point = ?1",
            [newest],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((listed, held, chunks), (2, 1, 4));
    for (k, w) in kept.iter().zip(&want) {
        let local = k["id"].as_u64().unwrap();
        assert_eq!(
            &copy.restored_digest("vm1", "vda", local),
            w,
            "point {local}"
        );
    }
}

#[test]
fn a_locked_points_packs_are_under_object_lock_and_stolen_keys_cannot_delete_them() {
    let Some((d, moto, env)) = with_moto() else {
        return;
    };
    moto.bucket("vault", true);
    let rx = serve(&d, "s3://vault/l", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 16 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 64, &mut rng);
    let p1 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want1 = copy_digest(&d, &vda, "want1.raw");
    disk::random_blocks(&vda, BLOCK, 0, 64, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let id1 = p1["point"].as_u64().unwrap().to_string();

    let o = lock(&d, &env, &id1, "2099-01-01T00:00:00Z");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("1 pack objects put under Object Lock"),
        "{out}"
    );
    // A thief with the receiver's keys cannot delete the locked history: the store refuses
    // to delete any version of the first point's pack. (moto answers GET ?retention with an
    // error, so the lock is seen by what it forbids.) The second point's pack, holding only
    // the second point's chunks, is not locked: the same keys delete it.
    let first = "l/packs/0000000000000001.pack";
    let tries = moto.delete_versions("vault", first);
    assert!(!tries.is_empty());
    assert!(tries.iter().all(|s| s == "AccessDenied"), "{tries:?}");
    let tries = moto.delete_versions("vault", "l/packs/0000000000000002.pack");
    assert!(!tries.is_empty());
    assert!(tries.iter().all(|s| s == "deleted"), "{tries:?}");

    // prune keeps the locked point; gc leaves its pack alone; it restores from the bucket.
    let o = receiver(&d, &env, &["prune", "--vm", "vm1", "--keep-last", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = receiver(&d, &env, &["gc", "--grace", "0", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(moto.keys("vault", "l/packs/").contains(&first.to_owned()));
    drop(rx);
    empty_cache(&d);
    assert_eq!(restored(&d, &env, p1["point"].as_u64().unwrap()), want1);

    // The same thief's plain DELETE puts a delete marker over the locked pack (Object Lock
    // allows it: no version goes), so a plain read no longer finds it. The receiver reads the
    // pack's newest version instead: a verify of the locked point finds it whole, and it
    // restores bit-exact from a cold cache.
    moto.delete_plain("vault", first);
    assert!(!moto.keys("vault", "l/packs/").contains(&first.to_owned()));
    empty_cache(&d);
    let (ok, r) = verify_json(&d, &env, &["--vm", "vm1", "--point", &id1]);
    assert!(ok, "{r}");
    assert_eq!(r["bad"], serde_json::json!([]), "{r}");
    assert_eq!(restored(&d, &env, p1["point"].as_u64().unwrap()), want1);

    // The thief then writes other bytes under the locked pack's name (a new version: the
    // locked one stays). Reads, checks and locks name the version the receiver uploaded, so
    // the locked point still verifies and restores bit-exact from a cold cache, and the lock
    // can still be extended (on that version).
    let junk = d.path("junk.pack");
    std::fs::write(&junk, vec![0x5a; 1 << 20]).unwrap();
    moto.overwrite("vault", first, &junk);
    assert!(moto.keys("vault", "l/packs/").contains(&first.to_owned()));
    empty_cache(&d);
    let (ok, r) = verify_json(&d, &env, &["--vm", "vm1", "--point", &id1, "--deep"]);
    assert!(ok, "{r}");
    assert_eq!(r["bad"], serde_json::json!([]), "{r}");
    assert_eq!(restored(&d, &env, p1["point"].as_u64().unwrap()), want1);
    let o = lock(&d, &env, &id1, "2100-01-01T00:00:00Z");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `lock --vm vm1 --point POINT --until UNTIL`.
fn lock(d: &rewind_tests::Deployment, env: &s3::Env, point: &str, until: &str) -> Output {
    receiver(
        d,
        env,
        &["lock", "--vm", "vm1", "--point", point, "--until", until],
    )
}

/// The catalog and a bucket that keeps versions disagree. Versions the catalog recorded that
/// the bucket lacks (a bucket copied elsewhere keeps versions of its own) are read and checked
/// as the objects are now, with a warning. A locked version the catalog does not know to be
/// locked (a catalog older than the lock) cannot be deleted by gc: gc warns, goes on with the
/// other dead packs, and the locked version stays.
#[test]
fn versions_the_bucket_lacks_read_as_objects_are_and_gc_leaves_a_locked_version_it_was_not_told_of()
{
    let Some((d, moto, env)) = with_moto() else {
        return;
    };
    moto.bucket("vault", true);
    let rx = serve(&d, "s3://vault/v", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 16 * MIB);
    let mut rng = rand::rng();
    let mut points = Vec::new();
    // Three points each rewriting the same 64 blocks: one pack each, the first two dead once
    // only the newest point is kept.
    for k in 0..3 {
        disk::random_blocks(&vda, BLOCK, 0, 64, &mut rng);
        let p = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
        let want = copy_digest(&d, &vda, &format!("want{k}.raw"));
        points.push((p["point"].as_u64().unwrap(), want));
    }
    let o = lock(&d, &env, &points[0].0.to_string(), "2099-01-01T00:00:00Z");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(rx);

    let conn = rusqlite::Connection::open(d.data().join("catalog.sqlite")).unwrap();
    let changed = conn
        .execute(
            "UPDATE packs SET version = 'no-such-version-' || id WHERE version IS NOT NULL",
            [],
        )
        .unwrap();
    assert_eq!(changed, 3);
    empty_cache(&d);
    for deep in [false, true] {
        let args: &[&str] = if deep {
            &["verify", "--json", "--deep"]
        } else {
            &["verify", "--json"]
        };
        let o = receiver(&d, &env, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("the recorded version is not there"), "{err}");
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["bad"], serde_json::json!([]), "{r}");
    }
    empty_cache(&d);
    for (id, want) in &points {
        assert_eq!(&restored(&d, &env, *id), want, "point {id}");
    }

    // The catalog forgets the first point's lock; prune removes it and the second point.
    conn.execute_batch(
        "UPDATE packs SET retain_until_us = 0; UPDATE points SET locked_until_us = NULL;",
    )
    .unwrap();
    drop(conn);
    let o = receiver(&d, &env, &["prune", "--vm", "vm1", "--keep-last", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = receiver(&d, &env, &["gc", "--grace", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("stays until its date"), "{err}");
    let (first, second) = (
        "v/packs/0000000000000001.pack",
        "v/packs/0000000000000002.pack",
    );
    assert!(!moto.versions("vault", first).is_empty());
    assert!(moto.versions("vault", second).is_empty());
    let (newest, want) = &points[2];
    empty_cache(&d);
    assert_eq!(&restored(&d, &env, *newest), want);
}

#[test]
fn a_default_verify_reads_nothing_from_the_bucket_and_a_deep_one_keeps_to_its_budget() {
    let Some((d, moto, env)) = with_moto() else {
        return;
    };
    let rx = serve(&d, "s3://rewind/v", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 96 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 1200, &mut rng);
    let p1 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want1 = copy_digest(&d, &vda, "want1.raw");
    disk::random_blocks(&vda, BLOCK, 1300, 40, &mut rng);
    let p2 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    drop(rx);
    let keys = moto.keys("rewind", "v/packs/");
    let cache = d.data().join("object-cache/packs");
    // Every published pack is in the cache: the bytes the bucket holds.
    let stored: u64 = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), keys.len());
    let last = keys.iter().max().unwrap();
    let mut last_bytes = std::fs::read(cache.join(last.rsplit('/').next().unwrap())).unwrap();

    // Default: one HEAD per pack, each pack's chunks re-hashed from the cache, nothing read
    // from the bucket.
    let (ok, r) = verify_json(&d, &env, &[]);
    assert!(ok, "{r}");
    let s = &r["store"];
    assert_eq!(s["packs_checked"], keys.len() as u64, "{r}");
    assert_eq!(s["heads"], keys.len() as u64, "{r}");
    assert_eq!(s["packs_rehashed_locally"], keys.len() as u64, "{r}");
    assert_eq!(s["packs_without_digest"], 0, "{r}");
    assert_eq!(
        (s["gets"].as_u64(), s["bytes_read"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    // Cold cache: still nothing read.
    empty_cache(&d);
    let (ok, r) = verify_json(&d, &env, &[]);
    assert!(ok, "{r}");
    assert_eq!(r["store"]["packs_rehashed_locally"], 0, "{r}");
    assert_eq!(r["store"]["bytes_read"], 0, "{r}");

    // Deep, 70 MiB a run: the first run reads the first full pack, the second the others
    // (the longest unread first): two runs read back exactly what the bucket holds.
    let budget = ["--deep", "--budget-mib", "70"];
    let (ok, a) = verify_json(&d, &env, &budget);
    assert!(ok, "{a}");
    let (ok, b) = verify_json(&d, &env, &budget);
    assert!(ok, "{b}");
    let read = |r: &serde_json::Value| r["store"]["bytes_read"].as_u64().unwrap();
    assert!(read(&a) <= 70 * MIB && read(&b) <= 70 * MIB, "{a} {b}");
    assert_eq!(read(&a) + read(&b), stored, "{a} {b}");
    let back = |r: &serde_json::Value| r["store"]["packs_read_back"].as_u64().unwrap();
    assert_eq!(back(&a) + back(&b), keys.len() as u64);

    // A pack object changed behind the receiver's back (same size, one byte flipped): a
    // default verify catches it from the store's checksum alone, without reading it, and
    // names the point it damages; the first point, which does not use that pack, is whole.
    let mid = last_bytes.len() / 2;
    last_bytes[mid] ^= 0xff;
    let tampered = d.path("tampered.pack");
    std::fs::write(&tampered, &last_bytes).unwrap();
    moto.overwrite("rewind", last, &tampered);
    let (ok, r) = verify_json(&d, &env, &[]);
    assert!(!ok, "{r}");
    assert_eq!(r["store"]["bytes_read"], 0, "{r}");
    let bad = r["bad"].as_array().unwrap();
    assert!(!bad.is_empty(), "{r}");
    let id = |p: &serde_json::Value| p["point"].as_u64().unwrap();
    for b in bad {
        assert!(b["error"].as_str().unwrap().contains("ETag"), "{b}");
        assert_eq!(b["points"], serde_json::json!([["vm1", id(&p2)]]), "{b}");
    }
    assert_eq!(restored(&d, &env, id(&p1)), want1);
}

#[test]
fn gc_merges_small_pack_objects_into_full_ones_and_every_point_stays_whole() {
    let Some((d, moto, env)) = with_moto() else {
        return;
    };
    let rx = serve(&d, "s3://rewind/rp", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 32 * MIB);
    let mut rng = rand::rng();
    let mut wants = Vec::new();
    // A seed and five small incrementals: every upload stream ends with a small pack object.
    disk::random_blocks(&vda, BLOCK, 0, 64, &mut rng);
    for i in 0..6u64 {
        if i > 0 {
            disk::random_blocks(&vda, BLOCK, 100 + 10 * i, 4, &mut rng);
        }
        let p = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
        wants.push((
            p["point"].as_u64().unwrap(),
            copy_digest(&d, &vda, &format!("want{i}.raw")),
        ));
    }
    drop(rx);
    let before = moto.keys("rewind", "rp/packs/");
    assert!(before.len() >= 6, "{before:?}");
    let o = receiver(&d, &env, &["gc", "--grace", "0", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Nothing was dead: every small pack was merged into one new object, and the old objects
    // went after a catalog snapshot that no longer names them.
    assert_eq!(r["chunks_removed"], 0, "{r}");
    assert_eq!(r["packs_repacked"], before.len() as u64, "{r}");
    assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
    let after = moto.keys("rewind", "rp/packs/");
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(!before.contains(&after[0]));
    assert!(!moto.keys("rewind", "rp/catalog/").is_empty());
    for (point, want) in wants {
        empty_cache(&d);
        assert_eq!(restored(&d, &env, point), want);
    }
    let v = receiver(&d, &env, &["verify", "--json"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn a_store_unreachable_for_30_s_mid_seed_costs_no_resend_of_what_is_durable() {
    let Some((d, moto, _)) = with_moto() else {
        return;
    };
    let link = FaultLink::start(moto.addr).unwrap();
    let mut env = moto.env();
    env[0].1 = format!("http://{}", link.addr);
    let rx = serve(&d, "s3://rewind/cut", &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 256 * MIB);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 3600, &mut rng);
    let want = copy_digest(&d, &vda, "want.raw");

    // The store goes away for 30 s as soon as the seed's first pack object is in the bucket
    // (the link resets every connection; moto itself is watched directly). The seed either
    // waits the outage out or fails naming the object store; then the next sync resumes,
    // sending only what was not durable.
    let outage = || {
        link.set(LinkMode::Down);
        // The outage itself lasts 30 s of wall time (what is tested, not a wait for a result).
        std::thread::sleep(std::time::Duration::from_secs(30));
        link.set(LinkMode::Pass);
    };
    let published = || !moto.keys("rewind", "cut/packs/").is_empty();
    let p = s3::seed_through_fault(&d, &rx, (&vda, 3600), published, outage, "object store");
    drop(rx);
    empty_cache(&d);
    assert_eq!(restored(&d, &env, p["point"].as_u64().unwrap()), want);
}
