//! Rolling a disk on this host back (or forward) to a point: compare the disk's current block
//! leaves with the point's, fetch only the chunks of blocks that differ over the same mutual-TLS
//! channel, write them (raw files and devices directly, qcow2 images through a writable
//! `qemu-nbd`), then re-read the disk and check its root equals the point's before reporting
//! success. A disk a running QEMU holds (its image lock) is refused. Later points stay.

use crate::error::SyncError;
use crate::nbd::{self, NbdClient};
use crate::offline::NbdServer;
use crate::scan::{BlockSource, ScanPlan};
use crate::source::RawDisk;
use crate::state::{self, OldLeaves};
use crate::sync::{DiskKind, DiskSource};
use futures::StreamExt;
use rewind_proto::format::{DiskGeometry, MAX_POINT_BLOCKS_PAGE, MAX_READ_CHUNKS};
use rewind_proto::pb::replication_client::ReplicationClient;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::{chunk, pb, Leaf};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tonic::transport::Channel;

/// ReadChunks requests in flight during a rollback.
const CHUNK_REQUESTS_IN_FLIGHT: usize = 4;

/// What to roll back.
#[derive(Debug, Clone)]
pub struct RollbackConfig {
    pub vm: String,
    pub point: i64,
    pub disks: Vec<DiskSource>,
    pub state_dir: PathBuf,
    pub dry_run: bool,
}

/// One disk's rollback.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRollback {
    pub name: String,
    pub size: u64,
    pub root: String,
    /// Blocks whose content differed from the point.
    pub blocks_differing: u64,
    /// Compressed chunk bytes fetched from the receiver.
    pub bytes_fetched: u64,
    /// Bytes written to the disk (zeroed blocks included).
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// How the current content was compared: every allocated block read, or only the blocks
    /// a dirty bitmap and the point chain say can differ.
    pub compared: &'static str,
    /// The disk's root was re-read and equals the point's.
    pub verified: bool,
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub vm: String,
    pub point: i64,
    pub dry_run: bool,
    pub disks: Vec<DiskRollback>,
    pub seconds: f64,
}

/// A disk opened for rollback: a reader and a way to write blocks.
enum Target {
    Raw {
        disk: RawDisk,
        file: std::fs::File,
        is_device: bool,
    },
    Nbd {
        client: NbdClient,
        _server: NbdServer,
    },
}

impl Target {
    fn plan(&mut self, g: &DiskGeometry) -> Result<ScanPlan, SyncError> {
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

    fn source(&mut self) -> &mut dyn BlockSource {
        match self {
            Target::Raw { disk, .. } => disk,
            Target::Nbd { client, .. } => client,
        }
    }

    /// Writes (offset, bytes) pieces of at most a block each.
    fn write_many(&mut self, pieces: &[(u64, Vec<u8>)]) -> Result<(), SyncError> {
        match self {
            Target::Raw { file, disk, .. } => {
                for (offset, data) in pieces {
                    file.write_all_at(data, *offset)
                        .map_err(|e| io(disk.path(), e))?;
                }
                Ok(())
            }
            Target::Nbd { client, .. } => {
                let refs: Vec<(u64, &[u8])> =
                    pieces.iter().map(|(o, d)| (*o, d.as_slice())).collect();
                Ok(client.write_many(&refs)?)
            }
        }
    }

    fn zero(&mut self, offset: u64, len: usize) -> Result<(), SyncError> {
        match self {
            Target::Raw {
                file,
                disk,
                is_device,
            } => {
                if !*is_device {
                    let flags = rustix::fs::FallocateFlags::PUNCH_HOLE
                        | rustix::fs::FallocateFlags::KEEP_SIZE;
                    if rustix::fs::fallocate(&*file, flags, offset, len as u64).is_ok() {
                        return Ok(());
                    }
                }
                file.write_all_at(&vec![0u8; len], offset)
                    .map_err(|e| io(disk.path(), e))
            }
            Target::Nbd { client, .. } => Ok(client.write_zeroes(offset, len as u32)?),
        }
    }

    fn flush(&mut self) -> Result<(), SyncError> {
        match self {
            Target::Raw { file, disk, .. } => file.sync_all().map_err(|e| io(disk.path(), e)),
            Target::Nbd { client, .. } => Ok(client.flush()?),
        }
    }
}

fn io(path: &Path, source: std::io::Error) -> SyncError {
    SyncError::Credentials {
        path: path.to_owned(),
        source,
    }
}

/// Refuses a disk whose image a running QEMU holds: `qemu-img info` without `-U` takes the
/// same lock QEMU holds and fails while the VM runs.
fn ensure_not_in_use(d: &DiskSource) -> Result<(), SyncError> {
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
                return Err(SyncError::InUse(d.name.clone(), d.path.clone()));
            }
            Err(SyncError::Worker(format!(
                "qemu-img info {}: {}",
                d.path.display(),
                err.trim()
            )))
        }
        Ok(_) => Ok(()),
        // Without qemu-img no QEMU runs here either.
        Err(_) => Ok(()),
    }
}

/// Current leaves of the blocks that may hold data, compared with the point's; returns the
/// blocks that differ and the bytes read.
fn differing(
    target: &mut Target,
    g: &DiskGeometry,
    want: &BTreeMap<u64, Leaf>,
    candidates: Option<&BTreeSet<u64>>,
) -> Result<(Vec<u64>, u64), SyncError> {
    if let Some(c) = candidates {
        // Only blocks that can differ are read (several in flight); the others equal the point
        // already.
        let blocks: Vec<u64> = c.iter().copied().collect();
        let ranges: Vec<(u64, usize)> = blocks
            .iter()
            .map(|&i| (g.offset(i), g.block_len(i).unwrap_or(0)))
            .collect();
        let read = ranges.iter().map(|r| r.1 as u64).sum();
        let mut out = Vec::new();
        target.source().read_ranges(&ranges, &mut |k, bytes| {
            let i = blocks[k];
            if Leaf::of(bytes) != want.get(&i).copied().unwrap_or(Leaf::ZERO) {
                out.push(i);
            }
        })?;
        out.sort_unstable();
        return Ok((out, read));
    }
    let plan = target.plan(g)?;
    let bs = g.block_size.bytes();
    let mut out = Vec::new();
    let mut read = 0u64;
    let mut buf = vec![0u8; (4 << 20).max(bs as usize)];
    let mut next = 0u64;
    let outside = |from: u64, to: u64, out: &mut Vec<u64>| {
        // Blocks not read are zero now: they differ where the point has data.
        out.extend(want.range(from..to).map(|(&i, _)| i));
    };
    for &(first, end) in &plan.read {
        outside(next, first, &mut out);
        let mut idx = first;
        while idx < end {
            let count = ((4u64 << 20) / bs).max(1).min(end - idx);
            let off = g.offset(idx);
            let len = (count * bs).min(g.size - off) as usize;
            target.source().read_block_range(&mut buf[..len], off)?;
            read += len as u64;
            for k in 0..count {
                let i = idx + k;
                let s = (k * bs) as usize;
                let leaf = Leaf::of(&buf[s..s + g.block_len(i).unwrap_or(0)]);
                if leaf != want.get(&i).copied().unwrap_or(Leaf::ZERO) {
                    out.push(i);
                }
            }
            idx += count;
        }
        next = end;
    }
    outside(next, g.blocks(), &mut out);
    out.sort_unstable();
    Ok((out, read))
}

/// Re-reads the written blocks and checks each now holds the point's content, and that the
/// point's leaves give the point's root: every other block was already found (or, with a
/// bitmap, known) equal to the point.
fn verify(
    target: &mut Target,
    g: &DiskGeometry,
    want: &BTreeMap<u64, Leaf>,
    written: &[u64],
    root: Leaf,
) -> Result<(Leaf, u64), SyncError> {
    let ranges: Vec<(u64, usize)> = written
        .iter()
        .map(|&i| (g.offset(i), g.block_len(i).unwrap_or(0)))
        .collect();
    let read = ranges.iter().map(|r| r.1 as u64).sum();
    let mut wrong: Option<(u64, Leaf)> = None;
    target.source().read_ranges(&ranges, &mut |k, bytes| {
        let i = written[k];
        let now = Leaf::of(bytes);
        if now != want.get(&i).copied().unwrap_or(Leaf::ZERO) && wrong.is_none_or(|(j, _)| i < j) {
            wrong = Some((i, now));
        }
    })?;
    if let Some((_, now)) = wrong {
        return Ok((now, read));
    }
    let mut b = Builder::new(Shape::of(g));
    let mut next = 0;
    for (&i, &l) in want {
        b.push_zeros(i - next);
        b.push(l);
        next = i + 1;
    }
    b.push_zeros(g.blocks().saturating_sub(next));
    let got = tree::root(g, b.finish());
    Ok((if got == root { root } else { got }, read))
}

/// For an offline qcow2 image whose `rewind-*` bitmaps recorded every write since the agent's
/// last committed point: the only blocks that can differ from the target point are the dirty
/// ones and those where the last point and the target differ. `None` when that is not known.
fn bitmap_candidates(
    d: &DiskSource,
    state_dir: &Path,
    vm: &str,
    g: &DiskGeometry,
    want: &BTreeMap<u64, Leaf>,
) -> Option<BTreeSet<u64>> {
    let info = crate::offline::inspect(&d.name, &d.path).ok()?;
    let ours: Vec<_> = info
        .bitmaps
        .iter()
        .filter(|b| b.name.starts_with(crate::live::PREFIX))
        .collect();
    if ours.is_empty() || ours.iter().any(|b| b.inconsistent) {
        return None;
    }
    let conn = state::open(state_dir).ok()?;
    let st = state::vm_state(&conn, vm).ok()?;
    if st.base_point.is_none() || st.pending_session.is_some() {
        return None;
    }
    if state::disk_geometry(&conn, vm, &d.name).ok()?? != (g.size, g.block_size.bytes()) {
        return None;
    }
    let mut out = BTreeSet::new();
    let dir = std::path::absolute(state_dir.join("rollback").join(vm)).ok()?;
    std::fs::create_dir_all(&dir).ok()?;
    for b in ours {
        let server = NbdServer::start(
            &d.path,
            &dir.join(format!("{}-bitmap.sock", d.name)),
            &d.name,
            Some(&b.name),
        )
        .ok()?;
        let ctx = format!("qemu:dirty-bitmap:{}", b.name);
        let mut c = NbdClient::connect_unix(&server.socket, &d.name, &[ctx.as_str()]).ok()?;
        for e in c.block_status(&ctx, 0, g.size).ok()? {
            if e.flags & nbd::STATE_DIRTY != 0 {
                for i in e.offset / g.block_size.bytes()
                    ..(e.offset + e.length).div_ceil(g.block_size.bytes())
                {
                    out.insert(i);
                }
            }
        }
        c.disconnect();
    }
    // Where the last committed point and the target differ, from our own state.
    let mut old = OldLeaves::new(&conn, vm, Some(&d.name));
    let mut base = BTreeMap::new();
    old.drain_below(g.blocks(), |i, l| {
        base.insert(i, l);
    })
    .ok()?;
    for (i, l) in want {
        if base.get(i) != Some(l) {
            out.insert(*i);
        }
    }
    for i in base.keys() {
        if !want.contains_key(i) {
            out.insert(*i);
        }
    }
    Some(out)
}

/// Rolls every disk of `cfg` back to the point.
pub async fn rollback(
    client: &mut ReplicationClient<Channel>,
    cfg: &RollbackConfig,
) -> Result<RollbackReport, SyncError> {
    let started = Instant::now();
    let mut reports = Vec::new();
    for d in &cfg.disks {
        ensure_not_in_use(d)?;
        // The point's leaves, a page at a time.
        let mut want = BTreeMap::new();
        let mut start = 0u64;
        let (size, block_size, root) = loop {
            let page = client
                .point_blocks(pb::PointBlocksRequest {
                    vm: cfg.vm.clone(),
                    point: cfg.point as u64,
                    disk: d.name.clone(),
                    start,
                    limit: MAX_POINT_BLOCKS_PAGE,
                })
                .await
                .map_err(SyncError::refused("PointBlocks"))?
                .into_inner();
            for e in &page.entries {
                want.insert(
                    e.index,
                    Leaf::from_slice(&e.hash).map_err(|_| SyncError::Protocol("bad leaf"))?,
                );
            }
            if page.next == 0 {
                break (
                    page.size,
                    page.block_size,
                    Leaf::from_slice(&page.root).map_err(|_| SyncError::Protocol("bad root"))?,
                );
            }
            start = page.next;
        };
        let g = DiskGeometry::new(size, u64::from(block_size)).map_err(|source| {
            SyncError::Geometry {
                disk: d.name.clone(),
                source,
            }
        })?;
        tracing::debug!(disk = %d.name, leaves = want.len(), at = ?started.elapsed(), "point leaves fetched");
        let candidates = match d.kind {
            DiskKind::Qcow2 => tokio::task::block_in_place(|| {
                bitmap_candidates(d, &cfg.state_dir, &cfg.vm, &g, &want)
            }),
            DiskKind::Raw => None,
        };
        tracing::debug!(disk = %d.name, candidates = ?candidates.as_ref().map(BTreeSet::len), at = ?started.elapsed(), "candidates");
        let mut target = open_target(d, &cfg.state_dir, &cfg.vm, g.size)?;
        tracing::debug!(disk = %d.name, at = ?started.elapsed(), "target open");
        let (diff, read) =
            tokio::task::block_in_place(|| differing(&mut target, &g, &want, candidates.as_ref()))?;
        tracing::debug!(disk = %d.name, differing = diff.len(), at = ?started.elapsed(), "compared");
        let mut report = DiskRollback {
            name: d.name.clone(),
            size,
            root: root.to_hex(),
            blocks_differing: diff.len() as u64,
            bytes_fetched: 0,
            bytes_written: 0,
            bytes_read: read,
            compared: if candidates.is_some() {
                "dirty bitmap + point chain"
            } else {
                "full read"
            },
            verified: false,
        };
        if !cfg.dry_run {
            // Blocks that must become zero, and the chunks the others need.
            let mut by_hash: HashMap<Leaf, Vec<u64>> = HashMap::new();
            for &i in &diff {
                match want.get(&i) {
                    Some(l) => by_hash.entry(*l).or_default().push(i),
                    None => {
                        let len = g.block_len(i).unwrap_or(0);
                        target.zero(g.offset(i), len)?;
                        report.bytes_written += len as u64;
                    }
                }
            }
            let hashes: Vec<Leaf> = by_hash.keys().copied().collect();
            let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
            // Several ReadChunks requests in flight; replies are handled in order.
            let mut replies = futures::stream::iter(hashes.chunks(MAX_READ_CHUNKS))
                .map(|group| {
                    let mut c = client.clone();
                    let req = pb::ReadChunksRequest {
                        vm: cfg.vm.clone(),
                        hashes: group.iter().map(|h| h.0.to_vec()).collect(),
                    };
                    async move { c.read_chunks(req).await }
                })
                .buffered(CHUNK_REQUESTS_IN_FLIGHT);
            while let Some(reply) = replies.next().await {
                let reply = reply
                    .map_err(SyncError::refused("ReadChunks"))?
                    .into_inner();
                for c in reply.chunks {
                    let h = Leaf::from_slice(&c.hash)
                        .map_err(|_| SyncError::Protocol("bad chunk hash"))?;
                    let Some(blocks) = by_hash.get(&h) else {
                        return Err(SyncError::Protocol(
                            "the receiver sent a chunk we did not ask for",
                        ));
                    };
                    report.bytes_fetched += c.data.len() as u64;
                    for &i in blocks {
                        let len = g.block_len(i).unwrap_or(0);
                        let data = chunk::open(h, &c.data, len)
                            .map_err(|e| SyncError::Worker(e.to_string()))?;
                        pending.push((g.offset(i), data));
                        report.bytes_written += len as u64;
                    }
                }
                // One reply's blocks written together (several writes in flight over NBD).
                tokio::task::block_in_place(|| target.write_many(&pending))?;
                pending.clear();
            }
            drop(replies);
            tracing::debug!(disk = %d.name, at = ?started.elapsed(), "fetched and written");
            target.flush()?;
            tracing::debug!(disk = %d.name, at = ?started.elapsed(), "flushed");
            let (now, reread) =
                tokio::task::block_in_place(|| verify(&mut target, &g, &want, &diff, root))?;
            report.bytes_read += reread;
            if now != root {
                return Err(SyncError::RollbackVerify {
                    disk: d.name.clone(),
                    got: now.to_hex(),
                    want: root.to_hex(),
                });
            }
            report.verified = true;
        }
        client
            .record_rollback(pb::RollbackEvent {
                vm: cfg.vm.clone(),
                point: cfg.point as u64,
                disk: d.name.clone(),
                blocks: report.blocks_differing,
                bytes: report.bytes_fetched,
                dry_run: cfg.dry_run,
            })
            .await
            .map_err(SyncError::refused("RecordRollback"))?;
        reports.push(report);
    }
    Ok(RollbackReport {
        vm: cfg.vm.clone(),
        point: cfg.point,
        dry_run: cfg.dry_run,
        disks: reports,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn open_target(d: &DiskSource, state_dir: &Path, vm: &str, size: u64) -> Result<Target, SyncError> {
    match d.kind {
        DiskKind::Raw => {
            let disk = RawDisk::open(&d.path)?;
            if disk.size() != size {
                return Err(SyncError::SizeMismatch {
                    disk: d.name.clone(),
                    have: disk.size(),
                    want: size,
                });
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&d.path)
                .map_err(|e| io(&d.path, e))?;
            let is_device = std::os::unix::fs::FileTypeExt::is_block_device(
                &file.metadata().map_err(|e| io(&d.path, e))?.file_type(),
            );
            Ok(Target::Raw {
                disk,
                file,
                is_device,
            })
        }
        DiskKind::Qcow2 => {
            let dir = std::path::absolute(state_dir.join("rollback").join(vm))
                .map_err(|e| io(state_dir, e))?;
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            let server =
                NbdServer::start_writable(&d.path, &dir.join(format!("{}.sock", d.name)), &d.name)?;
            let client = NbdClient::connect_unix(&server.socket, &d.name, &["base:allocation"])?;
            if client.size() != size {
                return Err(SyncError::SizeMismatch {
                    disk: d.name.clone(),
                    have: client.size(),
                    want: size,
                });
            }
            Ok(Target::Nbd {
                client,
                _server: server,
            })
        }
    }
}
