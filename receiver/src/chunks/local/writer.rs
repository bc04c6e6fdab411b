//! Writing local packs: records gathered in memory and written with O_DIRECT at each sync.

use super::{io_err, pack_path, DIRECT_ALIGN};
use crate::chunks::format::{record_header, PACK_MAGIC, PACK_TARGET_BYTES, RECORD_HEADER};
use crate::chunks::{ChunkLocation, ChunkStoreError, ChunkWriter, PackId, Retired};
use rewind_proto::BlockHash;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Buffers of writers that ended, kept for the next ones. A new writer's buffer is backed
/// page by page as it is first written, which a host that backs new memory slowly pays
/// dearly for: a copied incremental's first batch of 41 MB took 0.2-0.9 s to append with a
/// new (doubling) buffer and 0.01 s with a kept one.
static SPARE: Spares = Spares::new();
/// Buffers kept at most (the largest).
const SPARE_KEPT: usize = 2;
/// A buffer's size: what it holds between syncs is at most a pack and its last record.
const BUF_BYTES: usize = PACK_TARGET_BYTES as usize + (16 << 20);
/// Larger buffers (a writer that grew past a pack) are not kept.
const SPARE_MAX_BYTES: usize = 2 * PACK_TARGET_BYTES as usize;
/// Smaller buffers are cheap to make again.
const SPARE_MIN_BYTES: usize = 8 << 20;

/// Spare buffers, their contents stale.
struct Spares(Mutex<Vec<Vec<u8>>>);

impl Spares {
    const fn new() -> Spares {
        Spares(Mutex::new(Vec::new()))
    }

    /// A kept buffer of at least `len` bytes, if there is one.
    fn take(&self, len: usize) -> Option<Vec<u8>> {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let i = kept.iter().position(|v| v.len() >= len)?;
        Some(kept.swap_remove(i))
    }

    /// Keeps `v` if its size is worth keeping and it is among the largest kept.
    fn keep(&self, v: Vec<u8>) {
        if !(SPARE_MIN_BYTES..=SPARE_MAX_BYTES).contains(&v.len()) {
            return;
        }
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.push(v);
        kept.sort_by_key(|v| std::cmp::Reverse(v.len()));
        kept.truncate(SPARE_KEPT);
    }
}

/// Bytes to be written from a page boundary of the pack, kept at a page-aligned address so
/// they can go to the file with O_DIRECT as they are.
struct PageBuf {
    v: Vec<u8>,
    /// Where the aligned bytes start in `v`.
    at: usize,
    len: usize,
}

impl PageBuf {
    fn new() -> PageBuf {
        PageBuf {
            v: Vec::new(),
            at: 0,
            len: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.v.len().saturating_sub(self.at)
    }

    /// Room for `more` bytes and the zero padding up to the next page.
    fn reserve(&mut self, more: usize) {
        let need = (self.len + more).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        if need <= self.capacity() {
            return;
        }
        // Room for a whole pack at once: pages are backed as they are first written, and
        // the buffer never grows (a doubling buffer touches twice what it holds).
        let cap = need.max(2 * self.capacity()).max(BUF_BYTES);
        let mut v = SPARE
            .take(need + DIRECT_ALIGN)
            .unwrap_or_else(|| vec![0u8; cap + DIRECT_ALIGN]);
        let at = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        v[at..at + self.len].copy_from_slice(self.bytes());
        SPARE.keep(std::mem::replace(&mut self.v, v));
        self.at = at;
    }

    fn extend(&mut self, parts: &[&[u8]]) {
        self.reserve(parts.iter().map(|p| p.len()).sum());
        for p in parts {
            let end = self.at + self.len;
            self.v[end..end + p.len()].copy_from_slice(p);
            self.len += p.len();
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.v[self.at..self.at + self.len]
    }

    /// The bytes zero-padded to whole pages, at an aligned address.
    fn padded(&mut self) -> &[u8] {
        self.reserve(0);
        let span = self.len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        self.v[self.at + self.len..self.at + span].fill(0);
        &self.v[self.at..self.at + span]
    }

    /// Drops the first `n` bytes (a multiple of the page size).
    fn consume(&mut self, n: usize) {
        self.v.copy_within(self.at + n..self.at + self.len, self.at);
        self.len -= n;
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        SPARE.keep(std::mem::take(&mut self.v));
    }
}

/// The pack being appended to.
struct Current {
    id: PackId,
    file: File,
    /// The same file opened with O_DIRECT, where the file system takes it.
    direct: Option<File>,
    /// Logical length, records not yet written included.
    len: u64,
    /// Bytes already in the file.
    written: u64,
    /// Offset of `pending`'s first byte: the page holding the end of what is written.
    base: u64,
}

/// Appends chunk records to one pack at a time. Records are gathered in memory and written at
/// [`ChunkWriter::sync`]: with O_DIRECT where the file system takes it, so a seed's data is
/// not copied into the page cache (the receiver's CPU, and the cache of everything else on
/// it, are spared), rewriting the last partial page from memory; the file is then cut back to
/// its length (the page padding is not part of it) and fdatasynced.
pub struct PackWriter {
    dir: PathBuf,
    current: Option<Current>,
    /// The pack's bytes from `Current::base` on.
    pending: PageBuf,
    /// Packs this writer moved away from, to seal once their rows are committed.
    retired: Vec<PackId>,
}

impl PackWriter {
    /// A writer of packs in folder `dir`.
    pub fn new(dir: &Path) -> PackWriter {
        PackWriter {
            dir: dir.to_owned(),
            current: None,
            pending: PageBuf::new(),
            retired: Vec::new(),
        }
    }
}

impl PackWriter {
    /// Syncs and retires the pack being written (then handed back by `take_retired`), so the
    /// next append needs a new pack.
    pub fn retire_current(&mut self) -> Result<(), ChunkStoreError> {
        self.sync()?;
        if let Some(c) = self.current.take() {
            self.retired.push(c.id);
            self.pending.clear();
        }
        Ok(())
    }
}

impl ChunkWriter for PackWriter {
    fn take_retired(&mut self) -> Vec<Retired> {
        self.retired.drain(..).map(Retired::from).collect()
    }

    fn current(&self) -> Option<PackId> {
        self.current.as_ref().map(|c| c.id)
    }

    /// True unless a pack is open and below [`PACK_TARGET_BYTES`].
    fn needs_pack(&self) -> bool {
        !matches!(&self.current, Some(c) if c.len < PACK_TARGET_BYTES)
    }

    /// Creates pack `id` with its header and fsyncs the file and its folder, so that its name
    /// survives a crash before any record refers to it.
    fn open_pack(&mut self, id: PackId) -> Result<(), ChunkStoreError> {
        self.sync()?;
        if let Some(old) = self.current() {
            self.retired.push(old);
        }
        let path = pack_path(&self.dir, id);
        let mut f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all(PACK_MAGIC).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path)
            .ok();
        let magic = PACK_MAGIC.len() as u64;
        self.pending.clear();
        self.pending.extend(&[PACK_MAGIC]);
        self.current = Some(Current {
            id,
            file: f,
            direct,
            len: magic,
            written: magic,
            base: 0,
        });
        Ok(())
    }

    /// Gathers the record in memory: not written, nor durable, until [`ChunkWriter::sync`].
    fn append(&mut self, hash: &BlockHash, frame: &[u8]) -> Result<ChunkLocation, ChunkStoreError> {
        let Some(c) = self.current.as_mut() else {
            return Err(ChunkStoreError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other("no open pack"),
            });
        };
        let len = frame.len() as u32;
        self.pending.extend(&[&record_header(hash, len), frame]);
        let offset = c.len + RECORD_HEADER;
        c.len += RECORD_HEADER + frame.len() as u64;
        Ok(ChunkLocation {
            pack: c.id,
            offset,
            len,
        })
    }

    /// Writes every appended record and fdatasyncs the pack.
    fn sync(&mut self) -> Result<(), ChunkStoreError> {
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        if c.written == c.len {
            return Ok(());
        }
        let path = pack_path(&self.dir, c.id);
        let mut done = false;
        if let Some(d) = &c.direct {
            // Whole pages from `base` (a page boundary), zero-padded past the end; the bytes
            // already written in the first page are rewritten unchanged.
            match d.write_all_at(self.pending.padded(), c.base) {
                Ok(()) => {
                    c.file.set_len(c.len).map_err(io_err(&path))?;
                    done = true;
                }
                // The file system opened the file with O_DIRECT but refuses such writes.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    c.direct = None;
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        if !done {
            let from = (c.written - c.base) as usize;
            c.file
                .write_all_at(&self.pending.bytes()[from..], c.written)
                .map_err(io_err(&path))?;
            // A refused direct write may have left padding behind.
            c.file.set_len(c.len).map_err(io_err(&path))?;
        }
        c.file.sync_data().map_err(io_err(&path))?;
        c.written = c.len;
        // Keep the last partial page: the next write starts at its boundary.
        let base = c.len / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        self.pending.consume((base - c.base) as usize);
        c.base = base;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_keep_the_largest_buffers_of_a_useful_size_and_hand_out_one_big_enough() {
        let spares = Spares::new();
        // Too small to be worth keeping, too large to keep.
        spares.keep(vec![0; SPARE_MIN_BYTES - 1]);
        spares.keep(vec![0; SPARE_MAX_BYTES + 1]);
        assert!(spares.take(1).is_none());
        spares.keep(vec![1; SPARE_MIN_BYTES]);
        spares.keep(vec![2; BUF_BYTES]);
        spares.keep(vec![3; SPARE_MIN_BYTES + 1]);
        // The two largest are kept; a request larger than any gets none.
        assert!(spares.take(BUF_BYTES + 1).is_none());
        let big = spares.take(SPARE_MIN_BYTES + 2).unwrap();
        assert_eq!((big.len(), big[0]), (BUF_BYTES, 2));
        let next = spares.take(1).unwrap();
        assert_eq!((next.len(), next[0]), (SPARE_MIN_BYTES + 1, 3));
        assert!(spares.take(1).is_none());
    }
}
