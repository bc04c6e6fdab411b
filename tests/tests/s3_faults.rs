//! Object-store faults between the receiver and a real S3 server on loopback (moto_server),
//! made by our meddling proxy (`rewind_tests::s3proxy`): a multipart upload whose second part
//! the store refuses is aborted and leaves no part behind, and a store that serves rotten bytes
//! under intact metadata is caught by a deep verify, whose damage the agent then heals.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_receiver::chunks::location::{Location, StoreTable};
use rewind_receiver::chunks::s3::{S3Client, S3Error};
use rewind_tests::s3::{
    copy_digest, empty_cache, restored, serve, verify_json, with_moto, Env, Moto,
};
use rewind_tests::s3proxy::{Meddle, S3Proxy};
use rewind_tests::{disk, Deployment};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

/// An S3 client for bucket `rewind`, prefix `big`, reaching the store at `endpoint`.
fn client(d: &Deployment, endpoint: String) -> S3Client {
    let creds = d.path("creds.toml");
    std::fs::write(
        &creds,
        "access_key_id = \"rewind-test\"\nsecret_access_key = \"rewind-test-secret\"\n",
    )
    .unwrap();
    let table = StoreTable {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        credentials_file: Some(creds),
        ..StoreTable::default()
    };
    let loc = Location::new("s3://rewind/big", &table).unwrap();
    S3Client::new(&loc.target().unwrap()).unwrap()
}

/// A file of `len` random bytes at `name`; returns its path and bytes.
fn random_file(d: &Deployment, name: &str, len: u64) -> (std::path::PathBuf, Vec<u8>) {
    let file = d.path(name);
    let mut bytes = vec![0u8; len as usize];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    std::fs::write(&file, &bytes).unwrap();
    (file, bytes)
}

#[test]
fn a_large_object_goes_up_in_parts_and_comes_back_whole() {
    let Some((d, moto, _)) = with_moto() else {
        return;
    };
    let client = client(&d, moto.endpoint());
    // 12 MiB and a bit in parts of 5 MiB: three parts, the last one short.
    let (file, bytes) = random_file(&d, "big.bin", 12 * MIB + 12345);
    assert!(client
        .put_file_in("catalog/big.sqlite", &file, 5 * MIB)
        .unwrap());
    // One request to start, one per part, one to complete.
    assert_eq!(client.counters.puts.load(Ordering::Relaxed), 5);
    let back = d.path("back.bin");
    let n = client
        .get_file("catalog/big.sqlite", &back, 64 * MIB)
        .unwrap();
    assert_eq!(n, bytes.len() as u64);
    assert_eq!(std::fs::read(&back).unwrap(), bytes);
    // The store made one object of the three parts (a multipart ETag names its part count).
    let stat = client.stat("catalog/big.sqlite").unwrap().unwrap();
    assert_eq!(stat.size, bytes.len() as u64);
    assert!(stat.etag.unwrap().ends_with("-3"));
    // A small file is one create-only PUT.
    std::fs::write(&file, b"small").unwrap();
    assert!(client
        .put_file_in("catalog/small.sqlite", &file, 5 * MIB)
        .unwrap());
    assert!(!client
        .put_file_in("catalog/small.sqlite", &file, 5 * MIB)
        .unwrap());
}

#[test]
fn a_multipart_upload_refused_part_way_is_aborted_and_leaves_no_part_behind() {
    let Some((d, moto, _)) = with_moto() else {
        return;
    };
    let proxy = S3Proxy::start(moto.addr, |r| {
        if r.method == "PUT" && r.target.contains("partNumber=2") {
            Meddle::Refuse
        } else {
            Meddle::Pass
        }
    });
    let client = client(&d, proxy.endpoint());
    let (file, _) = random_file(&d, "big.bin", 12 * MIB + 12345);
    let err = client
        .put_file_in("catalog/big.sqlite", &file, 5 * MIB)
        .unwrap_err();
    assert!(
        matches!(&err, S3Error::Refused { status: 403, code, .. } if code == "AccessDenied"),
        "{err}"
    );
    // Refused once (a refusal is not retried), the third part never sent, the upload aborted.
    let seen = proxy.requests();
    assert_eq!(proxy.count(Meddle::Refuse), 1, "{seen:?}");
    assert!(
        !seen.iter().any(|(_, t)| t.contains("partNumber=3")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(m, t)| m == "DELETE" && t.contains("uploadId=")),
        "{seen:?}"
    );
    // The store holds no open upload (no billed parts) and no object.
    assert_eq!(moto.uploads("rewind"), Vec::<String>::new());
    assert_eq!(moto.keys("rewind", "big/"), Vec::<String>::new());
}

#[test]
fn a_store_without_versions_is_asked_for_them_once_and_reads_and_deletes_go_on() {
    let Some((d, moto, _)) = with_moto() else {
        return;
    };
    // The store answers every version listing 501, as Garage does.
    let proxy = S3Proxy::start(moto.addr, |r| {
        if r.target.contains("versions") {
            Meddle::NotImplemented
        } else {
            Meddle::Pass
        }
    });
    let client = client(&d, proxy.endpoint());
    for n in ["a", "b", "c"] {
        client.put_new(&format!("x/{n}"), b"bytes").unwrap();
    }
    // An object that is not there reads as not there: the listing's 501 leaves the 404.
    let err = client.get("x/none", 1024).unwrap_err();
    assert!(
        matches!(&err, S3Error::Refused { status: 404, .. }),
        "{err}"
    );
    for n in ["a", "b", "c"] {
        client.delete(&format!("x/{n}")).unwrap();
    }
    // One listing asked in all (the 501 is remembered), then plain DELETEs: every object gone.
    let seen = proxy.requests();
    assert_eq!(proxy.count(Meddle::NotImplemented), 1, "{seen:?}");
    let deletes = seen
        .iter()
        .filter(|(m, t)| m == "DELETE" && !t.contains("versionId"))
        .count();
    assert_eq!(deletes, 3, "{seen:?}");
    assert_eq!(moto.keys("rewind", "big/x/"), Vec::<String>::new());
}

/// The pack objects of the receiver at `s3://rewind/v`.
fn packs(moto: &Moto) -> usize {
    moto.keys("rewind", "v/packs/").len()
}

#[test]
fn a_deep_verify_catches_bytes_rotten_under_intact_metadata_and_the_agent_heals_them() {
    let Some((d, moto, _)) = with_moto() else {
        return;
    };
    // The receiver reaches the store through the proxy throughout (the data folder records
    // its endpoint); while `rot` is set, every pack GET comes back with one byte flipped,
    // while the store's metadata (HEAD: size, ETag, checksum) stays intact.
    let rot = Arc::new(AtomicBool::new(false));
    let r = rot.clone();
    let proxy = S3Proxy::start(moto.addr, move |req| {
        if r.load(Ordering::Relaxed) && req.method == "GET" && req.target.contains("/packs/") {
            Meddle::FlipBody
        } else {
            Meddle::Pass
        }
    });
    let env: Env = moto
        .env()
        .into_iter()
        .map(|(k, v)| match k {
            "AWS_ENDPOINT_URL" => (k, proxy.endpoint()),
            _ => (k, v),
        })
        .collect();
    let url = "s3://rewind/v";
    let rx = serve(&d, url, &env);
    let vda = d.path("vda.raw");
    disk::create(&vda, 32 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 300, &mut rand::rng());
    let p1 = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let p1 = p1["point"].as_u64().unwrap();
    let want = copy_digest(&d, &vda, "want.raw");
    drop(rx);
    let objects = packs(&moto);
    assert!(objects > 0);

    rot.store(true, Ordering::Relaxed);
    // A default verify reads nothing back, so it cannot see the rot: clean, 0 bytes read.
    let (ok, r) = verify_json(&d, &env, &[]);
    assert!(ok, "{r}");
    assert_eq!(r["store"]["bytes_read"], 0, "{r}");
    assert_eq!(proxy.count(Meddle::FlipBody), 0);
    // A deep verify reads every pack back and finds none is the bytes it uploaded: each of
    // their chunks is quarantined, and the point they damage is named.
    let (ok, r) = verify_json(&d, &env, &["--deep", "--budget-mib", "1024"]);
    assert!(!ok, "{r}");
    assert_eq!(r["store"]["packs_read_back"], objects as u64, "{r}");
    assert_eq!(proxy.count(Meddle::FlipBody), objects);
    let bad = r["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 300, "{r}");
    for b in bad {
        let error = b["error"].as_str().unwrap();
        assert!(error.contains("not the ones uploaded"), "{b}");
        assert_eq!(b["points"], serde_json::json!([["vm1", p1]]), "{b}");
    }
    rot.store(false, Ordering::Relaxed);

    // The agent's next sync sends every quarantined block again; the point it makes and the
    // first one both restore bit-exact from the bucket, and a deep verify is clean.
    let rx = serve(&d, url, &env);
    let healed = d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    assert_eq!(healed["disks"][0]["healed_blocks"], 300, "{healed}");
    drop(rx);
    empty_cache(&d);
    assert_eq!(restored(&d, &env, p1), want);
    assert_eq!(restored(&d, &env, healed["point"].as_u64().unwrap()), want);
    let (ok, r) = verify_json(&d, &env, &["--deep", "--budget-mib", "1024"]);
    assert!(ok, "{r}");
}
