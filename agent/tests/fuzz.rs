//! Fuzzing the parsers of foreign bytes on the agent's side with a seeded random driver (stable
//! toolchain): our NBD client against mutations of a transcript recorded from a real
//! `qemu-nbd`, the qcow2 header and bitmap-directory reader against mutations of an image
//! `qemu-img` wrote, and the QMP and guest-agent client against mutated monitor transcripts.
//! Every input must give a result or an error, never a panic or a hang.
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

/// The QMP and guest agent targets (async: their own imports, apart from the blocking ones).
mod monitor {
    use rand::{Rng, SeedableRng};
    use rewind_agent::qmp::{Qmp, QmpError};
    use rewind_proto::fuzz::mutate;
    use serde_json::{json, Value};
    use std::path::Path;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    /// Longest one monitor session of the QMP targets may take: every transcript ends with the
    /// server closing its side, so a session still running then is stuck.
    const SESSION_LIMIT: Duration = Duration::from_secs(5);
    /// Stands for a 1 MiB reply in a transcript, filled in after mutation (mutating a megabyte
    /// would spend nearly every mutation inside one string).
    const BIG: &[u8] = b"@BIG@";
    /// Stands for the id of the client's `guest-sync`, filled in when the client sent it.
    const SYNC_ID: &[u8] = b"@ID@";

    /// `hay` with every `what` replaced by `with`.
    fn replace(hay: &[u8], what: &[u8], with: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(hay.len());
        let mut i = 0;
        while i < hay.len() {
            if hay[i..].starts_with(what) {
                out.extend_from_slice(with);
                i += what.len();
            } else {
                out.push(hay[i]);
                i += 1;
            }
        }
        out
    }

    /// Lines as QEMU ends them.
    fn lines(lines: &[&str]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| [l, "\r\n"])
            .collect::<String>()
            .into_bytes()
    }

    /// What a QEMU monitor sends in one [`qmp_session`]: the greeting, the reply to
    /// `qmp_capabilities`, an event before the reply to `query-status`, an error, a long reply and
    /// a reply without "return".
    fn qmp_transcript() -> Vec<u8> {
        lines(&[
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": ""}, "capabilities": ["oob"]}}"#,
            r#"{"return": {}}"#,
            r#"{"timestamp": {"seconds": 1700000000, "microseconds": 52}, "event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j0"}}"#,
            r#"{"return": {"status": "running", "singlestep": false, "running": true}}"#,
            r#"{"error": {"class": "GenericError", "desc": "Bitmap already exists: b0"}}"#,
            r#"{"return": "@BIG@"}"#,
            r#"{"id": "no return"}"#,
        ])
    }

    /// What the agent does in one monitor session.
    async fn qmp_session(path: &Path) -> Result<[Result<Value, QmpError>; 4], QmpError> {
        let mut q = Qmp::connect(path).await?;
        Ok([
            q.execute("query-status", json!({})).await,
            q.execute(
                "block-dirty-bitmap-add",
                json!({"node": "drive0", "name": "b0"}),
            )
            .await,
            q.hmp("info block").await.map(Value::String),
            q.execute("query-block", json!({})).await,
        ])
    }

    /// What a guest agent sends in one [`qga_session`]: a reply left over from an earlier client's
    /// `guest-sync-delimited` (after its delimiter byte) and one of its `guest-sync`, the reply to
    /// ours, then a number, an error and a string.
    fn qga_transcript() -> Vec<u8> {
        let mut t = vec![0xff];
        t.extend(lines(&[
            r#"{"return": 4242}"#,
            r#"{"return": 17}"#,
            r#"{"return": @ID@}"#,
            r#"{"return": 2}"#,
            r#"{"error": {"class": "GenericError", "desc": "Command guest-fsfreeze-thaw has been disabled"}}"#,
            r#"{"return": "thawed"}"#,
        ]));
        t
    }

    /// What the agent does in one guest agent session.
    async fn qga_session(path: &Path) -> Result<[Result<Value, QmpError>; 3], QmpError> {
        let mut q = Qmp::connect_guest_agent(path).await?;
        Ok([
            q.execute("guest-fsfreeze-freeze", json!({})).await,
            q.execute("guest-fsfreeze-thaw", json!({})).await,
            q.execute("guest-fsfreeze-status", json!({})).await,
        ])
    }

    /// Serves one client of `listener`: sends `transcript` (with the id of the client's
    /// `guest-sync` filled in, when `sync` is set, after reading it), closes its side, and reads
    /// what the client still sends until it hangs up.
    async fn play(listener: &tokio::net::UnixListener, transcript: Vec<u8>, sync: bool) {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let (r, mut w) = sock.into_split();
        let mut r = tokio::io::BufReader::new(r);
        let mut transcript = transcript;
        if sync {
            let mut first = Vec::new();
            let _ = r.read_until(b'\n', &mut first).await;
            let id = serde_json::from_slice::<Value>(&first)
                .ok()
                .and_then(|m| m["arguments"]["id"].as_u64())
                .unwrap_or(0);
            transcript = replace(&transcript, SYNC_ID, id.to_string().as_bytes());
        }
        let _ = w.write_all(&transcript).await;
        let _ = w.shutdown().await;
        let _ = r.read_to_end(&mut Vec::new()).await;
    }

    #[tokio::test]
    async fn the_qmp_client_survives_mutated_monitor_transcripts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let transcript = qmp_transcript();
        let big = vec![b'x'; 1 << 20];
        let honest = replace(&transcript, BIG, &big);
        let (_, got) = tokio::join!(play(&listener, honest, false), qmp_session(&path));
        let [status, added, long, last] = got.expect("the honest session connects");
        assert_eq!(status.unwrap()["running"], true);
        assert!(
            matches!(&added, Err(QmpError::Command { class, .. }) if class == "GenericError"),
            "{added:?}"
        );
        assert_eq!(long.unwrap().as_str().map(str::len), Some(1 << 20));
        assert!(matches!(last, Err(QmpError::Protocol { .. })), "{last:?}");

        let mut rng = rand::rngs::StdRng::seed_from_u64(rewind_proto::fuzz::seed());
        let (n, started) = (rewind_proto::fuzz::cases(), Instant::now());
        let (mut refused, mut replies) = (0, 0);
        for i in 0..n {
            let filler: &[u8] = if rng.random_ratio(1, 8) { &big } else { b"x" };
            let input = replace(&mutate(&transcript, &mut rng), BIG, filler);
            let session =
                async { tokio::join!(play(&listener, input, false), qmp_session(&path)).1 };
            match tokio::time::timeout(SESSION_LIMIT, session).await {
                Err(_) => panic!(
                    "case {i} (seed {}): the QMP session hung",
                    rewind_proto::fuzz::seed()
                ),
                Ok(Err(_)) => refused += 1,
                Ok(Ok(r)) => replies += r.iter().filter(|r| r.is_ok()).count(),
            }
        }
        eprintln!(
            "qmp client: {n} mutated transcripts in {:.1} s, {refused} refused at connect, \
             {replies} replies taken, 0 panics, 0 hangs",
            started.elapsed().as_secs_f64()
        );
        assert!(
            refused > 0,
            "no mutation was refused: the mutations reach nothing"
        );
    }

    #[tokio::test]
    async fn the_guest_agent_client_survives_mutated_transcripts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let transcript = qga_transcript();
        let (_, got) = tokio::join!(
            play(&listener, transcript.clone(), true),
            qga_session(&path)
        );
        let [frozen, thawed, status] = got.expect("the honest session synchronises");
        assert_eq!(frozen.unwrap(), 2);
        assert!(
            matches!(&thawed, Err(QmpError::Command { class, .. }) if class == "GenericError"),
            "{thawed:?}"
        );
        assert_eq!(status.unwrap(), "thawed");

        let mut rng = rand::rngs::StdRng::seed_from_u64(rewind_proto::fuzz::seed());
        let (n, started) = (rewind_proto::fuzz::cases(), Instant::now());
        let (mut refused, mut replies) = (0, 0);
        for i in 0..n {
            let input = mutate(&transcript, &mut rng);
            let session =
                async { tokio::join!(play(&listener, input, true), qga_session(&path)).1 };
            match tokio::time::timeout(SESSION_LIMIT, session).await {
                Err(_) => panic!(
                    "case {i} (seed {}): the guest agent session hung",
                    rewind_proto::fuzz::seed()
                ),
                Ok(Err(_)) => refused += 1,
                Ok(Ok(r)) => replies += r.iter().filter(|r| r.is_ok()).count(),
            }
        }
        eprintln!(
            "guest agent client: {n} mutated transcripts in {:.1} s, {refused} refused at connect, \
             {replies} replies taken, 0 panics, 0 hangs",
            started.elapsed().as_secs_f64()
        );
        assert!(
            refused > 0,
            "no mutation was refused: the mutations reach nothing"
        );
    }

    /// Regression (found by the guest agent target): a reply left over from an earlier client's
    /// `guest-sync-delimited` starts with the byte 0xFF, which is not UTF-8; lines were read as
    /// text, so the connection failed instead of skipping the stale reply as `guest-sync` is
    /// meant to. Lines are read as bytes now and the delimiter is skipped.
    #[tokio::test]
    async fn a_leftover_delimited_guest_agent_reply_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut t = b"\xff{\"return\": 4242}\n\xff".to_vec();
        t.extend_from_slice(b"{\"return\": @ID@}\n{\"return\": 3}\n");
        let (_, got) = tokio::join!(play(&listener, t, true), async {
            let mut q = Qmp::connect_guest_agent(&path).await?;
            q.execute("guest-fsfreeze-freeze", json!({})).await
        });
        assert_eq!(got.expect("the stale reply is skipped"), 3);
    }

    /// Regression (found by the QMP target): a monitor socket that accepts but never greets (QEMU
    /// serving another client keeps new ones in the listen backlog) held `Qmp::connect` forever.
    /// The greeting is awaited for 10 s now.
    #[tokio::test]
    async fn a_monitor_that_never_greets_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let silent = async {
            let (mut sock, _) = listener.accept().await.unwrap();
            let _ = sock.read_to_end(&mut Vec::new()).await;
        };
        let started = Instant::now();
        let connect = async { tokio::join!(silent, Qmp::connect(&path)).1 };
        let got = tokio::time::timeout(Duration::from_secs(30), connect)
            .await
            .expect("connect gives up on a silent monitor");
        assert!(matches!(got, Err(QmpError::Timeout(_))), "{:?}", got.err());
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    /// Replies that must be refused whole: a line past the 16 MiB limit (read no further than the
    /// limit), text that is not UTF-8, JSON cut short, and a greeting that is not QMP's.
    #[tokio::test]
    async fn malformed_greetings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut huge = br#"{"QMP": ""#.to_vec();
        huge.resize(17 << 20, b'x');
        huge.extend_from_slice(b"\"}\n");
        for (name, greeting) in [
            ("a line past the limit", huge),
            ("not UTF-8", b"{\"QMP\": \"\xc3\x28\"}\n".to_vec()),
            ("cut short", b"{\"QMP\": {\"version\": \n".to_vec()),
            ("not QMP", b"{\"return\": {}}\n".to_vec()),
            ("not an object", b"[1, 2]\n".to_vec()),
        ] {
            let session =
                async { tokio::join!(play(&listener, greeting, false), Qmp::connect(&path)).1 };
            let got = tokio::time::timeout(SESSION_LIMIT, session)
                .await
                .unwrap_or_else(|_| panic!("{name}: hung"));
            assert!(
                matches!(got, Err(QmpError::Protocol { .. })),
                "{name}: {:?}",
                got.err()
            );
        }
    }
}
