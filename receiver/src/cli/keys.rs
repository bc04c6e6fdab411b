//! `rewind-receiver keys`: the data keys of encrypted VMs kept wrapped to recovery keys, and
//! their rotation to a new recovery key (`keys rewrap`). The receiver holds no key that opens
//! them: a rewrap needs the old recovery key, given on purpose, and re-reads no chunk.

use crate::catalog::{self, keys, now_us};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rewind_proto::crypt::{open_recovery, read_key_file, KeyringId};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: Option<KeysCommand>,
    /// Data folder.
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Wrap every data key wrapped to the old recovery key to a new one instead (in one
    /// transaction; the old wrapped copies are removed).
    Rewrap {
        /// The old recovery key's file.
        #[arg(long, value_name = "FILE")]
        recovery_key: PathBuf,
        /// File whose first line is the old recovery key's passphrase.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// The new recovery key's file (only its public half is read).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

pub fn run(a: KeysArgs) -> anyhow::Result<()> {
    let data = a.data.clone().context("give --data")?;
    match a.command {
        None => list(&data, a.json),
        Some(KeysCommand::Rewrap {
            recovery_key,
            passphrase_file,
            to,
        }) => {
            let old = open_recovery(&recovery_key, passphrase_file.as_deref())
                .with_context(|| format!("opening {}", recovery_key.display()))?;
            let new = read_key_file(&to)?.recovery_public()?;
            let mut conn = catalog::open_existing(&data)
                .with_context(|| format!("opening the catalog in {}", data.display()))?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut n = 0u64;
            let mut skipped = 0u64;
            for (owner, keyring, w) in keys::all(&tx)? {
                if w.recovery != old.public() {
                    continue;
                }
                let Some(id) = KeyringId::from_slice(&keyring) else {
                    skipped += 1;
                    continue;
                };
                match old.rewrap(id, &w, &new) {
                    Some(again) => {
                        keys::replace(&tx, (&owner, &keyring), &w, &again, now_us())?;
                        n += 1;
                    }
                    None => skipped += 1,
                }
            }
            if n == 0 && skipped == 0 {
                bail!(
                    "no data key here is wrapped to recovery key {}",
                    old.public().to_hex()
                );
            }
            tx.commit()?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"rewrapped": n, "skipped": skipped, "from": old.public().to_hex(), "to": new.to_hex()})
                );
            } else {
                println!(
                    "{n} data keys rewrapped from recovery key {} to {}{}",
                    old.public().to_hex(),
                    new.to_hex(),
                    if skipped > 0 {
                        format!(" ({skipped} that do not unwrap with the old key left as they are)")
                    } else {
                        String::new()
                    }
                );
            }
            Ok(())
        }
    }
}

/// Wrapped keys per owner, keyring and recovery key.
fn list(data: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let conn = catalog::open_ro(data)
        .with_context(|| format!("opening the catalog in {}", data.display()))?;
    let mut counts: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for (owner, keyring, w) in keys::all(&conn)? {
        *counts
            .entry((owner, hex::encode(keyring), w.recovery.to_hex()))
            .or_default() += 1;
    }
    if json {
        let rows: Vec<_> = counts
            .iter()
            .map(|((owner, keyring, recovery), n)| {
                serde_json::json!({"owner": owner, "keyring": keyring, "recovery": recovery, "keys": n})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for ((owner, keyring, recovery), n) in &counts {
            println!("{owner} keyring {keyring}: {n} data keys wrapped to recovery key {recovery}");
        }
    }
    Ok(())
}
