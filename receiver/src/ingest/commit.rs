//! Commits: write a session's staged blocks as tree nodes at the new point (in one
//! transaction, or in bounded steps recorded in `pending_commits`), check the recomputed roots
//! against the agent's, and make the point visible in one transaction.

use super::*;
use crate::catalog::leaves::{self, Node, Span};
use crate::catalog::{commits, points, DiskId, PointId};
use rewind_proto::NodeHash;

/// What a point records besides its blocks: configuration, consistency, and an encrypted
/// VM's manifest MAC and time of capture.
type Meta<'a> = (Option<&'a str>, &'a str, &'a [u8], i64);

impl Store {
    /// Makes the session a point if, for every disk, the root recomputed from the stored nodes
    /// equals the agent's. Either the whole point becomes visible, or nothing does.
    ///
    /// A session of up to [`WHOLE_COMMIT_MAX`] staged blocks commits in one transaction. A larger
    /// one writes its nodes in transactions of bounded size first (see [`Store::commit_in_steps`]),
    /// so one agent's huge commit never holds the catalog's writer for long.
    pub fn commit(
        &self,
        owner: &str,
        session_id: &str,
        roots: &[(String, DiskRoot)],
        meta: &PointMeta,
    ) -> Result<Committed, StoreError> {
        let (config, consistency) = meta.validate()?;
        let vm_id = open_session(&self.conn(), owner, session_id)?.vm_id;
        // One commit of a VM at a time: a stepped commit's nodes exist before its point does,
        // and no other point of the VM may commit over them. A second commit of the VM is
        // refused rather than parked on a thread.
        let lock = self.vm_lock(vm_id);
        let _held = match lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(StoreError::CommitRunning(names::shown(session_id)))
            }
        };
        // Whatever an earlier stepped commit of the VM left goes first: no commit starts while
        // such nodes exist.
        self.forget_pending(Some(vm_id))?;
        self.wait_published(owner, session_id)?;
        // The cost of one transaction grows with the staged rows and with the level-1 nodes
        // they touch (each reads its 256 children): past either bound, commit in steps.
        let large = sessions::is_large(
            &self.conn(),
            session_id,
            WHOLE_COMMIT_MAX,
            WHOLE_COMMIT_PARENTS,
        )?;
        let meta = (config, consistency, meta.mac.as_slice(), meta.taken_us);
        let done = if large {
            self.commit_in_steps(owner, session_id, roots, meta)
        } else {
            self.commit_whole(owner, session_id, roots, meta)
        };
        if done.is_ok() {
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        done
    }

    /// On an object store, waits (up to [`PUBLISH_WAIT`]) until every chunk the session refers
    /// to lies in a sealed pack, i.e. in the bucket: a pack another upload stream of the owner
    /// is still writing is sealed when that stream ends or the pack fills.
    fn wait_published(&self, owner: &str, session_id: &str) -> Result<(), StoreError> {
        if !self.chunks().publishes() {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + PUBLISH_WAIT;
        loop {
            // Packs an upload that failed left behind go up now (an agent that resends
            // nothing opens no stream that would publish them).
            let published = self.chunks().publish_staged()?;
            if !published.is_empty() {
                let conn = self.conn();
                for r in &published {
                    crate::catalog::packs::seal(&conn, r)?;
                }
            }
            if !sessions::refers_to_unsealed(&self.conn(), session_id, owner)? {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::NotPublished(names::shown(session_id)));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn commit_whole(
        &self,
        owner: &str,
        session_id: &str,
        roots: &[(String, DiskRoot)],
        meta: Meta<'_>,
    ) -> Result<Committed, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (session, agent_roots, created) = commit_checks(&tx, owner, session_id, roots)?;
        let point = new_point_id(&tx, session.base_point)?;
        let mut tops = Vec::new();
        for (pos, disk) in session.disks.iter().enumerate() {
            let disk_id = disk_row(&tx, &session, disk)?;
            let edge = grown_edge(&tx, &session, disk)?;
            let (changed, top, _) =
                write_leaves(&tx, session_id, pos, disk, disk_id, point, -1, None, edge)?;
            tops.push((disk_id, top, changed));
        }
        record_point(
            &tx,
            &session,
            session_id,
            point,
            created,
            &agent_roots,
            &tops,
            meta,
        )?;
        sessions::drop_staged(&tx, session_id)?;
        tx.commit()?;
        Ok(Committed {
            point,
            created: rfc3339(created),
        })
    }

    /// A large commit in steps, none of which holds the catalog's writer for long:
    /// 1. reserve the point's id and its new disk generations, recorded in `pending_commits`;
    /// 2. write the leaves and the inner nodes above them at that id, a bounded group of
    ///    leaves per transaction (nodes at an id no point has yet are read by nobody: every
    ///    read is of a committed point, and ids only grow within a VM);
    /// 3. one short transaction checks the roots and makes the point visible;
    /// 4. the staged rows are dropped in bounded deletes.
    ///
    /// If step 3 refuses (wrong root, session superseded), or the receiver dies before it, the
    /// nodes written in step 2 are removed (at once, or by [`Store::open`] from the pending
    /// record) before any other point of the VM can commit over them.
    fn commit_in_steps(
        &self,
        owner: &str,
        session_id: &str,
        roots: &[(String, DiskRoot)],
        meta: Meta<'_>,
    ) -> Result<Committed, StoreError> {
        let (session, point, disk_ids) = {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (session, _, _) = commit_checks(&tx, owner, session_id, roots)?;
            let point = new_point_id(&tx, session.base_point)?;
            let mut ids = Vec::new();
            for disk in &session.disks {
                ids.push(disk_row(&tx, &session, disk)?);
            }
            let new_generations: Vec<i64> = session
                .disks
                .iter()
                .zip(&ids)
                .filter(|(d, _)| d.base_disk.is_none())
                .map(|(_, id)| *id)
                .collect();
            let pending = commits::Pending {
                session_id: session_id.to_owned(),
                vm_id: session.vm_id,
                point,
                disks: serde_json::to_string(&ids).unwrap_or_default(),
                new_disks: serde_json::to_string(&new_generations).unwrap_or_default(),
            };
            commits::record(&tx, &pending)?;
            tx.commit()?;
            (session, point, ids)
        };
        let done = (|| {
            let mut tops = Vec::new();
            for (pos, disk) in session.disks.iter().enumerate() {
                let disk_id = disk_ids[pos];
                let mut edge = grown_edge(&self.conn(), &session, disk)?;
                let (mut changed, mut after) = (0, -1i64);
                let top = loop {
                    let mut conn = self.conn();
                    let tx =
                        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let (n, top, last) = write_leaves(
                        &tx,
                        session_id,
                        pos,
                        disk,
                        disk_id,
                        point,
                        after,
                        Some(COMMIT_STEP_PARENTS),
                        edge.take(),
                    )?;
                    tx.commit()?;
                    // Another agent's write waiting for the writer goes next.
                    parking_lot::MutexGuard::unlock_fair(conn);
                    rewind_proto::faults::point("commit-between-steps");
                    changed += n;
                    match last {
                        Some(l) => after = l as i64,
                        None => break top,
                    }
                };
                tops.push((disk_id, top, changed));
            }
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (session, agent_roots, created) = commit_checks(&tx, owner, session_id, roots)?;
            record_point(
                &tx,
                &session,
                session_id,
                point,
                created,
                &agent_roots,
                &tops,
                meta,
            )?;
            // The record of the steps must still be there: had anything removed it (and so
            // the nodes written under it), the point would be missing blocks.
            let n = commits::finish(&tx, session_id, point)?;
            if n != 1 {
                return Err(StoreError::CommitRunning(names::shown(session_id)));
            }
            tx.commit()?;
            Ok(Committed {
                point,
                created: rfc3339(created),
            })
        })();
        match done {
            Ok(c) => {
                // The point is committed: a failure to drop the staged rows now only leaves
                // them for the next start.
                if let Err(e) = self.drop_staged(session_id) {
                    tracing::warn!(error = %Chain(&e), "dropping a committed session's staged rows failed");
                }
                Ok(c)
            }
            Err(e) => {
                // Under the VM's lock: if this fails, the next commit of the VM retries it
                // before it starts (and refuses to start while it fails).
                if let Err(undo) = self.forget_pending(Some(session.vm_id)) {
                    tracing::error!(error = %Chain(&undo), "removing the nodes of a refused commit failed; the VM's next commit removes them first");
                }
                Err(e)
            }
        }
    }

    /// Removes, in bounded steps, what stepped commits of `vm_id` (or of every VM) left before
    /// their point existed.
    pub fn forget_pending(&self, vm_id: Option<VmId>) -> Result<(), StoreError> {
        loop {
            let mut conn = self.conn();
            let more = forget_pending_step(&mut conn, vm_id)?;
            parking_lot::MutexGuard::unlock_fair(conn);
            if !more {
                return Ok(());
            }
        }
    }

    /// The lock that serialises the commits of one VM.
    fn vm_lock(&self, vm_id: VmId) -> std::sync::Arc<std::sync::Mutex<()>> {
        self.commit_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vm_id)
            .or_default()
            .clone()
    }
}

/// Most staged blocks committed in one transaction; larger sessions commit in steps.
pub const WHOLE_COMMIT_MAX: usize = 65_536;
/// Longest a commit waits for its chunks' packs to reach the object store.
pub const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Most level-1 nodes one transaction's commit recomputes (each reads its 256 children); a
/// session touching more commits in steps, however few its blocks.
pub const WHOLE_COMMIT_PARENTS: usize = 1024;
/// Most level-1 nodes one step of a stepped commit recomputes (each reads up to 256 leaves):
/// a step writes at most 16 Ki leaves before other writers get a turn. (With 256, an honest
/// sync beside a 2 M-block commit took 1.1-1.3 s instead of 0.3-0.5 s, for the same total.)
pub(super) const COMMIT_STEP_PARENTS: usize = 64;
/// Staged rows dropped per transaction.
pub(super) const STAGED_DELETE_STEP: usize = 16_384;

/// The checks every commit makes in its final transaction: the session is the caller's and
/// open, its base is still the VM's newest point, and the roots name exactly its disks.
/// Returns the session, the agent's roots by disk and when the session was created.
pub(super) fn commit_checks<'a>(
    conn: &Connection,
    owner: &str,
    session_id: &str,
    roots: &'a [(String, DiskRoot)],
) -> Result<(Session, HashMap<&'a str, DiskRoot>, i64), StoreError> {
    let session = open_session(conn, owner, session_id)?;
    let latest = latest_point(conn, session.vm_id)?;
    if latest != session.base_point {
        return Err(StoreError::BaseMoved {
            vm: session.vm.clone(),
            expected: session.base_point.unwrap_or(0),
            actual: latest.unwrap_or(0),
        });
    }
    let mut agent_roots: HashMap<&str, DiskRoot> = HashMap::new();
    for (name, root) in roots {
        if !session.disks.iter().any(|d| &d.name == name) {
            return Err(StoreError::RootSet(names::shown(name)));
        }
        agent_roots.insert(name.as_str(), *root);
    }
    for d in &session.disks {
        if !agent_roots.contains_key(d.name.as_str()) {
            return Err(StoreError::RootSet(d.name.clone()));
        }
    }
    let created = sessions::created_us(conn, session_id)?;
    Ok((session, agent_roots, created))
}

/// Whether a disk of `geometry` continues the base point's disk of `size` and `block_size` as
/// a delta: the same geometry, or a disk grown online from a whole number of blocks (its old
/// blocks keep their indexes and leaves; the new area is zeros until written, and the commit
/// recomputes the old right edge of the tree, see [`grown_edge`]). Any other change (a
/// shrink, a new block size, growth from a partial last block, whose leaf would change
/// without a write) starts a new disk generation: a full read that sends only unknown chunks.
pub(super) fn continues(size: u64, block_size: u64, geometry: &DiskGeometry) -> bool {
    let bs = geometry.block_size.bytes();
    block_size == bs
        && (size == geometry.size || (size < geometry.size && bs > 0 && size.is_multiple_of(bs)))
}

/// For a disk that grew since the session's base point, the old last leaf's index: its path to
/// the top is where the tree's shape changed (right-edge nodes gained children, new levels
/// above the old top), so the commit recomputes it even when no block there was written.
pub(super) fn grown_edge(
    conn: &Connection,
    session: &Session,
    disk: &SessionDisk,
) -> rusqlite::Result<Option<u64>> {
    let (Some(base), Some(_)) = (session.base_point, disk.base_disk) else {
        return Ok(None);
    };
    let old = points::disk_size_at(conn, base, &disk.name)?;
    let bs = disk.geometry.block_size.bytes();
    Ok(match old {
        Some(old) if (old as u64) < disk.geometry.size && old > 0 => {
            Some((old as u64).div_ceil(bs) - 1)
        }
        _ => None,
    })
}

/// The disk generation a session's disk writes to: its base's, or a new one.
pub(super) fn disk_row(
    conn: &Connection,
    session: &Session,
    disk: &SessionDisk,
) -> rusqlite::Result<i64> {
    match disk.base_disk {
        Some(id) => Ok(id),
        None => {
            let (size, bs) = (disk.geometry.size, disk.geometry.block_size.bytes());
            points::new_disk(conn, session.vm_id, &disk.name, size as i64, bs as i64)
        }
    }
}

/// Writes the staged leaves of disk `pos` after block `after` as nodes at `point`, and the
/// inner nodes above them. With `max_parents`, stops before the leaves of the group would
/// touch more than that many level-1 nodes. Returns the leaves written, the tree's top after
/// them, and the last block written (None: no leaf was left). `edge`, a leaf whose path to the
/// top is recomputed although it was not written (see [`grown_edge`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_leaves(
    conn: &Connection,
    session_id: &str,
    pos: usize,
    disk: &SessionDisk,
    disk_id: i64,
    point: i64,
    after: i64,
    max_parents: Option<usize>,
    edge: Option<u64>,
) -> Result<(usize, NodeHash, Option<u64>), StoreError> {
    let limit = max_parents.map_or(-1, |p| (p as i64) * tree_fanout());
    let mut group = sessions::staged_after(conn, session_id, pos, after, limit)?;
    if let Some(max) = max_parents {
        let fanout = tree_fanout() as u64;
        let mut parents = 0;
        let mut last_parent = None;
        let cut = group.iter().position(|&i| {
            if last_parent != Some(i / fanout) {
                last_parent = Some(i / fanout);
                parents += 1;
            }
            parents > max
        });
        if let Some(c) = cut {
            group.truncate(c);
        }
    }
    let last = group.last().copied();
    let changed = match last {
        Some(l) => leaves::put_staged(
            conn,
            DiskId(disk_id),
            PointId(point),
            (session_id, pos),
            after,
            l,
        )?,
        None => 0,
    };
    let mut nodes = SqlNodes {
        conn,
        disk_id,
        point,
    };
    let top = tree::update(
        Shape::of(&disk.geometry),
        group.into_iter().chain(edge),
        &mut nodes,
    )?;
    Ok((changed, top, last))
}

pub(super) fn tree_fanout() -> i64 {
    rewind_proto::format::TREE_FANOUT as i64
}

/// Checks each disk's recomputed root against the agent's and makes the point visible: its
/// row, its disks, and the session marked committed.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_point(
    conn: &Connection,
    session: &Session,
    session_id: &str,
    point: i64,
    created: i64,
    agent_roots: &HashMap<&str, DiskRoot>,
    tops: &[(i64, NodeHash, usize)],
    (config, consistency, mac, taken_us): Meta<'_>,
) -> Result<(), StoreError> {
    // 32 bytes exactly when the VM is encrypted.
    if mac.len() != 32 * usize::from(session.sealed) {
        return Err(StoreError::ManifestMac(session.vm.clone()));
    }
    // Point times never go backwards within a VM, whatever the clock did since the last point
    // (see crate::clock): listings, retention and `--at` keep the order points were taken in.
    let previous = points::newest_created(conn, session.vm_id)?;
    let created = match previous {
        Some(p) if created <= p => {
            tracing::warn!(
                vm = %session.vm,
                behind_seconds = (p - created) as f64 / 1e6,
                "the clock is behind the VM's newest point (stepped back?): the new point is \
                 dated just after it"
            );
            p + 1
        }
        _ => created,
    };
    let row = points::NewPoint {
        id: point,
        vm_id: session.vm_id,
        parent: session.base_point,
        created_us: created,
        committed_us: now_us(),
        session: session_id,
        consistency,
        config,
        mac: session.sealed.then_some(mac),
        taken_us: session.sealed.then_some(taken_us),
    };
    points::insert(conn, &row)?;
    for (disk, &(disk_id, top, changed)) in session.disks.iter().zip(tops) {
        let root = tree::root(&disk.geometry, top);
        let agent = agent_roots
            .get(disk.name.as_str())
            .copied()
            .ok_or_else(|| StoreError::RootSet(disk.name.clone()))?;
        if root != agent {
            return Err(StoreError::RootMismatch {
                disk: disk.name.clone(),
                agent,
                stored: root,
            });
        }
        let row = points::PointDiskRow {
            name: disk.name.clone(),
            size: disk.geometry.size as i64,
            block_size: disk.geometry.block_size.bytes() as i64,
            root,
            changed_blocks: changed as i64,
            disk_id: DiskId(disk_id),
        };
        points::add_disk(conn, point, &row)?;
    }
    sessions::mark_committed(conn, session_id, point, now_us())?;
    Ok(())
}

/// Node rows one cleanup step deletes.
pub(super) const CLEANUP_STEP: i64 = 16_384;

/// One bounded step of removing what stepped commits (of VM `vm_id`, or of any VM) wrote before
/// their point existed: nodes at the reserved id, then the disk generations they created, then
/// the pending record. Returns whether any pending record is left. A record whose point was
/// committed (same id and session) only loses the record.
pub fn forget_pending_step(conn: &mut Connection, vm_id: Option<VmId>) -> Result<bool, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let Some(pending) = commits::next(&tx, vm_id)? else {
        return Ok(false);
    };
    let (session, point) = (pending.session_id, pending.point);
    let (disks, new_disks) = (pending.disks, pending.new_disks);
    // A damaged record is an error, never an empty list: forgetting the record would leave
    // the nodes it names behind for good.
    let corrupt = |source| StoreError::CorruptRecord {
        what: "pending_commits.disks",
        source,
    };
    let disks: Vec<i64> = serde_json::from_str(&disks).map_err(corrupt)?;
    let new_disks: Vec<i64> = serde_json::from_str(&new_disks).map_err(corrupt)?;
    let committed = points::committed_by(&tx, point, &session)?;
    let mut deleted = 0;
    if !committed {
        for d in &disks {
            deleted += leaves::drop_point_step(&tx, DiskId(*d), PointId(point), CLEANUP_STEP)?;
        }
    }
    if deleted == 0 {
        if !committed {
            for d in &new_disks {
                points::drop_unused_disk(&tx, *d)?;
            }
        }
        commits::forget(&tx, &session)?;
    }
    tx.commit()?;
    Ok(true)
}

/// The versioned nodes of one disk at one point, as the tree update reads and writes them.
pub(super) struct SqlNodes<'a> {
    pub(super) conn: &'a Connection,
    pub(super) disk_id: i64,
    pub(super) point: i64,
}

impl NodeStore for SqlNodes<'_> {
    type Error = StoreError;

    fn children(
        &mut self,
        level: u32,
        first: u64,
        end: u64,
    ) -> Result<Vec<(u64, NodeHash)>, StoreError> {
        let span = Span {
            disk: DiskId(self.disk_id),
            point: PointId(self.point),
            level,
            blocks: first..end,
        };
        Ok(leaves::children(self.conn, &span)?
            .into_iter()
            .map(|(idx, hash)| (idx, hash.into()))
            .collect())
    }

    fn put(&mut self, level: u32, index: u64, value: NodeHash) -> Result<(), StoreError> {
        // The catalog keeps every level in one table, in the row type of level 0 (a block's
        // hash); `update` writes levels 1 and up only.
        let node = Node {
            idx: index,
            hash: BlockHash(value.0),
            at: None,
        };
        leaves::put(
            self.conn,
            DiskId(self.disk_id),
            PointId(self.point),
            level,
            &node,
        )?;
        Ok(())
    }
}
