//! Reads through the cache, fetching a pack on its first use. A sequential reader (a restore,
//! a drill, gc) also fetches the next packs ahead in the background, so downloads overlap the
//! decompression of what was fetched before.

use super::{PackReader, Shared};
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
    /// Packs made readable and opened by the inner reader, which keeps them open: a read of
    /// one of them needs no look at the cache (a stat, an open and a time stamp per record
    /// cost a restore's walk about as much as its own work).
    ready: std::collections::HashSet<PackId>,
}

impl S3Reader {
    pub(super) fn new(shared: Arc<Shared>, inner: PackReader, ahead: bool) -> S3Reader {
        S3Reader {
            shared,
            inner,
            ahead,
            last: None,
            ready: Default::default(),
        }
    }

    /// Makes pack `id` readable, once the packs after it are on their way (so the first pack
    /// of a walk is not fetched alone).
    fn fetch(&mut self, id: PackId) -> Result<(), ChunkStoreError> {
        if self.ready.contains(&id) {
            return Ok(());
        }
        if self.ahead && self.last != Some(id) {
            self.last = Some(id);
            for next in (1..=AHEAD).map(|n| PackId(id.0 + n)) {
                // A pack the catalog has no row for is never read by this walk.
                if self.shared.cached_or_coming(next)
                    || self.shared.book.known(next) == Some(Known::NoRow)
                {
                    continue;
                }
                let shared = self.shared.clone();
                // Best effort: a failed or refused fetch ahead leaves the read to fetch it.
                let _ = std::thread::Builder::new()
                    .name("pack-fetch".into())
                    .spawn(move || shared.fetch(next));
            }
        }
        self.shared.fetch(id)
    }
}

impl ChunkReader for S3Reader {
    fn read(&mut self, at: ChunkLocation, hash: &BlockHash) -> Result<Vec<u8>, ChunkStoreError> {
        self.fetch(at.pack)?;
        let frame = self.inner.read(at, hash)?;
        self.ready.insert(at.pack);
        Ok(frame)
    }

    fn prepare(
        &mut self,
        at: ChunkLocation,
        hash: &BlockHash,
    ) -> Result<Prepared, ChunkStoreError> {
        self.fetch(at.pack)?;
        let prepared = self.inner.prepare(at, hash)?;
        self.ready.insert(at.pack);
        Ok(prepared)
    }
}
