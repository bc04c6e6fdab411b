//! Reads the persistent bitmaps a qcow2 image lists in its header (names and flags), without
//! starting `qemu-img`: a rollback learns which bitmaps to export in well under a millisecond
//! instead of the 10-13 ms `qemu-img info` takes. Only the header, its extensions and the
//! bitmap directory are read (QEMU's `docs/interop/qcow2.txt`, version 2 and 3 images); every
//! offset and length is bounded before it is used.

use crate::live::BitmapInfo;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x5146_49fb;
/// Header extension type of the bitmaps extension.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// `autoclear_features` bit 0: the bitmaps extension is consistent with the image.
const AUTOCLEAR_BITMAPS: u64 = 1;
/// Bitmap flags: `in_use` (not stored cleanly: inconsistent) and `auto` (recording).
const FLAG_IN_USE: u32 = 1;
const FLAG_AUTO: u32 = 2;
/// QEMU's own limits: 65535 bitmaps, a directory of at most 64 MiB, a cluster at most 2 MiB.
const MAX_BITMAPS: u32 = 65_535;
const MAX_DIRECTORY: u64 = 64 << 20;
const MAX_HEADER: u32 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a qcow2 image")]
    NotQcow2 { path: PathBuf },
    #[error("{path}: malformed qcow2 header ({what})")]
    Malformed { path: PathBuf, what: &'static str },
}

/// The persistent bitmaps `path` lists. A bitmaps extension that the header does not mark
/// consistent (an image last written by a QEMU that did not know bitmaps) lists none.
pub fn bitmaps(path: &Path) -> Result<Vec<BitmapInfo>, Qcow2Error> {
    let f = File::open(path).map_err(|source| Qcow2Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let read = |offset: u64, len: usize| -> Result<Vec<u8>, Qcow2Error> {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .map_err(|source| Qcow2Error::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(buf)
    };
    let bad = |what| Qcow2Error::Malformed {
        path: path.to_owned(),
        what,
    };
    let head = read(0, 72).map_err(|_| Qcow2Error::NotQcow2 {
        path: path.to_owned(),
    })?;
    if be32(&head, 0) != MAGIC {
        return Err(Qcow2Error::NotQcow2 {
            path: path.to_owned(),
        });
    }
    // Version 2 has neither feature bits nor bitmaps; its extensions follow the 72 bytes.
    if be32(&head, 4) < 3 {
        return Ok(Vec::new());
    }
    let v3 = read(72, 32)?;
    let autoclear = be64(&v3, 16);
    let header_length = be32(&v3, 28);
    if !(104..=MAX_HEADER).contains(&header_length) {
        return Err(bad("header length"));
    }
    // Extensions: (type, length, data padded to 8 bytes) until type 0, within the first cluster.
    let cluster_bits = be32(&head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad("cluster size"));
    }
    let cluster = 1u64 << cluster_bits;
    let mut at = u64::from(header_length);
    let mut directory = None;
    loop {
        if at + 8 > cluster {
            return Err(bad("extensions past the first cluster"));
        }
        let ext = read(at, 8)?;
        let (kind, len) = (be32(&ext, 0), u64::from(be32(&ext, 4)));
        if kind == 0 {
            break;
        }
        if at + 8 + len > cluster {
            return Err(bad("extension past the first cluster"));
        }
        if kind == EXT_BITMAPS {
            if len < 24 {
                return Err(bad("bitmaps extension length"));
            }
            let data = read(at + 8, 24)?;
            directory = Some((be32(&data, 0), be64(&data, 8), be64(&data, 16)));
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let Some((count, size, offset)) = directory else {
        return Ok(Vec::new());
    };
    if autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_BITMAPS || size > MAX_DIRECTORY {
        return Err(bad("bitmap directory size"));
    }
    let dir = read(offset, size as usize)?;
    let mut out = Vec::with_capacity(count as usize);
    let mut pos = 0usize;
    for _ in 0..count {
        let entry = dir.get(pos..pos + 24).ok_or_else(|| bad("bitmap entry"))?;
        let flags = be32(entry, 12);
        let name_size = usize::from(u16::from_be_bytes([entry[18], entry[19]]));
        let extra = be32(entry, 20) as usize;
        let name_at = pos + 24 + extra;
        let name = dir
            .get(name_at..name_at + name_size)
            .ok_or_else(|| bad("bitmap name"))?;
        let name = std::str::from_utf8(name).map_err(|_| bad("bitmap name"))?;
        out.push(BitmapInfo {
            name: name.to_owned(),
            recording: flags & FLAG_AUTO != 0,
            inconsistent: flags & FLAG_IN_USE != 0,
            persistent: true,
        });
        pos = (name_at + name_size).div_ceil(8) * 8;
    }
    Ok(out)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> bool {
        Command::new("qemu-img")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn lists_the_bitmaps_qemu_img_wrote_with_their_flags() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let img = dir.path().join("d.qcow2");
        let p = img.to_str().expect("utf-8 path");
        assert!(
            qemu_img(&["create", "-f", "qcow2", p, "64M"]),
            "qemu-img create"
        );
        assert_eq!(bitmaps(&img).expect("no bitmaps").len(), 0);
        assert!(qemu_img(&["bitmap", "--add", p, "rewind-a"]));
        assert!(qemu_img(&["bitmap", "--add", p, "a-longer-name-of-17"]));
        assert!(qemu_img(&["bitmap", "--disable", p, "rewind-a"]));
        let got: Vec<(String, bool, bool)> = bitmaps(&img)
            .expect("bitmaps")
            .into_iter()
            .map(|b| (b.name, b.recording, b.inconsistent))
            .collect();
        assert_eq!(
            got,
            vec![
                ("rewind-a".to_owned(), false, false),
                ("a-longer-name-of-17".to_owned(), true, false)
            ]
        );
        // What qemu-img says about the same image.
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", p])
            .output()
            .expect("qemu-img info");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            v["format-specific"]["data"]["bitmaps"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );

        // An image marked in use (as a QEMU that died leaves it): the in_use flag, bit 0 of the
        // first entry's flags, set by hand in the directory.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .expect("open");
        let v3 = {
            let mut b = vec![0u8; 104];
            f.read_exact_at(&mut b, 0).expect("header");
            b
        };
        let mut at = u64::from(be32(&v3, 100));
        let dir_offset = loop {
            let mut ext = [0u8; 32];
            f.read_exact_at(&mut ext, at).expect("extension");
            if be32(&ext, 0) == EXT_BITMAPS {
                break be64(&ext, 24);
            }
            assert_ne!(be32(&ext, 0), 0, "no bitmaps extension");
            at += 8 + u64::from(be32(&ext, 4)).div_ceil(8) * 8;
        };
        let mut flags = [0u8; 4];
        f.read_exact_at(&mut flags, dir_offset + 12).expect("flags");
        flags[3] |= FLAG_IN_USE as u8;
        f.write_all_at(&flags, dir_offset + 12)
            .expect("write flags");
        assert!(bitmaps(&img).expect("bitmaps")[0].inconsistent);
    }

    #[test]
    fn refuses_what_is_not_a_qcow2_image() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let raw = dir.path().join("d.raw");
        std::fs::write(&raw, vec![0u8; 4096]).expect("write");
        assert!(matches!(bitmaps(&raw), Err(Qcow2Error::NotQcow2 { .. })));
        std::fs::write(&raw, b"QFI").expect("write");
        assert!(matches!(bitmaps(&raw), Err(Qcow2Error::NotQcow2 { .. })));
        // A qcow2 magic with a header length that points nowhere.
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[100..104].copy_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(&raw, &h).expect("write");
        assert!(matches!(
            bitmaps(&raw),
            Err(Qcow2Error::Malformed {
                what: "header length",
                ..
            })
        ));
    }
}
