//! `rewind-agent rollback`: bring disks on this host to a point, moving only differing blocks.

use super::sync::parse_disk;
use crate::client;
use crate::rollback::{rollback, RollbackConfig, RollbackError};
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub conn: super::ReceiverArgs,
    /// Folder for the agent's state.
    #[arg(long)]
    pub state: PathBuf,
    /// The VM.
    #[arg(long)]
    pub vm: String,
    /// The point to bring the disks to (older or newer than their content).
    #[arg(long)]
    pub point: i64,
    /// A disk as NAME=PATH or NAME=qcow2:PATH; repeat for each disk to roll back.
    #[arg(long = "disk", value_name = "NAME=PATH", required = true)]
    pub disks: Vec<String>,
    /// Only compare and report what would move.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub encryption: super::EncryptionArgs,
    /// Recovery key file: reads the VM's points through the data keys wrapped to it (needed
    /// when this agent's key is write-only; give that key too, to pin the VM's keyring).
    #[arg(long, value_name = "FILE")]
    pub recovery_key: Option<PathBuf>,
    /// File whose first line is the recovery key's passphrase (otherwise typed at a prompt).
    #[arg(long, value_name = "FILE", requires = "recovery_key")]
    pub recovery_passphrase_file: Option<PathBuf>,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: RollbackArgs) -> anyhow::Result<()> {
    rewind_proto::names::vm(&a.vm)?;
    let disks = a
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if disks.is_empty() {
        bail!("name the disks to roll back with --disk NAME=PATH");
    }
    let cfg = RollbackConfig {
        vm: a.vm.clone(),
        point: a.point,
        disks,
        state_dir: a.state.clone(),
        dry_run: a.dry_run,
        codec: a.encryption.codec(false)?,
        recovery: match &a.recovery_key {
            Some(path) => Some(std::sync::Arc::new(
                rewind_proto::crypt::open_recovery(path, a.recovery_passphrase_file.as_deref())
                    .with_context(|| format!("opening recovery key file {}", path.display()))?,
            )),
            None => None,
        },
    };
    let receiver = a.conn.config();
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let report = rt
        .block_on(async {
            let mut c = client::connect(&receiver).await?;
            rollback(&mut c, &cfg).await
        })
        .map_err(|e| {
            let hint = match &e {
                RollbackError::InUse(..) => " (stop the VM first)",
                RollbackError::SizeMismatch { .. } => {
                    " (a disk of another size is restored, not rolled back: rewind-receiver restore)"
                }
                _ => "",
            };
            anyhow::Error::new(e).context(format!(
                "rolling {} back to point {}{hint}",
                a.vm, a.point
            ))
        })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for d in &report.disks {
            println!(
                "{} {}/{} to point {}: {} blocks differ, {} bytes fetched, {} bytes written{}",
                if report.dry_run {
                    "would roll back"
                } else {
                    "rolled back"
                },
                report.vm,
                d.name,
                report.point,
                d.blocks_differing,
                d.bytes_fetched,
                d.bytes_written,
                if d.verified { ", root verified" } else { "" }
            );
        }
    }
    Ok(())
}
