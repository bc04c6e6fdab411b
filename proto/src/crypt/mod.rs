//! Client-side encryption: what an agent that holds a keyring stores instead of a plain chunk,
//! and what a receiver that holds no key can still check.
//!
//! A keyring is 32 secret bytes (the master) and a public 16-byte id. Three keys derive from
//! the master, one per use, so none can stand in for another:
//! - the **id key** names chunks: a block's leaf is `blake3::keyed_hash(id key, bytes)`, so
//!   the receiver and other keyrings cannot confirm a guess of a block's content, and two
//!   keyrings never share (dedup) a chunk;
//! - the **data key** encrypts each chunk's zstd frame with XChaCha20-Poly1305 under a random
//!   192-bit nonce (safe with any number of agents writing at once: no counter to share), the
//!   format version, keyring id, chunk id and data-key id bound as associated data;
//! - the **manifest key** MACs each point's manifest (its disks' geometry and roots, which
//!   bind every leaf in order), so a receiver cannot pass one point off as another.
//!
//! A sealed chunk (an *envelope*) ends with the blake3 hash of everything before it: a
//! receiver without the key checks that hash at ingest, in `verify` and in drills, so bit rot
//! and a flipped byte are found (and healed from the agent) without any key. Only a key holder
//! can tell that the content is what the agent sent (the AEAD tag) and that it is the block
//! the id names (the keyed hash).

mod keyfile;
mod keyring;
mod recovery;

pub use keyfile::{
    open_key, open_recovery, read_key_file, read_passphrase, KdfParams, KeyFile, KeyFileError,
};
pub use keyring::{DataKey, Keyring};
pub use recovery::{RecoveryKey, RecoveryPublic, WrappedKey, WRAPPED_MAX};

use crate::chunk::{self, ChunkError};
use crate::format::max_frame_len;
use crate::hash::BlockHash;
use std::sync::Arc;

/// Format version of an envelope: its first byte.
pub const ENVELOPE_V1: u8 = 1;
/// Bytes of an envelope's header: version, data-key id, nonce.
pub const HEADER_BYTES: usize = 1 + 8 + 24;
/// Bytes of the AEAD tag.
pub const TAG_BYTES: usize = 16;
/// Bytes of the check hash that ends an envelope.
pub const CHECK_BYTES: usize = 32;
/// Padded frames are rounded up to a multiple of this: an observer then learns a chunk's
/// compressed size only to 4 KiB (17 sizes for a 64 KiB block) instead of to the byte.
pub const PAD_BUCKET: usize = 4096;

/// Longest envelope of a block of `block_len` bytes: the longest frame, padded, plus the
/// envelope's fixed overhead.
pub const fn max_envelope_len(block_len: usize) -> usize {
    let frame = max_frame_len(block_len);
    frame.div_ceil(PAD_BUCKET) * PAD_BUCKET + HEADER_BYTES + TAG_BYTES + CHECK_BYTES
}

/// How a chunk's name is computed from a block's bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ChunkIds {
    /// blake3 of the bytes: unencrypted VMs.
    Plain,
    /// blake3 keyed with a keyring's id key.
    Keyed([u8; 32]),
}

impl std::fmt::Debug for ChunkIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkIds::Plain => "ChunkIds::Plain",
            ChunkIds::Keyed(_) => "ChunkIds::Keyed(..)",
        })
    }
}

impl ChunkIds {
    /// The leaf of a block: zero for an all-zero block (a hole, never stored).
    pub fn of(&self, data: &[u8]) -> BlockHash {
        match self {
            ChunkIds::Plain => BlockHash::of(data),
            ChunkIds::Keyed(key) => {
                if crate::hash::is_zero(data) {
                    BlockHash::ZERO
                } else {
                    BlockHash(*blake3::keyed_hash(key, data).as_bytes())
                }
            }
        }
    }
}

/// A keyring's public id: what the receiver records for an encrypted VM.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyringId(pub [u8; 16]);

impl KeyringId {
    pub fn from_slice(b: &[u8]) -> Option<KeyringId> {
        <[u8; 16]>::try_from(b).ok().map(KeyringId)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Display for KeyringId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for KeyringId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyringId({})", self.to_hex())
    }
}

/// The id of the data key an envelope names (None for anything that is not an envelope).
pub fn envelope_key_id(stored: &[u8]) -> Option<[u8; 8]> {
    if stored.first() != Some(&ENVELOPE_V1) {
        return None;
    }
    stored.get(1..9)?.try_into().ok()
}

/// Checks what a receiver can check of an envelope without the key: its version, that its
/// length fits a block of `block_len` bytes, and its check hash.
pub fn check_envelope(id: BlockHash, envelope: &[u8], block_len: usize) -> Result<(), ChunkError> {
    if id.is_zero() {
        return Err(ChunkError::ZeroChunk);
    }
    let max = max_envelope_len(block_len);
    let min = HEADER_BYTES + TAG_BYTES + CHECK_BYTES + 1;
    if envelope.len() > max || envelope.len() < min || envelope[0] != ENVELOPE_V1 {
        return Err(ChunkError::BadEnvelope {
            hash: id,
            len: envelope.len(),
            max,
        });
    }
    let (rest, check) = envelope.split_at(envelope.len() - CHECK_BYTES);
    if blake3::hash(rest).as_bytes() != check {
        return Err(ChunkError::CheckFailed { hash: id });
    }
    Ok(())
}

/// What a point's manifest MAC binds: the VM, when the agent captured the point, how
/// consistent it is, its configuration, and each disk's geometry and root (the root binds
/// every leaf in order).
#[derive(Debug, Clone)]
pub struct Manifest<'a> {
    pub vm: &'a str,
    /// The agent's clock when it commits the point, microseconds since the Unix epoch.
    pub taken_us: i64,
    pub consistency: &'a str,
    /// [`config_hash`] of the VM's configuration as sent with the commit.
    pub config_hash: [u8; 32],
    /// (name, size, block size, root), in any order.
    pub disks: Vec<(&'a str, u64, u32, [u8; 32])>,
}

impl Manifest<'_> {
    pub(super) fn encode(&self, keyring: KeyringId) -> Vec<u8> {
        let mut out = Vec::new();
        let mut field = |b: &[u8]| {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        };
        field(b"rewind-manifest/1");
        field(&keyring.0);
        field(self.vm.as_bytes());
        field(&self.taken_us.to_le_bytes());
        field(self.consistency.as_bytes());
        field(&self.config_hash);
        // In name order, whatever order either side lists them in.
        let mut disks: Vec<_> = self.disks.iter().collect();
        disks.sort_by_key(|d| d.0);
        for (name, size, bs, root) in disks {
            field(name.as_bytes());
            field(&size.to_le_bytes());
            field(&bs.to_le_bytes());
            field(root);
        }
        out
    }
}

/// The hash of a point's configuration text (empty when none) that its manifest binds: a
/// reader that does not need the configuration (a rollback) checks the MAC with it alone.
pub fn config_hash(config: &str) -> [u8; 32] {
    *blake3::hash(config.as_bytes()).as_bytes()
}

/// How chunks are encoded for a VM: compressed, or compressed and sealed with a keyring.
#[derive(Debug, Clone)]
pub enum Codec {
    Plain,
    Sealed {
        keyring: Arc<Keyring>,
        pad: bool,
    },
    /// Sealed chunks read without their key (a receiver's verify or drill): envelopes are
    /// checked, nothing is decrypted.
    Locked,
}

impl Codec {
    /// How this codec names chunks.
    pub fn chunk_ids(&self) -> ChunkIds {
        match self {
            Codec::Plain | Codec::Locked => ChunkIds::Plain,
            Codec::Sealed { keyring, .. } => keyring.chunk_ids(),
        }
    }

    /// The codec a sync seals with, and the data keys the receiver must hold wrapped before
    /// any chunk sealed with them arrives (see [`Keyring::for_session`]).
    pub fn for_session(&self) -> (Codec, Vec<WrappedKey>) {
        match self {
            Codec::Sealed { keyring, pad } => {
                let (k, wrapped) = keyring.for_session();
                (
                    Codec::Sealed {
                        keyring: Arc::new(k),
                        pad: *pad,
                    },
                    wrapped.into_iter().collect(),
                )
            }
            other => (other.clone(), Vec::new()),
        }
    }

    /// A point's configuration as stored: sealed for an encrypted VM (see
    /// [`Keyring::seal_config`]), as it is otherwise.
    pub fn seal_config(&self, vm: &str, config: &str) -> Result<String, ChunkError> {
        match self {
            Codec::Sealed { keyring, .. } => keyring.seal_config(vm, config),
            _ => Ok(config.to_owned()),
        }
    }

    /// A stored configuration opened: decrypted with the key for an encrypted VM, as it is
    /// for a plain one.
    pub fn open_config(&self, vm: &str, stored: &str) -> Result<String, ChunkError> {
        match self {
            Codec::Sealed { keyring, .. } => keyring.open_config(vm, stored),
            _ => Ok(stored.to_owned()),
        }
    }

    /// The keyring's public id, None when plain.
    pub fn keyring_id(&self) -> Option<KeyringId> {
        match self {
            Codec::Plain | Codec::Locked => None,
            Codec::Sealed { keyring, .. } => Some(keyring.id()),
        }
    }

    /// The stored form of a block whose leaf is `id`.
    pub fn encode(&self, id: BlockHash, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let frame = chunk::compress(data)?;
        match self {
            Codec::Plain => Ok(frame),
            Codec::Sealed { keyring, pad } => keyring
                .seal(id, &frame, *pad)
                .map_err(std::io::Error::other),
            Codec::Locked => Err(std::io::Error::other("no key to seal chunks with")),
        }
    }

    /// Decodes a stored chunk into `out` (its block's length) and checks it against `id`.
    pub fn decode_into(
        &self,
        id: BlockHash,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<(), ChunkError> {
        match self {
            Codec::Plain => chunk::open_into(id, stored, out),
            Codec::Sealed { keyring, .. } => {
                let frame = keyring.open_frame(id, stored, out.len())?;
                chunk::open_keyed(id, &frame, out, &keyring.chunk_ids())
            }
            Codec::Locked => Err(ChunkError::NeedsKey { hash: id }),
        }
    }

    /// The deepest check this codec can make of a stored chunk of a `len`-byte block: a
    /// plain one decompresses and hashes to its id; with the key, a sealed one decrypts,
    /// decompresses and hashes (keyed) to its id; without it, its envelope is checked.
    pub fn check(&self, id: BlockHash, stored: &[u8], len: usize) -> Result<(), ChunkError> {
        match self {
            Codec::Plain => chunk::verify(id, stored, len),
            Codec::Locked => check_envelope(id, stored, len),
            Codec::Sealed { .. } => self.decode(id, stored, len).map(drop),
        }
    }

    /// [`Codec::decode_into`] into a new buffer of `len` bytes.
    pub fn decode(&self, id: BlockHash, stored: &[u8], len: usize) -> Result<Vec<u8>, ChunkError> {
        let mut out = vec![0u8; len];
        self.decode_into(id, stored, &mut out)?;
        Ok(out)
    }

    /// What a receiver checks of a chunk as sent or stored without decoding more than it can:
    /// a plain chunk decompresses and hashes to its id; a sealed one passes
    /// [`check_envelope`].
    pub fn check_stored(
        sealed: bool,
        id: BlockHash,
        stored: &[u8],
        len: usize,
    ) -> Result<(), ChunkError> {
        if sealed {
            check_envelope(id, stored, len)
        } else {
            chunk::verify(id, stored, len)
        }
    }

    /// [`Codec::check_stored`] of a stored chunk whose kind its first byte tells: every zstd
    /// frame starts with its magic number, every envelope with [`ENVELOPE_V1`]. (Ingest
    /// stored each chunk under the check its VM's kind asks for.)
    pub fn check_any(id: BlockHash, stored: &[u8], len: usize) -> Result<(), ChunkError> {
        Codec::check_stored(stored.first() == Some(&ENVELOPE_V1), id, stored, len)
    }
}

#[cfg(test)]
mod tests;
