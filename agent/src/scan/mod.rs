//! Hash-scan change detection: read every block of a raw disk that can hold data, compute its
//! leaf, compare with the leaf at the base point, and report the blocks that differ. Holes are
//! never read; all-zero blocks are never sent. Builds the disk's Merkle root on the way.

use crate::source::{DiskError, RawDisk, DIRECT_ALIGN};
use crate::state::OldLeaves;
use bytes::Bytes;
use rayon::prelude::*;
use rewind_proto::crypt::ChunkIds;
use rewind_proto::format::DiskGeometry;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::{BlockHash, DiskRoot};
use std::ops::Range;
use thiserror::Error;

mod source;
pub use source::*;

/// Bytes read per step of a scan: large sequential reads, bounded memory.
const READ_BYTES: u64 = 1024 * 1024;

/// Bytes one thread reads (and hashes) of a step when the source can read from several.
const READ_PART: usize = 512 * 1024;

/// Sets `leaves` to the leaf of each `block`-byte piece of `buf` (the last may be shorter),
/// hashed on all cores.
fn leaves_of(buf: &[u8], block: usize, ids: ChunkIds, leaves: &mut Vec<BlockHash>) {
    buf.par_chunks(block)
        .map(|b| ids.of(b))
        .collect_into_vec(leaves);
}

#[derive(Debug, Error)]
pub enum ScanError {
    /// Reading the disk failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Reading the base point's leaves failed.
    #[error("agent state")]
    State(#[from] rusqlite::Error),
    /// Reading through NBD failed.
    #[error(transparent)]
    Nbd(#[from] crate::nbd::NbdError),
    /// The consumer of changes stopped (the upload failed).
    #[error("upload stopped")]
    Stopped,
    /// The thread reading the disk ahead of the scan panicked.
    #[error("the disk reader stopped unexpectedly")]
    ReaderPanicked,
}

/// One block that differs from the base point: its new leaf and, unless it is all zeros, its
/// bytes (a view of the buffer the block was read into when most of that buffer is sent, a
/// copy otherwise, so a few changed blocks never hold whole read buffers).
#[derive(Debug)]
pub struct Change {
    pub index: u64,
    pub leaf: BlockHash,
    pub data: Option<Bytes>,
}

/// What a scan found.
#[derive(Debug, Clone, Copy)]
pub struct DiskScan {
    pub root: DiskRoot,
    pub changed: u64,
    /// Unchanged blocks sent again because the receiver lost their chunk.
    pub healed: u64,
    pub read_bytes: u64,
}

/// Walks a disk's blocks in order, building its tree and reporting blocks whose leaf differs
/// from the base point.
struct Walker<'o, 'c, 'h, F> {
    builder: Builder,
    old: &'o mut OldLeaves<'c>,
    on_change: F,
    /// Changes found in the step being walked, handed on by [`Walker::hand_on`] once it is
    /// known how much of the step's buffer they send.
    found: Vec<Found>,
    outside: Outside,
    heal: &'h std::collections::HashSet<BlockHash>,
    changed: u64,
    healed: u64,
    next: u64,
}

impl<F: FnMut(Change) -> Result<(), ScanError>> Walker<'_, '_, '_, F> {
    fn emit(&mut self, index: u64, leaf: BlockHash, data: Option<Range<usize>>) {
        self.changed += 1;
        self.found.push(Found { index, leaf, data });
    }

    /// Hands on the changes found since the last call; their byte ranges lie in `step`'s
    /// buffer, which goes back to `home` once nothing uses it.
    fn hand_on(
        &mut self,
        step: Option<StepBuf>,
        home: &std::sync::mpsc::Sender<StepBuf>,
    ) -> Result<(), ScanError> {
        let sent: usize = self
            .found
            .iter()
            .filter_map(|f| f.data.as_ref())
            .map(Range::len)
            .sum();
        let (shared, kept) = match step {
            // Sharing saves copying the blocks out; most of the buffer (as allocated: a short
            // step, e.g. one dirty block, holds a whole one) must be sent, so the windows of
            // changes bound the memory they hold.
            Some(buf) if sent * 4 >= buf.backing.len() * 3 => (
                Some(Bytes::from_owner(Lent {
                    buf: Some(buf),
                    home: home.clone(),
                })),
                None,
            ),
            other => (None, other),
        };
        for f in self.found.drain(..) {
            let data = match (f.data, &shared, &kept) {
                (Some(r), Some(s), _) => Some(s.slice(r)),
                (Some(r), None, Some(k)) => Some(Bytes::copy_from_slice(&k.bytes()[r])),
                _ => None,
            };
            (self.on_change)(Change {
                index: f.index,
                leaf: f.leaf,
                data,
            })?;
        }
        if let Some(k) = kept {
            // A reader that stopped no longer needs it.
            let _ = home.send(k);
        }
        Ok(())
    }

    /// Accounts for the blocks `[next, upto)` that are not read.
    fn skip_to(&mut self, upto: u64) -> Result<(), ScanError> {
        let mut passed = Vec::new();
        self.old.drain_below(upto, |j, l| passed.push((j, l)))?;
        match self.outside {
            Outside::Zero => {
                self.builder.push_zeros(upto - self.next);
                for (j, _) in passed {
                    self.emit(j, BlockHash::ZERO, None);
                }
            }
            Outside::Unchanged => {
                let mut at = self.next;
                for (j, l) in passed {
                    self.builder.push_zeros(j - at);
                    self.builder.push(l);
                    at = j + 1;
                }
                self.builder.push_zeros(upto - at);
            }
        }
        self.next = upto;
        Ok(())
    }

    /// Accounts for block `index` (the next one) with its new leaf and, if it was read, the
    /// range of its bytes in the step's buffer.
    fn block(
        &mut self,
        index: u64,
        leaf: BlockHash,
        data: Option<Range<usize>>,
    ) -> Result<(), ScanError> {
        self.skip_to(index)?;
        let before = self.old.leaf_at(index, |_, _| {})?;
        self.builder.push(leaf);
        self.next = index + 1;
        if leaf != before {
            self.emit(index, leaf, data.filter(|_| !leaf.is_zero()));
        } else if !leaf.is_zero() && self.heal.contains(&leaf) && data.is_some() {
            self.healed += 1;
            self.found.push(Found { index, leaf, data });
        }
        Ok(())
    }
}

/// A change found in a step, its bytes not yet taken from the step's buffer.
struct Found {
    index: u64,
    leaf: BlockHash,
    data: Option<Range<usize>>,
}

/// A step's buffer lent to the changes that view it; it goes back to the reader when the last
/// of them is dropped.
struct Lent {
    buf: Option<StepBuf>,
    home: std::sync::mpsc::Sender<StepBuf>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], StepBuf::bytes)
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // A finished scan no longer needs it: it is freed.
            let _ = self.home.send(buf);
        }
    }
}

/// Scans a disk with `plan` against `old`, calling `on_change` for each block whose leaf
/// differs from the base point (in index order, but for blocks that became holes in a full
/// read, which are reported when passed).
pub fn scan_disk(
    src: &mut (dyn BlockSource + Send),
    geometry: DiskGeometry,
    plan: &ScanPlan,
    old: &mut OldLeaves<'_>,
    heal: &std::collections::HashSet<BlockHash>,
    on_change: impl FnMut(Change) -> Result<(), ScanError>,
    progress: &dyn Fn(u64),
) -> Result<DiskScan, ScanError> {
    let bs = geometry.block_size.bytes();
    let ids = plan.ids;
    let mut w = Walker {
        builder: Builder::new(Shape::of(&geometry)),
        old,
        on_change,
        found: Vec::new(),
        outside: plan.outside,
        heal,
        changed: 0,
        healed: 0,
        next: 0,
    };
    let mut read_bytes = 0u64;
    // Two stages: a reader thread reads (and hashes) the next steps while this one walks the
    // blocks of the last, so a read that waits on the device overlaps the walk.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Step>(READ_AHEAD);
    let (back_tx, back_rx) = std::sync::mpsc::channel::<StepBuf>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_steps(src, geometry, plan, &tx, &back_rx));
        let walked = (|| {
            for step in rx.iter() {
                match step {
                    Step::Range(first) => {
                        w.skip_to(first)?;
                        w.hand_on(None, &back_tx)?;
                    }
                    Step::Zeros(from, to) => {
                        for i in from..to {
                            w.block(i, BlockHash::ZERO, None)?;
                            // A long run of zeroed blocks is handed on as it goes.
                            if w.found.len() >= HAND_ON_ENTRIES {
                                w.hand_on(None, &back_tx)?;
                            }
                        }
                        w.hand_on(None, &back_tx)?;
                    }
                    Step::Read {
                        idx,
                        buf,
                        mut leaves,
                        hashed,
                    } => {
                        if !hashed {
                            leaves_of(buf.bytes(), bs as usize, ids, &mut leaves);
                        }
                        let len = buf.len;
                        read_bytes += len as u64;
                        for (k, &leaf) in leaves.iter().enumerate() {
                            let start = k * bs as usize;
                            let block = start..(start + bs as usize).min(len);
                            w.block(idx + k as u64, leaf, Some(block))?;
                        }
                        w.hand_on(Some(buf), &back_tx)?;
                        progress(geometry.offset(idx) + len as u64);
                    }
                }
            }
            Ok::<_, ScanError>(())
        })();
        // Stops the reader if the walk stopped first (waiting to send).
        drop(rx);
        let read = reader.join().unwrap_or(Err(ScanError::ReaderPanicked));
        // The reader's error explains a walk that ended early.
        read.and(walked)
    })?;
    w.skip_to(geometry.blocks())?;
    w.hand_on(None, &back_tx)?;
    progress(geometry.size);
    Ok(DiskScan {
        root: tree::root(&geometry, w.builder.finish()),
        changed: w.changed,
        healed: w.healed,
        read_bytes,
    })
}

/// Changes without bytes collected before they are handed on.
const HAND_ON_ENTRIES: usize = 4096;

/// Steps read ahead of the walk.
const READ_AHEAD: usize = 2;

/// What the reader of a scan hands the walk, in block order.
enum Step {
    /// A read range starts at this block (the blocks before it are not read).
    Range(u64),
    /// Blocks `[from, to)` of a read range are known to be zeros.
    Zeros(u64, u64),
    /// Blocks from `idx` read into `buf`, with their leaves unless `hashed` is false (the
    /// walk hashes them then, while the reader goes on reading).
    Read {
        idx: u64,
        buf: StepBuf,
        leaves: Vec<BlockHash>,
        hashed: bool,
    },
}

/// A read buffer aligned for O_DIRECT, holding `len` bytes.
struct StepBuf {
    backing: Vec<u8>,
    at: usize,
    len: usize,
}

impl StepBuf {
    fn new(capacity: usize) -> StepBuf {
        let backing = vec![0u8; capacity + DIRECT_ALIGN];
        let at = backing
            .as_ptr()
            .align_offset(DIRECT_ALIGN)
            .min(DIRECT_ALIGN);
        StepBuf {
            backing,
            at,
            len: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.backing[self.at..self.at + self.len]
    }
}

/// The reader stage of [`scan_disk`]: walks `plan` and reads its blocks step by step into
/// buffers the walk hands back. Stops quietly when the walk stops listening.
fn read_steps(
    src: &mut (dyn BlockSource + Send),
    geometry: DiskGeometry,
    plan: &ScanPlan,
    out: &std::sync::mpsc::SyncSender<Step>,
    back: &std::sync::mpsc::Receiver<StepBuf>,
) -> Result<(), ScanError> {
    let bs = geometry.block_size.bytes();
    let capacity = READ_BYTES.max(bs) as usize;
    let mut zero = plan.zero.iter().copied().peekable();
    let send = |step: Step| out.send(step).is_ok();
    for &(first, end) in &plan.read {
        if !send(Step::Range(first)) {
            return Ok(());
        }
        let mut idx = first;
        while idx < end {
            while zero.peek().is_some_and(|&(_, zb)| zb <= idx) {
                zero.next();
            }
            let next_zero = zero.peek().copied();
            if let Some((_, zb)) = next_zero.filter(|&(za, _)| za <= idx) {
                if !send(Step::Zeros(idx, zb.min(end))) {
                    return Ok(());
                }
                idx = zb.min(end);
                continue;
            }
            let stop = next_zero.map_or(end, |(za, _)| za.min(end));
            let count = (READ_BYTES / bs).max(1).min(stop - idx);
            let offset = geometry.offset(idx);
            let len = (count * bs).min(geometry.size - offset) as usize;
            // A buffer comes back once the walk and the changes viewing it are done with it;
            // how many are out is bounded by the steps read ahead and the windows of changes
            // in flight.
            let mut buf = back.try_recv().unwrap_or_else(|_| StepBuf::new(capacity));
            buf.len = len;
            let mut leaves = Vec::with_capacity(count as usize);
            let at = buf.at;
            let hashed = src.read_step(
                &mut buf.backing[at..at + len],
                offset,
                bs as usize,
                plan.ids,
                &mut leaves,
            )?;
            if !send(Step::Read {
                idx,
                buf,
                leaves,
                hashed,
            }) {
                return Ok(());
            }
            idx += count;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_clip() {
        let g = DiskGeometry::new(10 * 4096 + 100, 4096).expect("geometry");
        assert_eq!(
            block_ranges(&[(0, 1), (4000, 4097), (9000, 9001)], &g),
            vec![(0, 3)]
        );
        assert_eq!(block_ranges(&[(40960, 41060)], &g), vec![(10, 11)]);
        assert_eq!(block_ranges(&[(0, 1 << 30)], &g), vec![(0, 11)]);
    }

    /// A disk in memory.
    struct Mem(Vec<u8>);

    impl BlockSource for Mem {
        fn read_block_range(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ScanError> {
            let at = offset as usize;
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn a_seed_hands_on_each_nonzero_block_with_its_bytes_viewing_full_steps() {
        let bs = 64 * 1024;
        let step_blocks = (READ_BYTES / bs as u64) as usize;
        // Even steps all data, odd ones two data blocks among zeros, then a short last block;
        // enough steps that read buffers come back and are read into again.
        let steps = 8;
        let size = steps * READ_BYTES as usize + 100;
        let mut bytes = vec![0u8; size];
        let mut x = 7u32;
        let mut fill = |b: &mut [u8]| {
            for v in b {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *v = (x >> 24) as u8;
            }
        };
        let mut want = Vec::new();
        for step in 0..steps {
            let first = step * step_blocks;
            let data: Vec<usize> = if step % 2 == 0 {
                (first..first + step_blocks).collect()
            } else {
                vec![first + 3, first + 9]
            };
            for &b in &data {
                fill(&mut bytes[b * bs..(b + 1) * bs]);
            }
            want.extend(data.iter().map(|&b| b as u64));
        }
        fill(&mut bytes[size - 100..]);
        let g = DiskGeometry::new(size as u64, bs as u64).expect("geometry");
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = crate::state::open(dir.path()).expect("state");
        let mut old = OldLeaves::new(&conn, "vm", None);
        let mut changes = Vec::new();
        let scan = scan_disk(
            &mut Mem(bytes.clone()),
            g,
            &ScanPlan::full(&[(0, size as u64)], &g),
            &mut old,
            &std::collections::HashSet::new(),
            |c| {
                changes.push(c);
                Ok(())
            },
            &|_| {},
        )
        .expect("scan");

        want.push(g.blocks() - 1);
        let got: Vec<u64> = changes.iter().map(|c| c.index).collect();
        assert_eq!(got, want);
        assert_eq!(scan.changed, want.len() as u64);
        for c in &changes {
            let at = c.index as usize * bs;
            let block = &bytes[at..(at + bs).min(size)];
            let data = c.data.as_ref().expect("a data block carries its bytes");
            assert_eq!(&data[..], block, "block {}", c.index);
            assert_eq!(c.leaf, BlockHash::of(block));
        }
        // A step sent whole: its blocks view one buffer, one after another.
        for pair in changes[..step_blocks].windows(2) {
            let (a, b) = (pair[0].data.as_ref(), pair[1].data.as_ref());
            let (a, b) = (a.expect("data"), b.expect("data"));
            assert_eq!(a.as_ptr() as usize + bs, b.as_ptr() as usize);
        }
    }
}
