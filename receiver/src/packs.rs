//! Pack files: where chunk data lives on the receiver.
//!
//! ```text
//!  packs/<id as 16 hex digits>.pack
//!  +----------+------------------------------------------------------------+
//!  | RWPACK01 | record | record | ...                                      |
//!  +----------+------------------------------------------------------------+
//!  record = "RWCK" | blake3 hash (32) | frame length (u32 le) | zstd frame
//! ```
//! Each writer appends to its own pack and never reopens an old one, so a crash can only leave
//! unreferenced bytes at the end of a pack. The catalog stores (pack, offset of the frame,
//! frame length); the record header lets a checker rebuild that index from the packs alone.
//!
//! Ordering rule: a chunk is durable (pack fsynced, and the pack's folder entry fsynced when the
//! pack was created) before the catalog refers to it. [`PackWriter::sync`] is that fsync.

use rewind_proto::Leaf;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// First bytes of every pack file.
pub const PACK_MAGIC: &[u8; 8] = b"RWPACK01";
/// First bytes of every record.
pub const RECORD_MAGIC: &[u8; 4] = b"RWCK";
/// Bytes of a record before its frame: magic, hash, length.
pub const RECORD_HEADER: u64 = 4 + 32 + 4;
/// A pack is closed once it passes 64 MiB: large enough to keep file counts low (a 1 TiB disk
/// makes ~16 k packs), small enough for gc to rewrite one quickly.
pub const PACK_TARGET_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum PackError {
    /// Reading or writing a pack failed (disk full shows up here as ENOSPC).
    #[error("pack {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The bytes at a catalogued place are not the record the catalog says.
    #[error("pack {path} offset {offset}: record header does not match chunk {hash}")]
    BadRecord {
        path: PathBuf,
        offset: u64,
        hash: Leaf,
    },
}

/// The file name of pack `id`.
pub fn pack_path(dir: &Path, id: i64) -> PathBuf {
    dir.join(format!("{id:016x}.pack"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Alignment O_DIRECT needs of offsets, lengths and memory.
pub const DIRECT_ALIGN: usize = 4096;

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
        let cap = need.max(2 * self.capacity()).max(1 << 20);
        let mut v = vec![0u8; cap + DIRECT_ALIGN];
        let at = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        v[at..at + self.len].copy_from_slice(self.bytes());
        self.v = v;
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

/// The pack being appended to.
struct Current {
    id: i64,
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
/// [`PackWriter::sync`]: with O_DIRECT where the file system takes it, so a seed's data is
/// not copied into the page cache (the receiver's CPU, and the cache of everything else on
/// it, are spared), rewriting the last partial page from memory; the file is then cut back to
/// its length (the page padding is not part of it) and fdatasynced.
pub struct PackWriter {
    dir: PathBuf,
    current: Option<Current>,
    /// The pack's bytes from `Current::base` on.
    pending: PageBuf,
    /// Packs this writer moved away from, to seal once their rows are committed.
    retired: Vec<i64>,
}

impl PackWriter {
    pub fn new(dir: &Path) -> PackWriter {
        PackWriter {
            dir: dir.to_owned(),
            current: None,
            pending: PageBuf::new(),
            retired: Vec::new(),
        }
    }

    /// Packs finished since the last call: seal them in the transaction that indexes their
    /// last chunks (sealing earlier would let gc see a pack without all its rows).
    pub fn take_retired(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.retired)
    }

    /// The pack being appended to, if any.
    pub fn current(&self) -> Option<i64> {
        self.current.as_ref().map(|c| c.id)
    }

    /// The pack the next record goes to, if one is open and not full.
    pub fn needs_pack(&self) -> bool {
        !matches!(&self.current, Some(c) if c.len < PACK_TARGET_BYTES)
    }

    /// Starts pack `id` (allocated by the catalog): creates it with its header and fsyncs the
    /// file and its folder, so that its name survives a crash before any record refers to it.
    pub fn open_pack(&mut self, id: i64) -> Result<(), PackError> {
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

    /// Appends one record and returns (pack id, offset of its frame). Not written, nor
    /// durable, until [`PackWriter::sync`]. Call [`PackWriter::needs_pack`] first.
    pub fn append(&mut self, hash: &Leaf, frame: &[u8]) -> Result<(i64, u64), PackError> {
        let Some(c) = self.current.as_mut() else {
            return Err(PackError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other("no open pack"),
            });
        };
        let len = (frame.len() as u32).to_le_bytes();
        self.pending
            .extend(&[RECORD_MAGIC, hash.as_bytes(), &len, frame]);
        let offset = c.len + RECORD_HEADER;
        c.len += RECORD_HEADER + frame.len() as u64;
        Ok((c.id, offset))
    }

    /// Writes every appended record and makes it durable.
    pub fn sync(&mut self) -> Result<(), PackError> {
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

/// Size of a window: packs written with O_DIRECT are not in the page cache, and a restore
/// reading one small record at a time from disk would wait on each.
const WINDOW_BYTES: u64 = 8 << 20;
/// A new window is read only for a record starting at most this far past the previous one's
/// end: a pack read sparsely is read record by record instead.
const WINDOW_GAP: u64 = 256 << 10;
/// Windows a reader keeps (one per pack, the least recently made dropped first).
const WINDOWS_KEPT: usize = 4;
/// Largest frame a catalog row may name: the bound ingest enforces, for the largest block.
const MAX_FRAME_BYTES: u32 = rewind_proto::format::MAX_FRAME_BYTES as u32;

struct OpenPack {
    file: Arc<File>,
    /// The same file opened with O_DIRECT, for reading a pack in order in large windows.
    direct: Option<File>,
    /// End of the last record read.
    last_end: u64,
}

/// Bytes `[start, start + len)` of a pack, read with O_DIRECT into an aligned buffer.
pub struct Window {
    buf: Vec<u8>,
    at: usize,
    start: u64,
    len: usize,
}

impl Window {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }
}

/// Where a record found by [`PackReader::prepare`] is: inside a window already read, or in
/// the open pack, to be read by [`read_prepared`] on any thread.
#[derive(Clone)]
pub enum Prepared {
    Window(Arc<Window>),
    File(Arc<File>),
}

/// Reads frames from packs, keeping files open across reads. A pack read in order (a restore
/// or a drill of a seeded point) is read in 8 MiB windows with O_DIRECT: packs are written
/// with O_DIRECT and not in the page cache, and reading them through it costs more CPU than
/// the decompression here.
pub struct PackReader {
    dir: PathBuf,
    open: HashMap<i64, OpenPack>,
    /// Whether records read in order are read in windows (see [`PackReader::sequential`]).
    windowed: bool,
    /// The last windows read, with their packs: a few, so memory stays bounded however many
    /// packs a long-lived reader opens, and a restore alternating between packs does not
    /// read the same window again.
    windows: Vec<(i64, Arc<Window>)>,
}

impl PackReader {
    /// A reader for records asked for in no particular order (chunks an agent asks for, a
    /// booted VM's reads): each is read on its own, with no read-ahead beyond the kernel's.
    pub fn new(dir: &Path) -> PackReader {
        PackReader {
            dir: dir.to_owned(),
            open: HashMap::new(),
            windowed: false,
            windows: Vec::new(),
        }
    }

    /// A reader for a walk that reads records mostly in pack order (a restore, a drill, a
    /// verify, gc): runs of records are read in 8 MiB windows.
    pub fn sequential(dir: &Path) -> PackReader {
        PackReader {
            windowed: true,
            ..PackReader::new(dir)
        }
    }

    /// The frame of `hash` at `offset` in pack `id`, checking the record header around it.
    pub fn read(
        &mut self,
        id: i64,
        offset: u64,
        len: u32,
        hash: &Leaf,
    ) -> Result<Vec<u8>, PackError> {
        let at = self.prepare(id, offset, len, hash)?;
        read_prepared(&at, &self.dir, id, offset, len, hash).map(Cow::into_owned)
    }

    /// Finds the record whose frame is at `offset` in pack `id`: in one of the windows kept, in
    /// a new window when the pack is being read in order (by a [`PackReader::sequential`]
    /// reader on a file system that takes O_DIRECT), else in the open pack.
    pub fn prepare(
        &mut self,
        id: i64,
        offset: u64,
        len: u32,
        hash: &Leaf,
    ) -> Result<Prepared, PackError> {
        let bad = || PackError::BadRecord {
            path: pack_path(&self.dir, id),
            offset,
            hash: *hash,
        };
        let start = offset.checked_sub(RECORD_HEADER).ok_or_else(bad)?;
        let end = offset.checked_add(u64::from(len)).ok_or_else(bad)?;
        if len > MAX_FRAME_BYTES {
            return Err(bad());
        }
        let pack = match self.open.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let path = pack_path(&self.dir, id);
                v.insert(OpenPack {
                    file: Arc::new(File::open(&path).map_err(io_err(&path))?),
                    direct: OpenOptions::new()
                        .read(true)
                        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                        .open(&path)
                        .ok(),
                    last_end: 0,
                })
            }
        };
        if let Some((_, w)) = self
            .windows
            .iter()
            .find(|(p, w)| *p == id && start >= w.start && end <= w.start + w.len as u64)
        {
            pack.last_end = end;
            return Ok(Prepared::Window(w.clone()));
        }
        let in_order = start
            .checked_sub(pack.last_end)
            .is_some_and(|gap| gap <= WINDOW_GAP);
        pack.last_end = end;
        let Some(direct) = pack.direct.as_ref().filter(|_| self.windowed && in_order) else {
            return Ok(Prepared::File(pack.file.clone()));
        };
        let from = start / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let want =
            (end - from).max(WINDOW_BYTES).div_ceil(DIRECT_ALIGN as u64) as usize * DIRECT_ALIGN;
        let mut buf = vec![0u8; want + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        let got = match read_direct(direct, &mut buf[at..at + want], from) {
            Ok(got) => got,
            // The file system opened the file with O_DIRECT but refuses such reads.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                pack.direct = None;
                return Ok(Prepared::File(pack.file.clone()));
            }
            Err(e) => return Err(io_err(&pack_path(&self.dir, id))(e)),
        };
        // Short: the pack ends before the record (a bad offset, reported when read).
        if from + (got as u64) < end {
            return Ok(Prepared::File(pack.file.clone()));
        }
        // The last page of a file may be the zero padding of a write in progress, where later
        // records will go: a window reaching the end of the file stops before its last page
        // (the few records there are read directly).
        let size = pack
            .file
            .metadata()
            .map_err(io_err(&pack_path(&self.dir, id)))?
            .len();
        let len = if from + got as u64 >= size {
            let last_page = size.saturating_sub(1) / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
            last_page.saturating_sub(from) as usize
        } else {
            got
        };
        let w = Arc::new(Window {
            buf,
            at,
            start: from,
            len,
        });
        self.windows.retain(|(p, _)| *p != id);
        if self.windows.len() >= WINDOWS_KEPT {
            self.windows.remove(0);
        }
        self.windows.push((id, w.clone()));
        if end > from + len as u64 {
            return Ok(Prepared::File(pack.file.clone()));
        }
        Ok(Prepared::Window(w))
    }
}

/// Reads whole pages at `offset` until `buf` is full or the file ends; returns the bytes read.
fn read_direct(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = file.read_at(&mut buf[got..], offset + got as u64)?;
        got += n;
        if n == 0 || !n.is_multiple_of(DIRECT_ALIGN) {
            break;
        }
    }
    Ok(got)
}

/// The frame of `hash` at `offset` in pack `id` of `dir`, from where [`PackReader::prepare`] found
/// it, checking the record header around it.
///
/// A frame in a window is lent, not copied.
pub fn read_prepared<'a>(
    at: &'a Prepared,
    dir: &Path,
    id: i64,
    offset: u64,
    len: u32,
    hash: &Leaf,
) -> Result<Cow<'a, [u8]>, PackError> {
    let bad = || PackError::BadRecord {
        path: pack_path(dir, id),
        offset,
        hash: *hash,
    };
    let start = offset.checked_sub(RECORD_HEADER).ok_or_else(bad)?;
    if len > MAX_FRAME_BYTES {
        return Err(bad());
    }
    let header_ok = |header: &[u8]| {
        &header[..4] == RECORD_MAGIC
            && &header[4..36] == hash.as_bytes()
            && header[36..40] == len.to_le_bytes()
    };
    match at {
        Prepared::File(file) => {
            let mut header = [0u8; RECORD_HEADER as usize];
            let mut frame = vec![0u8; len as usize];
            read_record(file, start, &mut header, &mut frame)
                .map_err(io_err(&pack_path(dir, id)))?;
            if !header_ok(&header) {
                return Err(bad());
            }
            Ok(Cow::Owned(frame))
        }
        Prepared::Window(w) => {
            let from = start.checked_sub(w.start).ok_or_else(bad)? as usize;
            let record = w
                .bytes()
                .get(from..from + RECORD_HEADER as usize + len as usize)
                .ok_or_else(bad)?;
            let (header, frame) = record.split_at(RECORD_HEADER as usize);
            if !header_ok(header) {
                return Err(bad());
            }
            Ok(Cow::Borrowed(frame))
        }
    }
}

/// Reads a record's header and frame at `start` with one system call when it can.
fn read_record(
    file: &File,
    start: u64,
    header: &mut [u8],
    frame: &mut [u8],
) -> std::io::Result<()> {
    let got = {
        let mut bufs = [
            std::io::IoSliceMut::new(header),
            std::io::IoSliceMut::new(frame),
        ];
        rustix::io::preadv(file, &mut bufs, start)?
    };
    let h = header.len();
    if got < h {
        file.read_exact_at(&mut header[got..], start + got as u64)?;
        file.read_exact_at(frame, start + h as u64)?;
    } else if got < h + frame.len() {
        file.read_exact_at(&mut frame[got - h..], start + got as u64)?;
    }
    Ok(())
}

/// Creates the packs folder if needed.
pub fn ensure_dir(dir: &Path) -> Result<(), PackError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The on-disk bytes of a pack, pinned: a change here is a format change (a new magic),
    /// never an accident.
    #[test]
    fn golden_pack_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::new(dir.path());
        w.open_pack(0x2a).expect("open");
        let (_, offset) = w.append(&Leaf([0xab; 32]), b"frame").expect("append");
        w.sync().expect("sync");
        let bytes = std::fs::read(dir.path().join("000000000000002a.pack")).expect("read");
        let mut want = b"RWPACK01RWCK".to_vec();
        want.extend([0xab; 32]);
        want.extend([5, 0, 0, 0]);
        want.extend(b"frame");
        assert_eq!(bytes, want);
        assert_eq!(
            offset,
            8 + RECORD_HEADER,
            "the catalog's offset is the frame's"
        );
    }

    #[test]
    fn append_then_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::new(dir.path());
        assert!(w.needs_pack());
        w.open_pack(7).expect("open");
        let h1 = Leaf([1; 32]);
        let h2 = Leaf([2; 32]);
        let (p1, o1) = w.append(&h1, b"first frame").expect("append");
        let (p2, o2) = w.append(&h2, b"second").expect("append");
        w.sync().expect("sync");
        assert_eq!((p1, p2), (7, 7));
        let mut r = PackReader::sequential(dir.path());
        assert_eq!(r.read(7, o1, 11, &h1).expect("read"), b"first frame");
        assert_eq!(r.read(7, o2, 6, &h2).expect("read"), b"second");
        assert!(matches!(
            r.read(7, o2, 6, &h1),
            Err(PackError::BadRecord { .. })
        ));
        assert!(matches!(
            r.read(7, 3, 6, &h1),
            Err(PackError::BadRecord { .. })
        ));
    }

    #[test]
    fn records_of_odd_sizes_survive_partial_page_rewrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::new(dir.path());
        w.open_pack(1).expect("open");
        let mut placed = Vec::new();
        for n in 0..60u32 {
            let frame: Vec<u8> = (0..(n * 677 + 13) % 9000 + 1)
                .map(|i| (i * 7 + n) as u8)
                .collect();
            let hash = Leaf([n as u8; 32]);
            let (_, off) = w.append(&hash, &frame).expect("append");
            placed.push((hash, off, frame));
            if n % 7 == 3 {
                w.sync().expect("sync");
            }
        }
        w.sync().expect("sync");
        let end = placed
            .last()
            .map(|(_, o, f)| o + f.len() as u64)
            .expect("records");
        let path = pack_path(dir.path(), 1);
        assert_eq!(
            fs::metadata(&path).expect("stat").len(),
            end,
            "no page padding left"
        );
        let mut r = PackReader::sequential(dir.path());
        for (hash, off, frame) in &placed {
            assert_eq!(
                &r.read(1, *off, frame.len() as u32, hash).expect("read"),
                frame
            );
        }
        // A second pack starts clean; the first one's bytes stay.
        w.open_pack(2).expect("second pack");
        let (p, o) = w.append(&Leaf([9; 32]), b"next").expect("append");
        w.sync().expect("sync");
        assert_eq!((p, o), (2, PACK_MAGIC.len() as u64 + RECORD_HEADER));
        assert_eq!(w.take_retired(), vec![1]);
        let (hash, off, frame) = &placed[0];
        assert_eq!(
            &r.read(1, *off, frame.len() as u32, hash).expect("read"),
            frame
        );
        assert_eq!(r.read(2, o, 4, &Leaf([9; 32])).expect("read"), b"next");
    }

    #[test]
    fn a_window_read_at_the_end_of_a_growing_pack_serves_later_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::new(dir.path());
        w.open_pack(1).expect("open");
        let a = vec![1u8; 5000];
        let (_, oa) = w.append(&Leaf([1; 32]), &a).expect("append");
        w.sync().expect("sync");
        let mut r = PackReader::sequential(dir.path());
        // In order from the start of the pack: read as a window reaching the file's end.
        assert_eq!(r.read(1, oa, 5000, &Leaf([1; 32])).expect("read"), a);
        let b = vec![2u8; 300];
        let (_, ob) = w.append(&Leaf([2; 32]), &b).expect("append");
        w.sync().expect("sync");
        assert_eq!(
            r.read(1, ob, 300, &Leaf([2; 32]))
                .expect("read later record"),
            b
        );
    }

    #[test]
    fn impossible_places_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::new(dir.path());
        w.open_pack(1).expect("open");
        let (_, o) = w.append(&Leaf([1; 32]), b"frame").expect("append");
        w.sync().expect("sync");
        let mut r = PackReader::sequential(dir.path());
        let h = Leaf([1; 32]);
        for (offset, len) in [
            (u64::MAX - 2, 100),
            (3, 5),
            (o, u32::MAX),
            (o + (1 << 40), 5),
        ] {
            assert!(
                matches!(
                    r.read(1, offset, len, &h),
                    Err(PackError::BadRecord { .. }) | Err(PackError::Io { .. })
                ),
                "offset {offset} len {len}"
            );
        }
        assert_eq!(r.read(1, o, 5, &h).expect("still readable"), b"frame");
    }
}
