//! Live QEMU VMs: discover the disks over QMP, capture all of them at one instant with one
//! `transaction` (new dirty bitmap, disabled old bitmap, copy-before-write fleecing), export the
//! frozen view over QEMU's NBD server, and tear everything down afterwards.
//!
//! Bitmap lifecycle (the rule that keeps every change):
//! - a bitmap named `rewind-*` records guest writes since the instant of the last committed
//!   point; each cycle's transaction adds a new one and disables the old ones;
//! - the old bitmaps are removed only after the receiver committed the point; if the cycle fails
//!   they are merged into the new one first, and if the agent dies they are all still there;
//! - so the union of all `rewind-*` bitmaps always covers every write since the last committed
//!   point, and the next cycle reads that union (extra blocks cost a read, never a wrong point);
//! - an inconsistent bitmap (QEMU killed) or none at all means one full read that sends only
//!   chunks the receiver lacks;
//! - the agent's state records the bitmap each capture made; a disk whose bitmaps do not include
//!   it (an older copy of its image put back, a restore) is read in full too: its bitmaps,
//!   however consistent, record writes since some other point.

use crate::qmp::{Qmp, QmpError};
use rewind_proto::report::{chain, Chain};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod cleanup;
mod freeze;
mod views;

pub use cleanup::cleanup;
pub use freeze::*;
pub use views::*;

/// Prefix of every bitmap, node, job and export Rewind creates in a VM.
pub const PREFIX: &str = "rewind-";
/// Longest the guest agent may take to freeze (its fsfreeze hooks run first; past it the point
/// is taken crash-consistent at once), and longest a capture may run under a freeze: writes in
/// the guest block meanwhile.
pub const MAX_FREEZE: Duration = Duration::from_secs(10);
/// Longest a guest write waits for its old data to reach the fleecing image when the cycle
/// uses its own copy-before-write filter ([`Fleecing::Filter`]). Past it, or on any error of
/// that copy (a full fleecing folder), the point breaks and the guest write goes on. 5 s broke
/// points of a real guest on a loaded 2-core host; `blockdev-backup`'s own filter has no limit.
pub const CBW_TIMEOUT_SECS: u64 = 30;

/// One disk of a running VM, as QEMU reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LiveDisk {
    /// The device id (`vda`), else the drive id, else the node name.
    pub name: String,
    /// The block node the device writes to.
    pub node: String,
    /// The drive (BlockBackend) id, for `qemu-io`.
    pub drive: String,
    /// The QOM path of the guest device using the disk (empty if none).
    pub qdev: String,
    pub size: u64,
    /// Bytes the image takes on its host file system.
    pub allocated: u64,
    pub format: String,
    pub file: String,
    #[serde(skip)]
    pub bitmaps: Vec<BitmapInfo>,
}

/// A dirty bitmap on a disk's node.
#[derive(Debug, Clone)]
pub struct BitmapInfo {
    pub name: String,
    pub recording: bool,
    pub inconsistent: bool,
    pub persistent: bool,
}

/// Parses `query-block` into the VM's disks (devices with media; CD-ROMs without are skipped).
pub fn parse_disks(query_block: &Value) -> Vec<LiveDisk> {
    let mut out = Vec::new();
    for dev in query_block.as_array().into_iter().flatten() {
        let Some(ins) = dev.get("inserted") else {
            continue;
        };
        let drive = dev["device"].as_str().unwrap_or_default().to_owned();
        let node = ins["node-name"].as_str().unwrap_or_default().to_owned();
        let qdev = dev["qdev"].as_str().unwrap_or_default();
        let id = qdev
            .strip_prefix("/machine/peripheral/")
            .and_then(|r| r.split('/').next())
            .filter(|s| !s.is_empty());
        let name = id
            .map(str::to_owned)
            .or_else(|| (!drive.is_empty()).then(|| drive.clone()))
            .unwrap_or_else(|| node.clone());
        let bitmaps = ins["dirty-bitmaps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| BitmapInfo {
                name: b["name"].as_str().unwrap_or_default().to_owned(),
                recording: b["recording"].as_bool().unwrap_or(false),
                inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                persistent: b["persistent"].as_bool().unwrap_or(false),
            })
            .collect();
        out.push(LiveDisk {
            name,
            node,
            drive,
            qdev: qdev.to_owned(),
            size: ins["image"]["virtual-size"].as_u64().unwrap_or(0),
            allocated: ins["image"]["actual-size"].as_u64().unwrap_or(0),
            format: ins["image"]["format"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            file: ins["file"].as_str().unwrap_or_default().to_owned(),
            bitmaps,
        });
    }
    out
}

/// The names of this disk's Rewind bitmaps.
pub fn rewind_bitmaps(d: &LiveDisk) -> Vec<&BitmapInfo> {
    d.bitmaps
        .iter()
        .filter(|b| b.name.starts_with(PREFIX))
        .collect()
}

fn fleece_node(disk: &str) -> String {
    format!("{PREFIX}fleece-{disk}")
}

fn cbw_node(disk: &str) -> String {
    format!("{PREFIX}cbw-{disk}")
}

fn snap_node(disk: &str) -> String {
    format!("{PREFIX}snap-{disk}")
}

fn job_id(disk: &str) -> String {
    format!("{PREFIX}job-{disk}")
}

fn export_id(disk: &str) -> String {
    format!("{PREFIX}exp-{disk}")
}

/// Where the cycle's temporary files and socket live.
pub struct Workdir {
    pub dir: PathBuf,
}

impl Workdir {
    pub fn new(state_dir: &Path, vm: &str) -> std::io::Result<Workdir> {
        // QEMU resolves paths from its own working folder: hand it absolute ones.
        let dir = std::path::absolute(state_dir.join("live").join(vm))?;
        std::fs::create_dir_all(&dir)?;
        Ok(Workdir { dir })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    pub fn fleece_file(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("fleece-{disk}.qcow2"))
    }

    /// Present while a full read of `disk` has not committed.
    fn full_marker(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("full-read-{disk}"))
    }
}

/// A disk whose last full read did not commit is read in full again: the bitmap that cycle
/// created records only the writes after its capture, not the ones before it that the full read
/// was to carry (a VM restarted without its bitmap, then a cycle that failed or was killed).
pub fn redo_failed_full_reads(work: &Workdir, caps: &mut [DiskCapture]) {
    for c in caps.iter_mut() {
        if c.read_bitmap.is_some() && work.full_marker(&c.disk.name).exists() {
            c.read_bitmap = None;
            c.full_reason = Some("the last full read did not commit".to_owned());
        }
    }
}

/// Before a capture: marks each disk read in full (durably) until its point commits.
pub fn mark_full_reads(work: &Workdir, caps: &[DiskCapture]) -> std::io::Result<()> {
    let mut any = false;
    for c in caps.iter().filter(|c| c.read_bitmap.is_none()) {
        std::fs::File::create(work.full_marker(&c.disk.name))?.sync_all()?;
        any = true;
    }
    if any {
        std::fs::File::open(&work.dir)?.sync_all()?;
    }
    Ok(())
}

/// After a commit: its full reads are done.
pub fn clear_full_reads(work: &Workdir, caps: &[DiskCapture]) {
    for c in caps {
        let _ = std::fs::remove_file(work.full_marker(&c.disk.name));
    }
}

/// The VM's disks, as QEMU sees them now.
pub async fn discover(qmp: &mut Qmp) -> Result<Vec<LiveDisk>, QmpError> {
    Ok(parse_disks(&qmp.execute("query-block", json!({})).await?))
}

/// How one disk is read this cycle.
#[derive(Debug, Clone)]
pub struct DiskCapture {
    pub disk: LiveDisk,
    /// The disabled bitmap holding every write since the last point, if the cycle reads only
    /// dirty blocks.
    pub read_bitmap: Option<String>,
    /// The bitmap that records from this instant on.
    pub new_bitmap: String,
    /// Older bitmaps to remove after commit (`read_bitmap` among them).
    pub old_bitmaps: Vec<String>,
    /// Why the disk is read in full, if it is.
    pub full_reason: Option<String>,
}

/// Plans each disk: which bitmap to read and which to create. `want_delta[i]` says whether the
/// receiver and our state allow a delta for disk `i`; `chain[i]` is the bitmap the last
/// capture of disk `i` created (`state::chain_bitmap`).
///
/// The disk's bitmaps are trusted only when that bitmap is among them. A consistent `rewind-*`
/// bitmap proves only that QEMU recorded writes since *some* capture of this chain: an older
/// copy of the image (a file-level backup put back, a snapshot reverted) carries a bitmap
/// recording writes since an older point, and a delta read with it against the last point
/// would commit a wrong point whose roots still agree (found by the chain test's stale copy).
pub fn plan(
    disks: &[LiveDisk],
    want_delta: &[bool],
    chain: &[Option<String>],
    stamp: u128,
) -> Vec<DiskCapture> {
    disks
        .iter()
        .zip(want_delta)
        .zip(chain)
        .map(|((d, &delta), chain)| {
            let ours = rewind_bitmaps(d);
            let inconsistent = ours.iter().any(|b| b.inconsistent);
            let old: Vec<String> = ours.iter().map(|b| b.name.clone()).collect();
            let continues = chain.as_ref().is_some_and(|c| old.contains(c));
            let full_reason = if !delta {
                Some("no base point for this disk at this size".to_owned())
            } else if inconsistent {
                Some("bitmap inconsistent (QEMU stopped uncleanly)".to_owned())
            } else if ours.is_empty() {
                Some("no dirty bitmap (first cycle, or VM restarted without it)".to_owned())
            } else if !continues {
                Some(format!(
                    "the disk's dirty bitmaps do not continue the last point (it has {}, the \
                     last capture made {}): the disk was replaced or restored",
                    old.join(", "),
                    chain.as_deref().unwrap_or("none that the agent recorded")
                ))
            } else {
                None
            };
            DiskCapture {
                disk: d.clone(),
                read_bitmap: if full_reason.is_none() {
                    old.first().cloned()
                } else {
                    None
                },
                new_bitmap: format!("{PREFIX}{stamp}"),
                old_bitmaps: old,
                full_reason,
            }
        })
        .collect()
}

/// Removes inconsistent bitmaps (they can only be removed), before a capture.
pub async fn drop_inconsistent(qmp: &mut Qmp, caps: &mut [DiskCapture]) -> Result<(), QmpError> {
    for c in caps.iter_mut() {
        let bad: Vec<String> = rewind_bitmaps(&c.disk)
            .iter()
            .filter(|b| b.inconsistent)
            .map(|b| b.name.clone())
            .collect();
        for b in &bad {
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": c.disk.node, "name": b}),
            )
            .await?;
        }
        c.disk.bitmaps.retain(|b| !bad.contains(&b.name));
        c.old_bitmaps.retain(|b| !bad.contains(b));
    }
    Ok(())
}

/// The VM's configuration as QEMU reports it, kept with each point so a restore can recreate it.
pub async fn vm_config(qmp: &mut Qmp, disks: &[LiveDisk]) -> Result<Value, QmpError> {
    let name = qmp.execute("query-name", json!({})).await?;
    let memory = qmp
        .execute("query-memory-size-summary", json!({}))
        .await
        .ok();
    let cpus = qmp.execute("query-cpus-fast", json!({})).await.ok();
    let machine = qmp.execute("query-target", json!({})).await.ok();
    Ok(json!({
        "source": "qemu",
        "name": name.get("name"),
        "memory_bytes": memory.as_ref().and_then(|m| m.get("base-memory")),
        "cpus": cpus.as_ref().and_then(Value::as_array).map(Vec::len),
        "arch": machine.as_ref().and_then(|m| m.get("arch")),
        "disks": disks.iter().map(|d| json!({
            "name": d.name, "drive": d.drive, "node": d.node, "format": d.format,
            "size": d.size, "file": d.file})).collect::<Vec<_>>(),
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A helper program failed.
    #[error("{0}")]
    Tool(String),
    /// The fleecing folder could fill up during a capture that would then fail guest writes.
    #[error(
        "the fleecing folder {} has {} MiB free, and capturing these disks at one instant \
         may need {} MiB there: free space there, or give the VM a guest agent (frozen file \
         systems let each disk be captured with a filter that cannot fail the guest)",
        dir.display(), free >> 20, need >> 20
    )]
    NoRoom { dir: PathBuf, free: u64, need: u64 },
    /// Another tool's NBD server runs in this VM.
    #[error("an NBD server not started by Rewind is running in this VM; stop it or retry later")]
    NbdBusy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_disks_by_device_id_then_drive_then_node() {
        let q = json!([
            {"device": "drive0", "qdev": "/machine/peripheral/vda/virtio-backend",
             "inserted": {"node-name": "disk0", "image": {"virtual-size": 1024, "format": "qcow2"},
                          "file": "a.qcow2",
                          "dirty-bitmaps": [{"name": "rewind-1", "recording": true, "persistent": true}]}},
            {"device": "drive1", "qdev": "/machine/unattached/device[5]",
             "inserted": {"node-name": "#block1", "image": {"virtual-size": 2048, "format": "raw"}}},
            {"device": "", "qdev": "", "inserted": {"node-name": "n2", "image": {"virtual-size": 1, "format": "raw"}}},
            {"device": "cd0", "qdev": "/machine/peripheral/cd/x"}
        ]);
        let d = parse_disks(&q);
        let names: Vec<&str> = d.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["vda", "drive1", "n2"]);
        assert_eq!(d[0].size, 1024);
        assert_eq!(rewind_bitmaps(&d[0]).len(), 1);
    }

    #[test]
    fn plans_full_reads_when_the_bitmap_cannot_be_trusted() {
        let mk = |bitmaps: Vec<BitmapInfo>| LiveDisk {
            name: "vda".into(),
            node: "n".into(),
            drive: "d".into(),
            qdev: String::new(),
            size: 1,
            allocated: 0,
            format: "qcow2".into(),
            file: String::new(),
            bitmaps,
        };
        let b = |name: &str, inconsistent| BitmapInfo {
            name: name.into(),
            recording: true,
            inconsistent,
            persistent: true,
        };
        let caps = plan(
            &[
                mk(vec![
                    b("rewind-1", false),
                    b("rewind-2", false),
                    b("other", false),
                ]),
                mk(vec![b("rewind-1", true)]),
                mk(vec![]),
                mk(vec![b("rewind-1", false)]),
            ],
            &[true, true, true, false],
            &[Some("rewind-2".into()), None, None, Some("rewind-1".into())],
            9,
        );
        assert_eq!(caps[0].read_bitmap.as_deref(), Some("rewind-1"));
        assert_eq!(caps[0].old_bitmaps, ["rewind-1", "rewind-2"]);
        assert_eq!(caps[0].new_bitmap, "rewind-9");
        assert!(caps[1]
            .full_reason
            .as_deref()
            .is_some_and(|r| r.contains("inconsistent")));
        assert!(caps[2].full_reason.is_some());
        assert!(caps[3].full_reason.is_some() && caps[3].read_bitmap.is_none());
    }

    #[test]
    fn a_bitmap_that_does_not_continue_the_last_capture_is_not_trusted() {
        let disk = LiveDisk {
            name: "vda".into(),
            node: "n".into(),
            drive: "d".into(),
            qdev: String::new(),
            size: 1,
            allocated: 0,
            format: "qcow2".into(),
            file: String::new(),
            bitmaps: vec![BitmapInfo {
                name: "rewind-5".into(),
                recording: true,
                inconsistent: false,
                persistent: true,
            }],
        };
        let disks = [disk.clone(), disk.clone(), disk];
        let chain = [Some("rewind-5".into()), Some("rewind-7".into()), None];
        let caps = plan(&disks, &[true, true, true], &chain, 9);
        assert_eq!(caps[0].read_bitmap.as_deref(), Some("rewind-5"));
        for stale in &caps[1..] {
            assert!(stale.read_bitmap.is_none());
            assert!(stale
                .full_reason
                .as_deref()
                .is_some_and(|r| r.contains("do not continue")));
            // The stale bitmap goes once the full read commits.
            assert_eq!(stale.old_bitmaps, ["rewind-5"]);
        }
    }
}
