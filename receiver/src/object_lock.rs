//! Locked points on object storage: every pack a locked point refers to is put under S3
//! Object Lock in COMPLIANCE mode until the lock's end, so a receiver whose keys are stolen
//! still cannot delete that history (the store refuses). Retention only extends: a longer lock
//! extends the packs' retention, a shorter one leaves it. gc leaves retained packs alone
//! (`catalog::packs::collectable`). Applied by `lock` at once, and by `serve` every
//! [`INTERVAL`] for locks whose packs are not retained long enough yet (a lock taken while the
//! store was unreachable, or packs a later gc made).

use crate::catalog::{self, chunks, packs};
use crate::chunks::{ChunkStore, PackId};
use crate::error::StoreError;
use rusqlite::Connection;
use std::time::Duration;

/// How often `serve` applies locks.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// Retains every pack of every point locked past now until its lock's end; returns the
/// packs whose retention it set or extended. Local packs: nothing to do.
pub fn apply(conn: &Connection, store: &dyn ChunkStore) -> Result<usize, StoreError> {
    if !store.publishes() {
        return Ok(0);
    }
    let now = catalog::now_us();
    let locked: Vec<(String, i64, i64)> = conn
        .prepare(
            "SELECT v.name, p.id, p.locked_until_us FROM points p JOIN vms v ON v.id = p.vm_id
              WHERE p.locked_until_us > ?1 ORDER BY p.id",
        )?
        .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut applied = 0;
    for (vm, point, until) in locked {
        for pack in chunks::packs_in_scope(conn, (Some(&vm), Some(point)))? {
            if packs::retained_until(conn, pack)? >= until {
                continue;
            }
            store.retain(PackId(pack), until)?;
            packs::set_retained(conn, pack, until)?;
            applied += 1;
        }
    }
    Ok(applied)
}
