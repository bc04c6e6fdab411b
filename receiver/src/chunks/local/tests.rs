//! Local packs against their bytes on disk: the pinned format, and reads back through every
//! path a reader takes.

use super::*;
use crate::chunks::format::{PACK_MAGIC, RECORD_HEADER};
use crate::chunks::ChunkLocation;
use rewind_proto::BlockHash;

/// The frame of `len` bytes at `offset` in pack `pack`.
fn at(pack: i64, offset: u64, len: u32) -> ChunkLocation {
    ChunkLocation {
        pack: PackId(pack),
        offset,
        len,
    }
}

/// A data folder with its packs folder, and the store on it.
fn store() -> (tempfile::TempDir, LocalPacks) {
    let dir = tempfile::tempdir().expect("tempdir");
    let packs = LocalPacks::create(dir.path()).expect("create");
    (dir, packs)
}

/// The on-disk bytes of a pack, pinned: a change here is a format change (a new magic),
/// never an accident.
#[test]
fn golden_pack_bytes() {
    let (dir, packs) = store();
    let mut w = packs.writer();
    w.open_pack(PackId(0x2a)).expect("open");
    let loc = w.append(&BlockHash([0xab; 32]), b"frame").expect("append");
    w.sync().expect("sync");
    let bytes = std::fs::read(dir.path().join("packs/000000000000002a.pack")).expect("read");
    let mut want = b"RWPACK01RWCK".to_vec();
    want.extend([0xab; 32]);
    want.extend([5, 0, 0, 0]);
    want.extend(b"frame");
    assert_eq!(bytes, want);
    assert_eq!(
        loc.offset,
        8 + RECORD_HEADER,
        "the catalog's offset is the frame's"
    );
    assert_eq!(packs.stored_packs().expect("list"), vec![PackId(0x2a)]);
}

#[test]
fn append_then_read_back() {
    let (_dir, packs) = store();
    let mut w = packs.writer();
    assert!(w.needs_pack());
    w.open_pack(PackId(7)).expect("open");
    let h1 = BlockHash([1; 32]);
    let h2 = BlockHash([2; 32]);
    let l1 = w.append(&h1, b"first frame").expect("append");
    let l2 = w.append(&h2, b"second").expect("append");
    w.sync().expect("sync");
    assert_eq!((l1.pack, l2.pack), (PackId(7), PackId(7)));
    assert_eq!((l1.len, l2.len), (11, 6));
    let mut r = packs.reader(ReadOrder::Sequential);
    assert_eq!(r.read(l1, &h1).expect("read"), b"first frame");
    assert_eq!(r.read(l2, &h2).expect("read"), b"second");
    assert!(matches!(
        r.read(l2, &h1),
        Err(ChunkStoreError::BadRecord { .. })
    ));
    assert!(matches!(
        r.read(at(7, 3, 6), &h1),
        Err(ChunkStoreError::BadRecord { .. })
    ));
    // The same records through a prepared read, on another thread.
    let p = r.prepare(l1, &h1).expect("prepare");
    let frame = std::thread::spawn(move || p.frame().expect("frame").into_owned())
        .join()
        .expect("thread");
    assert_eq!(frame, b"first frame");
    let mut random = packs.reader(ReadOrder::Random);
    let p = random.prepare(l2, &h2).expect("prepare");
    assert_eq!(&*p.frame().expect("frame"), b"second");
    let p = random.prepare(l2, &h1).expect("prepare");
    assert!(matches!(p.frame(), Err(ChunkStoreError::BadRecord { .. })));
}

#[test]
fn records_of_odd_sizes_survive_partial_page_rewrites() {
    let (dir, packs) = store();
    let mut w = packs.writer();
    w.open_pack(PackId(1)).expect("open");
    let mut placed = Vec::new();
    for n in 0..60u32 {
        let frame: Vec<u8> = (0..(n * 677 + 13) % 9000 + 1)
            .map(|i| (i * 7 + n) as u8)
            .collect();
        let hash = BlockHash([n as u8; 32]);
        let loc = w.append(&hash, &frame).expect("append");
        placed.push((hash, loc, frame));
        if n % 7 == 3 {
            w.sync().expect("sync");
        }
    }
    w.sync().expect("sync");
    let end = placed
        .last()
        .map(|(_, l, f)| l.offset + f.len() as u64)
        .expect("records");
    let path = pack_path(&dir.path().join(PACKS_DIR), PackId(1));
    assert_eq!(
        fs::metadata(&path).expect("stat").len(),
        end,
        "no page padding left"
    );
    let mut r = packs.reader(ReadOrder::Sequential);
    for (hash, loc, frame) in &placed {
        assert_eq!(&r.read(*loc, hash).expect("read"), frame);
    }
    // A second pack starts clean; the first one's bytes stay.
    w.open_pack(PackId(2)).expect("second pack");
    let l = w.append(&BlockHash([9; 32]), b"next").expect("append");
    w.sync().expect("sync");
    assert_eq!(l, at(2, PACK_MAGIC.len() as u64 + RECORD_HEADER, 4));
    assert_eq!(w.take_retired(), vec![PackId(1).into()]);
    assert_eq!(w.current(), Some(PackId(2)));
    let (hash, loc, frame) = &placed[0];
    assert_eq!(&r.read(*loc, hash).expect("read"), frame);
    assert_eq!(r.read(l, &BlockHash([9; 32])).expect("read"), b"next");
}

#[test]
fn a_window_read_at_the_end_of_a_growing_pack_serves_later_records() {
    let (_dir, packs) = store();
    let mut w = packs.writer();
    w.open_pack(PackId(1)).expect("open");
    let a = vec![1u8; 5000];
    let la = w.append(&BlockHash([1; 32]), &a).expect("append");
    w.sync().expect("sync");
    let mut r = packs.reader(ReadOrder::Sequential);
    // In order from the start of the pack: read as a window reaching the file's end.
    assert_eq!(r.read(la, &BlockHash([1; 32])).expect("read"), a);
    let b = vec![2u8; 300];
    let lb = w.append(&BlockHash([2; 32]), &b).expect("append");
    w.sync().expect("sync");
    assert_eq!(
        r.read(lb, &BlockHash([2; 32])).expect("read later record"),
        b
    );
}

#[test]
fn impossible_places_are_errors() {
    let (_dir, packs) = store();
    let mut w = packs.writer();
    w.open_pack(PackId(1)).expect("open");
    let l = w.append(&BlockHash([1; 32]), b"frame").expect("append");
    w.sync().expect("sync");
    let mut r = packs.reader(ReadOrder::Sequential);
    let h = BlockHash([1; 32]);
    for (offset, len) in [
        (u64::MAX - 2, 100),
        (3, 5),
        (l.offset, u32::MAX),
        (l.offset + (1 << 40), 5),
    ] {
        assert!(
            matches!(
                r.read(at(1, offset, len), &h),
                Err(ChunkStoreError::BadRecord { .. }) | Err(ChunkStoreError::Io { .. })
            ),
            "offset {offset} len {len}"
        );
    }
    assert_eq!(r.read(l, &h).expect("still readable"), b"frame");
}

#[test]
fn gc_sees_only_pack_files_and_removes_them_once() {
    let (dir, packs) = store();
    let mut w = packs.writer();
    w.open_pack(PackId(3)).expect("open");
    w.append(&BlockHash([3; 32]), b"frame").expect("append");
    w.sync().expect("sync");
    let folder = dir.path().join(PACKS_DIR);
    // Not a pack's name: left alone.
    fs::write(folder.join("3.pack"), b"x").expect("write");
    fs::write(folder.join("notes.txt"), b"x").expect("write");
    assert_eq!(packs.stored_packs().expect("list"), vec![PackId(3)]);
    let stat = packs.pack_stat(PackId(3)).expect("stat");
    assert_eq!(stat.size, PACK_MAGIC.len() as u64 + RECORD_HEADER + 5);
    assert!(stat.modified_us.is_some());
    assert!(packs.pack_stat(PackId(4)).is_none());
    assert_eq!(packs.stored_bytes(), stat.size + 2);
    packs.remove_pack(PackId(3)).expect("remove");
    packs.remove_pack(PackId(3)).expect("a pack already gone");
    packs.sync_removals();
    assert!(packs.stored_packs().expect("list").is_empty());
    // A data folder without packs holds none, and reading it creates nothing.
    let empty = tempfile::tempdir().expect("tempdir");
    let none = LocalPacks::new(empty.path());
    assert!(none.stored_packs().expect("list").is_empty());
    assert_eq!(none.stored_bytes(), 0);
    assert!(!empty.path().join(PACKS_DIR).exists());
}
