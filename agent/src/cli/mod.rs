//! The `rewind-agent` command line: flags parsed into plain values, one module per subcommand.

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
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sync(a) => sync::run(a),
        Command::Rollback(a) => rollback::run(a),
        Command::Run(a) => run::run(a),
        Command::Status(a) => status::run(a),
    }
}
