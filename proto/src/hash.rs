//! The 32-byte hashes of the format, one type per role: a block's hash ([`BlockHash`], also
//! its chunk's name), a tree node ([`NodeHash`]) and a disk's root ([`DiskRoot`]).

use std::fmt;

/// A hash given as bytes that are not 32 long.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a hash must be 32 bytes, got {0}")]
pub struct BadHashLength(pub usize);

/// Declares a 32-byte hash type: one per role, so a node cannot be passed where a block's hash
/// or a disk's root is meant. Each is all zeros for "nothing" (a hole, an all-zero subtree).
macro_rules! hash32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// All zeros.
            pub const ZERO: $name = $name([0; 32]);

            pub fn is_zero(&self) -> bool {
                self.0 == [0; 32]
            }

            pub fn from_slice(bytes: &[u8]) -> Result<$name, BadHashLength> {
                <[u8; 32]>::try_from(bytes)
                    .map($name)
                    .map_err(|_| BadHashLength(bytes.len()))
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

hash32!(
    /// A block's hash, the tree's leaf and the name of the block's chunk: the blake3 hash of
    /// its bytes, or all zeros for an all-zero block (a hole).
    ///
    /// Zero blocks are never stored, so their hash is a fixed value rather than a hash; a
    /// blake3 output of 32 zero bytes is as unlikely as any other collision.
    BlockHash
);

hash32!(
    /// A node of a disk's Merkle tree at any level (see [`crate::tree`]): at level 0 a block's
    /// hash, above it the hash of its children; the single node of the top level is the
    /// tree's top, which [`crate::tree::root`] binds to the disk's geometry.
    NodeHash
);

hash32!(
    /// A disk's root: the tree's top bound to the disk's size and block size. Equal roots
    /// mean equal disks; this is what a point records and what every restore checks.
    DiskRoot
);

impl BlockHash {
    /// The hash of a block's bytes (zero detection included).
    pub fn of(data: &[u8]) -> BlockHash {
        if is_zero(data) {
            BlockHash::ZERO
        } else {
            BlockHash(*blake3::hash(data).as_bytes())
        }
    }
}

impl From<BlockHash> for NodeHash {
    /// A block's hash is its leaf: the tree's node at level 0.
    fn from(b: BlockHash) -> NodeHash {
        NodeHash(b.0)
    }
}

/// True when every byte is zero; compares eight bytes at a time.
pub fn is_zero(data: &[u8]) -> bool {
    let (chunks, rest) = data.split_at(data.len() - data.len() % 8);
    chunks
        .chunks_exact(8)
        .all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 65536]));
        let mut v = vec![0u8; 65537];
        v[65536] = 1;
        assert!(!is_zero(&v));
        assert_eq!(BlockHash::of(&[0; 100]), BlockHash::ZERO);
        assert_eq!(
            BlockHash::of(b"x"),
            BlockHash(*blake3::hash(b"x").as_bytes())
        );
    }

    #[test]
    fn from_slice_checks_length() {
        assert_eq!(BlockHash::from_slice(&[1; 31]), Err(BadHashLength(31)));
        assert_eq!(BlockHash::from_slice(&[1; 32]), Ok(BlockHash([1; 32])));
    }
}
