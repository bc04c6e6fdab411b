//! Writing fetched blocks: chunks are decompressed and checked on one thread, written (or
//! blocks zeroed) on another, and every written block is read back on a third, each working on
//! a later batch than the next.

use super::fetch::Work;
use super::target::disk_io;
use super::RollbackError;
use crate::nbd::NbdClient;
use crate::scan::BlockSource;
use rewind_proto::chunk;
use rewind_proto::crypt::{ChunkIds, Codec};
use rewind_proto::format::DiskGeometry;
use rewind_proto::BlockHash;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Reads `blocks` (index, the leaf each must have) from `src`; returns the lowest block that
/// does not hold its leaf, with the leaf it holds, and the bytes read.
fn read_back(
    src: &mut dyn BlockSource,
    g: &DiskGeometry,
    ids: ChunkIds,
    blocks: &[(u64, BlockHash)],
) -> Result<(Option<(u64, BlockHash)>, u64), RollbackError> {
    let ranges: Vec<(u64, usize)> = blocks
        .iter()
        .map(|&(i, _)| (g.offset(i), g.block_len(i).unwrap_or(0)))
        .collect();
    let read = ranges.iter().map(|r| r.1 as u64).sum();
    let mut wrong: Option<(u64, BlockHash)> = None;
    src.read_ranges(&ranges, &mut |k, bytes| {
        let (i, h) = blocks[k];
        let now = ids.of(bytes);
        if now != h && wrong.is_none_or(|(j, _)| i < j) {
            wrong = Some((i, now));
        }
    })?;
    Ok((wrong, read))
}

/// Decompresses and checks fetched chunks on one thread, writes them (and zeroes blocks) with
/// `w` on another, and reads written blocks back through `checker` on a third, each working on
/// a later batch than the next. Returns the writer, to be flushed.
pub(super) fn write_blocks(
    mut w: Writer,
    mut checker: Box<dyn BlockSource + Send>,
    g: DiskGeometry,
    codec: Codec,
    mut wrx: tokio::sync::mpsc::Receiver<Work>,
) -> Result<(Writer, Written), RollbackError> {
    let ids = codec.chunk_ids();
    let (ctx, crx) = std::sync::mpsc::sync_channel::<Vec<(u64, BlockHash)>>(2);
    let check = std::thread::spawn(move || {
        let mut c = Written::default();
        for blocks in crx {
            let (wrong, read) = read_back(checker.as_mut(), &g, ids, &blocks)?;
            c.reread += read;
            if let Some((i, now)) = wrong {
                if c.wrong.is_none_or(|(j, _)| i < j) {
                    c.wrong = Some((i, now));
                }
            }
            c.checked += blocks.len() as u64;
        }
        Ok::<_, RollbackError>(c)
    });
    // Decompressed into buffers the writer hands back.
    let (dtx, drx) = std::sync::mpsc::sync_channel::<Result<Decoded, RollbackError>>(1);
    let (btx, brx) = std::sync::mpsc::channel::<Vec<u8>>();
    let decode = std::thread::spawn(move || {
        while let Some(work) = wrx.blocking_recv() {
            let decoded = match work {
                Work::Zeros(blocks) => Ok(Decoded {
                    opened: Vec::new(),
                    zeros: blocks,
                }),
                Work::Chunks(chunks) => open_all(&chunks, &g, &codec, &brx)
                    .map(|opened| Decoded {
                        opened,
                        zeros: Vec::new(),
                    })
                    .map_err(RollbackError::Corrupt),
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
            let (mut blocks, pending): (Vec<(u64, BlockHash)>, Vec<Piece>) = batch
                .opened
                .into_iter()
                .map(|(i, h, data)| ((i, h), (g.offset(i), data)))
                .unzip();
            blocks.extend(batch.zeros.iter().map(|&i| (i, BlockHash::ZERO)));
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
        Ok::<_, RollbackError>(())
    })();
    // A decoder still sending, or still waiting for work, stops.
    drop(drx);
    drop(ctx);
    let decoded = decode.join();
    let checked = check
        .join()
        .unwrap_or_else(|_| Err(RollbackError::Worker("the read-back panicked".into())));
    if decoded.is_err() {
        return Err(RollbackError::Worker("the decompression panicked".into()));
    }
    wrote?;
    Ok((w, Written { bytes, ..checked? }))
}

/// Decompresses and checks each fetched chunk once, into a buffer from `spare` for each block
/// that needs it (the blocks of one chunk have its length; the others get a copy).
fn open_all(
    chunks: &[(BlockHash, bytes::Bytes, Vec<u64>)],
    g: &DiskGeometry,
    codec: &Codec,
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
                codec.decode_into(*h, frame, &mut buf)?;
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
pub(super) enum Writer {
    Raw {
        file: std::fs::File,
        path: PathBuf,
        is_device: bool,
    },
    Nbd(NbdClient),
}

impl Writer {
    /// Writes (offset, bytes) pieces of at most a block each.
    fn write_many(&mut self, pieces: &[(u64, Vec<u8>)]) -> Result<(), RollbackError> {
        match self {
            Writer::Raw { file, path, .. } => {
                for (offset, data) in pieces {
                    file.write_all_at(data, *offset).map_err(disk_io(path))?;
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

    fn zero(&mut self, offset: u64, len: usize) -> Result<(), RollbackError> {
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
                    .map_err(disk_io(path))
            }
            Writer::Nbd(client) => Ok(client.write_zeroes(offset, len as u32)?),
        }
    }

    pub(super) fn flush(&mut self) -> Result<(), RollbackError> {
        match self {
            Writer::Raw { file, path, .. } => file.sync_all().map_err(disk_io(path)),
            Writer::Nbd(client) => Ok(client.flush()?),
        }
    }
}

/// A block's bytes at their disk offset.
type Piece = (u64, Vec<u8>);

/// A block fetched for a rollback, decompressed and checked: its index, leaf and bytes.
type Opened = (u64, BlockHash, Vec<u8>);

/// What the writer of a rollback did: bytes written, bytes read back, how many blocks it
/// checked, and the first of them that does not hold the point's content (with what it holds).
#[derive(Default)]
pub(super) struct Written {
    pub bytes: u64,
    pub reread: u64,
    pub checked: u64,
    pub wrong: Option<(u64, BlockHash)>,
    /// Compressed bytes fetched for it (filled in by the caller).
    pub fetched: u64,
}
