//! Packs on S3-compatible object storage: the same pack format as [`super::local`], one object
//! per pack (`<prefix>packs/<id>.pack`, 64 MiB when full), written once and create-only.
//!
//! The data folder keeps two folders under `object-cache/`:
//! - `staging/`: packs being written. A writer appends and fdatasyncs here exactly as a local
//!   pack writer does, so a chunk is durable on local disk before the catalog refers to it.
//!   When a pack is finished (full, or its upload stream ended) it is uploaded with
//!   `If-None-Match: *` and a SHA-256 checksum, then moved into the cache; only then does the
//!   writer hand it back to be sealed. A pack whose upload failed stays in `staging/` and is
//!   uploaded by the next finishing stream or the next start of `serve`.
//! - `packs/`: a size-bounded cache of recently written and read packs; a read of a pack not
//!   there fetches the whole object (readers walk packs mostly in order) and evicts the least
//!   recently used ones past the bound.
//!
//! Ordering rules: a chunk is in a local fdatasynced pack before the catalog refers to it (as
//! for local packs); a pack is sealed only after its object is in the bucket; and a point
//! commits only when every chunk it refers to lies in a sealed pack (`ingest::commit`), so
//! every committed point's chunks are in the bucket.

mod client;
mod download;
mod multipart;
mod reader;
mod versions;
mod writer;

pub use client::{Counters, ObjectStat, Put, S3Client, S3Error, S3Target};
pub use multipart::PART_BYTES;

use super::format::{pack_name, MAX_FRAME_BYTES, PACK_TARGET_BYTES, RECORD_HEADER};
use super::local::{PackReader, PackWriter};
use super::{
    ChunkReader, ChunkStore, ChunkStoreError, ChunkWriter, PackDigest, PackId, PackStat, ReadOrder,
    Retired,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The folder of the object store's local side, in the data folder.
pub const CACHE_DIR: &str = "object-cache";
/// Bytes of packs the cache keeps unless configured otherwise.
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 30;
/// Where pack objects live under the store's prefix.
const PACKS_PREFIX: &str = "packs/";
/// The largest pack object a fetch accepts: a full pack plus its last record.
const MAX_PACK_BYTES: u64 = PACK_TARGET_BYTES + RECORD_HEADER + MAX_FRAME_BYTES as u64 + 8;

/// Pack uploads one process runs at once (they used to run one at a time, so a receiver's
/// ingest was bound by a single PUT's speed, about 35 MB/s into the test's Garage). Each holds
/// its pack in memory: at most this many packs' bytes for uploads per process.
const PUBLISHES_AT_ONCE: usize = 2;

/// A counting limit for threads: [`Slots::take`] waits while all are taken.
struct Slots {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A taken slot, given back when dropped.
struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n),
            freed: std::sync::Condvar::new(),
        }
    }

    fn take(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// What the store's writers and readers share.
struct Shared {
    client: S3Client,
    staging: PathBuf,
    cache: PathBuf,
    cache_limit: u64,
    /// Packs being downloaded, each by a thread of its own: readers of one pack share its
    /// download and read its records as they arrive; downloads of different packs run side
    /// by side.
    downloads: Mutex<std::collections::HashMap<PackId, Arc<download::Download>>>,
    /// Buffers of downloads' pieces kept in memory, used again.
    pool: Arc<download::Pool>,
    /// Publishes running in this process: at most [`PUBLISHES_AT_ONCE`], each holding its
    /// pack in memory. (A pack is published only by whoever holds its lock file, so no pack
    /// is uploaded twice at once.)
    publishing: Slots,
    /// Bytes the cache is believed to hold (see [`Shared::evict`]).
    tally: Mutex<CacheTally>,
    /// The version each pack was uploaded as, from the catalog.
    book: crate::catalog::packs::VersionBook,
}

/// The cache's size as last counted, and the packs added since.
#[derive(Default)]
struct CacheTally {
    bytes: Option<u64>,
    adds: u32,
}

/// Packs added between two counts of the cache folder: other processes on the data folder
/// (a restore, a verify) add packs this one does not see, and a count every this many bounds
/// how far the cache can pass its limit unseen.
const RECOUNT_EVERY: u32 = 256;

/// The packs of one data folder on object storage.
#[derive(Clone)]
pub struct S3Packs {
    shared: Arc<Shared>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ChunkStoreError + '_ {
    move |source| ChunkStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn remote(what: String) -> impl FnOnce(S3Error) -> ChunkStoreError {
    move |source| ChunkStoreError::Remote { what, source }
}

/// Pack ids of the files in `dir` named as packs are.
fn packs_in(dir: &Path) -> Vec<(PackId, u64, std::time::SystemTime)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id = name
                .to_str()?
                .strip_suffix(".pack")
                .and_then(|h| i64::from_str_radix(h, 16).ok())
                .map(PackId)?;
            let meta = e.metadata().ok()?;
            (pack_name(id) == name.to_str()?).then(|| {
                (
                    id,
                    meta.len(),
                    meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                )
            })
        })
        .collect()
}

impl S3Packs {
    /// The store of data folder `data` in the bucket `target` names, caching up to
    /// `cache_limit` bytes of packs. Creates the local folders; contacts nothing.
    pub fn open(
        data: &Path,
        target: &S3Target,
        cache_limit: u64,
    ) -> Result<S3Packs, ChunkStoreError> {
        let staging = data.join(CACHE_DIR).join("staging");
        let cache = data.join(CACHE_DIR).join("packs");
        for dir in [&staging, &cache] {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let client = S3Client::new(target).map_err(remote("the store's location".into()))?;
        Ok(S3Packs {
            shared: Arc::new(Shared {
                client,
                staging,
                cache,
                cache_limit,
                downloads: Mutex::new(Default::default()),
                pool: Default::default(),
                publishing: Slots::new(PUBLISHES_AT_ONCE),
                tally: Mutex::new(CacheTally::default()),
                book: crate::catalog::packs::VersionBook::new(data),
            }),
        })
    }

    /// Requests sent so far, of every kind.
    pub fn requests(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.counters();
        [&c.puts, &c.gets, &c.heads, &c.lists, &c.deletes]
            .iter()
            .map(|n| n.load(Relaxed))
            .sum()
    }

    /// Requests and bytes so far.
    pub fn counters(&self) -> &Counters {
        &self.shared.client.counters
    }

    /// The cached copy of pack `id`, read whole (an eviction meanwhile cannot cut it short),
    /// None when the cache has none.
    pub fn cached_copy(&self, id: PackId) -> Result<Option<Vec<u8>>, ChunkStoreError> {
        let path = self.shared.cache.join(pack_name(id));
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Drops the cached copy of pack `id` (it failed a check: the bucket's copy is what counts,
    /// and the next read fetches it again).
    pub fn drop_cached(&self, id: PackId) {
        let _ = fs::remove_file(self.shared.cache.join(pack_name(id)));
    }

    /// What the store says of pack `id`'s object, the version it was uploaded as (None: not
    /// there).
    pub fn stat(&self, id: PackId) -> Result<Option<ObjectStat>, ChunkStoreError> {
        let version = self.shared.book.version(id);
        self.shared
            .client
            .stat_version(&Shared::object(id), version.as_deref())
            .map_err(remote(format!("looking at pack {id}")))
    }

    /// Pack `id` read from the bucket, past the cache (a deep verify's read).
    pub fn read_remote(&self, id: PackId) -> Result<Vec<u8>, ChunkStoreError> {
        self.shared.get(id)
    }

    /// Checks that the bucket answers and the credentials are accepted (a listing).
    pub fn check(&self) -> Result<(), ChunkStoreError> {
        self.shared
            .client
            .list(PACKS_PREFIX)
            .map(drop)
            .map_err(remote("listing the bucket".into()))
    }
}

impl Shared {
    fn object(id: PackId) -> String {
        format!("{PACKS_PREFIX}{}", pack_name(id))
    }

    /// Publishes every staged pack no writer holds (its lock file is free): packs an upload
    /// that failed, or a process that died, left behind.
    fn publish_staged(&self) -> Result<Vec<Retired>, ChunkStoreError> {
        let mut done = Vec::new();
        for (id, _, _) in packs_in(&self.staging) {
            let Some(lock) = self.try_lock(id)? else {
                continue;
            };
            let digest = self.publish(id, &lock)?;
            self.unlock(id, lock);
            done.push(Retired { id, digest });
        }
        Ok(done)
    }

    /// The lock file of staged pack `id`, locked; None when another writer holds it. A writer
    /// locks it before creating the pack and keeps it until the pack is published, so a
    /// sweep (of this or another process: gc writes packs too) never takes a pack in use.
    fn try_lock(&self, id: PackId) -> Result<Option<fs::File>, ChunkStoreError> {
        let path = self.staging.join(format!("{}.lock", pack_name(id)));
        let f = fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(f)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(io_err(&path)(e.into())),
        }
    }

    /// Removes a published pack's lock file, then lets go of the lock.
    fn unlock(&self, id: PackId, lock: fs::File) {
        let _ = fs::remove_file(self.staging.join(format!("{}.lock", pack_name(id))));
        drop(lock);
    }

    /// Uploads finished pack `id` from `staging/` (create-only), then moves it into the cache;
    /// returns what was uploaded (None when another publish took it meanwhile). An object of
    /// that name already there (an earlier try that got through) must have the same size.
    /// The caller holds the pack's lock file (`_locked`), so no other publish of it runs.
    fn publish(
        &self,
        id: PackId,
        _locked: &fs::File,
    ) -> Result<Option<PackDigest>, ChunkStoreError> {
        let _slot = self.publishing.take();
        let path = self.staging.join(pack_name(id));
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            // Published meanwhile (by a sweep, or the writer that retired it).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let name = Self::object(id);
        // Its SHA-256 goes with the PUT, which the store checks the body against.
        let digest = PackDigest::of(&bytes);
        let put = self
            .client
            .put_new_summed(&name, &bytes, &digest.sha256)
            .map_err(remote(format!("uploading pack {id}")))?;
        let version = match put {
            Put::Created { version } => version,
            // An earlier try got through: the object there must be this pack.
            Put::Taken => {
                let there = self
                    .client
                    .stat(&name)
                    .map_err(remote(format!("looking at pack {id}")))?;
                match there {
                    Some(s) if s.size == bytes.len() as u64 => s.version,
                    _ => {
                        return Err(ChunkStoreError::Conflict {
                            pack: id,
                            size: bytes.len() as u64,
                            there: there.map(|s| s.size),
                        })
                    }
                }
            }
        };
        let cached = self.cache.join(pack_name(id));
        fs::rename(&path, &cached).map_err(io_err(&cached))?;
        self.evict(id, bytes.len() as u64);
        Ok(Some(PackDigest { version, ..digest }))
    }

    /// Pack `id`'s object from the bucket: the version it was uploaded as, when recorded.
    fn get(&self, id: PackId) -> Result<Vec<u8>, ChunkStoreError> {
        let version = self.book.version(id);
        self.client
            .get_version(
                &Self::object(id),
                version.as_deref(),
                (None, MAX_PACK_BYTES),
                &client::to_vec,
            )
            .map_err(remote(format!("fetching pack {id}")))
    }

    /// Counts pack `keep` of `added` bytes into the cache; once the cache is past its bound,
    /// removes the least recently used cached packs (never `keep`) until it fits. The folder is
    /// listed only when the tally says the bound is passed, or every [`RECOUNT_EVERY`] packs:
    /// a publish does not list a cache of thousands of packs. Best effort: the cache holds
    /// only copies.
    fn evict(&self, keep: PackId, added: u64) {
        {
            let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
            let CacheTally { bytes, adds } = &mut *t;
            if let Some(b) = bytes {
                if *adds < RECOUNT_EVERY && *b + added <= self.cache_limit {
                    *b += added;
                    *adds += 1;
                    return;
                }
            }
        }
        download::remove_stale_parts(&self.cache);
        let mut packs = packs_in(&self.cache);
        let mut total: u64 = packs.iter().map(|p| p.1).sum();
        if total > self.cache_limit {
            packs.sort_by_key(|p| p.2);
            for (id, size, _) in packs {
                if total <= self.cache_limit {
                    break;
                }
                if id != keep && fs::remove_file(self.cache.join(pack_name(id))).is_ok() {
                    total -= size;
                }
            }
        }
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        *t = CacheTally {
            bytes: Some(total),
            adds: 0,
        };
    }
}

impl ChunkStore for S3Packs {
    fn writer(&self) -> Box<dyn ChunkWriter> {
        Box::new(writer::S3Writer::new(self.shared.clone()))
    }

    fn reader(&self, order: ReadOrder) -> Box<dyn ChunkReader> {
        let dir = &self.shared.cache;
        Box::new(reader::S3Reader::new(
            self.shared.clone(),
            // Cached packs are written with O_DIRECT (downloads, and packs renamed in from
            // staging) and read so, in 8 MiB windows.
            match order {
                ReadOrder::Random => PackReader::new(dir),
                ReadOrder::Sequential => PackReader::sequential(dir),
            },
            order == ReadOrder::Sequential,
        ))
    }

    fn stored_packs(&self) -> Result<Vec<PackId>, ChunkStoreError> {
        let list = self
            .shared
            .client
            .list(PACKS_PREFIX)
            .map_err(remote("listing packs".into()))?;
        Ok(list
            .iter()
            .filter_map(|(name, _)| {
                let file = name.strip_prefix(PACKS_PREFIX)?;
                let id = PackId(i64::from_str_radix(file.strip_suffix(".pack")?, 16).ok()?);
                (pack_name(id) == file).then_some(id)
            })
            .collect())
    }

    fn pack_stat(&self, id: PackId) -> Option<PackStat> {
        let (size, modified_us) = self.shared.client.head(&Shared::object(id)).ok()??;
        Some(PackStat { size, modified_us })
    }

    fn remove_pack(&self, id: PackId) -> Result<(), ChunkStoreError> {
        self.shared
            .client
            .delete(&Shared::object(id))
            .map_err(remote(format!("removing pack {id}")))?;
        let _ = fs::remove_file(self.shared.cache.join(pack_name(id)));
        Ok(())
    }

    fn sync_removals(&self) {}

    fn stored_bytes(&self) -> u64 {
        self.shared
            .client
            .list(PACKS_PREFIX)
            .map(|l| l.iter().map(|(_, s)| s).sum())
            .unwrap_or(0)
    }

    fn publishes(&self) -> bool {
        true
    }

    fn objects(&self) -> Option<&S3Packs> {
        Some(self)
    }

    fn retain(&self, id: PackId, until_us: i64) -> Result<(), ChunkStoreError> {
        let version = self.shared.book.version(id);
        self.shared
            .client
            .retain(&Shared::object(id), version.as_deref(), until_us)
            .map_err(remote(format!("locking pack {id}")))
    }

    /// Uploads every finished pack still in `staging/` (not one a writer of this process
    /// appends to); returns those now in the bucket.
    fn publish_staged(&self) -> Result<Vec<Retired>, ChunkStoreError> {
        self.shared.publish_staged()
    }
}

#[cfg(test)]
mod tests;
