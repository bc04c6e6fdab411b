//! Uploads: verify a batch ahead of staging (bounds, hashes, lengths), write its new chunks
//! to the stream's pack and make them durable, then index them and stage the blocks in one
//! transaction.

use super::*;
use crate::catalog::usage;

impl Store {
    /// Verifies one batch and stages it: see [`Store::verify_batch`] and [`Store::stage_batch`].
    pub fn ingest(
        &self,
        owner: &str,
        session_id: &str,
        entries: Vec<Entry>,
        chunks: Vec<IncomingChunk>,
        writer: &mut dyn ChunkWriter,
    ) -> Result<BatchStats, StoreError> {
        let batch = self.verify_batch(owner, session_id, entries, chunks)?;
        self.stage_batch(owner, batch, writer)
    }

    /// Checks every entry against its disk and decompresses and hashes every chunk (an
    /// encrypted VM's: checks its envelope, see [`rewind_proto::crypt::check_envelope`]). Writes
    /// nothing, so batches of one stream can be verified while the previous one is written.
    pub fn verify_batch(
        &self,
        owner: &str,
        session_id: &str,
        entries: Vec<Entry>,
        chunks: Vec<IncomingChunk>,
    ) -> Result<VerifiedBatch, StoreError> {
        if entries.len() > MAX_BATCH_ENTRIES {
            return Err(StoreError::TooLarge {
                what: "block entries in one batch",
                got: entries.len(),
                max: MAX_BATCH_ENTRIES,
            });
        }
        // Staging checks the session again in its own transaction.
        let session = open_session(&*self.reader()?, owner, session_id)?;
        // Expected length of each referenced chunk, from the blocks that use it.
        let mut expected: HashMap<BlockHash, usize> = HashMap::new();
        for e in &entries {
            let disk = session
                .disks
                .get(e.pos as usize)
                .ok_or(StoreError::NoSuchDisk {
                    pos: e.pos,
                    disks: session.disks.len(),
                })?;
            let len =
                disk.geometry
                    .block_len(e.index)
                    .ok_or_else(|| StoreError::BlockOutOfRange {
                        disk: disk.name.clone(),
                        index: e.index,
                        blocks: disk.geometry.blocks(),
                    })?;
            if !e.leaf.is_zero() {
                expected.entry(e.leaf).or_insert(len);
            }
        }
        let mut verified = Vec::with_capacity(chunks.len());
        for c in chunks {
            let len = *expected
                .get(&c.hash)
                .ok_or(StoreError::UnreferencedChunk(c.hash))?;
            Codec::check_stored(session.sealed, c.hash, &c.frame, len)?;
            verified.push((c.hash, c.frame, len));
        }
        Ok(VerifiedBatch {
            session_id: session_id.to_owned(),
            session,
            entries,
            chunks: verified,
        })
    }

    /// Makes a verified batch's new chunks durable, then stages its entries in one
    /// transaction. A refused batch changes nothing visible.
    pub fn stage_batch(
        &self,
        owner: &str,
        batch: VerifiedBatch,
        writer: &mut dyn ChunkWriter,
    ) -> Result<BatchStats, StoreError> {
        self.stage_batches(owner, vec![batch], writer)
    }

    /// Group commit: makes the new chunks of several verified batches durable with one pack
    /// sync, then stages all their entries in one transaction (one catalog sync). A receiver
    /// that falls behind its stream thus pays two syncs per group, not per batch. A refused
    /// batch refuses the group and changes nothing visible.
    pub fn stage_batches(
        &self,
        owner: &str,
        batches: Vec<VerifiedBatch>,
        writer: &mut dyn ChunkWriter,
    ) -> Result<BatchStats, StoreError> {
        // What the store adds is counted per VM: a group spans one session.
        if batches
            .windows(2)
            .any(|w| w[0].session_id != w[1].session_id)
        {
            let mut total = BatchStats::default();
            for batch in batches {
                let s = self.stage_batches(owner, vec![batch], writer)?;
                total.entries += s.entries;
                total.chunks_stored += s.chunks_stored;
                total.chunk_bytes += s.chunk_bytes;
            }
            return Ok(total);
        }
        let all: Vec<&(BlockHash, bytes::Bytes, usize)> =
            batches.iter().flat_map(|b| &b.chunks).collect();
        let (placed, bytes) = self.write_new_chunks(owner, &all, writer)?;
        let stored = placed.len() as u64;
        // Chunks this group placed: indexed and owned once the transaction commits, with the
        // length they were verified at, so their blocks need no catalog lookup. (A re-sent
        // chunk the store already had is looked up: gc may have removed it meanwhile.)
        let sent: HashMap<BlockHash, usize> = placed.iter().map(|p| (p.0, p.2)).collect();

        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Self::index_chunks(&tx, owner, &all, &placed)?;
        for full in writer.take_retired() {
            crate::catalog::packs::seal(&tx, &full)?;
        }
        let mut entries_total = 0u64;
        for (n, batch) in batches.iter().enumerate() {
            let session_id = batch.session_id.as_str();
            let session = &batch.session;
            // The session may have been committed, or resumed with other disks, by a racing
            // stream while we verified: the entries were checked against the disks of then.
            if n == 0 || batches[n - 1].session_id != batch.session_id {
                let now = open_session(&tx, owner, session_id)?;
                let same = now.disks.len() == session.disks.len()
                    && now
                        .disks
                        .iter()
                        .zip(&session.disks)
                        .all(|(a, b)| a.name == b.name && a.geometry == b.geometry);
                if !same {
                    return Err(StoreError::SessionClosed(names::shown(session_id)));
                }
            }
            let mut held = crate::catalog::chunks::Lengths::new(&tx)?;
            let mut stage = sessions::Stager::new(&tx)?;
            for e in &batch.entries {
                let disk = &session.disks[e.pos as usize];
                if !e.leaf.is_zero() {
                    let ulen = match sent.get(&e.leaf) {
                        Some(&ulen) => Some(ulen as i64),
                        None => held.of(owner, &e.leaf)?,
                    };
                    let Some(ulen) = ulen else {
                        return Err(StoreError::ChunkNotHeld {
                            disk: disk.name.clone(),
                            index: e.index,
                            hash: e.leaf,
                        });
                    };
                    let want = disk.geometry.block_len(e.index).unwrap_or(0);
                    if ulen as usize != want {
                        return Err(StoreError::ChunkLength {
                            disk: disk.name.clone(),
                            index: e.index,
                            hash: e.leaf,
                            expected: want,
                            stored: ulen as usize,
                        });
                    }
                }
                stage.stage(session_id, e.pos, e.index, &e.leaf)?;
            }
            entries_total += batch.entries.len() as u64;
            if n + 1 < batches.len() {
                rewind_proto::faults::point("between-batches");
            }
            sessions::touch(&tx, session_id, now_us())?;
        }
        // What this VM's uploads added to the store, for metrics.
        if let Some(first) = batches.first() {
            usage::add_vm_stored(&tx, first.session.vm_id, stored as i64, bytes as i64)?;
        }
        tx.commit()?;
        Ok(BatchStats {
            entries: entries_total,
            chunks_stored: stored,
            chunk_bytes: bytes,
        })
    }

    /// Appends the chunks `owner` does not hold yet to a pack and syncs it; the caller indexes
    /// them in the transaction that stages the blocks using them. What other owners hold plays
    /// no part: the work (and so the time) of an upload depends on the uploader's data alone.
    fn write_new_chunks(
        &self,
        owner: &str,
        chunks: &[&(BlockHash, bytes::Bytes, usize)],
        writer: &mut dyn ChunkWriter,
    ) -> Result<(Vec<Placed>, u64), StoreError> {
        if chunks.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let fresh: Vec<&(BlockHash, bytes::Bytes, usize)> = {
            let conn = self.conn();
            let mut held = crate::catalog::chunks::Held::new(&conn)?;
            let mut fresh = Vec::new();
            let mut seen = HashSet::new();
            for &c in chunks {
                if seen.insert(c.0) && !held.holds(owner, &c.0)? {
                    fresh.push(c);
                }
            }
            if let Some(mib) = self.rules().quota(owner).stored_mib {
                let held = usage::held_bytes(&conn, owner)?;
                let adding: u64 = fresh.iter().map(|c| c.1.len() as u64).sum();
                if held.max(0) as u64 + adding > mib << 20 {
                    return Err(StoreError::Quota {
                        agent: owner.to_owned(),
                        what: format!(
                            "{} MiB stored, {} MiB more sent",
                            held >> 20,
                            adding.div_ceil(1 << 20)
                        ),
                        key: "stored_mib",
                        limit: mib,
                    });
                }
            }
            fresh
        };
        let mut placed = Vec::with_capacity(fresh.len());
        let mut bytes = 0u64;
        for (hash, frame, ulen) in fresh {
            if writer.needs_pack() {
                let id = crate::catalog::new_pack(&self.conn(), "serve")?;
                writer.open_pack(id)?;
            }
            let at = writer.append(hash, frame)?;
            bytes += frame.len() as u64;
            placed.push((*hash, at, *ulen));
        }
        // Durable before referenced.
        writer.sync()?;
        rewind_proto::faults::point("after-pack-sync");
        Ok((placed, bytes))
    }

    /// Indexes placed chunks and renews the gc grace of re-sent ones, inside the caller's
    /// transaction (the one that also stages the blocks using them, so gc never sees them
    /// unreferenced).
    fn index_chunks(
        tx: &Transaction<'_>,
        owner: &str,
        sent: &[&(BlockHash, bytes::Bytes, usize)],
        placed: &[Placed],
    ) -> Result<(), StoreError> {
        let now = now_us();
        // Chunks placed now are indexed with `now` below; only re-sent ones need renewing.
        let new: HashSet<BlockHash> = placed.iter().map(|p| p.0).collect();
        let resent = sent.iter().map(|c| &c.0).filter(|h| !new.contains(h));
        crate::catalog::chunks::renew(tx, owner, resent, now)?;
        if crate::catalog::chunks::any_quarantined(tx, owner)? {
            let placed_hashes = placed.iter().map(|p| &p.0);
            for hash in crate::catalog::chunks::heal(tx, owner, placed_hashes)? {
                tracing::info!(chunk = %hash, "damaged chunk healed");
            }
        }
        // What the owner now holds more, for its storage quota (a row a racing stream of the
        // same owner inserted first is not counted twice).
        // An encrypted VM's frame names the data key that sealed it: the chunk row keeps it,
        // and its wrapped key is kept while a row names it.
        let sealed: HashMap<BlockHash, [u8; 8]> = sent
            .iter()
            .filter_map(|c| Some((c.0, rewind_proto::crypt::envelope_key_id(&c.1)?)))
            .collect();
        let key_of = |h: &BlockHash| sealed.get(h).copied();
        let (added, bytes) = crate::catalog::chunks::index(tx, owner, placed, &key_of, now)?;
        if added > 0 {
            crate::catalog::add_usage(tx, owner, added, bytes)?;
        }
        Ok(())
    }

    /// Seals the pack an upload stream was writing, once the stream ended.
    pub fn finish_upload(&self, writer: &mut dyn ChunkWriter) -> Result<(), StoreError> {
        // An object store's writer publishes its last pack first (sealed only once it is in
        // the bucket).
        writer.finish()?;
        let conn = self.conn();
        for r in writer.take_retired() {
            crate::catalog::packs::seal(&conn, &r)?;
        }
        if let Some(id) = writer.current() {
            crate::catalog::seal_pack(&conn, id)?;
        }
        Ok(())
    }

    /// Drops a session's staged rows, a bounded delete per transaction.
    pub fn drop_staged(&self, session_id: &str) -> Result<(), StoreError> {
        loop {
            let conn = self.conn();
            let n = sessions::drop_staged_step(&conn, session_id, STAGED_DELETE_STEP)?;
            parking_lot::MutexGuard::unlock_fair(conn);
            if n < STAGED_DELETE_STEP {
                return Ok(());
            }
        }
    }
}
