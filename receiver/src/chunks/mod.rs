//! The chunk store: the one boundary through which the receiver writes and reads chunk bytes.
//!
//! Everything above this module (ingest, restore, verify, drill, the NBD export, rollback
//! reads, gc) sees chunk frames only as a [`ChunkLocation`] in a pack named by a [`PackId`],
//! and reaches them through three traits:
//! - [`ChunkStore`]: the stored packs as a whole: hands out writers and readers, and lists,
//!   measures and removes packs for gc;
//! - [`ChunkWriter`]: appends frames to one pack at a time and makes them durable;
//! - [`ChunkReader`]: reads frames at catalogued locations, one at a time or prepared on one
//!   thread and fetched on others ([`Prepared`]).
//!
//! Two implementations: [`local::LocalPacks`], append-only pack files in the data folder's
//! `packs/` (the default), and [`s3::S3Packs`], pack objects on S3-compatible object storage
//! with a local cache. Which one a data folder uses is recorded in it ([`location`]); callers
//! do not change. The pack and record
//! layout is in [`format`], shared by every implementation.
//!
//! The catalog (pack ids, chunk rows, sealing) is not part of the store: callers allocate a
//! pack id in the catalog before [`ChunkWriter::open_pack`] (a pack's row is committed before
//! its bytes exist) and seal the packs [`ChunkWriter::take_retired`] hands back.
//!
//! Ordering rule the store enforces: a frame is durable once [`ChunkWriter::sync`] returns, and
//! callers refer to it in the catalog only after that.

pub mod format;
pub mod local;
pub mod location;
pub mod s3;

use rewind_proto::BlockHash;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// A pack's id, handed out by the catalog (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackId(pub i64);

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl rusqlite::ToSql for PackId {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        self.0.to_sql()
    }
}

/// Where a chunk's frame lies: its pack, the offset of the frame (after the record header)
/// and the frame's length, as the catalog records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pack: PackId,
    pub offset: u64,
    pub len: u32,
}

impl ChunkLocation {
    /// A location from the catalog's columns (`pack_id`, `offset`, `clen`). Values out of
    /// range are kept as they convert: the reader refuses a place no record can be at.
    pub fn from_columns(pack: i64, offset: i64, len: i64) -> ChunkLocation {
        ChunkLocation {
            pack: PackId(pack),
            offset: offset as u64,
            len: len as u32,
        }
    }
}

/// How a reader will be used, so the store can choose how to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOrder {
    /// Records asked for in no particular order (chunks an agent asks for, a booted VM's
    /// reads): each is read on its own.
    Random,
    /// A walk that reads records mostly in pack order (a restore, a drill, a verify, gc).
    Sequential,
}

/// What an object store was given of a pack: its size and digests, which the store reports
/// back (ETag, `x-amz-checksum-sha256`) for `verify` to compare without reading the pack;
/// and, on a bucket that keeps versions, the version that holds these bytes, which every
/// later read, check, lock and removal names (whatever is written over the name since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackDigest {
    pub bytes: u64,
    pub md5: [u8; 16],
    pub sha256: [u8; 32],
    pub version: Option<String>,
}

impl PackDigest {
    /// The digest of a pack's bytes (no version: that is the store's to name).
    pub fn of(bytes: &[u8]) -> PackDigest {
        use md5::Digest as _;
        PackDigest {
            bytes: bytes.len() as u64,
            md5: md5::Md5::digest(bytes).into(),
            sha256: sha2::Sha256::digest(bytes).into(),
            version: None,
        }
    }

    /// Whether `bytes` are the bytes this digest was taken of.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let d = PackDigest::of(bytes);
        (d.bytes, d.md5, d.sha256) == (self.bytes, self.md5, self.sha256)
    }
}

/// A pack a writer finished, to be sealed: with its digest when it went to an object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    pub id: PackId,
    pub digest: Option<PackDigest>,
}

impl From<PackId> for Retired {
    fn from(id: PackId) -> Retired {
        Retired { id, digest: None }
    }
}

/// What gc needs to know of one stored pack.
#[derive(Debug, Clone, Copy)]
pub struct PackStat {
    /// Bytes stored.
    pub size: u64,
    /// Last change, in microseconds since the Unix epoch (None when the store cannot tell).
    pub modified_us: Option<i64>,
}

#[derive(Debug, Error)]
pub enum ChunkStoreError {
    /// Reading or writing a pack failed (disk full shows up here as ENOSPC).
    #[error("pack {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The object store failed or refused.
    #[error("{what}")]
    Remote { what: String, source: s3::S3Error },
    /// A pack object of that name is already in the bucket with other content.
    #[error("pack {pack} is already in the object store with {there:?} bytes, not {size}")]
    Conflict {
        pack: PackId,
        size: u64,
        there: Option<u64>,
    },
    /// The data folder's record of where its packs live is unusable.
    #[error(transparent)]
    Location(#[from] location::LocationError),
    /// The bytes at a catalogued place are not the record the catalog says.
    #[error("pack {path} offset {offset}: record header does not match chunk {hash}")]
    BadRecord {
        path: PathBuf,
        offset: u64,
        hash: BlockHash,
    },
}

/// The stored packs of one data folder. Shared by every thread of a process; each writer and
/// reader it hands out is used by one thread at a time.
pub trait ChunkStore: Send + Sync {
    /// A writer that appends to packs of its own.
    fn writer(&self) -> Box<dyn ChunkWriter>;

    /// A reader for records asked for in `order`.
    fn reader(&self, order: ReadOrder) -> Box<dyn ChunkReader>;

    /// Ids of the packs the store holds, whatever the catalog says (gc's orphan sweep).
    fn stored_packs(&self) -> Result<Vec<PackId>, ChunkStoreError>;

    /// Size and age of pack `id`; None when it is not there or cannot be looked at.
    fn pack_stat(&self, id: PackId) -> Option<PackStat>;

    /// Removes pack `id`. A pack already gone is not an error. Call only after the
    /// transaction that took the pack's last chunk rows away committed.
    fn remove_pack(&self, id: PackId) -> Result<(), ChunkStoreError>;

    /// Makes earlier removals durable, as far as the store can (best effort: a removal that
    /// is lost in a crash leaves an orphan, which the next gc removes).
    fn sync_removals(&self);

    /// Bytes the store holds, packs and anything else in it.
    fn stored_bytes(&self) -> u64;

    /// Whether packs go elsewhere once finished (object storage): then a pack is sealed only
    /// once it is there, and a point commits only when its chunks lie in sealed packs.
    fn publishes(&self) -> bool {
        false
    }

    /// Puts pack `id` under Object Lock in COMPLIANCE mode until `until_us` (microseconds since
    /// the epoch): nobody, the receiver's own keys included, can delete or overwrite it
    /// before then. Stores without such a lock do nothing.
    fn retain(&self, id: PackId, until_us: i64) -> Result<(), ChunkStoreError> {
        let _ = (id, until_us);
        Ok(())
    }

    /// The object store behind this store, for what only object stores do (verify's checks
    /// against the checksums the store keeps).
    fn objects(&self) -> Option<&s3::S3Packs> {
        None
    }

    /// Publishes finished packs an earlier failure left unpublished; returns them, to be
    /// sealed. Local packs have nothing to publish.
    fn publish_staged(&self) -> Result<Vec<Retired>, ChunkStoreError> {
        Ok(Vec::new())
    }
}

/// Appends chunk records to one pack at a time.
pub trait ChunkWriter: Send {
    /// Whether the next record needs a new pack (none open, or the open one is full). The
    /// caller then allocates an id in the catalog and calls [`ChunkWriter::open_pack`].
    fn needs_pack(&self) -> bool;

    /// Starts pack `id` (allocated by the catalog, row committed): syncs what was appended
    /// so far, retires the pack being written, and makes the new pack's name durable before
    /// any record refers to it.
    fn open_pack(&mut self, id: PackId) -> Result<(), ChunkStoreError>;

    /// Appends one record and returns where its frame is. Not durable until
    /// [`ChunkWriter::sync`]. Call [`ChunkWriter::needs_pack`] first.
    fn append(&mut self, hash: &BlockHash, frame: &[u8]) -> Result<ChunkLocation, ChunkStoreError>;

    /// Makes every appended record durable. Only then may the catalog refer to them.
    fn sync(&mut self) -> Result<(), ChunkStoreError>;

    /// The pack being appended to, if any.
    fn current(&self) -> Option<PackId>;

    /// Packs finished since the last call: seal them in the transaction that indexes their
    /// last chunks (sealing earlier would let gc see a pack without all its rows).
    fn take_retired(&mut self) -> Vec<Retired>;

    /// The upload stream ended: a store that publishes packs finishes and publishes the one
    /// being written (then handed back by [`ChunkWriter::take_retired`]). Local packs stay
    /// as they are.
    fn finish(&mut self) -> Result<(), ChunkStoreError> {
        Ok(())
    }
}

/// Reads frames at catalogued locations, checking the record around each.
pub trait ChunkReader: Send {
    /// The frame of `hash` at `at`.
    fn read(&mut self, at: ChunkLocation, hash: &BlockHash) -> Result<Vec<u8>, ChunkStoreError>;

    /// Finds the record of `hash` at `at` (reading ahead as the reader's order allows) so
    /// that [`Prepared::frame`] can read it later on any thread.
    fn prepare(&mut self, at: ChunkLocation, hash: &BlockHash)
        -> Result<Prepared, ChunkStoreError>;
}

/// Where a store found a record: read by [`Prepared::frame`].
pub trait Fetch: Send + Sync {
    /// The frame of `hash` at `at`, checking the record around it; lent when it is already
    /// in memory.
    fn fetch(&self, at: ChunkLocation, hash: &BlockHash) -> Result<Cow<'_, [u8]>, ChunkStoreError>;
}

/// A record found by [`ChunkReader::prepare`], to be read on any thread.
pub struct Prepared {
    at: ChunkLocation,
    hash: BlockHash,
    source: Box<dyn Fetch>,
}

impl Prepared {
    pub fn new(at: ChunkLocation, hash: BlockHash, source: Box<dyn Fetch>) -> Prepared {
        Prepared { at, hash, source }
    }

    /// The record's frame, checked against its header.
    pub fn frame(&self) -> Result<Cow<'_, [u8]>, ChunkStoreError> {
        self.source.fetch(self.at, &self.hash)
    }
}

/// The chunk store of data folder `data`, for reading or for a gc: where its packs live is
/// what the folder recorded ([`location`]); nothing is created in the store.
pub fn open(data: &Path) -> Result<Arc<dyn ChunkStore>, ChunkStoreError> {
    match location::recorded(data)? {
        None => Ok(Arc::new(local::LocalPacks::new(data))),
        Some(loc) => Ok(Arc::new(loc.open(data)?)),
    }
}

/// The chunk store of data folder `data` for `serve`, created if it is not there yet. With
/// `wanted` (from `--store`), a new folder records it and an existing one must have recorded
/// the same. An object store is checked (listing the bucket, so wrong credentials fail here)
/// and packs a crash left unpublished are uploaded: returned, to be sealed with their digests.
pub fn create(
    data: &Path,
    wanted: Option<&location::Location>,
) -> Result<(Arc<dyn ChunkStore>, Vec<Retired>), ChunkStoreError> {
    match location::settle(data, wanted)? {
        None => Ok((Arc::new(local::LocalPacks::create(data)?), Vec::new())),
        Some(loc) => {
            let packs = loc.open(data)?;
            packs.check()?;
            location::record(data, &loc)?;
            let published = packs.publish_staged()?;
            if !published.is_empty() {
                tracing::info!(
                    packs = published.len(),
                    "uploaded packs an earlier serve left unpublished"
                );
            }
            Ok((Arc::new(packs), published))
        }
    }
}
