//! The `rewind-agent` command line: flags parsed into plain values, one module per subcommand.

pub mod sync;

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
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sync(a) => sync::run(a),
    }
}
