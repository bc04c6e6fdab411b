//! The `rewind-receiver` command line: flags parsed into plain values, one module per
//! subcommand, each delegating to the library.

pub mod pki;
pub mod points;
pub mod restore;
pub mod serve;

use clap::{Parser, Subcommand};

/// Rewind's offsite receiver: stores verified points of VM disks and restores them.
#[derive(Debug, Parser)]
#[command(name = "rewind-receiver", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the deployment's certificates (CA, receiver, agents).
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Accept points from agents over mutual TLS.
    Serve(serve::ServeArgs),
    /// List the committed points of a VM (or of all VMs).
    Points(points::PointsArgs),
    /// Write one disk of a point as a raw image.
    Restore(restore::RestoreArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pki(c) => pki::run(c),
        Command::Serve(a) => serve::run(a),
        Command::Points(a) => points::run(a),
        Command::Restore(a) => restore::run(a),
    }
}
