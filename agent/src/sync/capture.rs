//! What a cycle prepares in QEMU or on disk so its disks can be read at one instant (exports,
//! fleecing views, bitmaps), how each disk is read, and how it is all settled afterwards.

use super::disks::{Found, LiveVm, Origin, SourceDisk};
use super::freeze::{capture_live, FreezeTimes};
use super::*;
use crate::libvirt::{self, LibvirtVm};
/// Where a disk's blocks are read from this cycle.
pub(super) enum Reader {
    Raw(RawDisk),
    /// An NBD export (QEMU's server or qemu-nbd), with the dirty bitmap to follow if any.
    Nbd {
        socket: PathBuf,
        export: String,
        bitmap: Option<String>,
    },
}

pub(super) struct OpenDisk {
    pub(super) name: String,
    pub(super) geometry: DiskGeometry,
    pub(super) reader: Reader,
    pub(super) source: String,
}

/// What is prepared in QEMU or on disk for one cycle and must be settled afterwards.
pub(super) enum Capture {
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
    /// A libvirt backup job, and where the chain's checkpoint is recorded.
    Libvirt {
        vm: Box<LibvirtVm>,
        job: libvirt::Job,
        state_dir: PathBuf,
        name: String,
    },
    /// A shut-off libvirt domain's offline point: its new checkpoint and qemu-nbd servers.
    LibvirtOffline {
        vm: Box<LibvirtVm>,
        point: libvirt::offline::Point,
        state_dir: PathBuf,
        name: String,
    },
}

/// After a commit: the state names the new checkpoint on every disk (true), before the old
/// one goes. A crash between the two leaves an extra checkpoint the next cycle deletes, never
/// a chain record naming a deleted one. False: the next cycle reads since the old one.
fn record_checkpoint(state_dir: &std::path::Path, name: &str, vm: &LibvirtVm, new: &str) -> bool {
    let pairs: Vec<(&str, &str)> = vm
        .disks
        .iter()
        .map(|(d, _)| (d.target.as_str(), new))
        .collect();
    match state::open(state_dir)
        .and_then(|mut conn| state::set_chain_bitmaps(&mut conn, name, &pairs))
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(vm = %name, error = %e, "cannot record the new checkpoint: the next cycle reads since the previous one");
            false
        }
    }
}

impl Capture {
    /// Lets go of the disks once they are read, before the commit: an offline point's
    /// qemu-nbd servers hold the images, and `virsh start` fails while they do.
    pub(super) fn release(&mut self) {
        if let Capture::LibvirtOffline { point, .. } = self {
            point.release();
        }
    }

    /// The cycle's error `e`, or the reason behind it when the capture knows it better (a
    /// libvirt job ended because the domain paused on a full scratch folder).
    pub(super) fn explain(&self, e: SyncError) -> SyncError {
        match self {
            Capture::Libvirt { vm, job, .. } => job.scratch_full(vm).map_or(e, SyncError::from),
            _ => e,
        }
    }

    /// Fails a point whose libvirt job the guard ended early (the domain paused on a full
    /// scratch folder): some reads may have come after the job's end, so the point is not
    /// known to be one instant. Checked once every disk is read, before the commit.
    pub(super) fn check(&self) -> Result<(), SyncError> {
        match self {
            Capture::Libvirt { vm, job, .. } => {
                job.scratch_full(vm).map_or(Ok(()), |e| Err(e.into()))
            }
            _ => Ok(()),
        }
    }

    /// Tears down exports and settles bitmaps; `committed` says whether the point landed.
    pub(super) async fn finish(self, committed: bool) -> Result<(), SyncError> {
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
            Capture::Libvirt {
                vm,
                job,
                state_dir,
                name,
            } => {
                libvirt::end(&vm).await?;
                let recorded =
                    committed && record_checkpoint(&state_dir, &name, &vm, &job.plan.new);
                Ok(libvirt::settle(&vm, &job, recorded).await?)
            }
            Capture::LibvirtOffline {
                vm,
                mut point,
                state_dir,
                name,
            } => {
                point.release();
                let recorded =
                    committed && record_checkpoint(&state_dir, &name, &vm, &point.plan.new);
                Ok(libvirt::offline::settle(&vm, point, recorded).await?)
            }
        }
    }
}

pub(super) fn stamp() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The bitmap the last capture of each disk created (see [`live::plan`]).
pub(super) fn chain_bitmaps<'a>(
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
pub(super) fn record_chain_bitmaps(state_dir: &std::path::Path, vm: &str, caps: &[DiskCapture]) {
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

/// What the capture step hands on: how to read each disk, what to settle after the commit,
/// and what the point records (its consistency, its freeze times, the VM's configuration).
pub(super) struct Captured {
    pub(super) opened: Vec<OpenDisk>,
    pub(super) capture: Capture,
    pub(super) consistency: String,
    pub(super) freeze: Option<FreezeTimes>,
    pub(super) config: serde_json::Value,
}

/// Step 3 of a cycle: fixes the disks' content at one instant where the source allows it (a
/// running VM: bitmaps and fleecing views, under a guest freeze when a guest agent is given;
/// offline qcow2 images: their bitmaps, served by qemu-nbd), and opens each disk for reading.
/// `full` says, per disk, whether the receiver wants a full point.
pub(super) async fn capture(
    cfg: &SyncConfig,
    found: Found,
    full: &[bool],
) -> Result<Captured, SyncError> {
    if let Some(vm) = found.libvirt {
        return capture_libvirt(cfg, vm, &found.disks, full).await;
    }
    match found.live {
        Some(vm) => capture_vm(cfg, vm, &found.disks, full).await,
        None => capture_files(cfg, found.disks, full).await,
    }
}

/// A libvirt domain: one pull-mode backup job exports every disk at one instant, with the
/// changes since the chain's checkpoint (see [`libvirt`]).
async fn capture_libvirt(
    cfg: &SyncConfig,
    vm: LibvirtVm,
    found: &[SourceDisk],
    full: &[bool],
) -> Result<Captured, SyncError> {
    let src = cfg
        .libvirt
        .as_ref()
        .ok_or(SyncError::Protocol("a libvirt domain without its source"))?;
    // One checkpoint covers every disk: the chain is one only if every disk names it.
    let chain = chain_bitmaps(&cfg.state_dir, &cfg.vm, found.iter().map(|d| &d.name))?;
    let base = match chain.first() {
        Some(Some(c)) if chain.iter().all(|x| x.as_ref() == Some(c)) => Some(c.clone()),
        _ => None,
    };
    let want_delta: Vec<bool> = full.iter().map(|f| !f).collect();
    let mut config = serde_json::json!({
        "source": "libvirt",
        "uri": src.uri,
        "domain": src.domain,
        "domain_xml": vm.config_xml,
    });
    if !vm.running {
        return capture_libvirt_offline(cfg, vm, found, base, &want_delta, config).await;
    }
    let plan = libvirt::plan(&vm, base.as_deref(), &want_delta, stamp()).await?;
    let job = libvirt::begin(&vm, plan, src.freeze).await?;
    // The new checkpoint's definition travels with the point: the receiver keeps it too.
    config["checkpoint_xml"] = libvirt::checkpoint_definition(&vm.work, &job.plan.new).into();
    let socket = libvirt::socket(&vm.work);
    let mut opened = Vec::new();
    for ((d, b), reason) in found
        .iter()
        .zip(&job.plan.disks)
        .zip(&job.plan.full_reasons)
    {
        let (export, bitmap) = libvirt::xml::export_names(&b.target);
        tracing::info!(vm = %cfg.vm, disk = %d.name, path = reason.as_deref().unwrap_or("dirty bitmap"), "capture");
        opened.push(OpenDisk {
            name: d.name.clone(),
            geometry: d.geometry,
            reader: Reader::Nbd {
                socket: socket.clone(),
                export,
                bitmap: b.since.as_ref().map(|_| bitmap),
            },
            source: reason
                .as_ref()
                .map_or_else(|| "dirty-bitmap".to_owned(), |r| format!("full-read: {r}")),
        });
    }
    let freeze = job.freeze.map(|(phase, held)| FreezeTimes { phase, held });
    let consistency = if freeze.is_some() {
        "application-consistent"
    } else {
        "crash-consistent"
    };
    Ok(Captured {
        opened,
        capture: Capture::Libvirt {
            vm: Box::new(vm),
            job,
            state_dir: cfg.state_dir.clone(),
            name: cfg.vm.clone(),
        },
        consistency: consistency.to_owned(),
        freeze,
        config,
    })
}

/// A shut-off libvirt domain: the chain's checkpoint continued with qemu-img, each disk
/// served by qemu-nbd with the bitmap since `base` (see [`libvirt::offline`]).
async fn capture_libvirt_offline(
    cfg: &SyncConfig,
    vm: LibvirtVm,
    found: &[SourceDisk],
    base: Option<String>,
    want_delta: &[bool],
    mut config: serde_json::Value,
) -> Result<Captured, SyncError> {
    let plan = libvirt::offline::plan(&vm, base.as_deref(), want_delta, stamp()).await?;
    let point = libvirt::offline::begin(&vm, plan).await?;
    config["checkpoint_xml"] = libvirt::checkpoint_definition(&vm.work, &point.plan.new).into();
    let mut opened = Vec::new();
    for (d, p) in found.iter().zip(&point.plan.disks) {
        let reason = p.full_reason.as_deref();
        tracing::info!(vm = %cfg.vm, disk = %d.name, path = reason.unwrap_or("dirty bitmap"), "offline capture");
        opened.push(OpenDisk {
            name: d.name.clone(),
            geometry: d.geometry,
            reader: Reader::Nbd {
                socket: libvirt::offline::socket(&vm.work, &p.target),
                export: p.target.clone(),
                bitmap: p.since.clone(),
            },
            source: reason.map_or_else(|| "dirty-bitmap".to_owned(), |r| format!("full-read: {r}")),
        });
    }
    Ok(Captured {
        opened,
        capture: Capture::LibvirtOffline {
            vm: Box::new(vm),
            point,
            state_dir: cfg.state_dir.clone(),
            name: cfg.vm.clone(),
        },
        consistency: "offline".to_owned(),
        freeze: None,
        config,
    })
}

/// A running VM: every disk at one instant.
async fn capture_vm(
    cfg: &SyncConfig,
    vm: LiveVm,
    found: &[SourceDisk],
    full: &[bool],
) -> Result<Captured, SyncError> {
    let LiveVm {
        mut qmp,
        work,
        disks,
    } = vm;
    let want_delta: Vec<bool> = full.iter().map(|f| !f).collect();
    let chain = chain_bitmaps(&cfg.state_dir, &cfg.vm, disks.iter().map(|d| &d.name))?;
    let mut caps = live::plan(&disks, &want_delta, &chain, stamp());
    live::drop_inconsistent(&mut qmp, &mut caps)
        .await
        .map_err(LiveError::from)?;
    live::redo_failed_full_reads(&work, &mut caps);
    live::mark_full_reads(&work, &caps).map_err(|e| SyncError::StateFolder {
        path: work.dir.clone(),
        source: e,
    })?;
    let config = live::vm_config(&mut qmp, &disks)
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
    let (freeze, mode) = match capture_live(&mut qmp, &work, &caps, freezer).await {
        Ok(done) => done,
        Err(e) => {
            let _ = live::finish(&mut qmp, &work, &caps, false).await;
            return Err(e);
        }
    };
    record_chain_bitmaps(&cfg.state_dir, &cfg.vm, &caps);
    let consistency = if freeze.is_some() {
        "application-consistent"
    } else {
        "crash-consistent"
    };
    crate::faults::point("after-transaction");
    tracing::debug!(vm = %cfg.vm, ?mode, "fleecing");
    if let Err(e) = live::export(&mut qmp, &work, &caps, mode).await {
        let _ = live::finish(&mut qmp, &work, &caps, false).await;
        return Err(e.into());
    }
    crate::faults::point("after-export");
    let mut opened = Vec::new();
    for (c, d) in caps.iter().zip(found) {
        tracing::info!(vm = %cfg.vm, disk = %d.name, path = c.full_reason.as_deref().unwrap_or("dirty bitmap"), "capture");
        opened.push(OpenDisk {
            name: d.name.clone(),
            geometry: d.geometry,
            reader: Reader::Nbd {
                socket: work.socket(),
                export: d.name.clone(),
                bitmap: c.read_bitmap.clone(),
            },
            source: source_of(c),
        });
    }
    Ok(Captured {
        opened,
        capture: Capture::Live { qmp, work, caps },
        consistency: consistency.to_owned(),
        freeze,
        config,
    })
}

/// How a captured disk is read, for its report.
fn source_of(c: &DiskCapture) -> String {
    c.full_reason
        .as_ref()
        .map_or_else(|| "dirty-bitmap".to_owned(), |r| format!("full-read: {r}"))
}

/// Files: raw ones are read as they are; each offline qcow2 image gets its bitmaps settled
/// and is served by its own qemu-nbd.
async fn capture_files(
    cfg: &SyncConfig,
    found: Vec<SourceDisk>,
    full: &[bool],
) -> Result<Captured, SyncError> {
    let config = serde_json::json!({"source": "files", "disks": cfg.disks.iter().map(|d| serde_json::json!({
        "name": d.name, "path": d.path, "kind": match d.kind { DiskKind::Raw => "raw", DiskKind::Qcow2 => "qcow2" }})).collect::<Vec<_>>()});
    let mut opened = Vec::new();
    let mut caps = Vec::new();
    let mut servers = Vec::new();
    let work = Workdir::new(&cfg.state_dir, &cfg.vm).map_err(|e| SyncError::StateFolder {
        path: cfg.state_dir.clone(),
        source: e,
    })?;
    let mut failure = None;
    for ((disk, d), &full) in found.into_iter().zip(&cfg.disks).zip(full) {
        let info = match disk.origin {
            Origin::Raw(raw) => {
                opened.push(OpenDisk {
                    name: disk.name,
                    geometry: disk.geometry,
                    reader: Reader::Raw(raw),
                    source: "hash-scan".into(),
                });
                continue;
            }
            Origin::Offline(info) => info,
            Origin::Live | Origin::Libvirt => {
                return Err(SyncError::Protocol("a VM's disk among files"))
            }
        };
        let (cap, served) = capture_image(cfg, &work, &d.path, info, full)?;
        let source = source_of(&cap);
        let bitmap = cap.read_bitmap.clone();
        caps.push((d.path.clone(), cap));
        match served {
            Ok(server) => {
                opened.push(OpenDisk {
                    reader: Reader::Nbd {
                        socket: server.socket.clone(),
                        export: disk.name.clone(),
                        bitmap,
                    },
                    name: disk.name,
                    geometry: disk.geometry,
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
    let (capture, consistency) = if caps.is_empty() {
        (Capture::None, "as-read")
    } else {
        let consistency = if caps.len() == cfg.disks.len() {
            "offline"
        } else {
            "as-read"
        };
        let capture = Capture::Offline {
            caps,
            servers,
            work,
        };
        if let Some(e) = failure {
            let _ = capture.finish(false).await;
            return Err(e.into());
        }
        (capture, consistency)
    };
    Ok(Captured {
        opened,
        capture,
        consistency: consistency.to_owned(),
        freeze: None,
        config,
    })
}

/// One offline qcow2 image: plans its bitmaps, settles them with qemu-img and serves the
/// image (with the bitmap to read) over qemu-nbd. The capture is returned whatever happened,
/// so that the caller settles it.
fn capture_image(
    cfg: &SyncConfig,
    work: &Workdir,
    path: &std::path::Path,
    info: crate::live::LiveDisk,
    full: bool,
) -> Result<(DiskCapture, Result<NbdServer, offline::OfflineError>), SyncError> {
    let name = info.name.clone();
    let chain = chain_bitmaps(&cfg.state_dir, &cfg.vm, [&name])?;
    let mut cap = live::plan(std::slice::from_ref(&info), &[!full], &chain, stamp()).remove(0);
    live::redo_failed_full_reads(work, std::slice::from_mut(&mut cap));
    let served = live::mark_full_reads(work, std::slice::from_ref(&cap))
        .map_err(|e| offline::OfflineError::Tool {
            tool: "the agent's state folder",
            path: work.dir.clone(),
            message: e.to_string(),
        })
        .and_then(|()| offline::capture(path, &mut cap))
        .map(|()| record_chain_bitmaps(&cfg.state_dir, &cfg.vm, std::slice::from_ref(&cap)))
        .and_then(|()| {
            NbdServer::start(
                path,
                &work.dir.join(format!("qemu-nbd-{name}.sock")),
                &name,
                cap.read_bitmap.as_deref(),
            )
        });
    Ok((cap, served))
}
