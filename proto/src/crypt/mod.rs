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

pub use keyfile::{open_key, read_passphrase, KdfParams, KeyFile, KeyFileError};

use crate::chunk::{self, ChunkError};
use crate::format::max_frame_len;
use crate::hash::BlockHash;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Format version of an envelope: its first byte.
pub const ENVELOPE_V1: u8 = 1;
/// Bytes of an envelope's header: version, data-key id, nonce.
pub const HEADER_BYTES: usize = 1 + 8 + 24;
/// Bytes of the AEAD tag.
pub const TAG_BYTES: usize = 16;
/// Bytes of the check hash that ends an envelope.
pub const CHECK_BYTES: usize = 32;
/// Padded frames are rounded up to a multiple of this: an observer then learns a chunk's
/// compressed size only to 4 KiB (16 sizes for a 64 KiB block) instead of to the byte.
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

/// The secret keys of one keyring, derived from its master.
pub struct Keyring {
    id: KeyringId,
    ids: Zeroizing<[u8; 32]>,
    data: Zeroizing<[u8; 32]>,
    data_id: [u8; 8],
    manifest: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({})", self.id)
    }
}

impl Keyring {
    /// The keyring of a master secret.
    pub fn from_master(id: KeyringId, master: &[u8; 32]) -> Keyring {
        let data = Zeroizing::new(blake3::derive_key("rewind 2026-12 chunk data v1", master));
        let data_id = blake3::derive_key("rewind 2026-12 data key id v1", &*data);
        Keyring {
            id,
            ids: Zeroizing::new(blake3::derive_key("rewind 2026-12 chunk ids v1", master)),
            data_id: [
                data_id[0], data_id[1], data_id[2], data_id[3], data_id[4], data_id[5], data_id[6],
                data_id[7],
            ],
            data,
            manifest: Zeroizing::new(blake3::derive_key("rewind 2026-12 manifest v1", master)),
        }
    }

    pub fn id(&self) -> KeyringId {
        self.id
    }

    /// How this keyring names chunks.
    pub fn chunk_ids(&self) -> ChunkIds {
        ChunkIds::Keyed(*self.ids)
    }

    fn aad(&self, id: BlockHash, key_id: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(14 + 1 + 16 + 32 + 8);
        aad.extend_from_slice(b"rewind-chunk/1");
        aad.push(ENVELOPE_V1);
        aad.extend_from_slice(&self.id.0);
        aad.extend_from_slice(id.as_bytes());
        aad.extend_from_slice(key_id);
        aad
    }

    /// Encrypts a chunk's frame (padded to [`PAD_BUCKET`] when `pad`) into an envelope.
    pub fn seal(&self, id: BlockHash, frame: &[u8], pad: bool) -> Vec<u8> {
        let nonce: [u8; 24] = rand::random();
        let mut plain = Zeroizing::new(frame.to_vec());
        if pad {
            let padded = frame.len().div_ceil(PAD_BUCKET).max(1) * PAD_BUCKET;
            plain.resize(padded, 0);
        }
        let cipher = XChaCha20Poly1305::new((&*self.data).into());
        let aad = self.aad(id, &self.data_id);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            // XChaCha20-Poly1305 refuses only messages near 256 GiB; a frame is at most 4 MiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_BYTES + sealed.len() + CHECK_BYTES);
        out.push(ENVELOPE_V1);
        out.extend_from_slice(&self.data_id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        let check = blake3::hash(&out);
        out.extend_from_slice(check.as_bytes());
        out
    }

    /// Decrypts an envelope into the zstd frame it holds (its padding dropped), after the
    /// checks a receiver makes without the key.
    pub fn open_frame(
        &self,
        id: BlockHash,
        envelope: &[u8],
        block_len: usize,
    ) -> Result<Zeroizing<Vec<u8>>, ChunkError> {
        check_envelope(id, envelope, block_len)?;
        let key_id = &envelope[1..9];
        if key_id != self.data_id {
            return Err(ChunkError::OtherKey {
                hash: id,
                key: hex::encode(key_id),
            });
        }
        let nonce = XNonce::from_slice(&envelope[9..HEADER_BYTES]);
        let body = &envelope[HEADER_BYTES..envelope.len() - CHECK_BYTES];
        let cipher = XChaCha20Poly1305::new((&*self.data).into());
        let aad = self.aad(id, key_id);
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    nonce,
                    Payload {
                        msg: body,
                        aad: &aad,
                    },
                )
                .map_err(|_| ChunkError::Unauthentic { hash: id })?,
        );
        // The frame is exactly one zstd frame; any padding after it is zeros.
        let n = zstd::zstd_safe::find_frame_compressed_size(&plain).map_err(|_| {
            ChunkError::Undecodable {
                hash: id,
                expected: block_len,
            }
        })?;
        if n > plain.len() || plain[n..].iter().any(|&b| b != 0) {
            return Err(ChunkError::NotCanonical {
                hash: id,
                len: plain.len(),
                max: max_frame_len(block_len),
            });
        }
        Ok(Zeroizing::new(plain[..n].to_vec()))
    }

    /// The MAC of a point's manifest.
    pub fn manifest_mac(&self, manifest: &Manifest<'_>) -> [u8; 32] {
        *blake3::keyed_hash(&self.manifest, &manifest.encode(self.id)).as_bytes()
    }

    /// Whether `mac` is this keyring's MAC of `manifest` (compared in constant time).
    pub fn verify_manifest(&self, manifest: &Manifest<'_>, mac: &[u8]) -> bool {
        let Ok(mac) = <[u8; 32]>::try_from(mac) else {
            return false;
        };
        blake3::keyed_hash(&self.manifest, &manifest.encode(self.id)) == blake3::Hash::from(mac)
    }
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
    /// The agent's time of capture, microseconds since the Unix epoch.
    pub taken_us: i64,
    pub consistency: &'a str,
    /// [`config_hash`] of the VM's configuration as sent with the commit.
    pub config_hash: [u8; 32],
    /// (name, size, block size, root), in any order.
    pub disks: Vec<(&'a str, u64, u32, [u8; 32])>,
}

impl Manifest<'_> {
    fn encode(&self, keyring: KeyringId) -> Vec<u8> {
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
            Codec::Sealed { keyring, pad } => Ok(keyring.seal(id, &frame, *pad)),
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
