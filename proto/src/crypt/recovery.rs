//! Recovery keys: an X25519 key pair kept away from the agents. Data keys are wrapped to its
//! public half (an ephemeral X25519 exchange, blake3 key derivation, XChaCha20-Poly1305), so
//! write-only agents can seal points only its holder can read, and one recovery key can read
//! every keyring whose agents wrap to it.
//!
//! A wrapped key carries the data key with the keyring's id and manifest keys (all a restore
//! needs besides the chunks), bound to the keyring's id and the data key's id.

use super::keyring::{DataKey, Keyring};
use super::KeyringId;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Length of a wrapped key's blob: ephemeral public key, nonce, three 32-byte keys, tag.
pub const WRAPPED_MAX: usize = 32 + 24 + 96 + 16;

/// A recovery key's public half: a point that is not of low order (an exchange with a
/// low-order point gives a shared secret anyone can compute, so such a "key" is refused).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecoveryPublic([u8; 32]);

impl std::fmt::Debug for RecoveryPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecoveryPublic({})", &self.to_hex()[..16])
    }
}

/// A data key wrapped to a recovery key, as the receiver keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub key_id: [u8; 8],
    pub recovery: RecoveryPublic,
    pub blob: Vec<u8>,
}

fn wrap_key(shared: &[u8; 32], eph: &[u8; 32], recipient: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut h = blake3::Hasher::new_derive_key("rewind 2026-12 recovery wrap v1");
    h.update(shared).update(eph).update(recipient);
    Zeroizing::new(*h.finalize().as_bytes())
}

fn aad(keyring: KeyringId, key_id: &[u8; 8]) -> Vec<u8> {
    [b"rewind-wrap/1".as_slice(), &keyring.0, key_id].concat()
}

impl RecoveryPublic {
    /// The public key of these bytes; None unless they are 32 bytes of a point whose
    /// exchanges are contributory.
    pub fn from_slice(b: &[u8]) -> Option<RecoveryPublic> {
        let bytes = <[u8; 32]>::try_from(b).ok()?;
        // Every clamped scalar is a multiple of the cofactor: a low-order point gives the
        // zero secret with any of them.
        let probe = StaticSecret::from([0x5a; 32]).diffie_hellman(&PublicKey::from(bytes));
        probe.was_contributory().then_some(RecoveryPublic(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Wraps `key` (with the keyring's id and manifest keys) so only this key's holder can
    /// unwrap it. None only for a low-order point, which [`RecoveryPublic::from_slice`]
    /// never returns.
    pub fn wrap(
        &self,
        keyring: KeyringId,
        key: &DataKey,
        ids: &[u8; 32],
        manifest: &[u8; 32],
    ) -> Option<WrappedKey> {
        let eph = StaticSecret::from(rand::random::<[u8; 32]>());
        let eph_pub = PublicKey::from(&eph);
        let shared = eph.diffie_hellman(&PublicKey::from(self.0));
        if !shared.was_contributory() {
            return None;
        }
        let k = wrap_key(shared.as_bytes(), eph_pub.as_bytes(), &self.0);
        let nonce: [u8; 24] = rand::random();
        let mut payload = Zeroizing::new(Vec::with_capacity(96));
        payload.extend_from_slice(key.secret());
        payload.extend_from_slice(ids);
        payload.extend_from_slice(manifest);
        let sealed = XChaCha20Poly1305::new((&*k).into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &payload,
                    aad: &aad(keyring, &key.id),
                },
            )
            .ok()?;
        let mut blob = Vec::with_capacity(WRAPPED_MAX);
        blob.extend_from_slice(eph_pub.as_bytes());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Some(WrappedKey {
            key_id: key.id,
            recovery: *self,
            blob,
        })
    }
}

/// A recovery key: the secret half and its public half.
pub struct RecoveryKey {
    secret: StaticSecret,
    public: RecoveryPublic,
}

impl std::fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecoveryKey({:?})", self.public)
    }
}

/// What one wrapped key holds.
type Unwrapped = (DataKey, Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>);

impl RecoveryKey {
    pub fn generate() -> RecoveryKey {
        RecoveryKey::from_secret(rand::random())
    }

    pub fn from_secret(secret: [u8; 32]) -> RecoveryKey {
        let secret = StaticSecret::from(secret);
        let public = RecoveryPublic(*PublicKey::from(&secret).as_bytes());
        RecoveryKey { secret, public }
    }

    pub fn public(&self) -> RecoveryPublic {
        self.public
    }

    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// The data key (and the keyring's id and manifest keys) `w` holds, if it was wrapped to
    /// this key for `keyring`; None otherwise (another recovery key, another keyring, bytes
    /// that were changed, or id and manifest keys that are not the ones `keyring`'s id
    /// commits to: anyone can wrap to a public key, so the keys inside are checked against
    /// the id).
    pub fn unwrap(&self, keyring: KeyringId, w: &WrappedKey) -> Option<Unwrapped> {
        if w.recovery != self.public || w.blob.len() != WRAPPED_MAX {
            return None;
        }
        let eph: [u8; 32] = w.blob[..32].try_into().ok()?;
        let shared = self.secret.diffie_hellman(&PublicKey::from(eph));
        if !shared.was_contributory() {
            return None;
        }
        let k = wrap_key(shared.as_bytes(), &eph, &self.public.0);
        let plain = Zeroizing::new(
            XChaCha20Poly1305::new((&*k).into())
                .decrypt(
                    XNonce::from_slice(&w.blob[32..56]),
                    Payload {
                        msg: &w.blob[56..],
                        aad: &aad(keyring, &w.key_id),
                    },
                )
                .ok()?,
        );
        let take =
            |r: std::ops::Range<usize>| -> Option<[u8; 32]> { plain.get(r)?.try_into().ok() };
        let key = DataKey::new(take(0..32)?);
        let (ids, manifest) = (Zeroizing::new(take(32..64)?), Zeroizing::new(take(64..96)?));
        if key.id != w.key_id || super::keyring::keyring_id_of(&ids, &manifest) != keyring {
            return None;
        }
        Some((key, ids, manifest))
    }

    /// A keyring that reads `keyring`'s points: every data key among `wrapped` that unwraps
    /// with this key. None when none does (the points were not wrapped to this key).
    pub fn open_keyring(&self, keyring: KeyringId, wrapped: &[WrappedKey]) -> Option<Keyring> {
        let mut data = Vec::new();
        let mut keys = None;
        for w in wrapped {
            if let Some((key, ids, manifest)) = self.unwrap(keyring, w) {
                keys.get_or_insert((ids, manifest));
                data.push(key);
            }
        }
        let (ids, manifest) = keys?;
        Some(Keyring::new(*ids, *manifest, data, None))
    }

    /// `w` wrapped again, to `to` (rotation of the recovery key); None when `w` does not
    /// unwrap with this key.
    pub fn rewrap(
        &self,
        keyring: KeyringId,
        w: &WrappedKey,
        to: &RecoveryPublic,
    ) -> Option<WrappedKey> {
        let (key, ids, manifest) = self.unwrap(keyring, w)?;
        to.wrap(keyring, &key, &ids, &manifest)
    }
}
