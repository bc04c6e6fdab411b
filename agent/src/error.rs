//! The agent's errors: each variant one thing a caller can tell apart.

use crate::scan::ScanError;
use crate::source::DiskError;
use thiserror::Error;

/// SQLite's words for a state error, with a hint where the cause is usually a full file system
/// (SQLite reports a failed write as "disk I/O error").
fn state_message(e: &rusqlite::Error) -> String {
    use rusqlite::ffi::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull | ErrorCode::SystemIoFailure) => {
            format!("{e} (is the state folder's file system full?)")
        }
        _ => e.to_string(),
    }
}

impl From<rusqlite::Error> for SyncError {
    fn from(e: rusqlite::Error) -> Self {
        SyncError::State(e)
    }
}

#[derive(Debug, Error)]
pub enum SyncError {
    /// The local state database failed. (Not a `source`: the message already carries
    /// SQLite's, and error chains would print it twice.)
    #[error("agent state: {}", state_message(.0))]
    State(rusqlite::Error),
    /// A disk could not be opened or read.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A disk's size or the block size is outside the limits.
    #[error("disk {disk}")]
    Geometry {
        disk: String,
        source: rewind_proto::format::BadGeometry,
    },
    /// A VM or disk name is invalid.
    #[error(transparent)]
    Name(#[from] rewind_proto::names::BadName),
    /// The agent's working folder under its state could not be made or written.
    #[error("agent state folder {path}")]
    StateFolder {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The configuration does not describe a cycle (the whole chain of why, in words).
    #[error("configuration: {0}")]
    Config(String),
    /// Reading credentials failed.
    #[error("{path}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The receiver's address is not a valid https URL.
    #[error("receiver address {0:?} is not an https:// URL with a host")]
    BadUrl(String),
    /// Connecting to the receiver failed.
    #[error("connecting to the receiver")]
    Connect(#[from] tonic::transport::Error),
    /// The receiver refused a request.
    #[error("{}", describe_refusal(call, status))]
    Refused {
        call: &'static str,
        status: tonic::Status,
    },
    /// The receiver's answer makes no sense (e.g. a plan for disks we did not ask about).
    #[error("unexpected answer from the receiver: {0}")]
    Protocol(&'static str),
    /// Scanning a disk failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// A live-VM step failed in QEMU.
    #[error(transparent)]
    Live(#[from] crate::live::LiveError),
    /// An offline qcow2 step failed.
    #[error(transparent)]
    Offline(#[from] crate::offline::OfflineError),
    /// A libvirt step failed.
    #[error(transparent)]
    Libvirt(#[from] crate::libvirt::LibvirtError),
    /// Reading through NBD failed.
    #[error(transparent)]
    Nbd(#[from] crate::nbd::NbdError),
    /// A disk asked for on the command line is not in the VM.
    #[error("the VM has no disk named {0}")]
    NoSuchDisk(String),
    /// A worker task died.
    #[error("internal worker failed: {0}")]
    Worker(String),
}

/// A refusal in words. A broken link (keepalive timeout, reset) reaches tonic as UNAVAILABLE
/// or UNKNOWN with a bare message ("http2 error", "transport error") and the cause as its
/// source: say that the connection was lost, and why.
fn describe_refusal(call: &str, status: &tonic::Status) -> String {
    let mut causes = Vec::new();
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        let text = e.to_string();
        if !causes.contains(&text) && text != status.message() {
            causes.push(text);
        }
        next = e.source();
    }
    let link = matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && !causes.is_empty();
    let mut out = if link {
        format!(
            "lost the connection to the receiver during {call}: {}",
            status.message()
        )
    } else {
        format!("receiver refused {call}: {}", status.message())
    };
    for c in causes {
        out.push_str(": ");
        out.push_str(&c);
    }
    out
}

impl SyncError {
    pub fn refused(call: &'static str) -> impl FnOnce(tonic::Status) -> SyncError {
        move |status| SyncError::Refused { call, status }
    }

    /// A short, stable name of the failure's kind (for metrics and status).
    pub fn kind(&self) -> &'static str {
        match self {
            SyncError::State(_) | SyncError::StateFolder { .. } => "state",
            SyncError::Disk(_) | SyncError::Scan(_) | SyncError::NoSuchDisk(_) => "disk",
            SyncError::Geometry { .. } | SyncError::Name(_) => "config",
            SyncError::Credentials { .. } | SyncError::BadUrl(_) | SyncError::Config(_) => "config",
            SyncError::Connect(_) => "connect",
            SyncError::Refused { status, .. } if status.code() == tonic::Code::Unavailable => {
                "connect"
            }
            SyncError::Refused { .. } => "refused",
            SyncError::Protocol(_) => "protocol",
            SyncError::Live(_) => "qemu",
            SyncError::Offline(_) => "qcow2",
            SyncError::Libvirt(_) => "libvirt",
            SyncError::Nbd(_) => "nbd",
            SyncError::Worker(_) => "internal",
        }
    }

    /// The gRPC code of a refusal, if this is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            SyncError::Refused { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_proto::report::chain;
    use std::path::PathBuf;

    fn not_found() -> std::io::Error {
        std::io::Error::from_raw_os_error(2)
    }

    fn sql_full() -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        )
    }

    /// The convention: a message never repeats its source, the chain adds it, once.
    fn told_once(e: &(dyn std::error::Error + 'static), cause: &str) {
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
        let sql = sql_full().to_string();
        let geometry = rewind_proto::format::BadGeometry::TooLarge(1 << 50).to_string();
        let toml_error = toml::from_str::<toml::Value>("x = ")
            .map(|_| ())
            .expect_err("not TOML");
        let toml_text = toml_error.to_string();
        let zero_chunk = rewind_proto::chunk::ChunkError::ZeroChunk.to_string();
        let cases: Vec<(Box<dyn std::error::Error>, &str)> = vec![
            (
                Box::new(SyncError::StateFolder {
                    path: "/var/lib/rewind".into(),
                    source: not_found(),
                }),
                &os,
            ),
            (
                Box::new(crate::rollback::RollbackError::DiskIo {
                    path: "/dev/vdb".into(),
                    source: not_found(),
                }),
                &os,
            ),
            (
                Box::new(crate::rollback::RollbackError::Corrupt(
                    rewind_proto::chunk::ChunkError::ZeroChunk,
                )),
                &zero_chunk,
            ),
            (
                Box::new(SyncError::Credentials {
                    path: "/etc/rewind/agent.key".into(),
                    source: not_found(),
                }),
                &os,
            ),
            (
                Box::new(SyncError::Geometry {
                    disk: "vda".into(),
                    source: rewind_proto::format::BadGeometry::TooLarge(1 << 50),
                }),
                &geometry,
            ),
            (
                Box::new(SyncError::from(DiskError::Io {
                    path: "/dev/vdz".into(),
                    source: not_found(),
                })),
                &os,
            ),
            (
                Box::new(SyncError::from(ScanError::State(sql_full()))),
                &sql,
            ),
            (
                Box::new(SyncError::from(crate::live::LiveError::Qmp(
                    crate::qmp::QmpError::Io {
                        path: "/run/qmp.sock".into(),
                        source: not_found(),
                    },
                ))),
                &os,
            ),
            (
                Box::new(SyncError::from(crate::nbd::NbdError::Io(not_found()))),
                &os,
            ),
            (
                Box::new(crate::qcow2::Qcow2Error::Io {
                    path: PathBuf::from("/vm/a.qcow2"),
                    source: not_found(),
                }),
                &os,
            ),
            (
                Box::new(crate::config::ConfigError::Read {
                    path: "/etc/rewind/agent.toml".into(),
                    source: not_found(),
                }),
                &os,
            ),
            (
                Box::new(crate::config::ConfigError::Parse {
                    path: "/etc/rewind/agent.toml".into(),
                    source: Box::new(toml_error),
                }),
                &toml_text,
            ),
        ];
        for (e, cause) in &cases {
            told_once(e.as_ref(), cause);
        }
    }

    #[test]
    fn a_chain_names_the_place_then_the_cause() {
        let e = SyncError::Credentials {
            path: "/etc/rewind/agent.key".into(),
            source: not_found(),
        };
        assert_eq!(chain(&e), format!("/etc/rewind/agent.key: {}", not_found()));
        let e = anyhow::Error::from(SyncError::from(ScanError::State(sql_full())))
            .context("syncing VM vmA");
        assert_eq!(
            chain(&*e),
            "syncing VM vmA: agent state: database or disk is full"
        );
    }

    #[test]
    fn a_state_error_is_told_once() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        );
        let e = anyhow::Error::from(SyncError::from(busy)).context("syncing VM vmA");
        assert_eq!(
            format!("{e:#}"),
            "syncing VM vmA: agent state: database is locked"
        );
    }
}
