//! Restoring one disk of a point to a raw image: every non-zero block is read once from its
//! pack, verified against its hash, and written at its offset; zero blocks stay holes. The
//! image is written under a temporary name and renamed only once its root equals the point's.

use crate::error::StoreError;
use crate::packs::{read_prepared, PackReader, Prepared, DIRECT_ALIGN};
use crate::points::PointDisk;
use crate::store::PACKS_DIR;
use rayon::prelude::*;
use rewind_proto::format::DiskGeometry;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::{chunk, Leaf};
use rusqlite::{params, Connection};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Blocks decompressed together: 4 MiB at 64 KiB blocks, enough to keep both cores busy.
const BATCH_BLOCKS: usize = 64;

/// Where a chunk's frame lies: where the pack reader found it, pack id, offset, length.
type Frame = (Prepared, i64, u64, u32);

/// The output image. Written with O_DIRECT where the file system allows it: no copy into the
/// page cache (the dominant cost of a restore on a fresh machine), nothing useful evicted, and
/// the data is on the device when the final fsync returns. Pieces O_DIRECT cannot take (a disk
/// whose size is not a multiple of 4 KiB) go through an ordinary handle.
struct Output {
    direct: Option<File>,
    buffered: File,
    /// Coalesced run of contiguous blocks, at an aligned place inside `buf`.
    buf: Vec<u8>,
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
            direct,
            buffered,
            buf: Vec::new(),
        }
    }

    /// Writes `blocks` (index, bytes; ascending), one write per run of contiguous blocks.
    fn write_blocks(
        &mut self,
        geometry: &DiskGeometry,
        blocks: Vec<(u64, Vec<u8>)>,
    ) -> std::io::Result<()> {
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && blocks[j].0 == blocks[j - 1].0 + 1 {
                j += 1;
            }
            let len: usize = blocks[i..j].iter().map(|(_, d)| d.len()).sum();
            self.buf.resize(len + DIRECT_ALIGN, 0);
            let at = self.buf.as_ptr().align_offset(DIRECT_ALIGN);
            let at = if at < DIRECT_ALIGN { at } else { 0 };
            let mut pos = at;
            for (_, d) in &blocks[i..j] {
                self.buf[pos..pos + d.len()].copy_from_slice(d);
                pos += d.len();
            }
            let offset = geometry.offset(blocks[i].0);
            let run = &self.buf[at..at + len];
            let aligned = (self.buf.as_ptr().wrapping_add(at) as usize)
                .is_multiple_of(DIRECT_ALIGN)
                && offset.is_multiple_of(DIRECT_ALIGN as u64)
                && len.is_multiple_of(DIRECT_ALIGN);
            match &self.direct {
                Some(f) if aligned => {
                    if let Err(e) = f.write_all_at(run, offset) {
                        // A file system that takes O_DIRECT opens but refuses its writes.
                        if e.raw_os_error() != Some(rustix::io::Errno::INVAL.raw_os_error()) {
                            return Err(e);
                        }
                        self.direct = None;
                        self.buffered.write_all_at(run, offset)?;
                    }
                }
                _ => self.buffered.write_all_at(run, offset)?,
            }
            i = j;
        }
        Ok(())
    }
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RestoreStats {
    pub size: u64,
    pub blocks_written: u64,
    pub bytes_written: u64,
}

/// Streams the leaves of `disk` at `point`, in block order, with where each chunk lives.
pub fn for_each_block(
    conn: &Connection,
    disk_id: i64,
    point: i64,
    mut f: impl FnMut(u64, Leaf, Option<(i64, u64, u32)>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare(
        "SELECT n.idx, n.hash, c.pack_id, c.offset, c.clen FROM
           (SELECT idx, hash, MAX(point) FROM nodes
            WHERE disk_id = ?1 AND level = 0 AND point <= ?2 GROUP BY idx) n
         LEFT JOIN chunks c ON c.hash = n.hash
         WHERE n.hash IS NOT NULL ORDER BY n.idx",
    )?;
    let mut rows = stmt.query(params![disk_id, point])?;
    while let Some(r) = rows.next()? {
        let idx: i64 = r.get(0)?;
        let hash: Vec<u8> = r.get(1)?;
        let leaf = Leaf::from_slice(&hash)?;
        let loc = match (
            r.get::<_, Option<i64>>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, Option<i64>>(4)?,
        ) {
            (Some(p), Some(o), Some(l)) => Some((p, o as u64, l as u32)),
            _ => None,
        };
        f(idx as u64, leaf, loc)?;
    }
    Ok(())
}

/// Writes disk `disk` of point `point` to `out` as a sparse raw image.
pub fn restore_disk(
    conn: &Connection,
    data: &Path,
    point: i64,
    disk: &PointDisk,
    out: &Path,
    force: bool,
    progress: &dyn Fn(u64),
) -> Result<RestoreStats, StoreError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    if out.exists() && !force {
        return Err(StoreError::OutputExists(out.to_owned()));
    }
    let geometry =
        DiskGeometry::new(disk.size, disk.block_size).map_err(|source| StoreError::Geometry {
            disk: disk.name.clone(),
            source,
        })?;
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
        .map_err(io(&tmp))?;
    file.set_len(geometry.size).map_err(io(&tmp))?;

    let packs_dir = data.join(PACKS_DIR);
    let mut reader = PackReader::sequential(&packs_dir);
    let mut builder = Builder::new(Shape::of(&geometry));
    let mut next = 0u64;
    let mut stats = RestoreStats {
        size: geometry.size,
        ..Default::default()
    };
    // Three stages: this thread walks the catalog in block order and asks the kernel to read
    // ahead of the packs; a worker reads, decompresses and verifies each batch of frames on
    // all cores (several reads in flight when the packs are not in the page cache: they are
    // written with O_DIRECT) while it writes the previous batch (contiguous blocks coalesced
    // into one write).
    let decode = |batch: Vec<(u64, Leaf, Frame)>| -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        batch
            .into_par_iter()
            .map(|(idx, leaf, (file, pack, offset, clen))| {
                let frame = read_prepared(&file, &packs_dir, pack, offset, clen, &leaf)?;
                let len = geometry.block_len(idx).unwrap_or(0);
                Ok((idx, chunk::open(leaf, &frame, len)?))
            })
            .collect()
    };
    let mut output = Output::open(&tmp, file.try_clone().map_err(io(&tmp))?);
    let mut write = |blocks: Vec<(u64, Vec<u8>)>| -> Result<(), StoreError> {
        output.write_blocks(&geometry, blocks).map_err(io(&tmp))
    };
    let result = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(u64, Leaf, Frame)>>(2);
        let worker = scope.spawn(move || -> Result<(), StoreError> {
            let mut pending: Option<Vec<(u64, Vec<u8>)>> = None;
            for batch in rx {
                let decoded = match pending.take() {
                    Some(prev) => {
                        let (w, d) = rayon::join(|| write(prev), || decode(batch));
                        w?;
                        d?
                    }
                    None => decode(batch)?,
                };
                pending = Some(decoded);
            }
            match pending.take() {
                Some(last) => write(last),
                None => Ok(()),
            }
        });
        let mut batch: Vec<(u64, Leaf, Frame)> = Vec::with_capacity(BATCH_BLOCKS);
        let walked = for_each_block(conn, disk.disk_id, point, |idx, leaf, loc| {
            let Some(len) = geometry.block_len(idx) else {
                return Ok(());
            };
            builder.push_zeros(idx - next);
            let (pack, offset, clen) = loc.ok_or(StoreError::MissingChunk(leaf))?;
            let file = reader.prepare(pack, offset, clen, &leaf)?;
            batch.push((idx, leaf, (file, pack, offset, clen)));
            builder.push(leaf);
            next = idx + 1;
            stats.blocks_written += 1;
            stats.bytes_written += len as u64;
            if batch.len() == BATCH_BLOCKS {
                // A worker that stopped reports why below.
                if tx.send(std::mem::take(&mut batch)).is_err() {
                    return Err(StoreError::Io {
                        path: tmp.clone(),
                        source: std::io::Error::other("the restore worker stopped"),
                    });
                }
                progress(geometry.offset(idx) + len as u64);
            }
            Ok(())
        });
        if walked.is_ok() && !batch.is_empty() {
            let _ = tx.send(batch);
        }
        drop(tx);
        let worked = worker.join().unwrap_or_else(|_| {
            Err(StoreError::Io {
                path: tmp.clone(),
                source: std::io::Error::other("a restore worker panicked"),
            })
        });
        // The worker's error explains a stopped walk better than "worker stopped".
        worked.and(walked)
    })
    .and_then(|()| {
        let got = tree::root(&geometry, builder.finish());
        if got != disk.root_leaf {
            return Err(StoreError::RestoredRoot {
                disk: disk.name.clone(),
                got,
                want: disk.root_leaf,
            });
        }
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io(parent))?;
        }
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| {
        progress(geometry.size);
        stats
    })
}
