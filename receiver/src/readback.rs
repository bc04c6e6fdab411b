//! Reading a VM's points back for its own agent (rollback): the leaves of a disk at a point, a
//! page at a time, and chunk data the agent owns. Also records rollbacks as events.

use crate::catalog::leaves::{self, Columns, Span};
use crate::catalog::{self, events, now_us, PointId};
use crate::chunks::ReadOrder;
use crate::error::StoreError;
use crate::ingest::owned_vm;
use crate::points::{self, PointSelector};
use crate::store::Store;
use rewind_proto::format::{MAX_POINT_BLOCKS_PAGE, MAX_READ_CHUNKS, MAX_READ_REPLY_BYTES};
use rewind_proto::{BlockHash, DiskRoot};

/// Rollback events one VM may have recorded.
const MAX_ROLLBACK_EVENTS: i64 = 100_000;

/// One page of a disk's leaves at a point.
pub struct LeafPage {
    pub size: u64,
    pub block_size: u64,
    pub root: DiskRoot,
    pub leaves: Vec<(u64, BlockHash)>,
    /// Where the next page starts, if any.
    pub next: Option<u64>,
}

impl Store {
    /// The non-zero leaves of `disk` at `point` from block `start`, for the VM's owner only.
    pub fn point_leaves(
        &self,
        owner: &str,
        vm: &str,
        point: i64,
        disk: &str,
        start: u64,
        limit: u32,
    ) -> Result<LeafPage, StoreError> {
        let conn = self.reader()?;
        owned_vm(&conn, vm, owner)?;
        let p = points::resolve(&conn, vm, &PointSelector::Id(point))?;
        let d = p
            .disks
            .iter()
            .find(|d| d.name == disk)
            .ok_or_else(|| StoreError::UnknownDisk {
                point,
                disk: rewind_proto::names::shown(disk),
            })?;
        let blocks = d.size.div_ceil(d.block_size.max(1));
        if start > blocks {
            return Err(StoreError::BlockOutOfRange {
                disk: disk.to_owned(),
                index: start,
                blocks,
            });
        }
        let limit = limit.clamp(1, MAX_POINT_BLOCKS_PAGE);
        let span = Span::leaves(d.disk_id, PointId(point), start..u64::MAX);
        let leaves: Vec<(u64, BlockHash)> =
            leaves::page(&conn, &span, Columns::Hashes, limit as usize)?
                .into_iter()
                .map(|n| (n.idx, n.hash))
                .collect();
        let next =
            (leaves.len() == limit as usize).then(|| leaves.last().map_or(start, |l| l.0 + 1));
        Ok(LeafPage {
            size: d.size,
            block_size: d.block_size,
            root: d.root_leaf,
            leaves,
            next,
        })
    }

    /// The stored frames of chunks `owner` holds; a chunk it does not hold is refused.
    pub fn read_chunks(
        &self,
        owner: &str,
        vm: &str,
        hashes: &[BlockHash],
    ) -> Result<Vec<(BlockHash, Vec<u8>)>, StoreError> {
        if hashes.len() > MAX_READ_CHUNKS {
            return Err(StoreError::TooLarge {
                what: "chunks in one read",
                got: hashes.len(),
                max: MAX_READ_CHUNKS,
            });
        }
        let locs = {
            // Lookups of concurrent requests run side by side, each on its own connection.
            let conn = self.reader()?;
            owned_vm(&conn, vm, owner)?;
            let mut locs = Vec::new();
            for h in hashes {
                let at = catalog::chunks::location(&conn, owner, &h.0[..])?;
                locs.push((*h, at.ok_or(StoreError::NotHeld(*h))?));
            }
            locs
        };
        let bytes: usize = locs.iter().map(|l| l.1.len as usize).sum();
        if bytes > MAX_READ_REPLY_BYTES {
            return Err(StoreError::TooLarge {
                what: "frame bytes in one ReadChunks reply",
                got: bytes,
                max: MAX_READ_REPLY_BYTES,
            });
        }
        // In pack order: neighbouring records then come from the same pages.
        let mut locs = locs;
        locs.sort_by_key(|l| (l.1.pack, l.1.offset));
        let mut reader = self.chunks().reader(ReadOrder::Random);
        locs.into_iter()
            .map(|(h, at)| Ok((h, reader.read(at, &h)?)))
            .collect()
    }

    /// A page of the wrapped data keys of `owner`'s encrypted VM `vm` after `after` (none
    /// for a plain VM); true when more follow.
    pub fn data_keys(
        &self,
        owner: &str,
        vm: &str,
        after: (&[u8], &[u8]),
    ) -> Result<(Vec<rewind_proto::crypt::WrappedKey>, bool), StoreError> {
        let conn = self.reader()?;
        let vm_id = owned_vm(&conn, vm, owner)?;
        let keys = match catalog::points::keyring(&conn, vm_id)? {
            Some(keyring) => crate::catalog::keys::page(&conn, owner, &keyring, after)?,
            None => Vec::new(),
        };
        let more = keys.len() == crate::catalog::keys::PAGE;
        Ok((keys, more))
    }

    /// Records a rollback of `disk` to `point` as an event of the VM; returns its number among
    /// the VM's events.
    pub fn record_rollback(
        &self,
        owner: &str,
        vm: &str,
        point: i64,
        disk: &str,
        detail: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        let vm_id = owned_vm(&conn, vm, owner)?;
        let p = points::resolve(&conn, vm, &PointSelector::Id(point))?;
        if !p.disks.iter().any(|d| d.name == disk) {
            return Err(StoreError::UnknownDisk {
                point,
                disk: rewind_proto::names::shown(disk),
            });
        }
        // Events are kept as long as the VM: an agent may not grow the catalog without bound.
        let n = events::count_of_vm(&conn, vm_id, "rollback")?;
        if n >= MAX_ROLLBACK_EVENTS {
            return Err(StoreError::TooLarge {
                what: "rollback events kept for one VM",
                got: n as usize,
                max: MAX_ROLLBACK_EVENTS as usize,
            });
        }
        let detail = detail.to_string();
        let event = events::NewEvent {
            vm: Some(vm_id),
            kind: "rollback",
            point: Some(point),
            detail: &detail,
            at_us: now_us(),
        };
        let id = events::record(&conn, &event)?;
        // The event's number among the VM's own: the global id would tell how many events
        // other agents' VMs had.
        Ok(events::number_in_vm(&conn, vm_id, id)?)
    }
}
