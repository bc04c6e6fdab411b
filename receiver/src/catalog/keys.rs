//! Data keys of encrypted VMs wrapped to recovery keys (`data_keys`), per owner and keyring.
//! The receiver cannot unwrap them; it keeps them so a recovery key can read what write-only
//! agents sealed, and rewraps them only when given the recovery key (rotation).

use rewind_proto::crypt::{RecoveryPublic, WrappedKey};
use rusqlite::{params, Connection};

/// Most wrapped keys one owner may keep, over all its keyrings (a write-only agent adds one
/// per process and hour, a full keyring one per data key): a hostile agent fills only its own.
pub const MAX_PER_OWNER: i64 = 1 << 20;

/// Most wrapped keys in one answer (a page of `DataKeys` or `CopyKeys`): about 1 MiB.
pub const PAGE: usize = 4096;

/// Keeps `ws` for `owner`'s `keyring` (a key already kept stays as it is); false, keeping
/// none, when the owner would keep more than [`MAX_PER_OWNER`].
pub fn insert_all(
    conn: &Connection,
    owner: &str,
    keyring: &[u8],
    ws: &[WrappedKey],
    now_us: i64,
) -> rusqlite::Result<bool> {
    if ws.is_empty() {
        return Ok(true);
    }
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM data_keys WHERE owner = ?1",
        [owner],
        |r| r.get(0),
    )?;
    if n + ws.len() as i64 > MAX_PER_OWNER {
        return Ok(false);
    }
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO data_keys(owner, keyring, key_id, recovery, blob, created_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for w in ws {
        stmt.execute(params![
            owner,
            keyring,
            &w.key_id[..],
            &w.recovery.as_bytes()[..],
            w.blob,
            now_us
        ])?;
    }
    Ok(true)
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<WrappedKey>> {
    let key_id: Vec<u8> = r.get(0)?;
    let recovery: Vec<u8> = r.get(1)?;
    Ok(
        match (
            <[u8; 8]>::try_from(key_id.as_slice()),
            RecoveryPublic::from_slice(&recovery),
        ) {
            (Ok(key_id), Some(recovery)) => Some(WrappedKey {
                key_id,
                recovery,
                blob: r.get(2)?,
            }),
            _ => None,
        },
    )
}

/// At most [`PAGE`] wrapped keys `owner` keeps for `keyring`, in (key id, recovery key)
/// order after `after`.
pub fn page(
    conn: &Connection,
    owner: &str,
    keyring: &[u8],
    after: (&[u8], &[u8]),
) -> rusqlite::Result<Vec<WrappedKey>> {
    let mut stmt = conn.prepare(
        "SELECT key_id, recovery, blob FROM data_keys WHERE owner = ?1 AND keyring = ?2
           AND (key_id > ?3 OR (key_id = ?3 AND recovery > ?4))
         ORDER BY key_id, recovery LIMIT ?5",
    )?;
    let rows = stmt.query_map(params![owner, keyring, after.0, after.1, PAGE as i64], row)?;
    Ok(rows
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

/// The wrapped keys `owner` keeps for `keyring`.
pub fn of_keyring(
    conn: &Connection,
    owner: &str,
    keyring: &[u8],
) -> rusqlite::Result<Vec<WrappedKey>> {
    let mut stmt = conn.prepare(
        "SELECT key_id, recovery, blob FROM data_keys WHERE owner = ?1 AND keyring = ?2
         ORDER BY created_us, key_id",
    )?;
    let rows = stmt.query_map(params![owner, keyring], row)?;
    Ok(rows
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

/// Forgets the wrapped keys no chunk row names any more, kept before `cutoff`, of owners
/// with no open session (a session may be about to seal chunks with a key it registered).
/// A key an agent still uses comes back with its next Begin. Returns how many it forgot.
pub fn drop_unused(conn: &Connection, cutoff: i64) -> rusqlite::Result<u64> {
    let n = conn.execute(
        "DELETE FROM data_keys WHERE created_us < ?1
           AND NOT EXISTS (SELECT 1 FROM chunks c
                           WHERE c.owner = data_keys.owner AND c.key_id = data_keys.key_id)
           AND NOT EXISTS (SELECT 1 FROM sessions s
                           WHERE s.owner = data_keys.owner AND s.state = 'open')",
        [cutoff],
    )?;
    Ok(n as u64)
}

/// Every wrapped key: (owner, keyring, key).
pub fn all(conn: &Connection) -> rusqlite::Result<Vec<(String, Vec<u8>, WrappedKey)>> {
    let mut stmt = conn.prepare(
        "SELECT key_id, recovery, blob, owner, keyring FROM data_keys ORDER BY owner, keyring, created_us",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(3)?, r.get::<_, Vec<u8>>(4)?, row(r)?))
    })?;
    let mut out = Vec::new();
    for r in rows {
        if let (owner, keyring, Some(w)) = r? {
            out.push((owner, keyring, w));
        }
    }
    Ok(out)
}

/// Replaces `old` (wrapped to one recovery key) with `new` (the same data key wrapped to
/// another).
pub fn replace(
    conn: &Connection,
    (owner, keyring): (&str, &[u8]),
    old: &WrappedKey,
    new: &WrappedKey,
    now_us: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM data_keys WHERE owner = ?1 AND keyring = ?2 AND key_id = ?3 AND recovery = ?4",
        params![
            owner,
            keyring,
            &old.key_id[..],
            &old.recovery.as_bytes()[..]
        ],
    )?;
    conn.execute(
        "INSERT OR REPLACE INTO data_keys(owner, keyring, key_id, recovery, blob, created_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            owner,
            keyring,
            &new.key_id[..],
            &new.recovery.as_bytes()[..],
            new.blob,
            now_us
        ],
    )?;
    Ok(())
}
