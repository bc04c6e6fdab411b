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
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Alignment of buffers, offsets and lengths of O_DIRECT reads.
pub const DIRECT_ALIGN: usize = 4096;

/// An open raw disk.
pub struct RawDisk {
    file: File,
    /// A second handle opened with O_DIRECT, for reads that bypass the page cache.
    direct: Option<File>,
    /// With `direct`: a handle without read-ahead, that asks whether a range is in the page
    /// cache and reads what O_DIRECT does not, so nothing past what is asked enters the cache
    /// (read-ahead would load the start of the next step, and the probe would then send it,
    /// and every step after it, through the cache).
    uncached: Option<File>,
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
            direct: None,
            uncached: None,
            path: path.to_owned(),
            size,
        })
    }

    /// A second handle on the same disk (reading through the page cache).
    pub fn try_clone(&self) -> Result<RawDisk, DiskError> {
        Ok(RawDisk {
            file: self.file.try_clone().map_err(|e| self.io(e))?,
            direct: None,
            uncached: None,
            path: self.path.clone(),
            size: self.size,
        })
    }

    /// Reads aligned ranges that are not in the page cache with O_DIRECT from now on, where
    /// the file system allows it: a first full read of a disk whose image is not cached (a
    /// running VM's, opened by QEMU with `cache=none`) otherwise spends more CPU filling the
    /// cache than compressing (measured: 7 s of kernel time to read a 3 GB image) and evicts
    /// the host's useful pages, while an image the cache holds reads faster through it.
    pub fn read_direct(mut self) -> RawDisk {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        // The same file even if its path was replaced since it was opened.
        let same = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&same)
            .ok();
        let uncached = File::open(&same)
            .ok()
            .filter(|f| rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::Random).is_ok());
        if let (Some(direct), Some(uncached)) = (direct, uncached) {
            self.direct = Some(direct);
            self.uncached = Some(uncached);
        }
        self
    }

    /// Whether the page at `offset` is in the page cache (a read that may neither wait for
    /// the device nor start a read succeeds): taken as a sign for the range that starts there.
    fn cached(&self, offset: u64) -> bool {
        let Some(probe) = &self.uncached else {
            return true;
        };
        let mut page = [0u8; 1];
        let mut bufs = [std::io::IoSliceMut::new(&mut page)];
        matches!(
            rustix::io::preadv2(probe, &mut bufs, offset, rustix::io::ReadWriteFlags::NOWAIT),
            Ok(1)
        )
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
        self.uncached
            .as_ref()
            .unwrap_or(&self.file)
            .read_exact_at(buf, offset)
            .map_err(|e| self.io(e))
    }

    /// Reads exactly `buf.len()` bytes at `offset` with O_DIRECT when reads were asked to
    /// bypass the page cache, the range is not in it, and `buf` and `offset` are aligned (the
    /// unaligned tail of a disk goes through the page cache). Returns false otherwise, or when
    /// the file system refuses O_DIRECT reads (then they are not tried again), and the caller
    /// reads the range itself.
    pub fn read_at_direct(&mut self, buf: &mut [u8], offset: u64) -> Result<bool, DiskError> {
        let Some(direct) = &self.direct else {
            return Ok(false);
        };
        if self.cached(offset) {
            return Ok(false);
        }
        let aligned_len = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        if aligned_len == 0
            || !(buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            || !offset.is_multiple_of(DIRECT_ALIGN as u64)
        {
            return Ok(false);
        }
        let (head, tail) = buf.split_at_mut(aligned_len);
        match direct.read_exact_at(head, offset) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                self.direct = None;
                return Ok(false);
            }
            Err(e) => return Err(self.io(e)),
        }
        if !tail.is_empty() {
            self.read_at(tail, offset + aligned_len as u64)?;
        }
        Ok(true)
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

    /// An aligned slice of `len` bytes inside `backing`.
    fn aligned(backing: &mut Vec<u8>, len: usize) -> &mut [u8] {
        backing.resize(len + DIRECT_ALIGN, 0);
        let at = backing
            .as_ptr()
            .align_offset(DIRECT_ALIGN)
            .min(DIRECT_ALIGN);
        &mut backing[at..at + len]
    }

    #[test]
    fn reads_past_the_page_cache_only_what_it_does_not_hold() {
        // In the checkout, not in /tmp: a tmpfs there would refuse O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let path = dir.path().join("d.raw");
        // An unaligned tail: the last 1000 bytes go through the page cache.
        let data: Vec<u8> = (0..(3 << 20) + 1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut f = File::create(&path).expect("create");
        f.write_all(&data).expect("write");
        f.sync_all().expect("sync");
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("evict");

        let mut d = RawDisk::open(&path).expect("open").read_direct();
        let mut backing = Vec::new();
        let buf = aligned(&mut backing, data.len() - 4096);
        assert!(
            d.read_at_direct(buf, 4096).expect("direct read"),
            "an evicted range is read with O_DIRECT"
        );
        assert_eq!(buf, &data[4096..]);
        // An unaligned place is read through the page cache.
        let mut small = vec![0u8; 8192];
        assert!(!d.read_at_direct(&mut small, 4096).expect("unaligned"));

        // Once the range is cached, it is read through the cache.
        let mut whole = vec![0u8; data.len()];
        d.read_at(&mut whole, 0).expect("buffered read");
        assert_eq!(whole, data);
        let buf = aligned(&mut backing, 1 << 20);
        assert!(
            !d.read_at_direct(buf, 1 << 20).expect("probe"),
            "a cached range is left to the page cache"
        );

        // A handle not asked to bypass the cache never does.
        let mut plain = RawDisk::open(&path).expect("open");
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("evict");
        let buf = aligned(&mut backing, 1 << 20);
        assert!(!plain.read_at_direct(buf, 0).expect("plain"));
    }
}
