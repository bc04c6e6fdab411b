//! The 32-byte value of one block in a disk's Merkle tree.

use std::fmt;

/// A block's leaf: the blake3 hash of its bytes, or all zeros for an all-zero block (a hole).
///
/// Zero blocks are never stored, so their leaf is a fixed value rather than a hash; a blake3
/// output of 32 zero bytes is as unlikely as any other collision.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Leaf(pub [u8; 32]);

/// A hash given as bytes that are not 32 long.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a hash must be 32 bytes, got {0}")]
pub struct BadHashLength(pub usize);

impl Leaf {
    /// The leaf of an all-zero block.
    pub const ZERO: Leaf = Leaf([0; 32]);

    /// The leaf of a block's bytes (zero detection included).
    pub fn of(data: &[u8]) -> Leaf {
        if is_zero(data) {
            Leaf::ZERO
        } else {
            Leaf(*blake3::hash(data).as_bytes())
        }
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Leaf, BadHashLength> {
        <[u8; 32]>::try_from(bytes)
            .map(Leaf)
            .map_err(|_| BadHashLength(bytes.len()))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Leaf({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
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
        assert_eq!(Leaf::of(&[0; 100]), Leaf::ZERO);
        assert_eq!(Leaf::of(b"x"), Leaf(*blake3::hash(b"x").as_bytes()));
    }

    #[test]
    fn from_slice_checks_length() {
        assert_eq!(Leaf::from_slice(&[1; 31]), Err(BadHashLength(31)));
        assert_eq!(Leaf::from_slice(&[1; 32]), Ok(Leaf([1; 32])));
    }
}
