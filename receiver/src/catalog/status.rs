//! The store's figures as `status` and the metrics endpoint print them: per VM and in total.

use rusqlite::Connection;

/// One VM's replication state, as `status` judges it.
#[derive(Debug, Clone)]
pub struct VmStatus {
    pub vm: String,
    pub points: i64,
    pub newest_point: Option<i64>,
    pub newest_created_us: Option<i64>,
    pub open_sessions: i64,
    /// The last drill's result, with its reason after ": ".
    pub last_drill: Option<String>,
    /// Quarantined chunks of the VM's owner that any version of its leaves names.
    pub damaging_chunks: i64,
}

/// Every VM's state, by name.
pub fn vms(conn: &Connection) -> rusqlite::Result<Vec<VmStatus>> {
    // Which VMs a quarantined chunk damages costs a scan of their leaves: only when any is.
    let damage = if quarantined(conn)? > 0 {
        "(SELECT COUNT(*) FROM bad_chunks b WHERE b.owner = v.owner AND b.hash IN
              (SELECT n.hash FROM nodes n JOIN disks k ON k.id = n.disk_id
               WHERE k.vm_id = v.id AND n.level = 0))"
    } else {
        "0"
    };
    let mut stmt = conn.prepare(&format!(
        "SELECT v.name,
           (SELECT COUNT(*) FROM points p WHERE p.vm_id = v.id),
           (SELECT MAX(id) FROM points p WHERE p.vm_id = v.id),
           (SELECT MAX(created_us) FROM points p WHERE p.vm_id = v.id),
           (SELECT COUNT(*) FROM sessions s WHERE s.vm_id = v.id AND s.state = 'open'),
           (SELECT result || COALESCE(': ' || reason, '') FROM drills d WHERE d.vm = v.name
              ORDER BY d.id DESC LIMIT 1),
           {damage}
         FROM vms v ORDER BY v.name"
    ))?;
    let rows = stmt.query_map([], |r| {
        Ok(VmStatus {
            vm: r.get(0)?,
            points: r.get(1)?,
            newest_point: r.get(2)?,
            newest_created_us: r.get(3)?,
            open_sessions: r.get(4)?,
            last_drill: r.get(5)?,
            damaging_chunks: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// How many chunks are quarantined.
pub fn quarantined(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COUNT(*) FROM bad_chunks", [], |r| r.get(0))
}

/// A VM's points, for the metrics.
#[derive(Debug, Clone)]
pub struct VmPoints {
    pub vm: String,
    pub points: i64,
    pub newest_created_us: Option<i64>,
}

/// Every VM's point count and newest point time, by name.
pub fn points_per_vm(conn: &Connection) -> rusqlite::Result<Vec<VmPoints>> {
    let mut stmt = conn.prepare(
        "SELECT v.name, COUNT(p.id), MAX(p.created_us) FROM vms v LEFT JOIN points p ON p.vm_id = v.id GROUP BY v.id ORDER BY v.name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(VmPoints {
            vm: r.get(0)?,
            points: r.get(1)?,
            newest_created_us: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// Compressed bytes of new chunks each VM's uploads added, by VM name.
pub fn stored_bytes_per_vm(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare(
        "SELECT v.name, s.bytes_stored FROM vm_stats s JOIN vms v ON v.id = s.vm_id ORDER BY v.name",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Chunk rows and their uncompressed bytes (None when there are none).
pub fn chunk_totals(conn: &Connection) -> rusqlite::Result<(i64, Option<i64>)> {
    conn.query_row("SELECT COUNT(*), SUM(ulen) FROM chunks", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
}

/// Every committed block change at full size: what the points would take without dedup and
/// compression.
pub fn changed_logical_bytes(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(SUM(changed_blocks * block_size), 0) FROM point_disks",
        [],
        |r| r.get(0),
    )
}
