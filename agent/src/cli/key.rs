//! `rewind-agent key`: make and keep the key files of client-side encryption.
//!
//! - `generate --out FILE`: a new keyring, wrapped with a passphrase (argon2id) read from
//!   `--passphrase-file` or typed twice at a prompt; `--no-passphrase` keeps it bare.
//! - `export --paper FILE`: a printable form, each line with its own check.
//! - `import --paper PAPER --out FILE`: the key file back from its printed form.
//! - `show FILE`: the keyring's public id and whether a passphrase protects it.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rewind_proto::crypt::{read_passphrase, KdfParams, KeyFile};
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

pub fn run(a: KeyArgs) -> anyhow::Result<()> {
    match a.command {
        KeyCommand::Generate {
            out,
            passphrase_file,
            no_passphrase,
            kdf_mib,
            json,
        } => {
            let pass = if no_passphrase {
                None
            } else {
                Some(new_passphrase(passphrase_file.as_deref())?)
            };
            let params = KdfParams {
                memory_kib: kdf_mib.max(8) * 1024,
                ..KdfParams::default()
            };
            let created = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let (file, _) =
                KeyFile::generate(pass.as_ref().map(|p| p.as_bytes()), params, created)?;
            write_new(&out, &file.to_json())?;
            let id = file.id()?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": out, "keyring": id.to_hex(), "passphrase": pass.is_some()})
                );
            } else {
                println!("keyring {id} written to {}", out.display());
                println!(
                    "keep a copy away from this host: `rewind-agent key export --paper {}`",
                    out.display()
                );
            }
        }
        KeyCommand::Export { paper } => {
            let file = KeyFile::parse(&read(&paper)?)?;
            print!("{}", file.to_paper());
        }
        KeyCommand::Import { paper, out } => {
            let file = KeyFile::from_paper(&read(&paper)?)?;
            write_new(&out, &file.to_json())?;
            println!("keyring {} written to {}", file.id()?, out.display());
        }
        KeyCommand::Show { file, json } => {
            let f = KeyFile::parse(&read(&file)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"keyring": f.id()?.to_hex(), "passphrase": f.needs_passphrase()})
                );
            } else {
                let how = if f.needs_passphrase() {
                    "protected by a passphrase"
                } else {
                    "bare (no passphrase)"
                };
                println!("keyring {}, {how}", f.id()?);
            }
        }
    }
    Ok(())
}
