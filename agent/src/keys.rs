//! The keyrings of encrypted VMs, opened once per key file: unlocking runs argon2id (a quarter
//! of a second and 64 MiB), which a service taking points every minute should not repeat.
//! A key file changed on disk is opened again.
//!
//! A write-only keyring's session data key is made fresh, wrapped to the recovery key, and kept
//! in this process's memory (never on disk) for at most [`SESSION_KEY_LIFETIME`], so the points
//! of that hour share one wrapped key instead of adding one to the receiver's catalog each.
//! Someone who takes the running host could read those points; they hold the disks they came
//! from anyway. Older points stay unreadable to them.

use rewind_proto::crypt::{open_key, Codec, KeyFileError, Keyring, WrappedKey};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

type Opened = BTreeMap<(PathBuf, Option<PathBuf>), (Option<SystemTime>, Arc<Keyring>)>;

static OPENED: Mutex<Opened> = Mutex::new(BTreeMap::new());

/// The keyring of key file `path` (its passphrase from `passphrase_file`, or a prompt).
pub fn keyring(path: &Path, passphrase_file: Option<&Path>) -> Result<Arc<Keyring>, KeyFileError> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let key = (path.to_owned(), passphrase_file.map(Path::to_owned));
    let mut opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((when, k)) = opened.get(&key) {
        if *when == modified && modified.is_some() {
            return Ok(k.clone());
        }
    }
    let k = Arc::new(open_key(path, passphrase_file)?);
    opened.insert(key, (modified, k.clone()));
    Ok(k)
}

/// How a VM's chunks are encoded: sealed with the key file's keyring (padded to buckets when
/// `pad`), or plain when there is no key file.
pub fn codec(
    key: Option<&Path>,
    passphrase_file: Option<&Path>,
    pad: bool,
) -> Result<Codec, KeyFileError> {
    Ok(match key {
        None => Codec::Plain,
        Some(path) => Codec::Sealed {
            keyring: keyring(path, passphrase_file)?,
            pad,
        },
    })
}

/// How long a write-only agent seals with one data key before making the next.
pub const SESSION_KEY_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);

/// Per keyring and recovery key: when the session key was made, the session keyring, and
/// the wrapped keys its sessions send.
type SessionKeys =
    BTreeMap<([u8; 16], [u8; 32]), (std::time::Instant, Arc<Keyring>, Vec<WrappedKey>)>;

static SESSIONS: Mutex<SessionKeys> = Mutex::new(BTreeMap::new());

/// The codec a sync seals with and the wrapped data keys its Begin must carry (see
/// [`Codec::for_session`]); a write-only keyring's session key is reused for up to
/// [`SESSION_KEY_LIFETIME`].
pub fn for_session(codec: &Codec) -> (Codec, Vec<WrappedKey>) {
    let Codec::Sealed { keyring, pad } = codec else {
        return (codec.clone(), Vec::new());
    };
    let Some(recovery) = keyring.recovery().filter(|_| keyring.write_only()) else {
        return codec.for_session();
    };
    let sealed = |k: &Arc<Keyring>| Codec::Sealed {
        keyring: k.clone(),
        pad: *pad,
    };
    let mut sessions = SESSIONS.lock().unwrap_or_else(|p| p.into_inner());
    let key = (keyring.id().0, *recovery.as_bytes());
    if let Some((made, k, w)) = sessions.get(&key) {
        if made.elapsed() < SESSION_KEY_LIFETIME {
            return (sealed(k), w.clone());
        }
    }
    let (k, w) = keyring.for_session();
    let k = Arc::new(k);
    sessions.insert(key, (std::time::Instant::now(), k.clone(), w.clone()));
    (sealed(&k), w)
}
