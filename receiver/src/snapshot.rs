//! Catalog snapshots in the object store, and a receiver rebuilt from its bucket alone.
//!
//! With packs on object storage, the catalog is the one thing only the receiver's disk holds.
//! `serve` copies it into the bucket after commits: a consistent copy (`VACUUM INTO`, which
//! reads one transaction's view) uploaded create-only as `catalog/<unix µs, 20 digits>.sqlite`,
//! at most [`INTERVAL`] after the commit that made it due, and once more at a clean stop; the
//! newest [`KEEP`] stay. `recover` fetches the newest one into an empty data folder, drops the
//! rows of packs the bucket does not hold (packs still staged when the snapshot was taken: no
//! committed point refers to them, since a point commits only once its packs are in the
//! bucket), and records the store. Points committed after the snapshot are lost to the
//! receiver (at most one interval's worth); an agent whose state names such a point reads its
//! disks in full on its next sync and sends only the chunks the receiver lacks.
//!
//! gc deletes pack objects; a snapshot older than a gc could name packs gc removed after
//! moving their live chunks. So gc on a bucket takes a snapshot after its repoints and before
//! its deletions ([`crate::gc`]).

use crate::catalog::{self, CATALOG_FILE};
use crate::chunks::location::{self, Location};
use crate::chunks::s3::S3Client;
use crate::error::StoreError;
use rusqlite::params;
use std::path::Path;
use std::time::Duration;

/// Where snapshots live under the store's prefix.
pub const PREFIX: &str = "catalog/";
/// Longest a commit waits to be in a snapshot.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// Snapshots kept.
pub const KEEP: usize = 3;
/// Largest snapshot `recover` fetches.
const MAX_SNAPSHOT: u64 = 64 << 30;

fn client(loc: &Location) -> Result<S3Client, StoreError> {
    let target = loc.target().map_err(crate::chunks::ChunkStoreError::from)?;
    S3Client::new(&target).map_err(|source| {
        StoreError::from(crate::chunks::ChunkStoreError::Remote {
            what: "the store's location".into(),
            source,
        })
    })
}

fn remote(what: &str) -> impl FnOnce(crate::chunks::s3::S3Error) -> StoreError + '_ {
    move |source| {
        StoreError::from(crate::chunks::ChunkStoreError::Remote {
            what: what.to_owned(),
            source,
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Takes a snapshot of data folder `data`'s catalog into its object store; None when the
/// folder keeps local packs (nothing to do). Returns the snapshot's object name.
pub fn take(data: &Path) -> Result<Option<String>, StoreError> {
    let Some(loc) = location::recorded(data).map_err(crate::chunks::ChunkStoreError::from)? else {
        return Ok(None);
    };
    let client = client(&loc)?;
    let tmp = data
        .join(crate::chunks::s3::CACHE_DIR)
        .join("catalog-snapshot.sqlite");
    let _ = std::fs::remove_file(&tmp);
    {
        let conn = catalog::open_ro(data)?;
        conn.execute("VACUUM INTO ?1", params![tmp.display().to_string()])?;
    }
    let name = format!("{PREFIX}{:020}.sqlite", catalog::now_us().max(0));
    // Past one part's size the snapshot goes up in parts, read from the file one at a time.
    let sent = client
        .put_file(&name, &tmp)
        .map_err(remote("uploading the catalog snapshot"));
    let bytes = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_file(&tmp);
    sent?;
    // Older ones beyond the newest KEEP go (best effort: a leftover costs only space).
    if let Ok(mut all) = client.list(PREFIX) {
        all.sort();
        let old = all.len().saturating_sub(KEEP);
        for (n, _) in all.into_iter().take(old) {
            let _ = client.delete(&n);
        }
    }
    tracing::info!(snapshot = %name, bytes, "catalog snapshot in the object store");
    Ok(Some(name))
}

/// What `recover` did.
#[derive(Debug, serde::Serialize)]
pub struct Recovered {
    pub snapshot: String,
    /// Age of the snapshot when it was fetched, in seconds.
    pub snapshot_age_secs: i64,
    pub points: i64,
    pub vms: i64,
    pub packs_in_bucket: usize,
    /// Packs the snapshot names that the bucket lacks (staged when it was taken), and the
    /// chunk rows they held.
    pub packs_dropped: usize,
    pub chunks_dropped: usize,
}

/// Rebuilds a receiver's data folder `data` (empty or missing) from the newest catalog
/// snapshot in the store at `loc`. Pack ids go on past every pack in the bucket.
pub fn recover(data: &Path, loc: &Location) -> Result<Recovered, StoreError> {
    if data.join(CATALOG_FILE).exists() {
        return Err(StoreError::OutputExists(data.join(CATALOG_FILE)));
    }
    std::fs::create_dir_all(data).map_err(io(data))?;
    let client = client(loc)?;
    let mut snaps = client
        .list(PREFIX)
        .map_err(remote("listing catalog snapshots"))?;
    snaps.sort();
    let Some((snapshot, _)) = snaps.pop() else {
        return Err(StoreError::NoSnapshot(loc.shown()));
    };
    let part = data.join(format!(".{CATALOG_FILE}.part"));
    // Streamed into the file: a large catalog never sits in memory whole.
    client
        .get_file(&snapshot, &part, MAX_SNAPSHOT)
        .map_err(remote("fetching the catalog snapshot"))?;
    let taken_us: i64 = snapshot
        .trim_start_matches(PREFIX)
        .trim_end_matches(".sqlite")
        .parse()
        .unwrap_or(0);
    std::fs::rename(&part, data.join(CATALOG_FILE)).map_err(io(data))?;
    let in_bucket: std::collections::HashSet<i64> = client
        .list("packs/")
        .map_err(remote("listing packs"))?
        .iter()
        .filter_map(|(n, _)| {
            let hex = n.strip_prefix("packs/")?.strip_suffix(".pack")?;
            i64::from_str_radix(hex, 16).ok()
        })
        .collect();
    let mut conn = catalog::open_rw(data)?;
    let tx = conn.transaction()?;
    let known: Vec<i64> = tx
        .prepare("SELECT id FROM packs")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let (mut packs_dropped, mut chunks_dropped) = (0, 0);
    for id in known.into_iter().filter(|id| !in_bucket.contains(id)) {
        chunks_dropped += tx.execute("DELETE FROM chunks WHERE pack_id = ?1", [id])?;
        tx.execute("DELETE FROM packs WHERE id = ?1", [id])?;
        packs_dropped += 1;
    }
    // Packs written after the snapshot are in the bucket but not in the catalog: new pack
    // ids start past every pack there (create-only writes would refuse a taken name anyway),
    // and gc removes those orphans later.
    if let Some(&top) = in_bucket.iter().max() {
        tx.execute(
            "INSERT INTO sqlite_sequence(name, seq) SELECT 'packs', 0
              WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'packs')",
            [],
        )?;
        tx.execute(
            "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'packs'",
            [top],
        )?;
    }
    // Points made after the snapshot are lost, and their ids will be handed out again: a new
    // history id tells copies of this receiver that an id no longer names the point it did.
    catalog::copies::new_history(&tx)?;
    let points: i64 = tx.query_row("SELECT COUNT(*) FROM points", [], |r| r.get(0))?;
    let vms: i64 = tx.query_row("SELECT COUNT(*) FROM vms", [], |r| r.get(0))?;
    tx.commit()?;
    location::record(data, loc).map_err(crate::chunks::ChunkStoreError::from)?;
    Ok(Recovered {
        snapshot,
        snapshot_age_secs: (catalog::now_us() - taken_us) / 1_000_000,
        points,
        vms,
        packs_in_bucket: in_bucket.len(),
        packs_dropped,
        chunks_dropped,
    })
}
