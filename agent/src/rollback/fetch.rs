//! Asking the receiver for the chunks of differing blocks: requests of a few chunks each
//! (blocks of one content share a chunk), replies checked to hold exactly what was asked.

use super::RollbackError;
use rewind_proto::format::MAX_READ_CHUNKS;
use rewind_proto::pb::replication_client::ReplicationClient;
use rewind_proto::{pb, BlockHash};
use tonic::transport::Channel;

/// Chunks asked for in one ReadChunks request: small enough that the first reply arrives
/// (and its blocks are written) while the receiver still reads the others from its packs.
const CHUNKS_PER_REQUEST: usize = 16;

/// Blocks a compare found differing, as the fetch wants them: chunks to ask for, each with the
/// blocks that need it, or blocks that must become zero.
pub(super) enum Found {
    Chunks(Vec<(BlockHash, Vec<u64>)>),
    Zeros(Vec<u64>),
}

/// What the writer gets: fetched frames, each with the blocks that need it, or blocks to zero.
pub(super) enum Work {
    Chunks(Vec<(BlockHash, bytes::Bytes, Vec<u64>)>),
    Zeros(Vec<u64>),
}

/// Blocks that must become zero sent to the writer together.
const ZEROS_PER_BATCH: usize = 256;

/// Gathers the blocks a compare finds differing into requests of at most
/// [`CHUNKS_PER_REQUEST`] chunks (blocks with the same content share one) and batches of
/// blocks to zero, and hands each on once full. Without a sender (a dry run) it
/// only lets the compare go on.
pub(super) struct Requests {
    tx: Option<tokio::sync::mpsc::Sender<Found>>,
    chunks: Vec<(BlockHash, Vec<u64>)>,
    /// Blocks the chunks of the request being gathered go to, and the most it takes.
    blocks: usize,
    max_blocks: usize,
    /// Most chunks one request asks for: the receiver's reply must stay within
    /// MAX_READ_REPLY_BYTES even if every frame is as long as its block's bound.
    max_chunks: usize,
    zeros: Vec<u64>,
}

/// Bytes of blocks one request may fill: the writer holds a request's blocks decompressed at
/// once, so many blocks of one content (a disk of one repeated pattern) must not make one
/// request of gigabytes.
const REQUEST_BLOCK_BYTES: u64 = 16 << 20;

impl Requests {
    pub(super) fn new(block_size: u64, tx: Option<tokio::sync::mpsc::Sender<Found>>) -> Requests {
        Requests {
            tx,
            chunks: Vec::new(),
            blocks: 0,
            max_blocks: (REQUEST_BLOCK_BYTES / block_size.max(1)).max(1) as usize,
            max_chunks: (rewind_proto::format::MAX_READ_REPLY_BYTES
                / rewind_proto::format::max_frame_len(block_size as usize).max(1))
            .clamp(1, CHUNKS_PER_REQUEST.min(MAX_READ_CHUNKS)),
            zeros: Vec::new(),
        }
    }

    /// Takes differing block `i`, which must get the point's `leaf` (`None`: zero); false once
    /// nobody takes requests any more.
    pub(super) fn push(&mut self, i: u64, leaf: Option<BlockHash>) -> bool {
        if self.tx.is_none() {
            return true;
        }
        match leaf {
            None => {
                self.zeros.push(i);
                if self.zeros.len() >= ZEROS_PER_BATCH {
                    return self.send_zeros();
                }
            }
            Some(leaf) => {
                // A full request goes once a chunk it cannot take comes (neighbouring blocks
                // with the same content then share one request), or once it holds as many
                // blocks as one request may.
                let known = self.chunks.iter().position(|(h, _)| *h == leaf);
                let full = self.blocks >= self.max_blocks
                    || (known.is_none() && self.chunks.len() >= self.max_chunks);
                let sent = !full || self.send_chunks();
                match known.filter(|_| !full) {
                    Some(k) => self.chunks[k].1.push(i),
                    None => self.chunks.push((leaf, vec![i])),
                }
                self.blocks += 1;
                return sent;
            }
        }
        true
    }

    /// Hands on what is left.
    pub(super) fn finish(mut self) {
        if !self.chunks.is_empty() {
            self.send_chunks();
        }
        if !self.zeros.is_empty() {
            self.send_zeros();
        }
    }

    fn send_chunks(&mut self) -> bool {
        self.blocks = 0;
        let chunks = std::mem::take(&mut self.chunks);
        self.send(Found::Chunks(chunks))
    }

    fn send_zeros(&mut self) -> bool {
        let zeros = std::mem::take(&mut self.zeros);
        self.send(Found::Zeros(zeros))
    }

    fn send(&mut self, found: Found) -> bool {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.blocking_send(found).is_ok());
        if !sent {
            self.tx = None;
        }
        sent
    }
}

/// Fetches the chunks of one request and pairs each frame with the blocks that need it; every
/// chunk asked for must come back, and nothing else. Returns the work and the bytes fetched.
pub(super) async fn fetch(
    mut client: ReplicationClient<Channel>,
    vm: String,
    found: Found,
) -> Result<(Work, u64), RollbackError> {
    let want = match found {
        Found::Zeros(blocks) => return Ok((Work::Zeros(blocks), 0)),
        Found::Chunks(chunks) => chunks,
    };
    let req = pb::ReadChunksRequest {
        vm,
        hashes: want.iter().map(|(h, _)| h.0.to_vec()).collect(),
    };
    let reply = client
        .read_chunks(req)
        .await
        .map_err(RollbackError::refused("ReadChunks"))?
        .into_inner();
    pair(want, reply.chunks)
}

/// Pairs the chunks of a reply with the blocks that asked for each (`want`); every chunk asked
/// for must be there once, and nothing else. Returns the work and the bytes fetched.
fn pair(
    mut want: Vec<(BlockHash, Vec<u64>)>,
    chunks: Vec<pb::Chunk>,
) -> Result<(Work, u64), RollbackError> {
    let mut work = Vec::with_capacity(chunks.len());
    let mut bytes = 0u64;
    for c in chunks {
        let h = BlockHash::from_slice(&c.hash)
            .map_err(|_| RollbackError::protocol("bad chunk hash"))?;
        let Some(k) = want.iter().position(|(w, _)| *w == h) else {
            return Err(RollbackError::protocol(
                "the receiver sent a chunk we did not ask for",
            ));
        };
        let (_, blocks) = want.swap_remove(k);
        bytes += c.data.len() as u64;
        work.push((h, c.data, blocks));
    }
    if !want.is_empty() {
        return Err(RollbackError::protocol(
            "the receiver left out a chunk we asked for",
        ));
    }
    Ok((Work::Chunks(work), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SyncError;
    use std::collections::BTreeMap;

    const BLOCK: u64 = 64 * 1024;

    fn leaf(n: u8) -> BlockHash {
        BlockHash::of(&[n; 64])
    }

    fn chunk(l: BlockHash, data: &[u8]) -> pb::Chunk {
        pb::Chunk {
            hash: l.0.to_vec(),
            data: bytes::Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn a_reply_pairs_each_chunk_with_its_blocks_and_must_hold_exactly_what_was_asked() {
        let want = || vec![(leaf(1), vec![3, 9]), (leaf(2), vec![4])];
        let (work, bytes) =
            pair(want(), vec![chunk(leaf(2), b"bb"), chunk(leaf(1), b"aaa")]).expect("paired");
        assert_eq!(bytes, 5);
        let Work::Chunks(got) = work else {
            panic!("chunks expected");
        };
        let got: Vec<(BlockHash, Vec<u64>)> = got.into_iter().map(|(h, _, b)| (h, b)).collect();
        assert_eq!(got, vec![(leaf(2), vec![4]), (leaf(1), vec![3, 9])]);

        let left_out = pair(want(), vec![chunk(leaf(1), b"aaa")]);
        assert!(matches!(
            left_out,
            Err(RollbackError::Sync(SyncError::Protocol(
                "the receiver left out a chunk we asked for"
            )))
        ));
        let extra = pair(
            want(),
            vec![
                chunk(leaf(1), b"a"),
                chunk(leaf(2), b"b"),
                chunk(leaf(3), b"c"),
            ],
        );
        assert!(matches!(
            extra,
            Err(RollbackError::Sync(SyncError::Protocol(
                "the receiver sent a chunk we did not ask for"
            )))
        ));
        let twice = pair(want(), vec![chunk(leaf(1), b"a"), chunk(leaf(1), b"a")]);
        assert!(matches!(
            twice,
            Err(RollbackError::Sync(SyncError::Protocol(
                "the receiver sent a chunk we did not ask for"
            )))
        ));
        let bad = pair(
            want(),
            vec![pb::Chunk {
                hash: vec![1, 2, 3],
                data: bytes::Bytes::new(),
            }],
        );
        assert!(matches!(
            bad,
            Err(RollbackError::Sync(SyncError::Protocol("bad chunk hash")))
        ));
    }

    #[test]
    fn differing_blocks_are_handed_on_a_request_at_a_time() {
        // Blocks 0..40 hold chunks 0..20 twice over (block i has chunk i / 2); 100..300 are zero
        // in the point.
        let want: BTreeMap<u64, BlockHash> = (0..40u64).map(|i| (i, leaf((i / 2) as u8))).collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut r = Requests::new(BLOCK, Some(tx));
        for i in (0..40).chain(100..300) {
            assert!(r.push(i, want.get(&i).copied()));
        }
        r.finish();
        let mut sent = Vec::new();
        while let Ok(f) = rx.try_recv() {
            sent.push(f);
        }
        let chunks: Vec<&Vec<(BlockHash, Vec<u64>)>> = sent
            .iter()
            .filter_map(|f| match f {
                Found::Chunks(c) => Some(c),
                Found::Zeros(_) => None,
            })
            .collect();
        let zeros: Vec<u64> = sent
            .iter()
            .filter_map(|f| match f {
                Found::Zeros(z) => Some(z.clone()),
                Found::Chunks(_) => None,
            })
            .flatten()
            .collect();
        // 20 distinct chunks: one full request of 16, then the 4 left at the end.
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![CHUNKS_PER_REQUEST, 20 - CHUNKS_PER_REQUEST]
        );
        assert_eq!(chunks[0][0], (leaf(0), vec![0, 1]));
        assert_eq!(chunks[1][3], (leaf(19), vec![38, 39]));
        assert_eq!(zeros, (100..300).collect::<Vec<u64>>());

        // Nobody listening: the compare is told to stop.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let mut r = Requests::new(BLOCK, Some(tx));
        assert!((0..40)
            .map(|i| r.push(i, want.get(&i).copied()))
            .any(|more| !more));
        // A dry run sends nothing and never stops the compare.
        let mut r = Requests::new(BLOCK, None);
        assert!((0..40).all(|i| r.push(i, want.get(&i).copied())));

        // A disk of one repeated content: requests of at most 16 MiB of blocks each, the
        // chunk asked for again in each.
        let same: BTreeMap<u64, BlockHash> = (0..600u64).map(|i| (i, leaf(7))).collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut r = Requests::new(BLOCK, Some(tx));
        assert!((0..600).all(|i| r.push(i, same.get(&i).copied())));
        r.finish();
        let mut sizes = Vec::new();
        while let Ok(Found::Chunks(c)) = rx.try_recv() {
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].0, leaf(7));
            sizes.push(c[0].1.len());
        }
        assert_eq!(sizes, vec![256, 256, 88]);
    }
}
