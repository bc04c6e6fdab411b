//! The copying side: pulls a source receiver's new points into this one's store, over mutual
//! TLS with a replica identity (which the source lets read and nothing else).
//!
//! Each source point becomes a local point of the same VM and owner, made through the same
//! ingest path an agent's upload takes: only blocks that differ from the local base travel as
//! entries, only chunks the local store lacks are read from the source, every chunk is
//! re-hashed on arrival, and the commit checks the roots this store computes against the
//! source's roots. The local session is recorded before anything is sent
//! ([`crate::catalog::copies`]), so a copy cut short resumes it and never makes a point twice.

use super::fetch::{Fetch, Reads, BATCHES_FETCHING};
use super::{CopyConfig, CopyError, CopyReport};
use crate::catalog::{copies, now_us, sessions};
use crate::chunks::ChunkWriter;
use crate::error::StoreError;
use crate::ingest::{BeginSpec, DiskMode, DiskSpec, Entry, PointMeta};
use crate::store::Store;
use rewind_proto::format::{
    max_frame_len, DiskGeometry, MAX_POINT_BLOCKS_PAGE, MAX_READ_CHUNKS, MAX_READ_REPLY_BYTES,
};
use rewind_proto::pb;
use rewind_proto::pb::copy_client::CopyClient;
use rewind_proto::{BlockHash, DiskRoot};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use tonic::transport::Channel;

/// Raw block bytes one batch of entries may reference (bounds the chunks held in memory).
const BATCH_BLOCK_BYTES: u64 = 64 << 20;
/// Points asked for per CopyPoints call.
pub(super) const POINTS_PAGE: u32 = 64;

/// A store call on this (runtime) thread, which may block.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Leaves of one disk in index order, fetched a page at a time.
struct Cursor {
    buf: VecDeque<(u64, BlockHash)>,
    next: Option<u64>,
}

impl Cursor {
    fn new(active: bool) -> Cursor {
        Cursor {
            buf: VecDeque::new(),
            next: active.then_some(0),
        }
    }

    fn page(&mut self, leaves: Vec<(u64, BlockHash)>, next: Option<u64>) {
        self.buf.extend(leaves);
        self.next = next;
    }
}

/// One source point being copied.
struct PointCopy<'a> {
    client: &'a mut CopyClient<Channel>,
    store: &'a Arc<Store>,
    owner: &'a str,
    vm: &'a str,
    session: String,
    /// The point's chunk writer, while no batch is being staged with it.
    writer: Option<Box<dyn ChunkWriter>>,
    /// The batch being staged on a blocking thread while the next ones are fetched; it hands
    /// the writer back.
    staging: Option<Staging>,
    /// Batches whose chunks are being read from the source, oldest first.
    fetching: VecDeque<Fetch>,
    /// Chunks asked for and not staged yet: a later batch that needs one does not ask again.
    in_flight: HashSet<BlockHash>,
    /// The chunks of the batch being staged (out of `in_flight` once it is staged).
    staging_asked: Vec<BlockHash>,
    /// Chunks this store quarantined that the VM's points need (Begin's heal list): a block
    /// holding one is sent even where the base has it, so the source's good copy comes back.
    heal: HashSet<BlockHash>,
    report: &'a mut CopyReport,
    limiter: &'a Arc<super::RateLimit>,
    /// Chunk reads in flight (`parallel` of the configuration), shared by every batch.
    slots: Arc<tokio::sync::Semaphore>,
}

/// A batch being staged: the writer comes back with the outcome.
type Staging = tokio::task::JoinHandle<(Box<dyn ChunkWriter>, Result<(), StoreError>)>;

/// Copies every new point of every VM of the source; returns what it did. A VM that fails
/// is logged and counted, and the others go on.
pub async fn run_once(
    client: &mut CopyClient<Channel>,
    store: &Arc<Store>,
    cfg: &CopyConfig,
    limiter: &Arc<super::RateLimit>,
) -> Result<CopyReport, CopyError> {
    let mut report = CopyReport::default();
    let reply = client.copy_vms(pb::CopyVmsRequest {}).await?.into_inner();
    // Kept in every row copied from it: a source's history id is 32 hex digits (none from a
    // source older than history ids).
    if reply.history.len() > 64 || !reply.history.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CopyError::Answer("a history id"));
    }
    let src = copies::Source {
        url: &cfg.source,
        history: &reply.history,
    };
    for v in reply.vms {
        report.vms += 1;
        if let Err(e) = copy_vm(client, store, (cfg, src), &v, &mut report, limiter).await {
            report.failed_vms += 1;
            tracing::warn!(vm = %rewind_proto::names::shown(&v.vm), error = %rewind_proto::report::Chain(&e), "copying a VM failed; retried at the next run");
        }
    }
    Ok(report)
}

/// Copies the new points of one VM of the source.
async fn copy_vm(
    client: &mut CopyClient<Channel>,
    store: &Arc<Store>,
    (cfg, src): (&CopyConfig, copies::Source<'_>),
    v: &pb::CopyVm,
    report: &mut CopyReport,
    limiter: &Arc<super::RateLimit>,
) -> Result<(), CopyError> {
    rewind_proto::names::vm(&v.vm).map_err(|_| CopyError::Answer("a VM name"))?;
    rewind_proto::names::vm(&v.owner).map_err(|_| CopyError::Answer("an owner name"))?;
    let (foreign, rebuilt) = blocking(|| -> Result<_, CopyError> {
        let conn = store.conn();
        let exists = crate::catalog::points::vm_owner(&conn, &v.vm)?.is_some();
        let foreign = exists && !copies::is_copied(&conn, &cfg.source, &v.vm)?;
        Ok((foreign, copies::history_changed(&conn, src, &v.vm)?))
    })?;
    if foreign {
        // A VM of this receiver's own agents (or another source's) is never written by a copy.
        return Err(CopyError::Foreign(v.vm.clone()));
    }
    if rebuilt {
        super::history::take_over(client, store, src, &v.vm).await?;
    }
    let mut after = blocking(|| copies::copied_upto(&store.conn(), src, &v.vm))?;
    let mut newest_us = 0;
    let mut copied_us = 0;
    loop {
        let page = client
            .copy_points(pb::CopyPointsRequest {
                vm: v.vm.clone(),
                after: after as u64,
                limit: POINTS_PAGE,
            })
            .await?
            .into_inner()
            .points;
        let keyring = page
            .first()
            .and_then(|p| p.info.as_ref())
            .map(|i| i.keyring.clone())
            .filter(|k| !k.is_empty());
        if let Some(keyring) = keyring {
            keep_keys(client, store, (&v.owner, &v.vm), &keyring).await?;
        }
        if page.is_empty() {
            break;
        }
        for p in page {
            let id = p.info.as_ref().map_or(0, |i| i.id as i64);
            if id <= after {
                return Err(CopyError::Answer("point ids that do not grow"));
            }
            newest_us = newest_us.max(p.created_us);
            copy_point(
                client,
                store,
                (cfg, src),
                (&v.owner, &v.vm),
                &p,
                report,
                limiter,
            )
            .await?;
            copied_us = copied_us.max(p.created_us);
            after = id;
        }
    }
    blocking(|| -> Result<(), CopyError> {
        let conn = store.conn();
        let seen = copies::lags(&conn)?
            .into_iter()
            .find(|l| l.source == cfg.source && l.vm == v.vm);
        // Nothing new: caught up with what was seen before.
        let (newest, copied) = match seen {
            Some(l) if newest_us == 0 => (l.newest_us, l.newest_us.max(l.copied_us)),
            _ => (newest_us, copied_us),
        };
        copies::record_seen(&conn, &cfg.source, &v.vm, newest, copied, now_us())?;
        Ok(())
    })
}

/// Keeps an encrypted VM's wrapped data keys (those the copy lacks, every page) before any
/// of its points is copied, so a recovery key reads the copy's points as it reads the
/// source's. A plain VM has none.
async fn keep_keys(
    client: &mut CopyClient<Channel>,
    store: &Arc<Store>,
    (owner, vm): (&str, &str),
    keyring: &[u8],
) -> Result<(), CopyError> {
    let (mut after_key_id, mut after_recovery) = (Vec::new(), Vec::new());
    loop {
        let page = client
            .copy_keys(pb::DataKeysRequest {
                vm: vm.to_owned(),
                after_key_id: after_key_id.clone(),
                after_recovery: after_recovery.clone(),
            })
            .await?
            .into_inner();
        let keys = crate::service::wrapped_of(&page.keys)
            .map_err(|_| CopyError::Answer("a wrapped key of the wrong shape"))?;
        let kept = blocking(|| {
            crate::catalog::keys::insert_all(&store.conn(), owner, keyring, &keys, now_us())
        })?;
        if !kept {
            return Err(CopyError::Store(StoreError::Quota {
                agent: owner.to_owned(),
                what: "wrapped data keys".into(),
                key: "data_keys",
                limit: crate::catalog::keys::MAX_PER_OWNER as u64,
            }));
        }
        match keys.last() {
            Some(last) if page.more => {
                after_key_id = last.key_id.to_vec();
                after_recovery = last.recovery.as_bytes().to_vec();
            }
            _ => return Ok(()),
        }
    }
}

/// Begins (or resumes) the local session of source point `info`; returns its plan and the
/// local base it builds on.
fn begin_copy(
    store: &Store,
    src: copies::Source<'_>,
    (owner, vm): (&str, &str),
    info: &pb::PointInfo,
    disks: &[crate::ingest::DiskSpec],
) -> Result<(crate::ingest::BeginPlan, Option<i64>), CopyError> {
    // One connection guard at a time: the catalog's writer lock is not reentrant.
    let (resume, base) = {
        let conn = store.conn();
        let resume = copies::pending(&conn, src, vm, info.id as i64)?;
        let base = match crate::catalog::points::vm_owner(&conn, vm)? {
            Some((id, _)) => crate::ingest::latest_point(&conn, id)?,
            None => None,
        };
        (resume, base)
    };
    let spec = BeginSpec {
        vm: vm.to_owned(),
        disks: disks.to_vec(),
        base_point: base,
        resume,
        // An encrypted VM stays encrypted with its keyring: the copy holds only ciphertext,
        // checks envelopes, and keeps the agent's manifest MAC.
        keyring: crate::service::keyring_of(&info.keyring)
            .map_err(|_| CopyError::Answer("a keyring id that is not 16 bytes"))?,
        wrapped: Vec::new(),
        copy_of: Some(src.url.to_owned()),
    };
    let plan = store.begin(owner, &spec)?;
    Ok((plan, base))
}

/// Copies source point `p` of `vm` (owned by `owner`) as a local point.
async fn copy_point(
    client: &mut CopyClient<Channel>,
    store: &Arc<Store>,
    (cfg, src): (&CopyConfig, copies::Source<'_>),
    (owner, vm): (&str, &str),
    p: &pb::CopyPoint,
    report: &mut CopyReport,
    limiter: &Arc<super::RateLimit>,
) -> Result<(), CopyError> {
    let info = p
        .info
        .as_ref()
        .ok_or(CopyError::Answer("a point without its disks"))?;
    let source_point = info.id as i64;
    let (disks, roots) = disks_of(info)?;
    let (plan, base) = blocking(|| begin_copy(store, src, (owner, vm), info, &disks))?;
    if let Some(point) = plan.committed_point {
        blocking(|| copies::done(&store.conn(), src, vm, source_point, point, now_us()))?;
        return Ok(());
    }
    blocking(|| -> rusqlite::Result<()> {
        let conn = store.conn();
        let created = (source_point, p.created_us);
        copies::begin(&conn, src, vm, created, &plan.session)?;
        // Never in the future, never before the epoch: a source's clock cannot make this
        // copy's retention drop points.
        sessions::set_created(&conn, &plan.session, p.created_us.clamp(1, now_us()))
    })?;
    let before = report.clone();
    let mut copy = PointCopy {
        client,
        store,
        owner,
        vm,
        session: plan.session.clone(),
        writer: Some(store.chunk_writer()),
        staging: None,
        fetching: VecDeque::new(),
        in_flight: HashSet::new(),
        staging_asked: Vec::new(),
        heal: plan.heal.iter().copied().collect(),
        report,
        limiter,
        slots: Arc::new(tokio::sync::Semaphore::new(cfg.parallel.max(1))),
    };
    let mut sent = Ok(());
    for (pos, d) in disks.iter().enumerate() {
        let delta = plan
            .modes
            .iter()
            .any(|(n, m)| *n == d.name && *m == DiskMode::Delta);
        let base = if delta {
            plan.base_point.or(base)
        } else {
            None
        };
        sent = copy.disk(pos as u32, d, source_point, base).await;
        if sent.is_err() {
            break;
        }
    }
    let staged = copy.flush().await;
    sent = sent.and(staged);
    // The packs written are sealed however the point ended (gc may then collect them).
    let sealed = match copy.writer.take() {
        Some(mut writer) => blocking(|| store.finish_upload(&mut *writer)),
        None => Ok(()),
    };
    sent?;
    sealed?;
    rewind_proto::faults::point("copy-before-commit");
    let meta = PointMeta {
        config: p.config.clone(),
        consistency: info.consistency.clone(),
        mac: info.manifest_mac.clone(),
        taken_us: info.taken_us,
    };
    let committed = blocking(|| store.commit(owner, &plan.session, &roots, &meta))?;
    let detail = serde_json::json!({
        "source": cfg.source,
        "source_point": source_point,
        "entries": report.entries - before.entries,
        "chunks": report.chunks - before.chunks,
        "chunk_bytes": report.chunk_bytes - before.chunk_bytes,
    })
    .to_string();
    blocking(|| record_copied(store, (src, vm, source_point), committed.point, &detail))?;
    report.points += 1;
    tracing::info!(vm, source_point, point = committed.point, "point copied");
    Ok(())
}

/// Each disk's name and root, as a commit takes them.
type Roots = Vec<(String, DiskRoot)>;

/// The disks of a source point, and their roots, checked.
fn disks_of(info: &pb::PointInfo) -> Result<(Vec<DiskSpec>, Roots), CopyError> {
    let mut disks = Vec::with_capacity(info.disks.len());
    let mut roots = Vec::with_capacity(info.disks.len());
    for d in &info.disks {
        let geometry = DiskGeometry::new(d.size, u64::from(d.block_size))
            .map_err(|_| CopyError::Answer("a disk geometry"))?;
        disks.push(DiskSpec {
            name: d.name.clone(),
            geometry,
        });
        let root = DiskRoot::from_slice(&d.root).map_err(|_| CopyError::Answer("a disk root"))?;
        roots.push((d.name.clone(), root));
    }
    Ok((disks, roots))
}

/// Records that `source_point` of `vm` from `source` is local point `point`, with an event
/// saying what travelled (`detail`).
fn record_copied(
    store: &Store,
    (source, vm, source_point): (copies::Source<'_>, &str, i64),
    point: i64,
    detail: &str,
) -> Result<(), CopyError> {
    let conn = store.conn();
    copies::done(&conn, source, vm, source_point, point, now_us())?;
    let vm_id = crate::catalog::points::vm_owner(&conn, vm)?.map(|(id, _)| id);
    let event = crate::catalog::events::NewEvent {
        vm: vm_id,
        kind: "copy",
        point: Some(point),
        detail,
        at_us: now_us(),
    };
    crate::catalog::events::record(&conn, &event)?;
    Ok(())
}

impl PointCopy<'_> {
    /// Sends disk `d` (position `pos`) of source point `point`: the leaves that differ from
    /// local point `base` (all of them without one), zero entries where a base block is gone.
    async fn disk(
        &mut self,
        pos: u32,
        d: &DiskSpec,
        point: i64,
        base: Option<i64>,
    ) -> Result<(), CopyError> {
        let block = d.geometry.block_size.bytes();
        let per_batch = (BATCH_BLOCK_BYTES / block).clamp(16, 4096) as usize;
        let mut src = Cursor::new(true);
        let mut old = Cursor::new(base.is_some());
        let mut batch: Vec<Entry> = Vec::new();
        loop {
            if src.buf.is_empty() {
                if let Some(start) = src.next {
                    let (leaves, next) = self.source_page(&d.name, point, start).await?;
                    if leaves.last().is_some_and(|l| l.0 >= d.geometry.blocks()) {
                        return Err(CopyError::Answer("a leaf past the disk's end"));
                    }
                    src.page(leaves, next);
                }
            }
            if let (true, Some(start), Some(b)) = (old.buf.is_empty(), old.next, base) {
                let page = blocking(|| {
                    self.store.point_leaves(
                        self.owner,
                        self.vm,
                        b,
                        &d.name,
                        start,
                        MAX_POINT_BLOCKS_PAGE,
                    )
                })?;
                old.page(page.leaves, page.next);
            }
            let entry = match (src.buf.front().copied(), old.buf.front().copied()) {
                (None, None) => break,
                (Some(s), o) if o.is_none_or(|o| s.0 < o.0) => {
                    src.buf.pop_front();
                    Some(s)
                }
                (s, Some(o)) if s.is_none_or(|s| o.0 < s.0) => {
                    old.buf.pop_front();
                    Some((o.0, BlockHash::ZERO))
                }
                (Some(s), Some(o)) => {
                    src.buf.pop_front();
                    old.buf.pop_front();
                    (s.1 != o.1 || self.heal.contains(&s.1)).then_some(s)
                }
                _ => None,
            };
            if let Some((index, leaf)) = entry {
                batch.push(Entry { pos, index, leaf });
                if batch.len() >= per_batch {
                    self.send(std::mem::take(&mut batch), block).await?;
                }
            }
        }
        if !batch.is_empty() {
            self.send(batch, block).await?;
        }
        Ok(())
    }

    /// One page of the source's leaves of `disk` at `point` from `start`.
    async fn source_page(
        &mut self,
        disk: &str,
        point: i64,
        start: u64,
    ) -> Result<(Vec<(u64, BlockHash)>, Option<u64>), CopyError> {
        let r = self
            .client
            .copy_blocks(pb::PointBlocksRequest {
                vm: self.vm.to_owned(),
                point: point as u64,
                disk: disk.to_owned(),
                start,
                limit: MAX_POINT_BLOCKS_PAGE,
            })
            .await?
            .into_inner();
        let mut leaves = Vec::with_capacity(r.entries.len());
        let mut prev = None;
        for e in r.entries {
            let leaf = BlockHash::from_slice(&e.hash).map_err(|_| CopyError::Answer("a leaf"))?;
            if prev.is_some_and(|p| e.index <= p) || e.index < start {
                return Err(CopyError::Answer("leaves out of order"));
            }
            prev = Some(e.index);
            leaves.push((e.index, leaf));
        }
        let next = (r.next != 0).then_some(r.next);
        if next.is_some_and(|n| prev.is_none_or(|p| n <= p)) {
            return Err(CopyError::Answer("a page that does not advance"));
        }
        Ok((leaves, next))
    }

    /// Starts reading the chunks of one batch of entries that this store lacks (and no
    /// earlier batch asked for) from the source, several requests at a time; batches land
    /// and stage in order.
    async fn send(&mut self, entries: Vec<Entry>, block: u64) -> Result<(), CopyError> {
        while self.fetching.len() >= BATCHES_FETCHING {
            self.land_one().await?;
        }
        let wanted: Vec<BlockHash> = entries
            .iter()
            .filter(|e| !e.leaf.is_zero() && !self.in_flight.contains(&e.leaf))
            .map(|e| e.leaf)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let missing = blocking(|| self.store.missing(self.owner, &self.session, &wanted))?;
        self.in_flight.extend(missing.iter().copied());
        let per_call =
            (MAX_READ_REPLY_BYTES / max_frame_len(block as usize)).clamp(1, MAX_READ_CHUNKS);
        let reads = Reads {
            client: self.client.clone(),
            vm: self.vm.to_owned(),
            per_call,
            slots: self.slots.clone(),
            limiter: self.limiter.clone(),
        };
        let task = tokio::spawn(reads.run(missing.clone()));
        self.fetching.push_back(Fetch {
            entries,
            asked: missing,
            task,
        });
        Ok(())
    }

    /// Waits for the oldest batch's chunks, then stages it on a blocking thread once the
    /// batch before it is staged.
    async fn land_one(&mut self) -> Result<(), CopyError> {
        let Some(mut fetch) = self.fetching.pop_front() else {
            return Ok(());
        };
        let chunks = (&mut fetch.task)
            .await
            .map_err(|e| CopyError::Worker(e.to_string()))??;
        self.report.chunks += chunks.len() as u64;
        self.report.chunk_bytes += chunks.iter().map(|c| c.frame.len() as u64).sum::<u64>();
        self.report.entries += fetch.entries.len() as u64;
        self.staged().await?;
        let Some(mut writer) = self.writer.take() else {
            return Err(CopyError::Worker("the chunk writer is in use".into()));
        };
        let (store, owner, session) = (
            self.store.clone(),
            self.owner.to_owned(),
            self.session.clone(),
        );
        let entries = std::mem::take(&mut fetch.entries);
        self.staging_asked = std::mem::take(&mut fetch.asked);
        self.staging = Some(tokio::task::spawn_blocking(move || {
            let r = store.ingest(&owner, &session, entries, chunks, &mut *writer);
            (writer, r.map(drop))
        }));
        Ok(())
    }

    /// Lands every batch still being fetched and waits until the last one is staged.
    async fn flush(&mut self) -> Result<(), CopyError> {
        while !self.fetching.is_empty() {
            self.land_one().await?;
        }
        self.staged().await
    }

    /// Waits for the batch being staged, if any, and takes the writer back.
    async fn staged(&mut self) -> Result<(), CopyError> {
        let Some(h) = self.staging.take() else {
            return Ok(());
        };
        let (writer, r) = h.await.map_err(|e| CopyError::Worker(e.to_string()))?;
        self.writer = Some(writer);
        for hash in std::mem::take(&mut self.staging_asked) {
            self.in_flight.remove(&hash);
        }
        Ok(r?)
    }
}
