//! One upload stream's pipeline and its group commit: batches are verified (decompressed and
//! hashed) ahead on the spare cores while earlier ones are written, then staged in stream order,
//! those verified while the last group was syncing together, so one pack sync and one catalog
//! transaction cover several batches. The stream's packs are sealed however it ends.

use super::{BatchStats, Entry, IncomingChunk, VerifiedBatch};
use crate::chunks::ChunkWriter;
use crate::error::StoreError;
use crate::store::Store;
use futures::{Stream, StreamExt};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinHandle};

/// Batches of one upload stream verified ahead of the one being written.
const VERIFY_AHEAD: usize = 6;
/// Bytes of decoded batches all upload streams together hold between decoding and staging
/// (a stream holds up to VERIFY_AHEAD + GROUP_MAX batches; an honest one is ~4 MiB each, a
/// hostile one up to 16 MiB). Streams wait in turn for room, so memory stays bounded.
const PIPELINE_BYTES: usize = 128 << 20;
/// Most batches staged by one pack sync and one catalog transaction.
const GROUP_MAX: usize = 8;
/// Most chunk bytes staged by one group.
const GROUP_BYTES: usize = 16 << 20;
/// What one block entry counts for against GROUP_BYTES: 65,536 entries (a metadata-only batch
/// of the most entries) fill a group, so no group's transaction stages more than that.
const ENTRY_WEIGHT: usize = GROUP_BYTES / rewind_proto::format::MAX_BATCH_ENTRIES;
/// Longest a group waits for more batches once it has one. Chunks are keyed by hash, so each
/// batch dirties catalog pages all over its tables: a group of more batches writes a page
/// they share once (a seed's catalog commits wrote 250 MB of WAL for 1.1 GB of chunks).
const GROUP_WAIT: Duration = Duration::from_millis(100);

/// A batch as the store takes it: session id, block entries and chunks.
pub type DecodedBatch = (String, Vec<Entry>, Vec<IncomingChunk>);

/// The room all upload streams share for batches between decoding and staging
/// ([`PIPELINE_BYTES`]).
#[derive(Clone)]
pub struct UploadRoom(Arc<Semaphore>);

impl Default for UploadRoom {
    fn default() -> Self {
        UploadRoom(Arc::new(Semaphore::new(PIPELINE_BYTES)))
    }
}

/// Why an upload stream's pipeline stopped.
#[derive(Debug, Error)]
pub enum UploadError<E> {
    /// The caller's stream of batches or its slot for the final store call failed (passed on
    /// as it came).
    #[error("{0}")]
    Caller(E),
    /// The store refused a batch, or sealing the packs failed.
    #[error(transparent)]
    Store(StoreError),
    /// A blocking worker panicked or was cancelled.
    #[error("worker failed: {0}")]
    Worker(JoinError),
    /// The task reading the stream panicked or was cancelled.
    #[error("reader failed: {0}")]
    Reader(JoinError),
    /// The room for decoded batches closed.
    #[error("the receiver is shutting down")]
    ShuttingDown,
}

/// A batch being verified: its job, its weight against [`GROUP_BYTES`], and its room.
type Pending = (
    JoinHandle<Result<VerifiedBatch, StoreError>>,
    usize,
    OwnedSemaphorePermit,
);

/// Receives one upload stream of `owner`: verifies its batches ahead, stages them in groups,
/// and seals the packs at the end (on a blocking thread, once `slot` grants a place), whether
/// or not the stream ended cleanly. Batches verified before a refused one are still staged.
/// The first failure is returned, after the seal.
pub async fn receive_upload<S, E, F>(
    store: Arc<Store>,
    owner: String,
    room: &UploadRoom,
    batches: S,
    slot: F,
) -> Result<BatchStats, UploadError<E>>
where
    S: Stream<Item = Result<DecodedBatch, E>> + Send + Unpin + 'static,
    E: Send + 'static,
    F: Future<Output = Result<OwnedSemaphorePermit, E>>,
{
    let (verified_tx, mut verified_rx) = mpsc::channel(VERIFY_AHEAD);
    let reader = tokio::spawn(verify_ahead(
        store.clone(),
        owner.clone(),
        room.0.clone(),
        batches,
        verified_tx,
    ));
    let mut writer = store.chunk_writer();
    let mut total = BatchStats::default();
    let mut failure = None;
    while let Some(first) = verified_rx.recv().await {
        let (jobs, permits) = gather(first, &mut verified_rx).await;
        let (group, refused) = verified(jobs).await;
        failure = refused;
        if !group.is_empty() {
            let (w, staged) = stage(store.clone(), owner.clone(), writer, group)
                .await
                .map_err(UploadError::Worker)?;
            writer = w;
            match staged {
                Ok(stats) => {
                    total.entries += stats.entries;
                    total.chunks_stored += stats.chunks_stored;
                    total.chunk_bytes += stats.chunk_bytes;
                }
                // The writer's packs are sealed even when the batch fails, so gc can
                // reclaim them. The earlier batches' error is the one to report.
                Err(e) => failure = Some(UploadError::Store(e)),
            }
        }
        drop(permits);
        if failure.is_some() {
            break;
        }
    }
    drop(verified_rx);
    let slot = slot.await.map_err(UploadError::Caller)?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        store.finish_upload(&mut *writer)
    })
    .await
    .map_err(UploadError::Worker)?
    .map_err(UploadError::Store)?;
    let read = reader.await.map_err(UploadError::Reader)?;
    if let Some(e) = failure {
        return Err(e);
    }
    read?;
    Ok(total)
}

/// The reading stage: takes each batch off the stream once the shared room has space for it
/// and starts its verification on a blocking thread, at most [`VERIFY_AHEAD`] ahead of staging.
async fn verify_ahead<S, E>(
    store: Arc<Store>,
    owner: String,
    room: Arc<Semaphore>,
    mut batches: S,
    verified: mpsc::Sender<Pending>,
) -> Result<(), UploadError<E>>
where
    S: Stream<Item = Result<DecodedBatch, E>> + Unpin,
{
    while let Some(batch) = batches.next().await {
        let (session, entries, chunks) = batch.map_err(UploadError::Caller)?;
        let frames: usize = chunks.iter().map(|c| c.frame.len()).sum();
        let held = (frames + 48 * entries.len()).clamp(1, PIPELINE_BYTES);
        // A group's transaction also grows with its entries: weigh them so that one group
        // stages at most about one batch of the most entries.
        let bytes = frames + ENTRY_WEIGHT * entries.len();
        let permit = room
            .clone()
            .acquire_many_owned(held as u32)
            .await
            .map_err(|_| UploadError::ShuttingDown)?;
        let store = store.clone();
        let owner = owner.clone();
        let job = tokio::task::spawn_blocking(move || {
            store.verify_batch(&owner, &session, entries, chunks)
        });
        if verified.send((job, bytes, permit)).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// The group that starts with `first`: the batches that are verified or arrive within
/// [`GROUP_WAIT`], up to [`GROUP_MAX`] batches or [`GROUP_BYTES`]; the end of the stream ends
/// the wait early. Returns their jobs in stream order and their room.
async fn gather(
    first: Pending,
    rx: &mut mpsc::Receiver<Pending>,
) -> (
    Vec<JoinHandle<Result<VerifiedBatch, StoreError>>>,
    Vec<OwnedSemaphorePermit>,
) {
    let (job, mut bytes, permit) = first;
    let mut jobs = vec![job];
    let mut permits = vec![permit];
    let deadline = tokio::time::Instant::now() + GROUP_WAIT;
    while jobs.len() < GROUP_MAX && bytes < GROUP_BYTES {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((job, b, p))) => {
                jobs.push(job);
                permits.push(p);
                bytes += b;
            }
            Ok(None) | Err(_) => break,
        }
    }
    (jobs, permits)
}

/// The verified batches of a group, in order, up to the first that failed, and why it failed.
async fn verified<E>(
    jobs: Vec<JoinHandle<Result<VerifiedBatch, StoreError>>>,
) -> (Vec<VerifiedBatch>, Option<UploadError<E>>) {
    let mut group = Vec::with_capacity(jobs.len());
    for job in jobs {
        match job.await {
            Ok(Ok(v)) => group.push(v),
            Ok(Err(e)) => return (group, Some(UploadError::Store(e))),
            Err(e) => return (group, Some(UploadError::Worker(e))),
        }
    }
    (group, None)
}

/// Stages a group with the stream's writer on a blocking thread, and hands the writer back.
async fn stage(
    store: Arc<Store>,
    owner: String,
    mut writer: Box<dyn ChunkWriter>,
    group: Vec<VerifiedBatch>,
) -> Result<(Box<dyn ChunkWriter>, Result<BatchStats, StoreError>), JoinError> {
    tokio::task::spawn_blocking(move || {
        let staged = store.stage_batches(&owner, group, &mut *writer);
        (writer, staged)
    })
    .await
}
