//! The disk being rolled back: refused while a running QEMU holds it, opened directly (raw
//! files and devices) or through one writable `qemu-nbd` (qcow2 images, which also exports our
//! dirty bitmaps so that only the blocks they name need comparing).

use super::apply::Writer;
use super::RollbackError;
use crate::nbd::{self, NbdClient};
use crate::offline::{NbdServer, OfflineError};
use crate::scan::{BlockSource, ScanPlan};
use crate::source::RawDisk;
use crate::state;
use crate::sync::{DiskKind, DiskSource};
use rewind_proto::format::DiskGeometry;
use rewind_proto::report::Chain;
use std::path::Path;

/// A disk opened for rollback: a reader and a way to write blocks.
pub(super) enum Target {
    Raw {
        disk: RawDisk,
        file: std::fs::File,
        is_device: bool,
    },
    Nbd {
        client: NbdClient,
        /// Kept for the other handles it serves; stopped (bitmaps written) when dropped.
        server: NbdServer,
    },
}

impl Target {
    /// The blocks a full compare reads: those that may hold data (the rest reads as zeros).
    pub(super) fn plan(&mut self, g: &DiskGeometry) -> Result<ScanPlan, RollbackError> {
        Ok(match self {
            Target::Raw { disk, .. } => ScanPlan::full(&disk.data_extents()?, g),
            Target::Nbd { client, .. } => {
                let data: Vec<(u64, u64)> = client
                    .block_status("base:allocation", 0, g.size)?
                    .into_iter()
                    .filter(|e| e.flags & nbd::STATE_ZERO == 0)
                    .map(|e| (e.offset, e.offset + e.length))
                    .collect();
                ScanPlan::full(&data, g)
            }
        })
    }

    pub(super) fn size(&self) -> u64 {
        match self {
            Target::Raw { disk, .. } => disk.size(),
            Target::Nbd { client, .. } => client.size(),
        }
    }

    /// A second reader of the same disk (another handle, or another NBD connection to the
    /// same qemu-nbd, which serves several), for reading back while writing.
    pub(super) fn second_reader(
        &self,
        export: &str,
    ) -> Result<Box<dyn BlockSource + Send>, RollbackError> {
        Ok(match self {
            Target::Raw { disk, .. } => Box::new(disk.try_clone()?),
            Target::Nbd { server, .. } => Box::new(NbdClient::connect_unix(
                &server.socket,
                export,
                &["base:allocation"],
            )?),
        })
    }

    /// A handle for writing (see [`Writer`]).
    pub(super) fn writer(&self, export: &str) -> Result<Writer, RollbackError> {
        Ok(match self {
            Target::Raw {
                disk,
                file,
                is_device,
            } => Writer::Raw {
                file: file.try_clone().map_err(disk_io(disk.path()))?,
                path: disk.path().to_owned(),
                is_device: *is_device,
            },
            Target::Nbd { server, .. } => {
                Writer::Nbd(NbdClient::connect_unix(&server.socket, export, &[])?)
            }
        })
    }

    pub(super) fn source(&mut self) -> &mut dyn BlockSource {
        match self {
            Target::Raw { disk, .. } => disk,
            Target::Nbd { client, .. } => client,
        }
    }
}

pub(super) fn disk_io(path: &Path) -> impl FnOnce(std::io::Error) -> RollbackError + '_ {
    move |source| RollbackError::DiskIo {
        path: path.to_owned(),
        source,
    }
}

/// Block ranges `[first, end)`.
type Ranges = Vec<(u64, u64)>;

/// Size and block size of the agent's last committed point of a disk.
type Geometry = (u64, u64);

/// The blocks an offline qcow2 image's `rewind-*` bitmaps say were written since the agent's
/// last committed point, read with the disk geometry of that point.
pub(super) struct Dirty {
    pub geometry: Geometry,
    /// In order, not overlapping.
    pub blocks: Ranges,
}

/// Opens a disk for rollback: refuses one a running QEMU holds, and for a qcow2 image starts
/// one writable `qemu-nbd` that also exports our dirty bitmaps and reads which blocks they
/// name (`None` when they cannot be trusted: missing, in use, or no committed base). Runs
/// while the point's first leaves arrive.
pub(super) fn open_disk(
    d: &DiskSource,
    state_dir: &Path,
    vm: &str,
) -> Result<(Target, Option<Dirty>), RollbackError> {
    if d.kind == DiskKind::Raw {
        ensure_not_in_use(d)?;
        return Ok((open_raw(d)?, None));
    }
    let (ours, base_geometry) = trusted_bitmaps(d, state_dir, vm)?;
    let dir =
        std::path::absolute(state_dir.join("rollback").join(vm)).map_err(disk_io(state_dir))?;
    std::fs::create_dir_all(&dir).map_err(disk_io(&dir))?;
    let socket = dir.join(format!("{}.sock", d.name));
    if let Some((size, bs)) = base_geometry.filter(|&(_, bs)| bs > 0) {
        // A bitmap qemu-nbd will not export, or whose context it does not grant, only costs
        // the shortcut: the disk is then read whole.
        match open_with_bitmaps(d, &socket, &ours, bs) {
            Err(e @ RollbackError::InUse(..)) => return Err(e),
            Ok((server, client, blocks)) => {
                let dirty = Dirty {
                    geometry: (size, bs),
                    blocks,
                };
                return Ok((Target::Nbd { client, server }, Some(dirty)));
            }
            Err(e) => {
                tracing::warn!(disk = %d.name, error = %Chain(&e), "dirty bitmaps unusable: comparing the whole disk");
            }
        }
    }
    let server =
        NbdServer::start_writable(&d.path, &socket, &d.name, &[]).map_err(|e| in_use(d, e))?;
    let client = NbdClient::connect_unix(&server.socket, &d.name, &["base:allocation"])?;
    Ok((Target::Nbd { client, server }, None))
}

/// Our bitmaps in a qcow2 image, and the geometry of the agent's last point when they can be
/// trusted to name every block written since it.
fn trusted_bitmaps(
    d: &DiskSource,
    state_dir: &Path,
    vm: &str,
) -> Result<(Vec<String>, Option<Geometry>), RollbackError> {
    // The image's bitmaps, from its header; an image the header reader does not take is asked
    // about with `qemu-img info`, which (without -U) fails on the lock a running QEMU holds.
    // Otherwise that lock is found when qemu-nbd starts.
    let bitmaps = match crate::qcow2::bitmaps(&d.path) {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(disk = %d.name, error = %Chain(&e), "asking qemu-img for the bitmaps");
            crate::offline::inspect(&d.name, &d.path)
                .map_err(|e| in_use(d, e))?
                .bitmaps
        }
    };
    let ours: Vec<String> = bitmaps
        .iter()
        .filter(|b| b.name.starts_with(crate::live::PREFIX))
        .map(|b| b.name.clone())
        .collect();
    let trusted = !ours.is_empty()
        && !bitmaps
            .iter()
            .any(|b| b.inconsistent && b.name.starts_with(crate::live::PREFIX));
    // The bitmaps cover writes since the last committed point only when no session is open,
    // and only when they continue it: the bitmap its last capture made is among them (an older
    // copy of the image carries a stale one, see `live::plan`).
    let base_geometry = trusted
        .then(|| {
            base_point(state_dir, vm)?;
            let conn = state::open(state_dir).ok()?;
            let chain = state::chain_bitmap(&conn, vm, &d.name).ok()??;
            if !ours.contains(&chain) {
                tracing::info!(disk = %d.name, bitmaps = ?ours, last = %chain, "the image's bitmaps do not continue the last point: comparing the whole disk");
                return None;
            }
            state::disk_geometry(&conn, vm, &d.name).ok()?
        })
        .flatten();
    Ok((ours, base_geometry))
}

/// Starts qemu-nbd exporting the image and `bitmaps`, and reads the block ranges they name.
fn open_with_bitmaps(
    d: &DiskSource,
    socket: &Path,
    bitmaps: &[String],
    bs: u64,
) -> Result<(NbdServer, NbdClient, Ranges), RollbackError> {
    let names: Vec<&str> = bitmaps.iter().map(String::as_str).collect();
    let server =
        NbdServer::start_writable(&d.path, socket, &d.name, &names).map_err(|e| in_use(d, e))?;
    let contexts: Vec<String> = bitmaps
        .iter()
        .map(|b| format!("qemu:dirty-bitmap:{b}"))
        .collect();
    let mut want_ctx = vec!["base:allocation"];
    want_ctx.extend(contexts.iter().map(String::as_str));
    let mut client = NbdClient::connect_unix(&server.socket, &d.name, &want_ctx)?;
    let mut blocks = Vec::new();
    for ctx in &contexts {
        for e in client.block_status(ctx, 0, client.size())? {
            if e.flags & nbd::STATE_DIRTY != 0 {
                blocks.push((e.offset / bs, (e.offset + e.length).div_ceil(bs)));
            }
        }
    }
    Ok((server, client, merge_ranges(blocks)))
}

/// Sorted, non-overlapping, non-adjacent ranges covering the same blocks as `ranges`.
pub(super) fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The agent's last committed point of `vm`, if it knows one and no session is open.
pub(super) fn base_point(state_dir: &Path, vm: &str) -> Option<i64> {
    let conn = state::open(state_dir).ok()?;
    let st = state::vm_state(&conn, vm).ok()?;
    st.base_point.filter(|_| st.pending_session.is_none())
}

/// A qemu-img or qemu-nbd failure on the write lock a running QEMU holds is the disk being in
/// use; anything else is reported as it is.
fn in_use(d: &DiskSource, e: OfflineError) -> RollbackError {
    match &e {
        OfflineError::Tool { message, .. } if message.contains("lock") => {
            RollbackError::InUse(d.name.clone(), d.path.clone())
        }
        _ => RollbackError::from(e),
    }
}

/// Refuses a disk whose image a running QEMU holds: `qemu-img info` without `-U` takes the
/// same lock QEMU holds and fails while the VM runs.
fn ensure_not_in_use(d: &DiskSource) -> Result<(), RollbackError> {
    let format = match d.kind {
        DiskKind::Raw => "raw",
        DiskKind::Qcow2 => "qcow2",
    };
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-f", format])
        .arg(&d.path)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if !o.status.success() => {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("lock") {
                return Err(RollbackError::InUse(d.name.clone(), d.path.clone()));
            }
            Err(RollbackError::from(OfflineError::Tool {
                tool: "qemu-img info",
                path: d.path.clone(),
                message: err.trim().to_owned(),
            }))
        }
        Ok(_) => Ok(()),
        // Without qemu-img no QEMU runs here either.
        Err(_) => Ok(()),
    }
}

fn open_raw(d: &DiskSource) -> Result<Target, RollbackError> {
    let disk = RawDisk::open(&d.path)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&d.path)
        .map_err(disk_io(&d.path))?;
    let is_device = std::os::unix::fs::FileTypeExt::is_block_device(
        &file.metadata().map_err(disk_io(&d.path))?.file_type(),
    );
    Ok(Target::Raw {
        disk,
        file,
        is_device,
    })
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

    #[test]
    fn dirty_ranges_of_several_bitmaps_merge_into_one_ordered_set() {
        assert_eq!(
            merge_ranges(vec![(5, 9), (0, 2), (8, 12), (2, 3), (20, 20), (15, 16)]),
            vec![(0, 3), (5, 12), (15, 16)]
        );
        assert!(merge_ranges(Vec::new()).is_empty());
    }
}
