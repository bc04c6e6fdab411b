//! Key files: a keyring's master secret as people keep it. The secret is wrapped with
//! XChaCha20-Poly1305 under a key stretched from a passphrase with argon2id (memory-hard, so
//! guessing costs memory as well as time), or kept bare when the operator chose no passphrase
//! (a key kept in a vault or on an agent that must start unattended).
//!
//! The file is JSON, one object: `format`, `kind` (keyring, write-only or recovery),
//! `keyring` (public id), `recovery` (a recovery key's public half), `created`, `kdf` (null when
//! bare), `nonce` and `secret` (hex). The paper form ([`KeyFile::to_paper`]) is the same
//! object in short hex lines, each with its own check, so a mistyped line is named.

use super::{DataKey, Keyring, KeyringId, RecoveryKey, RecoveryPublic, WrappedKey};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

const FORMAT: &str = "rewind-key/1";

/// Why a key file could not be read or unlocked.
#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("not a Rewind key file: {0}")]
    Malformed(String),
    #[error(
        "the key is protected by a passphrase: give --passphrase-file (or type it at the prompt)"
    )]
    NeedsPassphrase,
    #[error("wrong passphrase (or the key file is damaged)")]
    WrongPassphrase,
    #[error("deriving the key from the passphrase failed: {0}")]
    Kdf(String),
    #[error("this is a {0} key file; {1} is needed here")]
    Kind(String, &'static str),
    #[error("paper key line {line}: {why}")]
    Paper { line: usize, why: String },
    #[error("{path}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Reads a passphrase: the first line of `file`, or typed at a prompt when `file` is None
/// and standard input is a terminal; None when neither.
pub fn read_passphrase(
    file: Option<&std::path::Path>,
    prompt: &str,
) -> Result<Option<Zeroizing<String>>, KeyFileError> {
    use std::io::IsTerminal;
    match file {
        Some(path) => {
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                KeyFileError::Io {
                    path: path.to_owned(),
                    source,
                }
            })?);
            let line = text.lines().next().unwrap_or("");
            Ok(Some(Zeroizing::new(line.to_owned())))
        }
        None if std::io::stdin().is_terminal() => rpassword::prompt_password(prompt)
            .map(|p| Some(Zeroizing::new(p)))
            .map_err(|source| KeyFileError::Io {
                path: "/dev/tty".into(),
                source,
            }),
        None => Ok(None),
    }
}

/// Opens the key file at `path`, unlocking it with the passphrase of `passphrase_file` (or
/// typed at a prompt) when it has one.
pub fn open_key(
    path: &std::path::Path,
    passphrase_file: Option<&std::path::Path>,
) -> Result<Keyring, KeyFileError> {
    let (file, pass) = read_unlockable(path, passphrase_file)?;
    file.unlock(pass.as_ref().map(|p| p.as_bytes()))
}

/// Opens the recovery key file at `path` ([`open_key`] for recovery keys).
pub fn open_recovery(
    path: &std::path::Path,
    passphrase_file: Option<&std::path::Path>,
) -> Result<RecoveryKey, KeyFileError> {
    let (file, pass) = read_unlockable(path, passphrase_file)?;
    file.unlock_recovery(pass.as_ref().map(|p| p.as_bytes()))
}

/// The key file at `path`, and its passphrase when it has one (from `passphrase_file`, or
/// typed at a prompt).
fn read_unlockable(
    path: &std::path::Path,
    passphrase_file: Option<&std::path::Path>,
) -> Result<(KeyFile, Option<Zeroizing<String>>), KeyFileError> {
    let file = read_key_file(path)?;
    if !file.needs_passphrase() {
        return Ok((file, None));
    }
    let prompt = format!("Passphrase for {}: ", path.display());
    let pass = read_passphrase(passphrase_file, &prompt)?;
    Ok((file, pass))
}

/// Reads and parses the key file at `path`.
pub fn read_key_file(path: &std::path::Path) -> Result<KeyFile, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    KeyFile::parse(&text)
}

/// argon2id's cost: memory in KiB, passes, lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB and 3 passes: about a quarter of a second here, and 64 MiB per guess.
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Kdf {
    algorithm: String,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
}

/// A key file as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    format: String,
    /// "keyring" (reads and writes), "write-only" (writes; wraps data keys to `recovery`) or
    /// "recovery" (a recovery key; `recovery` is its public half).
    kind: String,
    /// The keyring's public id (keyring kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keyring: Option<String>,
    /// A recovery key's public half: the file's own, or the one a keyring wraps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recovery: Option<String>,
    created: String,
    kdf: Option<Kdf>,
    nonce: String,
    secret: String,
}

fn stretch(
    passphrase: &[u8],
    salt: &[u8],
    p: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| KeyFileError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, &mut *key)
        .map_err(|e| KeyFileError::Kdf(e.to_string()))?;
    Ok(key)
}

fn unhex(what: &str, s: &str) -> Result<Vec<u8>, KeyFileError> {
    hex::decode(s).map_err(|_| KeyFileError::Malformed(format!("{what} is not hex")))
}

/// What a keyring's wrapped secret holds.
#[derive(Serialize, Deserialize)]
struct KeyringSecret {
    ids: String,
    manifest: String,
    data: Vec<String>,
    /// A write-only keyring's carried keys: hex of key id and blob, wrapped to `recovery`.
    #[serde(default)]
    wrapped: Vec<String>,
}

impl Drop for KeyringSecret {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.ids.zeroize();
        self.manifest.zeroize();
        self.data.iter_mut().for_each(Zeroize::zeroize);
    }
}

/// What a file's passphrase wrap binds besides its format and kind: the keyring id and the
/// recovery key it wraps to (or a recovery file's public key), so neither can be swapped in a
/// protected file.
fn binding(keyring: Option<&str>, recovery: Option<&str>) -> String {
    format!("{}|{}", keyring.unwrap_or(""), recovery.unwrap_or(""))
}

fn key32(what: &str, s: &str) -> Result<[u8; 32], KeyFileError> {
    unhex(what, s)?
        .try_into()
        .map_err(|_| KeyFileError::Malformed(format!("{what} is not 32 bytes")))
}

impl KeyFile {
    /// A new full keyring and its file, wrapped with `passphrase` (bare when None).
    pub fn generate(
        passphrase: Option<&[u8]>,
        params: KdfParams,
        created: String,
    ) -> Result<(KeyFile, Keyring), KeyFileError> {
        let k = Keyring::generate();
        Ok((KeyFile::of_keyring(&k, passphrase, params, created)?, k))
    }

    /// The file of keyring `k` (full, or write-only when it holds no data key).
    pub fn of_keyring(
        k: &Keyring,
        passphrase: Option<&[u8]>,
        params: KdfParams,
        created: String,
    ) -> Result<KeyFile, KeyFileError> {
        let secret = KeyringSecret {
            ids: hex::encode(k.ids_key()),
            manifest: hex::encode(k.manifest_key()),
            data: k
                .data_keys()
                .iter()
                .map(|d| hex::encode(d.secret()))
                .collect(),
            wrapped: k
                .carried()
                .iter()
                .map(|w| hex::encode([&w.key_id[..], &w.blob].concat()))
                .collect(),
        };
        let secret = Zeroizing::new(serde_json::to_vec(&secret).unwrap_or_default());
        let kind = if k.write_only() {
            "write-only"
        } else {
            "keyring"
        };
        let id = k.id().to_hex();
        let recovery = k.recovery().map(RecoveryPublic::to_hex);
        let bound = binding(Some(&id), recovery.as_deref());
        let mut f = KeyFile::wrap(kind, &bound, &secret, passphrase, params, created)?;
        f.keyring = Some(id);
        f.recovery = recovery;
        Ok(f)
    }

    /// The file of recovery key `r`.
    pub fn of_recovery(
        r: &RecoveryKey,
        passphrase: Option<&[u8]>,
        params: KdfParams,
        created: String,
    ) -> Result<KeyFile, KeyFileError> {
        let public = r.public().to_hex();
        let mut f = KeyFile::wrap(
            "recovery",
            &binding(None, Some(&public)),
            &*r.secret_bytes(),
            passphrase,
            params,
            created,
        )?;
        f.recovery = Some(public);
        Ok(f)
    }

    fn wrap(
        kind: &str,
        binding: &str,
        secret: &[u8],
        passphrase: Option<&[u8]>,
        params: KdfParams,
        created: String,
    ) -> Result<KeyFile, KeyFileError> {
        let nonce: [u8; 24] = rand::random();
        let (kdf, secret) = match passphrase {
            None => (None, secret.to_vec()),
            Some(pass) => {
                let salt: [u8; 16] = rand::random();
                let key = stretch(pass, &salt, params)?;
                let cipher = XChaCha20Poly1305::new((&*key).into());
                let aad = [FORMAT.as_bytes(), kind.as_bytes(), binding.as_bytes()].concat();
                let sealed = cipher
                    .encrypt(
                        XNonce::from_slice(&nonce),
                        Payload {
                            msg: secret,
                            aad: &aad,
                        },
                    )
                    .map_err(|_| KeyFileError::Kdf("encryption failed".into()))?;
                let kdf = Kdf {
                    algorithm: "argon2id".into(),
                    params,
                    salt: hex::encode(salt),
                };
                (Some(kdf), sealed)
            }
        };
        Ok(KeyFile {
            format: FORMAT.into(),
            kind: kind.into(),
            keyring: None,
            recovery: None,
            created,
            kdf,
            nonce: hex::encode(nonce),
            secret: hex::encode(secret),
        })
    }

    /// Reads a key file's text.
    pub fn parse(text: &str) -> Result<KeyFile, KeyFileError> {
        let f: KeyFile =
            serde_json::from_str(text).map_err(|e| KeyFileError::Malformed(e.to_string()))?;
        if f.format != FORMAT {
            return Err(KeyFileError::Malformed(format!(
                "format {:?}, this build reads {FORMAT:?}",
                f.format
            )));
        }
        match f.kind.as_str() {
            "keyring" | "write-only" => {
                f.id()?;
            }
            "recovery" => {
                f.recovery_public()?;
            }
            other => return Err(KeyFileError::Malformed(format!("kind {other:?}"))),
        }
        if let Some(kdf) = &f.kdf {
            if kdf.algorithm != "argon2id" {
                return Err(KeyFileError::Malformed(format!("kdf {:?}", kdf.algorithm)));
            }
        }
        Ok(f)
    }

    /// The file's text (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// "keyring", "write-only" or "recovery".
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The keyring's public id (keyring kinds).
    pub fn id(&self) -> Result<KeyringId, KeyFileError> {
        let id = self
            .keyring
            .as_deref()
            .ok_or_else(|| KeyFileError::Kind(self.kind.clone(), "a keyring"))?;
        KeyringId::from_slice(&unhex("keyring", id)?)
            .ok_or_else(|| KeyFileError::Malformed("keyring id is not 16 bytes".into()))
    }

    /// The recovery key's public half (a recovery file's own; the one a keyring wraps to).
    pub fn recovery_public(&self) -> Result<RecoveryPublic, KeyFileError> {
        let r = self
            .recovery
            .as_deref()
            .ok_or_else(|| KeyFileError::Kind(self.kind.clone(), "a recovery key"))?;
        RecoveryPublic::from_slice(&key32("recovery", r)?).ok_or_else(|| {
            KeyFileError::Malformed("the recovery key is a low-order point: not a key".into())
        })
    }

    pub fn needs_passphrase(&self) -> bool {
        self.kdf.is_some()
    }

    fn open_secret(&self, passphrase: Option<&[u8]>) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
        let secret = Zeroizing::new(unhex("secret", &self.secret)?);
        let Some(kdf) = &self.kdf else {
            return Ok(secret);
        };
        let pass = passphrase.ok_or(KeyFileError::NeedsPassphrase)?;
        let key = stretch(pass, &unhex("salt", &kdf.salt)?, kdf.params)?;
        let nonce = unhex("nonce", &self.nonce)?;
        if nonce.len() != 24 {
            return Err(KeyFileError::Malformed("nonce is not 24 bytes".into()));
        }
        let bound = binding(self.keyring.as_deref(), self.recovery.as_deref());
        let aad = [FORMAT.as_bytes(), self.kind.as_bytes(), bound.as_bytes()].concat();
        let cipher = XChaCha20Poly1305::new((&*key).into());
        Ok(Zeroizing::new(
            cipher
                .decrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: &secret,
                        aad: &aad,
                    },
                )
                .map_err(|_| KeyFileError::WrongPassphrase)?,
        ))
    }

    /// The keyring, unwrapped with `passphrase` when the file has one.
    pub fn unlock(&self, passphrase: Option<&[u8]>) -> Result<Keyring, KeyFileError> {
        let id = self.id()?;
        let secret = self.open_secret(passphrase)?;
        let s: KeyringSecret = serde_json::from_slice(&secret)
            .map_err(|_| KeyFileError::Malformed("the secret is not a keyring".into()))?;
        let data = s
            .data
            .iter()
            .map(|d| key32("data key", d).map(DataKey::new))
            .collect::<Result<Vec<_>, _>>()?;
        let recovery = match &self.recovery {
            Some(_) => Some(self.recovery_public()?),
            None => None,
        };
        if data.is_empty() && recovery.is_none() {
            return Err(KeyFileError::Malformed(
                "a write-only key without a recovery key to wrap to".into(),
            ));
        }
        let k = Keyring::new(
            key32("ids", &s.ids)?,
            key32("manifest", &s.manifest)?,
            data,
            recovery,
        );
        if k.id() != id {
            return Err(KeyFileError::Malformed(
                "the keyring id is not the one its keys commit to".into(),
            ));
        }
        let carried = match recovery {
            None => Vec::new(),
            Some(r) => s
                .wrapped
                .iter()
                .map(|w| {
                    let b = unhex("wrapped key", w)?;
                    match (
                        b.get(..8).and_then(|x| <[u8; 8]>::try_from(x).ok()),
                        b.get(8..),
                    ) {
                        (Some(key_id), Some(blob)) => Ok(WrappedKey {
                            key_id,
                            recovery: r,
                            blob: blob.to_vec(),
                        }),
                        _ => Err(KeyFileError::Malformed("a wrapped key is too short".into())),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(k.with_carried(carried))
    }

    /// The recovery key, unwrapped with `passphrase` when the file has one.
    pub fn unlock_recovery(&self, passphrase: Option<&[u8]>) -> Result<RecoveryKey, KeyFileError> {
        let public = self.recovery_public()?;
        if self.kind != "recovery" {
            return Err(KeyFileError::Kind(self.kind.clone(), "a recovery key"));
        }
        let secret = self.open_secret(passphrase)?;
        let bytes: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| KeyFileError::Malformed("secret is not 32 bytes".into()))?;
        let r = RecoveryKey::from_secret(bytes);
        if r.public() != public {
            return Err(KeyFileError::Malformed(
                "the secret does not match the public key".into(),
            ));
        }
        Ok(r)
    }

    /// The same file, its secret wrapped again under `new` (a changed passphrase).
    pub fn rewrapped(
        &self,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
        params: KdfParams,
    ) -> Result<KeyFile, KeyFileError> {
        let secret = self.open_secret(old)?;
        let mut f = KeyFile::wrap(
            &self.kind,
            &binding(self.keyring.as_deref(), self.recovery.as_deref()),
            &secret,
            new,
            params,
            self.created.clone(),
        )?;
        f.keyring = self.keyring.clone();
        f.recovery = self.recovery.clone();
        Ok(f)
    }

    /// The paper form: a header, then the compact JSON in hex lines of 32 characters, each
    /// followed by the first 4 hex characters of its blake3 (with its line number), so a
    /// mistyped line is found and named on import.
    pub fn to_paper(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        let hexed = hex::encode(json.as_bytes());
        let named = match (&self.keyring, &self.recovery) {
            (Some(k), _) => format!("keyring {k}"),
            (None, Some(r)) => format!("recovery key {r}"),
            (None, None) => String::new(),
        };
        let mut out = format!(
            "REWIND PAPER KEY ({FORMAT}, {})\n{named}\ncreated {}\n\n",
            self.kind, self.created
        );
        for (n, line) in hexed.as_bytes().chunks(32).enumerate() {
            let line = std::str::from_utf8(line).unwrap_or_default();
            let check = &line_check(n + 1, line)[..4];
            let groups: Vec<&str> = line
                .as_bytes()
                .chunks(4)
                .map(|g| std::str::from_utf8(g).unwrap_or_default())
                .collect();
            out.push_str(&format!("{:03}  {}  {check}\n", n + 1, groups.join(" ")));
        }
        out.push_str("\nEND\n");
        out
    }

    /// Reads the paper form back (spaces and case do not matter; a line whose check does
    /// not match is named).
    pub fn from_paper(text: &str) -> Result<KeyFile, KeyFileError> {
        let mut hexed = String::new();
        let mut expect = 1usize;
        for raw in text.lines() {
            let words: Vec<&str> = raw.split_whitespace().collect();
            let Some((first, rest)) = words.split_first() else {
                continue;
            };
            let Ok(n) = first.parse::<usize>() else {
                continue;
            };
            let Some((check, groups)) = rest.split_last() else {
                return Err(KeyFileError::Paper {
                    line: n,
                    why: "no check".into(),
                });
            };
            if n != expect {
                return Err(KeyFileError::Paper {
                    line: n,
                    why: format!("line {expect} is missing"),
                });
            }
            let line = groups.concat().to_ascii_lowercase();
            if !line_check(n, &line).starts_with(&check.to_ascii_lowercase()) || check.len() != 4 {
                return Err(KeyFileError::Paper {
                    line: n,
                    why: "its check does not match: a character is mistyped".into(),
                });
            }
            hexed.push_str(&line);
            expect += 1;
        }
        let bytes = hex::decode(&hexed).map_err(|_| KeyFileError::Paper {
            line: expect,
            why: "not hex".into(),
        })?;
        let json = String::from_utf8(bytes)
            .map_err(|_| KeyFileError::Malformed("paper key is not text".into()))?;
        KeyFile::parse(&json)
    }
}

fn line_check(n: usize, line: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&(n as u64).to_le_bytes());
    h.update(line.as_bytes());
    h.finalize().to_hex().to_string()
}
