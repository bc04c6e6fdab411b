//! The frozen view of each disk: fleecing images and nodes (a copy-before-write filter or job),
//! the one-instant capture, the bitmap settling after it, the NBD exports, and the teardown.

use super::*;

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
