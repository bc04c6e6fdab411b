//! The writer of packs on object storage: appends to packs in `staging/` as a local pack
//! writer does; a finished pack uploads on a thread of its own while the next one fills, and
//! is handed back to be sealed only once it is in the bucket.

use super::{io_err, PackWriter, Shared};
use crate::chunks::format::pack_name;
use crate::chunks::{
    BlockHash, ChunkLocation, ChunkStoreError, ChunkWriter, PackDigest, PackId, Retired,
};
use std::fs;
use std::sync::Arc;

/// Uploads one writer may have running while it fills its next pack.
const UPLOADS_IN_FLIGHT: usize = 2;

/// A finished pack being uploaded on a thread of its own.
struct Upload {
    id: PackId,
    handle: std::thread::JoinHandle<Result<Option<PackDigest>, ChunkStoreError>>,
}

/// Appends to packs in `staging/`; a finished pack is uploaded (in the background, while the
/// next one fills) before it is handed back to be sealed.
pub(super) struct S3Writer {
    shared: Arc<Shared>,
    inner: PackWriter,
    /// Lock files of the packs this writer wrote and has not started uploading.
    locks: Vec<(PackId, fs::File)>,
    /// Uploaded packs, to be sealed.
    done: Vec<Retired>,
    /// Uploads running, oldest first.
    uploads: std::collections::VecDeque<Upload>,
}

impl S3Writer {
    pub(super) fn new(shared: Arc<Shared>) -> S3Writer {
        S3Writer {
            inner: PackWriter::new(&shared.staging),
            shared,
            locks: Vec::new(),
            done: Vec::new(),
            uploads: std::collections::VecDeque::new(),
        }
    }

    /// Starts uploading the packs the inner writer retired, each on a thread that holds the
    /// pack's lock until it is in the bucket (a failed upload lets go of it: a sweep retries);
    /// at most [`UPLOADS_IN_FLIGHT`] run, beyond that the oldest is waited for.
    fn publish_retired(&mut self) -> Result<(), ChunkStoreError> {
        for Retired { id, .. } in self.inner.take_retired() {
            while self.uploads.len() >= UPLOADS_IN_FLIGHT {
                self.join_oldest()?;
            }
            let lock = self
                .locks
                .iter()
                .position(|(l, _)| *l == id)
                .map(|i| self.locks.swap_remove(i).1);
            let shared = self.shared.clone();
            let handle = std::thread::Builder::new()
                .name("pack-upload".into())
                .spawn(move || {
                    // The writer locked each of its packs when it made it. One whose lock it
                    // no longer holds stays staged for a sweep unless the lock is free: it is
                    // never reported published while someone else may still be uploading it.
                    let lock = match lock {
                        Some(lock) => lock,
                        None => shared.try_lock(id)?.ok_or_else(|| ChunkStoreError::Io {
                            path: shared.staging.join(pack_name(id)),
                            source: std::io::Error::other(
                                "the pack's lock is held elsewhere; a sweep publishes it",
                            ),
                        })?,
                    };
                    let published = shared.publish(id, &lock);
                    if published.is_ok() {
                        shared.unlock(id, lock);
                    }
                    published
                })
                .map_err(io_err(&self.shared.staging))?;
            self.uploads.push_back(Upload { id, handle });
        }
        self.reap()
    }

    /// Waits for the oldest upload; a published pack goes to `done`.
    fn join_oldest(&mut self) -> Result<(), ChunkStoreError> {
        let Some(u) = self.uploads.pop_front() else {
            return Ok(());
        };
        match u.handle.join() {
            Ok(Ok(digest)) => {
                self.done.push(Retired { id: u.id, digest });
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ChunkStoreError::Io {
                path: self.shared.staging.join(pack_name(u.id)),
                source: std::io::Error::other("the upload thread failed"),
            }),
        }
    }

    /// Collects the uploads that ended, in order.
    fn reap(&mut self) -> Result<(), ChunkStoreError> {
        while self.uploads.front().is_some_and(|u| u.handle.is_finished()) {
            self.join_oldest()?;
        }
        Ok(())
    }
}

impl ChunkWriter for S3Writer {
    fn needs_pack(&self) -> bool {
        self.inner.needs_pack()
    }

    /// The new pack's lock is taken before its file exists, so no sweep takes it.
    fn open_pack(&mut self, id: PackId) -> Result<(), ChunkStoreError> {
        let Some(lock) = self.shared.try_lock(id)? else {
            return Err(ChunkStoreError::Io {
                path: self.shared.staging.join(pack_name(id)),
                source: std::io::Error::other("a new pack's lock is held elsewhere"),
            });
        };
        self.locks.push((id, lock));
        self.inner.open_pack(id)?;
        self.publish_retired()
    }

    fn append(&mut self, hash: &BlockHash, frame: &[u8]) -> Result<ChunkLocation, ChunkStoreError> {
        self.inner.append(hash, frame)
    }

    fn sync(&mut self) -> Result<(), ChunkStoreError> {
        self.inner.sync()
    }

    fn current(&self) -> Option<PackId> {
        self.inner.current()
    }

    fn take_retired(&mut self) -> Vec<Retired> {
        // A failed upload leaves its pack staged and unlocked: the next sweep retries it.
        if let Err(e) = self.reap() {
            tracing::warn!(error = %rewind_proto::report::Chain(&e), "a pack upload failed; retried later");
        }
        std::mem::take(&mut self.done)
    }

    /// Uploads the pack being written and any finished pack an earlier failure left behind.
    fn finish(&mut self) -> Result<(), ChunkStoreError> {
        self.inner.retire_current()?;
        self.publish_retired()?;
        // Every upload ends before the packs are handed back (the first failure is reported,
        // after all were waited for).
        let mut failed = Ok(());
        while !self.uploads.is_empty() {
            if let Err(e) = self.join_oldest() {
                failed = failed.and(Err(e));
            }
        }
        failed?;
        // Packs whose upload failed before are still locked by this writer: release them to
        // the sweep below.
        self.locks
            .retain(|(id, _)| self.inner.current() == Some(*id));
        let swept = self.shared.publish_staged()?;
        self.done.extend(swept);
        Ok(())
    }
}
