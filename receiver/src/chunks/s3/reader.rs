//! Reads through the cache, fetching a pack on its first use and reading its records as they
//! arrive. A sequential reader (a restore, a drill, gc) also fetches the next packs ahead in
//! the background, so downloads overlap the decompression of what was fetched before.

use super::{PackReader, Readable, Shared};
use crate::catalog::packs::Known;
use crate::chunks::{BlockHash, ChunkLocation, ChunkReader, ChunkStoreError, PackId, Prepared};
use std::sync::Arc;

/// Packs a sequential reader fetches ahead of the one it reads. Pack ids follow upload order,
/// so the next ids are most often the next packs of the same walk (a pack that does not
/// exist costs one refused GET).
const AHEAD: i64 = 2;

pub(super) struct S3Reader {
    shared: Arc<Shared>,
    inner: PackReader,
    /// Fetch ahead (sequential readers only).
    ahead: bool,
    /// The last pack this reader fetched ahead of, so each pack starts its look-ahead once.
    last: Option<PackId>,
    /// Packs read whole from the cache and opened by the inner reader, which keeps them open:
    /// a read of one of them needs no look at the cache (a stat, an open and a time stamp per
    /// record cost a restore's walk about as much as its own work).
    ready: std::collections::HashSet<PackId>,
    /// Time spent waiting for downloads, for the log.
    waited: std::time::Duration,
}

impl S3Reader {
    pub(super) fn new(shared: Arc<Shared>, inner: PackReader, ahead: bool) -> S3Reader {
        S3Reader {
            shared,
            inner,
            ahead,
            last: None,
            ready: Default::default(),
            waited: Default::default(),
        }
    }

    /// Makes the record at `at` readable by the inner reader: from the cache, or from its
    /// pack's download once that got past it (the packs after it on their way first, so a
    /// walk's next packs download while it reads this one). Returns whether the pack is
    /// whole in the cache.
    fn locate(&mut self, at: ChunkLocation) -> Result<bool, ChunkStoreError> {
        let id = at.pack;
        if self.ready.contains(&id) {
            return Ok(true);
        }
        if self.ahead && self.last != Some(id) {
            self.last = Some(id);
            for next in (1..=AHEAD).map(|n| PackId(id.0 + n)) {
                // A pack the catalog has no row for is never read by this walk.
                if self.shared.book.known(next) != Some(Known::NoRow) {
                    self.shared.start(next);
                }
            }
        }
        let started = std::time::Instant::now();
        let readable = self
            .shared
            .readable(id, at.offset.saturating_add(u64::from(at.len)));
        self.waited += started.elapsed();
        match readable? {
            Readable::Whole => {
                self.inner.whole(id);
                Ok(true)
            }
            Readable::Part {
                file,
                direct,
                written,
            } => {
                self.inner.adopt(id, (&file, direct.as_deref()), written);
                Ok(false)
            }
        }
    }
}

impl Drop for S3Reader {
    fn drop(&mut self) {
        if !self.waited.is_zero() {
            tracing::debug!(
                ms = self.waited.as_millis() as u64,
                "a reader waited for pack downloads"
            );
        }
    }
}

impl ChunkReader for S3Reader {
    fn read(&mut self, at: ChunkLocation, hash: &BlockHash) -> Result<Vec<u8>, ChunkStoreError> {
        let whole = self.locate(at)?;
        let frame = self.inner.read(at, hash)?;
        if whole {
            self.ready.insert(at.pack);
        }
        Ok(frame)
    }

    fn prepare(
        &mut self,
        at: ChunkLocation,
        hash: &BlockHash,
    ) -> Result<Prepared, ChunkStoreError> {
        let whole = self.locate(at)?;
        let prepared = self.inner.prepare(at, hash)?;
        if whole {
            self.ready.insert(at.pack);
        }
        Ok(prepared)
    }
}
