//! The `rewind-receiver` command line: flags parsed into plain values, one module per
//! subcommand, each delegating to the library.

pub mod diff;
pub mod drill;
pub mod export;
pub mod gc;
pub mod keys;
pub mod lock;
pub mod pki;
pub mod points;
pub mod prune;
pub mod recover;
pub mod restore;
pub mod serve;
pub mod status;
pub mod verify;

/// The key of an encrypted VM, for what reads its points' plaintext (restore, export, drill).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EncryptionArgs {
    /// Key file of the keyring an encrypted VM's chunks are sealed with (the agent's `key
    /// generate`, or the recovery copy). Not needed for plain VMs. (`--key` is TLS.)
    #[arg(long, value_name = "FILE")]
    pub encryption_key: Option<std::path::PathBuf>,
    /// Recovery key file (`rewind-agent key generate --recovery`): reads every point whose
    /// data keys were wrapped to it, those of write-only agents included.
    #[arg(long, value_name = "FILE", conflicts_with = "encryption_key")]
    pub recovery_key: Option<std::path::PathBuf>,
    /// With --recovery-key: the keyring id the VM must be encrypted with (its agents' key
    /// files show it: `rewind-agent key show`). Pins what a recovery key reads to keyrings
    /// the operator knows, whatever the catalog says.
    #[arg(long, value_name = "ID", requires = "recovery_key")]
    pub keyring: Option<String>,
    /// File whose first line is the key file's passphrase (otherwise typed at a prompt).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<std::path::PathBuf>,
}

impl EncryptionArgs {
    /// The key these flags name, unlocked.
    pub fn key(&self) -> anyhow::Result<crate::keys::Key> {
        use anyhow::Context;
        use std::sync::Arc;
        let pass = self.passphrase_file.as_deref();
        Ok(match (&self.encryption_key, &self.recovery_key) {
            (Some(path), _) => crate::keys::Key::Keyring(Arc::new(
                rewind_proto::crypt::open_key(path, pass)
                    .with_context(|| format!("opening key file {}", path.display()))?,
            )),
            (None, Some(path)) => crate::keys::Key::Recovery(
                Arc::new(
                    rewind_proto::crypt::open_recovery(path, pass)
                        .with_context(|| format!("opening recovery key file {}", path.display()))?,
                ),
                match &self.keyring {
                    Some(id) => Some(
                        hex::decode(id)
                            .ok()
                            .and_then(|b| rewind_proto::crypt::KeyringId::from_slice(&b))
                            .with_context(|| format!("--keyring {id:?} is not 32 hex digits"))?,
                    ),
                    None => None,
                },
            ),
            (None, None) => crate::keys::Key::None,
        })
    }
}

use clap::{Parser, Subcommand};

/// Keep rules (restic's `forget --keep-*` meaning), shared by `prune` and `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct KeepArgs {
    /// Keep the N newest points.
    #[arg(long)]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N hours that have points.
    #[arg(long)]
    pub keep_hourly: Option<u32>,
    /// ... of each of the last N days.
    #[arg(long)]
    pub keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    /// ... of each of the last N years.
    #[arg(long)]
    pub keep_yearly: Option<u32>,
}

impl KeepArgs {
    pub fn policy(&self) -> crate::retention::Policy {
        crate::retention::Policy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
        }
    }
}

/// The configuration file named by `--config` (empty without one) and the data folder: `--data`
/// or the file's.
pub fn config_and_data(
    config: Option<&std::path::Path>,
    data: Option<&std::path::Path>,
) -> anyhow::Result<(crate::config::ReceiverFile, std::path::PathBuf)> {
    let file = match config {
        Some(p) => crate::config::ReceiverFile::load(p)?,
        None => crate::config::ReceiverFile::default(),
    };
    let data = data
        .map(std::path::Path::to_path_buf)
        .or(file.data.clone())
        .ok_or_else(|| anyhow::anyhow!("give --data or a --config with a data folder"))?;
    Ok((file, data))
}

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
    /// Write disks of a point as raw, qcow2, vmdk or vhdx images.
    Restore(restore::RestoreArgs),
    /// Which extents changed between two points (from the catalog, no chunk reads).
    Diff(diff::DiffArgs),
    /// Remove points by keep rules (locked and newest points always stay).
    Prune(prune::PruneArgs),
    /// Free the space of chunks no point references (safe while serve runs).
    Gc(gc::GcArgs),
    /// Rebuild a data folder from its object store alone (the newest catalog snapshot).
    Recover(recover::RecoverArgs),
    /// Re-read and re-hash chunks; quarantine bad ones and name the points they damage.
    Verify(verify::VerifyArgs),
    /// Protect a point from prune until a date.
    Lock(lock::LockArgs),
    /// Serve a point's disks over NBD, read-only, straight from the store.
    Export(export::ExportArgs),
    /// DR drill: verify every block of a point and, with --boot, boot it in an isolated QEMU;
    /// records RPO and RTO. Exits non-zero when the drill fails.
    Drill(drill::DrillArgs),
    /// The record of past drills.
    Drills(drill::DrillsArgs),
    /// Encrypted VMs' data keys kept wrapped to recovery keys; `keys rewrap` rotates the
    /// recovery key.
    Keys(keys::KeysArgs),
    /// Each VM's state (seeding, replicating, behind, failing) and why; exits non-zero when
    /// any VM is behind or failing.
    Status(status::StatusArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pki(c) => pki::run(c),
        Command::Serve(a) => serve::run(a),
        Command::Points(a) => points::run(a),
        Command::Restore(a) => restore::run(a),
        Command::Export(a) => export::run(a),
        Command::Diff(a) => diff::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Lock(a) => lock::run(a),
        Command::Gc(a) => gc::run(a),
        Command::Recover(a) => recover::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Drill(a) => drill::run(a),
        Command::Drills(a) => drill::list(a),
        Command::Keys(a) => keys::run(a),
        Command::Status(a) => status::run(a),
    }
}
