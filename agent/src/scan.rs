//! Hash-scan change detection: read every block of a raw disk that can hold data, compute its
//! leaf, compare with the leaf at the base point, and report the blocks that differ. Holes are
//! never read; all-zero blocks are never sent. Builds the disk's Merkle root on the way.

use crate::source::{DiskError, RawDisk};
use crate::state::OldLeaves;
use rewind_proto::format::DiskGeometry;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::Leaf;
use thiserror::Error;

/// Bytes read per system call: large sequential reads, bounded memory.
const READ_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum ScanError {
    /// Reading the disk failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Reading the base point's leaves failed.
    #[error("agent state: {0}")]
    State(#[from] rusqlite::Error),
    /// The consumer of changes stopped (the upload failed).
    #[error("upload stopped")]
    Stopped,
}

/// One block that differs from the base point: its new leaf and, unless it is all zeros, its
/// bytes.
#[derive(Debug)]
pub struct Change {
    pub index: u64,
    pub leaf: Leaf,
    pub data: Option<Vec<u8>>,
}

/// What a scan found.
#[derive(Debug, Clone, Copy)]
pub struct DiskScan {
    pub root: Leaf,
    pub changed: u64,
    pub read_bytes: u64,
}

/// Block ranges `[first, end)` covering the byte extents, merged.
fn block_ranges(extents: &[(u64, u64)], geometry: &DiskGeometry) -> Vec<(u64, u64)> {
    let bs = geometry.block_size.bytes();
    let n = geometry.blocks();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in extents {
        let (a, b) = (s / bs, e.div_ceil(bs).min(n));
        if a >= b {
            continue;
        }
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Scans `disk` against `old`, calling `on_change` for each differing block in index order
/// (blocks that became holes are reported when passed).
pub fn scan_disk(
    disk: &RawDisk,
    geometry: DiskGeometry,
    old: &mut OldLeaves<'_>,
    mut on_change: impl FnMut(Change) -> Result<(), ScanError>,
    progress: &dyn Fn(u64),
) -> Result<DiskScan, ScanError> {
    let bs = geometry.block_size.bytes();
    let ranges = block_ranges(&disk.data_extents()?, &geometry);
    let mut builder = Builder::new(Shape::of(&geometry));
    let mut changed = 0u64;
    let mut read_bytes = 0u64;
    let mut next = 0u64;
    let mut buf = vec![0u8; READ_BYTES.max(bs) as usize];
    let mut zeroed = Vec::new();

    for (first, end) in ranges {
        builder.push_zeros(first - next);
        let mut idx = first;
        while idx < end {
            let count = ((READ_BYTES / bs).max(1)).min(end - idx);
            let offset = geometry.offset(idx);
            let len = (count * bs).min(geometry.size - offset) as usize;
            disk.read_at(&mut buf[..len], offset)?;
            read_bytes += len as u64;
            for k in 0..count {
                let i = idx + k;
                let blen = geometry.block_len(i).unwrap_or(0);
                let start = (k * bs) as usize;
                let data = &buf[start..start + blen];
                let leaf = Leaf::of(data);
                let before = old.leaf_at(i, |j, _| zeroed.push(j))?;
                for j in zeroed.drain(..) {
                    changed += 1;
                    on_change(Change {
                        index: j,
                        leaf: Leaf::ZERO,
                        data: None,
                    })?;
                }
                builder.push(leaf);
                if leaf != before {
                    changed += 1;
                    on_change(Change {
                        index: i,
                        leaf,
                        data: (!leaf.is_zero()).then(|| data.to_vec()),
                    })?;
                }
            }
            idx += count;
            progress(offset + len as u64);
        }
        next = end;
    }
    builder.push_zeros(geometry.blocks() - next);
    // Old data past the last extent is now a hole.
    old.leaf_at(geometry.blocks(), |j, _| zeroed.push(j))?;
    for j in zeroed.drain(..) {
        changed += 1;
        on_change(Change {
            index: j,
            leaf: Leaf::ZERO,
            data: None,
        })?;
    }
    progress(geometry.size);
    Ok(DiskScan {
        root: tree::root(&geometry, builder.finish()),
        changed,
        read_bytes,
    })
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
}
