//! Point rows: VMs by name, committed points and their disks, and point locks.

pub use super::VmId;
use super::{CatalogError, DiskId, PointId};
use rewind_proto::DiskRoot;
use rusqlite::{params, Connection, OptionalExtension};

/// One `points` row with its VM's name.
#[derive(Debug, Clone)]
pub struct PointRow {
    pub id: PointId,
    pub vm: String,
    pub created_us: i64,
    pub committed_us: i64,
    pub parent: Option<i64>,
    pub consistency: String,
    /// The VM configuration as the agent sent it (JSON text).
    pub config: Option<String>,
    pub locked_until_us: Option<i64>,
    /// An encrypted VM's keyring, and the point's manifest MAC and time of capture.
    pub sealed: Option<Sealed>,
}

/// What an encrypted VM's point records of its encryption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub keyring: Vec<u8>,
    pub mac: Vec<u8>,
    pub taken_us: i64,
}

fn sealed(keyring: Option<Vec<u8>>, mac: Option<Vec<u8>>, taken_us: Option<i64>) -> Option<Sealed> {
    Some(Sealed {
        keyring: keyring?,
        mac: mac.unwrap_or_default(),
        taken_us: taken_us.unwrap_or(0),
    })
}

/// One `point_disks` row.
#[derive(Debug, Clone)]
pub struct PointDiskRow {
    pub name: String,
    pub size: i64,
    pub block_size: i64,
    pub root: DiskRoot,
    pub changed_blocks: i64,
    pub disk_id: DiskId,
}

/// The disks of `point`, by name.
pub fn disks_of(conn: &Connection, point: PointId) -> Result<Vec<PointDiskRow>, CatalogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, size, block_size, root, changed_blocks, disk_id FROM point_disks
         WHERE point_id = ?1 ORDER BY name",
    )?;
    let mut rows = stmt.query([point])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(PointDiskRow {
            name: r.get(0)?,
            size: r.get(1)?,
            block_size: r.get(2)?,
            root: DiskRoot::from_slice(&r.get::<_, Vec<u8>>(3)?)?,
            changed_blocks: r.get(4)?,
            disk_id: r.get(5)?,
        });
    }
    Ok(out)
}

/// The points of VM `vm` (every VM when None), by VM name, then id.
pub fn list(conn: &Connection, vm: Option<&str>) -> rusqlite::Result<Vec<PointRow>> {
    let mut stmt = conn.prepare(
        "SELECT p.id, v.name, p.created_us, p.committed_us, p.parent, p.consistency, p.config,
                p.locked_until_us, v.keyring, p.mac, p.taken_us
         FROM points p JOIN vms v ON v.id = p.vm_id
         WHERE ?1 IS NULL OR v.name = ?1 ORDER BY v.name, p.id",
    )?;
    let rows = stmt.query_map(params![vm], |r| {
        Ok(PointRow {
            id: r.get(0)?,
            vm: r.get(1)?,
            created_us: r.get(2)?,
            committed_us: r.get(3)?,
            parent: r.get(4)?,
            consistency: r.get(5)?,
            config: r.get(6)?,
            locked_until_us: r.get(7)?,
            sealed: sealed(r.get(8)?, r.get(9)?, r.get(10)?),
        })
    })?;
    rows.collect()
}

/// One point by id; `vm` is the name its caller resolved it under.
pub fn get(conn: &Connection, id: PointId, vm: &str) -> rusqlite::Result<PointRow> {
    conn.query_row(
        "SELECT p.created_us, p.committed_us, p.parent, p.consistency, p.config,
                p.locked_until_us, v.keyring, p.mac, p.taken_us
         FROM points p JOIN vms v ON v.id = p.vm_id WHERE p.id = ?1",
        [id],
        |r| {
            Ok(PointRow {
                id,
                vm: vm.to_owned(),
                created_us: r.get(0)?,
                committed_us: r.get(1)?,
                parent: r.get(2)?,
                consistency: r.get(3)?,
                config: r.get(4)?,
                locked_until_us: r.get(5)?,
                sealed: sealed(r.get(6)?, r.get(7)?, r.get(8)?),
            })
        },
    )
}

/// Whether a VM of that name exists.
pub fn vm_exists(conn: &Connection, vm: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM vms WHERE name = ?1")?
        .exists([vm])
}

/// The id of the VM named `vm`, if any.
pub fn vm_id(conn: &Connection, vm: &str) -> rusqlite::Result<Option<VmId>> {
    conn.query_row("SELECT id FROM vms WHERE name = ?1", [vm], |r| r.get(0))
        .optional()
}

/// `id` if it is a point of `vm`.
pub fn of_vm(conn: &Connection, vm: VmId, id: i64) -> rusqlite::Result<Option<PointId>> {
    conn.query_row(
        "SELECT id FROM points WHERE id = ?1 AND vm_id = ?2",
        params![id, vm],
        |r| r.get(0),
    )
    .optional()
}

/// The VM's newest point (the greatest id), if it has any.
pub fn newest(conn: &Connection, vm: VmId) -> rusqlite::Result<Option<PointId>> {
    conn.query_row("SELECT MAX(id) FROM points WHERE vm_id = ?1", [vm], |r| {
        r.get(0)
    })
}

/// The VM's newest point created at or before `at_us`.
pub fn created_by(conn: &Connection, vm: VmId, at_us: i64) -> rusqlite::Result<Option<PointId>> {
    conn.query_row(
        "SELECT id FROM points WHERE vm_id = ?1 AND created_us <= ?2
         ORDER BY created_us DESC, id DESC LIMIT 1",
        params![vm, at_us],
        |r| r.get(0),
    )
    .optional()
}

/// Extends the point's lock to `until_us` (never shortens it) and returns the lock now held.
pub fn extend_lock(conn: &Connection, point: PointId, until_us: i64) -> rusqlite::Result<i64> {
    conn.execute(
        "UPDATE points SET locked_until_us = MAX(COALESCE(locked_until_us, 0), ?2) WHERE id = ?1",
        params![point, until_us],
    )?;
    conn.query_row(
        "SELECT locked_until_us FROM points WHERE id = ?1",
        [point],
        |r| r.get(0),
    )
}

/// VMs by name: every one, or the one named `only` (none when it does not exist).
pub fn vms(conn: &Connection, only: Option<&str>) -> rusqlite::Result<Vec<(VmId, String)>> {
    let mut stmt =
        conn.prepare("SELECT id, name FROM vms WHERE ?1 IS NULL OR name = ?1 ORDER BY name")?;
    let rows = stmt.query_map(params![only], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// What retention needs of one point.
#[derive(Debug, Clone)]
pub struct Keep {
    pub id: PointId,
    pub created_us: i64,
    /// 0 when not locked.
    pub locked_until_us: i64,
    /// The base of an open session.
    pub in_use: bool,
}

/// The VM's points, oldest first, as retention sees them.
pub fn keep_rows(conn: &Connection, vm: VmId) -> rusqlite::Result<Vec<Keep>> {
    let mut stmt = conn.prepare(
        "SELECT p.id, p.created_us, COALESCE(p.locked_until_us, 0),
                EXISTS(SELECT 1 FROM sessions s WHERE s.state = 'open' AND s.base_point = p.id)
         FROM points p WHERE p.vm_id = ?1 ORDER BY p.id",
    )?;
    let rows = stmt.query_map([vm], |r| {
        Ok(Keep {
            id: r.get(0)?,
            created_us: r.get(1)?,
            locked_until_us: r.get(2)?,
            in_use: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// A point's VM and what protects it from removal; None when there is no such point.
pub fn protection(conn: &Connection, point: PointId) -> rusqlite::Result<Option<(VmId, Keep)>> {
    conn.query_row(
        "SELECT vm_id, COALESCE(locked_until_us, 0),
                EXISTS(SELECT 1 FROM sessions s WHERE s.state = 'open' AND s.base_point = ?1)
         FROM points WHERE id = ?1",
        [point],
        |r| {
            Ok((
                r.get(0)?,
                Keep {
                    id: point,
                    created_us: 0,
                    locked_until_us: r.get(1)?,
                    in_use: r.get(2)?,
                },
            ))
        },
    )
    .optional()
}

/// The disk generations a point has.
pub fn disk_ids(conn: &Connection, point: PointId) -> rusqlite::Result<Vec<DiskId>> {
    let mut stmt = conn.prepare("SELECT disk_id FROM point_disks WHERE point_id = ?1")?;
    let rows = stmt.query_map([point], |r| r.get(0))?;
    rows.collect()
}

/// The last point before `point` and the first point after it that have `disk`.
pub fn neighbours_with_disk(
    conn: &Connection,
    disk: DiskId,
    point: PointId,
) -> rusqlite::Result<(Option<PointId>, Option<PointId>)> {
    conn.prepare_cached(
        "SELECT (SELECT MAX(point_id) FROM point_disks WHERE disk_id = ?1 AND point_id < ?2),
                (SELECT MIN(point_id) FROM point_disks WHERE disk_id = ?1 AND point_id > ?2)",
    )?
    .query_row(params![disk, point], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// Removes a point's rows (its disks, the link from its children, the point). Its node rows
/// must have been folded or dropped first ([`super::leaves::fold_into`]).
pub fn delete(conn: &Connection, point: PointId) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM point_disks WHERE point_id = ?1", [point])?;
    conn.execute("UPDATE points SET parent = NULL WHERE parent = ?1", [point])?;
    conn.execute("DELETE FROM points WHERE id = ?1", [point])?;
    Ok(())
}

/// The id and owner of the VM named `vm`, if it exists.
pub fn vm_owner(conn: &Connection, vm: &str) -> rusqlite::Result<Option<(VmId, String)>> {
    conn.query_row("SELECT id, owner FROM vms WHERE name = ?1", [vm], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// The keyring VM `vm_id`'s chunks are sealed with (None: plain).
pub fn keyring(conn: &Connection, vm_id: VmId) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row("SELECT keyring FROM vms WHERE id = ?1", [vm_id], |r| {
        r.get(0)
    })
}

/// Sets the keyring of VM `vm_id` (done only while it has no point).
pub fn set_keyring(conn: &Connection, vm_id: VmId, keyring: Option<&[u8]>) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE vms SET keyring = ?2 WHERE id = ?1",
        params![vm_id, keyring],
    )
    .map(|_| ())
}

/// Creates VM `vm` owned by `owner`; returns its id.
pub fn new_vm(conn: &Connection, vm: &str, owner: &str, now_us: i64) -> rusqlite::Result<VmId> {
    conn.execute(
        "INSERT INTO vms(name, owner, created_us) VALUES (?1, ?2, ?3)",
        params![vm, owner, now_us],
    )?;
    Ok(VmId(conn.last_insert_rowid()))
}

/// Hands VM `vm_id` to `owner`, as if created at `now_us`.
pub fn hand_over(conn: &Connection, vm_id: VmId, owner: &str, now_us: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE vms SET owner = ?2, created_us = ?3 WHERE id = ?1",
        params![vm_id, owner, now_us],
    )
    .map(|_| ())
}

/// How many VMs `owner` has.
pub fn vms_of(conn: &Connection, owner: &str) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COUNT(*) FROM vms WHERE owner = ?1", [owner], |r| {
        r.get(0)
    })
}

/// When the VM last saw progress: its newest session update, or its creation.
pub fn last_activity(conn: &Connection, vm_id: VmId) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT MAX(COALESCE((SELECT MAX(updated_us) FROM sessions WHERE vm_id = ?1), 0), created_us)
         FROM vms WHERE id = ?1",
        [vm_id],
        |r| r.get(0),
    )
}

/// Whether a point (of any VM) has id `id`.
pub fn taken(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM points WHERE id = ?1")?
        .exists([id])
}

/// A disk of a point, as a new session may continue it.
#[derive(Debug, Clone)]
pub struct BaseDisk {
    pub name: String,
    pub disk_id: i64,
    pub size: u64,
    pub block_size: u64,
}

/// The disks of `point`, in no particular order.
pub fn base_disks(conn: &Connection, point: i64) -> rusqlite::Result<Vec<BaseDisk>> {
    let mut stmt = conn
        .prepare("SELECT name, disk_id, size, block_size FROM point_disks WHERE point_id = ?1")?;
    let rows = stmt.query_map([point], |r| {
        Ok(BaseDisk {
            name: r.get(0)?,
            disk_id: r.get(1)?,
            size: r.get::<_, i64>(2)? as u64,
            block_size: r.get::<_, i64>(3)? as u64,
        })
    })?;
    rows.collect()
}

/// The size of disk `name` at `point`, if the point has that disk.
pub fn disk_size_at(conn: &Connection, point: i64, name: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT size FROM point_disks WHERE point_id = ?1 AND name = ?2",
        params![point, name],
        |r| r.get(0),
    )
    .optional()
}

/// Starts a new generation of disk `name` of VM `vm_id`; returns its id.
pub fn new_disk(
    conn: &Connection,
    vm_id: VmId,
    name: &str,
    size: i64,
    block_size: i64,
) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO disks(vm_id, name, size, block_size) VALUES (?1, ?2, ?3, ?4)",
        params![vm_id, name, size, block_size],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Removes disk generation `disk` unless a point has it.
pub fn drop_unused_disk(conn: &Connection, disk: i64) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM disks WHERE id = ?1 AND NOT EXISTS
           (SELECT 1 FROM point_disks WHERE disk_id = ?1)",
        [disk],
    )
    .map(|_| ())
}

/// When the VM's newest point (by time) was created.
pub fn newest_created(conn: &Connection, vm_id: VmId) -> rusqlite::Result<Option<i64>> {
    conn.query_row(NEWEST_CREATED, [vm_id], |r| r.get(0))
}

/// A VM's newest creation time: one seek in `points_by_vm_created`, however many points.
pub(super) const NEWEST_CREATED: &str = "SELECT MAX(created_us) FROM points WHERE vm_id = ?1";

/// Whether `point` exists and was committed by `session`.
pub fn committed_by(conn: &Connection, point: i64, session: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM points WHERE id = ?1 AND session = ?2)",
        params![point, session],
        |r| r.get(0),
    )
}

/// A point as a commit records it.
#[derive(Debug, Clone)]
pub struct NewPoint<'a> {
    pub id: i64,
    pub vm_id: VmId,
    pub parent: Option<i64>,
    pub created_us: i64,
    pub committed_us: i64,
    pub session: &'a str,
    pub consistency: &'a str,
    pub config: Option<&'a str>,
    /// An encrypted VM's manifest MAC and time of capture (see `ingest::PointMeta`).
    pub mac: Option<&'a [u8]>,
    pub taken_us: Option<i64>,
}

/// Records a point's row.
pub fn insert(conn: &Connection, p: &NewPoint<'_>) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO points(id, vm_id, parent, created_us, committed_us, session, consistency,
           config, mac, taken_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            p.id,
            p.vm_id,
            p.parent,
            p.created_us,
            p.committed_us,
            p.session,
            p.consistency,
            p.config,
            p.mac,
            p.taken_us
        ],
    )
    .map(|_| ())
}

/// Records disk `d` of `point`.
pub fn add_disk(conn: &Connection, point: i64, d: &PointDiskRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO point_disks(point_id, name, disk_id, size, block_size, root, changed_blocks)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            point,
            d.name,
            d.disk_id,
            d.size,
            d.block_size,
            &d.root.0[..],
            d.changed_blocks
        ],
    )
    .map(|_| ())
}
