//! Local packs: the chunk store as append-only pack files in the data folder's `packs/`.
//!
//! Each writer appends to its own pack file and never reopens an old one. Writes and ordered
//! reads use O_DIRECT where the file system takes it ([`DIRECT_ALIGN`]), so a seed's or a
//! restore's data does not pass through the page cache.
//!
//! Ordering rule: a chunk is durable (pack fdatasynced, and the pack's file and folder entry
//! fsynced when the pack was created) before the catalog refers to it. [`PackWriter::sync`] is
//! that fdatasync, [`PackWriter::open_pack`] the fsyncs at creation.

mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub use reader::PackReader;
pub use writer::PackWriter;

use super::format::pack_name;
use super::{ChunkReader, ChunkStore, ChunkStoreError, ChunkWriter, PackId, PackStat, ReadOrder};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// The folder of pack files inside the data folder.
pub const PACKS_DIR: &str = "packs";

/// Alignment O_DIRECT needs of offsets, lengths and memory.
pub const DIRECT_ALIGN: usize = 4096;

/// The pack files of one data folder.
#[derive(Debug, Clone)]
pub struct LocalPacks {
    dir: PathBuf,
}

impl LocalPacks {
    /// The packs of data folder `data`; nothing is created.
    pub fn new(data: &Path) -> LocalPacks {
        LocalPacks {
            dir: data.join(PACKS_DIR),
        }
    }

    /// The file of pack `id`, for tools and tests that look at a pack's bytes.
    pub fn pack_path(&self, id: PackId) -> PathBuf {
        pack_path(&self.dir, id)
    }

    /// The packs of data folder `data`, creating their folder if needed.
    pub fn create(data: &Path) -> Result<LocalPacks, ChunkStoreError> {
        let packs = LocalPacks::new(data);
        fs::create_dir_all(&packs.dir).map_err(io_err(&packs.dir))?;
        Ok(packs)
    }
}

/// The file of pack `id` in folder `dir`.
fn pack_path(dir: &Path, id: PackId) -> PathBuf {
    dir.join(pack_name(id))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ChunkStoreError + '_ {
    move |source| ChunkStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl ChunkStore for LocalPacks {
    fn writer(&self) -> Box<dyn ChunkWriter> {
        Box::new(PackWriter::new(&self.dir))
    }

    fn reader(&self, order: ReadOrder) -> Box<dyn ChunkReader> {
        Box::new(match order {
            ReadOrder::Random => PackReader::new(&self.dir),
            ReadOrder::Sequential => PackReader::sequential(&self.dir),
        })
    }

    /// Files named as a pack is (16 lowercase hex digits and `.pack`); a missing folder holds
    /// none.
    fn stored_packs(&self) -> Result<Vec<PackId>, ChunkStoreError> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Ok(Vec::new());
        };
        let mut ids = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".pack"))
                .and_then(|h| i64::from_str_radix(h, 16).ok())
                .map(PackId)
            else {
                continue;
            };
            if pack_path(&self.dir, id) == e.path() {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn pack_stat(&self, id: PackId) -> Option<PackStat> {
        let meta = fs::metadata(pack_path(&self.dir, id)).ok()?;
        // A time before the epoch reads as the far future: such a pack counts as recent.
        let modified_us = meta.modified().ok().map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(i64::MAX, |d| d.as_micros() as i64)
        });
        Some(PackStat {
            size: meta.len(),
            modified_us,
        })
    }

    fn remove_pack(&self, id: PackId) -> Result<(), ChunkStoreError> {
        let path = pack_path(&self.dir, id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ChunkStoreError::Io { path, source }),
        }
    }

    fn sync_removals(&self) {
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }

    fn stored_bytes(&self) -> u64 {
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}
