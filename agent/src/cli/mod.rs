//! The `rewind-agent` command line: flags parsed into plain values, one module per subcommand.

pub mod key;
pub mod rollback;
pub mod run;
pub mod status;
pub mod sync;

use crate::client::ReceiverConfig;
use std::path::PathBuf;

/// How to reach the receiver (shared by every subcommand that talks to it).
#[derive(Debug, Clone, clap::Args)]
pub struct ReceiverArgs {
    /// Receiver URL, e.g. https://127.0.0.1:7443.
    #[arg(long)]
    pub receiver: String,
    /// CA certificate that signed the receiver's certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// This agent's certificate (its common name is the agent's identity).
    #[arg(long)]
    pub cert: PathBuf,
    /// This agent's private key.
    #[arg(long)]
    pub key: PathBuf,
}

impl ReceiverArgs {
    pub fn config(&self) -> ReceiverConfig {
        ReceiverConfig {
            url: self.receiver.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// The key of an encrypted VM (shared by every subcommand that reads or writes its chunks).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EncryptionArgs {
    /// Key file of the keyring that encrypts the VM's chunks (`rewind-agent key generate`).
    /// Encryption is fixed by a VM's first point. (`--key` is the TLS private key.)
    #[arg(long, value_name = "FILE")]
    pub encryption_key: Option<PathBuf>,
    /// File whose first line is the key file's passphrase (otherwise typed at a prompt).
    #[arg(long, value_name = "FILE", requires = "encryption_key")]
    pub passphrase_file: Option<PathBuf>,
}

impl EncryptionArgs {
    /// The codec these flags name (plain without a key file).
    pub fn codec(&self, pad: bool) -> anyhow::Result<rewind_proto::crypt::Codec> {
        use anyhow::Context;
        crate::keys::codec(
            self.encryption_key.as_deref(),
            self.passphrase_file.as_deref(),
            pad,
        )
        .with_context(|| {
            format!(
                "opening key file {}",
                self.encryption_key
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            )
        })
    }
}

use clap::{Parser, Subcommand};

/// Rewind's host agent: replicates VM disks to a Rewind receiver.
#[derive(Debug, Parser)]
#[command(name = "rewind-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take points of a VM's disks and send them to the receiver (once, or every --interval).
    Sync(sync::SyncArgs),
    /// Bring disks on this host back (or forward) to a point, moving only blocks that differ.
    Rollback(rollback::RollbackArgs),
    /// The service: protect every VM of a configuration file on its schedule (SIGHUP reloads,
    /// SIGTERM finishes or checkpoints the points in flight).
    Run(run::RunArgs),
    /// Each VM's state and why; exits non-zero when a VM has no point within 2x its RPO target.
    Status(status::StatusArgs),
    /// Key files for client-side encryption: generate, export to paper, import, show.
    Key(key::KeyArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sync(a) => sync::run(a),
        Command::Rollback(a) => rollback::run(a),
        Command::Run(a) => run::run(a),
        Command::Status(a) => status::run(a),
        Command::Key(a) => key::run(a),
    }
}
