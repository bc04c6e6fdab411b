//! Shut-off libvirt domains: the chain's checkpoint continued without QEMU. libvirt cannot
//! back up, create or delete checkpoints of an inactive domain, so the agent does what QEMU
//! would: a checkpoint is an enabled persistent bitmap of its name in every qcow2 disk plus
//! libvirt's record of it (`checkpoint-create --redefine`), and each disk is read through
//! `qemu-nbd -B <base>`, whose `qemu:dirty-bitmap:<base>` context gives the changes since the
//! chain's checkpoint.
//!
//! An offline point:
//! 1. checks the recorded checkpoint in the images (`qemu-img info`: its bitmap is on every
//!    qcow2 disk, enabled, and not flagged `in-use`, which without a running QEMU means QEMU
//!    died with the image open) and in libvirt (redefined from the saved XML if libvirt lost
//!    it); a checkpoint that fails is dropped and the disks are read in full; every other
//!    checkpoint or `rewind-*` bitmap of ours is dropped too;
//! 2. adds the new checkpoint's bitmap to every qcow2 disk (`qemu-img bitmap --add`), records
//!    it in libvirt, and serves each disk with qemu-nbd (raw disks in full: no bitmaps);
//! 3. once the disks are read, stops qemu-nbd (the images are free for `virsh start` again);
//! 4. after the commit, as the live path: the state names the new checkpoint, then the old one
//!    is dropped; not committed, the new one is dropped and the old one, which recorded every
//!    write since it, stays.
//!
//! While qemu-nbd holds the images, a `virsh start` fails on the image lock. A domain that
//! starts before that fails this cycle (qemu-img and qemu-nbd refuse a locked image), and the
//! next cycle takes the live path from the same checkpoint.

use super::xml::{Checkpoint, DomainDisk};
use super::{
    folder, our_checkpoints, saved_checkpoint, LibvirtError, LibvirtVm, CHECKPOINT_PREFIX,
};
use crate::live::{BitmapInfo, LiveDisk, Workdir};
use crate::offline::NbdServer;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// Longest one qemu-img call may take (bitmap changes and `info` take milliseconds; a large
/// image on slow storage may take seconds).
const IMAGE_LIMIT: Duration = Duration::from_secs(120);

/// The bitmaps' granularity: the one libvirt and the live path use.
const GRANULARITY: &str = "65536";

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// qemu-img failed on one of the domain's images.
    #[error("qemu-img {command} on {}: {message}", path.display())]
    Image {
        command: String,
        path: PathBuf,
        message: String,
    },
    /// qemu-img did not answer in time and was killed.
    #[error("qemu-img {command} on {}: no answer in {} s", path.display(), IMAGE_LIMIT.as_secs())]
    Timeout { command: String, path: PathBuf },
    /// qemu-img's description of an image could not be read.
    #[error(transparent)]
    Info(#[from] crate::offline::OfflineError),
    /// qemu-nbd could not serve a disk.
    #[error("cannot serve disk {disk} with qemu-nbd")]
    Serve {
        disk: String,
        #[source]
        source: crate::offline::OfflineError,
    },
    /// The domain started while its offline point was being prepared.
    #[error("domain {domain} started during its offline point ({why}); the next cycle takes the live path")]
    Started { domain: String, why: String },
}

/// One disk of an offline point.
#[derive(Debug, Clone)]
pub struct OfflineDisk {
    pub target: String,
    /// The checkpoint whose bitmap gives the changes to read (None: the whole disk).
    pub since: Option<String>,
    /// Why the disk is read in full, if it is.
    pub full_reason: Option<String>,
}

/// What an offline point reads and creates.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The recorded checkpoint, if it passed the check.
    pub base: Option<String>,
    /// The checkpoint this point creates.
    pub new: String,
    pub disks: Vec<OfflineDisk>,
}

/// A begun offline point: its plan and the qemu-nbd servers holding the images.
pub struct Point {
    pub plan: Plan,
    servers: Vec<NbdServer>,
}

impl Point {
    /// Stops serving the images (they are read): the domain may start again.
    pub fn release(&mut self) {
        self.servers.clear();
    }
}

/// The socket qemu-nbd serves one disk on; its export is named after the disk.
pub fn socket(work: &Workdir, target: &str) -> PathBuf {
    work.dir.join(format!("libvirt-offline-{target}.sock"))
}

/// Runs `qemu-img ARGS... IMAGE [NAME]` within [`IMAGE_LIMIT`]: `args` up to the image, then
/// what follows it.
async fn qemu_img(args: &[&str], image: &Path, after: &[&str]) -> Result<String, OfflineError> {
    let command = args.first().copied().unwrap_or_default().to_owned();
    let child = Command::new("qemu-img")
        .args(args)
        .arg(image)
        .args(after)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| OfflineError::Image {
            command: command.clone(),
            path: image.to_owned(),
            message: e.to_string(),
        })?;
    let out = match tokio::time::timeout(IMAGE_LIMIT, child.wait_with_output()).await {
        Ok(out) => out.map_err(|e| OfflineError::Image {
            command: command.clone(),
            path: image.to_owned(),
            message: e.to_string(),
        })?,
        Err(_) => {
            return Err(OfflineError::Timeout {
                command,
                path: image.to_owned(),
            })
        }
    };
    if !out.status.success() {
        return Err(OfflineError::Image {
            command,
            path: image.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An image's size and bitmaps (`qemu-img info`; fails on an image a running QEMU holds).
async fn info(disk: &DomainDisk) -> Result<LiveDisk, OfflineError> {
    let format = disk.format.as_str();
    let text = qemu_img(&["info", "--output=json", "-f", format], &disk.source, &[]).await?;
    Ok(crate::offline::parse_info(
        &disk.target,
        &disk.source,
        &text,
    )?)
}

/// The size of a shut-off domain's disk, in bytes.
pub async fn disk_size(disk: &DomainDisk) -> Result<u64, LibvirtError> {
    Ok(info(disk).await?.size)
}

/// Removes one bitmap from an image; a bitmap already gone is not an error.
async fn remove_bitmap(disk: &DomainDisk, name: &str) -> Result<(), OfflineError> {
    match qemu_img(
        &["bitmap", "--remove", "-f", "qcow2"],
        &disk.source,
        &[name],
    )
    .await
    {
        Err(OfflineError::Image { message, .. }) if message.contains("not found") => Ok(()),
        other => other.map(drop),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Records a checkpoint in libvirt (plain `--redefine`: libvirt cannot validate it offline)
/// and keeps its definition in the state.
async fn redefine(vm: &LibvirtVm, cp: &Checkpoint) -> Result<(), LibvirtError> {
    let file = vm.work.dir.join("redefine.xml");
    std::fs::write(&file, cp.to_xml()).map_err(folder(&file))?;
    let path = file.display().to_string();
    let done = vm
        .virsh
        .run(&["checkpoint-create", &vm.domain, &path, "--redefine"])
        .await;
    let _ = std::fs::remove_file(&file);
    done?;
    let saved = saved_checkpoint(&vm.work, &cp.name);
    std::fs::write(&saved, cp.to_xml()).map_err(folder(&saved))
}

/// Drops one checkpoint of ours: its bitmap from the disks marked in `holds`, then libvirt's
/// record. Bitmaps that cannot be removed (the domain started meanwhile) stay under a record
/// naming exactly those disks, which the next cycle deletes through libvirt.
async fn drop_checkpoint(vm: &LibvirtVm, name: &str, holds: &[bool]) -> Result<(), LibvirtError> {
    let mut left = Vec::new();
    for ((disk, _), &has) in vm.disks.iter().zip(holds) {
        let stuck = has
            && {
                let removed = remove_bitmap(disk, name).await;
                if let Err(e) = &removed {
                    tracing::warn!(domain = %vm.domain, checkpoint = name, error = %e, "cannot remove the bitmap");
                }
                removed.is_err()
            };
        left.push((disk.target.clone(), stuck));
    }
    if left.iter().any(|(_, stuck)| *stuck) {
        let cp = Checkpoint {
            name: name.to_owned(),
            creation_time: now_secs(),
            disks: left,
        };
        return redefine(vm, &cp).await;
    }
    if our_checkpoints(&vm.virsh, &vm.domain)
        .await?
        .iter()
        .any(|c| c == name)
    {
        vm.virsh
            .run(&["checkpoint-delete", &vm.domain, name, "--metadata"])
            .await?;
    }
    let _ = std::fs::remove_file(saved_checkpoint(&vm.work, name));
    Ok(())
}

/// Why the bitmap of checkpoint `name` on disk `target` (whose bitmaps are `bitmaps`) cannot
/// be trusted to hold every write since the checkpoint (None: it can).
fn bitmap_problem(name: &str, target: &str, bitmaps: &[BitmapInfo]) -> Option<String> {
    let b = bitmaps.iter().find(|b| b.name == name);
    let problem = match b {
        None => "disk {t} lacks its bitmap",
        Some(b) if b.inconsistent => {
            "its bitmap on disk {t} is flagged in use (QEMU did not close the image)"
        }
        Some(b) if !b.recording => "its bitmap on disk {t} is disabled",
        Some(_) => return None,
    };
    Some(format!(
        "checkpoint {name} is inconsistent: {}",
        problem.replace("{t}", target)
    ))
}

/// Checks the recorded checkpoint `name` against the images' bitmaps (`images`, per disk) and
/// libvirt's records (`known`), redefining it when libvirt lost it. Returns why it fails.
async fn check_base(
    vm: &LibvirtVm,
    name: &str,
    images: &[Vec<BitmapInfo>],
    known: &[String],
) -> Option<String> {
    for ((disk, _), bitmaps) in vm.disks.iter().zip(images) {
        if disk.has_bitmaps() {
            if let Some(why) = bitmap_problem(name, &disk.target, bitmaps) {
                return Some(why);
            }
        }
    }
    if known.iter().any(|k| k == name) {
        return None;
    }
    let Ok(text) = std::fs::read_to_string(saved_checkpoint(&vm.work, name)) else {
        return Some(format!(
            "libvirt lost checkpoint {name} and its saved definition is missing"
        ));
    };
    let cp = match Checkpoint::parse(&text) {
        Ok(cp) => cp,
        Err(e) => return Some(e.to_string()),
    };
    match redefine(vm, &cp).await {
        Ok(()) => {
            tracing::warn!(domain = %vm.domain, checkpoint = name, "libvirt had lost the chain's checkpoint: redefined it");
            None
        }
        Err(e) => Some(format!("cannot redefine checkpoint {name}: {e}")),
    }
}

/// Plans an offline point: the checkpoint the changes are read since (`chain`, if it passes
/// the check) and for which disks (`want_delta`, as for the live path). Every other
/// checkpoint and `rewind-*` bitmap of ours is dropped first.
pub async fn plan(
    vm: &LibvirtVm,
    chain: Option<&str>,
    want_delta: &[bool],
    stamp: u128,
) -> Result<Plan, LibvirtError> {
    let mut images = Vec::new();
    for (disk, _) in &vm.disks {
        images.push(if disk.has_bitmaps() {
            info(disk).await?.bitmaps
        } else {
            Vec::new()
        });
    }
    let known = our_checkpoints(&vm.virsh, &vm.domain).await?;
    let why = match chain {
        Some(c) => check_base(vm, c, &images, &known).await,
        None => Some("no earlier point of this chain".to_owned()),
    };
    if let (Some(_), Some(w)) = (chain, &why) {
        tracing::warn!(domain = %vm.domain, reason = %w, "reading the disks in full");
    }
    let base = chain.filter(|_| why.is_none()).map(str::to_owned);
    let mut stale: BTreeSet<&str> = known.iter().map(String::as_str).collect();
    for b in images.iter().flatten() {
        if b.name.starts_with(CHECKPOINT_PREFIX) {
            stale.insert(&b.name);
        }
    }
    for name in stale.into_iter().filter(|n| Some(*n) != base.as_deref()) {
        let holds: Vec<bool> = images
            .iter()
            .map(|bs| bs.iter().any(|b| b.name == name))
            .collect();
        drop_checkpoint(vm, name, &holds).await?;
    }
    let mut disks = Vec::new();
    for ((disk, _), &delta) in vm.disks.iter().zip(want_delta) {
        let full_reason = super::full_reason(disk, delta, why.as_deref());
        disks.push(OfflineDisk {
            target: disk.target.clone(),
            since: if full_reason.is_none() {
                base.clone()
            } else {
                None
            },
            full_reason,
        });
    }
    Ok(Plan {
        base,
        new: format!("{CHECKPOINT_PREFIX}{stamp}"),
        disks,
    })
}

/// Fails unless the domain is still shut off.
async fn still_off(vm: &LibvirtVm) -> Result<(), LibvirtError> {
    let state = vm.virsh.run(&["domstate", &vm.domain]).await?;
    if state.trim() == "shut off" {
        return Ok(());
    }
    Err(OfflineError::Started {
        domain: vm.domain.clone(),
        why: format!("it is {}", state.trim()),
    }
    .into())
}

/// Begins an offline point: the new checkpoint (bitmaps, then libvirt's record) and one
/// qemu-nbd per disk. On failure nothing of it is left, and a domain found started since
/// discovery is reported as [`OfflineError::Started`].
pub async fn begin(vm: &LibvirtVm, plan: Plan) -> Result<Point, LibvirtError> {
    still_off(vm).await?;
    let mut added = Vec::new();
    let mut failed: Option<LibvirtError> = None;
    for (disk, _) in &vm.disks {
        let add = disk.has_bitmaps() && failed.is_none();
        if add {
            let args = [
                "bitmap",
                "--add",
                "--granularity",
                GRANULARITY,
                "-f",
                "qcow2",
            ];
            if let Err(e) = qemu_img(&args, &disk.source, &[plan.new.as_str()]).await {
                failed = Some(e.into());
            }
        }
        added.push(add && failed.is_none());
    }
    let begun = match failed {
        Some(e) => Err(e),
        None => define_and_serve(vm, &plan).await,
    };
    match begun {
        Ok(servers) => Ok(Point { plan, servers }),
        Err(e) => {
            let _ = drop_checkpoint(vm, &plan.new, &added).await;
            Err(match still_off(vm).await {
                Err(LibvirtError::Offline(OfflineError::Started { domain, .. })) => {
                    OfflineError::Started {
                        domain,
                        why: e.to_string(),
                    }
                    .into()
                }
                _ => e,
            })
        }
    }
}

/// Records the new checkpoint in libvirt and the state, then serves every disk.
async fn define_and_serve(vm: &LibvirtVm, plan: &Plan) -> Result<Vec<NbdServer>, LibvirtError> {
    let cp = Checkpoint {
        name: plan.new.clone(),
        creation_time: now_secs(),
        disks: vm
            .disks
            .iter()
            .map(|(d, _)| (d.target.clone(), d.has_bitmaps()))
            .collect(),
    };
    redefine(vm, &cp).await?;
    crate::faults::point("libvirt-offline-defined");
    let mut servers = Vec::new();
    for ((disk, _), d) in vm.disks.iter().zip(&plan.disks) {
        let (path, format, since) = (disk.source.clone(), disk.format.clone(), d.since.clone());
        let (sock, export) = (socket(&vm.work, &disk.target), disk.target.clone());
        let served = tokio::task::spawn_blocking(move || {
            NbdServer::start_format(&path, &sock, &export, since.as_deref(), &format)
        })
        .await
        .unwrap_or_else(|e| {
            Err(crate::offline::OfflineError::Tool {
                tool: "qemu-nbd",
                path: disk.source.clone(),
                message: e.to_string(),
            })
        });
        servers.push(served.map_err(|source| OfflineError::Serve {
            disk: disk.target.clone(),
            source,
        })?);
    }
    Ok(servers)
}

/// Settles the chain after an offline point (the images released first): `recorded` (the
/// point committed and the state names the new checkpoint), the base is dropped; otherwise
/// the new checkpoint is dropped and the chain stays at the base.
pub async fn settle(vm: &LibvirtVm, mut point: Point, recorded: bool) -> Result<(), LibvirtError> {
    point.release();
    let holds: Vec<bool> = vm.disks.iter().map(|(d, _)| d.has_bitmaps()).collect();
    match (recorded, &point.plan.base) {
        (true, Some(base)) => drop_checkpoint(vm, base, &holds).await,
        (true, None) => Ok(()),
        (false, _) => drop_checkpoint(vm, &point.plan.new, &holds).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmaps(flags: &[(&str, &str)]) -> Vec<BitmapInfo> {
        let list: Vec<String> = flags
            .iter()
            .map(|(name, f)| {
                format!(r#"{{"flags": [{f}], "name": "{name}", "granularity": 65536}}"#)
            })
            .collect();
        let text = format!(
            r#"{{"virtual-size": 8388608, "format-specific": {{"type": "qcow2",
                "data": {{"bitmaps": [{}]}}}}}}"#,
            list.join(",")
        );
        crate::offline::parse_info("sda", Path::new("/x/a.qcow2"), &text)
            .expect("qemu-img's JSON")
            .bitmaps
    }

    #[test]
    fn only_an_enabled_cleanly_closed_bitmap_is_trusted() {
        let bs = bitmaps(&[
            ("rewind-1", r#""auto""#),
            ("rewind-2", ""),
            ("rewind-3", r#""in-use", "auto""#),
        ]);
        assert_eq!(bitmap_problem("rewind-1", "sda", &bs), None);
        let disabled = bitmap_problem("rewind-2", "sda", &bs).expect("disabled");
        assert!(disabled.contains("disabled"), "{disabled}");
        let crashed = bitmap_problem("rewind-3", "sda", &bs).expect("in use");
        assert!(crashed.contains("in use"), "{crashed}");
        let missing = bitmap_problem("rewind-4", "sda", &bs).expect("missing");
        assert!(missing.contains("disk sda lacks"), "{missing}");
        assert!([disabled, crashed, missing]
            .iter()
            .all(|w| w.contains("inconsistent")));
    }
}
