//! Our NBD client against real servers: `qemu-nbd` here (QEMU's built-in server is exercised
//! by the live-VM tests): size, reads, `base:allocation`, dirty bitmaps, and errors (missing
//! export, server killed mid-reply).

#![allow(clippy::unwrap_used)]

mod common;

use common::{qemu_io, serve, sh, Server};
use rewind_agent::nbd::{NbdClient, NbdError, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn image(dir: &Path, size: &str) -> PathBuf {
    let img = dir.join("d.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(size));
    img
}

#[test]
fn reads_and_reports_allocation_and_dirty_extents() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "64M");
    qemu_io(&img, "write -P 0x11 0 1M");
    qemu_io(&img, "write -z 8M 1M");
    sh(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    qemu_io(&img, "write -P 0x22 4M 128k");
    qemu_io(&img, "write -P 0x33 60M 64k");
    let sock = dir.path().join("nbd.sock");
    let _server = serve(&img, &sock, Some("b0"));

    let mut c =
        NbdClient::connect_unix(&sock, "disk", &["base:allocation", "qemu:dirty-bitmap:b0"])
            .unwrap();
    assert_eq!(c.size(), 64 << 20);

    let dirty: Vec<(u64, u64)> = c
        .block_status("qemu:dirty-bitmap:b0", 0, 64 << 20)
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty, vec![(4 << 20, 128 << 10), (60 << 20, 64 << 10)]);

    let alloc = c.block_status("base:allocation", 0, 64 << 20).unwrap();
    let covered: u64 = alloc.iter().map(|e| e.length).sum();
    assert_eq!(covered, 64 << 20, "extents cover the whole disk");
    let data_at = |off: u64| {
        alloc
            .iter()
            .find(|e| e.offset <= off && off < e.offset + e.length)
            .map(|e| e.flags)
            .unwrap()
    };
    assert_eq!(data_at(0) & (STATE_HOLE | STATE_ZERO), 0);
    assert_ne!(
        data_at(8 << 20) & STATE_ZERO,
        0,
        "written zeros read as zero"
    );
    assert_ne!(data_at(30 << 20) & STATE_HOLE, 0, "never written is a hole");

    let mut buf = vec![0u8; 3 << 20];
    c.read_at(&mut buf, 3 << 20).unwrap();
    assert!(buf[..1 << 20].iter().all(|&b| b == 0));
    assert!(buf[1 << 20..(1 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0x22));
    let mut big = vec![0u8; 9 << 20]; // more than one request
    c.read_at(&mut big, 0).unwrap();
    assert!(big[..1 << 20].iter().all(|&b| b == 0x11));
    assert!(big[4 << 20..(4 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0x22));
    c.disconnect();
}

#[test]
fn missing_export_and_missing_bitmap_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "8M");
    let sock = dir.path().join("nbd.sock");
    let _server = serve(&img, &sock, None);
    match NbdClient::connect_unix(&sock, "nope", &[]) {
        Err(NbdError::NoSuchExport(name)) => assert_eq!(name, "nope"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("connected to a missing export"),
    }
    match NbdClient::connect_unix(&sock, "disk", &["qemu:dirty-bitmap:absent"]) {
        Err(NbdError::NoContext(c)) => assert_eq!(c, "qemu:dirty-bitmap:absent"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("got a context the server does not have"),
    }
    let err = NbdClient::connect_unix(&dir.path().join("no.sock"), "disk", &[])
        .err()
        .unwrap();
    assert!(matches!(err, NbdError::Io(_)));
}

#[test]
fn server_killed_mid_reply_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "256M");
    qemu_io(&img, "write -P 0x44 0 256M");
    let sock = dir.path().join("nbd.sock");
    let mut server = serve(&img, &sock, None);
    let mut c = NbdClient::connect_unix(&sock, "disk", &["base:allocation"]).unwrap();
    let reads = Arc::new(AtomicU64::new(0));
    let done = reads.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 << 20];
        for round in 0..1000u64 {
            if let Err(e) = c.read_at(&mut buf, (round % 8) * (32 << 20)) {
                return Some(e);
            }
            done.fetch_add(1, Ordering::SeqCst);
        }
        None
    });
    // Killed once the reads are flowing, so it goes in the middle of one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reads.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no read completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let err = reader
        .join()
        .unwrap()
        .expect("reads fail once the server is gone");
    assert!(
        matches!(
            err,
            NbdError::Io(_) | NbdError::BadMagic(_) | NbdError::Protocol(_)
        ),
        "{err}"
    );
}

/// Pipelined writes and reads (16 in flight, replies in any order) against qemu-nbd: scattered
/// blocks written with write_many read back equal with read_many and with one-at-a-time reads;
/// a never-written range reads as zeros; a read past the end is an error, not a hang.
#[test]
fn pipelined_writes_and_reads_match() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "64M");
    let sock = dir.path().join("rw.sock");
    let child = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--format=qcow2",
            "--export-name=disk",
            "--shared=2",
        ])
        .arg(format!("--socket={}", sock.display()))
        .arg(&img)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _server = Server(child);
    let block = 64 * 1024usize;
    let blocks: Vec<u64> = (0..150u64)
        .map(|k| (k * 37) % 1000 + 1)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let data: Vec<Vec<u8>> = blocks
        .iter()
        .map(|&b| {
            (0..block)
                .map(|i| (b as usize * 7 + i / 97) as u8 | 1)
                .collect()
        })
        .collect();
    let mut c = NbdClient::connect_unix(&sock, "disk", &[]).unwrap();
    let writes: Vec<(u64, &[u8])> = blocks
        .iter()
        .zip(&data)
        .map(|(&b, d)| (b * block as u64, d.as_slice()))
        .collect();
    c.write_many(&writes).unwrap();
    c.flush().unwrap();

    let mut ranges: Vec<(u64, usize)> = blocks.iter().map(|&b| (b * block as u64, block)).collect();
    ranges.push((0, block)); // never written
    let mut got: Vec<Option<Vec<u8>>> = vec![None; ranges.len()];
    c.read_many(&ranges, &mut |i, bytes| got[i] = Some(bytes.to_vec()))
        .unwrap();
    for (k, d) in data.iter().enumerate() {
        assert_eq!(got[k].as_deref(), Some(d.as_slice()), "block {}", blocks[k]);
    }
    assert_eq!(got[blocks.len()].as_deref(), Some(&vec![0u8; block][..]));
    // The same through plain reads on another connection.
    let mut plain = NbdClient::connect_unix(&sock, "disk", &[]).unwrap();
    let mut buf = vec![0u8; block];
    plain.read_at(&mut buf, blocks[5] * block as u64).unwrap();
    assert_eq!(buf, data[5]);
    // Past the end of the 64 MiB export.
    let err = c
        .read_many(&[(64 << 20, block)], &mut |_, _| {})
        .unwrap_err();
    assert!(matches!(err, NbdError::Command { .. }), "{err:?}");
}
