//! Where a scan reads blocks from ([`BlockSource`]: a raw file or device, or an NBD export)
//! and which blocks it reads ([`ScanPlan`]: the extents that may hold data, in whole blocks).

use super::*;

/// Where a scanner reads block bytes from.
pub trait BlockSource {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_block_range(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ScanError>;

    /// Reads `buf` at `offset` and sets `leaves` to the leaf of each `block`-byte piece of it
    /// (the last may be shorter).
    fn read_leaves(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        block: usize,
        ids: ChunkIds,
        leaves: &mut Vec<BlockHash>,
    ) -> Result<(), ScanError> {
        if !self.read_step(buf, offset, block, ids, leaves)? {
            leaves_of(buf, block, ids, leaves);
        }
        Ok(())
    }

    /// Reads `buf` at `offset`; returns true when it also set `leaves` (sources that spend CPU
    /// on reading hash on the same threads), false when the caller still has to hash.
    fn read_step(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        _block: usize,
        _ids: ChunkIds,
        _leaves: &mut Vec<BlockHash>,
    ) -> Result<bool, ScanError> {
        self.read_block_range(buf, offset)?;
        Ok(false)
    }

    /// Reads many scattered ranges (each at most a block); `deliver(i, bytes)` gets range `i`,
    /// in any order. Sources that can keep several reads in flight do.
    fn read_ranges(
        &mut self,
        ranges: &[(u64, usize)],
        deliver: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), ScanError> {
        let mut buf = Vec::new();
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            buf.resize(len, 0);
            self.read_block_range(&mut buf, offset)?;
            deliver(i, &buf);
        }
        Ok(())
    }
}

impl BlockSource for crate::nbd::NbdClient {
    fn read_block_range(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ScanError> {
        Ok(self.read_at(buf, offset)?)
    }

    fn read_ranges(
        &mut self,
        ranges: &[(u64, usize)],
        deliver: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), ScanError> {
        Ok(self.read_many(ranges, deliver)?)
    }
}

impl BlockSource for RawDisk {
    fn read_block_range(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ScanError> {
        Ok(self.read_at(buf, offset)?)
    }

    /// A read the device does (O_DIRECT) leaves the hashing to the caller, so the next read
    /// is not held up by it. Reads from the page cache are copies: parts of the buffer are
    /// read and hashed on several threads (one thread copying and hashing reaches about half
    /// of what two do).
    fn read_step(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        block: usize,
        ids: ChunkIds,
        leaves: &mut Vec<BlockHash>,
    ) -> Result<bool, ScanError> {
        if self.read_at_direct(buf, offset)? {
            return Ok(false);
        }
        let disk = &*self;
        let part = READ_PART.div_ceil(block).max(1) * block;
        let parts = buf
            .par_chunks_mut(part)
            .enumerate()
            .map(|(k, p)| {
                disk.read_at(p, offset + (k * part) as u64)?;
                Ok(p.chunks(block).map(|b| ids.of(b)).collect::<Vec<_>>())
            })
            .collect::<Result<Vec<_>, DiskError>>()?;
        leaves.clear();
        leaves.extend(parts.into_iter().flatten());
        Ok(true)
    }
}

/// What the blocks outside a plan's read ranges hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outside {
    /// Zeros (a full read: holes and unallocated space).
    Zero,
    /// Whatever they held at the base point (a dirty-bitmap read: clean blocks).
    Unchanged,
}

/// Which blocks a scan reads, as sorted, disjoint block ranges `[first, end)`, and how it
/// names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPlan {
    pub read: Vec<(u64, u64)>,
    /// Blocks inside `read` known to be all zeros: their leaf is zero without reading them.
    pub zero: Vec<(u64, u64)>,
    pub outside: Outside,
    /// How a block's leaf is computed: plain blake3, or keyed for an encrypted VM.
    pub ids: ChunkIds,
}

impl ScanPlan {
    /// A full read of the byte extents that may hold data (everything else is zero).
    pub fn full(extents: &[(u64, u64)], geometry: &DiskGeometry) -> ScanPlan {
        ScanPlan {
            read: block_ranges(extents, geometry),
            zero: Vec::new(),
            outside: Outside::Zero,
            ids: ChunkIds::Plain,
        }
    }

    /// The plan with blocks named by `ids`.
    pub fn named(self, ids: ChunkIds) -> ScanPlan {
        ScanPlan { ids, ..self }
    }
}

/// Block ranges `[first, end)` covering the byte extents, merged.
pub fn block_ranges(extents: &[(u64, u64)], geometry: &DiskGeometry) -> Vec<(u64, u64)> {
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

/// Block ranges `[first, end)` lying entirely inside the byte extents.
pub fn whole_blocks(extents: &[(u64, u64)], geometry: &DiskGeometry) -> Vec<(u64, u64)> {
    let bs = geometry.block_size.bytes();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in extents {
        let a = s.div_ceil(bs);
        // The short last block counts as whole when the extent reaches the end of the disk.
        let b = if e >= geometry.size {
            geometry.blocks()
        } else {
            e / bs
        };
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
