//! The stored form of one block: a zstd frame of its bytes, addressed by the blake3 hash of the
//! bytes. Decompression is bounded by the expected length, so a hostile frame cannot balloon.

use crate::crypt::ChunkIds;
use crate::format::{max_frame_len, ZSTD_LEVEL};
use crate::hash::BlockHash;
use thiserror::Error;

/// Why a chunk was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChunkError {
    /// The frame is not valid zstd, or it inflates past the expected length.
    #[error("chunk {hash} does not decompress to at most {expected} bytes")]
    Undecodable { hash: BlockHash, expected: usize },
    /// The data decompressed to a different length than its block has.
    #[error("chunk {hash} holds {got} bytes, its block has {expected}")]
    WrongLength {
        hash: BlockHash,
        got: usize,
        expected: usize,
    },
    /// The data does not hash to the name it was sent under.
    #[error("chunk sent as {claimed} hashes to {actual}")]
    WrongHash {
        claimed: BlockHash,
        actual: BlockHash,
    },
    /// The frame is longer than any honest encoding of its block, or is not exactly one zstd
    /// frame (padding, skippable frames or bytes after it): stored, it would make every read
    /// of the block slower, or fail where readers enforce the bound.
    #[error("chunk {hash}: a frame of {len} bytes is not one zstd frame of at most {max} bytes")]
    NotCanonical {
        hash: BlockHash,
        len: usize,
        max: usize,
    },
    /// All-zero blocks are holes and never stored as chunks.
    #[error("an all-zero block was sent as a chunk")]
    ZeroChunk,
    /// An encrypted chunk whose length or version no envelope of its block can have.
    #[error("encrypted chunk {hash}: an envelope of {len} bytes is not version 1 of at most {max} bytes")]
    BadEnvelope {
        hash: BlockHash,
        len: usize,
        max: usize,
    },
    /// An encrypted chunk whose bytes differ from those its check hash was made over: damaged
    /// since it was sealed (found without any key).
    #[error("encrypted chunk {hash} is damaged: its check hash does not match its bytes")]
    CheckFailed { hash: BlockHash },
    /// An encrypted chunk sealed under a data key this keyring does not hold.
    #[error(
        "encrypted chunk {hash} was sealed with data key {key}, which this key file does not hold"
    )]
    OtherKey { hash: BlockHash, key: String },
    /// An encrypted chunk that does not decrypt with this key: the wrong key, or bytes changed
    /// by someone who also rewrote the check hash.
    #[error("encrypted chunk {hash} does not decrypt with this key (wrong key, or tampered with)")]
    Unauthentic { hash: BlockHash },
    /// An encrypted chunk read without its key.
    #[error("chunk {hash} is encrypted: its key is needed to read it")]
    NeedsKey { hash: BlockHash },
}

thread_local! {
    // A compression context costs more to create than a 64 KiB block costs to compress.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses a block's bytes into its stored form.
///
/// The frame is built in a buffer the thread keeps and returned as an exact-size copy: a
/// fresh worst-case-size buffer per block costs more (the allocator hands out fresh pages the
/// kernel must clear) than copying the frame out.
pub fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        SCRATCH.with(|scratch| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
            }
            let Some(c) = c.as_mut() else {
                return zstd::bulk::compress(data, ZSTD_LEVEL);
            };
            let mut out = scratch.borrow_mut();
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            c.compress_to_buffer(data, &mut *out)?;
            Ok(out.to_vec())
        })
    })
}

/// Decompresses a stored chunk into `out` and checks that it fills `out` exactly and hashes to
/// `hash`: [`open`] without a buffer per chunk. Ingest and every reader decode through here,
/// so all of them refuse a frame that is not in the stored form ([`check_canonical`]).
pub fn open_into(hash: BlockHash, frame: &[u8], out: &mut [u8]) -> Result<(), ChunkError> {
    open_keyed(hash, frame, out, &ChunkIds::Plain)
}

/// [`open_into`] for a block named by `ids` (a keyring's keyed hash, or plain blake3).
pub fn open_keyed(
    hash: BlockHash,
    frame: &[u8],
    out: &mut [u8],
    ids: &ChunkIds,
) -> Result<(), ChunkError> {
    let expected = out.len();
    if hash.is_zero() {
        return Err(ChunkError::ZeroChunk);
    }
    check_canonical(hash, frame, expected)?;
    let got = DECOMPRESSOR
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new()?);
            }
            match d.as_mut() {
                Some(d) => d.decompress_to_buffer(frame, &mut *out),
                None => zstd::bulk::decompress_to_buffer(frame, &mut *out),
            }
        })
        .map_err(|_| ChunkError::Undecodable { hash, expected })?;
    if got != expected {
        return Err(ChunkError::WrongLength {
            hash,
            got,
            expected,
        });
    }
    let actual = ids.of(out);
    if actual != hash {
        return Err(ChunkError::WrongHash {
            claimed: hash,
            actual,
        });
    }
    Ok(())
}

/// Checks that `frame` is in the stored form of a block of `block_len` bytes: exactly one zstd
/// frame, no longer than [`max_frame_len`]. (zstd decodes a frame followed by skippable frames
/// to the same bytes, so decoding alone does not show this.)
pub fn check_canonical(hash: BlockHash, frame: &[u8], block_len: usize) -> Result<(), ChunkError> {
    let max = max_frame_len(block_len);
    let refused = || ChunkError::NotCanonical {
        hash,
        len: frame.len(),
        max,
    };
    if frame.len() > max {
        return Err(refused());
    }
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(n) if n == frame.len() => Ok(()),
        Ok(_) => Err(refused()),
        Err(_) => Err(ChunkError::Undecodable {
            hash,
            expected: block_len,
        }),
    }
}

/// Checks that a chunk as sent is in its stored form ([`check_canonical`]) and decompresses
/// to exactly `expected` bytes hashing to `hash`, decompressing into a buffer the thread keeps.
pub fn verify(hash: BlockHash, frame: &[u8], expected: usize) -> Result<(), ChunkError> {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        if buf.len() < expected {
            buf.resize(expected, 0);
        }
        open_into(hash, frame, &mut buf[..expected])
    })
}

/// Decompresses a stored chunk and checks that it is exactly `expected` bytes hashing to `hash`.
pub fn open(hash: BlockHash, frame: &[u8], expected: usize) -> Result<Vec<u8>, ChunkError> {
    let mut data = vec![0u8; expected];
    open_into(hash, frame, &mut data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(data in proptest::collection::vec(any::<u8>(), 1..20_000)) {
            prop_assume!(!crate::hash::is_zero(&data));
            let leaf = BlockHash::of(&data);
            let frame = compress(&data).expect("compress");
            prop_assert_eq!(&open(leaf, &frame, data.len()).expect("open"), &data);
            let mut out = vec![0u8; data.len()];
            open_into(leaf, &frame, &mut out).expect("open_into");
            prop_assert_eq!(&out, &data);
            prop_assert_eq!(verify(leaf, &frame, data.len()), Ok(()));
        }
    }

    #[test]
    fn only_one_bounded_frame_is_canonical() {
        let data: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 251) as u8).collect();
        let leaf = BlockHash::of(&data);
        let frame = compress(&data).expect("compress");
        assert_eq!(verify(leaf, &frame, data.len()), Ok(()));
        // A skippable frame after it: decodes to the same bytes, refused.
        let mut padded = frame.clone();
        padded.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        padded.extend_from_slice(&16u32.to_le_bytes());
        padded.extend_from_slice(&[0u8; 16]);
        assert_eq!(
            zstd::bulk::decompress(&padded, data.len()).expect("zstd decodes it"),
            data
        );
        assert!(matches!(
            verify(leaf, &padded, data.len()),
            Err(ChunkError::NotCanonical { .. })
        ));
        assert!(matches!(
            open(leaf, &padded, data.len()),
            Err(ChunkError::NotCanonical { .. })
        ));
        // Trailing garbage, and a truncated frame.
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(matches!(
            verify(leaf, &trailing, data.len()),
            Err(ChunkError::NotCanonical { .. })
        ));
        assert!(matches!(
            verify(leaf, &frame[..frame.len() - 1], data.len()),
            Err(ChunkError::Undecodable { .. })
        ));
        // A valid frame of the right content that is longer than the bound (a padded frame
        // that hides its padding inside: many tiny raw blocks).
        let long = vec![0u8; max_frame_len(data.len()) + 1];
        assert!(matches!(
            check_canonical(leaf, &long, data.len()),
            Err(ChunkError::NotCanonical { .. })
        ));
        // Incompressible data compresses to within the bound.
        let noise: Vec<u8> = (0..65_536u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        let f = compress(&noise).expect("compress");
        assert_eq!(verify(BlockHash::of(&noise), &f, noise.len()), Ok(()));
    }

    #[test]
    fn refuses_bad_chunks() {
        let data = vec![7u8; 5000];
        let leaf = BlockHash::of(&data);
        let frame = compress(&data).expect("compress");
        assert_eq!(
            open(leaf, &frame, 4000),
            Err(ChunkError::Undecodable {
                hash: leaf,
                expected: 4000
            })
        );
        assert_eq!(
            open(leaf, &frame, 6000),
            Err(ChunkError::WrongLength {
                hash: leaf,
                got: 5000,
                expected: 6000
            })
        );
        let other = BlockHash::of(b"other");
        assert!(matches!(
            open(other, &frame, 5000),
            Err(ChunkError::WrongHash { .. })
        ));
        assert!(matches!(
            open(leaf, b"not zstd", 5000),
            Err(ChunkError::Undecodable { .. })
        ));
        assert_eq!(
            open(BlockHash::ZERO, &frame, 5000),
            Err(ChunkError::ZeroChunk)
        );
        // The same refusals when decompressing into a caller's buffer.
        assert_eq!(
            open_into(leaf, &frame, &mut [0u8; 4000]),
            Err(ChunkError::Undecodable {
                hash: leaf,
                expected: 4000
            })
        );
        assert_eq!(
            open_into(leaf, &frame, &mut [0u8; 6000]),
            Err(ChunkError::WrongLength {
                hash: leaf,
                got: 5000,
                expected: 6000
            })
        );
        assert!(matches!(
            open_into(other, &frame, &mut [0u8; 5000]),
            Err(ChunkError::WrongHash { .. })
        ));
        assert!(matches!(
            open_into(leaf, b"not zstd", &mut [0u8; 5000]),
            Err(ChunkError::Undecodable { .. })
        ));
        assert_eq!(
            open_into(BlockHash::ZERO, &frame, &mut [0u8; 5000]),
            Err(ChunkError::ZeroChunk)
        );
        assert_eq!(
            verify(leaf, &frame, 6000),
            Err(ChunkError::WrongLength {
                hash: leaf,
                got: 5000,
                expected: 6000
            })
        );
        assert!(matches!(
            verify(other, &frame, 5000),
            Err(ChunkError::WrongHash { .. })
        ));
    }
}
