//! One replication cycle of one VM: settle any session left by a crash, begin (or resume) the
//! session for the next point, scan the disks for changed blocks, upload what the receiver
//! lacks, commit with the roots, and only then make the new point the local base.

use crate::error::SyncError;
use crate::live::{self, DiskCapture, LiveError, Workdir};
use crate::nbd::{self, NbdClient};
use crate::offline::{self, NbdServer};
use crate::qmp::{Qmp, QmpError};
use crate::scan::{self, BlockSource, Change, DiskScan, Outside, ScanError, ScanPlan};
use crate::source::RawDisk;
use crate::state::{self, OldLeaves, PendingWriter};
use futures::StreamExt;
use rayon::prelude::*;
use rewind_proto::format::{BlockSize, DiskGeometry, BATCH_TARGET_BYTES};
use rewind_proto::pb::replication_client::ReplicationClient;
use rewind_proto::report::{self, Chain};
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
/// Most chunk hashes remembered per session to skip repeated questions.
const MAX_SEEN: usize = 1 << 20;
/// Windows queued between the scanner and the compressor, and upload messages between the
/// compressor and the network.
const QUEUE_DEPTH: usize = 4;
/// Most compressed chunk bytes in one upload message. The receiver keeps only whole messages,
/// so a link that breaks or slows to a trickle mid-message loses what it carried: a quarter of
/// a 4 MiB window loses a quarter as much. (Windows stay 4 MiB: one MissingChunks question
/// each.)
const MESSAGE_TARGET_BYTES: usize = 1024 * 1024;
/// MissingChunks questions in flight at once (each covers one window of up to 4 MiB).
const QUESTIONS_IN_FLIGHT: usize = 8;
/// Longest an upload stream goes without a batch: the receiver ends streams idle for longer
/// than its stream_idle_timeout (300 s by default), and a scan of a large unchanged disk may
/// find nothing to send for minutes, so an empty batch says the stream is alive.
const HEARTBEAT: Duration = Duration::from_secs(60);

/// How a disk given on the command line is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A raw image file or block device, hash-scanned.
    Raw,
    /// An offline qcow2 image with a persistent dirty bitmap, read through `qemu-nbd`.
    Qcow2,
}

/// One disk to protect: a name and a path.
#[derive(Debug, Clone)]
pub struct DiskSource {
    pub name: String,
    pub path: PathBuf,
    pub kind: DiskKind,
}

/// A running QEMU VM reached through its monitor.
#[derive(Debug, Clone)]
pub struct LiveSource {
    pub qmp: PathBuf,
    /// The QEMU guest agent's socket, to freeze file systems around the capture.
    pub guest_agent: Option<PathBuf>,
    /// Only these disks (all when empty).
    pub only: Vec<String>,
}

/// What a cycle works on.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub vm: String,
    pub disks: Vec<DiskSource>,
    pub live: Option<LiveSource>,
    pub block_size: BlockSize,
    pub state_dir: PathBuf,
    /// Upper bound on compressed bytes sent per second, asked again for every batch.
    pub bwlimit: Bandwidth,
}

/// The upload limit in bytes per second (None: unlimited), asked again before every batch so
/// that a time-of-day window opening or closing mid-cycle takes effect at once.
#[derive(Clone)]
pub struct Bandwidth(pub Arc<dyn Fn() -> Option<u64> + Send + Sync>);

impl Bandwidth {
    pub fn fixed(bytes_per_sec: Option<u64>) -> Bandwidth {
        Bandwidth(Arc::new(move || bytes_per_sec))
    }

    pub fn now(&self) -> Option<u64> {
        (self.0)()
    }
}

impl std::fmt::Debug for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bandwidth({:?} B/s now)", self.now())
    }
}

/// One disk of a committed point, as `sync --json` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub size: u64,
    pub root: String,
    pub mode: &'static str,
    /// How changes were found: "hash-scan", "dirty-bitmap" or "full-read: REASON".
    pub source: String,
    pub changed_blocks: u64,
    /// Unchanged blocks sent again because the receiver lost their chunk.
    pub healed_blocks: u64,
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
    pub consistency: String,
    /// How long the guest's file systems were frozen for this point, in milliseconds: from
    /// the freeze request (its hooks included) to the thaw's answer, or its failure (then
    /// the thaw goes on in the background). None: not frozen.
    pub freeze_ms: Option<f64>,
    /// The part of `freeze_ms` Rewind held the file systems frozen: from the guest agent's
    /// answer that they froze to the thaw request (the capture of the point's instant). The
    /// rest is the guest's own work (freeze and thaw hooks, flushing dirty pages), which the
    /// application sees as its pause.
    pub frozen_ms: Option<f64>,
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

/// Where a disk's blocks are read from this cycle.
enum Reader {
    Raw(RawDisk),
    /// An NBD export (QEMU's server or qemu-nbd), with the dirty bitmap to follow if any.
    Nbd {
        socket: PathBuf,
        export: String,
        bitmap: Option<String>,
    },
}

struct OpenDisk {
    name: String,
    geometry: DiskGeometry,
    reader: Reader,
    source: String,
}

/// What is prepared in QEMU or on disk for one cycle and must be settled afterwards.
enum Capture {
    None,
    Live {
        qmp: Qmp,
        work: Workdir,
        caps: Vec<DiskCapture>,
    },
    Offline {
        caps: Vec<(PathBuf, DiskCapture)>,
        servers: Vec<NbdServer>,
        work: Workdir,
    },
}

impl Capture {
    /// Tears down exports and settles bitmaps; `committed` says whether the point landed.
    async fn finish(self, committed: bool) -> Result<(), SyncError> {
        match self {
            Capture::None => Ok(()),
            Capture::Live {
                mut qmp,
                work,
                caps,
            } => Ok(live::finish(&mut qmp, &work, &caps, committed).await?),
            Capture::Offline {
                caps,
                servers,
                work,
            } => {
                drop(servers);
                for (path, cap) in &caps {
                    offline::finish(path, cap, committed)?;
                }
                if committed {
                    let caps: Vec<DiskCapture> = caps.into_iter().map(|(_, c)| c).collect();
                    live::clear_full_reads(&work, &caps);
                }
                Ok(())
            }
        }
    }
}

fn geometry(name: &str, size: u64, block_size: BlockSize) -> Result<DiskGeometry, SyncError> {
    DiskGeometry::new(size, block_size.bytes()).map_err(|source| SyncError::Geometry {
        disk: name.to_owned(),
        source,
    })
}

fn stamp() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The bitmap the last capture of each disk created (see [`live::plan`]).
fn chain_bitmaps<'a>(
    state_dir: &std::path::Path,
    vm: &str,
    disks: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<Option<String>>, SyncError> {
    let conn = state::open(state_dir)?;
    let mut out = Vec::new();
    for d in disks {
        out.push(state::chain_bitmap(&conn, vm, d)?);
    }
    Ok(out)
}

/// After a capture: its new bitmaps continue the chain, whatever the cycle's outcome (see
/// [`state::set_chain_bitmaps`]). Failing to record them costs the next cycle a full read of
/// these disks (their recorded bitmap is gone once this cycle settles), never a wrong point.
fn record_chain_bitmaps(state_dir: &std::path::Path, vm: &str, caps: &[DiskCapture]) {
    let pairs: Vec<(&str, &str)> = caps
        .iter()
        .map(|c| (c.disk.name.as_str(), c.new_bitmap.as_str()))
        .collect();
    if let Err(e) =
        state::open(state_dir).and_then(|mut conn| state::set_chain_bitmaps(&mut conn, vm, &pairs))
    {
        tracing::warn!(%vm, error = %e, "cannot record the new dirty bitmaps: the next cycle reads these disks in full");
    }
}

/// The one log line of a committed cycle.
pub fn log_committed(r: &SyncReport) {
    let changed: u64 = r.disks.iter().map(|d| d.changed_blocks).sum();
    let read: u64 = r.disks.iter().map(|d| d.read_bytes).sum();
    let sources: Vec<String> = r
        .disks
        .iter()
        .map(|d| format!("{}:{}", d.name, d.source))
        .collect();
    tracing::info!(
        vm = %r.vm, point = r.point, consistency = %r.consistency, changed, read,
        sent = r.sent_bytes, seconds = format!("{:.2}", r.seconds), resumed = r.resumed,
        sources = %sources.join(","), "cycle committed"
    );
}

/// Runs one cycle and returns the committed point.
pub async fn sync_once(
    client: &mut ReplicationClient<Channel>,
    cfg: &SyncConfig,
    progress: Progress,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    names::vm(&cfg.vm)?;

    // The disks and their sizes: from QEMU for a live VM, from the files otherwise.
    let mut live_ctx = None;
    let mut specs: Vec<(String, DiskGeometry)> = Vec::new();
    let mut offline_disks = Vec::new();
    let mut raw_disks = Vec::new();
    if let Some(src) = &cfg.live {
        let mut qmp = Qmp::connect(&src.qmp).await.map_err(LiveError::from)?;
        let work = Workdir::new(&cfg.state_dir, &cfg.vm).map_err(|e| SyncError::Credentials {
            path: cfg.state_dir.clone(),
            source: e,
        })?;
        let removed = live::cleanup(&mut qmp, &work)
            .await
            .map_err(LiveError::from)?;
        if !removed.is_empty() {
            tracing::warn!(vm = %cfg.vm, ?removed, "removed leftovers of an interrupted cycle");
        }
        let mut disks = live::discover(&mut qmp).await.map_err(LiveError::from)?;
        if !src.only.is_empty() {
            for want in &src.only {
                if !disks.iter().any(|d| &d.name == want) {
                    return Err(SyncError::NoSuchDisk(want.clone()));
                }
            }
            disks.retain(|d| src.only.contains(&d.name));
        }
        if disks.is_empty() {
            return Err(SyncError::NoSuchDisk("(the VM has no disks)".into()));
        }
        for d in &disks {
            names::disk(&d.name)?;
            specs.push((d.name.clone(), geometry(&d.name, d.size, cfg.block_size)?));
        }
        live_ctx = Some((qmp, work, disks));
    } else {
        for d in &cfg.disks {
            names::disk(&d.name)?;
            match d.kind {
                DiskKind::Raw => {
                    let disk = RawDisk::open(&d.path)?;
                    specs.push((
                        d.name.clone(),
                        geometry(&d.name, disk.size(), cfg.block_size)?,
                    ));
                    raw_disks.push(Some(disk));
                    offline_disks.push(None);
                }
                DiskKind::Qcow2 => {
                    let info = offline::inspect(&d.name, &d.path)?;
                    specs.push((
                        d.name.clone(),
                        geometry(&d.name, info.size, cfg.block_size)?,
                    ));
                    raw_disks.push(None);
                    offline_disks.push(Some(info));
                }
            }
        }
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
        disks: specs
            .iter()
            .map(|(name, g)| pb::DiskSpec {
                name: name.clone(),
                size: g.size,
                block_size: g.block_size.get(),
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
    if plan.disks.len() != specs.len() || plan.disks.iter().zip(&specs).any(|(p, d)| p.name != d.0)
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
    let heal: Arc<HashSet<Leaf>> = Arc::new(
        plan.heal
            .iter()
            .map(|h| Leaf::from_slice(h))
            .collect::<Result<_, _>>()
            .map_err(|_| SyncError::Protocol("a malformed hash in the heal list"))?,
    );
    if !heal.is_empty() {
        tracing::warn!(vm = %cfg.vm, chunks = heal.len(), "the receiver lost chunks this VM needs: sending them again where the disks still hold them");
    }
    state::start_pending(
        &mut conn,
        &cfg.vm,
        &plan.session,
        &specs
            .iter()
            .zip(&full)
            .map(|((n, g), f)| (n.clone(), *g, *f))
            .collect::<Vec<_>>(),
    )?;
    drop(conn);

    // Capture: one instant for all disks of a live VM; bitmaps and qemu-nbd for offline qcow2.
    let mut consistency = "as-read".to_owned();
    let (mut freeze_ms, mut frozen_ms) = (None, None);
    let mut config = serde_json::json!({"source": "files", "disks": cfg.disks.iter().map(|d| serde_json::json!({
        "name": d.name, "path": d.path, "kind": match d.kind { DiskKind::Raw => "raw", DiskKind::Qcow2 => "qcow2" }})).collect::<Vec<_>>()});
    let mut opened = Vec::new();
    let capture = if let Some((mut qmp, work, disks)) = live_ctx {
        let want_delta: Vec<bool> = full.iter().map(|f| !f).collect();
        let chain = chain_bitmaps(&cfg.state_dir, &cfg.vm, disks.iter().map(|d| &d.name))?;
        let mut caps = live::plan(&disks, &want_delta, &chain, stamp());
        live::drop_inconsistent(&mut qmp, &mut caps)
            .await
            .map_err(LiveError::from)?;
        live::redo_failed_full_reads(&work, &mut caps);
        live::mark_full_reads(&work, &caps).map_err(|e| SyncError::Credentials {
            path: work.dir.clone(),
            source: e,
        })?;
        config = live::vm_config(&mut qmp, &disks)
            .await
            .map_err(LiveError::from)?;
        let freezer = match cfg.live.as_ref().and_then(|l| l.guest_agent.as_ref()) {
            Some(path) => match live::Freezer::connect(path, live::freeze_marker(&work)).await {
                Ok(f) => Some(f),
                Err(e) => {
                    // A point without a freeze beats no point: it is marked crash-consistent.
                    tracing::warn!(vm = %cfg.vm, error = %Chain(&e), "guest agent unavailable: taking a crash-consistent point");
                    None
                }
            },
            None => None,
        };
        let captured = capture_live(&mut qmp, &work, &caps, freezer).await;
        let (frozen_for, mode) = match captured {
            Ok(done) => done,
            Err(e) => {
                let _ = live::finish(&mut qmp, &work, &caps, false).await;
                return Err(e);
            }
        };
        record_chain_bitmaps(&cfg.state_dir, &cfg.vm, &caps);
        freeze_ms = frozen_for.map(|t| t.phase.as_secs_f64() * 1e3);
        frozen_ms = frozen_for.map(|t| t.held.as_secs_f64() * 1e3);
        consistency = if frozen_for.is_some() {
            "application-consistent"
        } else {
            "crash-consistent"
        }
        .to_owned();
        crate::faults::point("after-transaction");
        tracing::debug!(vm = %cfg.vm, ?mode, "fleecing");
        if let Err(e) = live::export(&mut qmp, &work, &caps, mode).await {
            let _ = live::finish(&mut qmp, &work, &caps, false).await;
            return Err(e.into());
        }
        crate::faults::point("after-export");
        for (c, (name, g)) in caps.iter().zip(&specs) {
            tracing::info!(vm = %cfg.vm, disk = %name, path = c.full_reason.as_deref().unwrap_or("dirty bitmap"), "capture");
            opened.push(OpenDisk {
                name: name.clone(),
                geometry: *g,
                reader: Reader::Nbd {
                    socket: work.socket(),
                    export: name.clone(),
                    bitmap: c.read_bitmap.clone(),
                },
                source: c
                    .full_reason
                    .as_ref()
                    .map_or_else(|| "dirty-bitmap".to_owned(), |r| format!("full-read: {r}")),
            });
        }
        Capture::Live { qmp, work, caps }
    } else {
        let mut caps = Vec::new();
        let mut servers = Vec::new();
        let work = Workdir::new(&cfg.state_dir, &cfg.vm).map_err(|e| SyncError::Credentials {
            path: cfg.state_dir.clone(),
            source: e,
        })?;
        let mut failure = None;
        for (i, d) in cfg.disks.iter().enumerate() {
            let (name, g) = &specs[i];
            match (raw_disks[i].take(), offline_disks[i].take()) {
                (Some(disk), _) => opened.push(OpenDisk {
                    name: name.clone(),
                    geometry: *g,
                    reader: Reader::Raw(disk),
                    source: "hash-scan".into(),
                }),
                (None, Some(info)) => {
                    let chain = chain_bitmaps(&cfg.state_dir, &cfg.vm, [name])?;
                    let mut cap =
                        live::plan(std::slice::from_ref(&info), &[!full[i]], &chain, stamp())
                            .remove(0);
                    live::redo_failed_full_reads(&work, std::slice::from_mut(&mut cap));
                    let step = live::mark_full_reads(&work, std::slice::from_ref(&cap))
                        .map_err(|e| offline::OfflineError::Tool {
                            tool: "the agent's state folder",
                            path: work.dir.clone(),
                            message: e.to_string(),
                        })
                        .and_then(|()| offline::capture(&d.path, &mut cap))
                        .map(|()| {
                            record_chain_bitmaps(
                                &cfg.state_dir,
                                &cfg.vm,
                                std::slice::from_ref(&cap),
                            )
                        })
                        .and_then(|()| {
                            NbdServer::start(
                                &d.path,
                                &work.dir.join(format!("qemu-nbd-{name}.sock")),
                                name,
                                cap.read_bitmap.as_deref(),
                            )
                        });
                    let source = cap
                        .full_reason
                        .as_ref()
                        .map_or_else(|| "dirty-bitmap".to_owned(), |r| format!("full-read: {r}"));
                    let bitmap = cap.read_bitmap.clone();
                    caps.push((d.path.clone(), cap));
                    match step {
                        Ok(server) => {
                            opened.push(OpenDisk {
                                name: name.clone(),
                                geometry: *g,
                                reader: Reader::Nbd {
                                    socket: server.socket.clone(),
                                    export: name.clone(),
                                    bitmap,
                                },
                                source,
                            });
                            servers.push(server);
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                (None, None) => return Err(SyncError::Protocol("disk opened twice")),
            }
        }
        if caps.is_empty() {
            Capture::None
        } else {
            consistency = if caps.len() == cfg.disks.len() {
                "offline"
            } else {
                "as-read"
            }
            .to_owned();
            let capture = Capture::Offline {
                caps,
                servers,
                work,
            };
            if let Some(e) = failure {
                let _ = capture.finish(false).await;
                return Err(e.into());
            }
            capture
        }
    };

    let outcome = async {
        let (scans, sent) = transfer(
            client,
            cfg,
            &plan.session,
            Arc::new(opened),
            &full,
            heal.clone(),
            progress,
        )
        .await?;
        let roots = scans
            .iter()
            .map(|s| pb::DiskRoot {
                name: s.name.clone(),
                root: s.scan.root.0.to_vec(),
                changed_blocks: s.scan.changed,
            })
            .collect();
        let committed = client
            .commit(pb::CommitRequest {
                session: plan.session.clone(),
                roots,
                config: config.to_string(),
                consistency: consistency.clone(),
            })
            .await;
        Ok::<_, SyncError>((scans, sent, committed))
    }
    .await;
    let landed = matches!(&outcome, Ok((_, _, Ok(_))));
    crate::faults::point("before-teardown");
    if let Err(e) = capture.finish(landed).await {
        if landed {
            // The point is safe; leftovers are cleaned up by the next cycle.
            tracing::error!(vm = %cfg.vm, error = %Chain(&e), "teardown after commit failed");
        } else {
            tracing::error!(vm = %cfg.vm, error = %Chain(&e), "teardown after a failed cycle failed");
        }
    }
    let (scans, sent, committed) = outcome?;
    let committed = match committed {
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
        .into_iter()
        .zip(&full)
        .zip(&sent)
        .map(|((s, f), (bytes, chunks))| DiskReport {
            name: s.name,
            size: s.size,
            root: s.scan.root.to_hex(),
            mode: if *f { "full" } else { "delta" },
            source: s.source,
            changed_blocks: s.scan.changed,
            healed_blocks: s.scan.healed,
            read_bytes: s.scan.read_bytes,
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
        consistency,
        freeze_ms,
        frozen_ms,
        sent_bytes: disks.iter().map(|d| d.sent_bytes).sum(),
        disks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Cycles of this process between a guest freeze and its thaw. A stopping agent must not cut
/// such a cycle short: the thaw would never run and the guest would stay frozen.
static FREEZES_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether a cycle of this process may have guest file systems frozen right now.
fn freeze_in_flight() -> bool {
    FREEZES_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// Lets a cycle being stopped run on while a guest freeze is in flight (dropped between freeze
/// and thaw, it would leave the guest frozen), which is at most [`live::FREEZE_PHASE_MAX`];
/// returns its result if it finished meanwhile.
pub async fn finish_freeze<F: std::future::Future + Unpin>(cycle: &mut F) -> Option<F::Output> {
    while freeze_in_flight() {
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(100), &mut *cycle).await {
            return Some(done);
        }
    }
    None
}

/// After a cycle was dropped by a stop signal: removes what it left in the VM (exports, our
/// filters with the device put back on its disk, fleecing nodes and images, the NBD server),
/// within 30 s. Bitmaps stay, so the next cycle loses no write.
pub async fn release_vm(cfg: &SyncConfig) {
    let Some(src) = &cfg.live else { return };
    let released = tokio::time::timeout(Duration::from_secs(30), async {
        let mut qmp = Qmp::connect(&src.qmp).await?;
        let work = Workdir::new(&cfg.state_dir, &cfg.vm).map_err(|e| QmpError::Io {
            path: cfg.state_dir.display().to_string(),
            source: e,
        })?;
        live::cleanup(&mut qmp, &work).await
    })
    .await;
    match released {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(vm = %cfg.vm, ?removed, "stopped cycle's leftovers removed from the VM")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(vm = %cfg.vm, error = %Chain(&e), "could not clean up the VM: the next run does")
        }
        Err(_) => {
            tracing::warn!(vm = %cfg.vm, "cleaning up the VM took over 30 s: the next run does")
        }
    }
}

/// Counts a freeze in flight while alive.
struct FreezeGuard;

impl FreezeGuard {
    fn new() -> Self {
        FREEZES_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        FreezeGuard
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        FREEZES_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Background thaws of this process still running (see [`live::keep_thawing`]).
static THAWS_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Keeps thawing the guest behind `path` in a task of its own, so the cycle goes on at once.
fn spawn_thaw(path: std::path::PathBuf, marker: std::path::PathBuf) {
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            THAWS_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    THAWS_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let counted = Counted;
    tokio::spawn(async move {
        let _counted = counted;
        live::keep_thawing(&path, &marker).await;
    });
}

/// Waits, up to `limit`, for this process's background thaws to confirm the guests thawed;
/// returns whether none is left. An agent about to exit calls it: its runtime's end would
/// cancel them (the marker they leave makes the next run thaw instead).
pub async fn wait_thaws(limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while THAWS_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Whether background thaws of this process are running.
pub fn thaws_in_flight() -> bool {
    THAWS_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// Freezes (if a guest agent is given), captures, and always thaws. Returns whether the file
/// systems were frozen during the capture, and how the disks were fleeced.
///
/// The freeze phase is bounded by [`live::FREEZE_PHASE_MAX`]: a freeze that does not answer in
/// [`live::MAX_FREEZE`] makes the point crash-consistent at once, and a thaw that does not
/// answer in [`live::THAW_TIMEOUT`] goes on in the background until the guest says `thawed`.
async fn capture_live(
    qmp: &mut Qmp,
    work: &Workdir,
    caps: &[DiskCapture],
    freezer: Option<live::Freezer>,
) -> Result<(Option<FreezeTimes>, live::Fleecing), SyncError> {
    live::create_fleece_files(work, caps).await?;
    // The views go in before any freeze (the mode a frozen guest gets); only the instant
    // itself runs under it.
    let mut mode = live::Fleecing::choose(caps, freezer.is_some());
    live::add_views(qmp, work, caps, mode).await?;
    let Some(mut freezer) = freezer else {
        live::capture(qmp, work, caps, mode).await?;
        live::settle(qmp, caps, mode).await?;
        return Ok((None, mode));
    };
    let _guard = FreezeGuard::new();
    let freezing = Instant::now();
    let outcome = match freezer.freeze().await {
        Ok(o) => o,
        Err(e) => live::FreezeOutcome::NotFrozen(format!(
            "the guest agent did not answer: {}",
            report::chain(&e)
        )),
    };
    let frozen_at = Instant::now();
    let freezer = match outcome {
        live::FreezeOutcome::Frozen(n) => {
            tracing::info!(filesystems = n, "guest file systems frozen");
            crate::faults::point("frozen");
            Some(freezer)
        }
        live::FreezeOutcome::NotFrozen(why) => {
            tracing::warn!(reason = %why, "guest not frozen: the point is crash-consistent");
            None
        }
        live::FreezeOutcome::Unsure(why) => {
            tracing::warn!(reason = %why, "guest freeze failed: the point is crash-consistent; thawing in the background");
            let (path, marker) = (freezer.path().to_owned(), freezer.marker().to_owned());
            // Its connection goes first: the guest agent serves one client at a time.
            drop(freezer);
            spawn_thaw(path, marker);
            None
        }
    };
    let Some(freezer) = freezer else {
        let unfrozen = live::Fleecing::choose(caps, false);
        if unfrozen != mode {
            live::remove_views(qmp, caps, mode).await?;
            live::add_views(qmp, work, caps, unfrozen).await?;
            mode = unfrozen;
        }
        live::capture(qmp, work, caps, mode).await?;
        live::settle(qmp, caps, mode).await?;
        return Ok((None, mode));
    };
    let captured =
        tokio::time::timeout(live::MAX_FREEZE, live::capture(qmp, work, caps, mode)).await;
    let held = frozen_at.elapsed();
    let (path, marker) = (freezer.path().to_owned(), freezer.marker().to_owned());
    if let Err(e) = freezer.thaw().await {
        tracing::error!(error = %Chain(&e), "guest thaw failed; thawing in the background");
        spawn_thaw(path, marker);
    }
    let times = FreezeTimes {
        phase: freezing.elapsed(),
        held,
    };
    match captured {
        Ok(r) => r.map_err(SyncError::from)?,
        Err(_) => {
            return Err(SyncError::Protocol(
                "the capture took longer than the freeze limit",
            ))
        }
    }
    live::settle(qmp, caps, mode).await?;
    Ok((Some(times), mode))
}

/// The receiver's MissingChunks answer for the hashes `asked`: refused whole if any hash is
/// malformed or was not asked (a receiver that answers what it was not asked is broken or
/// hostile, and guessing around it could drop a chunk the point needs).
fn missing_answer(asked: &[Leaf], answer: &[Vec<u8>]) -> Result<HashSet<Leaf>, SyncError> {
    let asked: HashSet<&Leaf> = asked.iter().collect();
    answer
        .iter()
        .map(|h| match Leaf::from_slice(h) {
            Ok(l) if asked.contains(&l) => Ok(l),
            Ok(_) => Err(SyncError::Protocol(
                "MissingChunks answered a hash that was not asked",
            )),
            Err(_) => Err(SyncError::Protocol(
                "a malformed hash in the MissingChunks answer",
            )),
        })
        .collect()
}

/// How long a point's freeze took: the whole phase (request, hooks, capture, thaw's answer
/// after the thaw hooks) and the part Rewind held the file systems frozen (from the answer that
/// they froze to the thaw request: the capture).
#[derive(Debug, Clone, Copy)]
struct FreezeTimes {
    phase: Duration,
    held: Duration,
}

/// One disk after its scan.
struct ScannedDisk {
    name: String,
    size: u64,
    source: String,
    scan: DiskScan,
}

type ScanResults = Vec<ScannedDisk>;

/// The batches of an upload stream, with an empty batch (a heartbeat) whenever none came for
/// [`HEARTBEAT`].
fn with_heartbeat(
    session: String,
    batches: mpsc::Receiver<pb::Batch>,
) -> impl futures::Stream<Item = pb::Batch> {
    futures::stream::unfold(batches, move |mut rx| {
        let session = session.clone();
        async move {
            match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
                Ok(Some(b)) => Some((b, rx)),
                Ok(None) => None,
                Err(_) => Some((
                    pb::Batch {
                        session,
                        entries: Vec::new(),
                        chunks: Vec::new(),
                    },
                    rx,
                )),
            }
        }
    })
}

/// Scans all disks on a blocking thread while uploading what they yield; returns each disk's
/// scan and (bytes, chunks) sent for it.
async fn transfer(
    client: &mut ReplicationClient<Channel>,
    cfg: &SyncConfig,
    session: &str,
    disks: Arc<Vec<OpenDisk>>,
    full: &[bool],
    heal: Arc<HashSet<Leaf>>,
    progress: Progress,
) -> Result<(ScanResults, Vec<(u64, u64)>), SyncError> {
    let (wtx, wrx) = mpsc::channel::<Vec<Item>>(QUEUE_DEPTH);
    let scanner = {
        let disks = disks.clone();
        let full = full.to_vec();
        let state_dir = cfg.state_dir.clone();
        let vm = cfg.vm.clone();
        tokio::task::spawn_blocking(move || {
            scan_all(&disks, &full, &heal, &state_dir, &vm, wtx, progress)
        })
    };

    let (btx, brx) = mpsc::channel::<pb::Batch>(QUEUE_DEPTH);
    let upload = {
        let mut c = client.clone();
        let session = session.to_owned();
        tokio::spawn(async move { c.upload(with_heartbeat(session, brx)).await })
    };
    // Compression runs on its own thread (fanning out over the cores) so the next window's
    // MissingChunks round trip overlaps with this window's compression.
    let (ctx, crx) = mpsc::channel::<(Vec<Item>, HashSet<Leaf>)>(1);
    let compressor = {
        let session = session.to_owned();
        let limiter = RateLimiter::new(cfg.bwlimit.clone());
        let n = disks.len();
        tokio::task::spawn_blocking(move || compress_all(&session, n, crx, btx, limiter))
    };

    // Several MissingChunks questions in flight: on a long link each costs a round trip, and
    // one at a time would cap a seed at one window per round trip.
    let mut seen: HashSet<Leaf> = HashSet::new();
    let mut compressor_gone = false;
    let mut answers = ReceiverStream::new(wrx)
        .map(|window| {
            let mut ask: Vec<Leaf> = Vec::new();
            for it in &window {
                let leaf = it.change.leaf;
                if !leaf.is_zero() && !seen.contains(&leaf) && !ask.contains(&leaf) {
                    ask.push(leaf);
                }
            }
            // Chunks already asked about in this session: the receiver would answer "held"
            // for them anyway once their batch is stored; the set only saves questions and
            // duplicate sends between batches in flight, so it is bounded (about 64 MiB).
            if seen.len() > MAX_SEEN {
                seen.clear();
            }
            seen.extend(ask.iter().copied());
            let mut client = client.clone();
            let session = session.to_owned();
            async move {
                if ask.is_empty() {
                    return Ok((window, HashSet::new()));
                }
                let reply = client
                    .missing_chunks(pb::MissingChunksRequest {
                        session,
                        hashes: ask.iter().map(|h| h.0.to_vec()).collect(),
                    })
                    .await
                    .map_err(SyncError::refused("MissingChunks"))?
                    .into_inner();
                let missing = missing_answer(&ask, &reply.missing)?;
                Ok::<_, SyncError>((window, missing))
            }
        })
        .buffered(QUESTIONS_IN_FLIGHT);
    while let Some(answer) = answers.next().await {
        if ctx.send(answer?).await.is_err() {
            compressor_gone = true;
            break;
        }
    }
    drop(answers);
    drop(ctx);
    let compressed = compressor
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?;
    let uploaded = upload
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?
        .map_err(SyncError::refused("Upload"));
    let scanned = scanner
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?;
    // The upload's own error explains a stopped scan better than "upload stopped".
    uploaded?;
    let (sent, upload_gone) = compressed?;
    if upload_gone || compressor_gone {
        return Err(SyncError::Protocol("the upload stream closed early"));
    }
    let scans = scanned?;
    Ok((scans, sent))
}

/// The compression stage of [`transfer`]: compresses the chunks the receiver lacks, builds
/// each window's batch and queues it for upload. Returns (bytes, chunks) sent per disk and
/// whether the upload stream went away early.
fn compress_all(
    session: &str,
    disks: usize,
    mut windows: mpsc::Receiver<(Vec<Item>, HashSet<Leaf>)>,
    out: mpsc::Sender<pb::Batch>,
    mut limiter: RateLimiter,
) -> Result<(Vec<(u64, u64)>, bool), SyncError> {
    let mut sent = vec![(0u64, 0u64); disks];
    // Threads of its own: on the shared pool the scan's hashing of its next step waited
    // behind the compression of a whole window, starving this stage of windows in turn.
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("compress-{i}"))
        .build()
        .map_err(|e| SyncError::Worker(format!("compression threads: {e}")))?;
    while let Some((window, missing)) = windows.blocking_recv() {
        let mut to_send: Vec<(u32, Leaf, &[u8])> = Vec::new();
        let mut queued: HashSet<Leaf> = HashSet::new();
        for it in &window {
            if let Some(data) = &it.change.data {
                if missing.contains(&it.change.leaf) && queued.insert(it.change.leaf) {
                    to_send.push((it.pos, it.change.leaf, data));
                }
            }
        }
        let frames: Vec<(u32, Leaf, Vec<u8>)> = pool
            .install(|| {
                to_send
                    .par_iter()
                    .map(|(pos, leaf, data)| chunk::compress(data).map(|f| (*pos, *leaf, f)))
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .map_err(|e| SyncError::Worker(format!("compression failed: {e}")))?;
        for (pos, _, f) in &frames {
            sent[*pos as usize].0 += f.len() as u64;
            sent[*pos as usize].1 += 1;
        }
        for message in split_window(session, &window, frames) {
            limiter.spend(message.chunks.iter().map(|c| c.data.len() as u64).sum());
            if out.blocking_send(message).is_err() {
                return Ok((sent, true));
            }
        }
    }
    Ok((sent, false))
}

/// Splits one window's compressed chunks into upload messages of at most
/// [`MESSAGE_TARGET_BYTES`] (one larger chunk goes alone), each with the entries of the blocks
/// whose chunks it carries: the receiver refuses a chunk that no entry of its own message
/// uses. Entries whose chunk the receiver already holds, or that an earlier message of the
/// stream carried, or that are zero go in the first message, so every entry arrives with or
/// after its chunk (one stream keeps its order). Always yields at least one message.
fn split_window(
    session: &str,
    window: &[Item],
    frames: Vec<(u32, Leaf, Vec<u8>)>,
) -> Vec<pb::Batch> {
    let message = || pb::Batch {
        session: session.to_owned(),
        entries: Vec::new(),
        chunks: Vec::new(),
    };
    let mut messages = vec![message()];
    let mut carried_in: std::collections::HashMap<Leaf, usize> =
        std::collections::HashMap::with_capacity(frames.len());
    let mut bytes = 0usize;
    for (_, leaf, data) in frames {
        if bytes > 0 && bytes + data.len() > MESSAGE_TARGET_BYTES {
            messages.push(message());
            bytes = 0;
        }
        bytes += data.len();
        carried_in.insert(leaf, messages.len() - 1);
        if let Some(m) = messages.last_mut() {
            m.chunks.push(pb::Chunk {
                hash: leaf.0.to_vec(),
                data: data.into(),
            });
        }
    }
    for it in window {
        let n = carried_in.get(&it.change.leaf).copied().unwrap_or(0);
        messages[n].entries.push(pb::BlockEntry {
            disk: it.pos,
            index: it.change.index,
            hash: it.change.leaf.0.to_vec(),
        });
    }
    messages
}

/// The blocking half of [`transfer`]: scans disk after disk, records every change as pending
/// and hands batches of changes to the uploader.
fn scan_all(
    disks: &[OpenDisk],
    full: &[bool],
    heal: &HashSet<Leaf>,
    state_dir: &std::path::Path,
    vm: &str,
    out: mpsc::Sender<Vec<Item>>,
    progress: Progress,
) -> Result<ScanResults, SyncError> {
    let read_conn = state::open(state_dir)?;
    let write_conn = state::open(state_dir)?;
    let mut pending = PendingWriter::new(&write_conn, vm)?;
    let total: u64 = disks.iter().map(|d| d.geometry.size).sum();
    let mut done_before = 0u64;
    let mut results = Vec::new();
    let mut window: Vec<Item> = Vec::new();
    let mut window_bytes = 0usize;
    for (pos, d) in disks.iter().enumerate() {
        let mut old = OldLeaves::new(&read_conn, vm, (!full[pos]).then_some(d.name.as_str()));
        let report = |p: u64| progress(done_before + p, total);
        // Healing needs every block read: a dirty bitmap only names the changed ones.
        let (mut src, plan) = open_reader(
            &d.reader,
            &d.geometry,
            full[pos] || !heal.is_empty(),
            full[pos],
        )?;
        let scan = scan::scan_disk(
            src.as_mut(),
            d.geometry,
            &plan,
            &mut old,
            heal,
            |change| {
                pending.add(&d.name, change.index, &change.leaf)?;
                window_bytes += change.data.as_ref().map_or(0, bytes::Bytes::len);
                window.push(Item {
                    pos: pos as u32,
                    change,
                });
                if window_bytes >= BATCH_TARGET_BYTES || window.len() >= MAX_WINDOW_ENTRIES {
                    window_bytes = 0;
                    // Never hold the state's write lock while waiting on the network.
                    pending.checkpoint()?;
                    out.blocking_send(std::mem::take(&mut window))
                        .map_err(|_| ScanError::Stopped)?;
                }
                Ok(())
            },
            &report,
        )?;
        tracing::info!(vm, disk = %d.name, source = %d.source, changed = scan.changed, read = scan.read_bytes, "disk scanned");
        done_before += d.geometry.size;
        results.push(ScannedDisk {
            name: d.name.clone(),
            size: d.geometry.size,
            source: d.source.clone(),
            scan,
        });
    }
    pending.finish()?;
    if !window.is_empty() {
        out.blocking_send(window).map_err(|_| ScanError::Stopped)?;
    }
    Ok(results)
}

/// Opens a disk's reader and plans which blocks to read: everything that may hold data for a
/// full read, only the dirty blocks when a bitmap says which changed. A raw disk read for the
/// `first` time (no base point) is read with O_DIRECT.
fn open_reader(
    reader: &Reader,
    geometry: &DiskGeometry,
    full: bool,
    first: bool,
) -> Result<(Box<dyn BlockSource + Send>, ScanPlan), SyncError> {
    match reader {
        Reader::Raw(disk) => {
            let plan = ScanPlan::full(&disk.data_extents()?, geometry);
            let mut src = disk.try_clone()?;
            if first {
                // A first copy reads the whole disk once, past the page cache; later scans
                // read through it (an image the cache holds reads several times faster).
                src = src.read_direct();
            }
            Ok((Box::new(src), plan))
        }
        Reader::Nbd {
            socket,
            export,
            bitmap,
        } => {
            let dirty_ctx = bitmap.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
            let mut contexts = vec!["base:allocation"];
            contexts.extend(dirty_ctx.as_deref());
            let mut client = NbdClient::connect_unix(socket, export, &contexts)?;
            if client.size() < geometry.size {
                return Err(SyncError::Protocol(
                    "the NBD export is smaller than the disk",
                ));
            }
            let alloc = client.block_status("base:allocation", 0, geometry.size)?;
            let span = |flags: fn(u32) -> bool| -> Vec<(u64, u64)> {
                alloc
                    .iter()
                    .filter(|e| flags(e.flags))
                    .map(|e| (e.offset, e.offset + e.length))
                    .collect()
            };
            let data = span(|f| f & nbd::STATE_ZERO == 0);
            let plan = match dirty_ctx.filter(|_| !full) {
                None => ScanPlan::full(&data, geometry),
                Some(ctx) => {
                    let dirty: Vec<(u64, u64)> = client
                        .block_status(&ctx, 0, geometry.size)?
                        .iter()
                        .filter(|e| e.flags & nbd::STATE_DIRTY != 0)
                        .map(|e| (e.offset, e.offset + e.length))
                        .collect();
                    ScanPlan {
                        read: scan::block_ranges(&dirty, geometry),
                        zero: scan::whole_blocks(&span(|f| f & nbd::STATE_ZERO != 0), geometry),
                        outside: Outside::Unchanged,
                    }
                }
            };
            Ok((Box::new(client), plan))
        }
    }
}

/// Keeps the send rate under the limit in force (which may change between batches).
struct RateLimiter {
    limit: Bandwidth,
    /// When the bytes already spent are paid for.
    next: Instant,
}

impl RateLimiter {
    fn new(limit: Bandwidth) -> Self {
        Self {
            limit,
            next: Instant::now(),
        }
    }

    /// Blocks the calling (non-async) thread until the bytes spent before fit under the
    /// limit, then books `bytes` at the current rate.
    fn spend(&mut self, bytes: u64) {
        let now = Instant::now();
        let Some(rate) = self.limit.now() else {
            self.next = now;
            return;
        };
        if self.next > now {
            std::thread::sleep(self.next - now);
        }
        self.next = self.next.max(Instant::now())
            + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn a_missing_answer_with_a_malformed_or_unasked_hash_is_refused() {
        let (a, b, c) = (Leaf([1; 32]), Leaf([2; 32]), Leaf([3; 32]));
        let asked = [a, b];
        let got = missing_answer(&asked, &[b.0.to_vec()]).expect("well-formed");
        assert_eq!(got, HashSet::from([b]));
        for bad in [vec![b.0.to_vec(), vec![7; 31]], vec![c.0.to_vec()]] {
            assert!(matches!(
                missing_answer(&asked, &bad),
                Err(SyncError::Protocol(_))
            ));
        }
    }

    #[test]
    fn the_rate_limit_in_force_applies_from_the_next_batch() {
        // 0 stands for "no limit".
        let rate = Arc::new(AtomicU64::new(0));
        let r = rate.clone();
        let mut l = RateLimiter::new(Bandwidth(Arc::new(move || {
            Some(r.load(Ordering::SeqCst)).filter(|&v| v > 0)
        })));
        let t = Instant::now();
        l.spend(50_000_000);
        l.spend(50_000_000);
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "unlimited: no wait"
        );
        // A window opens: 1 MB/s.
        rate.store(1_000_000, Ordering::SeqCst);
        l.spend(200_000);
        let t = Instant::now();
        l.spend(1);
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
        // It closes again: no more waiting.
        rate.store(0, Ordering::SeqCst);
        let t = Instant::now();
        l.spend(10_000_000);
        l.spend(10_000_000);
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    fn item(pos: u32, index: u64, tag: u8, zero: bool) -> Item {
        let leaf = if zero { Leaf::ZERO } else { Leaf([tag; 32]) };
        Item {
            pos,
            change: Change {
                index,
                leaf,
                data: (!zero).then(|| bytes::Bytes::from(vec![tag; 16])),
            },
        }
    }

    #[test]
    fn a_window_splits_into_messages_that_carry_their_own_entries() {
        // Six blocks: two share chunk 1, one is zero, one (tag 9) is held by the receiver.
        let window = vec![
            item(0, 0, 1, false),
            item(0, 1, 2, false),
            item(0, 2, 0, true),
            item(1, 0, 1, false),
            item(1, 1, 9, false),
            item(1, 2, 3, false),
        ];
        let big = MESSAGE_TARGET_BYTES / 2 + 1;
        let frames = vec![
            (0, Leaf([1; 32]), vec![1; big]),
            (0, Leaf([2; 32]), vec![2; big]),
            (1, Leaf([3; 32]), vec![3; 10]),
        ];
        let messages = split_window("s", &window, frames);
        // Per message: (disk, index) of its entries, and the first byte of its chunks.
        type Shape = (Vec<(u32, u64)>, Vec<u8>);
        let shape: Vec<Shape> = messages
            .iter()
            .map(|m| {
                assert_eq!(m.session, "s");
                (
                    m.entries.iter().map(|e| (e.disk, e.index)).collect(),
                    m.chunks.iter().map(|c| c.hash[0]).collect(),
                )
            })
            .collect();
        // Chunks 1 and 2 do not fit one message; 3 fits beside 2. Zero and held entries go
        // first; each chunk's entries go with it.
        assert_eq!(
            shape,
            vec![
                (vec![(0, 0), (0, 2), (1, 0), (1, 1)], vec![1]),
                (vec![(0, 1), (1, 2)], vec![2, 3]),
            ]
        );
        for m in &messages {
            let bytes: usize = m.chunks.iter().map(|c| c.data.len()).sum();
            assert!(m.chunks.len() == 1 || bytes <= MESSAGE_TARGET_BYTES);
        }
    }

    #[test]
    fn a_window_with_nothing_to_send_is_one_message() {
        let window = vec![item(0, 0, 0, true), item(0, 1, 9, false)];
        let messages = split_window("s", &window, Vec::new());
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].entries.len(), 2);
        assert!(messages[0].chunks.is_empty());
    }
}
