//! Pack files: where chunk data lives on the receiver.
//!
//! ```text
//!  packs/<id as 16 hex digits>.pack
//!  +----------+------------------------------------------------------------+
//!  | RWPACK01 | record | record | ...                                      |
//!  +----------+------------------------------------------------------------+
//!  record = "RWCK" | blake3 hash (32) | frame length (u32 le) | zstd frame
//! ```
//! Each writer appends to its own pack and never reopens an old one, so a crash can only leave
//! unreferenced bytes at the end of a pack. The catalog stores (pack, offset of the frame,
//! frame length); the record header lets a checker rebuild that index from the packs alone.
//!
//! Ordering rule: a chunk is durable (pack fsynced, and the pack's folder entry fsynced when the
//! pack was created) before the catalog refers to it. [`PackWriter::sync`] is that fsync.

use rewind_proto::Leaf;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// First bytes of every pack file.
pub const PACK_MAGIC: &[u8; 8] = b"RWPACK01";
/// First bytes of every record.
pub const RECORD_MAGIC: &[u8; 4] = b"RWCK";
/// Bytes of a record before its frame: magic, hash, length.
pub const RECORD_HEADER: u64 = 4 + 32 + 4;
/// A pack is closed once it passes 64 MiB: large enough to keep file counts low (a 1 TiB disk
/// makes ~16 k packs), small enough for gc to rewrite one quickly.
pub const PACK_TARGET_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum PackError {
    /// Reading or writing a pack failed (disk full shows up here as ENOSPC).
    #[error("pack {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The bytes at a catalogued place are not the record the catalog says.
    #[error("pack {path} offset {offset}: record header does not match chunk {hash}")]
    BadRecord {
        path: PathBuf,
        offset: u64,
        hash: Leaf,
    },
}

/// The file name of pack `id`.
pub fn pack_path(dir: &Path, id: i64) -> PathBuf {
    dir.join(format!("{id:016x}.pack"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Appends chunk records to one pack at a time.
pub struct PackWriter {
    dir: PathBuf,
    current: Option<(i64, File, u64)>,
    dirty: bool,
    /// Packs this writer moved away from, to seal once their rows are committed.
    retired: Vec<i64>,
}

impl PackWriter {
    pub fn new(dir: &Path) -> PackWriter {
        PackWriter {
            dir: dir.to_owned(),
            current: None,
            dirty: false,
            retired: Vec::new(),
        }
    }

    /// Packs finished since the last call: seal them in the transaction that indexes their
    /// last chunks (sealing earlier would let gc see a pack without all its rows).
    pub fn take_retired(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.retired)
    }

    /// The pack being appended to, if any.
    pub fn current(&self) -> Option<i64> {
        self.current.as_ref().map(|(id, _, _)| *id)
    }

    /// The pack the next record goes to, if one is open and not full.
    pub fn needs_pack(&self) -> bool {
        !matches!(&self.current, Some((_, _, len)) if *len < PACK_TARGET_BYTES)
    }

    /// Starts pack `id` (allocated by the catalog): creates it with its header and fsyncs the
    /// file and its folder, so that its name survives a crash before any record refers to it.
    pub fn open_pack(&mut self, id: i64) -> Result<(), PackError> {
        self.sync()?;
        if let Some(old) = self.current() {
            self.retired.push(old);
        }
        let path = pack_path(&self.dir, id);
        let mut f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all(PACK_MAGIC).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        self.current = Some((id, f, PACK_MAGIC.len() as u64));
        Ok(())
    }

    /// Appends one record and returns (pack id, offset of its frame). Not durable until
    /// [`PackWriter::sync`]. Call [`PackWriter::needs_pack`] first.
    pub fn append(&mut self, hash: &Leaf, frame: &[u8]) -> Result<(i64, u64), PackError> {
        let Some((id, file, len)) = self.current.as_mut() else {
            return Err(PackError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other("no open pack"),
            });
        };
        let path = pack_path(&self.dir, *id);
        let mut rec = Vec::with_capacity(RECORD_HEADER as usize + frame.len());
        rec.extend_from_slice(RECORD_MAGIC);
        rec.extend_from_slice(hash.as_bytes());
        rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        rec.extend_from_slice(frame);
        file.write_all_at(&rec, *len).map_err(io_err(&path))?;
        let offset = *len + RECORD_HEADER;
        *len += rec.len() as u64;
        self.dirty = true;
        Ok((*id, offset))
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), PackError> {
        if let (true, Some((id, file, _))) = (self.dirty, self.current.as_ref()) {
            file.sync_data()
                .map_err(io_err(&pack_path(&self.dir, *id)))?;
        }
        self.dirty = false;
        Ok(())
    }
}

/// Reads frames from packs, keeping files open across reads.
pub struct PackReader {
    dir: PathBuf,
    open: HashMap<i64, File>,
}

impl PackReader {
    pub fn new(dir: &Path) -> PackReader {
        PackReader {
            dir: dir.to_owned(),
            open: HashMap::new(),
        }
    }

    /// The frame of `hash` at `offset` in pack `id`, checking the record header around it.
    pub fn read(
        &mut self,
        id: i64,
        offset: u64,
        len: u32,
        hash: &Leaf,
    ) -> Result<Vec<u8>, PackError> {
        let path = pack_path(&self.dir, id);
        let file = match self.open.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(&path).map_err(io_err(&path))?)
            }
        };
        let bad = || PackError::BadRecord {
            path: path.clone(),
            offset,
            hash: *hash,
        };
        let start = offset.checked_sub(RECORD_HEADER).ok_or_else(bad)?;
        let mut buf = vec![0u8; RECORD_HEADER as usize + len as usize];
        file.read_exact_at(&mut buf, start).map_err(io_err(&path))?;
        let header_ok = &buf[..4] == RECORD_MAGIC
            && &buf[4..36] == hash.as_bytes()
            && buf[36..40] == len.to_le_bytes();
        if !header_ok {
            return Err(bad());
        }
        buf.drain(..RECORD_HEADER as usize);
        Ok(buf)
    }
}

/// Creates the packs folder if needed.
pub fn ensure_dir(dir: &Path) -> Result<(), PackError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_then_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PackWriter::new(dir.path());
        assert!(w.needs_pack());
        w.open_pack(7).expect("open");
        let h1 = Leaf([1; 32]);
        let h2 = Leaf([2; 32]);
        let (p1, o1) = w.append(&h1, b"first frame").expect("append");
        let (p2, o2) = w.append(&h2, b"second").expect("append");
        w.sync().expect("sync");
        assert_eq!((p1, p2), (7, 7));
        let mut r = PackReader::new(dir.path());
        assert_eq!(r.read(7, o1, 11, &h1).expect("read"), b"first frame");
        assert_eq!(r.read(7, o2, 6, &h2).expect("read"), b"second");
        assert!(matches!(
            r.read(7, o2, 6, &h1),
            Err(PackError::BadRecord { .. })
        ));
        assert!(matches!(
            r.read(7, 3, 6, &h1),
            Err(PackError::BadRecord { .. })
        ));
    }
}
