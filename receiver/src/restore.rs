//! Restoring one disk of a point to a raw image: every non-zero block is read once from its
//! pack, verified against its hash, and written at its offset; zero blocks stay holes. The
//! image is written under a temporary name and renamed only once its root equals the point's.

use crate::catalog::leaves::{self, Columns};
use crate::catalog::PointId;
use crate::chunks::{self, Prepared, ReadOrder};
use crate::error::StoreError;
use crate::points::PointDisk;
use rayon::prelude::*;
use rewind_proto::crypt::Codec;
use rewind_proto::format::DiskGeometry;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::BlockHash;
use rusqlite::Connection;
use std::fs::{File, OpenOptions};
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes decompressed together (at least one block): enough to keep both cores busy, and the
/// size of each of the [`DECODED_BUFFERS`] buffers.
const BATCH_BYTES: usize = 4 << 20;

/// Threads writing decoded batches.
const WRITERS: usize = 2;

/// Buffers of decoded batches: one being decoded, one queued, one being written by each
/// writer.
const DECODED_BUFFERS: usize = 2 + WRITERS;

/// Alignment O_DIRECT needs of the output image's offsets, lengths and memory.
const DIRECT_ALIGN: usize = 4096;

/// The output image. Written with O_DIRECT where the file system allows it: no copy into the
/// page cache (the dominant cost of a restore on a fresh machine), nothing useful evicted, and
/// the data is on the device when the final fsync returns. Pieces O_DIRECT cannot take (a disk
/// whose size is not a multiple of 4 KiB) go through an ordinary handle.
struct Output {
    direct: Option<File>,
    /// Cleared when the file system refuses an O_DIRECT write after all.
    direct_ok: AtomicBool,
    buffered: File,
}

/// A batch of blocks decompressed back to back, in block order, into one buffer whose part
/// from `at` is aligned for O_DIRECT; buffers are reused batch after batch.
struct Decoded {
    buf: Vec<u8>,
    at: usize,
    /// (block index, length), ascending.
    blocks: Vec<(u64, usize)>,
}

impl Decoded {
    /// Lays out `blocks` in `buf` (grown, never shrunk: no zeroing per batch) and returns the
    /// batch with a mutable slice for each block, in order.
    fn layout(mut buf: Vec<u8>, blocks: Vec<(u64, usize)>) -> Decoded {
        let total: usize = blocks.iter().map(|b| b.1).sum();
        if buf.len() < total + DIRECT_ALIGN {
            buf.resize(total + DIRECT_ALIGN, 0);
        }
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let at = if at < DIRECT_ALIGN { at } else { 0 };
        Decoded { buf, at, blocks }
    }

    /// One mutable slice per block, in order.
    fn slices(&mut self) -> Vec<&mut [u8]> {
        let total: usize = self.blocks.iter().map(|b| b.1).sum();
        let mut rest = &mut self.buf[self.at..self.at + total];
        let mut out = Vec::with_capacity(self.blocks.len());
        for &(_, len) in &self.blocks {
            let (head, tail) = rest.split_at_mut(len);
            out.push(head);
            rest = tail;
        }
        out
    }
}

impl Output {
    fn open(path: &Path, buffered: File) -> Output {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        Output {
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            buffered,
        }
    }

    /// Writes a decoded batch, one write per run of contiguous blocks, and hands back its
    /// buffer.
    fn write_batch(&self, geometry: &DiskGeometry, d: Decoded) -> std::io::Result<Vec<u8>> {
        let mut pos = d.at;
        let mut i = 0;
        while i < d.blocks.len() {
            let mut j = i + 1;
            while j < d.blocks.len() && d.blocks[j].0 == d.blocks[j - 1].0 + 1 {
                j += 1;
            }
            let len: usize = d.blocks[i..j].iter().map(|b| b.1).sum();
            let offset = geometry.offset(d.blocks[i].0);
            let run = &d.buf[pos..pos + len];
            let aligned = (run.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
                && offset.is_multiple_of(DIRECT_ALIGN as u64)
                && len.is_multiple_of(DIRECT_ALIGN);
            match &self.direct {
                Some(f) if aligned && self.direct_ok.load(Ordering::Relaxed) => {
                    if let Err(e) = f.write_all_at(run, offset) {
                        // A file system that takes O_DIRECT opens but refuses its writes.
                        if e.raw_os_error() != Some(rustix::io::Errno::INVAL.raw_os_error()) {
                            return Err(e);
                        }
                        self.direct_ok.store(false, Ordering::Relaxed);
                        self.buffered.write_all_at(run, offset)?;
                    }
                }
                _ => self.buffered.write_all_at(run, offset)?,
            }
            pos += len;
            i = j;
        }
        Ok(d.buf)
    }
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RestoreStats {
    pub size: u64,
    pub blocks_written: u64,
    pub bytes_written: u64,
}

/// A decoded batch of blocks, in the aligned buffer it was decoded into.
type Batch = Vec<(u64, BlockHash, Prepared)>;

/// One restore writer: writes decoded batches until there are none (or another writer
/// failed), handing each buffer back for reuse; the first failure stops the others.
fn write_loop(
    decoded: &std::sync::Mutex<std::sync::mpsc::Receiver<Decoded>>,
    buffers: &std::sync::mpsc::Sender<Vec<u8>>,
    write: &(dyn Fn(Decoded) -> Result<Vec<u8>, StoreError> + Sync),
    failed: &AtomicBool,
) -> Result<(), StoreError> {
    loop {
        let next = decoded.lock().map(|rx| rx.recv());
        let Ok(Ok(d)) = next else {
            return Ok(());
        };
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        match write(d) {
            Ok(buf) => {
                let _ = buffers.send(buf);
            }
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
}

/// The restore decoder: decodes each batch (on all cores) into a free buffer, at most
/// [`DECODED_BUFFERS`] of them, and hands it to the writers.
fn decode_loop(
    batches: std::sync::mpsc::Receiver<Batch>,
    buffers: &std::sync::mpsc::Receiver<Vec<u8>>,
    decoded: &std::sync::mpsc::SyncSender<Decoded>,
    decode: &dyn Fn(Batch, Vec<u8>) -> Result<Decoded, StoreError>,
    failed: &AtomicBool,
    stopped: impl Fn() -> StoreError,
) -> Result<(), StoreError> {
    let mut made = 0;
    for batch in batches {
        if failed.load(Ordering::Relaxed) {
            return Err(stopped());
        }
        let buf = match buffers.try_recv() {
            Ok(buf) => buf,
            Err(_) if made < DECODED_BUFFERS => {
                made += 1;
                Vec::new()
            }
            Err(_) => buffers.recv().map_err(|_| stopped())?,
        };
        decoded.send(decode(batch, buf)?).map_err(|_| stopped())?;
    }
    Ok(())
}

/// Makes a checked restore visible: the image is synced, renamed from its temporary name to
/// `out`, and the folder synced, so a crash leaves the old file or the whole new one.
fn publish(file: &File, tmp: &Path, out: &Path) -> Result<(), StoreError> {
    file.sync_all().map_err(io_error(tmp))?;
    std::fs::rename(tmp, out).map_err(io_error(out))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_error(parent))?;
    }
    Ok(())
}

/// Writes disk `disk` of point `point` to `out` as a sparse raw image (replacing a file
/// there: the caller decides whether one may be), each chunk decoded with `codec`.
pub fn restore_disk(
    conn: &Connection,
    (data, codec): (&Path, &Codec),
    point: i64,
    disk: &PointDisk,
    out: &Path,
    progress: &dyn Fn(u64),
) -> Result<RestoreStats, StoreError> {
    let geometry =
        DiskGeometry::new(disk.size, disk.block_size).map_err(|source| StoreError::Geometry {
            disk: disk.name.clone(),
            source,
        })?;
    let (tmp, file) = create_partial(out, &geometry)?;
    let source = Source {
        conn,
        data,
        codec,
        span: leaves::Span::all_leaves(disk.disk_id, PointId(point)),
        geometry: &geometry,
    };
    let result = write_image(&source, &tmp, &file, progress).and_then(|walked| {
        let got = tree::root(&geometry, walked.builder.finish());
        if got != disk.root_leaf {
            return Err(StoreError::RestoredRoot {
                disk: disk.name.clone(),
                got,
                want: disk.root_leaf,
            });
        }
        publish(&file, &tmp, out)?;
        Ok(walked.stats)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    if result.is_ok() {
        progress(geometry.size);
    }
    result
}

/// Maps an I/O error on `path` to the store's error.
fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { path, source }
}

/// Creates the image's temporary file beside `out` (`.NAME.rewind-partial`), empty and of the
/// disk's size (a hole until written).
fn create_partial(out: &Path, geometry: &DiskGeometry) -> Result<(PathBuf, File), StoreError> {
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = out.with_file_name(format!(".{file_name}.rewind-partial"));
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.set_len(geometry.size).map_err(io_error(&tmp))?;
    Ok((tmp, file))
}

/// Where a restore reads: one disk of a point in the catalog and the chunk store.
struct Source<'a> {
    conn: &'a Connection,
    data: &'a Path,
    codec: &'a Codec,
    span: leaves::Span,
    geometry: &'a DiskGeometry,
}

/// What the catalog walk passed: the point's leaves as a tree, and what was written.
struct Walked {
    builder: Builder,
    stats: RestoreStats,
}

/// Decompresses and verifies a batch of frames on all cores, straight into `buf`.
fn decode(
    geometry: &DiskGeometry,
    codec: &Codec,
    batch: Batch,
    buf: Vec<u8>,
) -> Result<Decoded, StoreError> {
    let blocks = batch
        .iter()
        .map(|(idx, _, _)| (*idx, geometry.block_len(*idx).unwrap_or(0)))
        .collect();
    let mut decoded = Decoded::layout(buf, blocks);
    batch
        .into_par_iter()
        .zip(decoded.slices())
        .try_for_each(|((_, leaf, prepared), out)| {
            let frame = prepared.frame()?;
            codec.decode_into(leaf, &frame, out)?;
            Ok::<_, StoreError>(())
        })?;
    Ok(decoded)
}

/// Writes every block of `source` into `file` (at `tmp`), in three stages: this thread walks
/// the catalog in block order and finds each frame's pack window; a worker reads, decompresses
/// and verifies each batch of frames on all cores, straight into an aligned buffer; writer
/// threads write earlier batches from theirs (contiguous blocks in one write).
fn write_image(
    source: &Source,
    tmp: &Path,
    file: &File,
    progress: &dyn Fn(u64),
) -> Result<Walked, StoreError> {
    let geometry = source.geometry;
    let decode = |batch: Batch, buf: Vec<u8>| decode(geometry, source.codec, batch, buf);
    let output = Output::open(tmp, file.try_clone().map_err(io_error(tmp))?);
    let write = |d: Decoded| -> Result<Vec<u8>, StoreError> {
        output.write_batch(geometry, d).map_err(io_error(tmp))
    };
    // Set by the first writer that fails: the others and the decoder stop at once instead of
    // writing the rest of the disk first.
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
        // Decoded batches go to writer threads of their own, so both cores decode while they
        // wait on the device (two writes in flight: this VM's disk writes ~1.5x faster at
        // queue depth 2 than 1); their buffers come back for the next batches.
        let (dtx, drx) = std::sync::mpsc::sync_channel::<Decoded>(1);
        let (ftx, frx) = std::sync::mpsc::channel::<Vec<u8>>();
        let drx = std::sync::Arc::new(std::sync::Mutex::new(drx));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (drx, ftx, write, failed) = (drx.clone(), ftx.clone(), &write, &failed);
                scope.spawn(move || write_loop(&drx, &ftx, write, failed))
            })
            .collect();
        // Only the writers hold these now: when they all stop, the decoder's send fails
        // instead of waiting forever.
        drop(ftx);
        drop(drx);
        let stopped = || StoreError::Io {
            path: tmp.to_owned(),
            source: std::io::Error::other("the restore writer stopped"),
        };
        let failed = &failed;
        let worker = scope.spawn(move || decode_loop(rx, &frx, &dtx, &decode, failed, stopped));
        let walked = walk(source, tx, tmp, progress);
        let panicked = || {
            Err(StoreError::Io {
                path: tmp.to_owned(),
                source: std::io::Error::other("a restore worker panicked"),
            })
        };
        let decoded = worker.join().unwrap_or_else(|_| panicked());
        let written = writers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| panicked()))
            .collect::<Result<Vec<()>, _>>();
        // The writer's error explains a stopped decoder, and the decoder's a stopped walk,
        // better than "stopped".
        written.and(decoded).and(walked)
    })
}

/// The first stage: walks the point's leaves in block order, building their tree, and sends
/// each block's prepared frame to the decoder in batches of about [`BATCH_BYTES`]. A block
/// whose chunk is not in the index fails the restore.
fn walk(
    source: &Source,
    tx: std::sync::mpsc::SyncSender<Batch>,
    tmp: &Path,
    progress: &dyn Fn(u64),
) -> Result<Walked, StoreError> {
    let geometry = source.geometry;
    let batch_blocks = (BATCH_BYTES / geometry.block_size.bytes() as usize).max(1);
    let mut reader = chunks::open(source.data)?.reader(ReadOrder::Sequential);
    let mut builder = Builder::new(Shape::of(geometry));
    let mut next = 0u64;
    let mut stats = RestoreStats {
        size: geometry.size,
        ..Default::default()
    };
    let mut batch: Batch = Vec::with_capacity(batch_blocks);
    leaves::at_point(source.conn, &source.span, Columns::Located, |node| {
        let (idx, leaf, loc) = (node.idx, node.hash, node.at);
        let Some(len) = geometry.block_len(idx) else {
            return Ok(ControlFlow::Continue(()));
        };
        builder.push_zeros(idx - next);
        let at = loc.ok_or(StoreError::MissingChunk(leaf))?;
        batch.push((idx, leaf, reader.prepare(at, &leaf)?));
        builder.push(leaf);
        next = idx + 1;
        stats.blocks_written += 1;
        stats.bytes_written += len as u64;
        if stats.blocks_written == 2 * batch_blocks as u64 {
            rewind_proto::faults::point("restore-mid-write");
        }
        if batch.len() == batch_blocks {
            // A worker that stopped reports why below.
            if tx.send(std::mem::take(&mut batch)).is_err() {
                return Err(StoreError::Io {
                    path: tmp.to_owned(),
                    source: std::io::Error::other("the restore worker stopped"),
                });
            }
            progress(geometry.offset(idx) + len as u64);
        }
        Ok(ControlFlow::Continue(()))
    })?;
    if !batch.is_empty() {
        let _ = tx.send(batch);
    }
    Ok(Walked { builder, stats })
}

/// Checks that the catalog's leaves of `disk` at `point` give the point's root: what a read
/// that does not walk the leaves in order (the NBD export, restores in other formats) checks
/// first, so the leaf map it serves is the one the root (and an encrypted point's manifest
/// MAC) binds.
pub fn check_leaves(conn: &Connection, point: i64, disk: &PointDisk) -> Result<(), StoreError> {
    let geometry =
        DiskGeometry::new(disk.size, disk.block_size).map_err(|source| StoreError::Geometry {
            disk: disk.name.clone(),
            source,
        })?;
    let mut builder = Builder::new(Shape::of(&geometry));
    let mut next = 0u64;
    let span = leaves::Span::all_leaves(disk.disk_id, PointId(point));
    leaves::at_point(conn, &span, Columns::Hashes, |n| {
        builder.push_zeros(n.idx - next);
        builder.push(n.hash);
        next = n.idx + 1;
        Ok::<_, StoreError>(ControlFlow::Continue(()))
    })?;
    let got = tree::root(&geometry, builder.finish());
    if got != disk.root_leaf {
        return Err(StoreError::RestoredRoot {
            disk: disk.name.clone(),
            got,
            want: disk.root_leaf,
        });
    }
    Ok(())
}
