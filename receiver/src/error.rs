//! The receiver's storage errors: each variant is one thing a caller can tell apart, and its doc
//! line is its message.

use rewind_proto::chunk::ChunkError;
use rewind_proto::format::BadGeometry;
use rewind_proto::hash::BadHashLength;
use rewind_proto::names::BadName;
use rewind_proto::{BlockHash, DiskRoot};
use thiserror::Error;

use crate::chunks::ChunkStoreError;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The catalog database failed.
    #[error("catalog")]
    Sql(#[from] rusqlite::Error),
    /// The chunk store could not read or write a pack.
    #[error(transparent)]
    Pack(#[from] ChunkStoreError),
    /// A file outside the packs could not be read or written.
    #[error("{path}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A VM or disk name with path characters or of bad length.
    #[error(transparent)]
    Name(#[from] BadName),
    /// A disk whose size or block size is outside the limits.
    #[error("disk {disk}")]
    Geometry { disk: String, source: BadGeometry },
    /// A point needs at least one disk and at most [`rewind_proto::format::MAX_DISKS`].
    #[error("a point needs 1 to {max} disks, got {got}")]
    DiskCount { got: usize, max: usize },
    /// Two disks of one VM with the same name.
    #[error("disk {0} is named twice")]
    DuplicateDisk(String),
    /// No VM of that name exists.
    #[error("no VM named {0}")]
    UnknownVm(String),
    /// The VM belongs to another agent.
    #[error("VM {vm} belongs to another agent; {caller} may not write or read it")]
    NotOwner { vm: String, caller: String },
    /// The VM is a copy of another receiver's: only that copy adds its points.
    #[error("VM {vm} is a copy of {from}'s: only that copy writes it")]
    CopiedVm { vm: String, from: String },
    /// No session of that id exists (or it belongs to another agent).
    #[error("no session {0}")]
    UnknownSession(String),
    /// The session was already committed or abandoned.
    #[error("session {0} is not open")]
    SessionClosed(String),
    /// A batch names a disk the session does not have.
    #[error("block entry names disk #{pos}, the session has {disks}")]
    NoSuchDisk { pos: u32, disks: usize },
    /// A block index past the end of its disk.
    #[error("block {index} is past the end of disk {disk} ({blocks} blocks)")]
    BlockOutOfRange {
        disk: String,
        index: u64,
        blocks: u64,
    },
    /// A hash that is not 32 bytes.
    #[error(transparent)]
    HashLength(#[from] BadHashLength),
    /// A chunk failed verification (bad frame, size or hash).
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// A batch refers to a chunk the agent neither sent nor holds.
    #[error("block {index} of disk {disk} refers to chunk {hash}, which this agent does not hold")]
    ChunkNotHeld {
        disk: String,
        index: u64,
        hash: BlockHash,
    },
    /// A chunk that no block entry of its batch refers to.
    #[error("chunk {0} is not referenced by any block entry of its batch")]
    UnreferencedChunk(BlockHash),
    /// The chunk has a different length than the block it is used for.
    #[error("block {index} of disk {disk} needs {expected} bytes, chunk {hash} holds {stored}")]
    ChunkLength {
        disk: String,
        index: u64,
        hash: BlockHash,
        expected: usize,
        stored: usize,
    },
    /// A batch or question larger than the limits.
    #[error("{what}: {got} exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        got: usize,
        max: usize,
    },
    /// Another point of the VM was committed since this session began.
    #[error(
        "VM {vm} has a newer point ({actual}) than this session's base ({expected}): start again"
    )]
    BaseMoved {
        vm: String,
        expected: i64,
        actual: i64,
    },
    /// The configuration kept with a point is not a small JSON object.
    #[error("the VM configuration must be a JSON object of at most {max} bytes")]
    BadConfig { max: usize },
    /// An unknown consistency label.
    #[error("unknown consistency {0:?}")]
    BadConsistency(String),
    /// A Begin whose keyring is not the one the VM's history is sealed with (or none where
    /// there is one, or one where the history is plain): encryption is fixed by a VM's first
    /// point.
    #[error(
        "VM {vm} is {has}; this agent sends {sent}: encryption is fixed by a VM's first point"
    )]
    KeyringMismatch {
        vm: String,
        has: String,
        sent: String,
    },
    /// An encrypted point read without its key where plaintext is needed, with another
    /// keyring's key, or whose manifest MAC does not verify.
    #[error("{0}")]
    Key(String),
    /// A commit of an encrypted VM without a 32-byte manifest MAC, or of a plain VM with one.
    #[error("a commit of {0} must carry a 32-byte manifest MAC exactly when its VM is encrypted")]
    ManifestMac(String),
    /// Commit roots do not name exactly the session's disks.
    #[error(
        "commit must give one root for each disk of the session; disk {0} is missing or unknown"
    )]
    RootSet(String),
    /// The receiver's root differs from the agent's: nothing was committed.
    #[error(
        "disk {disk}: agent root {agent} differs from stored root {stored}; point not committed"
    )]
    RootMismatch {
        disk: String,
        agent: DiskRoot,
        stored: DiskRoot,
    },
    /// No point with that id for that VM.
    #[error("VM {vm} has no point {point}")]
    UnknownPoint { vm: String, point: i64 },
    /// No point at or before the asked time.
    #[error("VM {vm} has no point created at or before {at}")]
    NoPointAt { vm: String, at: String },
    /// The point has no disk of that name.
    #[error("point {point} has no disk {disk}")]
    UnknownDisk { point: i64, disk: String },
    /// A signal asked the operation to stop.
    #[error("cancelled")]
    Cancelled,
    /// A chunk the catalog names is missing from the catalog's chunk index.
    /// A record the catalog keeps for itself does not parse: the catalog is damaged there.
    #[error("catalog record {what} is damaged")]
    CorruptRecord {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("chunk {0} is referenced but not in the chunk index")]
    MissingChunk(BlockHash),
    /// An agent's quota does not allow what it asked for.
    #[error("agent {agent} is at its quota: {what} (quota {key} = {limit})")]
    Quota {
        agent: String,
        what: String,
        key: &'static str,
        limit: u64,
    },
    /// Another commit of the same VM is running (or this one's steps were undone).
    #[error("a commit of this VM is in progress (session {0}): try again when it has finished")]
    CommitRunning(String),
    /// On an object store, some chunks of the session are in a pack not in the bucket yet.
    #[error(
        "session {0}: some of its chunks are not in the object store yet (a pack still being \
         written, or the store unreachable): try the commit again"
    )]
    NotPublished(String),
    /// `recover` found no catalog snapshot in the store.
    #[error("no catalog snapshot in {0}: nothing to recover from")]
    NoSnapshot(String),
    /// Another `serve` holds the data folder.
    #[error("{0}: another serve process holds this data folder")]
    InUse(std::path::PathBuf),
    /// A read of a chunk the caller does not hold (whoever else may hold it).
    #[error("no chunk {0} among this agent's chunks")]
    NotHeld(BlockHash),
    /// Restored data does not reproduce the point's root.
    #[error("restored disk {disk} has root {got}, the point says {want}")]
    RestoredRoot {
        disk: String,
        got: DiskRoot,
        want: DiskRoot,
    },
    /// Prune without any keep rule would remove every unprotected point.
    #[error("no keep rule given: refusing to remove every point (give --keep-last and friends)")]
    NoPolicy,
    /// The point is locked, the newest, or the base of an unfinished session.
    #[error("point {0} is locked, the newest of its VM, or in use by an unfinished session")]
    Protected(i64),
    /// Another gc, or a drill reading the store, holds the data folder's gc lock.
    #[error("another gc, or a drill reading the store, holds this data folder's gc lock: try again later")]
    GcRunning,
    /// Not an RFC 3339 time.
    #[error("{0:?} is not an RFC 3339 time")]
    BadTime(String),
    /// The output exists and would be overwritten.
    #[error("{0} exists: refusing to overwrite (use --force)")]
    OutputExists(std::path::PathBuf),
}

impl From<crate::catalog::CatalogError> for StoreError {
    fn from(e: crate::catalog::CatalogError) -> StoreError {
        match e {
            crate::catalog::CatalogError::Sql(e) => StoreError::Sql(e),
            crate::catalog::CatalogError::HashLength(e) => StoreError::HashLength(e),
        }
    }
}

impl StoreError {
    /// True when the error is the disk being full (so the agent should retry later).
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Pack(ChunkStoreError::Io { source, .. })
            | StoreError::Io { source, .. } => source.raw_os_error(),
            StoreError::Sql(rusqlite::Error::SqliteFailure(e, _)) => {
                return e.code == rusqlite::ErrorCode::DiskFull
            }
            _ => None,
        };
        io == Some(28)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_proto::report::chain;
    use std::error::Error;

    fn not_found() -> std::io::Error {
        std::io::Error::from_raw_os_error(2)
    }

    fn sql_locked() -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        )
    }

    /// The convention: a message never repeats its source, the chain adds it, once.
    fn told_once(e: &(dyn Error + 'static), cause: &str) {
        let message = e.to_string();
        assert!(
            !message.contains(cause),
            "message {message:?} repeats {cause:?}"
        );
        let whole = chain(e);
        assert_eq!(whole.matches(cause).count(), 1, "{whole:?} tells {cause:?}");
    }

    #[test]
    fn every_error_with_a_source_leaves_it_to_the_chain() {
        let os = not_found().to_string();
        let geometry = BadGeometry::TooLarge(1 << 50).to_string();
        let toml_error = toml::from_str::<toml::Value>("x = ")
            .map(|_| ())
            .expect_err("not TOML");
        let toml_text = toml_error.to_string();
        let tls = rustls::Error::General("no usable key".into());
        let json = || serde_json::from_str::<Vec<i64>>("[1,").expect_err("not JSON");
        let cases: Vec<(Box<dyn Error>, String)> = vec![
            (
                Box::new(StoreError::Sql(sql_locked())),
                "database is locked".into(),
            ),
            (
                Box::new(StoreError::CorruptRecord {
                    what: "pending_commits.disks",
                    source: json(),
                }),
                json().to_string(),
            ),
            (
                Box::new(StoreError::Io {
                    path: "/data/lock".into(),
                    source: not_found(),
                }),
                os.clone(),
            ),
            (
                Box::new(StoreError::Geometry {
                    disk: "vda".into(),
                    source: BadGeometry::TooLarge(1 << 50),
                }),
                geometry,
            ),
            (
                Box::new(StoreError::from(ChunkStoreError::Io {
                    path: "/data/packs/00/1.pack".into(),
                    source: not_found(),
                })),
                os.clone(),
            ),
            (
                Box::new(crate::pki::PkiError::Io {
                    path: "/etc/rewind/pki/ca.pem".into(),
                    source: not_found(),
                }),
                os.clone(),
            ),
            (
                Box::new(crate::pki::PkiError::Cert(
                    rcgen::Error::CouldNotParseCertificate,
                )),
                rcgen::Error::CouldNotParseCertificate.to_string(),
            ),
            (
                Box::new(crate::server::ServeError::Pem {
                    what: "the receiver's key",
                    source: rustls::pki_types::pem::Error::NoItemsFound,
                }),
                rustls::pki_types::pem::Error::NoItemsFound.to_string(),
            ),
            (
                Box::new(crate::server::ServeError::Tls(tls.clone())),
                tls.to_string(),
            ),
            (
                Box::new(crate::server::ServeError::Verifier(
                    rustls::server::VerifierBuilderError::NoRootAnchors,
                )),
                rustls::server::VerifierBuilderError::NoRootAnchors.to_string(),
            ),
            (
                Box::new(crate::guest_agent::AgentError::Connect {
                    path: "/run/qga.sock".into(),
                    source: not_found(),
                }),
                os.clone(),
            ),
            (
                Box::new(crate::guest_agent::AgentError::Io(not_found())),
                os.clone(),
            ),
            (
                Box::new(crate::config::ConfigError::Read {
                    path: "/etc/rewind/receiver.toml".into(),
                    source: not_found(),
                }),
                os.clone(),
            ),
            (
                Box::new(crate::config::ConfigError::Parse {
                    path: "/etc/rewind/receiver.toml".into(),
                    source: Box::new(toml_error),
                }),
                toml_text,
            ),
        ];
        for (e, cause) in &cases {
            told_once(e.as_ref(), cause);
        }
    }

    #[test]
    fn a_catalog_error_reads_once_from_place_to_cause() {
        assert_eq!(
            chain(&StoreError::Sql(sql_locked())),
            "catalog: database is locked"
        );
        let e = StoreError::Io {
            path: "/data/lock".into(),
            source: not_found(),
        };
        assert_eq!(chain(&e), format!("/data/lock: {}", not_found()));
    }

    #[test]
    fn an_io_error_in_a_conversion_is_its_own_message() {
        let e = crate::convert::ConvertError::Io(not_found());
        assert_eq!(chain(&e), not_found().to_string());
    }
}
