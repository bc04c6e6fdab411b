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

/// Removes every export, job and fleecing node a previous (possibly killed) cycle left, and
/// stops our NBD server. Bitmaps are kept: they hold changes. Returns what it removed.
pub async fn cleanup(qmp: &mut Qmp, work: &Workdir) -> Result<Vec<String>, QmpError> {
    let mut removed = Vec::new();
    let exports = qmp.execute("query-block-exports", json!({})).await?;
    for e in exports.as_array().into_iter().flatten() {
        if let Some(id) = e["id"].as_str().filter(|i| i.starts_with(PREFIX)) {
            qmp.execute("block-export-del", json!({"id": id, "mode": "hard"}))
                .await?;
            removed.push(format!("export {id}"));
        }
    }
    wait_gone(qmp, "query-block-exports", "id").await?;
    let jobs = qmp.execute("query-block-jobs", json!({})).await?;
    for j in jobs.as_array().into_iter().flatten() {
        if let Some(id) = j["device"].as_str().filter(|i| i.starts_with(PREFIX)) {
            qmp.execute("block-job-cancel", json!({"device": id, "force": true}))
                .await?;
            removed.push(format!("job {id}"));
        }
    }
    wait_gone(qmp, "query-block-jobs", "device").await?;
    // Parents before children: the snapshot reads through the filter; the device goes back to
    // its disk (the filter unshares writes on the disk while a snapshot reads through it); the
    // filter writes to the fleecing image. A device still on our filter is one whose agent died
    // mid-cycle.
    del_nodes(qmp, "snap-", &mut removed).await?;
    for (qdev, node) in filtered_devices(qmp).await? {
        qmp.execute(
            "qom-set",
            json!({"path": qdev, "property": "drive", "value": node}),
        )
        .await?;
        removed.push(format!("filter under {qdev}"));
    }
    del_nodes(qmp, "cbw-", &mut removed).await?;
    del_nodes(qmp, "fleece-", &mut removed).await?;
    if work.socket().exists() {
        match qmp.execute("nbd-server-stop", json!({})).await {
            Ok(_) => removed.push("nbd server".into()),
            Err(QmpError::Command { .. }) => {}
            Err(e) => return Err(e),
        }
        let _ = std::fs::remove_file(work.socket());
    }
    if let Ok(rd) = std::fs::read_dir(&work.dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("fleece-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(removed)
}

/// Deletes every node named `rewind-KIND*`.
async fn del_nodes(qmp: &mut Qmp, kind: &str, removed: &mut Vec<String>) -> Result<(), QmpError> {
    let prefix = format!("{PREFIX}{kind}");
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let mut ours: Vec<String> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    ours.sort();
    ours.dedup();
    for n in ours {
        qmp.execute("blockdev-del", json!({"node-name": n})).await?;
        removed.push(format!("node {n}"));
    }
    Ok(())
}

async fn wait_gone(qmp: &mut Qmp, query: &str, key: &str) -> Result<(), QmpError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = qmp.execute(query, json!({})).await?;
        let left = list
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v[key].as_str().is_some_and(|s| s.starts_with(PREFIX)));
        if !left {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(QmpError::Timeout(format!("{query} still lists {PREFIX}*")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The devices whose drive is one of our copy-before-write filters, with the node each one
/// wrote to before (the filter's `file` child).
async fn filtered_devices(qmp: &mut Qmp) -> Result<Vec<(String, String)>, QmpError> {
    let cbw = format!("{PREFIX}cbw-");
    let blocks = qmp.execute("query-block", json!({})).await?;
    let filtered: Vec<(String, String)> = blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let node = b["inserted"]["node-name"].as_str()?;
            let qdev = b["qdev"].as_str().filter(|q| !q.is_empty())?;
            node.starts_with(&cbw)
                .then(|| (qdev.to_owned(), node.to_owned()))
        })
        .collect();
    if filtered.is_empty() {
        return Ok(Vec::new());
    }
    let graph = qmp.execute("x-debug-query-block-graph", json!({})).await?;
    let name_of = |id: &Value| {
        graph["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| &n["id"] == id)
            .and_then(|n| n["name"].as_str())
    };
    let mut out = Vec::new();
    for (qdev, filter) in filtered {
        let child = graph["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "file" && name_of(&e["parent"]) == Some(filter.as_str()))
            .and_then(|e| name_of(&e["child"]));
        match child {
            Some(node) => out.push((qdev, node.to_owned())),
            None => {
                return Err(QmpError::Timeout(format!(
                    "cannot find the disk under filter {filter}"
                )))
            }
        }
    }
    Ok(out)
}

/// How a cycle holds its frozen view of the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fleecing {
    /// Our own copy-before-write filter on each disk, with `on-cbw-error=break-snapshot` and
    /// [`CBW_TIMEOUT_SECS`]: a fleecing image that fills up or stalls breaks the point (its
    /// reads fail), never a guest write. Each disk is captured when its filter goes in, so this
    /// serves one disk, or several whose file systems the guest agent froze.
    Filter,
    /// One `transaction` of `blockdev-backup` jobs: every disk at one instant, but a copy that
    /// fails would fail the guest's write, so it runs only when the fleecing folder has room
    /// for everything the disks hold (see [`check_room`]).
    Job,
}

impl Fleecing {
    /// Filter when it keeps the point one instant across disks; Job otherwise.
    pub fn choose(caps: &[DiskCapture], frozen: bool) -> Fleecing {
        let devices = caps.iter().all(|c| !c.disk.qdev.is_empty());
        if devices && (caps.len() == 1 || frozen) {
            Fleecing::Filter
        } else {
            Fleecing::Job
        }
    }
}

/// The most a copy-before-write job can write to a disk's fleecing image: every allocated byte,
/// plus qcow2 tables (8 bytes per 64 KiB cluster) and headers.
fn fleece_bound(d: &LiveDisk) -> u64 {
    d.allocated
        .saturating_add(d.size / 8192)
        .saturating_add(1 << 20)
}

/// Refuses a [`Fleecing::Job`] capture before it touches the guest when the fleecing folder
/// could fill up during it.
pub fn check_room(work: &Workdir, caps: &[DiskCapture]) -> Result<(), LiveError> {
    let need: u64 = caps.iter().map(|c| fleece_bound(&c.disk)).sum();
    let st = rustix::fs::statvfs(&work.dir)
        .map_err(|e| LiveError::Tool(format!("statvfs {}: {e}", work.dir.display())))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < need {
        return Err(LiveError::NoRoom {
            dir: work.dir.clone(),
            free,
            need,
        });
    }
    Ok(())
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

/// Longest one `guest-fsfreeze-thaw` or `guest-fsfreeze-status` may take. The guest agent
/// serves commands in order, so a thaw queued behind a freeze whose hooks still run answers
/// only once they end: past this bound the thaw goes on in the background ([`keep_thawing`]).
pub const THAW_TIMEOUT: Duration = Duration::from_secs(5);
/// The pauses between attempts of [`keep_thawing`] (about 3 minutes in all): a freeze that
/// timed out may still freeze the guest when its hooks end, so thaws go on until the guest
/// agent says `thawed`, or this runs out (then the next cycle thaws, see [`Freezer::freeze`]).
pub const THAW_RETRY_PAUSES_SECS: [u64; 12] = [1, 2, 4, 8, 15, 15, 15, 15, 30, 30, 30, 30];
/// Longest [`keep_thawing`] runs: its pauses, and each of its attempts bounded by the
/// guest-sync (5 s), thaw and status limits.
pub const KEEP_THAWING_MAX: Duration = {
    let mut secs = (THAW_RETRY_PAUSES_SECS.len() as u64 + 1) * (5 + 2 * THAW_TIMEOUT.as_secs());
    let mut i = 0;
    while i < THAW_RETRY_PAUSES_SECS.len() {
        secs += THAW_RETRY_PAUSES_SECS[i];
        i += 1;
    }
    Duration::from_secs(secs)
};
/// Longest a cycle stays between "about to freeze" and "thawed or handed to [`keep_thawing`]":
/// the status checks and the recovery thaw, the freeze, the capture under it and the thaw.
/// A stopping agent waits this long at most for a cycle to thaw what it froze.
pub const FREEZE_PHASE_MAX: Duration = Duration::from_secs(
    3 * THAW_TIMEOUT.as_secs() + 2 * MAX_FREEZE.as_secs() + 2 * THAW_TIMEOUT.as_secs(),
);

/// The file that says this agent froze the guest's file systems and has not seen them thawed
/// since. It is written before the freeze is sent, so an agent killed at any point after
/// leaves it; the next cycle thaws a freeze it finds only when this file is there, so a freeze
/// another tool holds is never thawed by us.
pub fn freeze_marker(work: &Workdir) -> PathBuf {
    work.dir.join("guest-frozen-by-rewind")
}

/// What the guest agent says of its file systems (`guest-fsfreeze-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// What [`Freezer::freeze`] achieved.
#[derive(Debug)]
pub enum FreezeOutcome {
    /// This many file systems (at least one) are frozen by us: thaw them after the capture.
    Frozen(u64),
    /// Nothing of ours is frozen (the reason says why): the point is crash-consistent.
    NotFrozen(String),
    /// The freeze timed out or its answer was lost: the guest agent may still freeze (its hooks
    /// run), so the caller hands the path to [`keep_thawing`]. The point is crash-consistent.
    Unsure(String),
}

/// Freezes and thaws guest file systems through the QEMU guest agent.
pub struct Freezer {
    qga: Qmp,
    path: PathBuf,
    marker: PathBuf,
}

impl Freezer {
    /// Connects to the guest agent at `path`; `marker` is [`freeze_marker`] of the VM.
    pub async fn connect(path: &Path, marker: PathBuf) -> Result<Freezer, QmpError> {
        Ok(Freezer {
            qga: Qmp::connect_guest_agent(path).await?,
            path: path.to_owned(),
            marker,
        })
    }

    /// The guest agent's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The freeze marker this freezer writes.
    pub fn marker(&self) -> &Path {
        &self.marker
    }

    async fn bounded(&mut self, command: &str, limit: Duration) -> Result<Value, QmpError> {
        tokio::time::timeout(limit, self.qga.execute(command, json!({})))
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))?
    }

    /// `guest-fsfreeze-status`, within [`THAW_TIMEOUT`].
    pub async fn status(&mut self) -> Result<FreezeStatus, QmpError> {
        status(&mut self.qga, &self.path).await
    }

    /// Freezes the guest's file systems, only when they are not frozen already:
    /// - frozen, with our marker there: an agent killed between freeze and thaw left them so;
    ///   they are thawed first (and the marker removed);
    /// - frozen, without our marker: another tool holds the freeze; we neither freeze nor thaw;
    /// - a freeze that reports 0 file systems frozen is thawed and is no freeze at all;
    /// - the freeze waits at most [`MAX_FREEZE`] (the guest's fsfreeze hooks run before it
    ///   answers); past that the outcome is [`FreezeOutcome::Unsure`] and this connection is
    ///   useless (its late answer would be taken for the next one's).
    ///
    /// Errors only when the guest agent does not answer the status check: then nothing was sent
    /// that could freeze the guest.
    pub async fn freeze(&mut self) -> Result<FreezeOutcome, QmpError> {
        let mut status = self.status().await?;
        if self.marker.exists() {
            if status == FreezeStatus::Frozen {
                tracing::warn!(
                    guest_agent = %self.path.display(),
                    "the guest's file systems are still frozen by an earlier run of the agent \
                     (killed between freeze and thaw): thawing them"
                );
                if let Err(e) = self.bounded("guest-fsfreeze-thaw", THAW_TIMEOUT).await {
                    return Ok(FreezeOutcome::Unsure(format!(
                        "thawing the freeze an earlier run left: {}",
                        chain(&e)
                    )));
                }
                status = self.status().await?;
            }
            if status == FreezeStatus::Thawed {
                remove_marker(&self.marker);
            }
        }
        if status == FreezeStatus::Frozen {
            return Ok(FreezeOutcome::NotFrozen(
                "the guest's file systems are already frozen by another tool: leaving that \
                 freeze alone"
                    .into(),
            ));
        }
        // Before the freeze goes out: from here on a killed agent may leave the guest frozen.
        if let Err(e) = std::fs::write(&self.marker, b"") {
            return Ok(FreezeOutcome::NotFrozen(format!(
                "cannot write the freeze marker {}: {e}",
                self.marker.display()
            )));
        }
        match self.bounded("guest-fsfreeze-freeze", MAX_FREEZE).await {
            Ok(n) => match n.as_u64().unwrap_or(0) {
                0 => {
                    // The guest agent counts itself frozen even with nothing frozen.
                    match self.bounded("guest-fsfreeze-thaw", THAW_TIMEOUT).await {
                        Ok(_) => {
                            remove_marker(&self.marker);
                            Ok(FreezeOutcome::NotFrozen(
                                "the guest agent froze no file system".into(),
                            ))
                        }
                        Err(e) => Ok(FreezeOutcome::Unsure(format!(
                            "froze no file system, then the thaw failed: {}",
                            chain(&e)
                        ))),
                    }
                }
                n => Ok(FreezeOutcome::Frozen(n)),
            },
            // The guest agent thaws what it froze when a freeze fails; the status says whether
            // it did, so that case too goes through the thaw-until-thawed path.
            Err(QmpError::Timeout(_)) => Ok(FreezeOutcome::Unsure(format!(
                "the guest agent did not answer the freeze within {} s (slow fsfreeze hooks?)",
                MAX_FREEZE.as_secs()
            ))),
            Err(e) => Ok(FreezeOutcome::Unsure(format!(
                "the freeze failed: {}",
                chain(&e)
            ))),
        }
    }

    /// Thaws what [`Freezer::freeze`] froze, within [`THAW_TIMEOUT`], and removes the marker.
    /// On an error the caller hands the path to [`keep_thawing`].
    pub async fn thaw(mut self) -> Result<(), QmpError> {
        self.bounded("guest-fsfreeze-thaw", THAW_TIMEOUT).await?;
        remove_marker(&self.marker);
        Ok(())
    }
}

async fn status(qga: &mut Qmp, path: &Path) -> Result<FreezeStatus, QmpError> {
    let v = tokio::time::timeout(
        THAW_TIMEOUT,
        qga.execute("guest-fsfreeze-status", json!({})),
    )
    .await
    .map_err(|_| QmpError::Timeout("guest-fsfreeze-status".into()))??;
    match v.as_str() {
        Some("thawed") => Ok(FreezeStatus::Thawed),
        Some("frozen") => Ok(FreezeStatus::Frozen),
        _ => Err(QmpError::Protocol {
            path: path.display().to_string(),
            message: format!("guest-fsfreeze-status returned {v}"),
        }),
    }
}

fn remove_marker(marker: &Path) {
    if let Err(e) = std::fs::remove_file(marker) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(marker = %marker.display(), error = %e, "cannot remove the freeze marker");
        }
    }
}

/// Sends `guest-fsfreeze-thaw` over fresh connections (each attempt bounded by the guest-sync
/// and [`THAW_TIMEOUT`] limits), pausing by [`THAW_RETRY_PAUSES_SECS`], until
/// `guest-fsfreeze-status` says `thawed`; then removes `marker`. Returns whether it got there.
/// Giving up leaves the marker, so the next cycle thaws the freeze it finds.
pub async fn keep_thawing(path: &Path, marker: &Path) -> bool {
    let attempt = || async {
        let mut qga = Qmp::connect_guest_agent(path).await?;
        let thawed =
            tokio::time::timeout(THAW_TIMEOUT, qga.execute("guest-fsfreeze-thaw", json!({})))
                .await
                .map_err(|_| QmpError::Timeout("guest-fsfreeze-thaw".into()))?;
        // A thaw of nothing frozen fails in some guest agents: the status decides.
        if let Err(e) = thawed {
            tracing::debug!(error = %Chain(&e), "guest-fsfreeze-thaw");
        }
        status(&mut qga, path).await
    };
    let started = Instant::now();
    for (i, pause) in std::iter::once(0).chain(THAW_RETRY_PAUSES_SECS).enumerate() {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        match attempt().await {
            Ok(FreezeStatus::Thawed) => {
                remove_marker(marker);
                tracing::info!(
                    attempt = i + 1,
                    seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "guest file systems thawed"
                );
                return true;
            }
            Ok(FreezeStatus::Frozen) => {
                tracing::warn!(
                    attempt = i + 1,
                    "guest file systems still frozen; retrying the thaw"
                )
            }
            Err(e) => {
                tracing::warn!(attempt = i + 1, error = %Chain(&e), "guest thaw not confirmed yet; retrying")
            }
        }
    }
    tracing::error!(
        guest_agent = %path.display(),
        seconds = format!("{:.0}", started.elapsed().as_secs_f64()),
        "gave up thawing the guest's file systems; the next cycle thaws them"
    );
    false
}

/// Creates each disk's empty fleecing image. Outside the capture (and before any guest
/// freeze): spawning `qemu-img` is the slowest step, and nothing of it touches the VM.
pub async fn create_fleece_files(work: &Workdir, caps: &[DiskCapture]) -> Result<(), LiveError> {
    for c in caps {
        let file = work.fleece_file(&c.disk.name);
        let _ = std::fs::remove_file(&file);
        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&file)
            .arg(c.disk.size.to_string())
            .output()
            .await
            .map_err(|e| LiveError::Tool(format!("qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(LiveError::Tool(format!(
                "qemu-img create {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// Adds each disk's fleecing node (and, for [`Fleecing::Filter`], its copy-before-write filter,
/// not yet in the guest's path) before any freeze: opening images is the slow part of a
/// capture, and none of it fixes the point's instant. [`capture`] does.
pub async fn add_views(
    qmp: &mut Qmp,
    work: &Workdir,
    caps: &[DiskCapture],
    mode: Fleecing,
) -> Result<(), LiveError> {
    for c in caps {
        let file = work.fleece_file(&c.disk.name);
        let mut fleece = json!({"driver": "qcow2", "node-name": fleece_node(&c.disk.name),
               "file": {"driver": "file", "filename": file.display().to_string()}});
        if mode == Fleecing::Job {
            // The job's view is the fleecing image over the live disk.
            fleece["backing"] = json!(c.disk.node);
        }
        qmp.execute("blockdev-add", fleece).await?;
    }
    if mode == Fleecing::Filter {
        // A filter outside the guest's path intercepts nothing yet: the view it holds starts
        // when `capture` puts it in the path.
        for c in caps {
            qmp.execute(
                "blockdev-add",
                json!({"driver": "copy-before-write", "node-name": cbw_node(&c.disk.name),
                       "file": c.disk.node, "target": fleece_node(&c.disk.name),
                       "on-cbw-error": "break-snapshot", "cbw-timeout": CBW_TIMEOUT_SECS}),
            )
            .await?;
        }
    }
    Ok(())
}

/// Removes what [`add_views`] added (no view is held yet): when the mode changes after the
/// freeze failed.
pub async fn remove_views(
    qmp: &mut Qmp,
    caps: &[DiskCapture],
    mode: Fleecing,
) -> Result<(), LiveError> {
    for c in caps {
        if mode == Fleecing::Filter {
            qmp.execute("blockdev-del", json!({"node-name": cbw_node(&c.disk.name)}))
                .await?;
        }
        qmp.execute(
            "blockdev-del",
            json!({"node-name": fleece_node(&c.disk.name)}),
        )
        .await?;
    }
    Ok(())
}

/// The point's instant, over the views [`add_views`] added (their fleecing images made by
/// [`create_fleece_files`]). By `mode`, either one transaction that adds the new bitmaps,
/// disables (and merges) the old ones and starts the copy-before-write jobs, or our own
/// filters, in three steps:
/// 1. add the new bitmaps (old and new both record from here on);
/// 2. put each disk's filter in the guest's path: the disk's view is held from that instant;
/// 3. disable (and merge) the old bitmaps: [`settle`], after any thaw.
///
/// A write before step 2 is in the view and in the old bitmap (read now); a write between 2
/// and 3 is in both bitmaps but not in the view (read now, unchanged, and again next cycle);
/// a write after 3 is only in the new bitmap. So every point is exactly the view it read. Only
/// steps 1 and 2 run under a guest freeze.
pub async fn capture(
    qmp: &mut Qmp,
    work: &Workdir,
    caps: &[DiskCapture],
    mode: Fleecing,
) -> Result<(), LiveError> {
    let add: Vec<_> = caps
        .iter()
        .map(|c| {
            json!({"type": "block-dirty-bitmap-add", "data": {
            "node": c.disk.node, "name": c.new_bitmap,
            "persistent": c.disk.format == "qcow2"}})
        })
        .collect();
    match mode {
        Fleecing::Job => {
            check_room(work, caps)?;
            let mut actions = add;
            actions.extend(settle_actions(caps));
            for c in caps {
                actions.push(json!({"type": "blockdev-backup", "data": {
                    "device": c.disk.node, "target": fleece_node(&c.disk.name), "sync": "none",
                    "job-id": job_id(&c.disk.name),
                    "filter-node-name": format!("{PREFIX}job-filter-{}", c.disk.name)}}));
            }
            qmp.execute("transaction", json!({"actions": actions}))
                .await?;
        }
        Fleecing::Filter => {
            qmp.execute("transaction", json!({"actions": add})).await?;
            for c in caps {
                qmp.execute(
                    "qom-set",
                    json!({"path": c.disk.qdev, "property": "drive",
                           "value": cbw_node(&c.disk.name)}),
                )
                .await?;
            }
            // The views to read (snapshot-access nodes) are added by [`export`], after any
            // guest thaw: the held view is fixed already.
        }
    }
    Ok(())
}

/// With [`Fleecing::Filter`], after the instant (and any thaw): stops the old bitmaps and merges
/// them into the one the cycle reads. Writes between the instant and this step are recorded
/// by the old bitmaps too, so they are read once more (from the held view): never missed.
pub async fn settle(qmp: &mut Qmp, caps: &[DiskCapture], mode: Fleecing) -> Result<(), LiveError> {
    let actions = settle_actions(caps);
    if mode == Fleecing::Filter && !actions.is_empty() {
        qmp.execute("transaction", json!({"actions": actions}))
            .await?;
    }
    Ok(())
}

/// Disables our recording bitmaps of each disk and merges the others into the one it reads.
fn settle_actions(caps: &[DiskCapture]) -> Vec<serde_json::Value> {
    let mut settle = Vec::new();
    for c in caps {
        let node = &c.disk.node;
        for b in rewind_bitmaps(&c.disk) {
            if b.recording && !b.inconsistent {
                settle.push(json!({"type": "block-dirty-bitmap-disable",
                    "data": {"node": node, "name": b.name}}));
            }
        }
        if let Some(target) = &c.read_bitmap {
            let others: Vec<&String> = c.old_bitmaps.iter().filter(|b| *b != target).collect();
            if !others.is_empty() {
                settle.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                    "node": node, "target": target, "bitmaps": others}}));
            }
        }
    }
    settle
}

/// Starts our NBD server and exports each disk's held view (with its bitmap); with our
/// filters, first adds the snapshot-access nodes that read those views.
pub async fn export(
    qmp: &mut Qmp,
    work: &Workdir,
    caps: &[DiskCapture],
    mode: Fleecing,
) -> Result<(), LiveError> {
    let sock = work.socket();
    let _ = std::fs::remove_file(&sock);
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.display().to_string()}}}),
    )
    .await
    .map_err(|e| match e {
        QmpError::Command { desc, .. } if desc.contains("already running") => LiveError::NbdBusy,
        e => LiveError::Qmp(e),
    })?;
    if mode == Fleecing::Filter {
        for c in caps {
            qmp.execute(
                "blockdev-add",
                json!({"driver": "snapshot-access", "node-name": snap_node(&c.disk.name),
                       "file": cbw_node(&c.disk.name)}),
            )
            .await?;
        }
    }
    for c in caps {
        let view = match mode {
            Fleecing::Filter => snap_node(&c.disk.name),
            Fleecing::Job => fleece_node(&c.disk.name),
        };
        let mut args = json!({"type": "nbd", "id": export_id(&c.disk.name),
            "node-name": view, "name": c.disk.name});
        if let Some(b) = &c.read_bitmap {
            args["bitmaps"] = json!([{"node": c.disk.node, "name": b}]);
        }
        qmp.execute("block-export-add", args).await?;
    }
    Ok(())
}

/// Ends a cycle: removes exports, jobs and nodes, then settles the bitmaps. After a commit the
/// old bitmaps go; otherwise they are first merged into the new one, so no change is lost.
pub async fn finish(
    qmp: &mut Qmp,
    work: &Workdir,
    caps: &[DiskCapture],
    committed: bool,
) -> Result<(), LiveError> {
    if !committed {
        // Before the fleecing images go: a full folder is the usual reason a view broke.
        if let Ok(st) = rustix::fs::statvfs(&work.dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            if free < 1 << 20 {
                tracing::warn!(
                    folder = %work.dir.display(),
                    free,
                    "the fleecing folder is full: this point's view of the disks broke (the \
                     guest's writes went on unharmed); free space there"
                );
            }
        }
    }
    cleanup(qmp, work).await?;
    if committed {
        clear_full_reads(work, caps);
    }
    for c in caps {
        let old: Vec<&String> = c
            .old_bitmaps
            .iter()
            .filter(|b| {
                !c.disk
                    .bitmaps
                    .iter()
                    .any(|x| &x.name == *b && x.inconsistent)
            })
            .collect();
        if !committed && !old.is_empty() {
            qmp.execute(
                "block-dirty-bitmap-merge",
                json!({"node": c.disk.node, "target": c.new_bitmap, "bitmaps": old}),
            )
            .await?;
        }
        for b in &c.old_bitmaps {
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": c.disk.node, "name": b}),
            )
            .await?;
        }
    }
    Ok(())
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
