//! Reads through the cache, fetching a pack on its first use and reading its records as they
//! arrive. A sequential reader (a restore, a drill, gc) also fetches the next packs ahead in
//! the background, so downloads overlap the decompression of what was fetched before.

use super::download::Download;
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
    /// Fetch ahead (sequential readers only), keeping what is fetched in memory.
    ahead: bool,
    /// The last pack this reader fetched ahead of, so each pack starts its look-ahead once.
    last: Option<PackId>,
    /// Packs read whole from the cache and opened by the inner reader, which keeps them open:
    /// a read of one of them needs no look at the cache (a stat, an open and a time stamp per
    /// record cost a restore's walk about as much as its own work).
    ready: std::collections::HashSet<PackId>,
    /// The downloads this reader started or joined, newest last (at most [`HELD`]): held, so
    /// what they keep in memory stays there until this reader got to it.
    held: std::collections::VecDeque<(PackId, Arc<Download>)>,
    /// Time spent waiting for downloads, for the log.
    waited: std::time::Duration,
}

/// Downloads a reader holds: those ahead, the one it reads, and one it may alternate with (a
/// restore of an incremental point reads the base's packs and the point's own side by side).
const HELD: usize = AHEAD as usize + 2;

impl S3Reader {
    pub(super) fn new(shared: Arc<Shared>, inner: PackReader, ahead: bool) -> S3Reader {
        S3Reader {
            shared,
            inner,
            ahead,
            last: None,
            ready: Default::default(),
            held: Default::default(),
            waited: Default::default(),
        }
    }

    /// Holds download `d` of pack `id` (letting go of the oldest beyond [`HELD`]).
    fn hold(&mut self, id: PackId, d: Arc<Download>) -> Arc<Download> {
        if self.held.len() >= HELD {
            self.held.pop_front();
        }
        self.held.push_back((id, d.clone()));
        d
    }

    /// The download of pack `id` this reader holds, or one it starts or joins now; None when
    /// the pack is in the cache whole.
    fn download(&mut self, id: PackId) -> Option<Arc<Download>> {
        if let Some((_, d)) = self.held.iter().find(|(p, _)| *p == id) {
            return Some(d.clone());
        }
        let d = self.shared.start(id, self.ahead)?;
        Some(self.hold(id, d))
    }

    /// Starts the downloads of the packs after `id` (sequential readers, once per pack).
    fn look_ahead(&mut self, id: PackId) {
        if !self.ahead || self.last == Some(id) {
            return;
        }
        self.last = Some(id);
        for next in (1..=AHEAD).map(|n| PackId(id.0 + n)) {
            // A pack the catalog has no row for is never read by this walk.
            if self.shared.book.known(next) == Some(Known::NoRow)
                || self.held.iter().any(|(p, _)| *p == next)
            {
                continue;
            }
            if let Some(d) = self.shared.start(next, true) {
                self.hold(next, d);
            }
        }
    }

    /// The record at `at`: from the memory of its pack's download, from the download's file
    /// once it got past it, or from the cache.
    fn prepare_at(
        &mut self,
        at: ChunkLocation,
        hash: &BlockHash,
    ) -> Result<Prepared, ChunkStoreError> {
        let id = at.pack;
        if !self.ready.contains(&id) {
            self.look_ahead(id);
            if let Some(d) = self.download(id) {
                let started = std::time::Instant::now();
                let view = d.wait(at);
                self.waited += started.elapsed();
                let view = view?;
                if let Some(record) = view.memory {
                    return Ok(Prepared::new(at, *hash, Box::new(record)));
                }
                self.inner
                    .adopt(id, (&view.file, view.direct.as_deref()), view.written);
                return self.inner.prepare(at, hash);
            }
            self.inner.whole(id);
        }
        let prepared = self.inner.prepare(at, hash)?;
        self.ready.insert(id);
        Ok(prepared)
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
        let prepared = self.prepare_at(at, hash)?;
        Ok(prepared.frame()?.into_owned())
    }

    fn prepare(
        &mut self,
        at: ChunkLocation,
        hash: &BlockHash,
    ) -> Result<Prepared, ChunkStoreError> {
        self.prepare_at(at, hash)
    }
}
