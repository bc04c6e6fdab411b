//! `rewind-receiver pki init|issue`.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA and the receiver's certificate (ca.pem, ca.key, receiver.pem, receiver.key).
    Init(InitArgs),
    /// Issue an agent's client certificate (NAME.pem, NAME.key) signed by the CA.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Folder for the PKI files (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Extra names for the receiver's certificate, besides localhost, 127.0.0.1 and ::1.
    #[arg(long = "san", value_name = "HOST")]
    pub sans: Vec<String>,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The PKI folder made by `pki init`.
    #[arg(long)]
    pub dir: PathBuf,
    /// The agent's identity (its certificate's common name).
    #[arg(long)]
    pub agent: String,
}

pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init(a) => {
            crate::pki::init(&a.dir, &a.sans)
                .with_context(|| format!("creating the PKI in {}", a.dir.display()))?;
            println!("PKI created in {}", a.dir.display());
        }
        PkiCommand::Issue(a) => {
            let (cert, key) = crate::pki::issue(&a.dir, &a.agent)
                .with_context(|| format!("issuing a certificate for agent {}", a.agent))?;
            println!("issued {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}
