//! Verify on object storage, without egress by default.
//!
//! Each pack in scope is checked against what the store keeps of it (a HEAD: its size, and its
//! SHA-256 where the store reports one, else its ETag, the MD5 of an object written in one PUT),
//! compared with the digest recorded when the pack was published. A pack whose copy is in the
//! local cache has its chunks re-hashed from there (after checking the copy against the
//! recorded digest: a bad copy is dropped, not blamed on the bucket). Nothing is read from the
//! bucket unless asked: a deep verify reads back whole packs, the longest unread first, up to
//! a byte budget per run, and checks them and their chunks.

use super::{check_frame, Row, StoreReport};
use crate::catalog::{now_us, packs};
use crate::chunks::format::frame_in;
use crate::chunks::s3::{ObjectStat, S3Packs};
use crate::chunks::{PackDigest, PackId};
use crate::error::StoreError;
use base64::Engine as _;
use rewind_proto::BlockHash;
use rusqlite::Connection;
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// Size assumed for a pack whose size was not recorded, when spending a deep budget.
const UNKNOWN_PACK_BYTES: u64 = crate::chunks::format::PACK_TARGET_BYTES;

/// How one pack's chunks are checked.
enum Source {
    /// The pack's bytes (a checked cache copy, or read back from the bucket).
    Bytes(Vec<u8>),
    /// The store's copy matches the recorded digest; no bytes to re-hash here.
    Store,
    /// The store's copy is missing or differs: every chunk in it is bad.
    Bad(String),
    /// Not published yet (a stream is writing it, or its upload waits for a retry): its
    /// chunks are on local disk only, and not checked this run.
    Unpublished,
}

/// Walks chunk rows in pack order, deciding once per pack how to check it.
pub(super) struct PackChecks<'a> {
    packs: &'a S3Packs,
    deep: HashSet<PackId>,
    current: Option<(PackId, Source)>,
    pub report: StoreReport,
    before: [u64; 5],
}

fn counters(p: &S3Packs) -> [u64; 5] {
    let c = p.counters();
    [
        c.puts.load(Ordering::Relaxed),
        c.gets.load(Ordering::Relaxed),
        c.heads.load(Ordering::Relaxed),
        c.lists.load(Ordering::Relaxed) + c.deletes.load(Ordering::Relaxed),
        c.bytes_down.load(Ordering::Relaxed),
    ]
}

/// Whether `stat` (what the store says) agrees with `d` (what was uploaded); the reason when not.
fn compare(stat: &ObjectStat, d: &PackDigest) -> Result<(), String> {
    if stat.size != d.bytes {
        return Err(format!(
            "the store holds {} bytes of it, {} were uploaded",
            stat.size, d.bytes
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    if let Some(sum) = &stat.sha256 {
        return match b64.decode(sum) {
            Ok(s) if s == d.sha256 => Ok(()),
            _ => Err(format!("the store's SHA-256 {sum} is not the uploaded one")),
        };
    }
    match &stat.etag {
        // A single-PUT object's ETag is the MD5 of its bytes.
        Some(e) if e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit()) => {
            if e.eq_ignore_ascii_case(&hex::encode(d.md5)) {
                Ok(())
            } else {
                Err(format!("the store's ETag {e} is not the uploaded MD5"))
            }
        }
        _ => Ok(()), // the store keeps no checksum we can compare: the size is all
    }
}

impl<'a> PackChecks<'a> {
    /// Checks for the packs `in_scope`; with `deep_budget`, the packs a deep verify reads back.
    pub fn new(
        conn: &Connection,
        packs: &'a S3Packs,
        in_scope: &[i64],
        deep_budget: Option<u64>,
    ) -> Result<PackChecks<'a>, StoreError> {
        let mut deep = HashSet::new();
        if let Some(budget) = deep_budget {
            let mut spent = 0u64;
            for (id, bytes) in packs::deep_order(conn, in_scope)? {
                let bytes = bytes.unwrap_or(UNKNOWN_PACK_BYTES);
                if spent + bytes > budget {
                    break;
                }
                spent += bytes;
                deep.insert(id);
            }
        }
        Ok(PackChecks {
            packs,
            deep,
            current: None,
            report: StoreReport::default(),
            before: counters(packs),
        })
    }

    /// Decides how pack `id` is checked: asks the store, then finds bytes to re-hash.
    fn open(&mut self, conn: &Connection, id: PackId) -> Result<Source, StoreError> {
        if !packs::is_sealed(conn, id)? {
            self.report.packs_unpublished += 1;
            return Ok(Source::Unpublished);
        }
        let recorded = packs::digest(conn, id)?;
        self.report.packs_checked += 1;
        let Some(stat) = self.packs.stat(id)? else {
            return Ok(Source::Bad(format!("pack {id} is missing from the store")));
        };
        match &recorded {
            Some(d) => {
                if let Err(why) = compare(&stat, d) {
                    return Ok(Source::Bad(format!("pack {id}: {why}")));
                }
            }
            None => self.report.packs_without_digest += 1,
        }
        if self.deep.contains(&id) {
            let bytes = self.packs.read_remote(id)?;
            self.report.packs_read_back += 1;
            if recorded.as_ref().is_some_and(|d| !d.matches(&bytes)) {
                return Ok(Source::Bad(format!(
                    "pack {id}: the bytes read back are not the ones uploaded"
                )));
            }
            packs::set_deep_verified(conn, id, now_us())?;
            return Ok(Source::Bytes(bytes));
        }
        match self.packs.cached_copy(id)? {
            Some(bytes) if recorded.as_ref().is_some_and(|d| !d.matches(&bytes)) => {
                tracing::warn!(pack = %id, "cached copy differs from the uploaded pack: dropped");
                self.packs.drop_cached(id);
                self.report.cache_copies_dropped += 1;
                Ok(Source::Store)
            }
            Some(bytes) => {
                self.report.packs_rehashed_locally += 1;
                Ok(Source::Bytes(bytes))
            }
            None => Ok(Source::Store),
        }
    }

    /// Checks one chunk row: Err with the reason when it is bad.
    pub fn check(
        &mut self,
        conn: &Connection,
        row: &Row,
    ) -> Result<Result<(), String>, StoreError> {
        let id = row.at.pack;
        if self.current.as_ref().is_none_or(|(c, _)| *c != id) {
            self.current = None;
            let source = self.open(conn, id)?;
            self.current = Some((id, source));
        }
        let Some((_, source)) = &self.current else {
            return Ok(Ok(()));
        };
        let leaf = BlockHash::from_slice(&row.hash)?;
        Ok(match source {
            Source::Store | Source::Unpublished => Ok(()),
            Source::Bad(why) => Err(why.clone()),
            Source::Bytes(bytes) => match frame_in(bytes, row.at, &leaf) {
                Some(frame) => check_frame(&leaf, frame, row.ulen),
                None => Err(format!(
                    "pack {id} offset {}: record header does not match the chunk",
                    row.at.offset
                )),
            },
        })
    }

    /// The report, with the requests and bytes this run cost.
    pub fn finish(mut self) -> StoreReport {
        let now = counters(self.packs);
        let d: Vec<u64> = now.iter().zip(self.before).map(|(a, b)| a - b).collect();
        self.report.requests = d[0] + d[1] + d[2] + d[3];
        self.report.gets = d[1];
        self.report.heads = d[2];
        self.report.bytes_read = d[4];
        self.report
    }
}
