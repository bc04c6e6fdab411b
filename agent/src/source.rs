//! A disk given as a raw image file or a block device: its size, where its data lies
//! (`SEEK_DATA`/`SEEK_HOLE`), and positioned reads.

use rustix::fs::SeekFrom as RawSeek;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DiskError {
    /// The image or device could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open raw disk.
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawDisk {
    /// Opens a raw image or block device read-only.
    pub fn open(path: &Path) -> Result<RawDisk, DiskError> {
        let err = |source| DiskError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(err)?;
        // Block devices report 0 as their metadata length; seeking to the end works for both.
        let size = file.seek(SeekFrom::End(0)).map_err(err)?;
        Ok(RawDisk {
            file,
            path: path.to_owned(),
            size,
        })
    }

    /// A second handle on the same disk.
    pub fn try_clone(&self) -> Result<RawDisk, DiskError> {
        Ok(RawDisk {
            file: self.file.try_clone().map_err(|e| self.io(e))?,
            path: self.path.clone(),
            size: self.size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The byte ranges that may hold data, in order; everything else is a hole. A file system
    /// or device without `SEEK_DATA` support reports the whole disk as data.
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>, DiskError> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let start = match rustix::fs::seek(&self.file, RawSeek::Data(pos)) {
                Ok(p) => p,
                Err(rustix::io::Errno::NXIO) => break,
                Err(rustix::io::Errno::INVAL) if out.is_empty() && pos == 0 => {
                    return Ok(vec![(0, self.size)]);
                }
                Err(e) => return Err(self.io(e.into())),
            };
            if start >= self.size {
                break;
            }
            let end = match rustix::fs::seek(&self.file, RawSeek::Hole(start)) {
                Ok(p) => p.min(self.size),
                Err(rustix::io::Errno::NXIO) => self.size,
                Err(e) => return Err(self.io(e.into())),
            };
            if end <= start {
                break;
            }
            out.push((start, end));
            pos = end;
        }
        Ok(out)
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.file.read_exact_at(buf, offset).map_err(|e| self.io(e))
    }

    fn io(&self, source: std::io::Error) -> DiskError {
        DiskError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn finds_data_in_a_sparse_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.raw");
        let mut f = File::create(&path).expect("create");
        f.set_len(64 << 20).expect("set_len");
        f.seek(SeekFrom::Start(8 << 20)).expect("seek");
        f.write_all(&[1u8; 65536]).expect("write");
        f.sync_all().expect("sync");
        let d = RawDisk::open(&path).expect("open");
        assert_eq!(d.size(), 64 << 20);
        let ext = d.data_extents().expect("extents");
        assert!(!ext.is_empty());
        let covered: u64 = ext.iter().map(|(s, e)| e - s).sum();
        assert!(covered < 8 << 20, "holes are skipped: {ext:?}");
        assert!(ext
            .iter()
            .any(|&(s, e)| s <= 8 << 20 && e >= (8 << 20) + 65536));
    }
}
