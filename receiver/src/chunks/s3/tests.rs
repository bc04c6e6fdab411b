//! The object cache's bound, without a store: packs are put into the cache folder as a
//! publish or a download puts them, and counted in as they do.

use super::*;

const PACK: u64 = 1024;
const LIMIT: u64 = 10 * PACK;

/// A store whose bucket is never contacted (nothing here sends a request), caching up to
/// [`LIMIT`] bytes, in a fresh data folder.
fn open() -> (tempfile::TempDir, S3Packs) {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = S3Target {
        endpoint: "http://127.0.0.1:9".parse().expect("url"),
        bucket: "b".into(),
        prefix: String::new(),
        region: "r".into(),
        path_style: true,
        credentials: rusty_s3::Credentials::new("k", "s"),
    };
    let packs = S3Packs::open(dir.path(), &target, LIMIT).expect("open");
    (dir, packs)
}

/// Puts pack `id` into the cache folder and counts it in, as a publish does.
fn add(packs: &S3Packs, id: i64) {
    let id = PackId(id);
    fs::write(packs.shared.cache.join(pack_name(id)), [0u8; PACK as usize]).expect("write");
    packs.shared.evict(id, PACK);
}

/// Bytes of the cache folder and the ids in it.
fn cached(packs: &S3Packs) -> (u64, Vec<i64>) {
    let mut p = packs_in(&packs.shared.cache);
    p.sort_by_key(|p| p.0);
    (
        p.iter().map(|p| p.1).sum(),
        p.iter().map(|p| p.0 .0).collect(),
    )
}

#[test]
fn the_cache_stays_within_its_bound_over_many_packs_and_keeps_the_newest() {
    let (_dir, packs) = open();
    for id in 1..=1000 {
        add(&packs, id);
        let (bytes, ids) = cached(&packs);
        assert!(bytes <= LIMIT, "{bytes} bytes cached after pack {id}");
        assert!(ids.contains(&id), "pack {id} was evicted as it came in");
    }
    // The least recently used went first: the last ten packs are what is left.
    assert_eq!(cached(&packs).1, (991..=1000).collect::<Vec<_>>());
}

#[test]
fn packs_another_process_adds_are_counted_within_a_bounded_number_of_adds() {
    let (_dir, packs) = open();
    add(&packs, 1);
    // Another process (a restore, a verify) fills the cache behind this one's tally.
    for id in 100..140 {
        fs::write(
            packs.shared.cache.join(pack_name(PackId(id))),
            [0u8; PACK as usize],
        )
        .expect("write");
    }
    assert!(cached(&packs).0 > LIMIT);
    // The tally may still believe there is room, but a recount comes within RECOUNT_EVERY
    // adds of this process, and from then on the bound holds.
    let mut back = None;
    for id in 2..(2 + i64::from(RECOUNT_EVERY) + 1) {
        add(&packs, id);
        if back.is_none() && cached(&packs).0 <= LIMIT {
            back = Some(id);
        }
        if back.is_some() {
            assert!(cached(&packs).0 <= LIMIT, "the bound broke again at {id}");
        }
    }
    assert!(back.is_some(), "the cache never came back within its bound");
}

#[test]
fn slots_let_that_many_holders_in_at_once_and_the_next_only_when_one_leaves() {
    use std::sync::mpsc;
    use std::time::Duration;
    let slots = Arc::new(Slots::new(2));
    let (inside, entered) = mpsc::channel::<usize>();
    let mut leave = Vec::new();
    let mut threads = Vec::new();
    for n in 0..3 {
        let (go, gone) = mpsc::channel::<()>();
        leave.push(go);
        let (slots, inside) = (slots.clone(), inside.clone());
        threads.push(std::thread::spawn(move || {
            let _slot = slots.take();
            let _ = inside.send(n);
            let _ = gone.recv();
        }));
    }
    let wait = Duration::from_secs(30);
    let mut first = [
        entered.recv_timeout(wait).expect("a holder"),
        entered.recv_timeout(wait).expect("a second holder at once"),
    ];
    first.sort_unstable();
    // The third waits while both slots are held (it can only get in once one leaves).
    assert!(entered.recv_timeout(Duration::from_millis(300)).is_err());
    let _ = leave[first[0]].send(());
    let third = entered
        .recv_timeout(wait)
        .expect("the third, once a slot was given back");
    assert!(!first.contains(&third));
    for go in leave {
        let _ = go.send(());
    }
    for t in threads {
        t.join().expect("holder");
    }
}
