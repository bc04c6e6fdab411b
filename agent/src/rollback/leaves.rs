//! The point's leaves, streamed in block order a page at a time: from the receiver
//! (`PointBlocks` pages) or, when the point is the agent's own last one, from its state. The
//! stream builds the Merkle root of everything it passes, so the root of the point's leaves
//! is known at the end of the compare without holding them.

use super::compare::Scope;
use super::target::{self, Dirty};
use super::{RollbackConfig, RollbackError};
use crate::state::{self, OldLeaves};
use rewind_proto::format::{DiskGeometry, MAX_POINT_BLOCKS_PAGE};
use rewind_proto::pb::replication_client::ReplicationClient;
use rewind_proto::report::Chain;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::{pb, BlockHash, DiskRoot};
use std::path::PathBuf;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Pages fetched ahead of the compare: enough to keep it busy, few enough to bound memory
/// (a page is at most [`MAX_POINT_BLOCKS_PAGE`] leaves, about 3 MiB).
const PAGES_AHEAD: usize = 2;

/// Leaves handed from a producer to the stream, or why the producer stopped.
pub(super) type Page = Result<Vec<(u64, BlockHash)>, RollbackError>;

/// One `PointBlocks` answer: leaves from some block on, where the next page starts (0: none),
/// and the point's geometry and root.
pub(super) struct PointPage {
    pub entries: Vec<(u64, BlockHash)>,
    pub next: u64,
    pub size: u64,
    pub block_size: u32,
    pub root: DiskRoot,
}

/// Asks the receiver for the point's leaves of `disk` from block `start`.
pub(super) async fn point_page(
    client: &mut ReplicationClient<Channel>,
    vm: &str,
    point: i64,
    disk: &str,
    start: u64,
    limit: u32,
) -> Result<PointPage, RollbackError> {
    let page = client
        .point_blocks(pb::PointBlocksRequest {
            vm: vm.to_owned(),
            point: point as u64,
            disk: disk.to_owned(),
            start,
            limit,
        })
        .await
        .map_err(RollbackError::refused("PointBlocks"))?
        .into_inner();
    if page.next != 0 && page.next <= start {
        return Err(RollbackError::protocol(
            "a page of leaves that does not advance",
        ));
    }
    let entries = page
        .entries
        .iter()
        .map(|e| BlockHash::from_slice(&e.hash).map(|l| (e.index, l)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| RollbackError::protocol("bad leaf"))?;
    Ok(PointPage {
        entries,
        next: page.next,
        size: page.size,
        block_size: page.block_size,
        root: DiskRoot::from_slice(&page.root).map_err(|_| RollbackError::protocol("bad root"))?,
    })
}

/// The leaves to compare against and which blocks to compare. With trusted dirty bitmaps read
/// in the point's geometry only the blocks they name can differ, plus those where the agent's
/// last point and the target differ; when the target is that last point (its root matches
/// the state's) the leaves come from the state and the receiver is not asked for them.
/// Otherwise the whole disk is compared with the receiver's leaves.
pub(super) async fn choose(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
    disk: &str,
    g: &DiskGeometry,
    first: PointPage,
    dirty: Option<Dirty>,
) -> Result<(LeafStream, Scope), RollbackError> {
    let g = *g;
    let from_receiver = |first: PointPage| {
        let pages = receiver_pages(client.clone(), cfg.vm.clone(), cfg.point, disk, first);
        LeafStream::new(&g, pages)
    };
    let Some(dirty) = dirty.filter(|d| d.geometry == (g.size, g.block_size.bytes())) else {
        return Ok((from_receiver(first), Scope::Full));
    };
    let state = (cfg.state_dir.clone(), cfg.vm.clone(), disk.to_owned());
    let base = move |state| LeafStream::new(&g, state_pages(state, g.blocks()));
    // Only a rollback to the agent's own last point reads the state's leaves once before the
    // compare (their root decides whether they can stand in for the receiver's); any other
    // reads them once, merged into the compare.
    if target::base_point(&cfg.state_dir, &cfg.vm) == Some(cfg.point) {
        let root = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || base(state).root())
        };
        match root.await.map_err(RollbackError::joined)? {
            Err(e) => {
                tracing::warn!(disk, error = %Chain(&e), "the state's leaves are unreadable: comparing the whole disk");
                return Ok((from_receiver(first), Scope::Full));
            }
            Ok(root) if root == first.root => {
                let scope = Scope::Candidates {
                    dirty: dirty.blocks,
                    base: None,
                };
                return Ok((base(state), scope));
            }
            Ok(_) => {}
        }
    }
    let scope = Scope::Candidates {
        dirty: dirty.blocks,
        base: Some(base(state)),
    };
    Ok((from_receiver(first), scope))
}

/// The receiver's pages of the point's leaves, `first` and those after it, fetched ahead of
/// the compare by a task that stops when the stream is dropped.
fn receiver_pages(
    mut client: ReplicationClient<Channel>,
    vm: String,
    point: i64,
    disk: &str,
    first: PointPage,
) -> mpsc::Receiver<Page> {
    let (tx, rx) = mpsc::channel(PAGES_AHEAD);
    let disk = disk.to_owned();
    tokio::spawn(async move {
        let (mut next, shape) = (first.next, (first.size, first.block_size, first.root));
        if tx.send(Ok(first.entries)).await.is_err() {
            return;
        }
        while next != 0 {
            let page = point_page(&mut client, &vm, point, &disk, next, MAX_POINT_BLOCKS_PAGE)
                .await
                .and_then(|p| {
                    if (p.size, p.block_size, p.root) == shape {
                        Ok(p)
                    } else {
                        Err(RollbackError::protocol("the point's pages disagree"))
                    }
                });
            let entries = match page {
                Ok(p) => {
                    next = p.next;
                    Ok(p.entries)
                }
                Err(e) => {
                    next = 0;
                    Err(e)
                }
            };
            if tx.send(entries).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The agent's own leaves of its last committed point of a disk (`state`: state folder, VM,
/// disk), below block `blocks`, read on a thread of their own.
fn state_pages(state: (PathBuf, String, String), blocks: u64) -> mpsc::Receiver<Page> {
    let (tx, rx) = mpsc::channel(PAGES_AHEAD);
    std::thread::spawn(move || {
        let (dir, vm, disk) = state;
        let conn = match state::open(&dir) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.blocking_send(Err(e.into()));
                return;
            }
        };
        let mut old = OldLeaves::new(&conn, &vm, Some(&disk));
        loop {
            let page = old.next_page(blocks).map_err(RollbackError::from);
            let last = matches!(&page, Ok(p) if p.is_empty()) || page.is_err();
            if tx.blocking_send(page).is_err() || last {
                return;
            }
        }
    });
    rx
}

/// A point's non-zero leaves in block order, checked (strictly increasing, inside the disk)
/// as they arrive; every leaf passed goes into a tree builder for [`LeafStream::root`].
pub(super) struct LeafStream {
    pages: mpsc::Receiver<Page>,
    page: std::vec::IntoIter<(u64, BlockHash)>,
    head: Option<(u64, BlockHash)>,
    ended: bool,
    g: DiskGeometry,
    /// The block after the last leaf passed.
    next: u64,
    tree: Builder,
}

impl LeafStream {
    pub(super) fn new(g: &DiskGeometry, pages: mpsc::Receiver<Page>) -> LeafStream {
        LeafStream {
            pages,
            page: Vec::new().into_iter(),
            head: None,
            ended: false,
            g: *g,
            next: 0,
            tree: Builder::new(Shape::of(g)),
        }
    }

    /// A stream of these leaves (for tests).
    #[cfg(test)]
    pub(super) fn of(g: &DiskGeometry, leaves: Vec<(u64, BlockHash)>) -> LeafStream {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Ok(leaves));
        LeafStream::new(g, rx)
    }

    fn fill(&mut self) -> Result<(), RollbackError> {
        while self.head.is_none() && !self.ended {
            match self.page.next() {
                Some((i, leaf)) => {
                    if i < self.next || i >= self.g.blocks() {
                        return Err(RollbackError::protocol(
                            "the point's leaves are out of order or outside the disk",
                        ));
                    }
                    if leaf.is_zero() {
                        self.pass(i, leaf);
                    } else {
                        self.head = Some((i, leaf));
                    }
                }
                None => match self.pages.blocking_recv() {
                    Some(page) => self.page = page?.into_iter(),
                    None => self.ended = true,
                },
            }
        }
        Ok(())
    }

    fn pass(&mut self, i: u64, leaf: BlockHash) {
        self.tree.push_zeros(i - self.next);
        self.tree.push(leaf);
        self.next = i + 1;
    }

    /// The block of the next non-zero leaf, if any.
    pub(super) fn peek(&mut self) -> Result<Option<u64>, RollbackError> {
        self.fill()?;
        Ok(self.head.map(|h| h.0))
    }

    fn pop(&mut self) -> Option<(u64, BlockHash)> {
        let (i, leaf) = self.head.take()?;
        self.pass(i, leaf);
        Some((i, leaf))
    }

    /// The point's leaf of block `i` (`None`: zero). Blocks are asked in increasing order;
    /// leaves of blocks passed over are forgotten.
    pub(super) fn leaf_at(&mut self, i: u64) -> Result<Option<BlockHash>, RollbackError> {
        while let Some(j) = self.peek()? {
            if j > i {
                break;
            }
            let popped = self.pop();
            if j == i {
                return Ok(popped.map(|p| p.1));
            }
        }
        Ok(None)
    }

    /// Passes every leaf below `end` to `f`, in order, until `f` returns false; returns false
    /// if it did.
    pub(super) fn drain_below(
        &mut self,
        end: u64,
        f: &mut dyn FnMut(u64, BlockHash) -> bool,
    ) -> Result<bool, RollbackError> {
        while let Some(j) = self.peek()? {
            if j >= end {
                break;
            }
            if let Some((i, leaf)) = self.pop() {
                if !f(i, leaf) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The root of the point's leaves (the rest are read first).
    pub(super) fn root(mut self) -> Result<DiskRoot, RollbackError> {
        while self.peek()?.is_some() {
            self.pop();
        }
        self.tree.push_zeros(self.g.blocks() - self.next);
        Ok(tree::root(&self.g, self.tree.finish()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(n: u8) -> BlockHash {
        BlockHash::of(&[n; 64])
    }

    fn geometry(blocks: u64) -> DiskGeometry {
        DiskGeometry::new(blocks * 65536, 65536).expect("geometry")
    }

    #[test]
    fn the_stream_gives_the_root_of_what_it_passed_and_refuses_disorder() {
        let g = geometry(100);
        let leaves = vec![(3, leaf(1)), (4, leaf(2)), (70, leaf(3))];
        let mut b = Builder::new(Shape::of(&g));
        b.push_zeros(3);
        b.push(leaf(1));
        b.push(leaf(2));
        b.push_zeros(65);
        b.push(leaf(3));
        b.push_zeros(29);
        let want = tree::root(&g, b.finish());

        let mut s = LeafStream::of(&g, leaves.clone());
        assert_eq!(s.leaf_at(2).expect("read"), None);
        assert_eq!(s.leaf_at(4).expect("read"), Some(leaf(2)));
        let mut rest = Vec::new();
        assert!(s
            .drain_below(100, &mut |i, _| {
                rest.push(i);
                true
            })
            .expect("read"));
        assert_eq!(rest, vec![70]);
        assert_eq!(s.root().expect("root"), want);
        assert_eq!(LeafStream::of(&g, leaves).root().expect("root"), want);

        for bad in [
            vec![(4, leaf(1)), (3, leaf(2))],
            vec![(4, leaf(1)), (4, leaf(2))],
            vec![(100, leaf(1))],
        ] {
            let err = LeafStream::of(&g, bad).root().expect_err("refused");
            assert!(matches!(
                err,
                RollbackError::Sync(crate::error::SyncError::Protocol(_))
            ));
        }
    }
}
