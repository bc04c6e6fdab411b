//! Rolling a disk on this host back (or forward) to a point: compare the disk's current block
//! leaves with the point's, fetch only the chunks of blocks that differ over the same mutual-TLS
//! channel, write them (raw files and devices directly, qcow2 images through a writable
//! `qemu-nbd`), then re-read the disk and check its root equals the point's before reporting
//! success. A disk a running QEMU holds (its image lock) is refused. Later points stay.
//!
//! The steps, one module each: [`target`] opens the disk (and reads which blocks its dirty
//! bitmaps name), [`leaves`] streams the point's leaves (from the receiver, or from the agent's
//! own state when the point is its last one), [`compare`] merges them with the disk's current
//! leaves in block order, [`fetch`] asks the receiver for the chunks of differing blocks, and
//! [`apply`] writes them and reads every written block back. The point's leaves are never held
//! whole: memory stays bounded whatever the disk size.

mod apply;
mod compare;
mod fetch;
mod leaves;
mod target;

use crate::error::SyncError;
use crate::sync::{DiskKind, DiskSource};
use compare::{Compared, Scope};
use fetch::{fetch, Found, Work};
use futures::StreamExt;
use leaves::LeafStream;
use rewind_proto::chunk::ChunkError;
use rewind_proto::format::{DiskGeometry, MAX_POINT_BLOCKS_PAGE};
use rewind_proto::pb::replication_client::ReplicationClient;
use rewind_proto::{pb, DiskRoot};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use thiserror::Error;
use tonic::transport::Channel;

/// ReadChunks requests in flight during a rollback.
const CHUNK_REQUESTS_IN_FLIGHT: usize = 16;

/// What to roll back.
#[derive(Debug, Clone)]
pub struct RollbackConfig {
    pub vm: String,
    pub point: i64,
    pub disks: Vec<DiskSource>,
    pub state_dir: PathBuf,
    pub dry_run: bool,
    /// The key of an encrypted VM (its keyring's id keys and data key), Plain otherwise.
    pub codec: rewind_proto::crypt::Codec,
    /// A recovery key: reads the VM's points through the data keys wrapped to it (those of
    /// write-only agents included), instead of a key file.
    pub recovery: Option<std::sync::Arc<rewind_proto::crypt::RecoveryKey>>,
}

/// One disk's rollback.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRollback {
    pub name: String,
    pub size: u64,
    pub root: String,
    /// Blocks whose content differed from the point.
    pub blocks_differing: u64,
    /// Compressed chunk bytes fetched from the receiver.
    pub bytes_fetched: u64,
    /// Bytes written to the disk (zeroed blocks included).
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// How the current content was compared: every allocated block read, or only the blocks
    /// a dirty bitmap and the point chain say can differ.
    pub compared: &'static str,
    /// The disk's root was re-read and equals the point's.
    pub verified: bool,
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub vm: String,
    pub point: i64,
    pub dry_run: bool,
    pub disks: Vec<DiskRollback>,
    pub seconds: f64,
}

/// Why a rollback failed.
#[derive(Debug, Error)]
pub enum RollbackError {
    /// A step it shares with replication (connecting, asking the receiver, NBD, qemu-nbd,
    /// the agent's state) failed.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// Opening, writing or flushing the disk failed.
    #[error("disk {path}")]
    DiskIo {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A chunk the receiver sent does not hold the content its id names: the receiver's copy
    /// is damaged (run `verify` there). Nothing of it was written.
    #[error("a chunk from the receiver is damaged")]
    Corrupt(#[source] ChunkError),
    /// The disk is held by a running VM.
    #[error("disk {0} ({1}) is in use by a running VM (QEMU holds its lock)")]
    InUse(String, PathBuf),
    /// The disk's size differs from the point's.
    #[error("disk {disk} is {have} bytes, the point's is {want}")]
    SizeMismatch { disk: String, have: u64, want: u64 },
    /// After a rollback the disk does not match the point.
    #[error("disk {disk} after rollback has root {got}, the point has {want}")]
    Verify {
        disk: String,
        got: String,
        want: String,
    },
    /// A block written by the rollback read back with other content.
    #[error("disk {disk}: block {block} read back with hash {got}, not what was written")]
    ReadBack {
        disk: String,
        block: u64,
        got: String,
    },
    /// The point's encryption and the key given do not go together (an encrypted point
    /// without a key, a key of another keyring), or its manifest MAC does not verify.
    #[error("{0}")]
    Key(String),
    /// A worker thread or task died.
    #[error("internal worker failed: {0}")]
    Worker(String),
}

impl RollbackError {
    /// A short, stable name of the failure's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            RollbackError::Sync(e) => e.kind(),
            RollbackError::DiskIo { .. } => "disk",
            RollbackError::Corrupt(_) => "data-loss",
            RollbackError::InUse(..) => "in-use",
            RollbackError::SizeMismatch { .. } => "config",
            RollbackError::Verify { .. } | RollbackError::ReadBack { .. } => "verify",
            RollbackError::Key(_) => "key",
            RollbackError::Worker(_) => "internal",
        }
    }

    fn protocol(what: &'static str) -> RollbackError {
        RollbackError::Sync(SyncError::Protocol(what))
    }

    fn refused(call: &'static str) -> impl FnOnce(tonic::Status) -> RollbackError {
        move |status| RollbackError::Sync(SyncError::Refused { call, status })
    }

    fn joined(e: tokio::task::JoinError) -> RollbackError {
        RollbackError::Worker(e.to_string())
    }
}

/// The shared steps' errors convert through [`SyncError`].
macro_rules! via_sync {
    ($($t:ty),*) => {$(
        impl From<$t> for RollbackError {
            fn from(e: $t) -> Self {
                RollbackError::Sync(SyncError::from(e))
            }
        }
    )*};
}
via_sync!(
    crate::nbd::NbdError,
    crate::offline::OfflineError,
    crate::source::DiskError,
    crate::scan::ScanError,
    rusqlite::Error
);

/// Rolls every disk of `cfg` back to the point.
pub async fn rollback(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
) -> Result<RollbackReport, RollbackError> {
    let started = Instant::now();
    let (codec, verified) = check_key(client, cfg).await?;
    let cfg = &RollbackConfig {
        codec,
        ..cfg.clone()
    };
    let mut disks = Vec::new();
    for d in &cfg.disks {
        disks.push(rollback_disk(client, cfg, d, &verified, started).await?);
    }
    Ok(RollbackReport {
        vm: cfg.vm.clone(),
        point: cfg.point,
        dry_run: cfg.dry_run,
        disks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Every wrapped data key of `vm`, a page at a time.
async fn data_keys(
    client: &mut ReplicationClient<Channel>,
    vm: &str,
) -> Result<Vec<pb::WrappedKey>, RollbackError> {
    let mut keys: Vec<pb::WrappedKey> = Vec::new();
    loop {
        let after = keys.last().map(|k| (k.key_id.clone(), k.recovery.clone()));
        let page = client
            .data_keys(pb::DataKeysRequest {
                vm: vm.to_owned(),
                after_key_id: after.clone().map(|a| a.0).unwrap_or_default(),
                after_recovery: after.map(|a| a.1).unwrap_or_default(),
            })
            .await
            .map_err(RollbackError::refused("DataKeys"))?
            .into_inner();
        let (more, got) = (page.more, page.keys.len());
        keys.extend(page.keys);
        if !more || got == 0 {
            return Ok(keys);
        }
    }
}

/// A disk of a point as its manifest MAC binds it: name, size, block size, root.
type VerifiedDisk = (String, u64, u32, [u8; 32]);

/// The codec the rollback reads with, once the key given fits the point: none for a plain
/// point; for an encrypted one, a key file of its keyring (not a write-only one) or a recovery
/// key that unwraps its data keys (with the agent's own key file given too, the keyring is
/// pinned to it), under which the point's manifest MAC verifies. Returns the disks the MAC
/// binds (none for a plain point): each disk's geometry and root must be what the receiver
/// then serves, and its root binds every leaf.
async fn check_key(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
) -> Result<(rewind_proto::crypt::Codec, Vec<VerifiedDisk>), RollbackError> {
    use rewind_proto::crypt::{Codec, KeyringId, Manifest};
    let points = client
        .list_points(pb::ListPointsRequest { vm: cfg.vm.clone() })
        .await
        .map_err(RollbackError::refused("ListPoints"))?
        .into_inner()
        .points;
    let at = format!("point {} of {}", cfg.point, cfg.vm);
    let key_err = |why: String| RollbackError::Key(format!("{at} {why}"));
    let given = matches!(cfg.codec, Codec::Sealed { .. }) || cfg.recovery.is_some();
    let Some(p) = points.iter().find(|p| p.id == cfg.point as u64) else {
        if given {
            return Err(key_err("is not among the VM's points".into()));
        }
        // PointBlocks names the missing point in the receiver's own words.
        return Ok((Codec::Plain, Vec::new()));
    };
    if p.keyring.is_empty() {
        return match given {
            true => Err(key_err("is not encrypted: drop the key".into())),
            false => Ok((Codec::Plain, Vec::new())),
        };
    }
    let id = KeyringId::from_slice(&p.keyring)
        .ok_or(RollbackError::protocol("a keyring id that is not 16 bytes"))?;
    if let (Codec::Sealed { keyring: own, .. }, Some(_)) = (&cfg.codec, &cfg.recovery) {
        if own.id() != id {
            return Err(key_err(format!(
                "is encrypted with keyring {id}; this agent's key file is keyring {}",
                own.id()
            )));
        }
    }
    let keyring = match (&cfg.codec, &cfg.recovery) {
        (_, Some(r)) => {
            let keys = data_keys(client, &cfg.vm).await?;
            let wrapped: Vec<_> = keys
                .iter()
                .filter_map(|k| {
                    Some(rewind_proto::crypt::WrappedKey {
                        key_id: k.key_id.as_slice().try_into().ok()?,
                        recovery: rewind_proto::crypt::RecoveryPublic::from_slice(&k.recovery)?,
                        blob: k.blob.clone(),
                    })
                })
                .collect();
            std::sync::Arc::new(r.open_keyring(id, &wrapped).ok_or_else(|| {
                key_err(format!(
                    "has none of its {} data keys wrapped to this recovery key",
                    wrapped.len()
                ))
            })?)
        }
        (Codec::Sealed { keyring, .. }, None) if keyring.write_only() => {
            return Err(key_err(
                "needs the recovery key (--recovery-key): this agent's key is write-only".into(),
            ))
        }
        (Codec::Sealed { keyring, .. }, None) => keyring.clone(),
        (Codec::Plain | Codec::Locked, None) => {
            return Err(key_err(format!(
                "is encrypted (keyring {id}): give its key with --encryption-key or the \
                 recovery key with --recovery-key"
            )))
        }
    };
    if keyring.id() != id {
        return Err(key_err(format!(
            "is encrypted with keyring {id}; the key given is keyring {}",
            keyring.id()
        )));
    }
    let mut verified: Vec<VerifiedDisk> = Vec::new();
    for d in &p.disks {
        let root = <[u8; 32]>::try_from(d.root.as_slice())
            .map_err(|_| RollbackError::protocol("a root that is not 32 bytes"))?;
        verified.push((d.name.clone(), d.size, d.block_size, root));
    }
    let manifest = Manifest {
        vm: &cfg.vm,
        taken_us: p.taken_us,
        consistency: &p.consistency,
        config_hash: <[u8; 32]>::try_from(p.config_hash.as_slice()).unwrap_or_default(),
        disks: verified
            .iter()
            .map(|(n, s, b, r)| (n.as_str(), *s, *b, *r))
            .collect(),
    };
    if !keyring.verify_manifest(&manifest, &p.manifest_mac) {
        return Err(key_err(
            "has a manifest MAC that does not verify with this key: the receiver does not \
             serve the point the agent committed"
                .into(),
        ));
    }
    Ok((
        Codec::Sealed {
            keyring,
            pad: false,
        },
        verified,
    ))
}

/// One disk: open it and learn the point, choose what to compare, compare while fetching and
/// writing, check the result, record the event.
async fn rollback_disk(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
    d: &DiskSource,
    verified: &[VerifiedDisk],
    started: Instant,
) -> Result<DiskRollback, RollbackError> {
    let opening = {
        let (d, state_dir, vm) = (d.clone(), cfg.state_dir.clone(), cfg.vm.clone());
        tokio::task::spawn_blocking(move || target::open_disk(&d, &state_dir, &vm))
    };
    // Rolling back to the agent's own last point (the usual case) with trusted bitmaps: the
    // agent's state already holds the point's leaves, so only its geometry and root are asked
    // for, and the state is used once its root matches the receiver's.
    let own_point = target::base_point(&cfg.state_dir, &cfg.vm) == Some(cfg.point);
    let first_limit = if own_point && d.kind == DiskKind::Qcow2 {
        1
    } else {
        MAX_POINT_BLOCKS_PAGE
    };
    let first = leaves::point_page(client, &cfg.vm, cfg.point, &d.name, 0, first_limit).await?;
    let g = DiskGeometry::new(first.size, u64::from(first.block_size)).map_err(|source| {
        SyncError::Geometry {
            disk: d.name.clone(),
            source,
        }
    })?;
    let root = first.root;
    // An encrypted point: the disk the receiver serves must be the one the MAC binds.
    if !verified.is_empty() {
        let served = (g.size, g.block_size.get(), root.0);
        if !verified
            .iter()
            .any(|(n, s, b, r)| *n == d.name && (*s, *b, *r) == served)
        {
            return Err(RollbackError::Key(format!(
                "point {} of {}: disk {} as the receiver serves it (root {root}) is not the one \
                 the point's manifest MAC binds",
                cfg.point, cfg.vm, d.name
            )));
        }
    }
    let (target, dirty) = opening.await.map_err(RollbackError::joined)??;
    if target.size() != g.size {
        return Err(RollbackError::SizeMismatch {
            disk: d.name.clone(),
            have: target.size(),
            want: g.size,
        });
    }
    let (want, scope) = leaves::choose(client, cfg, &d.name, &g, first, dirty).await?;
    tracing::debug!(disk = %d.name, scope = scope.describe(), at = ?started.elapsed(), "compare chosen");
    let compared_by = scope.describe();
    let (target, compared, written) =
        compare_and_write(client, cfg, &d.name, &g, target, want, scope).await?;
    tracing::debug!(disk = %d.name, differing = compared.differing, at = ?started.elapsed(), "compared, fetched and written");
    let mut report = DiskRollback {
        name: d.name.clone(),
        size: g.size,
        root: root.to_hex(),
        blocks_differing: compared.differing,
        bytes_fetched: written.as_ref().map_or(0, |w| w.fetched),
        bytes_written: 0,
        bytes_read: compared.read,
        compared: compared_by,
        verified: false,
    };
    if let Some(w) = written {
        report.bytes_written = w.bytes;
        report.bytes_read += w.reread;
        check(&d.name, &compared, &w, root)?;
        report.verified = true;
    }
    // The image is closed (qemu-nbd exits, writing its bitmaps) while the event is recorded;
    // both are done before the rollback reports anything.
    let closing = tokio::task::spawn_blocking(move || drop(target));
    let recorded = client
        .record_rollback(pb::RollbackEvent {
            vm: cfg.vm.clone(),
            point: cfg.point as u64,
            disk: d.name.clone(),
            blocks: report.blocks_differing,
            bytes: report.bytes_fetched,
            dry_run: cfg.dry_run,
        })
        .await
        .map_err(RollbackError::refused("RecordRollback"));
    closing.await.map_err(RollbackError::joined)?;
    tracing::debug!(at = ?started.elapsed(), "recorded and closed");
    recorded?;
    Ok(report)
}

/// Every differing block was read back right after it was written or zeroed; every other one
/// was found (or, with a bitmap, known) equal to the point. So the disk's root is that of the
/// point's leaves, unless a block read back was wrong.
fn check(
    disk: &str,
    compared: &Compared,
    w: &apply::Written,
    root: DiskRoot,
) -> Result<(), RollbackError> {
    if w.checked != compared.differing {
        return Err(RollbackError::Worker(format!(
            "{} of {} differing blocks were read back",
            w.checked, compared.differing
        )));
    }
    let now = match (w.wrong, compared.root) {
        (Some((block, got)), _) => {
            return Err(RollbackError::ReadBack {
                disk: disk.to_owned(),
                block,
                got: got.to_hex(),
            })
        }
        (None, Some(r)) => r,
        (None, None) => return Err(RollbackError::Worker("the compare stopped early".into())),
    };
    if now != root {
        return Err(RollbackError::Verify {
            disk: disk.to_owned(),
            got: now.to_hex(),
            want: root.to_hex(),
        });
    }
    Ok(())
}

/// The compare runs on a thread of its own and hands over the blocks that differ as it finds
/// them, a request's worth at a time: their chunks are fetched and written while the rest is
/// still compared. A compare that fails part way leaves the blocks already written rolled back,
/// as a failed write does; the error is reported either way. Returns the disk, what the compare
/// found and (unless a dry run) what was written.
async fn compare_and_write(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
    disk: &str,
    g: &DiskGeometry,
    mut target: target::Target,
    want: LeafStream,
    scope: Scope,
) -> Result<(target::Target, Compared, Option<apply::Written>), RollbackError> {
    let g = *g;
    let (found_tx, found_rx) = tokio::sync::mpsc::channel::<Found>(CHUNK_REQUESTS_IN_FLIGHT);
    let writing = if cfg.dry_run {
        None
    } else {
        Some((target.writer(disk)?, target.second_reader(disk)?))
    };
    let ids = cfg.codec.chunk_ids();
    let compare = {
        let found_tx = writing.is_some().then_some(found_tx);
        tokio::task::spawn_blocking(move || {
            let mut requests = fetch::Requests::new(g.block_size.bytes(), found_tx);
            let r = compare::compare(&mut target, &g, want, scope, ids, &mut |i, leaf| {
                requests.push(i, leaf)
            });
            requests.finish();
            (target, r)
        })
    };
    let written = match writing {
        None => None,
        Some((w, checker)) => Some(fetch_and_write(client, cfg, g, (w, checker), found_rx).await),
    };
    let (target, compared) = compare.await.map_err(RollbackError::joined)?;
    let compared = compared?;
    let written = written.transpose()?;
    Ok((target, compared, written))
}

/// Fetches the chunks of the requests the compare sends (several in flight, replies handed on
/// in order) and has them decompressed, written and read back on threads of their own while
/// later ones arrive. On an error the writer still finishes (and the compare stops) before it
/// is reported. The disk is flushed before this returns.
async fn fetch_and_write(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
    g: DiskGeometry,
    (w, checker): (apply::Writer, Box<dyn crate::scan::BlockSource + Send>),
    found_rx: tokio::sync::mpsc::Receiver<Found>,
) -> Result<apply::Written, RollbackError> {
    let vm = cfg.vm.as_str();
    let (wtx, wrx) = tokio::sync::mpsc::channel::<Work>(CHUNK_REQUESTS_IN_FLIGHT);
    let codec = cfg.codec.clone();
    let writer =
        tokio::task::spawn_blocking(move || apply::write_blocks(w, checker, g, codec, wrx));
    let mut replies = Box::pin(
        futures::stream::unfold(found_rx, |mut rx| async move {
            rx.recv().await.map(|f| (f, rx))
        })
        .map(|found| fetch(client.clone(), vm.to_owned(), found))
        .buffered(CHUNK_REQUESTS_IN_FLIGHT),
    );
    let mut fetched_bytes = 0u64;
    let fetched = async {
        while let Some(reply) = replies.next().await {
            let (work, bytes) = reply?;
            fetched_bytes += bytes;
            if wtx.send(work).await.is_err() {
                break;
            }
        }
        Ok::<_, RollbackError>(())
    }
    .await;
    drop(replies);
    drop(wtx);
    let written = writer.await.map_err(RollbackError::joined)?;
    fetched?;
    let (mut w, mut written) = written?;
    w.flush()?;
    written.fetched = fetched_bytes;
    Ok(written)
}
