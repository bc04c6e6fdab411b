//! The Merkle tree over a disk's block leaves, and the disk's root.
//!
//! ```text
//!  root = blake3_derive("rewind 2026-11 disk root v1", size_le64 || block_size_le32 || top)
//!                                       top (level L: one node)
//!                     ...                                         ...
//!  level 1:   node(1, leaf[0..F])   node(1, leaf[F..2F])   ...   node(1, leaf[kF..n])
//!  level 0:   leaf[0] leaf[1] ... leaf[n-1]        (leaf = blake3(block), or 0^32 for zeros)
//!
//!  node(l, children) = 0^32 if every child is 0^32,
//!                      else blake3_derive("rewind 2026-11 merkle node v1", l_u8 || children...)
//! ```
//! F is [`TREE_FANOUT`]; the last node of a level may have fewer children. An all-zero subtree
//! is 0^32 at every level, so absent nodes need no storage and a sparse disk costs nothing.
//! The agent builds the tree streaming ([`Builder`]); the receiver updates only the nodes above
//! changed leaves ([`update`]), so a point costs O(changed blocks), never O(disk size).

use crate::format::{DiskGeometry, TREE_FANOUT};
use crate::hash::{BlockHash, DiskRoot, NodeHash};
use std::collections::BTreeMap;

const NODE_CONTEXT: &str = "rewind 2026-11 merkle node v1";
const ROOT_CONTEXT: &str = "rewind 2026-11 disk root v1";

/// The shape of a tree: how many leaves and how many children per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub leaves: u64,
    pub fanout: u64,
}

impl Shape {
    pub fn of(geometry: &DiskGeometry) -> Shape {
        Shape {
            leaves: geometry.blocks(),
            fanout: TREE_FANOUT,
        }
    }

    /// Number of nodes at `level` (level 0 = leaves).
    pub fn count(&self, level: u32) -> u64 {
        let mut n = self.leaves;
        for _ in 0..level {
            n = n.div_ceil(self.fanout);
        }
        n
    }

    /// The level of the single top node (0 when the disk has at most one block).
    pub fn top_level(&self) -> u32 {
        let mut level = 0;
        while self.count(level) > 1 {
            level += 1;
        }
        level
    }
}

/// The hash of one inner node from its children.
pub fn node(level: u32, children: &[NodeHash]) -> NodeHash {
    if children.iter().all(NodeHash::is_zero) {
        return NodeHash::ZERO;
    }
    let mut h = blake3::Hasher::new_derive_key(NODE_CONTEXT);
    h.update(&[level as u8]);
    for c in children {
        h.update(&c.0);
    }
    NodeHash(*h.finalize().as_bytes())
}

/// The root of a disk: its top node bound to its size and block size.
pub fn root(geometry: &DiskGeometry, top: NodeHash) -> DiskRoot {
    let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
    h.update(&geometry.size.to_le_bytes());
    h.update(&geometry.block_size.get().to_le_bytes());
    h.update(&top.0);
    DiskRoot(*h.finalize().as_bytes())
}

/// Builds a tree from leaves pushed in order, holding at most `fanout` leaves per level.
pub struct Builder {
    shape: Shape,
    top: u32,
    pushed: u64,
    levels: Vec<Vec<NodeHash>>,
}

impl Builder {
    pub fn new(shape: Shape) -> Builder {
        let top = shape.top_level();
        Builder {
            shape,
            top,
            pushed: 0,
            levels: (0..=top).map(|_| Vec::new()).collect(),
        }
    }

    /// Adds the next leaf. Leaves past the shape's count are a caller bug and are ignored.
    pub fn push(&mut self, leaf: BlockHash) {
        if self.pushed >= self.shape.leaves {
            return;
        }
        self.pushed += 1;
        self.levels[0].push(leaf.into());
        let mut level = 0;
        while level < self.top && self.levels[level as usize].len() as u64 == self.shape.fanout {
            let n = node(level + 1, &self.levels[level as usize]);
            self.levels[level as usize].clear();
            self.levels[level as usize + 1].push(n);
            level += 1;
        }
    }

    /// Adds `count` zero leaves.
    pub fn push_zeros(&mut self, count: u64) {
        for _ in 0..count {
            self.push(BlockHash::ZERO);
        }
    }

    /// The top node; leaves not pushed count as zeros.
    pub fn finish(mut self) -> NodeHash {
        if self.shape.leaves == 0 {
            return NodeHash::ZERO;
        }
        let missing = self.shape.leaves - self.pushed;
        self.push_zeros(missing);
        for level in 0..self.top {
            let buf = std::mem::take(&mut self.levels[level as usize]);
            if !buf.is_empty() {
                self.levels[level as usize + 1].push(node(level + 1, &buf));
            }
        }
        self.levels[self.top as usize]
            .first()
            .copied()
            .unwrap_or(NodeHash::ZERO)
    }
}

/// Where [`update`] reads and writes the nodes of one version of a tree.
pub trait NodeStore {
    type Error;
    /// The non-zero nodes of `level` with index in `first..end` (absent ones are zero).
    fn children(
        &mut self,
        level: u32,
        first: u64,
        end: u64,
    ) -> Result<Vec<(u64, NodeHash)>, Self::Error>;
    /// Records a node's new value.
    fn put(&mut self, level: u32, index: u64, value: NodeHash) -> Result<(), Self::Error>;
}

/// Recomputes every inner node above the `changed` leaves (which the store already holds in
/// their new values) and returns the new top node. Cost: O(changed × fanout × levels).
pub fn update<S: NodeStore>(
    shape: Shape,
    changed: impl IntoIterator<Item = u64>,
    store: &mut S,
) -> Result<NodeHash, S::Error> {
    if shape.leaves == 0 {
        return Ok(NodeHash::ZERO);
    }
    let top = shape.top_level();
    let mut dirty: Vec<u64> = Vec::new();
    // Leaves past the shape cannot be in the tree: ignored, as `Builder::push` does.
    for i in changed.into_iter().filter(|&i| i < shape.leaves) {
        let p = i / shape.fanout;
        if dirty.last() != Some(&p) {
            dirty.push(p);
        }
    }
    dirty.sort_unstable();
    dirty.dedup();
    for level in 1..=top {
        let below = shape.count(level - 1);
        for &parent in &dirty {
            let first = parent * shape.fanout;
            let end = (first + shape.fanout).min(below);
            let mut kids = vec![NodeHash::ZERO; (end - first) as usize];
            for (i, v) in store.children(level - 1, first, end)? {
                if (first..end).contains(&i) {
                    kids[(i - first) as usize] = v;
                }
            }
            store.put(level, parent, node(level, &kids))?;
        }
        let mut next: Vec<u64> = dirty.iter().map(|p| p / shape.fanout).collect();
        next.dedup();
        dirty = next;
    }
    Ok(store
        .children(top, 0, 1)?
        .into_iter()
        .find(|(i, _)| *i == 0)
        .map(|(_, v)| v)
        .unwrap_or(NodeHash::ZERO))
}

/// A tree held in memory: the reference model for tests and a simple store for small disks.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    pub nodes: BTreeMap<(u32, u64), NodeHash>,
}

impl NodeStore for MemStore {
    type Error = std::convert::Infallible;

    fn children(
        &mut self,
        level: u32,
        first: u64,
        end: u64,
    ) -> Result<Vec<(u64, NodeHash)>, Self::Error> {
        Ok(self
            .nodes
            .range((level, first)..(level, end))
            .map(|(&(_, i), &v)| (i, v))
            .collect())
    }

    fn put(&mut self, level: u32, index: u64, value: NodeHash) -> Result<(), Self::Error> {
        self.nodes.insert((level, index), value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, written as plainly as possible: hash each level in full.
    fn reference_top(shape: Shape, leaves: &[BlockHash]) -> NodeHash {
        if leaves.is_empty() {
            return NodeHash::ZERO;
        }
        let mut level_nodes: Vec<NodeHash> = leaves.iter().map(|&l| l.into()).collect();
        let mut level = 0;
        while level_nodes.len() > 1 {
            level += 1;
            level_nodes = level_nodes
                .chunks(shape.fanout as usize)
                .map(|c| node(level, c))
                .collect();
        }
        level_nodes[0]
    }

    fn leaf_strategy() -> impl Strategy<Value = BlockHash> {
        prop_oneof![
            Just(BlockHash::ZERO),
            any::<u8>().prop_map(|b| BlockHash::of(&[b, 1]))
        ]
    }

    proptest! {
        #[test]
        fn builder_matches_reference(
            fanout in 2u64..6,
            leaves in proptest::collection::vec(leaf_strategy(), 0..300),
        ) {
            let shape = Shape { leaves: leaves.len() as u64, fanout };
            let mut b = Builder::new(shape);
            for l in &leaves { b.push(*l); }
            prop_assert_eq!(b.finish(), reference_top(shape, &leaves));
        }

        #[test]
        fn update_matches_rebuild(
            fanout in 2u64..6,
            initial in proptest::collection::vec(leaf_strategy(), 1..300),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), leaf_strategy()), 0..40),
        ) {
            let shape = Shape { leaves: initial.len() as u64, fanout };
            let mut store = MemStore::default();
            let all: Vec<u64> = (0..shape.leaves).collect();
            for (i, l) in initial.iter().enumerate() {
                store.nodes.insert((0, i as u64), (*l).into());
            }
            let top0 = update(shape, all, &mut store).expect("infallible");
            prop_assert_eq!(top0, reference_top(shape, &initial));

            let mut leaves = initial.clone();
            let mut changed = Vec::new();
            for (idx, l) in edits {
                let i = idx.index(leaves.len());
                leaves[i] = l;
                store.nodes.insert((0, i as u64), l.into());
                changed.push(i as u64);
            }
            let top1 = update(shape, changed, &mut store).expect("infallible");
            prop_assert_eq!(top1, reference_top(shape, &leaves));
        }

        /// A disk that grows keeps its stored nodes; recomputing the old last leaf's path and
        /// the written leaves' paths under the new shape gives the tree of the grown disk
        /// (what the receiver's commit does for a disk resized online).
        #[test]
        fn update_after_growth_matches_rebuild(
            fanout in 2u64..6,
            initial in proptest::collection::vec(leaf_strategy(), 1..200),
            grow in 1usize..300,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), leaf_strategy()), 0..20),
        ) {
            let old = Shape { leaves: initial.len() as u64, fanout };
            let mut store = MemStore::default();
            for (i, l) in initial.iter().enumerate() {
                store.nodes.insert((0, i as u64), (*l).into());
            }
            update(old, 0..old.leaves, &mut store).expect("infallible");

            let mut leaves = initial.clone();
            leaves.resize(initial.len() + grow, BlockHash::ZERO);
            let new = Shape { leaves: leaves.len() as u64, fanout };
            let mut changed = vec![old.leaves - 1];
            for (idx, l) in edits {
                let i = idx.index(leaves.len());
                leaves[i] = l;
                store.nodes.insert((0, i as u64), l.into());
                changed.push(i as u64);
            }
            let top = update(new, changed, &mut store).expect("infallible");
            prop_assert_eq!(top, reference_top(new, &leaves));
        }
    }

    /// The root of fixed leaves, computed from the definition in the module comment with
    /// blake3 alone, and pinned as hex: the format both sides and every stored point rely on.
    #[test]
    fn golden_root() {
        let derive = |context: &str, parts: &[&[u8]]| {
            let mut h = blake3::Hasher::new_derive_key(context);
            for p in parts {
                h.update(p);
            }
            *h.finalize().as_bytes()
        };
        // 300 blocks of 4 KiB, the last one partial: two levels under F = 256.
        let geometry = DiskGeometry::new(299 * 4096 + 100, 4096).expect("geometry");
        let leaf = |i: u64| match i {
            0 => *blake3::hash(b"first block").as_bytes(),
            1..=255 => [0; 32],
            299 => *blake3::hash(b"last block").as_bytes(),
            _ => *blake3::hash(&i.to_le_bytes()).as_bytes(),
        };
        let node = |level: u8, kids: &[[u8; 32]]| {
            let mut parts: Vec<&[u8]> = vec![std::slice::from_ref(&level)];
            parts.extend(kids.iter().map(|k| &k[..]));
            derive("rewind 2026-11 merkle node v1", &parts)
        };
        let first: Vec<[u8; 32]> = (0..256).map(leaf).collect();
        let second: Vec<[u8; 32]> = (256..300).map(leaf).collect();
        let top = node(2, &[node(1, &first), node(1, &second)]);
        let want = derive(
            "rewind 2026-11 disk root v1",
            &[&geometry.size.to_le_bytes(), &4096u32.to_le_bytes(), &top],
        );

        let mut b = Builder::new(Shape::of(&geometry));
        for i in 0..300 {
            b.push(BlockHash(leaf(i)));
        }
        let got = root(&geometry, b.finish());
        assert_eq!(got.0, want);
        assert_eq!(
            hex::encode(got.0),
            "c01d208b12e3d68c9a921103863343fe04f4b507faa63445e1951494cf142e30",
            "the disk root format changed"
        );
        // An all-zero subtree is 0^32, not a hash of zeros.
        assert_eq!(super::node(1, &[NodeHash::ZERO; 2]), NodeHash::ZERO);
    }

    #[test]
    fn zero_subtrees_are_zero() {
        let shape = Shape {
            leaves: 1000,
            fanout: 4,
        };
        let mut b = Builder::new(shape);
        b.push_zeros(1000);
        assert_eq!(b.finish(), NodeHash::ZERO);
    }

    #[test]
    fn root_binds_geometry() {
        let a = DiskGeometry::new(65536, 65536).expect("valid");
        let b = DiskGeometry::new(65535, 65536).expect("valid");
        let c = DiskGeometry::new(65536, 4096).expect("valid");
        let r = |g| root(g, NodeHash::ZERO);
        assert_ne!(r(&a), r(&b));
        assert_ne!(r(&a), r(&c));
    }

    #[test]
    fn shape_levels() {
        let s = Shape {
            leaves: 16 << 20,
            fanout: 256,
        };
        assert_eq!(s.top_level(), 3);
        assert_eq!(s.count(1), 65536);
        assert_eq!(
            Shape {
                leaves: 1,
                fanout: 256
            }
            .top_level(),
            0
        );
        assert_eq!(
            Shape {
                leaves: 257,
                fanout: 256
            }
            .count(1),
            2
        );
    }
}
