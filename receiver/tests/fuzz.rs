//! Fuzzing the receiver's parsers of foreign bytes with the seeded mutation driver of
//! `rewind_proto::fuzz`: chunk frames as an agent sends them, the configuration file, the NBD
//! export server's handshake and requests, upload batches, and pack records read back.
//! Every input must give a result or an error, never a panic, a hang or an allocation sized
//! by the input's numbers.

#![allow(clippy::unwrap_used)]

use prost::Message;
use rand::{Rng, SeedableRng};
use rewind_proto::format::{DiskGeometry, MAX_BATCH_ENTRIES};
use rewind_proto::fuzz::{cases, mutate, seed};
use rewind_proto::nbd::*;
use rewind_proto::tree::{self, Shape};
use rewind_proto::{chunk, pb, BlockHash};
use rewind_receiver::chunks::local::LocalPacks;
use rewind_receiver::chunks::{ChunkLocation, ChunkStore, PackId, ReadOrder};
use rewind_receiver::ingest::{BeginSpec, DiskSpec, Entry, IncomingChunk, PointMeta};
use rewind_receiver::nbd_server::{serve_client, Exports};
use rewind_receiver::points::{self, PointInfo};
use rewind_receiver::service::decode_batch;
use rewind_receiver::store::Store;
use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn chunk_frames_survive_mutation() {
    let data: Vec<u8> = (0..65_536u32).map(|i| (i * 31 % 251) as u8).collect();
    let leaf = BlockHash::of(&data);
    let frame = chunk::compress(&data).unwrap();
    assert_eq!(chunk::verify(leaf, &frame, data.len()), Ok(()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let (n, started) = (cases(), Instant::now());
    let mut accepted = 0;
    for _ in 0..n {
        let m = mutate(&frame, &mut rng);
        // A mutated frame that still passes must decode to exactly the block.
        if chunk::verify(leaf, &m, data.len()).is_ok() {
            assert_eq!(chunk::open(leaf, &m, data.len()).unwrap(), data);
            accepted += 1;
        }
    }
    eprintln!(
        "chunk frames: {n} mutations in {:.1} s, {accepted} still the block, 0 panics",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn the_receiver_configuration_survives_mutation() {
    let example = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/receiver.toml.example"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, &example).unwrap();
    rewind_receiver::config::ReceiverFile::load(&path).expect("the example loads");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let (n, started) = (cases(), Instant::now());
    let mut refused = 0;
    for _ in 0..n {
        std::fs::write(&path, mutate(&example, &mut rng)).unwrap();
        match rewind_receiver::config::ReceiverFile::load(&path) {
            // Whatever loads also yields its limits and rules without panicking.
            Ok(f) => {
                let _ = f.limits.limits();
                let _ = rewind_receiver::store::Rules::from_file(&f);
            }
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "receiver.toml: {n} mutations in {:.1} s, {refused} refused, 0 panics",
        started.elapsed().as_secs_f64()
    );
    assert!(refused > 0);
}

/// Bytes of a block that differ with `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + usize::from(seed) * 7) % 251) as u8)
        .collect()
}

/// A root over `entries` (sorted by index; the blocks between them are holes).
fn root_of(geometry: &DiskGeometry, entries: &[Entry]) -> rewind_proto::DiskRoot {
    let mut b = tree::Builder::new(Shape::of(geometry));
    let mut next = 0;
    for e in entries {
        b.push_zeros(e.index - next);
        b.push(e.leaf);
        next = e.index + 1;
    }
    tree::root(geometry, b.finish())
}

/// Block size of the exported disk.
const BLOCK: u64 = 65_536;
/// Four whole blocks and a short one.
const DISK_SIZE: u64 = 4 * BLOCK + 37_856;

/// A store in `dir` holding one committed point of VM "vm" with disk "vda": blocks 0 and 3
/// alike, block 2 a hole, block 4 short. Returns the store, the point and the disk's bytes.
fn store_with_point(dir: &Path) -> (Store, PointInfo, Vec<u8>) {
    let store = Store::open(dir).unwrap();
    let geometry = DiskGeometry::new(DISK_SIZE, BLOCK).unwrap();
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
    let session = store.begin("agent", &spec).unwrap().session;
    let mut image = vec![0u8; DISK_SIZE as usize];
    let mut entries = Vec::new();
    let mut chunks = HashMap::new();
    for (index, seed) in [(0, 1), (1, 2), (3, 1), (4, 3)] {
        let len = geometry.block_len(index).unwrap();
        let data = pattern(seed, len);
        let at = (index * BLOCK) as usize;
        image[at..at + len].copy_from_slice(&data);
        let leaf = BlockHash::of(&data);
        entries.push(Entry {
            pos: 0,
            index,
            leaf,
        });
        chunks.entry(leaf).or_insert_with(|| IncomingChunk {
            hash: leaf,
            frame: chunk::compress(&data).unwrap().into(),
        });
    }
    let mut writer = store.chunk_writer();
    let chunks = chunks.into_values().collect();
    store
        .ingest("agent", &session, entries.clone(), chunks, &mut *writer)
        .unwrap();
    store.finish_upload(&mut *writer).unwrap();
    let roots = [("vda".to_owned(), root_of(&geometry, &entries))];
    store
        .commit("agent", &session, &roots, &PointMeta::default())
        .unwrap();
    let point = points::list(&store.conn(), Some("vm"))
        .unwrap()
        .pop()
        .unwrap();
    (store, point, image)
}

/// A client connection held in memory: what the client sends, and what the server wrote.
struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Pipe {
    fn new(input: Vec<u8>) -> Pipe {
        Pipe {
            input: Cursor::new(input),
            output: Vec::new(),
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn nbd_option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn nbd_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The requests of the client transcript: kind, flags, cookie, offset, length.
const NBD_REQUESTS: [(u16, u16, u64, u64, u32); 11] = [
    (CMD_READ, 0, 1, 0, 2 * BLOCK as u32),
    (CMD_READ, 0, 2, 2 * BLOCK, BLOCK as u32),
    (CMD_READ, CMD_FLAG_DF, 3, DISK_SIZE - 5000, 5000),
    (CMD_BLOCK_STATUS, 0, 4, 0, DISK_SIZE as u32),
    (CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5, 0, DISK_SIZE as u32),
    (CMD_FLUSH, 0, 6, 0, 0),
    (CMD_WRITE, 0, 7, 0, 16),
    (CMD_READ, 0, 8, DISK_SIZE - 10, 100),
    (CMD_READ, 0, 9, 0, u32::MAX),
    (CMD_CACHE, 0, 10, 0, 4096),
    (CMD_DISC, 0, 11, 0, 0),
];

/// What a client such as qemu-img sends: fixed newstyle handshake with structured replies,
/// `base:allocation` and `NBD_OPT_GO` for "vda", then [`NBD_REQUESTS`].
fn nbd_client_transcript() -> Vec<u8> {
    let mut t = u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    nbd_option(&mut t, OPT_LIST, &[]);
    nbd_option(&mut t, OPT_STRUCTURED_REPLY, &[]);
    let mut meta = Vec::new();
    nbd_string(&mut meta, "vda");
    meta.extend_from_slice(&1u32.to_be_bytes());
    nbd_string(&mut meta, "base:allocation");
    nbd_option(&mut t, OPT_LIST_META_CONTEXT, &meta);
    nbd_option(&mut t, OPT_SET_META_CONTEXT, &meta);
    let mut go = Vec::new();
    nbd_string(&mut go, "vda");
    go.extend_from_slice(&0u16.to_be_bytes());
    nbd_option(&mut t, OPT_INFO, &go);
    nbd_option(&mut t, OPT_GO, &go);
    for (kind, flags, cookie, offset, len) in NBD_REQUESTS {
        t.extend_from_slice(&request(kind, flags, cookie, offset, len));
        if kind == CMD_WRITE {
            t.extend(std::iter::repeat_n(0xab, len as usize));
        }
    }
    t
}

/// The structured reply to `cookie` in what a server wrote: its type and payload.
fn reply_to(out: &[u8], cookie: u64) -> Option<(u16, &[u8])> {
    (0..out.len().saturating_sub(20)).find_map(|i| {
        let head = &out[i..i + 20];
        if head[..4] != STRUCTURED_REPLY_MAGIC.to_be_bytes() || head[8..16] != cookie.to_be_bytes()
        {
            return None;
        }
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        Some((
            u16::from_be_bytes([head[6], head[7]]),
            out.get(i + 20..i + 20 + len)?,
        ))
    })
}

/// Runs `work` on a thread of its own and fails if it takes longer than `limit`, naming the
/// case it was at (`work` counts its cases in the counter it is given).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    work: impl FnOnce(&AtomicUsize) -> T + Send + 'static,
) -> T {
    let at = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let at = at.clone();
        std::thread::spawn(move || {
            let _ = tx.send(work(&at));
        })
    };
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
            "{what}: case {} (seed {}) did not end within {limit:?}",
            at.load(Ordering::Relaxed),
            seed()
        ),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it ends"),
        },
    }
}

#[test]
fn the_nbd_server_survives_mutated_client_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (store, point, image) = store_with_point(dir.path());
    let exports = Exports::of_point(store.data(), &point, rewind_proto::crypt::Codec::Plain);
    let transcript = nbd_client_transcript();

    // The unmutated session is served in full: data, holes, and refusals of what is out of
    // bounds (a 4 GiB read is refused with EOVERFLOW, not allocated).
    let mut pipe = Pipe::new(transcript.clone());
    serve_client(&mut pipe, &exports).expect("the honest session is served");
    let out = &pipe.output;
    let (kind, payload) = reply_to(out, 1).unwrap();
    assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&payload[8..], &image[..2 * BLOCK as usize]);
    assert_eq!(reply_to(out, 2).unwrap().0, REPLY_TYPE_OFFSET_HOLE);
    let (kind, payload) = reply_to(out, 3).unwrap();
    assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&payload[8..], &image[DISK_SIZE as usize - 5000..]);
    assert_eq!(reply_to(out, 4).unwrap().0, REPLY_TYPE_BLOCK_STATUS);
    for (cookie, errno) in [(7, 1u32), (8, 22), (9, 75)] {
        let (kind, payload) = reply_to(out, cookie).unwrap();
        assert_eq!(kind, REPLY_TYPE_ERROR, "cookie {cookie}");
        assert_eq!(&payload[..4], &errno.to_be_bytes(), "cookie {cookie}");
    }

    let (n, started) = (cases(), Instant::now());
    let (refused, most_out) = within(Duration::from_secs(600), "nbd server", move |at| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
        let (mut refused, mut most_out) = (0, 0);
        for i in 0..n {
            at.store(i, Ordering::Relaxed);
            let input = mutate(&transcript, &mut rng);
            let mut pipe = Pipe::new(input.clone());
            if serve_client(&mut pipe, &exports).is_err() {
                refused += 1;
            }
            // What the server writes is bounded by what it was sent: per request at most the
            // disk, per option byte a few bytes of echoed name; never a length it was told.
            let bound = input.len() * 8 + (input.len() / 16 + 1) * (DISK_SIZE as usize + 256);
            assert!(
                pipe.output.len() <= bound,
                "case {i}: {} bytes written for {} sent",
                pipe.output.len(),
                input.len()
            );
            most_out = most_out.max(pipe.output.len());
        }
        (refused, most_out)
    });
    eprintln!(
        "nbd server: {n} mutated client streams in {:.1} s, {refused} refused, at most \
         {most_out} bytes written, 0 panics",
        started.elapsed().as_secs_f64()
    );
    assert!(
        refused > 0,
        "no mutation was refused: the mutations reach nothing"
    );
    drop(store);
}

/// The disks of the batch target's session: "vda" in 4 KiB blocks with a short last block,
/// and "vdb" in 64 KiB blocks.
fn batch_disks() -> [DiskGeometry; 2] {
    [
        DiskGeometry::new(10 * 4096 + 1000, 4096).unwrap(),
        DiskGeometry::new(3 * 65_536, 65_536).unwrap(),
    ]
}

/// What the batch target mutates with: the honest batch, its blocks by leaf, and hostile
/// frames (one that inflates far past any block, one followed by a skippable frame).
struct BatchKit {
    batch: pb::Batch,
    known: HashMap<BlockHash, Vec<u8>>,
    bomb: (BlockHash, Vec<u8>),
    padded: Vec<u8>,
}

fn batch_kit(session: &str) -> BatchKit {
    let disks = batch_disks();
    let mut known = HashMap::new();
    let mut entries = Vec::new();
    let mut chunks = Vec::new();
    // (disk, index, seed); seed 0 is a hole.
    for (disk, index, seed) in [
        (0, 0, 1),
        (0, 1, 2),
        (0, 2, 0),
        (0, 10, 3),
        (1, 0, 4),
        (1, 2, 0),
    ] {
        let hash = if seed == 0 {
            BlockHash([0; 32])
        } else {
            let data = pattern(seed, disks[disk as usize].block_len(index).unwrap());
            let hash = BlockHash::of(&data);
            chunks.push(pb::Chunk {
                hash: hash.0.to_vec(),
                data: chunk::compress(&data).unwrap().into(),
            });
            known.insert(hash, data);
            hash
        };
        entries.push(pb::BlockEntry {
            disk,
            index,
            hash: hash.0.to_vec(),
        });
    }
    let big = vec![1u8; 4 << 20];
    let bomb = (BlockHash::of(&big), chunk::compress(&big).unwrap());
    let mut padded = chunks[0].data.to_vec();
    // A skippable zstd frame (magic 0x184D2A50, 4 bytes of content).
    padded.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4]);
    BatchKit {
        batch: pb::Batch {
            session: session.to_owned(),
            entries,
            chunks,
        },
        known,
        bomb,
        padded,
    }
}

/// One structured change of a batch: entries and chunks that point elsewhere, claim other
/// hashes or carry other frames, and sizes past the limits.
fn twist(b: &mut pb::Batch, kit: &BatchKit, rng: &mut impl Rng) {
    let ne = b.entries.len();
    let nc = b.chunks.len();
    let e = (ne > 0).then(|| rng.random_range(0..ne));
    let c = (nc > 0).then(|| rng.random_range(0..nc));
    let any_hash = |rng: &mut dyn rand::RngCore| -> Vec<u8> {
        match rng.next_u32() % 5 {
            0 => vec![0; 32],
            1 => vec![7; 31],
            2 => vec![7; 33],
            3 => Vec::new(),
            _ => {
                let mut h = vec![0; 32];
                rng.fill_bytes(&mut h);
                h
            }
        }
    };
    match rng.random_range(0..10) {
        0 => {
            if let Some(e) = e {
                b.entries[e].disk = [1, 2, 64, u32::MAX][rng.random_range(0..4)];
            }
        }
        1 => {
            if let Some(e) = e {
                b.entries[e].index = [0, 2, 9, 10, 11, 3, 1 << 40, u64::MAX / 4096, u64::MAX]
                    [rng.random_range(0..9)];
            }
        }
        2 => {
            if let Some(e) = e {
                b.entries[e].hash = any_hash(rng);
            }
        }
        3 => {
            if ne > 1 {
                let other = rng.random_range(0..ne);
                let e = e.unwrap_or(0);
                let h = b.entries[other].hash.clone();
                b.entries[e].hash = h;
            }
        }
        4 => {
            if let Some(c) = c {
                b.chunks[c].hash = if rng.random_bool(0.5) {
                    b.chunks[rng.random_range(0..nc)].hash.clone()
                } else {
                    any_hash(rng)
                };
            }
        }
        5 => {
            if let Some(c) = c {
                b.chunks[c].data = match rng.random_range(0..5) {
                    0 => b.chunks[rng.random_range(0..nc)].data.clone(),
                    1 => mutate(&b.chunks[c].data, rng).into(),
                    2 => Vec::new().into(),
                    3 => kit.padded.clone().into(),
                    _ => kit.bomb.1.clone().into(),
                };
            }
        }
        6 => {
            // The frame that inflates to 4 MiB, sent for a block of 4 KiB or 64 KiB.
            b.chunks.push(pb::Chunk {
                hash: kit.bomb.0 .0.to_vec(),
                data: kit.bomb.1.clone().into(),
            });
            b.entries.push(pb::BlockEntry {
                disk: rng.random_range(0..2),
                index: 0,
                hash: kit.bomb.0 .0.to_vec(),
            });
        }
        7 => {
            if rng.random_bool(0.5) {
                if let Some(e) = e {
                    let dup = b.entries[e].clone();
                    b.entries.push(dup);
                }
            } else if let Some(c) = c {
                let dup = b.chunks[c].clone();
                b.chunks.push(dup);
            }
        }
        8 => {
            if rng.random_bool(0.5) {
                if let Some(e) = e {
                    b.entries.remove(e);
                }
            } else if let Some(c) = c {
                b.chunks.remove(c);
            }
        }
        _ => {
            if rng.random_ratio(1, 8) {
                // One entry past the most a batch may hold.
                let first = b.entries.first().cloned().unwrap_or_default();
                b.entries = vec![first; MAX_BATCH_ENTRIES + 1];
            } else {
                b.session = match rng.random_range(0..3) {
                    0 => String::new(),
                    1 => "0".repeat(32),
                    _ => "x".repeat(5000),
                };
            }
        }
    }
}

/// The reference model of a batch the store verified: every entry inside its disk, and
/// every chunk one of the blocks we made, sent for a block of its length.
fn verified_batch_is_sound(
    kit: &BatchKit,
    entries: &[Entry],
    chunks: &[IncomingChunk],
) -> Result<(), String> {
    let disks = batch_disks();
    let len_of = |e: &Entry| disks.get(e.pos as usize).and_then(|g| g.block_len(e.index));
    if let Some(e) = entries.iter().find(|e| len_of(e).is_none()) {
        return Err(format!("entry outside its disk: {e:?}"));
    }
    for c in chunks {
        let Some(data) = kit.known.get(&c.hash) else {
            return Err(format!("chunk {} is none of ours", c.hash));
        };
        if !entries
            .iter()
            .any(|e| e.leaf == c.hash && len_of(e) == Some(data.len()))
        {
            return Err(format!("chunk {} sent for no block of its length", c.hash));
        }
    }
    Ok(())
}

#[test]
fn upload_batches_survive_mutation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let [vda, vdb] = batch_disks();
    let spec = BeginSpec {
        vm: "vm".into(),
        disks: vec![
            DiskSpec {
                name: "vda".into(),
                geometry: vda,
            },
            DiskSpec {
                name: "vdb".into(),
                geometry: vdb,
            },
        ],
        base_point: None,
        resume: None,
        keyring: None,
        wrapped: Vec::new(),
        copy_of: None,
    };
    let session = store.begin("agent", &spec).unwrap().session;
    let kit = batch_kit(&session);
    let encoded = kit.batch.encode_to_vec();
    let mut writer = store.chunk_writer();
    // The honest batch passes and is staged: the chunks every later case may refer to.
    let (s, entries, chunks) = decode_batch(pb::Batch::decode(&encoded[..]).unwrap()).unwrap();
    let v = store.verify_batch("agent", &s, entries, chunks).unwrap();
    store.stage_batch("agent", v, &mut *writer).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let (n, started) = (cases(), Instant::now());
    let (mut undecodable, mut refused, mut unstaged, mut staged) = (0, 0, 0, 0);
    for i in 0..n {
        let bytes = if rng.random_bool(0.5) {
            mutate(&encoded, &mut rng)
        } else {
            let mut b = kit.batch.clone();
            for _ in 0..rng.random_range(1..=3) {
                twist(&mut b, &kit, &mut rng);
            }
            let e = b.encode_to_vec();
            if rng.random_ratio(1, 4) {
                mutate(&e, &mut rng)
            } else {
                e
            }
        };
        let Ok(batch) = pb::Batch::decode(&bytes[..]) else {
            undecodable += 1;
            continue;
        };
        let Ok((session, entries, chunks)) = decode_batch(batch) else {
            refused += 1;
            continue;
        };
        let (sent_entries, sent_chunks) = (entries.clone(), chunks.clone());
        let Ok(v) = store.verify_batch("agent", &session, entries, chunks) else {
            refused += 1;
            continue;
        };
        if let Err(e) = verified_batch_is_sound(&kit, &sent_entries, &sent_chunks) {
            panic!("case {i}: the store verified an unsound batch: {e}");
        }
        match store.stage_batch("agent", v, &mut *writer) {
            Err(_) => unstaged += 1,
            Ok(_) => {
                // Staged blocks only refer to chunks held at their block's length.
                for e in sent_entries.iter().filter(|e| !e.leaf.is_zero()) {
                    let held = kit.known.get(&e.leaf).map(Vec::len);
                    let want = batch_disks()[e.pos as usize].block_len(e.index);
                    assert_eq!(held, want, "case {i}: staged {e:?}");
                }
                staged += 1;
            }
        }
    }
    store.finish_upload(&mut *writer).unwrap();
    eprintln!(
        "upload batches: {n} mutations in {:.1} s, {undecodable} undecodable, {refused} refused, \
         {unstaged} refused at staging, {staged} staged, 0 panics",
        started.elapsed().as_secs_f64()
    );
    assert!(refused > 0 && staged > 0);
}

/// One record of the pack target: where its frame is, and the block it holds.
struct Record {
    hash: BlockHash,
    offset: u64,
    len: u32,
    data: Vec<u8>,
}

#[test]
fn pack_records_read_back_intact_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let packs = LocalPacks::create(dir.path()).unwrap();
    let mut w = packs.writer();
    w.open_pack(PackId(1)).unwrap();
    let mut records = Vec::new();
    for n in 0..12u8 {
        let data = pattern(n, 512 + usize::from(n) * 700);
        let hash = BlockHash::of(&data);
        let frame = chunk::compress(&data).unwrap();
        let offset = w.append(&hash, &frame).unwrap().offset;
        records.push(Record {
            hash,
            offset,
            len: frame.len() as u32,
            data,
        });
    }
    w.sync().unwrap();
    let known: HashMap<BlockHash, &[u8]> = records.iter().map(|r| (r.hash, &r.data[..])).collect();
    let original = std::fs::read(packs.pack_path(PackId(1))).unwrap();
    // Rewritten in place: a file cut to nothing and written again is flushed when closed
    // (ext4's auto_da_alloc), which would cost more than the reads.
    let mutated = std::fs::File::create(packs.pack_path(PackId(2))).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let (n, started) = (cases(), Instant::now());
    let (mut by_reader, mut by_chunk, mut intact) = (0, 0, 0);
    for i in 0..n {
        let m = mutate(&original, &mut rng);
        std::os::unix::fs::FileExt::write_all_at(&mutated, &m, 0).unwrap();
        mutated.set_len(m.len() as u64).unwrap();
        // Both kinds of reader: record by record, and (less often: each case reads a window of
        // 8 MiB with O_DIRECT) a sequential one.
        let mut reader = packs.reader(if i % 16 != 0 {
            ReadOrder::Random
        } else {
            ReadOrder::Sequential
        });
        for r in &records {
            // Sometimes the catalog row is off too: another place, length or hash.
            let (mut offset, mut len, mut hash) = (r.offset, r.len, r.hash);
            if rng.random_ratio(1, 8) {
                match rng.random_range(0..3) {
                    0 => {
                        offset = [0, 8, r.offset - 1, r.offset + 1, r.offset + 4096, u64::MAX]
                            [rng.random_range(0..6)]
                    }
                    1 => len = [0, r.len - 1, r.len + 1, 4 << 20, u32::MAX][rng.random_range(0..5)],
                    _ => hash = records[rng.random_range(0..records.len())].hash,
                }
            }
            let at = ChunkLocation {
                pack: PackId(2),
                offset,
                len,
            };
            match reader.read(at, &hash) {
                Err(_) => by_reader += 1,
                Ok(frame) => match chunk::open(hash, &frame, r.data.len()) {
                    Err(_) => by_chunk += 1,
                    Ok(data) => {
                        // What reads back whole is the block of the hash asked for.
                        assert_eq!(Some(&data[..]), known.get(&hash).copied(), "case {i}");
                        intact += 1;
                    }
                },
            }
        }
    }
    eprintln!(
        "pack records: {n} mutated packs ({} reads) in {:.1} s, {by_reader} refused by the \
         reader, {by_chunk} by the chunk format, {intact} intact, 0 panics",
        n * records.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(by_reader > 0 && by_chunk > 0);
}
