//! Rolling a disk on this host back (or forward) to a point: compare the disk's current block
//! leaves with the point's, fetch only the chunks of blocks that differ over the same mutual-TLS
//! channel, write them (raw files and devices directly, qcow2 images through a writable
//! `qemu-nbd`), then re-read the disk and check its root equals the point's before reporting
//! success. A disk a running QEMU holds (its image lock) is refused. Later points stay.

use crate::error::SyncError;
use crate::nbd::{self, NbdClient};
use crate::offline::NbdServer;
use crate::scan::{BlockSource, ScanPlan};
use crate::source::RawDisk;
use crate::state::{self, OldLeaves};
use crate::sync::{DiskKind, DiskSource};
use futures::StreamExt;
use rewind_proto::format::{DiskGeometry, MAX_POINT_BLOCKS_PAGE, MAX_READ_CHUNKS};
use rewind_proto::pb::replication_client::ReplicationClient;
use rewind_proto::report::Chain;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::{chunk, pb, Leaf};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tonic::transport::Channel;

/// ReadChunks requests in flight during a rollback.
const CHUNK_REQUESTS_IN_FLIGHT: usize = 16;

/// Chunks asked for in one ReadChunks request: small enough that the first reply arrives
/// (and its blocks are written) while the receiver still reads the others from its packs.
const CHUNKS_PER_REQUEST: usize = 16;

/// What to roll back.
#[derive(Debug, Clone)]
pub struct RollbackConfig {
    pub vm: String,
    pub point: i64,
    pub disks: Vec<DiskSource>,
    pub state_dir: PathBuf,
    pub dry_run: bool,
}

/// One disk's rollback.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRollback {
    pub name: String,
    pub size: u64,
    pub root: String,
    /// Blocks whose content differed from the point.
    pub blocks_differing: u64,
    /// Compressed chunk bytes fetched from the receiver.
    pub bytes_fetched: u64,
    /// Bytes written to the disk (zeroed blocks included).
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// How the current content was compared: every allocated block read, or only the blocks
    /// a dirty bitmap and the point chain say can differ.
    pub compared: &'static str,
    /// The disk's root was re-read and equals the point's.
    pub verified: bool,
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub vm: String,
    pub point: i64,
    pub dry_run: bool,
    pub disks: Vec<DiskRollback>,
    pub seconds: f64,
}

/// A disk opened for rollback: a reader and a way to write blocks.
enum Target {
    Raw {
        disk: RawDisk,
        file: std::fs::File,
        is_device: bool,
    },
    Nbd {
        client: NbdClient,
        /// Kept for the other handles it serves; stopped (bitmaps written) when dropped.
        server: NbdServer,
    },
}

impl Target {
    fn plan(&mut self, g: &DiskGeometry) -> Result<ScanPlan, SyncError> {
        Ok(match self {
            Target::Raw { disk, .. } => ScanPlan::full(&disk.data_extents()?, g),
            Target::Nbd { client, .. } => {
                let data: Vec<(u64, u64)> = client
                    .block_status("base:allocation", 0, g.size)?
                    .into_iter()
                    .filter(|e| e.flags & nbd::STATE_ZERO == 0)
                    .map(|e| (e.offset, e.offset + e.length))
                    .collect();
                ScanPlan::full(&data, g)
            }
        })
    }

    fn size(&self) -> u64 {
        match self {
            Target::Raw { disk, .. } => disk.size(),
            Target::Nbd { client, .. } => client.size(),
        }
    }

    /// A second reader of the same disk (another handle, or another NBD connection to the
    /// same qemu-nbd, which serves several), for reading back while writing.
    fn second_reader(&self, export: &str) -> Result<Box<dyn BlockSource + Send>, SyncError> {
        Ok(match self {
            Target::Raw { disk, .. } => Box::new(disk.try_clone()?),
            Target::Nbd { server, .. } => Box::new(NbdClient::connect_unix(
                &server.socket,
                export,
                &["base:allocation"],
            )?),
        })
    }

    /// A handle for writing (see [`Writer`]).
    fn writer(&self, export: &str) -> Result<Writer, SyncError> {
        Ok(match self {
            Target::Raw {
                disk,
                file,
                is_device,
            } => Writer::Raw {
                file: file.try_clone().map_err(|e| io(disk.path(), e))?,
                path: disk.path().to_owned(),
                is_device: *is_device,
            },
            Target::Nbd { server, .. } => {
                Writer::Nbd(NbdClient::connect_unix(&server.socket, export, &[])?)
            }
        })
    }

    fn source(&mut self) -> &mut dyn BlockSource {
        match self {
            Target::Raw { disk, .. } => disk,
            Target::Nbd { client, .. } => client,
        }
    }
}

fn io(path: &Path, source: std::io::Error) -> SyncError {
    SyncError::Credentials {
        path: path.to_owned(),
        source,
    }
}

/// Refuses a disk whose image a running QEMU holds: `qemu-img info` without `-U` takes the
/// same lock QEMU holds and fails while the VM runs.
fn ensure_not_in_use(d: &DiskSource) -> Result<(), SyncError> {
    let format = match d.kind {
        DiskKind::Raw => "raw",
        DiskKind::Qcow2 => "qcow2",
    };
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-f", format])
        .arg(&d.path)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if !o.status.success() => {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("lock") {
                return Err(SyncError::InUse(d.name.clone(), d.path.clone()));
            }
            Err(SyncError::Worker(format!(
                "qemu-img info {}: {}",
                d.path.display(),
                err.trim()
            )))
        }
        Ok(_) => Ok(()),
        // Without qemu-img no QEMU runs here either.
        Err(_) => Ok(()),
    }
}

/// Current leaves of the blocks that may hold data, compared with the point's; returns the
/// blocks that differ and the bytes read.
///
/// Each differing block is also handed to `found` as soon as it is known; a full read stops
/// early once `found` returns false (nobody wants the rest).
fn differing(
    target: &mut Target,
    g: &DiskGeometry,
    want: &BTreeMap<u64, Leaf>,
    candidates: Option<&BTreeSet<u64>>,
    found: &mut dyn FnMut(u64) -> bool,
) -> Result<(Vec<u64>, u64), SyncError> {
    if let Some(c) = candidates {
        // Only blocks that can differ are read (several in flight); the others equal the point
        // already.
        let blocks: Vec<u64> = c.iter().copied().collect();
        let ranges = ranges_of(g, blocks.iter().copied());
        let read = ranges.iter().map(|r| r.1 as u64).sum();
        let mut out = Vec::new();
        target.source().read_ranges(&ranges, &mut |k, bytes| {
            let i = blocks[k];
            if Leaf::of(bytes) != want.get(&i).copied().unwrap_or(Leaf::ZERO) {
                out.push(i);
                found(i);
            }
        })?;
        out.sort_unstable();
        return Ok((out, read));
    }
    let plan = target.plan(g)?;
    let bs = g.block_size.bytes();
    let mut out = Vec::new();
    let mut read = 0u64;
    let mut buf = vec![0u8; (4 << 20).max(bs as usize)];
    let mut leaves = Vec::new();
    let mut next = 0u64;
    let mut differs = |i: u64| {
        out.push(i);
        found(i)
    };
    // Blocks not read are zero now: they differ where the point has data.
    let outside = |from: u64, to: u64, differs: &mut dyn FnMut(u64) -> bool| {
        want.range(from..to).all(|(&i, _)| differs(i))
    };
    let mut wanted = true;
    for &(first, end) in &plan.read {
        wanted = outside(next, first, &mut differs);
        let mut idx = first;
        while wanted && idx < end {
            let count = ((4u64 << 20) / bs).max(1).min(end - idx);
            let off = g.offset(idx);
            let len = (count * bs).min(g.size - off) as usize;
            target
                .source()
                .read_leaves(&mut buf[..len], off, bs as usize, &mut leaves)?;
            read += len as u64;
            for (k, leaf) in leaves.iter().enumerate() {
                let i = idx + k as u64;
                if *leaf != want.get(&i).copied().unwrap_or(Leaf::ZERO) {
                    wanted &= differs(i);
                }
            }
            idx += count;
        }
        if !wanted {
            break;
        }
        next = end;
    }
    if wanted {
        outside(next, g.blocks(), &mut differs);
    }
    out.sort_unstable();
    Ok((out, read))
}

/// The disk ranges of blocks `idx`.
fn ranges_of(g: &DiskGeometry, idx: impl Iterator<Item = u64>) -> Vec<(u64, usize)> {
    idx.map(|i| (g.offset(i), g.block_len(i).unwrap_or(0)))
        .collect()
}

/// Reads `blocks` (index, the leaf each must have) from `src`; returns the lowest block that
/// does not hold its leaf, with the leaf it holds, and the bytes read.
fn read_back(
    src: &mut dyn BlockSource,
    g: &DiskGeometry,
    blocks: &[(u64, Leaf)],
) -> Result<(Option<(u64, Leaf)>, u64), SyncError> {
    let ranges = ranges_of(g, blocks.iter().map(|b| b.0));
    let read = ranges.iter().map(|r| r.1 as u64).sum();
    let mut wrong: Option<(u64, Leaf)> = None;
    src.read_ranges(&ranges, &mut |k, bytes| {
        let (i, h) = blocks[k];
        let now = Leaf::of(bytes);
        if now != h && wrong.is_none_or(|(j, _)| i < j) {
            wrong = Some((i, now));
        }
    })?;
    Ok((wrong, read))
}

/// Blocks a compare found differing, as the fetch wants them: chunks to ask for, each with the
/// blocks that need it, or blocks that must become zero.
enum Found {
    Chunks(Vec<(Leaf, Vec<u64>)>),
    Zeros(Vec<u64>),
}

/// What the writer gets: fetched frames, each with the blocks that need it, or blocks to zero.
enum Work {
    Chunks(Vec<(Leaf, bytes::Bytes, Vec<u64>)>),
    Zeros(Vec<u64>),
}

/// Blocks that must become zero sent to the writer together.
const ZEROS_PER_BATCH: usize = 256;

/// Gathers the blocks a compare finds differing into requests of at most
/// [`CHUNKS_PER_REQUEST`] chunks (blocks with the same content share one) and batches of
/// blocks to zero, and hands each on once full. Without a sender (a dry run) it
/// only lets the compare go on.
struct Requests<'a> {
    want: &'a BTreeMap<u64, Leaf>,
    tx: Option<tokio::sync::mpsc::Sender<Found>>,
    chunks: Vec<(Leaf, Vec<u64>)>,
    /// Blocks the chunks of the request being gathered go to, and the most it takes.
    blocks: usize,
    max_blocks: usize,
    /// Most chunks one request asks for: the receiver's reply must stay within
    /// MAX_READ_REPLY_BYTES even if every frame is as long as its block's bound.
    max_chunks: usize,
    zeros: Vec<u64>,
}

/// Bytes of blocks one request may fill: the writer holds a request's blocks decompressed at
/// once, so many blocks of one content (a disk of one repeated pattern) must not make one
/// request of gigabytes.
const REQUEST_BLOCK_BYTES: u64 = 16 << 20;

impl<'a> Requests<'a> {
    fn new(
        want: &'a BTreeMap<u64, Leaf>,
        block_size: u64,
        tx: Option<tokio::sync::mpsc::Sender<Found>>,
    ) -> Requests<'a> {
        Requests {
            want,
            tx,
            chunks: Vec::new(),
            blocks: 0,
            max_blocks: (REQUEST_BLOCK_BYTES / block_size.max(1)).max(1) as usize,
            max_chunks: (rewind_proto::format::MAX_READ_REPLY_BYTES
                / rewind_proto::format::max_frame_len(block_size as usize).max(1))
            .clamp(1, CHUNKS_PER_REQUEST.min(MAX_READ_CHUNKS)),
            zeros: Vec::new(),
        }
    }

    /// Takes differing block `i`; false once nobody takes requests any more.
    fn push(&mut self, i: u64) -> bool {
        if self.tx.is_none() {
            return true;
        }
        match self.want.get(&i) {
            None => {
                self.zeros.push(i);
                if self.zeros.len() >= ZEROS_PER_BATCH {
                    return self.send_zeros();
                }
            }
            Some(leaf) => {
                // A full request goes once a chunk it cannot take comes (neighbouring blocks
                // with the same content then share one request), or once it holds as many
                // blocks as one request may.
                let known = self.chunks.iter().position(|(h, _)| h == leaf);
                let full = self.blocks >= self.max_blocks
                    || (known.is_none() && self.chunks.len() >= self.max_chunks);
                let sent = !full || self.send_chunks();
                match known.filter(|_| !full) {
                    Some(k) => self.chunks[k].1.push(i),
                    None => self.chunks.push((*leaf, vec![i])),
                }
                self.blocks += 1;
                return sent;
            }
        }
        true
    }

    /// Hands on what is left.
    fn finish(mut self) {
        if !self.chunks.is_empty() {
            self.send_chunks();
        }
        if !self.zeros.is_empty() {
            self.send_zeros();
        }
    }

    fn send_chunks(&mut self) -> bool {
        self.blocks = 0;
        let chunks = std::mem::take(&mut self.chunks);
        self.send(Found::Chunks(chunks))
    }

    fn send_zeros(&mut self) -> bool {
        let zeros = std::mem::take(&mut self.zeros);
        self.send(Found::Zeros(zeros))
    }

    fn send(&mut self, found: Found) -> bool {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.blocking_send(found).is_ok());
        if !sent {
            self.tx = None;
        }
        sent
    }
}

/// Fetches the chunks of one request and pairs each frame with the blocks that need it; every
/// chunk asked for must come back, and nothing else. Returns the work and the bytes fetched.
async fn fetch(
    mut client: ReplicationClient<Channel>,
    vm: String,
    found: Found,
) -> Result<(Work, u64), SyncError> {
    let want = match found {
        Found::Zeros(blocks) => return Ok((Work::Zeros(blocks), 0)),
        Found::Chunks(chunks) => chunks,
    };
    let req = pb::ReadChunksRequest {
        vm,
        hashes: want.iter().map(|(h, _)| h.0.to_vec()).collect(),
    };
    let reply = client
        .read_chunks(req)
        .await
        .map_err(SyncError::refused("ReadChunks"))?
        .into_inner();
    pair(want, reply.chunks)
}

/// Pairs the chunks of a reply with the blocks that asked for each (`want`); every chunk asked
/// for must be there once, and nothing else. Returns the work and the bytes fetched.
fn pair(mut want: Vec<(Leaf, Vec<u64>)>, chunks: Vec<pb::Chunk>) -> Result<(Work, u64), SyncError> {
    let mut work = Vec::with_capacity(chunks.len());
    let mut bytes = 0u64;
    for c in chunks {
        let h = Leaf::from_slice(&c.hash).map_err(|_| SyncError::Protocol("bad chunk hash"))?;
        let Some(k) = want.iter().position(|(w, _)| *w == h) else {
            return Err(SyncError::Protocol(
                "the receiver sent a chunk we did not ask for",
            ));
        };
        let (_, blocks) = want.swap_remove(k);
        bytes += c.data.len() as u64;
        work.push((h, c.data, blocks));
    }
    if !want.is_empty() {
        return Err(SyncError::Protocol(
            "the receiver left out a chunk we asked for",
        ));
    }
    Ok((Work::Chunks(work), bytes))
}

/// Decompresses and checks fetched chunks on one thread, writes them (and zeroes blocks) with
/// `w` on another, and reads written blocks back through `checker` on a third, each working on
/// a later batch than the next. Returns the writer, to be flushed.
fn write_blocks(
    mut w: Writer,
    mut checker: Box<dyn BlockSource + Send>,
    g: DiskGeometry,
    mut wrx: tokio::sync::mpsc::Receiver<Work>,
) -> Result<(Writer, Written), SyncError> {
    let (ctx, crx) = std::sync::mpsc::sync_channel::<Vec<(u64, Leaf)>>(2);
    let check = std::thread::spawn(move || {
        let mut c = Written::default();
        for blocks in crx {
            let (wrong, read) = read_back(checker.as_mut(), &g, &blocks)?;
            c.reread += read;
            if let Some((i, now)) = wrong {
                if c.wrong.is_none_or(|(j, _)| i < j) {
                    c.wrong = Some((i, now));
                }
            }
            c.checked += blocks.len() as u64;
        }
        Ok::<_, SyncError>(c)
    });
    // Decompressed into buffers the writer hands back.
    let (dtx, drx) = std::sync::mpsc::sync_channel::<Result<Decoded, SyncError>>(1);
    let (btx, brx) = std::sync::mpsc::channel::<Vec<u8>>();
    let decode = std::thread::spawn(move || {
        while let Some(work) = wrx.blocking_recv() {
            let decoded = match work {
                Work::Zeros(blocks) => Ok(Decoded {
                    opened: Vec::new(),
                    zeros: blocks,
                }),
                Work::Chunks(chunks) => open_all(&chunks, &g, &brx)
                    .map(|opened| Decoded {
                        opened,
                        zeros: Vec::new(),
                    })
                    .map_err(|e| SyncError::Worker(e.to_string())),
            };
            let failed = decoded.is_err();
            if dtx.send(decoded).is_err() || failed {
                break;
            }
        }
    });
    let mut bytes = 0u64;
    let wrote = (|| {
        // Whatever is decoded by the time the last write finished is written together
        // (several writes in flight over NBD).
        while let Ok(first) = drx.recv() {
            let mut batch = first?;
            while let Ok(more) = drx.try_recv() {
                let more = more?;
                batch.opened.extend(more.opened);
                batch.zeros.extend(more.zeros);
            }
            for &i in &batch.zeros {
                let len = g.block_len(i).unwrap_or(0);
                w.zero(g.offset(i), len)?;
                bytes += len as u64;
            }
            let (mut blocks, pending): (Vec<(u64, Leaf)>, Vec<Piece>) = batch
                .opened
                .into_iter()
                .map(|(i, h, data)| ((i, h), (g.offset(i), data)))
                .unzip();
            blocks.extend(batch.zeros.iter().map(|&i| (i, Leaf::ZERO)));
            bytes += pending.iter().map(|p| p.1.len() as u64).sum::<u64>();
            w.write_many(&pending)?;
            for (_, buf) in pending {
                // The decoder may be gone already; the buffer is then dropped.
                let _ = btx.send(buf);
            }
            // A checker that stopped reports why below.
            if ctx.send(blocks).is_err() {
                break;
            }
        }
        Ok::<_, SyncError>(())
    })();
    // A decoder still sending, or still waiting for work, stops.
    drop(drx);
    drop(ctx);
    let decoded = decode.join();
    let checked = check
        .join()
        .unwrap_or_else(|_| Err(SyncError::Worker("the read-back panicked".into())));
    if decoded.is_err() {
        return Err(SyncError::Worker("the decompression panicked".into()));
    }
    wrote?;
    Ok((w, Written { bytes, ..checked? }))
}

/// Decompresses and checks each fetched chunk once, into a buffer from `spare` for each block
/// that needs it (the blocks of one chunk have its length; the others get a copy).
fn open_all(
    chunks: &[(Leaf, bytes::Bytes, Vec<u64>)],
    g: &DiskGeometry,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<Vec<Opened>, chunk::ChunkError> {
    let mut opened: Vec<Opened> = Vec::new();
    for (h, frame, blocks) in chunks {
        let first = opened.len();
        for &i in blocks {
            let mut buf = spare.try_recv().unwrap_or_default();
            if first < opened.len() {
                buf.clear();
                buf.extend_from_slice(&opened[first].2);
            } else {
                buf.resize(g.block_len(i).unwrap_or(0), 0);
                chunk::open_into(*h, frame, &mut buf)?;
            }
            opened.push((i, *h, buf));
        }
    }
    Ok(opened)
}

/// A batch for the writer: decompressed blocks, and blocks to zero.
struct Decoded {
    opened: Vec<Opened>,
    zeros: Vec<u64>,
}

/// A second handle on a disk being rolled back, for writing while it is still compared: the
/// image file, or another connection to the same qemu-nbd.
enum Writer {
    Raw {
        file: std::fs::File,
        path: PathBuf,
        is_device: bool,
    },
    Nbd(NbdClient),
}

impl Writer {
    /// Writes (offset, bytes) pieces of at most a block each.
    fn write_many(&mut self, pieces: &[(u64, Vec<u8>)]) -> Result<(), SyncError> {
        match self {
            Writer::Raw { file, path, .. } => {
                for (offset, data) in pieces {
                    file.write_all_at(data, *offset).map_err(|e| io(path, e))?;
                }
                Ok(())
            }
            Writer::Nbd(client) => {
                let refs: Vec<(u64, &[u8])> =
                    pieces.iter().map(|(o, d)| (*o, d.as_slice())).collect();
                Ok(client.write_many(&refs)?)
            }
        }
    }

    fn zero(&mut self, offset: u64, len: usize) -> Result<(), SyncError> {
        match self {
            Writer::Raw {
                file,
                path,
                is_device,
            } => {
                if !*is_device {
                    let flags = rustix::fs::FallocateFlags::PUNCH_HOLE
                        | rustix::fs::FallocateFlags::KEEP_SIZE;
                    if rustix::fs::fallocate(&*file, flags, offset, len as u64).is_ok() {
                        return Ok(());
                    }
                }
                file.write_all_at(&vec![0u8; len], offset)
                    .map_err(|e| io(path, e))
            }
            Writer::Nbd(client) => Ok(client.write_zeroes(offset, len as u32)?),
        }
    }

    fn flush(&mut self) -> Result<(), SyncError> {
        match self {
            Writer::Raw { file, path, .. } => file.sync_all().map_err(|e| io(path, e)),
            Writer::Nbd(client) => Ok(client.flush()?),
        }
    }
}

/// A block's bytes at their disk offset.
type Piece = (u64, Vec<u8>);

/// A block fetched for a rollback, decompressed and checked: its index, leaf and bytes.
type Opened = (u64, Leaf, Vec<u8>);

/// What the writer of a rollback did: bytes written, bytes read back, how many blocks it
/// checked, and the first of them that does not hold the point's content (with what it holds).
#[derive(Default)]
struct Written {
    bytes: u64,
    reread: u64,
    checked: u64,
    wrong: Option<(u64, Leaf)>,
}

/// The blocks an offline qcow2 image's `rewind-*` bitmaps say were written since the agent's
/// last committed point, read with the disk geometry of that point.
struct Dirty {
    geometry: (u64, u64),
    blocks: BTreeSet<u64>,
    /// The leaves of the agent's last committed point, from its state.
    base: Option<BTreeMap<u64, Leaf>>,
}

/// A qemu-img or qemu-nbd failure on the write lock a running QEMU holds is the disk being in
/// use; anything else is reported as it is.
fn in_use(d: &DiskSource, e: crate::offline::OfflineError) -> SyncError {
    match &e {
        crate::offline::OfflineError::Tool { message, .. } if message.contains("lock") => {
            SyncError::InUse(d.name.clone(), d.path.clone())
        }
        _ => SyncError::from(e),
    }
}

/// Opens a disk for rollback: refuses one a running QEMU holds, and for a qcow2 image starts
/// one writable `qemu-nbd` that also exports our dirty bitmaps and reads which blocks they
/// name (`None` when they cannot be trusted: missing, in use, or no committed base). Runs
/// while the point's leaves arrive.
fn open_disk(
    d: &DiskSource,
    state_dir: &Path,
    vm: &str,
) -> Result<(Target, Option<Dirty>), SyncError> {
    if d.kind == DiskKind::Raw {
        ensure_not_in_use(d)?;
        return Ok((open_raw(d)?, None));
    }
    // The image's bitmaps, from its header; an image the header reader does not take is asked
    // about with `qemu-img info`, which (without -U) fails on the lock a running QEMU holds.
    // Otherwise that lock is found when qemu-nbd starts.
    let bitmaps = match crate::qcow2::bitmaps(&d.path) {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(disk = %d.name, error = %Chain(&e), "asking qemu-img for the bitmaps");
            crate::offline::inspect(&d.name, &d.path)
                .map_err(|e| in_use(d, e))?
                .bitmaps
        }
    };
    let ours: Vec<&str> = bitmaps
        .iter()
        .filter(|b| b.name.starts_with(crate::live::PREFIX))
        .map(|b| b.name.as_str())
        .collect();
    let trusted = !ours.is_empty()
        && !bitmaps
            .iter()
            .any(|b| b.inconsistent && b.name.starts_with(crate::live::PREFIX));
    // The bitmaps cover writes since the last committed point only when no session is open,
    // and only when they continue it: the bitmap its last capture made is among them (an older
    // copy of the image carries a stale one, see `live::plan`).
    let base_geometry = trusted
        .then(|| {
            base_point(state_dir, vm)?;
            let conn = state::open(state_dir).ok()?;
            let chain = state::chain_bitmap(&conn, vm, &d.name).ok()??;
            if !ours.contains(&chain.as_str()) {
                tracing::info!(disk = %d.name, bitmaps = ?ours, last = %chain, "the image's bitmaps do not continue the last point: comparing the whole disk");
                return None;
            }
            state::disk_geometry(&conn, vm, &d.name).ok()?
        })
        .flatten();
    let dir =
        std::path::absolute(state_dir.join("rollback").join(vm)).map_err(|e| io(state_dir, e))?;
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let socket = dir.join(format!("{}.sock", d.name));
    if let Some((size, bs)) = base_geometry.filter(|&(_, bs)| bs > 0) {
        // The base point's leaves are read from the state while qemu-nbd starts.
        let base = {
            let (state_dir, vm, disk) = (state_dir.to_owned(), vm.to_owned(), d.name.clone());
            std::thread::spawn(move || base_leaves(&state_dir, &vm, &disk, size.div_ceil(bs)))
        };
        // A bitmap qemu-nbd will not export, or whose context it does not grant, only costs
        // the shortcut: the disk is then read whole.
        let with_bitmaps = NbdServer::start_writable(&d.path, &socket, &d.name, &ours)
            .map_err(|e| in_use(d, e))
            .and_then(|server| {
                let contexts: Vec<String> = ours
                    .iter()
                    .map(|b| format!("qemu:dirty-bitmap:{b}"))
                    .collect();
                let mut want_ctx = vec!["base:allocation"];
                want_ctx.extend(contexts.iter().map(String::as_str));
                let mut client = NbdClient::connect_unix(&server.socket, &d.name, &want_ctx)?;
                let mut blocks = BTreeSet::new();
                for ctx in &contexts {
                    for e in client.block_status(ctx, 0, client.size())? {
                        if e.flags & nbd::STATE_DIRTY != 0 {
                            blocks.extend(e.offset / bs..(e.offset + e.length).div_ceil(bs));
                        }
                    }
                }
                Ok((server, client, blocks))
            });
        match with_bitmaps {
            Err(e @ SyncError::InUse(..)) => return Err(e),
            Ok((server, client, blocks)) => {
                let dirty = Dirty {
                    geometry: (size, bs),
                    blocks,
                    base: base.join().ok().flatten(),
                };
                return Ok((Target::Nbd { client, server }, Some(dirty)));
            }
            Err(e) => {
                tracing::warn!(disk = %d.name, error = %Chain(&e), "dirty bitmaps unusable: comparing the whole disk");
            }
        }
    }
    let server =
        NbdServer::start_writable(&d.path, &socket, &d.name, &[]).map_err(|e| in_use(d, e))?;
    let client = NbdClient::connect_unix(&server.socket, &d.name, &["base:allocation"])?;
    Ok((Target::Nbd { client, server }, None))
}

/// The leaves of the agent's last committed point of `disk` (`blocks` blocks), from its state.
fn base_leaves(state_dir: &Path, vm: &str, disk: &str, blocks: u64) -> Option<BTreeMap<u64, Leaf>> {
    let conn = state::open(state_dir).ok()?;
    let mut old = OldLeaves::new(&conn, vm, Some(disk));
    let mut base = BTreeMap::new();
    old.drain_below(blocks, |i, l| {
        base.insert(i, l);
    })
    .ok()?;
    Some(base)
}

/// The agent's last committed point of `vm`, if it knows one and no session is open.
fn base_point(state_dir: &Path, vm: &str) -> Option<i64> {
    let conn = state::open(state_dir).ok()?;
    let st = state::vm_state(&conn, vm).ok()?;
    st.base_point.filter(|_| st.pending_session.is_none())
}

/// The root of a disk of geometry `g` with these non-zero leaves.
fn root_of(g: &DiskGeometry, leaves: &BTreeMap<u64, Leaf>) -> Leaf {
    let mut b = Builder::new(Shape::of(g));
    let mut next = 0;
    for (&i, &l) in leaves {
        b.push_zeros(i - next);
        b.push(l);
        next = i + 1;
    }
    b.push_zeros(g.blocks().saturating_sub(next));
    tree::root(g, b.finish())
}

/// The only blocks that can differ from the target point: the dirty ones, and those where the
/// agent's last committed point and the target differ (from our own state). `None` when the
/// bitmaps were read with another geometry than the point's, or the state lacks the leaves.
fn chain_candidates(
    dirty: Dirty,
    g: &DiskGeometry,
    want: &BTreeMap<u64, Leaf>,
) -> Option<BTreeSet<u64>> {
    if dirty.geometry != (g.size, g.block_size.bytes()) {
        return None;
    }
    let base = dirty.base?;
    let mut out = dirty.blocks;
    for (i, l) in want {
        if base.get(i) != Some(l) {
            out.insert(*i);
        }
    }
    for i in base.keys() {
        if !want.contains_key(i) {
            out.insert(*i);
        }
    }
    Some(out)
}

/// One page of the point's leaves of `disk` from block `start`, added to `want`. Returns the
/// next page's start (0: none), the disk size, block size and root.
async fn point_page(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
    disk: &str,
    start: u64,
    limit: u32,
    want: &mut BTreeMap<u64, Leaf>,
) -> Result<(u64, u64, u32, Leaf), SyncError> {
    let page = client
        .point_blocks(pb::PointBlocksRequest {
            vm: cfg.vm.clone(),
            point: cfg.point as u64,
            disk: disk.to_owned(),
            start,
            limit,
        })
        .await
        .map_err(SyncError::refused("PointBlocks"))?
        .into_inner();
    for e in &page.entries {
        want.insert(
            e.index,
            Leaf::from_slice(&e.hash).map_err(|_| SyncError::Protocol("bad leaf"))?,
        );
    }
    let root = Leaf::from_slice(&page.root).map_err(|_| SyncError::Protocol("bad root"))?;
    Ok((page.next, page.size, page.block_size, root))
}

/// Rolls every disk of `cfg` back to the point.
pub async fn rollback(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
) -> Result<RollbackReport, SyncError> {
    let started = Instant::now();
    let mut reports = Vec::new();
    for d in &cfg.disks {
        let disk_side = {
            let (d, state_dir, vm) = (d.clone(), cfg.state_dir.clone(), cfg.vm.clone());
            tokio::task::spawn_blocking(move || open_disk(&d, &state_dir, &vm))
        };
        // Rolling back to the agent's own last point (the usual case) with trusted bitmaps:
        // the agent's state already holds the point's leaves, so only its geometry and root
        // are asked for, and the state is used once its root matches the receiver's.
        let own_point = base_point(&cfg.state_dir, &cfg.vm) == Some(cfg.point);
        let first_limit = if own_point && d.kind == DiskKind::Qcow2 {
            1
        } else {
            MAX_POINT_BLOCKS_PAGE
        };
        let mut want = BTreeMap::new();
        let (mut next, size, block_size, root) =
            point_page(client, cfg, &d.name, 0, first_limit, &mut want).await?;
        let g = DiskGeometry::new(size, u64::from(block_size)).map_err(|source| {
            SyncError::Geometry {
                disk: d.name.clone(),
                source,
            }
        })?;
        let (mut target, dirty) = disk_side
            .await
            .map_err(|e| SyncError::Worker(e.to_string()))??;
        if target.size() != size {
            return Err(SyncError::SizeMismatch {
                disk: d.name.clone(),
                have: target.size(),
                want: size,
            });
        }
        let mut candidates = None;
        // The root the point's leaves give, once known (it must be the point's root).
        let mut leaves_root = None;
        if let Some(mut dirty) = dirty {
            if own_point && dirty.geometry == (g.size, g.block_size.bytes()) {
                if let Some(base) = dirty.base.take() {
                    if root_of(&g, &base) == root {
                        want = base;
                        next = 0;
                        leaves_root = Some(root);
                        candidates = Some(std::mem::take(&mut dirty.blocks));
                    } else {
                        dirty.base = Some(base);
                    }
                }
            }
            // The rest of the point's leaves, a page at a time.
            while next != 0 {
                next = point_page(client, cfg, &d.name, next, MAX_POINT_BLOCKS_PAGE, &mut want)
                    .await?
                    .0;
            }
            if candidates.is_none() {
                candidates = tokio::task::block_in_place(|| chain_candidates(dirty, &g, &want));
            }
        }
        while next != 0 {
            next = point_page(client, cfg, &d.name, next, MAX_POINT_BLOCKS_PAGE, &mut want)
                .await?
                .0;
        }
        tracing::debug!(disk = %d.name, leaves = want.len(), candidates = ?candidates.as_ref().map(BTreeSet::len), at = ?started.elapsed(), "leaves and candidates known");
        // The compare runs on a thread of its own and hands over the blocks that differ as it
        // finds them, a request's worth at a time: their chunks are fetched and written while
        // the rest is still compared. A compare that fails part way leaves the blocks already
        // written rolled back, as a failed write does; the error is reported either way.
        let want = Arc::new(want);
        let compared_by = if candidates.is_some() {
            "dirty bitmap + point chain"
        } else {
            "full read"
        };
        let (found_tx, found_rx) = tokio::sync::mpsc::channel::<Found>(CHUNK_REQUESTS_IN_FLIGHT);
        let writing = if cfg.dry_run {
            None
        } else {
            Some((target.writer(&d.name)?, target.second_reader(&d.name)?))
        };
        let compare = {
            let want = want.clone();
            let found_tx = writing.is_some().then_some(found_tx);
            tokio::task::spawn_blocking(move || {
                let writing = found_tx.is_some();
                let mut requests = Requests::new(&want, g.block_size.bytes(), found_tx);
                let r = differing(&mut target, &g, &want, candidates.as_ref(), &mut |i| {
                    requests.push(i)
                });
                requests.finish();
                // While the last blocks are written, the root the point's leaves give (for the
                // check after writing), unless already known.
                let leaves_root =
                    writing.then(|| leaves_root.unwrap_or_else(|| root_of(&g, &want)));
                (target, r, leaves_root)
            })
        };
        let mut fetched_bytes = 0u64;
        let written = match writing {
            None => None,
            Some((w, checker)) => {
                // Replies are decompressed, written and read back on threads of their own
                // while later ones arrive.
                let (wtx, wrx) = tokio::sync::mpsc::channel::<Work>(CHUNK_REQUESTS_IN_FLIGHT);
                let writer = tokio::task::spawn_blocking(move || write_blocks(w, checker, g, wrx));
                // Several ReadChunks requests in flight; replies are handed on in order.
                let vm = cfg.vm.clone();
                let mut replies = Box::pin(
                    futures::stream::unfold(found_rx, |mut rx| async move {
                        rx.recv().await.map(|f| (f, rx))
                    })
                    .map(|found| fetch(client.clone(), vm.clone(), found))
                    .buffered(CHUNK_REQUESTS_IN_FLIGHT),
                );
                // On an error, the writer still finishes (and the compare stops) before it is
                // reported.
                let fetched = async {
                    while let Some(reply) = replies.next().await {
                        let (work, bytes) = reply?;
                        fetched_bytes += bytes;
                        if wtx.send(work).await.is_err() {
                            break;
                        }
                    }
                    Ok::<_, SyncError>(())
                }
                .await;
                drop(replies);
                drop(wtx);
                let written = writer.await.map_err(|e| SyncError::Worker(e.to_string()))?;
                Some((fetched, written))
            }
        };
        let (back, compared, leaves_root) = compare
            .await
            .map_err(|e| SyncError::Worker(e.to_string()))?;
        target = back;
        let (diff, read) = compared?;
        tracing::debug!(disk = %d.name, differing = diff.len(), at = ?started.elapsed(), "compared, fetched and written");
        let mut report = DiskRollback {
            name: d.name.clone(),
            size,
            root: root.to_hex(),
            blocks_differing: diff.len() as u64,
            bytes_fetched: fetched_bytes,
            bytes_written: 0,
            bytes_read: read,
            compared: compared_by,
            verified: false,
        };
        if let Some((fetched, written)) = written {
            fetched?;
            let (mut w, written) = written?;
            report.bytes_written += written.bytes;
            report.bytes_read += written.reread;
            w.flush()?;
            drop(w);
            tracing::debug!(disk = %d.name, at = ?started.elapsed(), "flushed");
            // Every differing block was read back right after it was written or zeroed; every
            // other one was found (or, with a bitmap, known) equal to the point. So the disk's
            // root is that of the point's leaves, unless a block read back was wrong.
            if written.checked != diff.len() as u64 {
                return Err(SyncError::Worker(format!(
                    "{} of {} differing blocks were read back",
                    written.checked,
                    diff.len()
                )));
            }
            let now = match written.wrong {
                Some((_, now)) => now,
                None => leaves_root.unwrap_or_else(|| root_of(&g, &want)),
            };
            if now != root {
                return Err(SyncError::RollbackVerify {
                    disk: d.name.clone(),
                    got: now.to_hex(),
                    want: root.to_hex(),
                });
            }
            report.verified = true;
        }
        // The image is closed (qemu-nbd exits, writing its bitmaps) while the event is
        // recorded; both are done before the rollback reports anything.
        let closing = tokio::task::spawn_blocking(move || drop(target));
        let recorded = client
            .record_rollback(pb::RollbackEvent {
                vm: cfg.vm.clone(),
                point: cfg.point as u64,
                disk: d.name.clone(),
                blocks: report.blocks_differing,
                bytes: report.bytes_fetched,
                dry_run: cfg.dry_run,
            })
            .await
            .map_err(SyncError::refused("RecordRollback"));
        tracing::debug!(at = ?started.elapsed(), "recorded");
        closing
            .await
            .map_err(|e| SyncError::Worker(e.to_string()))?;
        tracing::debug!(at = ?started.elapsed(), "closed");
        recorded?;
        reports.push(report);
    }
    Ok(RollbackReport {
        vm: cfg.vm.clone(),
        point: cfg.point,
        dry_run: cfg.dry_run,
        disks: reports,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn open_raw(d: &DiskSource) -> Result<Target, SyncError> {
    let disk = RawDisk::open(&d.path)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&d.path)
        .map_err(|e| io(&d.path, e))?;
    let is_device = std::os::unix::fs::FileTypeExt::is_block_device(
        &file.metadata().map_err(|e| io(&d.path, e))?.file_type(),
    );
    Ok(Target::Raw {
        disk,
        file,
        is_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 64 * 1024;

    fn leaf(n: u8) -> Leaf {
        Leaf::of(&[n; 64])
    }

    fn chunk(l: Leaf, data: &[u8]) -> pb::Chunk {
        pb::Chunk {
            hash: l.0.to_vec(),
            data: bytes::Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn a_reply_pairs_each_chunk_with_its_blocks_and_must_hold_exactly_what_was_asked() {
        let want = || vec![(leaf(1), vec![3, 9]), (leaf(2), vec![4])];
        let (work, bytes) =
            pair(want(), vec![chunk(leaf(2), b"bb"), chunk(leaf(1), b"aaa")]).expect("paired");
        assert_eq!(bytes, 5);
        let Work::Chunks(got) = work else {
            panic!("chunks expected");
        };
        let got: Vec<(Leaf, Vec<u64>)> = got.into_iter().map(|(h, _, b)| (h, b)).collect();
        assert_eq!(got, vec![(leaf(2), vec![4]), (leaf(1), vec![3, 9])]);

        let left_out = pair(want(), vec![chunk(leaf(1), b"aaa")]);
        assert!(matches!(
            left_out,
            Err(SyncError::Protocol(
                "the receiver left out a chunk we asked for"
            ))
        ));
        let extra = pair(
            want(),
            vec![
                chunk(leaf(1), b"a"),
                chunk(leaf(2), b"b"),
                chunk(leaf(3), b"c"),
            ],
        );
        assert!(matches!(
            extra,
            Err(SyncError::Protocol(
                "the receiver sent a chunk we did not ask for"
            ))
        ));
        let twice = pair(want(), vec![chunk(leaf(1), b"a"), chunk(leaf(1), b"a")]);
        assert!(matches!(
            twice,
            Err(SyncError::Protocol(
                "the receiver sent a chunk we did not ask for"
            ))
        ));
        let bad = pair(
            want(),
            vec![pb::Chunk {
                hash: vec![1, 2, 3],
                data: bytes::Bytes::new(),
            }],
        );
        assert!(matches!(bad, Err(SyncError::Protocol("bad chunk hash"))));
    }

    #[test]
    fn differing_blocks_are_handed_on_a_request_at_a_time() {
        // Blocks 0..40 hold chunks 0..20 twice over (block i has chunk i / 2); 100..300 are zero
        // in the point.
        let want: BTreeMap<u64, Leaf> = (0..40u64).map(|i| (i, leaf((i / 2) as u8))).collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut r = Requests::new(&want, BLOCK, Some(tx));
        for i in (0..40).chain(100..300) {
            assert!(r.push(i));
        }
        r.finish();
        let mut sent = Vec::new();
        while let Ok(f) = rx.try_recv() {
            sent.push(f);
        }
        let chunks: Vec<&Vec<(Leaf, Vec<u64>)>> = sent
            .iter()
            .filter_map(|f| match f {
                Found::Chunks(c) => Some(c),
                Found::Zeros(_) => None,
            })
            .collect();
        let zeros: Vec<u64> = sent
            .iter()
            .filter_map(|f| match f {
                Found::Zeros(z) => Some(z.clone()),
                Found::Chunks(_) => None,
            })
            .flatten()
            .collect();
        // 20 distinct chunks: one full request of 16, then the 4 left at the end.
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![CHUNKS_PER_REQUEST, 20 - CHUNKS_PER_REQUEST]
        );
        assert_eq!(chunks[0][0], (leaf(0), vec![0, 1]));
        assert_eq!(chunks[1][3], (leaf(19), vec![38, 39]));
        assert_eq!(zeros, (100..300).collect::<Vec<u64>>());

        // Nobody listening: the compare is told to stop.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let mut r = Requests::new(&want, BLOCK, Some(tx));
        assert!((0..40).map(|i| r.push(i)).any(|more| !more));
        // A dry run sends nothing and never stops the compare.
        let mut r = Requests::new(&want, BLOCK, None);
        assert!((0..40).all(|i| r.push(i)));

        // A disk of one repeated content: requests of at most 16 MiB of blocks each, the
        // chunk asked for again in each.
        let same: BTreeMap<u64, Leaf> = (0..600u64).map(|i| (i, leaf(7))).collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut r = Requests::new(&same, BLOCK, Some(tx));
        assert!((0..600).all(|i| r.push(i)));
        r.finish();
        let mut sizes = Vec::new();
        while let Ok(Found::Chunks(c)) = rx.try_recv() {
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].0, leaf(7));
            sizes.push(c[0].1.len());
        }
        assert_eq!(sizes, vec![256, 256, 88]);
    }
}
