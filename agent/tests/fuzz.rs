//! Fuzzing the parsers of foreign bytes on the agent's side with a seeded random driver (stable
//! toolchain): our NBD client against mutations of a transcript recorded from a real
//! `qemu-nbd`, and the qcow2 header and bitmap-directory reader against mutations of an image
//! `qemu-img` wrote. Every input must give a result or an error, never a panic or a hang.
//!
//! The driver is `rewind_proto::fuzz`: `REWIND_FUZZ_CASES` sets the mutations per target;
//! `REWIND_FUZZ_SEED` replays one seed. Each target prints its executions.

#![allow(clippy::unwrap_used)]

mod common;

use common::{serve, sh};
use rand::SeedableRng;
use rewind_agent::nbd::NbdClient;
use rewind_proto::fuzz::mutate;
use std::io::{Cursor, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// A qcow2 image with data, zeros and a persistent dirty bitmap.
fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("d.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("8M"));
    common::qemu_io(&img, "write -P 0x11 0 256k");
    sh(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    common::qemu_io(&img, "write -P 0x22 1M 128k");
    img
}

/// What the client does in one session; the same calls replay a transcript.
fn session<S: Read + Write>(sock: S) -> Result<(), rewind_agent::nbd::NbdError> {
    let mut c = NbdClient::handshake(sock, "disk", &["base:allocation", "qemu:dirty-bitmap:b0"])?;
    let size = c.size();
    let mut buf = vec![0u8; 64 * 1024];
    c.read_at(&mut buf, 0)?;
    c.block_status("base:allocation", 0, size.min(8 << 20))?;
    c.block_status("qemu:dirty-bitmap:b0", 0, size.min(8 << 20))?;
    let mut got = 0usize;
    c.read_many(&[(0, 4096), (1 << 20, 8192)], &mut |_, d| got += d.len())?;
    Ok(())
}

/// Records what qemu-nbd sends in one [`session`], through a proxy of our own.
fn record(dir: &Path, img: &Path) -> Vec<u8> {
    let sock = dir.join("nbd.sock");
    let server = serve(img, &sock, Some("b0"));
    let front = dir.join("proxy.sock");
    let listener = UnixListener::bind(&front).unwrap();
    let recorder = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut upstream = UnixStream::connect(&sock).unwrap();
        let mut client_r = client.try_clone().unwrap();
        let mut upstream_w = upstream.try_clone().unwrap();
        let to_server = std::thread::spawn(move || {
            let _ = std::io::copy(&mut client_r, &mut upstream_w);
            let _ = upstream_w.shutdown(std::net::Shutdown::Write);
        });
        let mut transcript = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match upstream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    transcript.extend_from_slice(&buf[..n]);
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_server.join();
        transcript
    });
    let client = UnixStream::connect(&front).unwrap();
    session(client.try_clone().unwrap()).expect("a real session succeeds");
    drop(client);
    let transcript = recorder.join().unwrap();
    drop(server);
    transcript
}

/// The server's side of a session replayed from bytes; what the client writes is dropped.
struct Replay(Cursor<Vec<u8>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_nbd_client_survives_mutated_server_transcripts() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let transcript = record(dir.path(), &img);
    // The unmutated transcript replays to success: the replay is faithful.
    session(Replay(Cursor::new(transcript.clone()))).expect("the recorded session replays");
    let mut rng = rand::rngs::StdRng::seed_from_u64(rewind_proto::fuzz::seed());
    let mut errors = 0;
    let started = Instant::now();
    let n = rewind_proto::fuzz::cases();
    for _ in 0..n {
        let input = mutate(&transcript, &mut rng);
        if session(Replay(Cursor::new(input))).is_err() {
            errors += 1;
        }
    }
    eprintln!(
        "nbd client: {n} mutated transcripts of {} bytes in {:.1} s, {errors} refused, 0 panics",
        transcript.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        errors > 0,
        "no mutation was refused: the mutations reach nothing"
    );
}

#[test]
fn the_qcow2_reader_survives_mutated_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    // Header, extensions and bitmap directory all sit in the image's first clusters.
    let original = std::fs::read(&img).unwrap();
    let bitmaps = rewind_agent::qcow2::bitmaps(&img).expect("the real image reads");
    assert_eq!(bitmaps.len(), 1);
    let head_len = original.len().min(1 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(rewind_proto::fuzz::seed());
    let path = dir.path().join("m.qcow2");
    let (mut errors, n) = (0, rewind_proto::fuzz::cases());
    let started = Instant::now();
    for _ in 0..n {
        let mut head = mutate(&original[..head_len], &mut rng);
        head.extend_from_slice(original.get(head_len..).unwrap_or_default());
        std::fs::write(&path, &head).unwrap();
        if rewind_agent::qcow2::bitmaps(&path).is_err() {
            errors += 1;
        }
    }
    eprintln!(
        "qcow2 reader: {n} mutated images in {:.1} s, {errors} refused, 0 panics",
        started.elapsed().as_secs_f64()
    );
    assert!(
        errors > 0,
        "no mutation was refused: the mutations reach nothing"
    );
}

/// Regression (found by the fuzzer above): a block status reply whose extents run past the
/// range asked for made the client subtract past zero (a panic; in a release build, extents
/// past the range were reported). It is clipped to the range now.
#[test]
fn a_block_status_extent_past_the_range_is_clipped() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut t = record(dir.path(), &img);
    // The first structured reply chunk of type BLOCK_STATUS (5): magic, flags, type, cookie,
    // length, then the context id and the first descriptor's length.
    let magic = 0x668e_33ef_u32.to_be_bytes();
    let at = (0..t.len().saturating_sub(20))
        .find(|&i| t[i..i + 4] == magic && t[i + 6..i + 8] == [0, 5])
        .expect("a block status chunk in the transcript");
    let first_len = at + 20 + 4;
    t[first_len..first_len + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    session(Replay(Cursor::new(t))).expect("an over-long extent is clipped, not fatal");
}

#[test]
fn the_agent_configuration_survives_mutation() {
    let example =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/agent.toml.example"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.toml");
    std::fs::write(&path, &example).unwrap();
    rewind_agent::config::AgentFile::load(&path).expect("the example loads");
    let mut rng = rand::rngs::StdRng::seed_from_u64(rewind_proto::fuzz::seed());
    let (n, started) = (rewind_proto::fuzz::cases(), Instant::now());
    let mut refused = 0;
    for _ in 0..n {
        std::fs::write(&path, mutate(&example, &mut rng)).unwrap();
        if rewind_agent::config::AgentFile::load(&path).is_err() {
            refused += 1;
        }
    }
    eprintln!(
        "agent.toml: {n} mutations in {:.1} s, {refused} refused, 0 panics",
        started.elapsed().as_secs_f64()
    );
    assert!(refused > 0);
}
