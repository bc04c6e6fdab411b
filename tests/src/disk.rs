//! Disk images with known content for tests and benchmarks: sparse files, block writes, and a
//! content digest that treats holes as zeros without reading them.

use rand::{Rng, RngCore, SeedableRng};
use rustix::fs::SeekFrom as RawSeek;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Creates a sparse image of `size` bytes.
pub fn create(path: &Path, size: u64) {
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// Writes `data` at `offset`.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.write_all_at(data, offset).expect("write image");
    f.sync_all().expect("sync image");
}

/// Fills `count` blocks starting at block `first` with random bytes.
pub fn random_blocks(path: &Path, block: u64, first: u64, count: u64, rng: &mut impl RngCore) {
    let mut buf = vec![0u8; (block * count) as usize];
    rng.fill_bytes(&mut buf);
    write_at(path, first * block, &buf);
}

/// Rewrites `count` distinct random blocks (among the first `blocks`) with random content and
/// returns their indexes.
pub fn scatter_writes(
    path: &Path,
    block: u64,
    blocks: u64,
    count: usize,
    seed: u64,
) -> BTreeSet<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut picked = BTreeSet::new();
    while picked.len() < count {
        picked.insert(rng.random_range(0..blocks));
    }
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    let mut buf = vec![0u8; block as usize];
    for &i in &picked {
        rng.fill_bytes(&mut buf);
        buf[0] = 1; // never all zero
        f.write_all_at(&buf, i * block).expect("write block");
    }
    f.sync_all().expect("sync image");
    picked
}

/// Content digest of an image: its size and every non-zero 64 KiB piece with its offset.
/// Equal digests mean equal bytes; holes are skipped with SEEK_DATA instead of read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub hash: String,
}

pub fn digest(path: &Path) -> Digest {
    const PIECE: u64 = 64 * 1024;
    let f = File::open(path).expect("open image");
    let size = f.metadata().expect("stat").len();
    let mut h = blake3::Hasher::new();
    h.update(&size.to_le_bytes());
    let mut buf = vec![0u8; PIECE as usize];
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(&f, RawSeek::Data(pos)) {
            Ok(p) => p,
            Err(_) => break,
        };
        let end = rustix::fs::seek(&f, RawSeek::Hole(start))
            .unwrap_or(size)
            .min(size);
        let mut off = start / PIECE * PIECE;
        while off < end {
            let len = PIECE.min(size - off) as usize;
            f.read_exact_at(&mut buf[..len], off).expect("read image");
            if buf[..len].iter().any(|&b| b != 0) {
                h.update(&off.to_le_bytes());
                h.update(&buf[..len]);
            }
            off += PIECE;
        }
        pos = end.max(off);
    }
    Digest {
        size,
        hash: h.finalize().to_hex().to_string(),
    }
}

/// Bytes actually allocated on disk for a file (to check sparseness).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A realistic mixed image: zeros, text, repetitive binary, random data, in 1 MiB regions.
pub fn mixed(path: &Path, size: u64, seed: u64) {
    const REGION: u64 = 1 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let words = [
        "the ",
        "quick ",
        "brown ",
        "fox ",
        "jumps ",
        "over ",
        "lazy ",
        "dog ",
        "kernel ",
        "config ",
        "error ",
        "warning ",
        "user ",
        "session ",
        "GET /index.html ",
        "200 OK\n",
    ];
    let mut buf = vec![0u8; REGION as usize];
    let mut off = 0;
    while off < size {
        let len = REGION.min(size - off) as usize;
        let kind = rng.random_range(0..10);
        match kind {
            0..=2 => {
                off += REGION;
                continue;
            }
            3..=5 => {
                let mut i = 0;
                while i < len {
                    let w = words[rng.random_range(0..words.len())].as_bytes();
                    let n = w.len().min(len - i);
                    buf[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            6..=7 => {
                let pattern: [u8; 16] = rng.random();
                for (i, b) in buf[..len].iter_mut().enumerate() {
                    *b = pattern[i % 16] ^ ((i / 4096) as u8);
                }
            }
            _ => rng.fill_bytes(&mut buf[..len]),
        }
        f.write_all_at(&buf[..len], off).expect("write image");
        off += REGION;
    }
    f.sync_all().expect("sync image");
}

/// A 512-byte x86 boot sector (for SeaBIOS): prints `marker` and CR LF on COM1 (port 0x3f8),
/// then halts.
pub fn boot_sector(marker: &str) -> Vec<u8> {
    #[rustfmt::skip]
    let mut s = vec![
        0xFA,             // cli
        0x31, 0xC0,       // xor ax, ax
        0x8E, 0xD8,       // mov ds, ax
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xBE, 0x17, 0x7C, // mov si, 0x7c17 (the message below)
        0xFC,             // cld
        0xAC,             // .l: lodsb
        0x84, 0xC0,       // test al, al
        0x74, 0x03,       // jz .h
        0xEE,             // out dx, al
        0xEB, 0xF8,       // jmp .l
        0xF4,             // .h: hlt
        0xEB, 0xFD,       // jmp .h
    ];
    assert_eq!(s.len(), 0x17, "the message starts at 0x7c17");
    s.extend_from_slice(marker.as_bytes());
    s.extend_from_slice(b"\r\n\0");
    assert!(s.len() <= 510, "marker too long for a boot sector");
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}
