//! Reading local packs: records one at a time, or runs of them in large O_DIRECT windows.

use super::{io_err, pack_path, DIRECT_ALIGN};
use crate::chunks::format::{record_header, MAX_FRAME_BYTES, RECORD_HEADER};
use crate::chunks::{ChunkLocation, ChunkReader, ChunkStoreError, Fetch, PackId, Prepared};
use rewind_proto::BlockHash;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// Size of a window: packs written with O_DIRECT are not in the page cache, and a restore
/// reading one small record at a time from disk would wait on each.
const WINDOW_BYTES: u64 = 8 << 20;
/// A new window is read only for a record starting at most this far past the previous one's
/// end: a pack read sparsely is read record by record instead.
const WINDOW_GAP: u64 = 256 << 10;
/// Windows a reader keeps (one per pack, the least recently made dropped first).
const WINDOWS_KEPT: usize = 4;
/// Dropped windows whose buffers a reader keeps for reuse: about as many as a restore's
/// decoder may still hold (the frames of its queued batches lie in a few windows).
const RETIRED_KEPT: usize = 4;

struct OpenPack {
    file: Arc<File>,
    /// The same file opened for reading a pack in order in large windows (with O_DIRECT
    /// unless the reader reads through the page cache).
    direct: Option<File>,
    /// End of the last record read.
    last_end: u64,
    /// Bytes of the file that may be read, when it is still being written (a pack being
    /// downloaded, see [`PackReader::adopt`]); None: all of it.
    limit: Option<u64>,
}

/// Bytes `[start, start + len)` of a pack, read with O_DIRECT into an aligned buffer.
struct Window {
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

/// Where a record found by [`PackReader::find`] is: inside a window already read, or in the
/// open pack.
enum Found {
    Window(Arc<Window>),
    File(Arc<File>),
}

/// A record found by [`ChunkReader::prepare`], read by [`Fetch::fetch`] on any thread.
struct LocalFetch {
    dir: Arc<Path>,
    found: Found,
}

impl Fetch for LocalFetch {
    fn fetch(&self, at: ChunkLocation, hash: &BlockHash) -> Result<Cow<'_, [u8]>, ChunkStoreError> {
        read_found(&self.found, &self.dir, at, hash)
    }
}

/// Reads frames from packs, keeping files open across reads. A pack read in order (a restore
/// or a drill of a seeded point) is read in 8 MiB windows with O_DIRECT: packs are written
/// with O_DIRECT and not in the page cache, and reading them through it costs more CPU than
/// the decompression here.
pub struct PackReader {
    dir: Arc<Path>,
    open: HashMap<PackId, OpenPack>,
    /// Whether records read in order are read in windows (see [`PackReader::sequential`]).
    windowed: bool,
    /// The last windows read, with their packs: a few, so memory stays bounded however many
    /// packs a long-lived reader opens, and a restore alternating between packs does not
    /// read the same window again.
    windows: Vec<(PackId, Arc<Window>)>,
    /// Windows dropped from `windows`, whose buffers are taken for new windows once no
    /// prepared read holds them: memory new to the process is zeroed by the kernel page by
    /// page, which cost a restore about a third of its CPU when each window had a new one.
    retired: Vec<Arc<Window>>,
}

impl PackReader {
    /// A reader for records asked for in no particular order (chunks an agent asks for, a
    /// booted VM's reads): each is read on its own, with no read-ahead beyond the kernel's.
    pub fn new(dir: &Path) -> PackReader {
        PackReader {
            dir: Arc::from(dir),
            open: HashMap::new(),
            windowed: false,
            windows: Vec::new(),
            retired: Vec::new(),
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

    /// Reads pack `id` from `file` (and `direct`, the same file opened with O_DIRECT where
    /// the file system takes it) while it is being written, its first `readable` bytes final
    /// (an object store's download in progress): windows stop there. Called again as more is
    /// written; [`PackReader::whole`] once it all is.
    pub fn adopt(
        &mut self,
        id: PackId,
        (file, direct): (&Arc<File>, Option<&File>),
        readable: u64,
    ) {
        let pack = self.open.entry(id).or_insert_with(|| OpenPack {
            file: file.clone(),
            direct: direct.and_then(|d| d.try_clone().ok()),
            last_end: 0,
            limit: None,
        });
        pack.limit = Some(readable);
    }

    /// Pack `id` is written whole: an adopted file is read to its end from now on.
    pub fn whole(&mut self, id: PackId) {
        if let Some(pack) = self.open.get_mut(&id) {
            pack.limit = None;
        }
    }

    /// Finds the record whose frame is at `at`: in one of the windows kept, in a new window
    /// when the pack is being read in order (by a [`PackReader::sequential`] reader on a file
    /// system that takes O_DIRECT), else in the open pack.
    fn find(&mut self, at: ChunkLocation, hash: &BlockHash) -> Result<Found, ChunkStoreError> {
        let ChunkLocation {
            pack: id,
            offset,
            len,
        } = at;
        let bad = || ChunkStoreError::BadRecord {
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
                    limit: None,
                })
            }
        };
        if let Some((_, w)) = self
            .windows
            .iter()
            .find(|(p, w)| *p == id && start >= w.start && end <= w.start + w.len as u64)
        {
            pack.last_end = end;
            return Ok(Found::Window(w.clone()));
        }
        let in_order = start
            .checked_sub(pack.last_end)
            .is_some_and(|gap| gap <= WINDOW_GAP);
        pack.last_end = end;
        let Some(direct) = pack.direct.as_ref().filter(|_| self.windowed && in_order) else {
            return Ok(Found::File(pack.file.clone()));
        };
        let from = start / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let mut span = (end - from).max(WINDOW_BYTES);
        if let Some(limit) = pack.limit {
            // No further than is written (past it lies a hole, read as zeros).
            span = span.min(limit.saturating_sub(from)).max(end - from);
        }
        let want = span.div_ceil(DIRECT_ALIGN as u64) as usize * DIRECT_ALIGN;
        let mut buf = spare_buffer(&mut self.retired, want + DIRECT_ALIGN);
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        let got = match read_direct(direct, &mut buf[at..at + want], from) {
            Ok(got) => got,
            // The file system opened the file with O_DIRECT but refuses such reads.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                pack.direct = None;
                return Ok(Found::File(pack.file.clone()));
            }
            Err(e) => return Err(io_err(&pack_path(&self.dir, id))(e)),
        };
        // A file still being written is read only as far as it is final.
        let got = match pack.limit {
            Some(limit) => got.min(limit.saturating_sub(from) as usize),
            None => got,
        };
        // Short: the pack ends before the record (a bad offset, reported when read).
        if from + (got as u64) < end {
            return Ok(Found::File(pack.file.clone()));
        }
        // The last page of a file may be the zero padding of a write in progress, where later
        // records will go: a window reaching the end of the file stops before its last page
        // (the few records there are read directly). A limited file has no such padding.
        let len = match pack.limit {
            Some(_) => got,
            None => {
                let size = pack
                    .file
                    .metadata()
                    .map_err(io_err(&pack_path(&self.dir, id)))?
                    .len();
                if from + got as u64 >= size {
                    let last_page =
                        size.saturating_sub(1) / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
                    last_page.saturating_sub(from) as usize
                } else {
                    got
                }
            }
        };
        let w = Arc::new(Window {
            buf,
            at,
            start: from,
            len,
        });
        if let Some(i) = self.windows.iter().position(|(p, _)| *p == id) {
            self.retired.push(self.windows.remove(i).1);
        }
        if self.windows.len() >= WINDOWS_KEPT {
            self.retired.push(self.windows.remove(0).1);
        }
        if self.retired.len() > RETIRED_KEPT {
            self.retired.remove(0);
        }
        self.windows.push((id, w.clone()));
        if end > from + len as u64 {
            return Ok(Found::File(pack.file.clone()));
        }
        Ok(Found::Window(w))
    }
}

impl ChunkReader for PackReader {
    fn read(&mut self, at: ChunkLocation, hash: &BlockHash) -> Result<Vec<u8>, ChunkStoreError> {
        let found = self.find(at, hash)?;
        read_found(&found, &self.dir, at, hash).map(Cow::into_owned)
    }

    fn prepare(
        &mut self,
        at: ChunkLocation,
        hash: &BlockHash,
    ) -> Result<Prepared, ChunkStoreError> {
        let found = self.find(at, hash)?;
        let fetch = LocalFetch {
            dir: self.dir.clone(),
            found,
        };
        Ok(Prepared::new(at, *hash, Box::new(fetch)))
    }
}

/// A buffer of at least `len` bytes (contents undefined): the buffer of a window in `retired`
/// that nothing else holds any more, else a new one.
fn spare_buffer(retired: &mut Vec<Arc<Window>>, len: usize) -> Vec<u8> {
    let free = retired
        .iter()
        .position(|w| Arc::strong_count(w) == 1 && w.buf.len() >= len);
    if let Some(w) = free.and_then(|i| Arc::try_unwrap(retired.remove(i)).ok()) {
        return w.buf;
    }
    vec![0u8; len]
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

/// The frame of `hash` at `at` in a pack of `dir`, from where [`PackReader::find`] found it,
/// checking the record header around it.
///
/// A frame in a window is lent, not copied.
fn read_found<'a>(
    found: &'a Found,
    dir: &Path,
    at: ChunkLocation,
    hash: &BlockHash,
) -> Result<Cow<'a, [u8]>, ChunkStoreError> {
    let ChunkLocation {
        pack: id,
        offset,
        len,
    } = at;
    let bad = || ChunkStoreError::BadRecord {
        path: pack_path(dir, id),
        offset,
        hash: *hash,
    };
    let start = offset.checked_sub(RECORD_HEADER).ok_or_else(bad)?;
    if len > MAX_FRAME_BYTES {
        return Err(bad());
    }
    let want = record_header(hash, len);
    let header_ok = |header: &[u8]| *header == want[..];
    match found {
        Found::File(file) => {
            let mut header = [0u8; RECORD_HEADER as usize];
            let mut frame = vec![0u8; len as usize];
            read_record(file, start, &mut header, &mut frame)
                .map_err(io_err(&pack_path(dir, id)))?;
            if !header_ok(&header) {
                return Err(bad());
            }
            Ok(Cow::Owned(frame))
        }
        Found::Window(w) => {
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
