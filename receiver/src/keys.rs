//! Reading encrypted points: which codec a point is read with, given the key the operator
//! passed (if any). The receiver never needs a key to accept, store, verify, prune, gc or copy
//! points; only what hands out plaintext (restore, export, a drill that boots or checks
//! content) does, and only with a key given on purpose.

use crate::error::StoreError;
use crate::points::PointInfo;
use rewind_proto::crypt::{Codec, Keyring, Manifest};
use std::sync::Arc;

/// Whether a reader must see plaintext (restore, export, boot) or may check ciphertext alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Plaintext,
    CiphertextOk,
}

/// The codec to read `point` with:
/// - a plain point: plain (a key given is not needed and is ignored);
/// - an encrypted point with a key: the key, once its keyring is the point's and the point's
///   manifest MAC verifies under it (the catalog's roots, geometry, configuration and time of
///   capture are the ones the agent committed);
/// - an encrypted point without a key: `Locked` when ciphertext is enough, else an error.
pub fn codec_for(
    point: &PointInfo,
    key: Option<&Arc<Keyring>>,
    need: Need,
) -> Result<Codec, StoreError> {
    let Some(enc) = &point.encrypted else {
        return Ok(Codec::Plain);
    };
    let Some(keyring) = key else {
        return match need {
            Need::CiphertextOk => Ok(Codec::Locked),
            Need::Plaintext => Err(StoreError::Key(format!(
                "point {} of {} is encrypted (keyring {}): give its key with --encryption-key",
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
        keyring: keyring.clone(),
        pad: false,
    })
}
