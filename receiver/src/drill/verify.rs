//! The drill's first step: every block of the point is read and checked against its hash, and
//! each disk's leaves against its root, reading the store and writing nothing.

use super::{Damage, DrillOptions, DrillReport};
use crate::catalog::leaves::{self, Columns};
use crate::catalog::PointId;
use crate::chunks::{self, ReadOrder};
use crate::error::StoreError;
use crate::points::{PointDisk, PointInfo};
use rayon::prelude::*;
use rewind_proto::crypt::Codec;
use rewind_proto::format::DiskGeometry;
use rewind_proto::report::chain;
use rewind_proto::tree::{self, Builder, Shape};
use rewind_proto::BlockHash;
use rusqlite::Connection;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks decoded per parallel batch while verifying.
const BATCH_BLOCKS: usize = 256;
/// Most damaged blocks listed in one report (the count is always exact).
const MAX_LISTED: usize = 100;

/// Verifies every disk of `point` in turn, adding what it found to `report`; Err is the reason
/// the drill fails (a damaged block, an unreadable catalog, a cancel).
pub(super) fn verify_point(
    data: &Path,
    conn: &Connection,
    point: &PointInfo,
    (opts, codec): (&DrillOptions, &Codec),
    report: &mut DrillReport,
) -> Result<(), String> {
    let total: u64 = point.disks.iter().map(|d| d.size).sum();
    let mut before = 0u64;
    for disk in &point.disks {
        let report_progress = |done: u64| (opts.progress)(before + done, total);
        let v = verify_disk(
            conn,
            (data, codec),
            point.id,
            disk,
            &opts.cancel,
            &report_progress,
        )
        .map_err(|e| format!("verifying {}: {}", disk.name, chain(&e)))?;
        before += disk.size;
        rewind_proto::faults::point("drill-after-verify");
        report.blocks_verified += v.blocks;
        report.bytes_verified += v.bytes;
        report.damaged_blocks += v.damaged;
        for d in v.listed {
            if report.damaged.len() < MAX_LISTED {
                report.damaged.push(d);
            }
        }
        if opts.cancel.load(Ordering::Relaxed) {
            return Err("cancelled (signal) while verifying".into());
        }
    }
    if !report.damaged.is_empty() {
        let first: Vec<String> = report
            .damaged
            .iter()
            .take(5)
            .map(|d| match d.block {
                Some(b) => format!("{} block {} ({}): {}", d.disk, b, d.hash, d.problem),
                None => format!("{}: {}", d.disk, d.problem),
            })
            .collect();
        return Err(format!(
            "{} damaged block(s): {}",
            report.damaged_blocks,
            first.join("; ")
        ));
    }
    Ok(())
}

/// What verifying one disk found.
struct Verified {
    blocks: u64,
    bytes: u64,
    damaged: u64,
    listed: Vec<Damage>,
}

/// Reads and checks every block of one disk of a point: each chunk decompresses to its block's
/// length and hash, and the leaves give the disk's root.
fn verify_disk(
    conn: &Connection,
    (data, codec): (&Path, &Codec),
    point: i64,
    disk: &PointDisk,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64),
) -> Result<Verified, StoreError> {
    let geometry =
        DiskGeometry::new(disk.size, disk.block_size).map_err(|source| StoreError::Geometry {
            disk: disk.name.clone(),
            source,
        })?;
    let mut reader = chunks::open(data)?.reader(ReadOrder::Sequential);
    let mut builder = Builder::new(Shape::of(&geometry));
    let mut next = 0u64;
    let mut out = Verified {
        blocks: 0,
        bytes: 0,
        damaged: 0,
        listed: Vec::new(),
    };
    let mut batch: Vec<(u64, BlockHash, Result<Vec<u8>, String>)> =
        Vec::with_capacity(BATCH_BLOCKS);
    let check = |batch: Vec<(u64, BlockHash, Result<Vec<u8>, String>)>, out: &mut Verified| {
        let problems: Vec<(u64, BlockHash, String)> = batch
            .into_par_iter()
            .filter_map(|(idx, leaf, frame)| {
                let len = geometry.block_len(idx).unwrap_or(0);
                let problem = match frame {
                    Err(e) => Some(e),
                    Ok(f) => codec.check(leaf, &f, len).err().map(|e| e.to_string()),
                };
                problem.map(|p| (idx, leaf, p))
            })
            .collect();
        for (idx, leaf, problem) in problems {
            out.damaged += 1;
            if out.listed.len() < MAX_LISTED {
                out.listed.push(Damage {
                    disk: disk.name.clone(),
                    block: Some(idx),
                    hash: leaf.to_hex(),
                    problem,
                });
            }
        }
    };
    let span = leaves::Span::all_leaves(disk.disk_id, PointId(point));
    leaves::at_point(conn, &span, Columns::Located, |node| {
        let (idx, leaf, loc) = (node.idx, node.hash, node.at);
        let Some(len) = geometry.block_len(idx) else {
            return Ok(ControlFlow::Continue(()));
        };
        builder.push_zeros(idx - next);
        builder.push(leaf);
        next = idx + 1;
        let frame = match loc {
            None => Err("its chunk is missing from the store".to_owned()),
            Some(at) => reader.read(at, &leaf).map_err(|e| chain(&e)),
        };
        batch.push((idx, leaf, frame));
        out.blocks += 1;
        out.bytes += len as u64;
        if batch.len() == BATCH_BLOCKS {
            check(std::mem::take(&mut batch), &mut out);
            progress(geometry.offset(idx) + len as u64);
            if cancel.load(Ordering::Relaxed) {
                return Err(StoreError::Cancelled);
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    check(batch, &mut out);
    progress(geometry.size);
    let root = tree::root(&geometry, builder.finish());
    if root != disk.root_leaf {
        out.damaged += 1;
        out.listed.push(Damage {
            disk: disk.name.clone(),
            block: None,
            hash: root.to_hex(),
            problem: format!(
                "the catalog's leaves give root {root}, the point was committed with {}",
                disk.root_leaf
            ),
        });
    }
    Ok(out)
}

/// The key check of an encrypted point: its first stored chunk is read, decrypted with the
/// codec's key, decompressed and hashed to its keyed id. Proves the key still opens the
/// keyring (its manifest MAC was checked when the codec was chosen) without a restore.
pub(super) fn key_check(
    data: &Path,
    conn: &Connection,
    point: &PointInfo,
    codec: &Codec,
) -> Result<u64, String> {
    let mut reader = chunks::open(data)
        .map_err(|e| chain(&e))?
        .reader(ReadOrder::Random);
    for disk in &point.disks {
        let geometry = DiskGeometry::new(disk.size, disk.block_size).map_err(|e| e.to_string())?;
        let span = leaves::Span::all_leaves(disk.disk_id, PointId(point.id));
        let mut first = None;
        leaves::at_point(conn, &span, Columns::Located, |node| {
            first = Some((node.idx, node.hash, node.at));
            Ok::<_, StoreError>(ControlFlow::Break(()))
        })
        .map_err(|e| chain(&e))?;
        let Some((idx, leaf, at)) = first else {
            continue;
        };
        let at = at.ok_or_else(|| format!("{} block {idx}: its chunk is missing", disk.name))?;
        let frame = reader.read(at, &leaf).map_err(|e| chain(&e))?;
        let len = geometry.block_len(idx).unwrap_or(0);
        codec
            .decode(leaf, &frame, len)
            .map_err(|e| format!("{} block {idx}: {e}", disk.name))?;
        return Ok(len as u64);
    }
    Err("the point holds no data block to decrypt".into())
}
