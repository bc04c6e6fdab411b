//! The keyrings of encrypted VMs, opened once per key file: unlocking runs argon2id (a quarter
//! of a second and 64 MiB), which a service taking points every minute should not repeat.
//! A key file changed on disk is opened again.

use rewind_proto::crypt::{open_key, Codec, KeyFileError, Keyring};
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
