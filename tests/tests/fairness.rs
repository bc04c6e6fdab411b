//! Fair sharing of the catalog's writer: one agent's huge commit does not hold up another
//! agent's syncs.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_proto::format::{DiskGeometry, MAX_BATCH_ENTRIES};
use rewind_proto::pb;
use rewind_proto::tree::{self, Shape};
use rewind_proto::{chunk, BlockHash};
use rewind_tests::{disk, grpc, Deployment};
use std::time::{Duration, Instant};

const BLOCK: u64 = 4096;
/// Staged blocks of the huge commit: 2^21, 32 batches of the largest size.
const ENTRIES: u64 = 1 << 21;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_commit_does_not_stall_other_agents() {
    let d = Deployment::new();
    let rx = d.serve();
    let a = d.path("a.raw");
    disk::create(&a, 4 << 20);
    disk::random_blocks(&a, 65536, 0, 8, &mut rand::rng());
    d.sync_ok(&rx, "host1", "honest", &[("vda", &a)]);

    // host2 stages 2 M blocks, all of one content, then commits them.
    let mut c = grpc::as_agent(&rx.url(), &d.pki(), "host2").await.unwrap();
    let size = ENTRIES * BLOCK;
    let session = c
        .begin(pb::BeginRequest {
            vm: "huge".into(),
            disks: vec![pb::DiskSpec {
                name: "vda".into(),
                size,
                block_size: BLOCK as u32,
            }],
            base_point: 0,
            resume_session: String::new(),
            keyring: Vec::new(),
            wrapped_keys: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .session;
    let data = vec![0x5au8; BLOCK as usize];
    let leaf = BlockHash::of(&data);
    let frame = chunk::compress(&data).unwrap();
    let batches: Vec<pb::Batch> = (0..ENTRIES)
        .collect::<Vec<_>>()
        .chunks(MAX_BATCH_ENTRIES)
        .enumerate()
        .map(|(n, part)| pb::Batch {
            session: session.clone(),
            entries: part
                .iter()
                .map(|&i| pb::BlockEntry {
                    disk: 0,
                    index: i,
                    hash: leaf.0.to_vec(),
                })
                .collect(),
            chunks: if n == 0 {
                vec![pb::Chunk {
                    hash: leaf.0.to_vec(),
                    data: frame.clone().into(),
                }]
            } else {
                vec![]
            },
        })
        .collect();
    c.upload(tokio_stream::iter(batches)).await.unwrap();
    let geometry = DiskGeometry::new(size, BLOCK).unwrap();
    let mut b = tree::Builder::new(Shape::of(&geometry));
    for _ in 0..ENTRIES {
        b.push(leaf);
    }
    let root = tree::root(&geometry, b.finish());

    let started = Instant::now();
    let commit = {
        let mut c = c.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let r = c
                .commit(pb::CommitRequest {
                    session,
                    roots: vec![pb::DiskRoot {
                        name: "vda".into(),
                        root: root.0.to_vec(),
                        changed_blocks: ENTRIES,
                    }],
                    config: String::new(),
                    consistency: String::new(),
                    manifest_mac: Vec::new(),
                    taken_us: 0,
                })
                .await;
            (r, started.elapsed())
        })
    };
    // The commit is under way once it has reserved its point.
    let catalog = d.data().join("catalog.sqlite");
    let under_way = rewind_tests::wait_until(Duration::from_secs(60), || {
        rusqlite::Connection::open_with_flags(&catalog, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|conn| {
                conn.query_row("SELECT COUNT(*) FROM pending_commits", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .is_ok_and(|n| n > 0)
    });
    assert!(under_way, "the huge commit never started its steps");

    // An honest sync of new data goes through while the huge commit is still running.
    disk::random_blocks(&a, 65536, 16, 8, &mut rand::rng());
    let honest_started = Instant::now();
    let report = d.sync_ok(&rx, "host1", "honest", &[("vda", &a)]);
    let honest = honest_started.elapsed();
    eprintln!(
        "honest sync {:.3} s, commit running for {:.2} s, finished: {}",
        honest.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        commit.is_finished()
    );
    assert!(
        !commit.is_finished(),
        "the huge commit finished before the honest sync: nothing was shown"
    );
    let (r, took) = commit.await.unwrap();
    let point = r.unwrap().into_inner().point;
    eprintln!(
        "huge commit of {ENTRIES} blocks: {:.2} s; honest sync during it: {:.3} s",
        took.as_secs_f64(),
        honest.as_secs_f64()
    );
    assert_eq!(
        d.restored_digest("honest", "vda", report["point"].as_u64().unwrap()),
        disk::digest(&a)
    );
    // The huge point is whole: its listed root is the one computed here.
    let list = c
        .list_points(pb::ListPointsRequest { vm: "huge".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.points.len(), 1);
    assert_eq!(list.points[0].id, point);
    assert_eq!(list.points[0].disks[0].root, root.0.to_vec());
}

/// Stages `leaves` (index, leaf) for `session`, sending `chunks` with the first batch.
fn batches(
    session: &str,
    leaves: &[(u64, BlockHash)],
    chunks: Vec<(BlockHash, Vec<u8>)>,
) -> Vec<pb::Batch> {
    let mut chunks = Some(chunks);
    leaves
        .chunks(MAX_BATCH_ENTRIES)
        .map(|part| grpc::batch(session, part, chunks.take().unwrap_or_default()))
        .collect()
}

fn root_of(geometry: &DiskGeometry, leaves: &[(u64, BlockHash)]) -> rewind_proto::DiskRoot {
    let mut b = tree::Builder::new(Shape::of(geometry));
    let mut next = 0;
    for &(i, l) in leaves {
        b.push_zeros(i - next);
        b.push(l);
        next = i + 1;
    }
    tree::root(geometry, b.finish())
}

fn catalog_value(d: &Deployment, sql: &str) -> Option<i64> {
    let conn = rusqlite::Connection::open_with_flags(
        d.data().join("catalog.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    conn.query_row(sql, [], |r| r.get(0)).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_in_a_stepped_commit_loses_nothing() {
    let d = Deployment::new();
    let rx = d.serve();
    let p = d.pki();
    let connect = |url: String| {
        let p = p.clone();
        async move { grpc::as_agent(&url, &p, "host2").await.unwrap() }
    };
    let size = ENTRIES * BLOCK;
    let geometry = DiskGeometry::new(size, BLOCK).unwrap();
    let begin = |base: u64| pb::BeginRequest {
        vm: "huge".into(),
        disks: vec![pb::DiskSpec {
            name: "vda".into(),
            size,
            block_size: BLOCK as u32,
        }],
        base_point: base,
        resume_session: String::new(),
        keyring: Vec::new(),
        wrapped_keys: Vec::new(),
    };
    let commit = |session: String, root: rewind_proto::DiskRoot| pb::CommitRequest {
        session,
        roots: vec![pb::DiskRoot {
            name: "vda".into(),
            root: root.0.to_vec(),
            changed_blocks: 0,
        }],
        config: String::new(),
        consistency: String::new(),
        manifest_mac: Vec::new(),
        taken_us: 0,
    };
    let block = |b: u8| {
        let data = vec![b; BLOCK as usize];
        (BlockHash::of(&data), chunk::compress(&data).unwrap())
    };
    let (x, fx) = block(1);
    let (y, fy) = block(2);

    // Point 1: block 0 holds x.
    let mut c = connect(rx.url()).await;
    let s1 = c.begin(begin(0)).await.unwrap().into_inner().session;
    let first = vec![(0, x)];
    c.upload(tokio_stream::iter(batches(
        &s1,
        &first,
        vec![(x, fx.clone())],
    )))
    .await
    .unwrap();
    let p1 = c
        .commit(commit(s1, root_of(&geometry, &first)))
        .await
        .unwrap()
        .into_inner()
        .point;

    // Point 2 would set every block to y; the receiver is killed in its steps.
    let s2 = c.begin(begin(p1)).await.unwrap().into_inner().session;
    let all: Vec<(u64, BlockHash)> = (0..ENTRIES).map(|i| (i, y)).collect();
    c.upload(tokio_stream::iter(batches(&s2, &all, vec![(y, fy)])))
        .await
        .unwrap();
    let doomed = {
        let mut c = c.clone();
        let root = root_of(&geometry, &all);
        tokio::spawn(async move { c.commit(commit(s2, root)).await })
    };
    let reserved = {
        let mut got = None;
        let seen = rewind_tests::wait_until(Duration::from_secs(60), || {
            got = catalog_value(&d, "SELECT point FROM pending_commits");
            got.is_some()
        });
        assert!(seen, "the stepped commit never started");
        got.unwrap()
    };
    // Killed once some steps have written nodes at the reserved id.
    let at_reserved = format!("SELECT COUNT(*) FROM nodes WHERE point = {reserved}");
    let stepped = rewind_tests::wait_until(Duration::from_secs(60), || {
        catalog_value(&d, &at_reserved).is_some_and(|n| n > 0)
    });
    assert!(stepped, "no step wrote nodes");
    rx.kill9();
    assert!(
        doomed.await.unwrap().is_err(),
        "a killed commit reported success"
    );
    assert!(
        catalog_value(&d, "SELECT COUNT(*) FROM pending_commits") == Some(1),
        "the commit finished before the kill: nothing was shown"
    );

    // Restarted: the steps' nodes are gone, and the next point builds on point 1 alone.
    let rx = d.serve();
    assert_eq!(
        catalog_value(&d, "SELECT COUNT(*) FROM pending_commits"),
        Some(0)
    );
    assert_eq!(
        catalog_value(
            &d,
            &format!("SELECT COUNT(*) FROM nodes WHERE point = {reserved}")
        ),
        Some(0)
    );
    let mut c = connect(rx.url()).await;
    let s3 = c.begin(begin(p1)).await.unwrap().into_inner().session;
    let second = vec![(1, x)];
    c.upload(tokio_stream::iter(batches(&s3, &second, vec![])))
        .await
        .unwrap();
    let both = vec![(0, x), (1, x)];
    let p3 = c
        .commit(commit(s3, root_of(&geometry, &both)))
        .await
        .expect("the next point's root holds only its own and point 1's blocks")
        .into_inner()
        .point;
    let list = c
        .list_points(pb::ListPointsRequest { vm: "huge".into() })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<u64> = list.points.iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![p1, p3]);
}
