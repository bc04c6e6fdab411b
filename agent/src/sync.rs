//! One replication cycle of one VM: settle any session left by a crash, begin (or resume) the
//! session for the next point, scan the disks for changed blocks, upload what the receiver
//! lacks, commit with the roots, and only then make the new point the local base.

use crate::error::SyncError;
use crate::scan::{self, Change, DiskScan, ScanError};
use crate::source::RawDisk;
use crate::state::{self, OldLeaves, PendingWriter};
use rayon::prelude::*;
use rewind_proto::format::{BlockSize, DiskGeometry, BATCH_TARGET_BYTES};
use rewind_proto::pb::replication_client::ReplicationClient;
use rewind_proto::{chunk, names, pb, Leaf};
use serde::Serialize;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Most block entries in one upload batch: keeps metadata-only batches (blocks that became
/// zero, or chunks the receiver already holds) well under the message limit.
const MAX_WINDOW_ENTRIES: usize = 16_384;
/// Batches queued between the scanner and the network.
const QUEUE_DEPTH: usize = 4;

/// One disk to protect: a name and a raw image or block device.
#[derive(Debug, Clone)]
pub struct DiskSource {
    pub name: String,
    pub path: PathBuf,
}

/// What a cycle works on.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub vm: String,
    pub disks: Vec<DiskSource>,
    pub block_size: BlockSize,
    pub state_dir: PathBuf,
    /// Upper bound on compressed bytes sent per second.
    pub bwlimit: Option<u64>,
}

/// One disk of a committed point, as `sync --json` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub size: u64,
    pub root: String,
    pub mode: &'static str,
    pub changed_blocks: u64,
    pub read_bytes: u64,
    pub sent_bytes: u64,
    pub sent_chunks: u64,
}

/// What one cycle did.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub vm: String,
    pub point: i64,
    pub created: String,
    pub base_point: Option<i64>,
    pub session: String,
    pub resumed: bool,
    pub disks: Vec<DiskReport>,
    pub sent_bytes: u64,
    pub seconds: f64,
}

/// Progress callback: bytes scanned so far out of the total.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

struct Item {
    pos: u32,
    change: Change,
}

struct OpenDisk {
    name: String,
    disk: RawDisk,
    geometry: DiskGeometry,
}

/// Runs one cycle and returns the committed point.
pub async fn sync_once(
    client: &mut ReplicationClient<Channel>,
    cfg: &SyncConfig,
    progress: Progress,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    names::vm(&cfg.vm)?;
    let mut disks = Vec::new();
    for d in &cfg.disks {
        names::disk(&d.name)?;
        let disk = RawDisk::open(&d.path)?;
        let geometry =
            DiskGeometry::new(disk.size(), cfg.block_size.bytes()).map_err(|source| {
                SyncError::Geometry {
                    disk: d.name.clone(),
                    source,
                }
            })?;
        disks.push(OpenDisk {
            name: d.name.clone(),
            disk,
            geometry,
        });
    }
    let mut conn = state::open(&cfg.state_dir)?;

    // A session left by a crash: if its commit landed, adopt it before anything else.
    let mut vm_state = state::vm_state(&conn, &cfg.vm)?;
    if let Some(pending) = vm_state.pending_session.clone() {
        let status = client
            .session_status(pb::SessionStatusRequest { session: pending })
            .await
            .map_err(SyncError::refused("SessionStatus"))?
            .into_inner();
        if status.state == pb::SessionState::Committed as i32 {
            tracing::info!(vm = %cfg.vm, point = status.point, "adopting a point committed before a crash");
            state::apply_pending(&mut conn, &cfg.vm, status.point as i64)?;
            vm_state = state::vm_state(&conn, &cfg.vm)?;
        }
    }

    let request = pb::BeginRequest {
        vm: cfg.vm.clone(),
        disks: disks
            .iter()
            .map(|d| pb::DiskSpec {
                name: d.name.clone(),
                size: d.geometry.size,
                block_size: d.geometry.block_size.get(),
            })
            .collect(),
        base_point: vm_state.base_point.unwrap_or(0) as u64,
        resume_session: vm_state.pending_session.clone().unwrap_or_default(),
    };
    let mut plan = client
        .begin(request.clone())
        .await
        .map_err(SyncError::refused("Begin"))?
        .into_inner();
    if plan.committed_point != 0 {
        state::apply_pending(&mut conn, &cfg.vm, plan.committed_point as i64)?;
        let again = pb::BeginRequest {
            base_point: plan.committed_point,
            resume_session: String::new(),
            ..request
        };
        plan = client
            .begin(again)
            .await
            .map_err(SyncError::refused("Begin"))?
            .into_inner();
    }
    let resumed = vm_state.pending_session.as_deref() == Some(plan.session.as_str());
    if plan.disks.len() != disks.len()
        || plan.disks.iter().zip(&disks).any(|(p, d)| p.name != d.name)
    {
        return Err(SyncError::Protocol(
            "the plan does not list our disks in order",
        ));
    }
    let full: Vec<bool> = plan
        .disks
        .iter()
        .map(|p| p.mode != pb::DiskMode::Delta as i32)
        .collect();
    tracing::info!(
        vm = %cfg.vm, session = %plan.session, resumed,
        modes = ?plan.disks.iter().zip(&full).map(|(p, f)| format!("{}={}", p.name, if *f { "full" } else { "delta" })).collect::<Vec<_>>(),
        "session begun"
    );
    state::start_pending(
        &mut conn,
        &cfg.vm,
        &plan.session,
        &disks
            .iter()
            .zip(&full)
            .map(|(d, f)| (d.name.clone(), d.geometry, *f))
            .collect::<Vec<_>>(),
    )?;
    drop(conn);

    let (scans, sent) = transfer(
        client,
        cfg,
        &plan.session,
        disks_arc(disks),
        &full,
        progress,
    )
    .await?;

    let roots = scans
        .iter()
        .map(|(name, s, _)| pb::DiskRoot {
            name: name.clone(),
            root: s.root.0.to_vec(),
            changed_blocks: s.changed,
        })
        .collect();
    let committed = match client
        .commit(pb::CommitRequest {
            session: plan.session.clone(),
            roots,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if status.code() == tonic::Code::DataLoss {
                // Our base disagrees with the receiver's: the next cycle reads everything and
                // sends only chunks the receiver lacks, never a delta against a wrong base.
                tracing::error!(vm = %cfg.vm, "root mismatch: forgetting local state for a full resync");
                let mut conn = state::open(&cfg.state_dir)?;
                state::forget(&mut conn, &cfg.vm)?;
            }
            return Err(SyncError::Refused {
                call: "Commit",
                status,
            });
        }
    };
    let mut conn = state::open(&cfg.state_dir)?;
    state::apply_pending(&mut conn, &cfg.vm, committed.point as i64)?;

    let disks: Vec<DiskReport> = scans
        .iter()
        .zip(&full)
        .zip(&sent)
        .map(|(((name, s, size), f), (bytes, chunks))| DiskReport {
            name: name.clone(),
            size: *size,
            root: s.root.to_hex(),
            mode: if *f { "full" } else { "delta" },
            changed_blocks: s.changed,
            read_bytes: s.read_bytes,
            sent_bytes: *bytes,
            sent_chunks: *chunks,
        })
        .collect();
    Ok(SyncReport {
        vm: cfg.vm.clone(),
        point: committed.point as i64,
        created: committed.created,
        base_point: (plan.base_point != 0).then_some(plan.base_point as i64),
        session: plan.session,
        resumed,
        sent_bytes: disks.iter().map(|d| d.sent_bytes).sum(),
        disks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn disks_arc(d: Vec<OpenDisk>) -> Arc<Vec<OpenDisk>> {
    Arc::new(d)
}

type ScanResults = Vec<(String, DiskScan, u64)>;

/// Scans all disks on a blocking thread while uploading what they yield; returns each disk's
/// scan and (bytes, chunks) sent for it.
async fn transfer(
    client: &mut ReplicationClient<Channel>,
    cfg: &SyncConfig,
    session: &str,
    disks: Arc<Vec<OpenDisk>>,
    full: &[bool],
    progress: Progress,
) -> Result<(ScanResults, Vec<(u64, u64)>), SyncError> {
    let (wtx, mut wrx) = mpsc::channel::<Vec<Item>>(QUEUE_DEPTH);
    let scanner = {
        let disks = disks.clone();
        let full = full.to_vec();
        let state_dir = cfg.state_dir.clone();
        let vm = cfg.vm.clone();
        tokio::task::spawn_blocking(move || scan_all(&disks, &full, &state_dir, &vm, wtx, progress))
    };

    let (btx, brx) = mpsc::channel::<pb::Batch>(QUEUE_DEPTH);
    let upload = {
        let mut c = client.clone();
        tokio::spawn(async move { c.upload(ReceiverStream::new(brx)).await })
    };

    let mut sent = vec![(0u64, 0u64); disks.len()];
    let mut seen: HashSet<Leaf> = HashSet::new();
    let mut limiter = cfg.bwlimit.map(RateLimiter::new);
    let mut upload_gone = false;
    while let Some(window) = wrx.recv().await {
        let mut ask: Vec<Leaf> = Vec::new();
        for it in &window {
            let leaf = it.change.leaf;
            if !leaf.is_zero() && !seen.contains(&leaf) && !ask.contains(&leaf) {
                ask.push(leaf);
            }
        }
        let missing: HashSet<Leaf> = if ask.is_empty() {
            HashSet::new()
        } else {
            let reply = client
                .missing_chunks(pb::MissingChunksRequest {
                    session: session.to_owned(),
                    hashes: ask.iter().map(|h| h.0.to_vec()).collect(),
                })
                .await
                .map_err(SyncError::refused("MissingChunks"))?
                .into_inner();
            reply
                .missing
                .iter()
                .filter_map(|h| Leaf::from_slice(h).ok())
                .collect()
        };
        seen.extend(ask.iter().copied());
        let mut to_send: Vec<(u32, Leaf, &[u8])> = Vec::new();
        let mut queued: HashSet<Leaf> = HashSet::new();
        for it in &window {
            if let Some(data) = &it.change.data {
                if missing.contains(&it.change.leaf) && queued.insert(it.change.leaf) {
                    to_send.push((it.pos, it.change.leaf, data));
                }
            }
        }
        let frames: Vec<(u32, Leaf, Vec<u8>)> = tokio::task::block_in_place(|| {
            to_send
                .par_iter()
                .map(|(pos, leaf, data)| chunk::compress(data).map(|f| (*pos, *leaf, f)))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .map_err(|e| SyncError::Worker(format!("compression failed: {e}")))?;
        let mut bytes = 0u64;
        for (pos, _, f) in &frames {
            sent[*pos as usize].0 += f.len() as u64;
            sent[*pos as usize].1 += 1;
            bytes += f.len() as u64;
        }
        let batch = pb::Batch {
            session: session.to_owned(),
            entries: window
                .iter()
                .map(|it| pb::BlockEntry {
                    disk: it.pos,
                    index: it.change.index,
                    hash: it.change.leaf.0.to_vec(),
                })
                .collect(),
            chunks: frames
                .into_iter()
                .map(|(_, leaf, data)| pb::Chunk {
                    hash: leaf.0.to_vec(),
                    data,
                })
                .collect(),
        };
        if let Some(l) = limiter.as_mut() {
            l.spend(bytes).await;
        }
        if btx.send(batch).await.is_err() {
            upload_gone = true;
            break;
        }
    }
    drop(btx);
    drop(wrx);
    let uploaded = upload
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?
        .map_err(SyncError::refused("Upload"));
    let scanned = scanner
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?;
    // The upload's own error explains a stopped scan better than "upload stopped".
    uploaded?;
    if upload_gone {
        return Err(SyncError::Protocol("the upload stream closed early"));
    }
    let scans = scanned?;
    Ok((scans, sent))
}

/// The blocking half of [`transfer`]: scans disk after disk, records every change as pending
/// and hands batches of changes to the uploader.
fn scan_all(
    disks: &[OpenDisk],
    full: &[bool],
    state_dir: &std::path::Path,
    vm: &str,
    out: mpsc::Sender<Vec<Item>>,
    progress: Progress,
) -> Result<ScanResults, SyncError> {
    let read_conn = state::open(state_dir)?;
    let mut write_conn = state::open(state_dir)?;
    let mut pending = PendingWriter::new(&mut write_conn, vm)?;
    let total: u64 = disks.iter().map(|d| d.geometry.size).sum();
    let mut done_before = 0u64;
    let mut results = Vec::new();
    let mut window: Vec<Item> = Vec::new();
    let mut window_bytes = 0usize;
    for (pos, d) in disks.iter().enumerate() {
        let mut old = OldLeaves::new(&read_conn, vm, (!full[pos]).then_some(d.name.as_str()));
        let report = |p: u64| progress(done_before + p, total);
        let plan = scan::ScanPlan::full(&d.disk.data_extents()?, &d.geometry);
        let mut disk = d.disk.try_clone()?;
        let scan = scan::scan_disk(
            &mut disk,
            d.geometry,
            &plan,
            &mut old,
            |change| {
                pending.add(&d.name, change.index, &change.leaf)?;
                window_bytes += change.data.as_ref().map_or(0, Vec::len);
                window.push(Item {
                    pos: pos as u32,
                    change,
                });
                if window_bytes >= BATCH_TARGET_BYTES || window.len() >= MAX_WINDOW_ENTRIES {
                    window_bytes = 0;
                    out.blocking_send(std::mem::take(&mut window))
                        .map_err(|_| ScanError::Stopped)?;
                }
                Ok(())
            },
            &report,
        )?;
        tracing::info!(vm, disk = %d.name, changed = scan.changed, read = scan.read_bytes, "disk scanned");
        done_before += d.geometry.size;
        results.push((d.name.clone(), scan, d.geometry.size));
    }
    if !window.is_empty() {
        out.blocking_send(window).map_err(|_| ScanError::Stopped)?;
    }
    pending.finish()?;
    Ok(results)
}

/// Keeps the average send rate under a limit.
struct RateLimiter {
    bytes_per_sec: u64,
    started: Instant,
    spent: u64,
}

impl RateLimiter {
    fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            started: Instant::now(),
            spent: 0,
        }
    }

    async fn spend(&mut self, bytes: u64) {
        self.spent += bytes;
        let due = Duration::from_secs_f64(self.spent as f64 / self.bytes_per_sec as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}
