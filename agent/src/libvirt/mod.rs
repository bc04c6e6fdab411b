//! libvirt-managed VMs: each point is one pull-mode backup job (`virsh backup-begin`) that
//! creates the next checkpoint atomically with it and exports every disk over NBD on a unix
//! socket under the agent's state, with the dirty bitmap since the previous checkpoint.
//!
//! The chain. The agent keeps one checkpoint of its own per domain (`rewind-<stamp>`), the one
//! taken with the VM's last committed point, recorded in the state as each disk's chain bitmap
//! and its XML kept beside it. A cycle:
//! 1. ends a backup job a killed agent left (only one whose socket is under our state);
//! 2. checks the recorded checkpoint with `--redefine-validate` (non-destructive when libvirt
//!    has it; redefines it from the saved XML when libvirt lost it) and deletes every other
//!    checkpoint of ours by name; a checkpoint that fails the check is deleted too, and its
//!    disks are read in full (only chunks the receiver lacks travel);
//! 3. begins the job, incremental from the recorded checkpoint, under a guest freeze when
//!    asked;
//! 4. after the point: ends the job; committed, the new checkpoint becomes the chain's and the
//!    old one is deleted; not committed, the new one is deleted and the old one stays.
//!
//! The chain record moves only after a commit, so the next incremental always starts at or
//! before the last committed point: a crash anywhere costs at most a larger delta, never a
//! missed write. A shut-off domain continues the same chain without QEMU ([`offline`]).

mod freeze;
pub mod offline;
pub mod virsh;
pub mod watch;
pub mod xml;

use crate::live::Workdir;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virsh::{Virsh, VirshError};
use xml::{BackupDisk, Checkpoint, DomainInfo, XmlError};

/// Names of the checkpoints the agent makes start with this (it never touches others).
pub const CHECKPOINT_PREFIX: &str = "rewind-";

/// How long a guest freeze may take before the point is taken crash-consistent.
pub const FREEZE_LIMIT: Duration = Duration::from_secs(10);

/// How long libvirt may take to clean up an ended job (its scratch files and socket).
const JOB_END_LIMIT: Duration = Duration::from_secs(30);

/// Free space (MiB) left in the scratch folder beyond what the job is expected to need,
/// unless the operator says otherwise: the estimate is a guess (the guest may write more
/// during the job than it did since the last one), and the reserve absorbs the difference.
pub const DEFAULT_SCRATCH_RESERVE_MIB: u64 = 256;

/// A libvirt domain to protect.
#[derive(Debug, Clone)]
pub struct LibvirtSource {
    /// libvirt's connection URI (`qemu:///system`).
    pub uri: String,
    pub domain: String,
    /// Freeze the guest's file systems through its agent around the job.
    pub freeze: bool,
    /// Bytes a job must leave free in the scratch folder beyond its expected need.
    pub scratch_reserve: u64,
    /// Only these disks (all when empty).
    pub only: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error(transparent)]
    Virsh(#[from] VirshError),
    #[error(transparent)]
    Xml(#[from] XmlError),
    /// A domain neither running nor shut off (e.g. shutting down): nothing to read.
    #[error("domain {domain} is {state}: Rewind reads running and shut-off domains only")]
    NotRunning { domain: String, state: String },
    #[error(transparent)]
    Offline(#[from] offline::OfflineError),
    /// Someone else's backup job runs on the domain (libvirt allows one at a time).
    #[error("a backup job not started by this agent runs on domain {domain}; retry when it ends")]
    Busy { domain: String },
    /// An ended job did not go away.
    #[error("the backup job on domain {domain} did not end within {} s", JOB_END_LIMIT.as_secs())]
    JobStuck { domain: String },
    /// Not enough room for the job's scratch files.
    #[error(
        "the scratch folder {} has {} MiB free, and the backup job may need {} MiB there \
         (the old content of blocks the guest overwrites during the job)",
        dir.display(), free >> 20, need >> 20
    )]
    NoRoom { dir: PathBuf, free: u64, need: u64 },
    /// The domain paused on an I/O error during the job (its scratch files filled the
    /// folder); the job was ended and the domain resumed (see [`watch`]).
    #[error(
        "domain {domain} paused on an I/O error during the backup job: the scratch folder {} \
         filled up; the job was ended and the domain resumed (free space there, or raise \
         --scratch-reserve-mib)",
        dir.display()
    )]
    ScratchFull { domain: String, dir: PathBuf },
    /// virsh printed something the agent cannot read.
    #[error("unexpected virsh output for {what}: {text:?}")]
    Output { what: &'static str, text: String },
    /// The agent's folder for the job could not be used.
    #[error("libvirt work folder {}", path.display())]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A domain as a cycle finds it.
pub struct LibvirtVm {
    pub virsh: Virsh,
    pub domain: String,
    /// Running (or paused): a backup job; shut off: the [`offline`] path.
    pub running: bool,
    /// The disks the cycle protects, in the definition's order, with their sizes.
    pub disks: Vec<(xml::DomainDisk, u64)>,
    /// The domain's definition, recorded with the point.
    pub config_xml: String,
    pub work: Workdir,
    /// Bytes a job must leave free in the scratch folder beyond its expected need.
    pub scratch_reserve: u64,
}

/// What the job of this cycle reads and creates.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The recorded checkpoint, if it passed the check.
    pub base: Option<String>,
    /// The checkpoint this cycle's job creates.
    pub new: String,
    pub disks: Vec<BackupDisk>,
    /// Per disk: why it is read in full, if it is.
    pub full_reasons: Vec<Option<String>>,
}

/// A begun job: what the cycle reads and what [`finish`] settles.
pub struct Job {
    pub plan: Plan,
    /// When the guest's file systems were frozen for the job: from the freeze request to the
    /// thaw's answer, and from the freeze's answer to the thaw request (None: not frozen).
    pub freeze: Option<(Duration, Duration)>,
    /// The guard that resumes the domain if a full scratch folder pauses it.
    pub watch: Option<watch::Watch>,
}

impl Job {
    /// Why the job ended early, if the guard ended it (the domain paused on a full scratch
    /// folder).
    pub fn scratch_full(&self, vm: &LibvirtVm) -> Option<LibvirtError> {
        let tripped = self.watch.as_ref().is_some_and(watch::Watch::tripped);
        tripped.then(|| LibvirtError::ScratchFull {
            domain: vm.domain.clone(),
            dir: vm.work.dir.clone(),
        })
    }
}

fn folder(path: &Path) -> impl FnOnce(std::io::Error) -> LibvirtError + '_ {
    move |source| LibvirtError::Folder {
        path: path.to_owned(),
        source,
    }
}

/// The socket the job's NBD server listens on.
pub fn socket(work: &Workdir) -> PathBuf {
    work.dir.join("libvirt-nbd.sock")
}

fn scratch(work: &Workdir, disk: &str) -> PathBuf {
    work.dir.join(format!("scratch-{disk}.qcow2"))
}

/// Why `disk` is read in full (None: only its dirty blocks since the base): it has no bitmaps,
/// the receiver asked for a full point (`delta` false), or the base failed its check (`why`).
pub(crate) fn full_reason(
    disk: &xml::DomainDisk,
    delta: bool,
    why: Option<&str>,
) -> Option<String> {
    if !disk.has_bitmaps() {
        Some(format!("{} disk: no dirty bitmaps", disk.format))
    } else if !delta {
        Some("the receiver asked for a full point".to_owned())
    } else {
        why.map(str::to_owned)
    }
}

fn saved_checkpoint(work: &Workdir, name: &str) -> PathBuf {
    work.dir.join(format!("checkpoint-{name}.xml"))
}

/// The definition of checkpoint `name` as the state keeps it (sent with the point, so the
/// receiver keeps it too), if it is there.
pub fn checkpoint_definition(work: &Workdir, name: &str) -> Option<String> {
    std::fs::read_to_string(saved_checkpoint(work, name)).ok()
}

/// Finds the domain, ends a job a killed agent left, and reads its disks and definition.
pub async fn discover(src: &LibvirtSource, work: Workdir) -> Result<LibvirtVm, LibvirtError> {
    let virsh = Virsh::new(&src.uri);
    let d = src.domain.as_str();
    let state = virsh.run(&["domstate", d]).await?.trim().to_owned();
    let running = state == "running" || state == "paused";
    if !running && state != "shut off" {
        return Err(LibvirtError::NotRunning {
            domain: d.to_owned(),
            state,
        });
    }
    if running {
        end_leftover_job(&virsh, d, &work).await?;
    }
    let persistent = virsh
        .run(&["dominfo", d])
        .await?
        .lines()
        .any(|l| l.starts_with("Persistent:") && l.trim_end().ends_with("yes"));
    let config_xml = if persistent {
        virsh.run(&["dumpxml", "--inactive", d]).await?
    } else {
        virsh.run(&["dumpxml", "--migratable", d]).await?
    };
    let info: DomainInfo = if running {
        xml::parse_domain(&virsh.run(&["dumpxml", d]).await?)?
    } else {
        xml::parse_domain(&config_xml)?
    };
    let mut disks = Vec::new();
    for disk in info.disks {
        if !src.only.is_empty() && !src.only.contains(&disk.target) {
            continue;
        }
        let size = if running {
            capacity(&virsh.run(&["domblkinfo", d, &disk.target]).await?)?
        } else {
            offline::disk_size(&disk).await?
        };
        disks.push((disk, size));
    }
    Ok(LibvirtVm {
        virsh,
        domain: d.to_owned(),
        running,
        disks,
        config_xml,
        work,
        scratch_reserve: src.scratch_reserve,
    })
}

/// The `Capacity:` of `virsh domblkinfo` (bytes).
fn capacity(text: &str) -> Result<u64, LibvirtError> {
    text.lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| LibvirtError::Output {
            what: "domblkinfo",
            text: text.to_owned(),
        })
}

/// Ends a backup job this agent's state folder owns (a killed agent's), waits until libvirt
/// has cleaned up after it, and removes files it left. A job of anyone else is an error.
async fn end_leftover_job(virsh: &Virsh, d: &str, work: &Workdir) -> Result<(), LibvirtError> {
    match virsh.run(&["backup-dumpxml", d]).await {
        Ok(text) => {
            let ours = xml::backup_socket(&text)?.is_some_and(|s| s.starts_with(&work.dir));
            if !ours {
                return Err(LibvirtError::Busy {
                    domain: d.to_owned(),
                });
            }
            tracing::warn!(
                domain = d,
                "ending the backup job an interrupted cycle left"
            );
            end_job(virsh, d).await?;
            watch::resume_after_job(virsh, d).await?;
        }
        Err(e) if no_job(&e) => {}
        Err(e) => return Err(e.into()),
    }
    for entry in std::fs::read_dir(&work.dir).map_err(folder(&work.dir))? {
        let path = entry.map_err(folder(&work.dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("scratch-") || name == "libvirt-nbd.sock" {
            std::fs::remove_file(&path).map_err(folder(&path))?;
        }
    }
    Ok(())
}

/// Whether virsh said there is no backup job (or no job at all).
fn no_job(e: &VirshError) -> bool {
    let m = e.message();
    m.contains("no domain backup job present") || m.contains("no job is active")
}

/// Ends the domain's backup job and waits until libvirt has let go of it.
pub(crate) async fn end_job(virsh: &Virsh, d: &str) -> Result<(), LibvirtError> {
    match virsh.run(&["domjobabort", d]).await {
        Ok(_) => {}
        Err(e) if no_job(&e) => {}
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + JOB_END_LIMIT;
    loop {
        match virsh.run(&["backup-dumpxml", d]).await {
            Err(e) if no_job(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(_) if Instant::now() >= deadline => {
                return Err(LibvirtError::JobStuck {
                    domain: d.to_owned(),
                })
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The checkpoints of the domain that the agent made.
async fn our_checkpoints(virsh: &Virsh, d: &str) -> Result<Vec<String>, LibvirtError> {
    Ok(virsh
        .run(&["checkpoint-list", d, "--name"])
        .await?
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(CHECKPOINT_PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Checks the recorded checkpoint against the domain: libvirt has it (or takes it back from
/// the saved XML) and every bitmap it names is present and consistent. Returns why not.
async fn check_base(vm: &LibvirtVm, name: &str, known: &[String]) -> Option<String> {
    let d = vm.domain.as_str();
    let xml_text = if known.iter().any(|k| k == name) {
        match vm
            .virsh
            .run(&["checkpoint-dumpxml", d, name, "--no-domain"])
            .await
        {
            Ok(t) => match Checkpoint::parse(&t) {
                Ok(cp) => cp.to_xml(),
                Err(e) => return Some(e.to_string()),
            },
            Err(e) => return Some(e.to_string()),
        }
    } else {
        match std::fs::read_to_string(saved_checkpoint(&vm.work, name)) {
            Ok(t) => t,
            Err(_) => {
                return Some(format!(
                    "libvirt lost checkpoint {name} and its saved definition is missing"
                ))
            }
        }
    };
    let file = vm.work.dir.join("redefine.xml");
    if let Err(e) = std::fs::write(&file, &xml_text) {
        return Some(format!("cannot write {}: {e}", file.display()));
    }
    let path = file.display().to_string();
    let checked = vm
        .virsh
        .run(&[
            "checkpoint-create",
            d,
            &path,
            "--redefine",
            "--redefine-validate",
        ])
        .await;
    let _ = std::fs::remove_file(&file);
    match checked {
        Ok(_) => {
            if !known.iter().any(|k| k == name) {
                tracing::warn!(
                    domain = d,
                    checkpoint = name,
                    "libvirt had lost the chain's checkpoint: redefined it"
                );
            }
            None
        }
        Err(e) => Some(format!(
            "checkpoint {name} is inconsistent: {}",
            e.message()
        )),
    }
}

/// Deletes one checkpoint of ours by name, bitmaps included; when libvirt cannot (a bitmap
/// already gone), drops its record so it no longer stands in the chain's way.
async fn delete_checkpoint(vm: &LibvirtVm, name: &str) -> Result<(), LibvirtError> {
    let d = vm.domain.as_str();
    if let Err(e) = vm.virsh.run(&["checkpoint-delete", d, name]).await {
        tracing::warn!(domain = d, checkpoint = name, error = %e, "deleting the checkpoint's record only");
        vm.virsh
            .run(&["checkpoint-delete", d, name, "--metadata"])
            .await?;
    }
    let _ = std::fs::remove_file(saved_checkpoint(&vm.work, name));
    Ok(())
}

/// Plans the cycle's job: which checkpoint it is incremental from (`chain`, the recorded
/// one, if it passes the check) and for which disks (`want_delta[i]`: the receiver and our
/// state allow a delta for disk `i`; disks without bitmaps are always read in full). Every
/// other checkpoint of ours is deleted, so exactly one stays between cycles.
pub async fn plan(
    vm: &LibvirtVm,
    chain: Option<&str>,
    want_delta: &[bool],
    stamp: u128,
) -> Result<Plan, LibvirtError> {
    let known = our_checkpoints(&vm.virsh, &vm.domain).await?;
    let (base, why) = match chain {
        Some(c) => match check_base(vm, c, &known).await {
            None => (Some(c.to_owned()), None),
            Some(why) => {
                tracing::warn!(domain = %vm.domain, reason = %why, "reading the disks in full");
                (None, Some(why))
            }
        },
        None => (None, Some("no earlier point of this chain".to_owned())),
    };
    for name in our_checkpoints(&vm.virsh, &vm.domain).await? {
        if Some(&name) != base.as_ref() {
            delete_checkpoint(vm, &name).await?;
        }
    }
    let mut disks = Vec::new();
    let mut full_reasons = Vec::new();
    for ((disk, _), &delta) in vm.disks.iter().zip(want_delta) {
        let reason = full_reason(disk, delta, why.as_deref());
        disks.push(BackupDisk {
            target: disk.target.clone(),
            since: if reason.is_none() { base.clone() } else { None },
            scratch: scratch(&vm.work, &disk.target),
        });
        full_reasons.push(reason);
    }
    Ok(Plan {
        base,
        new: format!("{CHECKPOINT_PREFIX}{stamp}"),
        disks,
        full_reasons,
    })
}

/// Refuses to begin a job whose scratch files may not fit: QEMU keeps there the old content
/// of every block the guest overwrites while the job runs, and a full scratch folder would
/// fail the guest's writes (libvirt pauses the VM). The expected need is what was written
/// since the base checkpoint (the guest writes about as much again while the job reads it),
/// or a quarter of each disk read in full.
async fn check_room(vm: &LibvirtVm, plan: &Plan) -> Result<(), LibvirtError> {
    let mut need = vm.scratch_reserve;
    let dirty = match &plan.base {
        Some(b) => {
            let text = vm
                .virsh
                .run(&["checkpoint-dumpxml", &vm.domain, b, "--no-domain", "--size"])
                .await?;
            xml::dirty_sizes(&text)?
        }
        None => Vec::new(),
    };
    for ((disk, size), job) in vm.disks.iter().zip(&plan.disks) {
        need += match job.since {
            Some(_) => dirty
                .iter()
                .find(|(n, _)| n == &disk.target)
                .map_or(*size / 4, |(_, s)| *s),
            None => *size / 4,
        };
    }
    let stat = rustix::fs::statvfs(&vm.work.dir).map_err(|e| LibvirtError::Folder {
        path: vm.work.dir.clone(),
        source: e.into(),
    })?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < need {
        return Err(LibvirtError::NoRoom {
            dir: vm.work.dir.clone(),
            free,
            need,
        });
    }
    Ok(())
}

/// Begins the job: checks room for its scratch files, freezes the guest if asked (a freeze
/// that fails or times out gives a crash-consistent point), begins the backup with its new
/// checkpoint at one instant across all disks, and thaws.
pub async fn begin(vm: &LibvirtVm, plan: Plan, freeze: bool) -> Result<Job, LibvirtError> {
    check_room(vm, &plan).await?;
    let d = vm.domain.as_str();
    let backup = vm.work.dir.join("backup.xml");
    let checkpoint = vm.work.dir.join("checkpoint.xml");
    std::fs::write(&backup, xml::backup_xml(&socket(&vm.work), &plan.disks))
        .map_err(folder(&backup))?;
    let cp_disks: Vec<(String, bool)> = vm
        .disks
        .iter()
        .map(|(disk, _)| (disk.target.clone(), disk.has_bitmaps()))
        .collect();
    std::fs::write(
        &checkpoint,
        xml::new_checkpoint_xml(&plan.new, "taken by rewind-agent", &cp_disks),
    )
    .map_err(folder(&checkpoint))?;
    let asked = Instant::now();
    let frozen = freeze && freeze::freeze_guest(&vm.virsh, d).await;
    let froze = Instant::now();
    let begun = vm
        .virsh
        .run(&[
            "backup-begin",
            d,
            &backup.display().to_string(),
            &checkpoint.display().to_string(),
        ])
        .await;
    let thaw_asked = Instant::now();
    if frozen {
        freeze::thaw_guest(vm.virsh.clone(), d.to_owned()).await;
    }
    let freeze = frozen.then(|| (asked.elapsed(), thaw_asked - froze));
    begun?;
    let watch = Some(watch::Watch::start(vm.virsh.clone(), d.to_owned()));
    crate::faults::point("libvirt-begun");
    let job = Job {
        plan,
        freeze,
        watch,
    };
    if let Err(e) = save_checkpoint(vm, &job.plan.new).await {
        // No point without a way back to its checkpoint: undo the job.
        let _ = end(vm).await;
        let _ = settle(vm, &job, false).await;
        return Err(e);
    }
    Ok(job)
}

/// Keeps the checkpoint's definition in the state, to redefine it if libvirt loses it.
async fn save_checkpoint(vm: &LibvirtVm, name: &str) -> Result<(), LibvirtError> {
    let dump = vm
        .virsh
        .run(&["checkpoint-dumpxml", &vm.domain, name, "--no-domain"])
        .await?;
    let saved = saved_checkpoint(&vm.work, name);
    std::fs::write(&saved, Checkpoint::parse(&dump)?.to_xml()).map_err(folder(&saved))
}

/// Ends the cycle's backup job (the NBD exports and scratch files go with it), then resumes
/// the domain if its scratch folder filled and paused it after the guard last looked.
pub async fn end(vm: &LibvirtVm) -> Result<(), LibvirtError> {
    end_job(&vm.virsh, &vm.domain).await?;
    watch::resume_after_job(&vm.virsh, &vm.domain).await?;
    Ok(())
}

/// Settles the chain after [`end`]: `recorded` (the point committed and the state now names
/// the new checkpoint), the base is deleted; otherwise the new checkpoint is deleted and the
/// chain stays at the base, which still records every write since it.
pub async fn settle(vm: &LibvirtVm, job: &Job, recorded: bool) -> Result<(), LibvirtError> {
    if recorded {
        if let Some(base) = &job.plan.base {
            delete_checkpoint(vm, base).await?;
        }
    } else {
        delete_checkpoint(vm, &job.plan.new).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_read_in_bytes() {
        let text = "Capacity:       67108864\nAllocation:     200704\nPhysical:       200704\n";
        assert_eq!(capacity(text).expect("valid"), 67108864);
        assert!(matches!(
            capacity("Capacity: 64 MiB"),
            Err(LibvirtError::Output { .. })
        ));
    }

    #[test]
    fn only_job_absence_counts_as_no_job() {
        let failed = |m: &str| VirshError::Failed {
            command: "backup-dumpxml".into(),
            message: m.into(),
        };
        assert!(no_job(&failed(
            "Domain backup job id not found: no domain backup job present"
        )));
        assert!(no_job(&failed(
            "Requested operation is not valid: no job is active on the domain"
        )));
        assert!(!no_job(&failed("failed to connect to the hypervisor")));
    }
}
