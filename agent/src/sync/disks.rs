//! Step 1 of a cycle: the VM's disks and their geometry, from QEMU for a running VM (after
//! removing what an interrupted cycle left in it), from the files otherwise.

use super::*;
use crate::libvirt::{self, LibvirtSource, LibvirtVm};
use crate::live::LiveDisk;

/// One disk of the cycle, carried from where it is found to where it is read.
pub(super) struct SourceDisk {
    pub(super) name: String,
    pub(super) geometry: DiskGeometry,
    pub(super) origin: Origin,
}

/// Where a disk's blocks come from.
pub(super) enum Origin {
    /// A disk of the running VM: its QEMU node is in [`LiveVm::disks`], in the same order.
    Live,
    /// A raw file or block device, hash-scanned.
    Raw(RawDisk),
    /// An offline qcow2 image, its bitmaps kept with qemu-img and read through qemu-nbd.
    Offline(LiveDisk),
    /// A disk of a libvirt domain, in [`Found::libvirt`]'s order: its backup job's export, or
    /// (the domain shut off) its image served by qemu-nbd.
    Libvirt,
}

/// A running VM: its QMP connection, the cycle's work folder and its disks as QEMU lists them.
pub(super) struct LiveVm {
    pub(super) qmp: Qmp,
    pub(super) work: Workdir,
    pub(super) disks: Vec<LiveDisk>,
}

/// What a cycle protects.
pub(super) struct Found {
    pub(super) disks: Vec<SourceDisk>,
    pub(super) live: Option<LiveVm>,
    pub(super) libvirt: Option<LibvirtVm>,
}

impl Found {
    /// Each disk's name and geometry, in order: what the session is begun with.
    pub(super) fn specs(&self) -> Vec<(String, DiskGeometry)> {
        self.disks
            .iter()
            .map(|d| (d.name.clone(), d.geometry))
            .collect()
    }
}

/// Finds the disks `cfg` names.
pub(super) async fn find(cfg: &SyncConfig) -> Result<Found, SyncError> {
    if let Some(src) = &cfg.libvirt {
        return find_libvirt(cfg, src).await;
    }
    let Some(src) = &cfg.live else {
        let mut disks = Vec::new();
        for d in &cfg.disks {
            names::disk(&d.name)?;
            let (size, origin) = match d.kind {
                DiskKind::Raw => {
                    let disk = RawDisk::open(&d.path)?;
                    (disk.size(), Origin::Raw(disk))
                }
                DiskKind::Qcow2 => {
                    let info = offline::inspect(&d.name, &d.path)?;
                    (info.size, Origin::Offline(info))
                }
            };
            disks.push(SourceDisk {
                name: d.name.clone(),
                geometry: geometry(&d.name, size, cfg.block_size)?,
                origin,
            });
        }
        return Ok(Found {
            disks,
            live: None,
            libvirt: None,
        });
    };
    let mut qmp = Qmp::connect(&src.qmp).await.map_err(LiveError::from)?;
    let work = Workdir::new(&cfg.state_dir, &cfg.vm).map_err(|e| SyncError::StateFolder {
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
    let mut found = Vec::new();
    for d in &disks {
        names::disk(&d.name)?;
        found.push(SourceDisk {
            name: d.name.clone(),
            geometry: geometry(&d.name, d.size, cfg.block_size)?,
            origin: Origin::Live,
        });
    }
    Ok(Found {
        disks: found,
        live: Some(LiveVm { qmp, work, disks }),
        libvirt: None,
    })
}

/// A libvirt domain: its disks from its definition (after ending a job a killed cycle left),
/// running or shut off.
async fn find_libvirt(cfg: &SyncConfig, src: &LibvirtSource) -> Result<Found, SyncError> {
    let work = Workdir::new(&cfg.state_dir, &cfg.vm).map_err(|e| SyncError::StateFolder {
        path: cfg.state_dir.clone(),
        source: e,
    })?;
    let vm = libvirt::discover(src, work).await?;
    for want in &src.only {
        if !vm.disks.iter().any(|(d, _)| &d.target == want) {
            return Err(SyncError::NoSuchDisk(want.clone()));
        }
    }
    if vm.disks.is_empty() {
        return Err(SyncError::NoSuchDisk("(the domain has no disks)".into()));
    }
    let mut disks = Vec::new();
    for (d, size) in &vm.disks {
        names::disk(&d.target)?;
        disks.push(SourceDisk {
            name: d.target.clone(),
            geometry: geometry(&d.target, *size, cfg.block_size)?,
            origin: Origin::Libvirt,
        });
    }
    Ok(Found {
        disks,
        live: None,
        libvirt: Some(vm),
    })
}
