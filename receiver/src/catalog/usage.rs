//! Running totals of what the store holds: per agent (chunk rows and bytes, the figure its
//! quota is checked against) and per VM (what its uploads added, for the metrics).

use super::VmId;
use rusqlite::Connection;

/// Adds `chunks` and `bytes` (negative to remove) to what `owner` holds, the figure its storage
/// quota is checked against; every insert and delete of chunk rows goes with one.
pub fn add_usage(conn: &Connection, owner: &str, chunks: i64, bytes: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO owner_usage(owner, chunks, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT(owner) DO UPDATE SET chunks = chunks + excluded.chunks,
           bytes = bytes + excluded.bytes",
    )?
    .execute(rusqlite::params![owner, chunks, bytes])
    .map(|_| ())
}

/// The compressed bytes `owner` holds.
pub fn held_bytes(conn: &Connection, owner: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT COALESCE(SUM(bytes), 0) FROM owner_usage WHERE owner = ?1")?
        .query_row([owner], |r| r.get(0))
}

/// Adds new chunks and their compressed bytes to what VM `vm_id`'s uploads stored (metrics).
pub fn add_vm_stored(
    conn: &Connection,
    vm_id: VmId,
    chunks: i64,
    bytes: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO vm_stats(vm_id, chunks_stored, bytes_stored) VALUES (?1, ?2, ?3)
         ON CONFLICT(vm_id) DO UPDATE SET chunks_stored = chunks_stored + excluded.chunks_stored,
           bytes_stored = bytes_stored + excluded.bytes_stored",
        rusqlite::params![vm_id, chunks, bytes],
    )
    .map(|_| ())
}
