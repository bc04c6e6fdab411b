//! `rewind-receiver pki init|issue|renew|revoke`.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA and the receiver's certificate (ca.pem, ca.key, receiver.pem, receiver.key).
    Init(InitArgs),
    /// Issue an agent's client certificate (NAME.pem, NAME.key) signed by the CA.
    Issue(IssueArgs),
    /// Replace an agent's (or the receiver's) certificate and key with new ones.
    Renew(RenewArgs),
    /// Revoke every certificate issued to an agent (crl.pem; `serve` reloads it on SIGHUP and
    /// closes the agent's connections).
    Revoke(RevokeArgs),
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
    /// Days the certificate stays valid (1 to 1826).
    #[arg(long, default_value_t = crate::pki::LEAF_DAYS)]
    pub days: u32,
    /// A replica identity, for a second receiver that copies this one's points: it can read
    /// every VM's points, blocks and chunks, and can neither write nor delete anything.
    #[arg(long)]
    pub replica: bool,
}

#[derive(Debug, Args)]
pub struct RenewArgs {
    /// The PKI folder made by `pki init`.
    #[arg(long)]
    pub dir: PathBuf,
    /// The agent whose certificate to replace.
    #[arg(
        long,
        required_unless_present = "receiver",
        conflicts_with = "receiver"
    )]
    pub agent: Option<String>,
    /// Replace the receiver's certificate instead (same names; restart serve to use it).
    #[arg(long)]
    pub receiver: bool,
    /// Days the new certificate stays valid (1 to 1826).
    #[arg(long, default_value_t = crate::pki::LEAF_DAYS)]
    pub days: u32,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The PKI folder made by `pki init`.
    #[arg(long)]
    pub dir: PathBuf,
    /// The agent to revoke.
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
            let (cert, key) = crate::pki::issue(&a.dir, &a.agent, a.days, a.replica)
                .with_context(|| format!("issuing a certificate for agent {}", a.agent))?;
            println!(
                "issued {} and {} (valid {} days)",
                cert.display(),
                key.display(),
                a.days
            );
        }
        PkiCommand::Renew(a) => {
            let who = a.agent.as_deref().unwrap_or("the receiver");
            let (cert, key) = crate::pki::renew(&a.dir, a.agent.as_deref(), a.days)
                .with_context(|| format!("renewing the certificate of {who}"))?;
            println!(
                "renewed {} and {} (valid {} days); the old certificate stays valid until it expires unless revoked",
                cert.display(),
                key.display(),
                a.days
            );
        }
        PkiCommand::Revoke(a) => {
            let n = crate::pki::revoke(&a.dir, &a.agent)
                .with_context(|| format!("revoking agent {}", a.agent))?;
            println!(
                "revoked {n} certificate(s) of agent {} in {}; send SIGHUP to serve (systemctl reload rewind-receiver) to apply",
                a.agent,
                a.dir.join(crate::pki::CRL).display()
            );
        }
    }
    Ok(())
}
