//! Which blocks differ between two points of a VM, from the catalog alone (no chunk is read):
//! only blocks with a version between the two points can differ, so the cost grows with the
//! changes between them, not with the disk size.

use crate::catalog::leaves::{self, touched_between};
use crate::catalog::PointId;
use crate::error::StoreError;
use crate::points::{self, PointDisk, PointSelector};
use rusqlite::Connection;
use serde::Serialize;
use std::collections::BTreeSet;

/// A byte range that differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// The differences of one disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskDiff {
    pub name: String,
    pub size: u64,
    pub block_size: u64,
    pub changed_blocks: u64,
    pub changed_bytes: u64,
    pub extents: Vec<Extent>,
    /// Set when the disk was added, removed or replaced (new size or block size) in between.
    pub note: Option<String>,
}

/// The differences between two points.
#[derive(Debug, Clone, Serialize)]
pub struct PointDiff {
    pub vm: String,
    pub from: i64,
    pub to: i64,
    pub changed_bytes: u64,
    pub disks: Vec<DiskDiff>,
}

fn extents(blocks: &BTreeSet<u64>, d: &PointDisk) -> (Vec<Extent>, u64) {
    let mut out: Vec<Extent> = Vec::new();
    let mut bytes = 0;
    for &b in blocks {
        let offset = b * d.block_size;
        let length = d.block_size.min(d.size.saturating_sub(offset));
        bytes += length;
        match out.last_mut() {
            Some(e) if e.offset + e.length == offset => e.length += length,
            _ => out.push(Extent { offset, length }),
        }
    }
    (out, bytes)
}

/// Differences between points `from` and `to` of `vm` (in either order).
pub fn diff(conn: &Connection, vm: &str, from: i64, to: i64) -> Result<PointDiff, StoreError> {
    let a = points::resolve(conn, vm, &PointSelector::Id(from))?;
    let b = points::resolve(conn, vm, &PointSelector::Id(to))?;
    let (lo, hi) = if a.id <= b.id { (&a, &b) } else { (&b, &a) };
    let mut disks = Vec::new();
    for d in &b.disks {
        let other = a.disks.iter().find(|x| x.name == d.name);
        let (candidates, note, same_gen) = match other {
            Some(o) if o.disk_id == d.disk_id => (
                touched_between(conn, d.disk_id, Some(PointId(lo.id)), PointId(hi.id))?,
                (o.size != d.size).then(|| format!("resized from {} to {} bytes", o.size, d.size)),
                true,
            ),
            Some(o) => {
                let mut all = touched_between(conn, d.disk_id, None, PointId(b.id))?;
                all.extend(touched_between(conn, o.disk_id, None, PointId(a.id))?);
                (
                    all,
                    Some("replaced: size or block size changed".to_owned()),
                    false,
                )
            }
            None => (
                touched_between(conn, d.disk_id, None, PointId(b.id))?,
                Some("added".to_owned()),
                false,
            ),
        };
        let mut changed = BTreeSet::new();
        for idx in candidates {
            let new = leaves::one(conn, d.disk_id, PointId(b.id), idx)?;
            let old = match other {
                Some(o) if same_gen || idx * o.block_size < o.size => {
                    leaves::one(conn, o.disk_id, PointId(a.id), idx)?
                }
                _ => None,
            };
            if new != old {
                changed.insert(idx);
            }
        }
        let (ext, bytes) = extents(&changed, d);
        disks.push(DiskDiff {
            name: d.name.clone(),
            size: d.size,
            block_size: d.block_size,
            changed_blocks: changed.len() as u64,
            changed_bytes: bytes,
            extents: ext,
            note,
        });
    }
    for o in a
        .disks
        .iter()
        .filter(|o| !b.disks.iter().any(|d| d.name == o.name))
    {
        disks.push(DiskDiff {
            name: o.name.clone(),
            size: o.size,
            block_size: o.block_size,
            changed_blocks: 0,
            changed_bytes: 0,
            extents: Vec::new(),
            note: Some("removed".to_owned()),
        });
    }
    Ok(PointDiff {
        vm: vm.to_owned(),
        from: a.id,
        to: b.id,
        changed_bytes: disks.iter().map(|d| d.changed_bytes).sum(),
        disks,
    })
}
