//! The write path end to end on a real store: group staging, commits whole and in steps,
//! grown disks, and what a refused or interrupted commit leaves behind.

use super::*;
use rusqlite::params;

fn block(byte: u8) -> (BlockHash, IncomingChunk) {
    let data = vec![byte; 4096];
    let hash = BlockHash::of(&data);
    let frame = rewind_proto::chunk::compress(&data).expect("compress");
    (
        hash,
        IncomingChunk {
            hash,
            frame: frame.into(),
        },
    )
}

fn entry(index: u64, leaf: BlockHash) -> Entry {
    Entry {
        pos: 0,
        index,
        leaf,
    }
}

fn staged(store: &Store, session: &str) -> i64 {
    store
        .conn()
        .query_row(
            "SELECT count(*) FROM session_blocks WHERE session_id = ?1",
            [session],
            |r| r.get(0),
        )
        .expect("count")
}

fn open() -> (tempfile::TempDir, Store, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let spec = BeginSpec {
        vm: "vm".into(),
        disks: vec![DiskSpec {
            name: "vda".into(),
            geometry: DiskGeometry::new(16 * 4096, 4096).expect("geometry"),
        }],
        base_point: None,
        resume: None,
        keyring: None,
        wrapped: Vec::new(),
        copy_of: None,
    };
    let session = store.begin("agent", &spec).expect("begin").session;
    (dir, store, session)
}

#[test]
fn a_group_stages_blocks_using_chunks_sent_by_another_batch_of_it() {
    let (_dir, store, session) = open();
    let (a, ca) = block(1);
    let (b, cb) = block(2);
    let first = store
        .verify_batch(
            "agent",
            &session,
            vec![entry(0, a), entry(1, b)],
            vec![ca, cb],
        )
        .expect("verify first");
    // The second batch only refers to chunks the first one sends.
    let second = store
        .verify_batch("agent", &session, vec![entry(2, a), entry(3, b)], vec![])
        .expect("verify second");
    let mut w = store.chunk_writer();
    let stats = store
        .stage_batches("agent", vec![first, second], &mut *w)
        .expect("stage");
    assert_eq!((stats.entries, stats.chunks_stored), (4, 2));
    assert_eq!(staged(&store, &session), 4);
}

/// Stages `leaves` (index -> leaf) for a session of a `blocks`-block disk of 4 KiB blocks,
/// in batches of at most MAX_BATCH_ENTRIES, sending the chunks with the first batch.
fn stage_all(
    store: &Store,
    session: &str,
    leaves: &[(u64, BlockHash)],
    chunks: Vec<IncomingChunk>,
) {
    let mut chunks = Some(chunks);
    let mut w = store.chunk_writer();
    for part in leaves.chunks(MAX_BATCH_ENTRIES) {
        let entries = part.iter().map(|&(i, l)| entry(i, l)).collect();
        let b = store
            .verify_batch("agent", session, entries, chunks.take().unwrap_or_default())
            .expect("verify");
        store
            .stage_batches("agent", vec![b], &mut *w)
            .expect("stage");
    }
    store.finish_upload(&mut *w).expect("finish");
}

fn reference_root(geometry: &DiskGeometry, leaves: &[(u64, BlockHash)]) -> DiskRoot {
    let mut b = tree::Builder::new(Shape::of(geometry));
    let mut next = 0;
    for &(i, l) in leaves {
        b.push_zeros(i - next);
        b.push(l);
        next = i + 1;
    }
    tree::root(geometry, b.finish())
}

fn nodes_at(store: &Store, point: i64) -> i64 {
    store
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM nodes WHERE point = ?1",
            [point],
            |r| r.get(0),
        )
        .expect("count")
}

#[test]
fn a_large_session_commits_in_steps_to_the_same_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let blocks = 600_000u64;
    let geometry = DiskGeometry::new(blocks * 4096, 4096).expect("geometry");
    let spec = BeginSpec {
        vm: "vm".into(),
        disks: vec![DiskSpec {
            name: "vda".into(),
            geometry,
        }],
        base_point: None,
        resume: None,
        keyring: None,
        wrapped: Vec::new(),
        copy_of: None,
    };
    let (a, ca) = block(1);
    let (b, cb) = block(2);
    // A dense run, then scattered blocks (one per level-1 node: the costly shape).
    let mut leaves: Vec<(u64, BlockHash)> = (0..70_000)
        .map(|i| (i, if i % 3 == 0 { b } else { a }))
        .collect();
    leaves.extend((300..2_000).map(|k| (k * 256 + 7, a)));
    let root = reference_root(&geometry, &leaves);

    // A wrong root: refused, and nothing of the steps stays behind.
    let session = store.begin("agent", &spec).expect("begin").session;
    stage_all(&store, &session, &leaves, vec![ca.clone(), cb.clone()]);
    let before: i64 = store
        .conn()
        .query_row("SELECT COUNT(*) FROM nodes", [], |r| r.get(0))
        .expect("count");
    let err = store
        .commit(
            "agent",
            &session,
            &[("vda".into(), DiskRoot([9; 32]))],
            &PointMeta::default(),
        )
        .expect_err("wrong root");
    assert!(matches!(err, StoreError::RootMismatch { .. }), "{err}");
    let after: i64 = store
        .conn()
        .query_row(
            "SELECT (SELECT COUNT(*) FROM nodes) + (SELECT COUNT(*) FROM pending_commits)
               + (SELECT COUNT(*) FROM disks) + (SELECT COUNT(*) FROM points)",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(after, before, "a refused stepped commit leaves nothing");

    // The right root commits, and the point holds exactly the staged leaves.
    let done = store
        .commit(
            "agent",
            &session,
            &[("vda".into(), root)],
            &PointMeta::default(),
        )
        .expect("commit in steps");
    assert_eq!(staged(&store, &session), 0, "staged rows dropped");
    let mut got = Vec::new();
    let mut start = 0;
    loop {
        let page = store
            .point_leaves("agent", "vm", done.point, "vda", start, 65_536)
            .expect("leaves");
        assert_eq!(page.root, root);
        got.extend(page.leaves);
        match page.next {
            Some(n) => start = n,
            None => break,
        }
    }
    assert_eq!(got, leaves);
    let pending: i64 = store
        .conn()
        .query_row("SELECT COUNT(*) FROM pending_commits", [], |r| r.get(0))
        .expect("count");
    assert_eq!(pending, 0);
}

/// A disk that grew since its base continues the same generation; in one transaction or
/// in steps, the commit recomputes the old right edge and the root is the grown disk's.
#[test]
fn a_grown_disk_commits_as_a_delta_whole_and_in_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let spec = |blocks: u64, base: Option<i64>| BeginSpec {
        vm: "vm".into(),
        disks: vec![DiskSpec {
            name: "vda".into(),
            geometry: DiskGeometry::new(blocks * 4096, 4096).expect("geometry"),
        }],
        base_point: base,
        resume: None,
        keyring: None,
        wrapped: Vec::new(),
        copy_of: None,
    };
    let (a, ca) = block(1);
    let (b, cb) = block(2);
    let mut leaves: Vec<(u64, BlockHash)> = (0..300).map(|i| (i, a)).collect();
    let mut base = None;
    for (blocks, new, chunks) in [
        (300u64, leaves.clone(), vec![ca]),
        // Grown, nothing written: only the edge changes the tree.
        (1_000, Vec::new(), Vec::new()),
        // Grown past a stepped commit's size, with writes old and new.
        (
            600_000,
            (0..70_000u64)
                .map(|i| (i * 8 + 5, b))
                .chain([(17, b)])
                .collect(),
            vec![cb],
        ),
    ] {
        let plan = store.begin("agent", &spec(blocks, base)).expect("begin");
        let want = if base.is_some() {
            DiskMode::Delta
        } else {
            DiskMode::Full
        };
        assert_eq!(
            plan.modes,
            vec![("vda".to_owned(), want)],
            "{blocks} blocks"
        );
        let mut staged_now = new.clone();
        staged_now.sort_by_key(|&(i, _)| i);
        stage_all(&store, &plan.session, &staged_now, chunks);
        for (i, l) in new {
            match leaves.binary_search_by_key(&i, |&(j, _)| j) {
                Ok(k) => leaves[k].1 = l,
                Err(k) => leaves.insert(k, (i, l)),
            }
        }
        let geometry = spec(blocks, None).disks[0].geometry;
        let root = reference_root(&geometry, &leaves);
        let done = store
            .commit(
                "agent",
                &plan.session,
                &[("vda".into(), root)],
                &PointMeta::default(),
            )
            .unwrap_or_else(|e| panic!("{blocks} blocks: {e}"));
        base = Some(done.point);
    }
    let disks: i64 = store
        .conn()
        .query_row("SELECT COUNT(*) FROM disks", [], |r| r.get(0))
        .expect("count");
    assert_eq!(disks, 1, "one disk generation for the whole chain");
    // A shrink starts a new generation.
    let plan = store.begin("agent", &spec(500, base)).expect("begin");
    assert_eq!(plan.modes, vec![("vda".to_owned(), DiskMode::Full)]);
}

#[test]
fn a_commit_first_removes_what_an_earlier_stepped_commit_of_its_vm_left() {
    let (_dir, store, s1) = open();
    let geometry = DiskGeometry::new(16 * 4096, 4096).expect("geometry");
    let (a, ca) = block(1);
    let first = vec![(0, a)];
    stage_all(&store, &s1, &first, vec![ca]);
    let p1 = store
        .commit(
            "agent",
            &s1,
            &[("vda".into(), reference_root(&geometry, &first))],
            &PointMeta::default(),
        )
        .expect("first point")
        .point;
    // A stepped commit that failed and could not clean up: its nodes at the next id.
    let (b, _) = block(2);
    {
        let conn = store.conn();
        let disk: i64 = conn
            .query_row(
                "SELECT disk_id FROM point_disks WHERE point_id = ?1",
                [p1],
                |r| r.get(0),
            )
            .expect("disk");
        for idx in 0..16 {
            conn.execute(
                "INSERT INTO nodes(disk_id, level, idx, point, hash) VALUES (?1, 0, ?2, ?3, ?4)",
                params![disk, idx, p1 + 1, &b.0[..]],
            )
            .expect("orphan");
        }
        conn.execute(
            "INSERT INTO pending_commits(session_id, vm_id, point, disks, new_disks)
             VALUES ('gone', 1, ?1, ?2, '[]')",
            params![p1 + 1, format!("[{disk}]")],
        )
        .expect("pending");
    }
    let spec = BeginSpec {
        vm: "vm".into(),
        disks: vec![DiskSpec {
            name: "vda".into(),
            geometry,
        }],
        base_point: Some(p1),
        resume: None,
        keyring: None,
        wrapped: Vec::new(),
        copy_of: None,
    };
    let s2 = store.begin("agent", &spec).expect("begin").session;
    let second = vec![(1, a)];
    stage_all(&store, &s2, &second, vec![]);
    let both = vec![(0, a), (1, a)];
    store
        .commit(
            "agent",
            &s2,
            &[("vda".into(), reference_root(&geometry, &both))],
            &PointMeta::default(),
        )
        .expect("the orphans are gone before the commit reads its tree");
    let orphans: i64 = store
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM nodes WHERE hash = ?1",
            [&b.0[..]],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(orphans, 0);
}

#[test]
fn nodes_of_a_commit_cut_short_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, point) = {
        let store = Store::open(dir.path()).expect("store");
        let conn = store.conn();
        conn.execute_batch(
            "INSERT INTO vms(id, name, owner, created_us) VALUES (1, 'vm', 'agent', 1);
             INSERT INTO disks(id, vm_id, name, size, block_size) VALUES (7, 1, 'vda', 8192, 4096);
             INSERT INTO nodes(disk_id, level, idx, point, hash) VALUES (7, 0, 0, 42, x'01'), (7, 1, 0, 42, x'02');
             INSERT INTO pending_commits(session_id, vm_id, point, disks, new_disks) VALUES ('s', 1, 42, '[7]', '[7]');",
        )
        .expect("a commit cut short after its steps");
        ((), 42)
    };
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(nodes_at(&store, point), 0);
    let left: i64 = store
        .conn()
        .query_row(
            "SELECT (SELECT COUNT(*) FROM pending_commits) + (SELECT COUNT(*) FROM disks)",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(left, 0);
}

#[test]
fn a_damaged_pending_record_is_an_error_and_keeps_its_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("store");
        store
            .conn()
            .execute_batch(
                "INSERT INTO vms(id, name, owner, created_us) VALUES (1, 'vm', 'agent', 1);
                 INSERT INTO disks(id, vm_id, name, size, block_size) VALUES (7, 1, 'vda', 8192, 4096);
                 INSERT INTO nodes(disk_id, level, idx, point, hash) VALUES (7, 0, 0, 42, x'01');
                 INSERT INTO pending_commits(session_id, vm_id, point, disks, new_disks) VALUES ('s', 1, 42, '[7', '[7]');",
            )
            .expect("a damaged record");
    }
    // Opening the store cleans pending commits up: this one is refused, not forgotten.
    let err = Store::open(dir.path()).err().expect("refused");
    assert!(
        matches!(
            err,
            StoreError::CorruptRecord {
                what: "pending_commits.disks",
                ..
            }
        ),
        "{err:?}"
    );
    let conn = rusqlite::Connection::open(dir.path().join("catalog.sqlite")).expect("open");
    let left: i64 = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM pending_commits) + (SELECT COUNT(*) FROM nodes)",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(left, 2);
}

#[test]
fn a_refused_batch_refuses_its_whole_group() {
    let (_dir, store, session) = open();
    let (a, ca) = block(1);
    let (never_sent, _) = block(3);
    let first = store
        .verify_batch("agent", &session, vec![entry(0, a)], vec![ca])
        .expect("verify first");
    let second = store
        .verify_batch("agent", &session, vec![entry(1, never_sent)], vec![])
        .expect("verify second");
    let mut w = store.chunk_writer();
    let err = store
        .stage_batches("agent", vec![first, second], &mut *w)
        .expect_err("a block whose chunk nobody sent");
    assert!(
        matches!(err, StoreError::ChunkNotHeld { index: 1, hash, .. } if hash == never_sent),
        "{err}"
    );
    assert_eq!(staged(&store, &session), 0);
    let indexed: i64 = store
        .conn()
        .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
        .expect("count");
    assert_eq!(indexed, 0, "nothing of the group is visible");
}
