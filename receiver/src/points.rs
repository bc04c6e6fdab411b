//! Reading committed points from the catalog: listings and resolving `--point` / `--at`.

use crate::catalog::{parse_rfc3339, rfc3339};
use crate::error::StoreError;
use rewind_proto::Leaf;
use rusqlite::{params, Connection, OptionalExtension};
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
    pub disk_id: i64,
    #[serde(skip)]
    pub root_leaf: Leaf,
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
    /// Protected from prune until this time, if locked.
    pub locked_until: Option<String>,
    pub disks: Vec<PointDisk>,
}

fn disks_of(conn: &Connection, point: i64) -> Result<Vec<PointDisk>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, size, block_size, root, changed_blocks, disk_id FROM point_disks
         WHERE point_id = ?1 ORDER BY name",
    )?;
    let rows = stmt.query_map([point], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Vec<u8>>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, size, bs, root, changed, disk_id) = row?;
        let root_leaf = Leaf::from_slice(&root)?;
        out.push(PointDisk {
            name,
            size: size as u64,
            block_size: bs as u64,
            root: root_leaf.to_hex(),
            changed_blocks: changed as u64,
            disk_id,
            root_leaf,
        });
    }
    Ok(out)
}

/// Points of one VM (or all VMs, by VM name), oldest first: by id, which only grows within a
/// VM whatever the clocks do.
pub fn list(conn: &Connection, vm: Option<&str>) -> Result<Vec<PointInfo>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT p.id, v.name, p.created_us, p.committed_us, p.parent, p.consistency, p.config,
                p.locked_until_us
         FROM points p JOIN vms v ON v.id = p.vm_id
         WHERE ?1 IS NULL OR v.name = ?1 ORDER BY v.name, p.id",
    )?;
    let rows = stmt
        .query_map(params![vm], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if let Some(vm) = vm {
        if rows.is_empty() && !vm_exists(conn, vm)? {
            return Err(StoreError::UnknownVm(vm.to_owned()));
        }
    }
    rows.into_iter()
        .map(
            |(id, vm, created, committed, parent, consistency, config, locked)| {
                Ok(PointInfo {
                    id,
                    vm,
                    created: rfc3339(created),
                    committed: rfc3339(committed),
                    parent,
                    consistency,
                    config: config.and_then(|c| serde_json::from_str(&c).ok()),
                    locked_until: locked.map(rfc3339),
                    disks: disks_of(conn, id)?,
                })
            },
        )
        .collect()
}

fn vm_exists(conn: &Connection, vm: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM vms WHERE name = ?1")?
        .exists([vm])
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
    let vm_id: i64 = conn
        .query_row("SELECT id FROM vms WHERE name = ?1", [vm], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::UnknownVm(vm.to_owned()))?;
    let id: Option<i64> = match which {
        PointSelector::Id(id) => conn
            .query_row(
                "SELECT id FROM points WHERE id = ?1 AND vm_id = ?2",
                params![id, vm_id],
                |r| r.get(0),
            )
            .optional()?,
        PointSelector::Newest => conn.query_row(
            "SELECT MAX(id) FROM points WHERE vm_id = ?1",
            [vm_id],
            |r| r.get(0),
        )?,
        PointSelector::At(text) => {
            let at = parse_rfc3339(text).map_err(|_| StoreError::NoPointAt {
                vm: vm.to_owned(),
                at: format!("{text} (not an RFC 3339 time)"),
            })?;
            conn.query_row(
                "SELECT id FROM points WHERE vm_id = ?1 AND created_us <= ?2
                 ORDER BY created_us DESC, id DESC LIMIT 1",
                params![vm_id, at],
                |r| r.get(0),
            )
            .optional()?
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
    #[allow(clippy::type_complexity)]
    let (created, committed, parent, consistency, config, locked): (
        i64,
        i64,
        Option<i64>,
        String,
        Option<String>,
        Option<i64>,
    ) = conn.query_row(
        "SELECT created_us, committed_us, parent, consistency, config, locked_until_us
         FROM points WHERE id = ?1",
        [id],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )?;
    Ok(PointInfo {
        id,
        vm: vm.to_owned(),
        created: rfc3339(created),
        committed: rfc3339(committed),
        parent,
        consistency,
        config: config.and_then(|c| serde_json::from_str(&c).ok()),
        locked_until: locked.map(rfc3339),
        disks: disks_of(conn, id)?,
    })
}
