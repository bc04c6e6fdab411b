//! `rewind-agent key`: make and keep the key files of client-side encryption.
//!
//! - `generate --out FILE`: a new keyring, wrapped with a passphrase (argon2id) read from
//!   `--passphrase-file` or typed twice at a prompt; `--no-passphrase` keeps it bare.
//!   `--recovery` makes a recovery key instead; `--wrap-to RECOVERY` has the keyring wrap its
//!   data keys to a recovery key (which then reads its points too).
//! - `write-only --key FILE --recovery RECOVERY --out FILE`: the key of a write-only agent
//!   (adds points, reads none; each session's data key is wrapped to the recovery key).
//! - `rotate --key FILE --out FILE`: the keyring with a new data key for new points (nothing
//!   is re-read or re-sent; earlier points stay readable with the new file).
//! - `export --paper FILE`: a printable form, each line with its own check.
//! - `import --paper PAPER --out FILE`: the key file back from its printed form.
//! - `show FILE`: the keyring's public id and whether a passphrase protects it.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rewind_proto::crypt::{read_key_file, read_passphrase, KdfParams, KeyFile};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Make a new keyring and write its key file (mode 0600; never overwrites).
    Generate {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// File whose first line is the passphrase (otherwise typed at a prompt, twice).
        #[arg(long, value_name = "FILE", conflicts_with = "no_passphrase")]
        passphrase_file: Option<PathBuf>,
        /// Keep the secret bare (for a key held in a vault or an unattended agent).
        #[arg(long)]
        no_passphrase: bool,
        /// argon2id memory in MiB (64 by default).
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        kdf_mib: u32,
        /// Make a recovery key (kept away from the agents) instead of a keyring.
        #[arg(long)]
        recovery: bool,
        /// Wrap the keyring's data keys to this recovery key (its file; only the public half
        /// is read).
        #[arg(long, value_name = "RECOVERY", conflicts_with = "recovery")]
        wrap_to: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Make a write-only agent key from a keyring and a recovery key.
    WriteOnly {
        /// The keyring's key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The recovery key's file (only its public half is read: no passphrase needed).
        #[arg(long, value_name = "RECOVERY")]
        recovery: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The passphrase of --key, and of the new file unless --no-passphrase.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Keep the new file bare (an agent that starts unattended).
        #[arg(long)]
        no_passphrase: bool,
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        kdf_mib: u32,
        #[arg(long)]
        json: bool,
    },
    /// Rotate a keyring's data key: new points are sealed with a new one. With --wrap-to,
    /// its data keys are wrapped to that recovery key from now on (a new recovery key).
    Rotate {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_name = "RECOVERY")]
        wrap_to: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The passphrase of --key and of the new file.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        kdf_mib: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print a key file in a form to print and keep on paper.
    Export {
        /// The printable form (the only export there is).
        #[arg(long, value_name = "FILE")]
        paper: PathBuf,
    },
    /// Rebuild a key file from its paper form (typed in, spaces and case free).
    Import {
        #[arg(long, value_name = "PAPER")]
        paper: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// The keyring's public id and whether a passphrase protects the file.
    Show {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes a new file readable by its owner only; an existing file is never replaced.
fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing key file is never replaced)",
                path.display()
            )
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn new_passphrase(file: Option<&Path>) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let Some(first) = read_passphrase(file, "New passphrase: ")? else {
        bail!(
            "give --passphrase-file, type the passphrase at a terminal, or choose --no-passphrase"
        );
    };
    if file.is_none() {
        let again = read_passphrase(None, "Again: ")?.unwrap_or_default();
        if *again != *first {
            bail!("the two passphrases differ");
        }
    }
    if first.is_empty() {
        bail!("an empty passphrase protects nothing: choose --no-passphrase to mean that");
    }
    Ok(first)
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn params(kdf_mib: u32) -> KdfParams {
    KdfParams {
        memory_kib: kdf_mib.max(8) * 1024,
        ..KdfParams::default()
    }
}

/// Prints what a command wrote.
fn written(json: bool, out: &Path, file: &KeyFile, pass: bool) -> anyhow::Result<()> {
    let (what, id) = match file.kind() {
        "recovery" => ("recovery key", file.recovery_public()?.to_hex()),
        kind => (kind, file.id()?.to_hex()),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"file": out, "kind": file.kind(), "id": id, "passphrase": pass})
        );
    } else {
        println!("{what} {id} written to {}", out.display());
        println!(
            "keep a copy away from this host: `rewind-agent key export --paper {}`",
            out.display()
        );
    }
    Ok(())
}

/// `key rotate`: the keyring with a new data key in front (and, with `wrap_to`, wrapping to a
/// new recovery key), written to `out` under the same passphrase.
fn rotate(
    key: &Path,
    wrap_to: Option<&Path>,
    out: &Path,
    passphrase_file: Option<&Path>,
    kdf_mib: u32,
    json: bool,
) -> anyhow::Result<()> {
    let k = rewind_proto::crypt::open_key(key, passphrase_file)
        .with_context(|| format!("opening {}", key.display()))?;
    if k.write_only() {
        bail!("a write-only key has no data key to rotate: each of its sessions makes a new one");
    }
    if k.data_keys().len() >= 63 {
        bail!(
            "this keyring has {} data keys, the most a key file keeps",
            k.data_keys().len()
        );
    }
    let mut k = k.rotated();
    if let Some(r) = wrap_to {
        k = k.with_recovery(read_key_file(r)?.recovery_public()?);
    }
    let pass = read_passphrase(passphrase_file, "Passphrase of the new file: ")?;
    let file = KeyFile::of_keyring(
        &k,
        pass.as_ref().map(|p| p.as_bytes()),
        params(kdf_mib),
        now(),
    )?;
    write_new(out, &file.to_json())?;
    written(json, out, &file, pass.is_some())
}

pub fn run(a: KeyArgs) -> anyhow::Result<()> {
    match a.command {
        KeyCommand::Generate {
            out,
            passphrase_file,
            no_passphrase,
            kdf_mib,
            recovery,
            wrap_to,
            json,
        } => {
            let pass = if no_passphrase {
                None
            } else {
                Some(new_passphrase(passphrase_file.as_deref())?)
            };
            let pass_bytes = pass.as_ref().map(|p| p.as_bytes());
            let file = if recovery {
                let r = rewind_proto::crypt::RecoveryKey::generate();
                KeyFile::of_recovery(&r, pass_bytes, params(kdf_mib), now())?
            } else {
                let mut k = rewind_proto::crypt::Keyring::generate();
                if let Some(r) = &wrap_to {
                    k = k.with_recovery(read_key_file(r)?.recovery_public()?);
                }
                KeyFile::of_keyring(&k, pass_bytes, params(kdf_mib), now())?
            };
            write_new(&out, &file.to_json())?;
            written(json, &out, &file, pass.is_some())?;
        }
        KeyCommand::WriteOnly {
            key,
            recovery,
            out,
            passphrase_file,
            no_passphrase,
            kdf_mib,
            json,
        } => {
            let k = rewind_proto::crypt::open_key(&key, passphrase_file.as_deref())
                .with_context(|| format!("opening {}", key.display()))?;
            if k.write_only() {
                bail!(
                    "{} is write-only: make write-only keys from the full keyring's file",
                    key.display()
                );
            }
            let r = read_key_file(&recovery)?.recovery_public()?;
            let pass = match no_passphrase {
                true => None,
                false => {
                    read_passphrase(passphrase_file.as_deref(), "Passphrase of the new file: ")?
                }
            };
            let file = KeyFile::of_keyring(
                &k.write_only_for(r),
                pass.as_ref().map(|p| p.as_bytes()),
                params(kdf_mib),
                now(),
            )?;
            write_new(&out, &file.to_json())?;
            written(json, &out, &file, pass.is_some())?;
        }
        KeyCommand::Rotate {
            key,
            wrap_to,
            out,
            passphrase_file,
            kdf_mib,
            json,
        } => rotate(
            &key,
            wrap_to.as_deref(),
            &out,
            passphrase_file.as_deref(),
            kdf_mib,
            json,
        )?,
        KeyCommand::Export { paper } => {
            let file = KeyFile::parse(&read(&paper)?)?;
            print!("{}", file.to_paper());
        }
        KeyCommand::Import { paper, out } => {
            let file = KeyFile::from_paper(&read(&paper)?)?;
            write_new(&out, &file.to_json())?;
            written(false, &out, &file, file.needs_passphrase())?;
        }
        KeyCommand::Show { file, json } => {
            let f = KeyFile::parse(&read(&file)?)?;
            let id = match f.kind() {
                "recovery" => f.recovery_public()?.to_hex(),
                _ => f.id()?.to_hex(),
            };
            let wraps_to = match f.kind() {
                "recovery" => None,
                _ => f.recovery_public().ok().map(|r| r.to_hex()),
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"kind": f.kind(), "id": id, "wraps_to": wraps_to, "passphrase": f.needs_passphrase()})
                );
            } else {
                let how = if f.needs_passphrase() {
                    "protected by a passphrase"
                } else {
                    "bare (no passphrase)"
                };
                let wraps = wraps_to.map_or(String::new(), |r| {
                    format!(", wraps data keys to recovery key {r}")
                });
                println!("{} {id}, {how}{wraps}", f.kind());
            }
        }
    }
    Ok(())
}
