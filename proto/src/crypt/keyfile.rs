//! Key files: a keyring's master secret as people keep it. The secret is wrapped with
//! XChaCha20-Poly1305 under a key stretched from a passphrase with argon2id (memory-hard, so
//! guessing costs memory as well as time), or kept bare when the operator chose no passphrase
//! (a key kept in a vault or on an agent that must start unattended).
//!
//! The file is JSON, one object: `format`, `keyring` (public id), `created`, `kdf` (null when
//! bare), `nonce` and `secret` (hex). The paper form ([`KeyFile::to_paper`]) is the same
//! object in short hex lines, each with its own check, so a mistyped line is named.

use super::{Keyring, KeyringId};
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
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let file = KeyFile::parse(&text)?;
    if !file.needs_passphrase() {
        return file.unlock(None);
    }
    let pass = read_passphrase(
        passphrase_file,
        &format!("Passphrase for {}: ", path.display()),
    )?;
    file.unlock(pass.as_ref().map(|p| p.as_bytes()))
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
    keyring: String,
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

impl KeyFile {
    /// A new keyring with a fresh master secret, wrapped with `passphrase` (bare when None).
    pub fn generate(
        passphrase: Option<&[u8]>,
        params: KdfParams,
        created: String,
    ) -> Result<(KeyFile, Keyring), KeyFileError> {
        let id = KeyringId(rand::random());
        let master = Zeroizing::new(rand::random::<[u8; 32]>());
        let file = KeyFile::wrap(id, &master, passphrase, params, created)?;
        Ok((file, Keyring::from_master(id, &master)))
    }

    fn wrap(
        id: KeyringId,
        master: &[u8; 32],
        passphrase: Option<&[u8]>,
        params: KdfParams,
        created: String,
    ) -> Result<KeyFile, KeyFileError> {
        let nonce: [u8; 24] = rand::random();
        let (kdf, secret) = match passphrase {
            None => (None, master.to_vec()),
            Some(pass) => {
                let salt: [u8; 16] = rand::random();
                let key = stretch(pass, &salt, params)?;
                let cipher = XChaCha20Poly1305::new((&*key).into());
                let aad = [FORMAT.as_bytes(), &id.0].concat();
                let sealed = cipher
                    .encrypt(
                        XNonce::from_slice(&nonce),
                        Payload {
                            msg: master,
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
            keyring: id.to_hex(),
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
        f.id()?;
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

    /// The keyring's public id.
    pub fn id(&self) -> Result<KeyringId, KeyFileError> {
        KeyringId::from_slice(&unhex("keyring", &self.keyring)?)
            .ok_or_else(|| KeyFileError::Malformed("keyring id is not 16 bytes".into()))
    }

    pub fn needs_passphrase(&self) -> bool {
        self.kdf.is_some()
    }

    /// The keyring, unwrapped with `passphrase` when the file has one.
    pub fn unlock(&self, passphrase: Option<&[u8]>) -> Result<Keyring, KeyFileError> {
        let id = self.id()?;
        let secret = Zeroizing::new(unhex("secret", &self.secret)?);
        let master: Zeroizing<Vec<u8>> = match &self.kdf {
            None => secret,
            Some(kdf) => {
                let pass = passphrase.ok_or(KeyFileError::NeedsPassphrase)?;
                let key = stretch(pass, &unhex("salt", &kdf.salt)?, kdf.params)?;
                let nonce = unhex("nonce", &self.nonce)?;
                if nonce.len() != 24 {
                    return Err(KeyFileError::Malformed("nonce is not 24 bytes".into()));
                }
                let cipher = XChaCha20Poly1305::new((&*key).into());
                let aad = [FORMAT.as_bytes(), &id.0].concat();
                Zeroizing::new(
                    cipher
                        .decrypt(
                            XNonce::from_slice(&nonce),
                            Payload {
                                msg: &secret,
                                aad: &aad,
                            },
                        )
                        .map_err(|_| KeyFileError::WrongPassphrase)?,
                )
            }
        };
        let master: [u8; 32] = master
            .as_slice()
            .try_into()
            .map_err(|_| KeyFileError::Malformed("secret is not 32 bytes".into()))?;
        let master = Zeroizing::new(master);
        Ok(Keyring::from_master(id, &master))
    }

    /// The paper form: a header, then the compact JSON in hex lines of 32 characters, each
    /// followed by the first 4 hex characters of its blake3 (with its line number), so a
    /// mistyped line is found and named on import.
    pub fn to_paper(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        let hexed = hex::encode(json.as_bytes());
        let mut out = format!(
            "REWIND PAPER KEY ({FORMAT})\nkeyring {}\ncreated {}\n\n",
            self.keyring, self.created
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
