//! Which blocks of the disk differ from the point: a merge, in block order, of the disk's
//! current content with the point's leaves (and, with dirty bitmaps, with the agent's own
//! last point), so that nothing held grows with the disk.

use super::leaves::LeafStream;
use super::target::Target;
use super::RollbackError;
use crate::scan::BlockSource;
use rewind_proto::crypt::ChunkIds;
use rewind_proto::format::DiskGeometry;
use rewind_proto::{BlockHash, DiskRoot};

/// Bytes read at once in a full compare.
const READ_STEP: u64 = 4 << 20;

/// Candidate blocks read together (several in flight).
const CANDIDATES_PER_READ: usize = 256;

/// Which blocks a compare reads.
pub(super) enum Scope {
    /// Every block that may hold data.
    Full,
    /// Only blocks that can differ: those the dirty bitmaps name (ranges of blocks, ordered),
    /// and those where the agent's last point (`base`, when it is not the target) and the
    /// target differ.
    Candidates {
        dirty: Vec<(u64, u64)>,
        base: Option<LeafStream>,
    },
}

impl Scope {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Scope::Full => "full read",
            Scope::Candidates { .. } => "dirty bitmap + point chain",
        }
    }
}

/// What a compare found: how many blocks differ, the bytes it read, and the root of the
/// point's leaves (`None` if it stopped early).
pub(super) struct Compared {
    pub differing: u64,
    pub read: u64,
    pub root: Option<DiskRoot>,
}

/// Compares the disk with the point's leaves `want`. Each differing block goes to `found`
/// with the point's leaf for it (`None`: zero) as soon as it is known; the compare stops early
/// once `found` returns false (nobody wants the rest).
pub(super) fn compare(
    target: &mut Target,
    g: &DiskGeometry,
    want: LeafStream,
    scope: Scope,
    ids: ChunkIds,
    found: &mut dyn FnMut(u64, Option<BlockHash>) -> bool,
) -> Result<Compared, RollbackError> {
    let mut t = Tally::new(ids, found);
    match scope {
        Scope::Full => {
            let plan = target.plan(g)?;
            compare_full(target.source(), g, &plan.read, want, &mut t)
        }
        Scope::Candidates { dirty, base } => {
            compare_candidates(target.source(), g, want, base, &dirty, &mut t)
        }
    }
}

/// Counts differing blocks on their way to the caller's `found`.
struct Tally<'a> {
    differing: u64,
    read: u64,
    /// How the point names blocks (keyed for an encrypted VM).
    ids: ChunkIds,
    found: &'a mut dyn FnMut(u64, Option<BlockHash>) -> bool,
}

impl<'a> Tally<'a> {
    fn differs(&mut self, i: u64, leaf: Option<BlockHash>) -> bool {
        self.differing += 1;
        (self.found)(i, leaf)
    }

    fn new(ids: ChunkIds, found: &'a mut dyn FnMut(u64, Option<BlockHash>) -> bool) -> Tally<'a> {
        Tally {
            differing: 0,
            read: 0,
            ids,
            found,
        }
    }

    fn done(&self, root: Option<DiskRoot>) -> Compared {
        Compared {
            differing: self.differing,
            read: self.read,
            root,
        }
    }
}

/// Reads the block ranges `read` (every block that may hold data); blocks outside them are
/// zero now and differ where the point has data.
fn compare_full(
    src: &mut dyn BlockSource,
    g: &DiskGeometry,
    read: &[(u64, u64)],
    mut want: LeafStream,
    t: &mut Tally<'_>,
) -> Result<Compared, RollbackError> {
    let bs = g.block_size.bytes();
    let mut buf = vec![0u8; READ_STEP.max(bs) as usize];
    let mut leaves = Vec::new();
    for &(first, end) in read {
        if !want.drain_below(first, &mut |i, l| t.differs(i, Some(l)))? {
            return Ok(t.done(None));
        }
        let mut idx = first;
        while idx < end {
            let count = (READ_STEP / bs).max(1).min(end - idx);
            let off = g.offset(idx);
            let len = (count * bs).min(g.size - off) as usize;
            src.read_leaves(&mut buf[..len], off, bs as usize, t.ids, &mut leaves)?;
            t.read += len as u64;
            for (k, now) in leaves.iter().enumerate() {
                let i = idx + k as u64;
                let leaf = want.leaf_at(i)?;
                if *now != leaf.unwrap_or(BlockHash::ZERO) && !t.differs(i, leaf) {
                    return Ok(t.done(None));
                }
            }
            idx += count;
        }
    }
    if !want.drain_below(g.blocks(), &mut |i, l| t.differs(i, Some(l)))? {
        return Ok(t.done(None));
    }
    let root = want.root()?;
    Ok(t.done(Some(root)))
}

/// Reads only the candidate blocks, found by merging the dirty ranges, the point's leaves and
/// (when given) the agent's last point's leaves in block order: a block is a candidate when a
/// bitmap names it or the two points differ there.
fn compare_candidates(
    src: &mut dyn BlockSource,
    g: &DiskGeometry,
    mut want: LeafStream,
    mut base: Option<LeafStream>,
    dirty: &[(u64, u64)],
    t: &mut Tally<'_>,
) -> Result<Compared, RollbackError> {
    let mut batch: Vec<(u64, Option<BlockHash>)> = Vec::with_capacity(CANDIDATES_PER_READ);
    let mut dirty = dirty.iter().copied().peekable();
    let mut cursor = 0u64;
    loop {
        while dirty.next_if(|r| r.1 <= cursor).is_some() {}
        let next_dirty = dirty.peek().map(|r| r.0.max(cursor));
        let next_base = match base.as_mut() {
            Some(b) => b.peek()?,
            None => None,
        };
        let Some(i) = [next_dirty, want.peek()?, next_base]
            .into_iter()
            .flatten()
            .min()
            .filter(|&i| i < g.blocks())
        else {
            break;
        };
        let leaf = want.leaf_at(i)?;
        let changed = match base.as_mut() {
            Some(b) => b.leaf_at(i)? != leaf,
            None => false,
        };
        if changed || next_dirty == Some(i) {
            batch.push((i, leaf));
            if batch.len() >= CANDIDATES_PER_READ && !read_candidates(src, g, &mut batch, t)? {
                return Ok(t.done(None));
            }
        }
        cursor = i + 1;
    }
    if !read_candidates(src, g, &mut batch, t)? {
        return Ok(t.done(None));
    }
    let root = want.root()?;
    Ok(t.done(Some(root)))
}

/// Reads the blocks of `batch` (several in flight) and hands on those that differ from the
/// point's leaf; empties the batch. False once nobody wants more.
fn read_candidates(
    src: &mut dyn BlockSource,
    g: &DiskGeometry,
    batch: &mut Vec<(u64, Option<BlockHash>)>,
    t: &mut Tally<'_>,
) -> Result<bool, RollbackError> {
    let ranges: Vec<(u64, usize)> = batch
        .iter()
        .map(|&(i, _)| (g.offset(i), g.block_len(i).unwrap_or(0)))
        .collect();
    t.read += ranges.iter().map(|r| r.1 as u64).sum::<u64>();
    let mut wanted = true;
    src.read_ranges(&ranges, &mut |k, bytes| {
        let (i, leaf) = batch[k];
        if wanted && t.ids.of(bytes) != leaf.unwrap_or(BlockHash::ZERO) {
            wanted = t.differs(i, leaf);
        }
    })?;
    batch.clear();
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RawDisk;
    use std::os::unix::fs::FileExt;

    const BS: u64 = 4096;
    const BLOCKS: u64 = 64;

    fn geometry() -> DiskGeometry {
        DiskGeometry::new(BLOCKS * BS, BS).expect("geometry")
    }

    /// A disk whose block i holds byte `content[i]` throughout (0: a hole).
    fn disk(dir: &std::path::Path, content: &[u8]) -> RawDisk {
        let path = dir.join("disk.raw");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(BLOCKS * BS).expect("size");
        for (i, &c) in content.iter().enumerate() {
            if c != 0 {
                f.write_all_at(&[c; BS as usize], i as u64 * BS)
                    .expect("write");
            }
        }
        RawDisk::open(&path).expect("open")
    }

    fn leaf(c: u8) -> BlockHash {
        BlockHash::of(&[c; BS as usize])
    }

    fn point(content: &[u8]) -> Vec<(u64, BlockHash)> {
        content
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != 0)
            .map(|(i, &c)| (i as u64, leaf(c)))
            .collect()
    }

    fn run(
        scope: impl FnOnce(
            &mut dyn BlockSource,
            LeafStream,
            &mut dyn FnMut(u64, Option<BlockHash>) -> bool,
        ) -> Result<Compared, RollbackError>,
        src: &mut RawDisk,
        want: &[u8],
    ) -> (Vec<(u64, Option<BlockHash>)>, Compared) {
        let mut found = Vec::new();
        let c = scope(
            src,
            LeafStream::of(&geometry(), point(want)),
            &mut |i, l| {
                found.push((i, l));
                true
            },
        )
        .expect("compared");
        found.sort_unstable_by_key(|f| f.0);
        (found, c)
    }

    #[test]
    fn a_full_compare_finds_exactly_the_differing_blocks_and_the_points_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let g = geometry();
        let mut now = vec![0u8; BLOCKS as usize];
        now[1] = 7;
        now[2] = 8;
        now[40] = 9;
        let mut want = now.clone();
        want[2] = 5; // rewritten
        want[40] = 0; // written since (the point has zero there)
        want[63] = 4; // a hole now
        want[10] = 3;
        let mut src = disk(tmp.path(), &now);
        let read = vec![(0, BLOCKS)];
        let (found, c) = run(
            |s, w, f| compare_full(s, &g, &read, w, &mut Tally::new(ChunkIds::Plain, f)),
            &mut src,
            &want,
        );
        assert_eq!(
            found,
            vec![
                (2, Some(leaf(5))),
                (10, Some(leaf(3))),
                (40, None),
                (63, Some(leaf(4)))
            ]
        );
        assert_eq!(c.differing, 4);
        assert_eq!(c.read, BLOCKS * BS);
        let whole = LeafStream::of(&g, point(&want)).root().expect("root");
        assert_eq!(c.root, Some(whole));

        // Only blocks 0..3 and 40..41 read: the rest is taken as zero.
        let (found, c) = run(
            |s, w, f| {
                compare_full(
                    s,
                    &g,
                    &[(0, 3), (40, 41)],
                    w,
                    &mut Tally::new(ChunkIds::Plain, f),
                )
            },
            &mut src,
            &want,
        );
        assert_eq!(
            found.iter().map(|f| f.0).collect::<Vec<_>>(),
            vec![2, 10, 40, 63]
        );
        assert_eq!(c.read, 4 * BS);

        // Nobody wants more after the first: the compare stops without a root.
        let mut calls = 0;
        let c = compare_full(
            &mut src,
            &g,
            &read,
            LeafStream::of(&g, point(&want)),
            &mut Tally::new(ChunkIds::Plain, &mut |_, _| {
                calls += 1;
                false
            }),
        )
        .expect("compared");
        assert_eq!((calls, c.root), (1, None));
    }

    #[test]
    fn a_candidate_compare_reads_only_dirty_blocks_and_where_the_points_differ() {
        let tmp = tempfile::tempdir().expect("tmp");
        let g = geometry();
        // The agent's last point; since then blocks 5 and 6 were written (dirty).
        let mut base = vec![0u8; BLOCKS as usize];
        base[3] = 1;
        base[20] = 2;
        let mut now = base.clone();
        now[5] = 9;
        now[6] = 0; // written with zeros
        let mut src = disk(tmp.path(), &now);
        // The target differs from the base at 3 (content) and 30 (data where base has none);
        // at 20 the disk was never touched.
        let mut want = base.clone();
        want[3] = 4;
        want[30] = 6;
        let dirty = vec![(5, 7)];
        let (found, c) = run(
            |s, w, f| {
                let base = Some(LeafStream::of(&g, point(&base)));
                compare_candidates(s, &g, w, base, &dirty, &mut Tally::new(ChunkIds::Plain, f))
            },
            &mut src,
            &want,
        );
        assert_eq!(
            found,
            vec![(3, Some(leaf(4))), (5, None), (30, Some(leaf(6)))]
        );
        // Read: 3, 5, 6, 30.
        assert_eq!(c.read, 4 * BS);
        assert_eq!(
            c.root,
            Some(LeafStream::of(&g, point(&want)).root().expect("root"))
        );

        // Rolling back to the last point itself: only the dirty blocks.
        let (found, c) = run(
            |s, w, f| {
                compare_candidates(s, &g, w, None, &dirty, &mut Tally::new(ChunkIds::Plain, f))
            },
            &mut src,
            &base,
        );
        assert_eq!(found, vec![(5, None)]);
        assert_eq!(c.read, 2 * BS);
    }
}
