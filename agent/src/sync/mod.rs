//! One replication cycle of one VM: settle any session left by a crash, begin (or resume) the
//! session for the next point, scan the disks for changed blocks, upload what the receiver
//! lacks, commit with the roots, and only then make the new point the local base.

mod capture;
mod commit;
mod disks;
mod freeze;
mod limiter;
mod session;
mod transfer;

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
use rewind_proto::{names, pb, BlockHash};
use serde::Serialize;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use capture::{Captured, OpenDisk, Reader};
use freeze::FreezeTimes;
pub use freeze::{finish_freeze, release_vm, thaws_in_flight, wait_thaws};
use transfer::transfer;

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
    /// A libvirt-managed domain (instead of `live` or `disks`).
    pub libvirt: Option<crate::libvirt::LibvirtSource>,
    pub block_size: BlockSize,
    pub state_dir: PathBuf,
    /// Upper bound on compressed bytes sent per second, asked again for every batch.
    pub bwlimit: Bandwidth,
    /// How chunks are named and stored: plain, or sealed with a keyring (client-side
    /// encryption, fixed by the VM's first point).
    pub codec: rewind_proto::crypt::Codec,
}

/// The upload limit in bytes per second (None: unlimited) at a wall-clock time, asked again
/// before every batch so that a time-of-day window opening or closing mid-cycle takes effect
/// at once.
#[derive(Clone)]
pub struct Bandwidth(pub Arc<dyn Fn(time::OffsetDateTime) -> Option<u64> + Send + Sync>);

impl Bandwidth {
    pub fn fixed(bytes_per_sec: Option<u64>) -> Bandwidth {
        Bandwidth(Arc::new(move |_| bytes_per_sec))
    }

    /// The limit in force at `now`.
    pub fn at(&self, now: time::OffsetDateTime) -> Option<u64> {
        (self.0)(now)
    }
}

impl std::fmt::Debug for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = self.at(time::OffsetDateTime::now_utc());
        write!(f, "Bandwidth({now:?} B/s now)")
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

fn geometry(name: &str, size: u64, block_size: BlockSize) -> Result<DiskGeometry, SyncError> {
    DiskGeometry::new(size, block_size.bytes()).map_err(|source| SyncError::Geometry {
        disk: name.to_owned(),
        source,
    })
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

/// Runs one cycle and returns the committed point: the steps in order.
pub async fn sync_once(
    client: &mut ReplicationClient<Channel>,
    cfg: &SyncConfig,
    progress: Progress,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    names::vm(&cfg.vm)?;
    // 1. The disks and their sizes: from QEMU for a live VM, from the files otherwise.
    let found = disks::find(cfg).await?;
    // 2. Settle a crashed cycle's session, then begin this point's. An encrypted VM's data
    //    key for the session (a write-only agent's is fresh, and forgotten when the session
    //    ends) goes to the receiver wrapped to the recovery key, kept there before any chunk
    //    sealed with it is sent.
    let (codec, wrapped) = cfg.codec.for_session();
    let session_cfg = SyncConfig {
        codec,
        ..cfg.clone()
    };
    let cfg = &session_cfg;
    let begun = session::begin(client, cfg, &found.specs(), &wrapped).await?;
    // 3. One instant for all disks of a live VM; bitmaps and qemu-nbd for offline qcow2.
    let Captured {
        opened,
        mut capture,
        consistency,
        freeze,
        config,
    } = capture::capture(cfg, found, &begun.full).await?;
    // 4. Scan and upload what the receiver lacks, then commit with the roots.
    let outcome = async {
        let (scans, sent) = transfer(
            client,
            cfg,
            &begun.session,
            Arc::new(opened),
            &begun.full,
            begun.heal.clone(),
            progress,
        )
        .await?;
        // Every disk is read: let go of what holds them (an offline domain's images).
        capture.release();
        capture.check()?;
        let committed =
            commit::send(client, cfg, &begun.session, &scans, &config, &consistency).await;
        Ok::<_, SyncError>((scans, sent, committed))
    }
    .await
    .map_err(|e| capture.explain(e));
    // 5. Settle the capture (old bitmaps go only if the point landed), then adopt the point.
    let landed = matches!(&outcome, Ok((_, _, Ok(_))));
    commit::settle(cfg, capture, landed).await;
    let (scans, sent, committed) = outcome?;
    let committed = commit::adopt(cfg, committed)?;
    Ok(commit::report(
        cfg,
        commit::Done {
            begun,
            committed,
            scans,
            sent,
            consistency,
            freeze,
            started,
        },
    ))
}
