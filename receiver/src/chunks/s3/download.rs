//! Downloads of pack objects into the cache, read while they arrive.
//!
//! A download runs on threads of its own: [`STREAMS`] ranged GETs of [`SEGMENT_BYTES`] each,
//! taken in order, write into a part file of this process with O_DIRECT (a copy into the page
//! cache cost more CPU than the decompression of what it holds, where memory new to the
//! process is slow to come by), which is renamed into the cache when whole. Readers wait only
//! for the bytes of the record they read, not for the whole pack. A download for a sequential
//! reader (a restore, a drill) also keeps what it fetched in memory, in [`PIECE_BYTES`] pieces
//! whose buffers are used again, so that reader takes its records from memory instead of
//! reading back from disk what was just written there (a cold restore writes its image to the
//! same disk, and reading the packs back made it a third slower).

use super::client::{self, S3Error};
use super::{io_err, pack_name, remote, Shared, MAX_PACK_BYTES};
use crate::chunks::format::{frame_in, RECORD_HEADER};
use crate::chunks::{BlockHash, ChunkLocation, ChunkStoreError, Fetch, PackId};
use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes of a pack object one ranged GET of a download fetches.
const SEGMENT_BYTES: u64 = 8 << 20;
/// GETs a download runs at once, each taking the next segment: a reader that reads a pack as
/// it arrives needs it faster than one stream brings it.
const STREAMS: usize = 2;
/// Bytes of a piece kept in memory: what one write of a download writes.
pub(super) const PIECE_BYTES: u64 = client::WRITE_BYTES as u64;
/// Piece buffers kept for reuse once no reader holds them (at most this many megabytes).
const POOL_KEPT: usize = 256;
/// A part file untouched this long belongs to a download that died with its process (a
/// download's every try ends well within it).
const STALE_PART: std::time::Duration = std::time::Duration::from_secs(3600);

/// A pack being downloaded into the cache, and how far it got.
pub(super) struct Download {
    state: Mutex<Progress>,
    /// Woken at each write and at the end.
    moved: std::sync::Condvar,
    /// Whether what is fetched is kept in memory for the readers (see the module's text).
    keep: bool,
    pool: Arc<Pool>,
}

struct Progress {
    /// The part file, once created: it keeps its inode when renamed into the cache, so a
    /// reader's handle stays good.
    file: Option<Arc<fs::File>>,
    /// The same file opened with O_DIRECT, where the file system takes it.
    direct: Option<Arc<fs::File>>,
    /// Bytes from the file's start written so far; they never change afterwards.
    written: u64,
    /// What was fetched, by piece (offset / [`PIECE_BYTES`]), while kept: a reader lets go
    /// of the pieces before the record it reads.
    pieces: Vec<Option<Arc<Piece>>>,
    /// Set when the download ended: Ok once the pack is in the cache whole.
    done: Option<Result<(), Failed>>,
}

/// Why a download failed, for every reader that waited on it.
#[derive(Debug, Clone)]
enum Failed {
    Remote {
        what: String,
        source: S3Error,
    },
    Local {
        path: PathBuf,
        kind: std::io::ErrorKind,
        message: String,
    },
}

impl Failed {
    fn of(e: ChunkStoreError, path: &Path) -> Failed {
        match e {
            ChunkStoreError::Remote { what, source } => Failed::Remote { what, source },
            ChunkStoreError::Io { path, source } => Failed::Local {
                path,
                kind: source.kind(),
                message: source.to_string(),
            },
            other => Failed::Local {
                path: path.to_owned(),
                kind: std::io::ErrorKind::Other,
                message: other.to_string(),
            },
        }
    }

    fn error(&self) -> ChunkStoreError {
        match self.clone() {
            Failed::Remote { what, source } => ChunkStoreError::Remote { what, source },
            Failed::Local {
                path,
                kind,
                message,
            } => ChunkStoreError::Io {
                path,
                source: std::io::Error::new(kind, message),
            },
        }
    }
}

/// Bytes `[0, len)` of `buf`: one piece of a download, in memory. Its buffer goes back to the
/// pool when the last reader lets go of it.
pub(super) struct Piece {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<Pool>,
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// Buffers of pieces no reader holds any more: memory new to the process costs far more to
/// touch than memory it had (the kernel zeroes each page, and a VM's host may have to back it
/// again).
#[derive(Default)]
pub(super) struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    fn take(&self) -> Vec<u8> {
        let spare = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        spare.unwrap_or_else(|| vec![0u8; PIECE_BYTES as usize])
    }

    fn put(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() == PIECE_BYTES as usize && free.len() < POOL_KEPT {
            free.push(buf);
        }
    }
}

/// What a reader may read of a download once it got far enough.
pub(super) struct View {
    pub file: Arc<fs::File>,
    pub direct: Option<Arc<fs::File>>,
    /// Bytes of `file` that are final.
    pub written: u64,
    /// The record from memory, when the download kept its pieces.
    pub memory: Option<MemoryRecord>,
}

/// A record read from a download's pieces, checked against its header when read.
pub(super) enum MemoryRecord {
    /// In one piece, from this offset in it.
    Lent(Arc<Piece>, usize),
    /// Across pieces: header and frame copied out.
    Copied(Vec<u8>),
}

impl Fetch for MemoryRecord {
    fn fetch(&self, at: ChunkLocation, hash: &BlockHash) -> Result<Cow<'_, [u8]>, ChunkStoreError> {
        let bytes = match self {
            MemoryRecord::Lent(piece, from) => piece.bytes().get(*from..).unwrap_or_default(),
            MemoryRecord::Copied(v) => v,
        };
        // `bytes` starts with the record: its frame lies right after the header.
        let in_record = ChunkLocation {
            offset: RECORD_HEADER,
            ..at
        };
        frame_in(bytes, in_record, hash)
            .map(Cow::Borrowed)
            .ok_or_else(|| ChunkStoreError::BadRecord {
                path: PathBuf::from(pack_name(at.pack)),
                offset: at.offset,
                hash: *hash,
            })
    }
}

impl Download {
    fn new(keep: bool, pool: Arc<Pool>) -> Download {
        Download {
            state: Mutex::new(Progress {
                file: None,
                direct: None,
                written: 0,
                pieces: Vec::new(),
                done: None,
            }),
            moved: std::sync::Condvar::new(),
            keep,
            pool,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first `written` bytes of the part file are final (never less than said before).
    fn advance(&self, written: u64) {
        let mut p = self.lock();
        if written > p.written {
            p.written = written;
            drop(p);
            self.moved.notify_all();
        }
    }

    /// Keeps `bytes`, fetched from offset `at`, in memory when this download keeps pieces
    /// (whole pieces only: every write but an object's last is one).
    fn keep_piece(&self, at: u64, bytes: &[u8]) {
        if !self.keep || !at.is_multiple_of(PIECE_BYTES) {
            return;
        }
        let mut buf = self.pool.take();
        buf[..bytes.len()].copy_from_slice(bytes);
        let piece = Arc::new(Piece {
            buf,
            len: bytes.len(),
            pool: self.pool.clone(),
        });
        let i = (at / PIECE_BYTES) as usize;
        let mut p = self.lock();
        if p.pieces.len() <= i {
            p.pieces.resize(i + 1, None);
        }
        p.pieces[i] = Some(piece);
    }

    /// Waits until the record at `at` is written (or the download ended) and says where to
    /// read it; lets go of the pieces before it (a sequential reader does not come back).
    pub(super) fn wait(&self, at: ChunkLocation) -> Result<View, ChunkStoreError> {
        let start = at.offset.saturating_sub(RECORD_HEADER);
        let end = at.offset.saturating_add(u64::from(at.len));
        let mut p = self.lock();
        loop {
            if let Some(Err(failed)) = &p.done {
                return Err(failed.error());
            }
            let far_enough = p.written >= end || p.done.is_some();
            if let Some(file) = p.file.clone().filter(|_| far_enough) {
                let first = (start / PIECE_BYTES) as usize;
                for piece in p.pieces.iter_mut().take(first) {
                    *piece = None;
                }
                let memory = if p.written >= end && end > start {
                    memory_record(&p.pieces, start, end)
                } else {
                    None
                };
                return Ok(View {
                    file,
                    direct: p.direct.clone(),
                    written: p.written,
                    memory,
                });
            }
            p = self.moved.wait(p).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Bytes `[start, end)` from `pieces`, if it holds them all.
fn memory_record(pieces: &[Option<Arc<Piece>>], start: u64, end: u64) -> Option<MemoryRecord> {
    let (first, last) = (start / PIECE_BYTES, (end - 1) / PIECE_BYTES);
    let held = |i: u64| pieces.get(i as usize).and_then(Option::as_ref);
    if first == last {
        let piece = held(first)?;
        let from = (start - first * PIECE_BYTES) as usize;
        return Some(MemoryRecord::Lent(piece.clone(), from));
    }
    let mut record = Vec::with_capacity((end - start) as usize);
    for i in first..=last {
        let bytes = held(i)?.bytes();
        let from = start.saturating_sub(i * PIECE_BYTES) as usize;
        let to = ((end - i * PIECE_BYTES) as usize).min(bytes.len());
        record.extend_from_slice(bytes.get(from..to)?);
    }
    Some(MemoryRecord::Copied(record))
}

/// Removes the part files in `dir` no download has written to for [`STALE_PART`] (left by a
/// process that died while downloading).
pub(super) fn remove_stale_parts(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let part = name
            .to_str()
            .is_some_and(|n| n.starts_with('.') && n.ends_with(".part"));
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_PART);
        if part && stale {
            let _ = fs::remove_file(e.path());
        }
    }
}

impl Shared {
    /// The download of pack `id`, started unless one is under way (keeping what it fetches
    /// in memory when `keep`); None when the cache has the pack whole. Never waits for it.
    pub(super) fn start(self: &Arc<Self>, id: PackId, keep: bool) -> Option<Arc<Download>> {
        let cached = self.cache.join(pack_name(id));
        let download = {
            let mut all = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = all.get(&id) {
                return Some(d.clone());
            }
            // Looked at under the lock: a download leaves the map only once its pack is in
            // the cache, so a pack in neither is fetched by one reader only.
            if cached.exists() && self.cached_whole(id, &cached) {
                None
            } else {
                let d = Arc::new(Download::new(keep, self.pool.clone()));
                all.insert(id, d.clone());
                Some(d)
            }
        };
        let Some(download) = download else {
            // Recently used: the eviction order is the files' modification times.
            if let Ok(f) = fs::File::options().append(true).open(&cached) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            return None;
        };
        let (shared, d) = (self.clone(), download.clone());
        let spawned = std::thread::Builder::new()
            .name("pack-fetch".into())
            .spawn(move || shared.download(id, &d));
        if let Err(e) = spawned {
            let failed = ChunkStoreError::Io {
                path: cached.clone(),
                source: e,
            };
            self.finish(id, &download, Err(Failed::of(failed, &cached)));
        }
        Some(download)
    }

    /// Whether the cached copy of pack `id` has the size of the object uploaded (when the
    /// catalog recorded it). The cache is written without a sync, so a crash can leave a copy
    /// short or empty under its name: such a copy is removed, to be fetched again.
    pub(super) fn cached_whole(&self, id: PackId, cached: &Path) -> bool {
        let Some(want) = self.book.bytes(id) else {
            return true;
        };
        match fs::metadata(cached) {
            Ok(m) if m.len() == want => true,
            Ok(m) => {
                tracing::warn!(pack = %id, cached = m.len(), uploaded = want, "a cached pack is not the size uploaded (cut short by a crash?): fetching it again");
                let _ = fs::remove_file(cached);
                false
            }
            Err(_) => false,
        }
    }

    /// Downloads pack `id` (on its own thread), then tells its readers how it ended.
    fn download(&self, id: PackId, download: &Download) {
        let cached = self.cache.join(pack_name(id));
        let done = self
            .download_into(id, download, &cached)
            .map_err(|e| Failed::of(e, &cached));
        self.finish(id, download, done);
    }

    /// Ends download `download` of pack `id` as `done`: its readers wake, and the next read
    /// of the pack finds it in the cache (or, after a failure, fetches it again).
    fn finish(&self, id: PackId, download: &Download, done: Result<(), Failed>) {
        download.lock().done = Some(done);
        download.moved.notify_all();
        self.downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Downloads pack `id` into the cache as `cached`, through a part file of this process
    /// whose progress `download` tells its readers, then renamed.
    fn download_into(
        &self,
        id: PackId,
        download: &Download,
        cached: &Path,
    ) -> Result<(), ChunkStoreError> {
        let tmp = self
            .cache
            .join(format!(".{}.{}.part", pack_name(id), std::process::id()));
        let file = fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let file = Arc::new(file);
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::File::options()
                .read(true)
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(&tmp)
                .ok()
                .map(Arc::new)
        };
        {
            let mut p = download.lock();
            p.file = Some(file.clone());
            p.direct = direct.clone();
        }
        let version = self.book.version(id);
        let started = std::time::Instant::now();
        let object = Self::object(id);
        let to = (&*file, direct.as_deref());
        let got = match self.book.bytes(id) {
            Some(size) if size > 0 && size <= MAX_PACK_BYTES => {
                self.get_segments(&object, version.as_deref(), size, to, download)
            }
            // A pack uploaded before sizes were recorded: one GET of the whole object.
            _ => {
                let written = |n: u64, bytes: &[u8]| {
                    download.keep_piece(n - bytes.len() as u64, bytes);
                    download.advance(n);
                };
                let sink = client::Sink {
                    file: to.0,
                    direct: to.1,
                    at: 0,
                };
                let whole = self.client.get_version(
                    &object,
                    version.as_deref(),
                    (None, MAX_PACK_BYTES),
                    &client::to_file(sink, &written),
                );
                whole
            }
        };
        let bytes = match got {
            Ok(bytes) => bytes,
            Err(e) => {
                // Readers holding the file keep what they were told is there.
                let _ = fs::remove_file(&tmp);
                return Err(remote(format!("fetching pack {id}"))(e));
            }
        };
        if let Err(e) = fs::rename(&tmp, cached) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(cached)(e));
        }
        tracing::debug!(pack = %id, bytes, ms = started.elapsed().as_millis() as u64, "pack fetched");
        self.evict(id, bytes);
        Ok(())
    }

    /// Fetches object `object` (of `version`, `size` bytes) into `to` (a file, and the same
    /// file opened with O_DIRECT) in ranges of [`SEGMENT_BYTES`], [`STREAMS`] at a time and
    /// in order, telling the readers of `download` how much of its start is written. Returns
    /// the bytes written.
    fn get_segments(
        &self,
        object: &str,
        version: Option<&str>,
        size: u64,
        to: (&fs::File, Option<&fs::File>),
        download: &Download,
    ) -> Result<u64, S3Error> {
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
        let count = size.div_ceil(SEGMENT_BYTES).max(1) as usize;
        let length = |i: usize| SEGMENT_BYTES.min(size - i as u64 * SEGMENT_BYTES);
        let next = AtomicUsize::new(0);
        let done: Vec<AtomicU64> = (0..count).map(|_| AtomicU64::new(0)).collect();
        let failed = AtomicBool::new(false);
        // The written start: whole segments, then what the first unfinished one has.
        let publish = || {
            let mut start = 0;
            for (i, d) in done.iter().enumerate() {
                let n = d.load(Ordering::Acquire);
                start = i as u64 * SEGMENT_BYTES + n;
                if n < length(i) {
                    break;
                }
            }
            download.advance(start);
        };
        let stream = || -> Result<(), S3Error> {
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let (at, len) = (i as u64 * SEGMENT_BYTES, length(i));
                let written = |n: u64, bytes: &[u8]| {
                    download.keep_piece(at + n - bytes.len() as u64, bytes);
                    done[i].store(n, Ordering::Release);
                    publish();
                };
                let sink = client::Sink {
                    file: to.0,
                    direct: to.1,
                    at,
                };
                let got = self.client.get_version(
                    object,
                    version,
                    (Some((at, len)), len),
                    &client::to_file(sink, &written),
                );
                let short = |n: u64| S3Error::Answer {
                    op: "GET",
                    key: object.to_owned(),
                    detail: format!("bytes {at}..{}: {n} came", at + len),
                };
                if let Err(e) = got.and_then(|n| if n == len { Ok(()) } else { Err(short(n)) }) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
            Ok(())
        };
        let results: Vec<Result<(), S3Error>> = std::thread::scope(|scope| {
            let others: Vec<_> = (1..STREAMS)
                .map(|_| {
                    std::thread::Builder::new()
                        .name("pack-fetch".into())
                        .spawn_scoped(scope, stream)
                })
                .collect();
            let mut all = vec![stream()];
            // A stream that could not start leaves its segments to the others.
            for handle in others.into_iter().flatten() {
                all.push(handle.join().unwrap_or_else(|_| {
                    Err(S3Error::Answer {
                        op: "GET",
                        key: object.to_owned(),
                        detail: "a download stream panicked".into(),
                    })
                }));
            }
            all
        });
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunks::format::record_header;

    /// A download keeping pieces, its part file in `dir`, with `bytes` fetched.
    fn fetched(dir: &Path, bytes: &[u8]) -> Download {
        let d = Download::new(true, Arc::default());
        let file = fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("part"))
            .unwrap();
        d.lock().file = Some(Arc::new(file));
        for (i, piece) in bytes.chunks(PIECE_BYTES as usize).enumerate() {
            d.keep_piece(i as u64 * PIECE_BYTES, piece);
        }
        d.advance(bytes.len() as u64);
        d
    }

    /// A pack's bytes with the record of `frame` (chunk `hash`) at `offset` (of the frame).
    fn pack_with(frame: &[u8], hash: &BlockHash, offset: u64, size: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let start = (offset - RECORD_HEADER) as usize;
        let header = record_header(hash, frame.len() as u32);
        bytes[start..start + header.len()].copy_from_slice(&header);
        bytes[offset as usize..offset as usize + frame.len()].copy_from_slice(frame);
        bytes
    }

    #[test]
    fn records_read_from_memory_within_a_piece_and_across_two_and_pieces_behind_are_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let hash = BlockHash([7; 32]);
        let frame: Vec<u8> = (0..5000u32).map(|i| (i * 31) as u8).collect();
        let size = 3 * PIECE_BYTES as usize;
        for offset in [100, PIECE_BYTES - 2000, 2 * PIECE_BYTES - 20] {
            let d = fetched(dir.path(), &pack_with(&frame, &hash, offset, size));
            let at = ChunkLocation {
                pack: PackId(1),
                offset,
                len: frame.len() as u32,
            };
            let view = d.wait(at).unwrap();
            let record = view.memory.expect("read from memory");
            let across = (offset - RECORD_HEADER) / PIECE_BYTES
                != (offset + frame.len() as u64 - 1) / PIECE_BYTES;
            assert_eq!(matches!(record, MemoryRecord::Copied(_)), across);
            assert_eq!(&*record.fetch(at, &hash).unwrap(), &frame[..]);
            // Another chunk's record is not this one.
            let other = BlockHash([8; 32]);
            assert!(matches!(
                record.fetch(at, &other),
                Err(ChunkStoreError::BadRecord { .. })
            ));
            // The pieces before the record's first are let go; the rest stay.
            let first = ((offset - RECORD_HEADER) / PIECE_BYTES) as usize;
            let held: Vec<bool> = d.lock().pieces.iter().map(Option::is_some).collect();
            let want: Vec<bool> = (0..3).map(|i| i >= first).collect();
            assert_eq!(held, want);
        }
    }

    #[test]
    fn a_record_whose_piece_is_gone_is_read_from_the_file_and_a_failed_download_fails_its_readers()
    {
        let dir = tempfile::tempdir().unwrap();
        let hash = BlockHash([7; 32]);
        let frame = vec![9u8; 300];
        let d = fetched(
            dir.path(),
            &pack_with(&frame, &hash, 2 * PIECE_BYTES, 3 * PIECE_BYTES as usize),
        );
        // A read further on let go of the piece: the record is left to the file.
        let later = ChunkLocation {
            pack: PackId(1),
            offset: 2 * PIECE_BYTES + 1000,
            len: 10,
        };
        assert!(d.wait(later).unwrap().memory.is_some());
        let back = ChunkLocation {
            pack: PackId(1),
            offset: 100,
            len: 10,
        };
        let view = d.wait(back).unwrap();
        assert!(view.memory.is_none());
        assert_eq!(view.written, 3 * PIECE_BYTES);
        // A reader waiting for bytes not there yet gets the download's failure.
        let beyond = ChunkLocation {
            pack: PackId(1),
            offset: 4 * PIECE_BYTES,
            len: 10,
        };
        let failed = Failed::Local {
            path: dir.path().join("part"),
            kind: std::io::ErrorKind::StorageFull,
            message: "no space".into(),
        };
        std::thread::scope(|s| {
            let waiter = s.spawn(|| d.wait(beyond));
            d.lock().done = Some(Err(failed));
            d.moved.notify_all();
            match waiter.join().unwrap() {
                Err(ChunkStoreError::Io { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::StorageFull)
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a failed download read as fetched"),
            }
        });
    }

    #[test]
    fn piece_buffers_go_back_to_the_pool_and_are_taken_again() {
        let pool: Arc<Pool> = Arc::default();
        let d = Download::new(true, pool.clone());
        d.keep_piece(0, &[1, 2, 3]);
        let before = d.lock().pieces[0].as_ref().unwrap().buf.as_ptr();
        d.lock().pieces.clear();
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        d.keep_piece(PIECE_BYTES, &[4]);
        assert_eq!(d.lock().pieces[1].as_ref().unwrap().buf.as_ptr(), before);
        assert!(pool.free.lock().unwrap().is_empty());
        // A download that keeps nothing keeps no piece.
        let none = Download::new(false, pool.clone());
        none.keep_piece(0, &[1]);
        assert!(none.lock().pieces.is_empty());
    }
}
