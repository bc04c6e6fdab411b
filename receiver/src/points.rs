//! Reading committed points from the catalog: listings and resolving `--point` / `--at`.

use crate::catalog::points as rows;
use crate::catalog::{parse_rfc3339, rfc3339, DiskId, PointId};
use crate::error::StoreError;
use rewind_proto::DiskRoot;
use rusqlite::Connection;
use serde::Serialize;

/// One disk of a point.
#[derive(Debug, Clone, Serialize)]
pub struct PointDisk {
    pub name: String,
    pub size: u64,
    pub block_size: u64,
    pub root: String,
    pub changed_blocks: u64,
    #[serde(skip)]
    pub disk_id: DiskId,
    #[serde(skip)]
    pub root_leaf: DiskRoot,
}

/// One committed point, as `points --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct PointInfo {
    pub id: i64,
    pub vm: String,
    pub created: String,
    pub committed: String,
    pub parent: Option<i64>,
    /// "application-consistent", "crash-consistent", "offline" or "as-read".
    pub consistency: String,
    /// The VM's configuration at the point, as the agent captured it.
    pub config: Option<serde_json::Value>,
    /// The same, as the text the agent sent (what an encrypted point's MAC binds).
    #[serde(skip)]
    pub config_text: Option<String>,
    /// Protected from prune until this time, if locked.
    pub locked_until: Option<String>,
    pub disks: Vec<PointDisk>,
    /// Set for an encrypted VM's point: the chunks are sealed with this keyring, and the
    /// point carries the agent's manifest MAC (checked by a restore that holds the key).
    pub encrypted: Option<Encrypted>,
}

/// What a listing shows of an encrypted point.
#[derive(Debug, Clone, Serialize)]
pub struct Encrypted {
    pub keyring: String,
    /// When the agent captured the point, by the agent's clock (bound by the MAC).
    pub taken: String,
    #[serde(skip)]
    pub mac: Vec<u8>,
    #[serde(skip)]
    pub taken_us: i64,
    #[serde(skip)]
    pub config_hash: [u8; 32],
}

fn disks_of(conn: &Connection, point: i64) -> Result<Vec<PointDisk>, StoreError> {
    Ok(rows::disks_of(conn, PointId(point))?
        .into_iter()
        .map(|d| PointDisk {
            name: d.name,
            size: d.size as u64,
            block_size: d.block_size as u64,
            root: d.root.to_hex(),
            changed_blocks: d.changed_blocks as u64,
            disk_id: d.disk_id,
            root_leaf: d.root,
        })
        .collect())
}

/// The point a row describes, with its disks.
fn info(conn: &Connection, p: rows::PointRow) -> Result<PointInfo, StoreError> {
    Ok(PointInfo {
        id: p.id.0,
        vm: p.vm,
        created: rfc3339(p.created_us),
        committed: rfc3339(p.committed_us),
        parent: p.parent,
        consistency: p.consistency,
        config: p
            .config
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok()),
        config_text: p.config.clone(),
        locked_until: p.locked_until_us.map(rfc3339),
        disks: disks_of(conn, p.id.0)?,
        encrypted: p.sealed.map(|s| Encrypted {
            keyring: hex::encode(&s.keyring),
            taken: rfc3339(s.taken_us),
            mac: s.mac,
            taken_us: s.taken_us,
            config_hash: rewind_proto::crypt::config_hash(p.config.as_deref().unwrap_or("")),
        }),
    })
}

/// Points of one VM (or all VMs, by VM name), oldest first: by id, which only grows within a
/// VM whatever the clocks do.
pub fn list(conn: &Connection, vm: Option<&str>) -> Result<Vec<PointInfo>, StoreError> {
    let points = rows::list(conn, vm)?;
    if let Some(vm) = vm {
        if points.is_empty() && !rows::vm_exists(conn, vm)? {
            return Err(StoreError::UnknownVm(vm.to_owned()));
        }
    }
    points.into_iter().map(|p| info(conn, p)).collect()
}

/// Which point to use.
#[derive(Debug, Clone)]
pub enum PointSelector {
    Id(i64),
    /// The newest point created at or before this RFC 3339 instant.
    At(String),
    Newest,
}

/// Resolves a selector to one point of a VM.
pub fn resolve(
    conn: &Connection,
    vm: &str,
    which: &PointSelector,
) -> Result<PointInfo, StoreError> {
    let vm_id = rows::vm_id(conn, vm)?.ok_or_else(|| StoreError::UnknownVm(vm.to_owned()))?;
    let id = match which {
        PointSelector::Id(id) => rows::of_vm(conn, vm_id, *id)?,
        PointSelector::Newest => rows::newest(conn, vm_id)?,
        PointSelector::At(text) => {
            let at = parse_rfc3339(text).map_err(|_| StoreError::NoPointAt {
                vm: vm.to_owned(),
                at: format!("{text} (not an RFC 3339 time)"),
            })?;
            rows::created_by(conn, vm_id, at)?
        }
    };
    let Some(id) = id else {
        return Err(match which {
            PointSelector::Id(p) => StoreError::UnknownPoint {
                vm: vm.to_owned(),
                point: *p,
            },
            PointSelector::At(t) => StoreError::NoPointAt {
                vm: vm.to_owned(),
                at: t.clone(),
            },
            PointSelector::Newest => StoreError::NoPointAt {
                vm: vm.to_owned(),
                at: "now".to_owned(),
            },
        });
    };
    info(conn, rows::get(conn, id, vm)?)
}
