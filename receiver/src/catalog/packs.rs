//! Pack rows: ids handed out to writers (never reused), and sealing, which is what lets gc touch
//! a pack.

use super::now_us;
use crate::chunks::{PackDigest, PackId, Retired};
use rusqlite::Connection;

/// Allocates a pack id for `writer` ("serve" or "gc"). Ids are never reused (AUTOINCREMENT),
/// so a deleted pack's name never comes back.
pub fn new_pack(conn: &Connection, writer: &str) -> rusqlite::Result<PackId> {
    conn.execute(
        "INSERT INTO packs(created_us, writer, sealed) VALUES (?1, ?2, 0)",
        rusqlite::params![now_us(), writer],
    )?;
    Ok(PackId(conn.last_insert_rowid()))
}

/// Marks a pack complete: no writer appends to it any more, so gc may rewrite or delete it.
pub fn seal_pack(conn: &Connection, id: PackId) -> rusqlite::Result<()> {
    conn.execute("UPDATE packs SET sealed = 1 WHERE id = ?1", [id])
        .map(|_| ())
}

/// Seals a pack a writer finished, recording what an object store holds of it.
pub fn seal(conn: &Connection, r: &Retired) -> rusqlite::Result<()> {
    seal_pack(conn, r.id)?;
    if let Some(d) = &r.digest {
        conn.execute(
            "UPDATE packs SET bytes = ?2, md5 = ?3, sha256 = ?4, version = ?5 WHERE id = ?1",
            rusqlite::params![r.id, d.bytes as i64, &d.md5[..], &d.sha256[..], d.version],
        )?;
    }
    Ok(())
}

/// Whether pack `id` is sealed (false when there is no such pack).
pub fn is_sealed(conn: &Connection, id: PackId) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM packs WHERE id = ?1 AND sealed = 1)",
        [id],
        |r| r.get(0),
    )
}

/// Seals every pack of `writer`: called when no process of that kind can still be writing
/// (serve at start; gc at start, holding the gc lock).
pub fn seal_orphans(conn: &Connection, writer: &str) -> rusqlite::Result<()> {
    conn.execute("UPDATE packs SET sealed = 1 WHERE writer = ?1", [writer])
        .map(|_| ())
}

/// The greatest pack id handed out so far (0 before the first).
pub fn handed_out(conn: &Connection) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'packs'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Whether the catalog has a row for pack `id`.
pub fn exists(conn: &Connection, id: PackId) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM packs WHERE id = ?1)",
        [id],
        |r| r.get(0),
    )
}

/// Sealed packs gc may rewrite or delete at `now_us`: not under Object Lock.
pub fn collectable(conn: &Connection, now_us: i64) -> rusqlite::Result<Vec<(PackId, i64)>> {
    let mut stmt = conn.prepare(
        "SELECT id, created_us FROM packs WHERE sealed = 1 AND retain_until_us <= ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([now_us], |r| Ok((PackId(r.get(0)?), r.get(1)?)))?;
    rows.collect()
}

/// Until when pack `id`'s object is retained (0: not at all, or no such pack).
pub fn retained_until(conn: &Connection, id: i64) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT retain_until_us FROM packs WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Records that pack `id`'s object is retained until `until_us`.
pub fn set_retained(conn: &Connection, id: i64, until_us: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE packs SET retain_until_us = MAX(retain_until_us, ?2) WHERE id = ?1",
        [id, until_us],
    )
    .map(|_| ())
}

/// Forgets pack `id`'s row. Only once no chunk row refers to it; its file goes after.
pub fn forget(conn: &Connection, id: PackId) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM packs WHERE id = ?1", [id])
        .map(|_| ())
}

/// What an object store was given of pack `id`, if it was recorded.
pub fn digest(conn: &Connection, id: PackId) -> rusqlite::Result<Option<PackDigest>> {
    use rusqlite::OptionalExtension;
    type Row = (
        Option<i64>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Option<String>,
    );
    let row: Option<Row> = conn
        .prepare_cached("SELECT bytes, md5, sha256, version FROM packs WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let Some((Some(bytes), Some(md5), Some(sha256), version)) = row else {
        return Ok(None);
    };
    Ok(match (md5.try_into(), sha256.try_into()) {
        (Ok(md5), Ok(sha256)) => Some(PackDigest {
            bytes: bytes as u64,
            md5,
            sha256,
            version,
        }),
        _ => None,
    })
}

/// What the catalog knows of pack `id`'s object: no row at all, or a row with the version
/// the upload made (None: unversioned, or not recorded) and the object's size (None: not
/// published yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    NoRow,
    Row {
        version: Option<String>,
        bytes: Option<u64>,
    },
}

/// What the catalog knows of pack `id`'s object.
pub fn known(conn: &Connection, id: PackId) -> rusqlite::Result<Known> {
    use rusqlite::OptionalExtension;
    let row: Option<(Option<String>, Option<i64>)> = conn
        .prepare_cached("SELECT version, bytes FROM packs WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(match row {
        None => Known::NoRow,
        Some((version, bytes)) => Known::Row {
            version,
            bytes: bytes.and_then(|b| u64::try_from(b).ok()),
        },
    })
}

/// Looks up pack versions in the catalog of one data folder, on a read-only connection of its
/// own (opened at first use; a catalog not there yet is looked for again next time), for an
/// object store that reads, checks, locks and removes the version each pack was uploaded as.
pub struct VersionBook {
    data: std::path::PathBuf,
    conn: std::sync::Mutex<Option<Connection>>,
}

impl VersionBook {
    pub fn new(data: &std::path::Path) -> VersionBook {
        VersionBook {
            data: data.to_owned(),
            conn: std::sync::Mutex::new(None),
        }
    }

    /// What the catalog knows of pack `id`; None when the catalog cannot be read (the store
    /// then reads the object as it is now, and its reader checks what it reads).
    pub fn known(&self, id: PackId) -> Option<Known> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_none() {
            *conn = super::open_reader(&self.data).ok();
        }
        match known(conn.as_ref()?, id) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::debug!(pack = %id, error = %e, "pack version lookup failed");
                *conn = None;
                None
            }
        }
    }

    /// The version pack `id` was uploaded as, when the catalog recorded one.
    pub fn version(&self, id: PackId) -> Option<String> {
        match self.known(id)? {
            Known::Row { version, .. } => version,
            Known::NoRow => None,
        }
    }

    /// The size of pack `id`'s object, when the catalog recorded it.
    pub fn bytes(&self, id: PackId) -> Option<u64> {
        match self.known(id)? {
            Known::Row { bytes, .. } => bytes,
            Known::NoRow => None,
        }
    }
}

/// Packs among `ids` in the order a deep verify reads them: the longest unread first, with
/// their recorded sizes.
pub fn deep_order(conn: &Connection, ids: &[i64]) -> rusqlite::Result<Vec<(PackId, Option<u64>)>> {
    let mut stmt =
        conn.prepare_cached("SELECT bytes, deep_verified_us FROM packs WHERE id = ?1")?;
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        use rusqlite::OptionalExtension;
        let row: Option<(Option<i64>, i64)> = stmt
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((bytes, at)) = row {
            out.push((at, PackId(id), bytes.map(|b| b as u64)));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, id, b)| (id, b)).collect())
}

/// Records that a deep verify read pack `id` back from the store at `at_us`.
pub fn set_deep_verified(conn: &Connection, id: PackId, at_us: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE packs SET deep_verified_us = ?2 WHERE id = ?1",
        rusqlite::params![id, at_us],
    )
    .map(|_| ())
}

/// Bytes of the packs the catalog knows, as recorded when they were published (the end of
/// their last chunk when not recorded): an object store's size without listing the bucket.
pub fn recorded_bytes(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(SUM(COALESCE(p.bytes,
           (SELECT MAX(c.offset + c.clen) FROM chunks c WHERE c.pack_id = p.id), 0)), 0)
         FROM packs p",
        [],
        |r| r.get(0),
    )
}
