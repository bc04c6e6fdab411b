//! Reading encrypted points: which codec a point is read with, given the key the operator
//! passed (if any). The receiver never needs a key to accept, store, verify, prune, gc or copy
//! points; only what hands out plaintext (restore, export, a drill that boots or checks
//! content) does, and only with a key given on purpose.

use crate::error::StoreError;
use crate::points::PointInfo;
use rewind_proto::crypt::{Codec, Keyring, KeyringId, Manifest, RecoveryKey};
use rusqlite::Connection;
use std::sync::Arc;

/// The key an operator gave: none, a keyring's key file, or a recovery key.
#[derive(Debug, Clone, Default)]
pub enum Key {
    #[default]
    None,
    Keyring(Arc<Keyring>),
    /// A recovery key, and the keyring the operator expects (anyone can wrap keys to a
    /// recovery key's public half, so without it a tampered catalog could present a keyring
    /// of its own making).
    Recovery(Arc<RecoveryKey>, Option<KeyringId>),
}

/// The keyring `key` reads `point` with: a key file's own (refused when write-only), or the
/// data keys of the point's owner and keyring unwrapped with a recovery key.
fn keyring_of(
    conn: &Connection,
    point: &PointInfo,
    keyring: &str,
    key: &Key,
) -> Result<Option<Arc<Keyring>>, StoreError> {
    match key {
        Key::None => Ok(None),
        Key::Keyring(k) if k.write_only() => Err(StoreError::Key(format!(
            "the key given for {} is write-only: it adds points but reads none; give the \
             recovery key (--recovery-key)",
            point.vm
        ))),
        Key::Keyring(k) => Ok(Some(k.clone())),
        Key::Recovery(r, expected) => {
            let id = hex::decode(keyring)
                .ok()
                .and_then(|b| KeyringId::from_slice(&b))
                .ok_or_else(|| StoreError::Key(format!("keyring id {keyring:?}")))?;
            if expected.is_some_and(|e| e != id) {
                return Err(StoreError::Key(format!(
                    "point {} of {} is encrypted with keyring {id}, not the keyring given \
                     with --keyring",
                    point.id, point.vm
                )));
            }
            let owner = crate::catalog::points::vm_owner(conn, &point.vm)?
                .map(|(_, o)| o)
                .unwrap_or_default();
            let wrapped = crate::catalog::keys::of_keyring(conn, &owner, &id.0)?;
            let k = r.open_keyring(id, &wrapped).ok_or_else(|| {
                StoreError::Key(format!(
                    "none of the {} data keys of keyring {keyring} is wrapped to recovery key {}",
                    wrapped.len(),
                    r.public().to_hex()
                ))
            })?;
            Ok(Some(Arc::new(k)))
        }
    }
}

/// Whether a reader must see plaintext (restore, export, boot) or may check ciphertext alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Plaintext,
    CiphertextOk,
}

/// The codec to read `point` with:
/// - a plain point: plain (a key given is not needed and is ignored);
/// - an encrypted point with a key (a key file, or the recovery key that unwraps its data
///   keys): the key, once its keyring is the point's and the point's
///   manifest MAC verifies under it (the catalog's roots, geometry, configuration and time of
///   capture are the ones the agent committed);
/// - an encrypted point without a key: `Locked` when ciphertext is enough, else an error.
pub fn codec_for(
    conn: &Connection,
    point: &PointInfo,
    key: &Key,
    need: Need,
) -> Result<Codec, StoreError> {
    let Some(enc) = &point.encrypted else {
        return Ok(Codec::Plain);
    };
    let Some(keyring) = keyring_of(conn, point, &enc.keyring, key)? else {
        return match need {
            Need::CiphertextOk => Ok(Codec::Locked),
            Need::Plaintext => Err(StoreError::Key(format!(
                "point {} of {} is encrypted (keyring {}): give its key with --encryption-key \
                 (or the recovery key with --recovery-key)",
                point.id, point.vm, enc.keyring
            ))),
        };
    };
    if keyring.id().to_hex() != enc.keyring {
        return Err(StoreError::Key(format!(
            "point {} of {} is encrypted with keyring {}; the key given is keyring {}",
            point.id,
            point.vm,
            enc.keyring,
            keyring.id()
        )));
    }
    let disks = point
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.size, d.block_size as u32, d.root_leaf.0))
        .collect();
    let manifest = Manifest {
        vm: &point.vm,
        taken_us: enc.taken_us,
        consistency: &point.consistency,
        config_hash: enc.config_hash,
        disks,
    };
    if !keyring.verify_manifest(&manifest, &enc.mac) {
        return Err(StoreError::Key(format!(
            "point {} of {}: its manifest MAC does not verify with this key: the catalog's \
             record of the point is not what the agent committed",
            point.id, point.vm
        )));
    }
    Ok(Codec::Sealed {
        keyring,
        pad: false,
    })
}

/// `point` with its configuration opened by `codec` (an encrypted point's is sealed: with the
/// key it is decrypted; without, it stays the sealed object, which nothing reads).
pub fn open_point(point: &PointInfo, codec: &Codec) -> Result<PointInfo, StoreError> {
    let mut p = point.clone();
    if p.encrypted.is_none() || !matches!(codec, Codec::Sealed { .. }) {
        return Ok(p);
    }
    let stored = p.config_text.clone().unwrap_or_default();
    let text = codec.open_config(&p.vm, &stored).map_err(|e| {
        StoreError::Key(format!(
            "point {} of {}: its configuration: {e}",
            p.id, p.vm
        ))
    })?;
    p.config = serde_json::from_str(&text).ok();
    p.config_text = (!text.is_empty()).then_some(text);
    Ok(p)
}
