//! Every format constant and limit shared by the agent and the receiver, with why it has its value.

use thiserror::Error;

/// Default block size: 64 KiB, QEMU's default dirty-bitmap granularity, so a bitmap bit and a
/// block are the same thing.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Smallest block size: 4 KiB, the page and sector size below which metadata outweighs data.
pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
/// Largest block size: 4 MiB keeps one block (and its chunk) well inside one gRPC message.
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;
/// Largest disk: 64 TiB, far above any VM disk we protect; bounds block indexes to 2^34 at 4 KiB.
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Most disks per VM: QEMU machines rarely pass a few dozen.
pub const MAX_DISKS: usize = 64;
/// Target uncompressed payload of one upload batch: large enough to amortise a round trip and
/// an fsync, small enough to keep memory bounded.
pub const BATCH_TARGET_BYTES: usize = 4 * 1024 * 1024;
/// Most block entries in one batch (4 MiB batches of 4 KiB blocks need 1024; metadata-only
/// batches of an unchanged-but-moved disk may carry many more).
pub const MAX_BATCH_ENTRIES: usize = 65_536;
/// Largest encoded gRPC message either side accepts: a batch of compressed chunks may exceed its
/// uncompressed target when data does not compress (zstd adds a few bytes per frame).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Longest stored frame of a block of `block_len` bytes: zstd's worst-case bound for that
/// length (an incompressible block stored as raw zstd blocks plus frame and block headers). A
/// frame of an honest agent never exceeds it; ingest refuses longer ones and every reader
/// refuses catalog rows that claim more, so a frame padded with skippable frames or trailing
/// bytes can neither be stored nor make a read slow.
pub const fn max_frame_len(block_len: usize) -> usize {
    // ZSTD_COMPRESSBOUND from zstd.h (1.5): srcSize + srcSize/256 + margin for small inputs.
    let margin = if block_len < (128 << 10) {
        ((128 << 10) - block_len) >> 11
    } else {
        0
    };
    block_len + (block_len >> 8) + margin
}
/// Longest frame of any block: [`max_frame_len`] of [`MAX_BLOCK_SIZE`].
pub const MAX_FRAME_BYTES: usize = max_frame_len(MAX_BLOCK_SIZE as usize);
/// Most hashes in one MissingChunks question.
pub const MAX_QUERY_HASHES: usize = 65_536;
/// Most chunks in one ReadChunks answer: 64 blocks of 64 KiB keep a reply near 4 MiB.
pub const MAX_READ_CHUNKS: usize = 64;
/// Most frame bytes in one ReadChunks answer: well under [`MAX_MESSAGE_BYTES`] with room for
/// the message's framing. An agent asks for at most this much by the worst-case frame length
/// of its block size ([`max_frame_len`]); the receiver refuses a question whose frames exceed
/// it before reading any of them.
pub const MAX_READ_REPLY_BYTES: usize = 12 << 20;
/// Most leaves in one PointBlocks page.
pub const MAX_POINT_BLOCKS_PAGE: u32 = 65_536;
/// Largest VM configuration kept with a point: a QEMU description of a big VM is a few KiB.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// zstd level for chunks: level 1 runs ~630 MB/s per core here, level 3 ~390 MB/s; compression
/// is the bottleneck of a seed, and level 1 loses little ratio on disk images.
pub const ZSTD_LEVEL: i32 = 1;
/// HTTP/2 flow-control window for one stream and for a connection: hyper's 1 MiB default caps one
/// stream near 20 MB/s at 50 ms RTT; 32 MiB fills 1 Gbit/s there (PBS uses the same).
pub const H2_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// Fan-out of the Merkle tree: 256 children of 32 bytes hash 8 KiB per node; a 1 TiB disk at
/// 64 KiB blocks (16 M leaves) needs three levels above its leaves.
pub const TREE_FANOUT: u64 = 256;

/// A block size that is not a power of two between 4 KiB and 4 MiB.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("block size {0} is not a power of two between 4 KiB and 4 MiB")]
pub struct BadBlockSize(pub u64);

/// A validated block size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BlockSize(u32);

impl BlockSize {
    /// Accepts powers of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`].
    pub fn new(bytes: u64) -> Result<Self, BadBlockSize> {
        if bytes.is_power_of_two()
            && (MIN_BLOCK_SIZE as u64..=MAX_BLOCK_SIZE as u64).contains(&bytes)
        {
            Ok(Self(bytes as u32))
        } else {
            Err(BadBlockSize(bytes))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self(DEFAULT_BLOCK_SIZE)
    }
}

/// The shape of a disk: its size and block size, and what follows from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskGeometry {
    pub size: u64,
    pub block_size: BlockSize,
}

/// A geometry outside the limits.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BadGeometry {
    /// The block size is not allowed.
    #[error(transparent)]
    BlockSize(#[from] BadBlockSize),
    /// The disk is larger than Rewind supports.
    #[error("disk size {0} exceeds the limit of 64 TiB")]
    TooLarge(u64),
}

impl DiskGeometry {
    pub fn new(size: u64, block_size: u64) -> Result<Self, BadGeometry> {
        let block_size = BlockSize::new(block_size)?;
        if size > MAX_DISK_SIZE {
            return Err(BadGeometry::TooLarge(size));
        }
        Ok(Self { size, block_size })
    }

    /// Number of blocks (the last one may be shorter than the block size).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size.bytes())
    }

    /// Byte offset of a block.
    pub fn offset(&self, index: u64) -> u64 {
        index * self.block_size.bytes()
    }

    /// Length in bytes of block `index`, or `None` past the end of the disk.
    pub fn block_len(&self, index: u64) -> Option<usize> {
        let start = index.checked_mul(self.block_size.bytes())?;
        if start >= self.size {
            return None;
        }
        Some((self.size - start).min(self.block_size.bytes()) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes() {
        assert!(BlockSize::new(4096).is_ok());
        assert!(BlockSize::new(4 << 20).is_ok());
        assert_eq!(BlockSize::new(2048), Err(BadBlockSize(2048)));
        assert_eq!(BlockSize::new(65535), Err(BadBlockSize(65535)));
        assert_eq!(BlockSize::new(8 << 20), Err(BadBlockSize(8 << 20)));
    }

    #[test]
    fn frame_bound_is_zstds_own() {
        for len in [1usize, 4096, 65_536, 100_000, 128 << 10, 4 << 20] {
            assert_eq!(
                max_frame_len(len),
                zstd::zstd_safe::compress_bound(len),
                "{len}"
            );
        }
    }

    #[test]
    fn geometry_last_block_is_short() {
        let g = DiskGeometry::new(65536 * 2 + 100, 65536).expect("valid");
        assert_eq!(g.blocks(), 3);
        assert_eq!(g.block_len(0), Some(65536));
        assert_eq!(g.block_len(2), Some(100));
        assert_eq!(g.block_len(3), None);
        assert_eq!(g.block_len(u64::MAX), None);
        assert_eq!(DiskGeometry::new(0, 65536).expect("valid").blocks(), 0);
        assert!(matches!(
            DiskGeometry::new(MAX_DISK_SIZE + 1, 65536),
            Err(BadGeometry::TooLarge(_))
        ));
    }
}
