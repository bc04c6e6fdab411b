//! A keyring's secret keys: the id key and manifest key (fixed for the keyring's life: every
//! chunk name and MAC depends on them) and the data keys that seal chunks.
//!
//! - A **full** keyring holds its data keys, newest first: it seals with the newest and opens
//!   with any. Rotating the data key adds one in front; points sealed before stay readable.
//! - A **write-only** keyring holds no data key, only a recovery public key: for each session
//!   it makes a fresh data key, wraps it to the recovery key (the receiver keeps the wrapped
//!   copy before any chunk sealed with it is sent), and forgets it when the session ends. It
//!   can add points but cannot read one.
//! - A keyring **opened with a recovery key** holds the data keys it unwrapped from the
//!   receiver's wrapped copies, with the id and manifest keys they were wrapped with.

use super::recovery::{RecoveryPublic, WrappedKey};
use super::{
    check_envelope, ChunkIds, KeyringId, Manifest, CHECK_BYTES, ENVELOPE_V1, HEADER_BYTES,
    PAD_BUCKET,
};
use crate::chunk::ChunkError;
use crate::format::{max_frame_len, MAX_CONFIG_BYTES};
use crate::hash::BlockHash;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// The public id of a keyring: a commitment to its id and manifest keys, so a reader that
/// unwraps keys for a keyring (with a recovery key, which anyone can wrap to) can tell that
/// they are that keyring's.
pub(super) fn keyring_id_of(ids: &[u8; 32], manifest: &[u8; 32]) -> KeyringId {
    let mut h = blake3::Hasher::new_derive_key("rewind 2026-12 keyring id v1");
    h.update(ids).update(manifest);
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    KeyringId(id)
}

/// The name a VM's sealed configuration is bound to (as a chunk's id is).
fn config_id(vm: &str) -> BlockHash {
    BlockHash(blake3::derive_key(
        "rewind 2026-12 sealed config v1",
        vm.as_bytes(),
    ))
}

/// One data key and its public 8-byte id (what an envelope names it by).
#[derive(Clone)]
pub struct DataKey {
    pub id: [u8; 8],
    key: Zeroizing<[u8; 32]>,
}

impl DataKey {
    pub fn new(key: [u8; 32]) -> DataKey {
        let h = blake3::derive_key("rewind 2026-12 data key id v1", &key);
        let mut id = [0u8; 8];
        id.copy_from_slice(&h[..8]);
        DataKey {
            id,
            key: Zeroizing::new(key),
        }
    }

    pub fn random() -> DataKey {
        DataKey::new(rand::random())
    }

    pub fn secret(&self) -> &[u8; 32] {
        &self.key
    }
}

/// The secret keys of one keyring (see the module's doc).
#[derive(Clone)]
pub struct Keyring {
    id: KeyringId,
    ids: Zeroizing<[u8; 32]>,
    manifest: Zeroizing<[u8; 32]>,
    /// Newest first; empty for a write-only keyring outside a session.
    data: Vec<DataKey>,
    /// Where new data keys are wrapped to (required for a write-only keyring).
    recovery: Option<RecoveryPublic>,
    /// Data keys wrapped to `recovery` that every session sends again (a write-only
    /// keyring's: the data keys of the full keyring it was made from, so chunks sealed
    /// before it took over stay readable with the recovery key).
    carried: Vec<WrappedKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({}, {} data keys)", self.id, self.data.len())
    }
}

impl Keyring {
    /// A keyring of these keys (its id is their commitment, see [`keyring_id_of`]).
    pub fn new(
        ids: [u8; 32],
        manifest: [u8; 32],
        data: Vec<DataKey>,
        recovery: Option<RecoveryPublic>,
    ) -> Keyring {
        Keyring {
            id: keyring_id_of(&ids, &manifest),
            ids: Zeroizing::new(ids),
            manifest: Zeroizing::new(manifest),
            data,
            recovery,
            carried: Vec::new(),
        }
    }

    /// A new full keyring: random keys, one data key.
    pub fn generate() -> Keyring {
        Keyring::new(
            rand::random(),
            rand::random(),
            vec![DataKey::random()],
            None,
        )
    }

    /// The same keyring carrying `wrapped` (see the field's doc).
    pub fn with_carried(&self, wrapped: Vec<WrappedKey>) -> Keyring {
        let mut k = self.clone();
        k.carried = wrapped;
        k
    }

    /// The wrapped keys every session of this keyring sends again.
    pub fn carried(&self) -> &[WrappedKey] {
        &self.carried
    }

    pub fn id(&self) -> KeyringId {
        self.id
    }

    pub(super) fn ids_key(&self) -> &[u8; 32] {
        &self.ids
    }

    pub(super) fn manifest_key(&self) -> &[u8; 32] {
        &self.manifest
    }

    pub fn data_keys(&self) -> &[DataKey] {
        &self.data
    }

    pub fn recovery(&self) -> Option<&RecoveryPublic> {
        self.recovery.as_ref()
    }

    /// True when this keyring cannot read what it writes (no data key of its own).
    pub fn write_only(&self) -> bool {
        self.data.is_empty()
    }

    /// The same keyring with a new newest data key in front (rotation: points sealed before
    /// stay readable, new ones are sealed with the new key).
    pub fn rotated(&self) -> Keyring {
        let mut k = self.clone();
        k.data.insert(0, DataKey::random());
        k
    }

    /// The same keyring, also wrapping its data keys to `recovery` (so that key reads its
    /// points too).
    pub fn with_recovery(&self, recovery: RecoveryPublic) -> Keyring {
        let mut k = self.clone();
        k.recovery = Some(recovery);
        k
    }

    /// The same keyring without data keys, wrapping new ones to `recovery`: what a
    /// write-only agent holds. It carries its data keys wrapped to `recovery`: chunks they
    /// sealed (the VM's earlier points, other VMs of the keyring) are what the write-only
    /// agent's points reuse, and the recovery key must read them too.
    pub fn write_only_for(&self, recovery: RecoveryPublic) -> Keyring {
        let mut k = self.clone();
        k.carried.extend(
            self.data
                .iter()
                .filter_map(|d| recovery.wrap(self.id, d, &self.ids, &self.manifest)),
        );
        k.data.clear();
        k.recovery = Some(recovery);
        k
    }

    /// The keyring a sync seals with, and the wrapped data key the receiver must hold before
    /// any chunk sealed with it arrives: a write-only keyring makes a fresh data key for the
    /// session; a full keyring with a recovery key wraps its newest one (so the recovery key
    /// reads its points too); a full keyring without one needs nothing registered.
    ///
    /// With a recovery key every data key the session may meet is sent wrapped: a full
    /// keyring's all (chunks it sealed under older ones are reused), a write-only one's
    /// carried keys and its session key. The receiver keeps each once.
    pub fn for_session(&self) -> (Keyring, Vec<WrappedKey>) {
        let mut k = self.clone();
        if k.data.is_empty() {
            k.data.push(DataKey::random());
        }
        let mut wrapped = self.carried.clone();
        if let Some(r) = &self.recovery {
            let keys = if self.data.is_empty() {
                &k.data
            } else {
                &self.data
            };
            wrapped.extend(
                keys.iter()
                    .filter_map(|d| r.wrap(self.id, d, &self.ids, &self.manifest)),
            );
        }
        (k, wrapped)
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

    /// Encrypts a chunk's frame (padded to [`PAD_BUCKET`] when `pad`) into an envelope with
    /// the newest data key.
    pub fn seal(&self, id: BlockHash, frame: &[u8], pad: bool) -> Result<Vec<u8>, ChunkError> {
        let key = self.data.first().ok_or(ChunkError::NeedsKey { hash: id })?;
        let nonce: [u8; 24] = rand::random();
        let mut plain = Zeroizing::new(frame.to_vec());
        if pad {
            let padded = frame.len().div_ceil(PAD_BUCKET).max(1) * PAD_BUCKET;
            plain.resize(padded, 0);
        }
        let cipher = XChaCha20Poly1305::new((&*key.key).into());
        let aad = self.aad(id, &key.id);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            // XChaCha20-Poly1305 refuses only messages near 256 GiB; a frame is at most 4 MiB.
            .map_err(|_| ChunkError::Unauthentic { hash: id })?;
        let mut out = Vec::with_capacity(HEADER_BYTES + sealed.len() + CHECK_BYTES);
        out.push(ENVELOPE_V1);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        let check = blake3::hash(&out);
        out.extend_from_slice(check.as_bytes());
        Ok(out)
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
        let Some(key) = self.data.iter().find(|k| k.id[..] == *key_id) else {
            return Err(ChunkError::OtherKey {
                hash: id,
                key: hex::encode(key_id),
            });
        };
        let nonce = XNonce::from_slice(&envelope[9..HEADER_BYTES]);
        let body = &envelope[HEADER_BYTES..envelope.len() - CHECK_BYTES];
        let cipher = XChaCha20Poly1305::new((&*key.key).into());
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

    /// A point's VM configuration (JSON text) as the receiver keeps it for an encrypted VM:
    /// `{"sealed": HEX}`, the text compressed and sealed like a chunk under a name derived
    /// from the VM's, so the receiver stores a JSON object it cannot read.
    pub fn seal_config(&self, vm: &str, config: &str) -> Result<String, ChunkError> {
        if config.is_empty() {
            return Ok(String::new());
        }
        let id = config_id(vm);
        let frame =
            crate::chunk::compress(config.as_bytes()).map_err(|_| ChunkError::Undecodable {
                hash: id,
                expected: config.len(),
            })?;
        let sealed = self.seal(id, &frame, false)?;
        Ok(serde_json::json!({ "sealed": hex::encode(sealed) }).to_string())
    }

    /// The configuration text [`Keyring::seal_config`] sealed (empty stays empty).
    pub fn open_config(&self, vm: &str, stored: &str) -> Result<String, ChunkError> {
        let id = config_id(vm);
        let bad = || ChunkError::Undecodable {
            hash: id,
            expected: MAX_CONFIG_BYTES,
        };
        if stored.is_empty() {
            return Ok(String::new());
        }
        let v: serde_json::Value = serde_json::from_str(stored).map_err(|_| bad())?;
        let envelope = v["sealed"]
            .as_str()
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(bad)?;
        let frame = self.open_frame(id, &envelope, MAX_CONFIG_BYTES)?;
        let text = zstd::bulk::decompress(&frame, MAX_CONFIG_BYTES).map_err(|_| bad())?;
        String::from_utf8(text).map_err(|_| bad())
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
