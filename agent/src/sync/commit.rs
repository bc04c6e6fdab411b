//! The last steps of a cycle: commit the point with its roots, settle what the capture
//! prepared (old bitmaps go only once the point landed, else they are merged into the new
//! ones), make the committed point the local base, and report.
//!
//! Ordering rule: the agent's base moves to the new point only after the receiver confirmed
//! the commit ([`adopt`]); a root mismatch makes the agent forget its base instead.

use super::capture::Capture;
use super::session::Begun;
use super::transfer::ScannedDisk;
use super::*;

/// Asks the receiver to commit the point: each disk's root and changed blocks, the VM's
/// configuration and the point's consistency.
///
/// An encrypted VM's commit carries the MAC of the point's manifest (VM, the agent's clock at commit,
/// consistency, configuration, each disk's geometry and root), so a restore holding the key
/// can tell that the receiver serves this very point.
pub(super) async fn send(
    client: &mut ReplicationClient<Channel>,
    cfg: &SyncConfig,
    session: &str,
    scans: &[ScannedDisk],
    config: &serde_json::Value,
    consistency: &str,
) -> Result<tonic::Response<pb::CommitReply>, tonic::Status> {
    // An encrypted VM's configuration is sealed like its chunks: the receiver keeps it
    // without reading it, and the MAC binds what it keeps.
    let config = cfg
        .codec
        .seal_config(&cfg.vm, &config.to_string())
        .map_err(|e| tonic::Status::internal(format!("sealing the configuration: {e}")))?;
    let taken_us = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1000;
    let manifest_mac = match &cfg.codec {
        rewind_proto::crypt::Codec::Plain | rewind_proto::crypt::Codec::Locked => Vec::new(),
        rewind_proto::crypt::Codec::Sealed { keyring, .. } => keyring
            .manifest_mac(&rewind_proto::crypt::Manifest {
                vm: &cfg.vm,
                taken_us,
                consistency,
                config_hash: rewind_proto::crypt::config_hash(&config),
                disks: scans
                    .iter()
                    .map(|s| (s.name.as_str(), s.size, cfg.block_size.get(), s.scan.root.0))
                    .collect(),
            })
            .to_vec(),
    };
    let roots = scans
        .iter()
        .map(|s| pb::DiskRoot {
            name: s.name.clone(),
            root: s.scan.root.0.to_vec(),
            changed_blocks: s.scan.changed,
        })
        .collect();
    client
        .commit(pb::CommitRequest {
            session: session.to_owned(),
            roots,
            config,
            consistency: consistency.to_owned(),
            manifest_mac,
            taken_us: if cfg.codec.keyring_id().is_some() {
                taken_us
            } else {
                0
            },
        })
        .await
}

/// Tears down what the capture prepared; `landed` says whether the point was committed.
pub(super) async fn settle(cfg: &SyncConfig, capture: Capture, landed: bool) {
    crate::faults::point("before-teardown");
    if let Err(e) = capture.finish(landed).await {
        if landed {
            // The point is safe; leftovers are cleaned up by the next cycle.
            tracing::error!(vm = %cfg.vm, error = %Chain(&e), "teardown after commit failed");
        } else {
            tracing::error!(vm = %cfg.vm, error = %Chain(&e), "teardown after a failed cycle failed");
        }
    }
}

/// Makes the committed point the local base, or, on a refused commit, returns the refusal (a
/// root mismatch first forgets the local base).
pub(super) fn adopt(
    cfg: &SyncConfig,
    committed: Result<tonic::Response<pb::CommitReply>, tonic::Status>,
) -> Result<pb::CommitReply, SyncError> {
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
    Ok(committed)
}

/// What a committed cycle did.
pub(super) struct Done {
    pub(super) begun: Begun,
    pub(super) committed: pb::CommitReply,
    pub(super) scans: Vec<ScannedDisk>,
    pub(super) sent: Vec<(u64, u64)>,
    pub(super) consistency: String,
    pub(super) freeze: Option<FreezeTimes>,
    pub(super) started: Instant,
}

/// The report of a committed cycle.
pub(super) fn report(cfg: &SyncConfig, done: Done) -> SyncReport {
    let Done {
        begun,
        committed,
        scans,
        sent,
        consistency,
        freeze,
        started,
    } = done;
    let disks: Vec<DiskReport> = scans
        .into_iter()
        .zip(&begun.full)
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
    SyncReport {
        vm: cfg.vm.clone(),
        point: committed.point as i64,
        created: committed.created,
        base_point: (begun.base_point != 0).then_some(begun.base_point as i64),
        session: begun.session,
        resumed: begun.resumed,
        consistency,
        freeze_ms: freeze.map(|t| t.phase.as_secs_f64() * 1e3),
        frozen_ms: freeze.map(|t| t.held.as_secs_f64() * 1e3),
        sent_bytes: disks.iter().map(|d| d.sent_bytes).sum(),
        disks,
        seconds: started.elapsed().as_secs_f64(),
    }
}
