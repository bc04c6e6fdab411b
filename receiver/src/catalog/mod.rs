//! The receiver's catalog: one SQLite database (WAL, synchronous=FULL) naming VMs, disks,
//! points, sessions, chunks and the versioned Merkle nodes of every disk.
//!
//! Versioned nodes: the value of node (level, idx) of a disk at point P is the row with the
//! greatest `point` not after P; no row, or a NULL hash, means the all-zero subtree. A point
//! therefore writes rows only for the blocks it changed and the inner nodes above them.
//! A disk generation (`disks` row) is a linear chain: a point may only build on its VM's newest
//! point, and a disk whose size or block size changes starts a new generation.
//!
//! Every SQL statement of the receiver lives under this module, one submodule per subject;
//! callers keep the transactions (and so the ordering rules) and pass them in:
//! - [`schema`]: the tables, as an ordered chain of migrations.
//! - [`leaves`]: the store's central rule, the nodes of a disk as at a point, and the node
//!   rows commits write and prune folds.
//! - [`points`]: VMs, points, their disks and disk generations; point locks.
//! - [`sessions`]: upload sessions and the blocks they staged. [`commits`]: stepped commits in
//!   flight.
//! - [`chunks`]: chunk rows (where each owner's chunk lives), quarantine, gc's liveness.
//! - [`packs`]: pack ids and sealing. [`usage`]: what each agent and VM holds.
//! - [`events`], [`drills`], [`clock`]: the store's records of what happened.
//! - [`status`]: the figures `status` and the metrics endpoint print.

pub mod chunks;
pub mod clock;
pub mod commits;
pub mod copies;
pub mod drills;
pub mod events;
pub mod keys;
pub mod leaves;
pub mod packs;
pub mod points;
pub mod schema;
pub mod sessions;
pub mod status;
pub mod usage;

pub use packs::{new_pack, seal_orphans, seal_pack};
pub use usage::add_usage;

use rewind_proto::hash::BadHashLength;
use rusqlite::types::{FromSql, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, ToSql};
use std::path::Path;
use std::time::Duration;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The catalog's file inside the data folder.
pub const CATALOG_FILE: &str = "catalog.sqlite";

/// What reading the catalog can fail with.
#[derive(Debug, Error)]
pub enum CatalogError {
    /// The catalog database failed.
    #[error("catalog")]
    Sql(#[from] rusqlite::Error),
    /// A stored hash that is not 32 bytes.
    #[error(transparent)]
    HashLength(#[from] BadHashLength),
}

/// A committed point (`points.id`): grows within a VM, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PointId(pub i64);

/// One generation of one disk (`disks.id`): a size and block size a VM's disk kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskId(pub i64);

/// A VM (`vms.id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub i64);

macro_rules! sql_id {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }
        impl FromSql for $t {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                i64::column_result(value).map(Self)
            }
        }
    };
}
sql_id!(PointId);
sql_id!(DiskId);
sql_id!(VmId);

/// Opens (and creates or migrates) the catalog for writing.
pub fn open_rw(data: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(data.join(CATALOG_FILE))?;
    configure(&conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    schema::migrate(&conn)?;
    Ok(conn)
}

/// Opens an existing catalog for writing (migrating it). A folder without one is an error, so a
/// mistyped `--data` never creates an empty store.
pub fn open_existing(data: &Path) -> rusqlite::Result<Connection> {
    if !data.join(CATALOG_FILE).is_file() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "{} holds no Rewind catalog ({CATALOG_FILE})",
                data.display()
            )),
        ));
    }
    open_rw(data)
}

/// Opens the catalog for reading only, safe while `serve` writes to it.
pub fn open_ro(data: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        data.join(CATALOG_FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn)?;
    Ok(conn)
}

/// Opens the catalog for reading only, as one of several readers inside `serve`: with a small
/// page cache of its own (the writer's connection keeps the large one).
pub fn open_reader(data: &Path) -> rusqlite::Result<Connection> {
    let conn = open_ro(data)?;
    conn.pragma_update(None, "cache_size", -4096)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(30))?;
    // FULL: NORMAL can lose the last commit on power loss, and a commit acknowledged to an agent
    // must survive.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    Ok(())
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// RFC 3339 UTC text of a microsecond timestamp.
pub fn rfc3339(us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| us.to_string())
}

/// Parses RFC 3339 text into microseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Result<i64, time::error::Parse> {
    let t = OffsetDateTime::parse(text, &Rfc3339)?;
    Ok((t.unix_timestamp_nanos() / 1000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statements a Begin and a commit run for every point find their rows by an index
    /// seek, never by a scan of the VM's points or sessions (which grow with the history).
    #[test]
    fn per_point_statements_seek_their_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = open_rw(dir.path()).expect("catalog");
        for (sql, index, params) in [
            (sessions::OPEN_OF_VM, "sessions_open_by_vm", 3),
            (points::NEWEST_CREATED, "points_by_vm_created", 1),
        ] {
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("explain");
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter((1..=params).map(|_| 1)), |r| {
                    r.get(3)
                })
                .expect("plan")
                .collect::<Result<_, _>>()
                .expect("rows");
            assert!(plan.iter().any(|p| p.contains(index)), "{sql}: {plan:?}");
        }
    }

    #[test]
    fn time_roundtrip() {
        let us = 1_795_000_000_123_456;
        assert_eq!(parse_rfc3339(&rfc3339(us)).expect("parse"), us);
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
