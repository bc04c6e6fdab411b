//! Hostile clients, one test per attack: an agent with a valid certificate (host2) or a
//! stranger with none tries to damage, probe or starve another agent (host1, the victim). Each
//! test checks that the attack fails, that the victim's points are unchanged and restore
//! bit-exact, and that an honest sync still succeeds during or after the attack.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rand::Rng;
use rewind_proto::pb::{self, replication_client::ReplicationClient};
use rewind_proto::{chunk, BlockHash};
use rewind_tests::h2raw::{self, Attack, Ending, Flood};
use rewind_tests::{bin, disk, grpc, procfs, run, Deployment, Receiver};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

const BLOCK: usize = 64 * 1024;
const VICTIM: &str = "victim";
const MIB: u64 = 1 << 20;
const UPLOAD: &str = "/rewind.v1.Replication/Upload";

/// host1's VM: the points it made and the digest each must restore to.
struct Victim {
    disk: PathBuf,
    listing: Vec<Value>,
    digests: Vec<(u64, disk::Digest)>,
}

impl Victim {
    /// A disk of `size` bytes, its first 16 blocks random, synced once by host1.
    fn seed(d: &Deployment, rx: &Receiver, size: u64) -> Victim {
        let path = d.path("victim.raw");
        disk::create(&path, size);
        disk::random_blocks(&path, BLOCK as u64, 0, 16, &mut rand::rng());
        let mut v = Victim {
            disk: path,
            listing: Vec::new(),
            digests: Vec::new(),
        };
        let report = d.sync_ok(rx, "host1", VICTIM, &[("vda", &v.disk)]);
        v.record(d, &report);
        v
    }

    /// Rewrites two random blocks, as a running VM would between syncs.
    fn write_some(&self) {
        let blocks = std::fs::metadata(&self.disk).unwrap().len() / BLOCK as u64;
        let first = rand::rng().random_range(0..blocks - 1);
        disk::random_blocks(&self.disk, BLOCK as u64, first, 2, &mut rand::rng());
    }

    /// An honest sync of the disk as it is now; panics unless it succeeds.
    fn sync(&mut self, d: &Deployment, rx: &Receiver) {
        let report =
            tokio::task::block_in_place(|| d.sync_ok(rx, "host1", VICTIM, &[("vda", &self.disk)]));
        self.record(d, &report);
    }

    /// The command line of an honest sync, to run while an attack holds.
    fn sync_cmd(&self, d: &Deployment, rx: &Receiver) -> tokio::process::Command {
        let mut cmd = d.sync_cmd(rx, "host1", VICTIM, &[("vda", &self.disk)], &[]);
        cmd.stdin(Stdio::null());
        tokio::process::Command::from(cmd)
    }

    /// Takes note of a point an honest sync reported.
    fn record(&mut self, d: &Deployment, report: &Value) {
        let point = report["point"].as_u64().expect("sync reports its point");
        self.digests.push((point, disk::digest(&self.disk)));
        self.listing = d.points(VICTIM);
    }

    /// The VM has exactly the points host1 made, and each restores to the bytes it had.
    fn assert_intact(&self, d: &Deployment) {
        assert_eq!(
            d.points(VICTIM),
            self.listing,
            "the victim's points changed"
        );
        for (point, want) in &self.digests {
            assert_eq!(
                &d.restored_digest(VICTIM, "vda", *point),
                want,
                "point {point} does not restore bit-exact"
            );
        }
    }
}

async fn client(d: &Deployment, rx: &Receiver, agent: &str) -> ReplicationClient<Channel> {
    grpc::as_agent(&rx.url(), &d.pki(), agent)
        .await
        .expect("connect")
}

async fn begin(
    c: &mut ReplicationClient<Channel>,
    vm: &str,
    size: u64,
) -> Result<String, tonic::Status> {
    grpc::begin(c, vm, size, BLOCK as u32).await
}

/// One batch: block `index` of disk 0 is `hash`, with `frame` sent as its chunk.
fn batch(session: &str, index: u64, hash: BlockHash, frame: Vec<u8>) -> pb::Batch {
    pb::Batch {
        session: session.into(),
        entries: vec![pb::BlockEntry {
            disk: 0,
            index,
            hash: hash.0.to_vec(),
        }],
        chunks: vec![pb::Chunk {
            hash: hash.0.to_vec(),
            data: frame.into(),
        }],
    }
}

async fn upload(
    c: &mut ReplicationClient<Channel>,
    b: pb::Batch,
) -> Result<pb::UploadReply, tonic::Status> {
    grpc::upload(c, b).await
}

async fn missing(
    c: &mut ReplicationClient<Channel>,
    session: &str,
    hashes: &[BlockHash],
) -> Vec<BlockHash> {
    c.missing_chunks(pb::MissingChunksRequest {
        session: session.into(),
        hashes: hashes.iter().map(|h| h.0.to_vec()).collect(),
    })
    .await
    .expect("missing_chunks")
    .into_inner()
    .missing
    .iter()
    .map(|h| BlockHash::from_slice(h).unwrap())
    .collect()
}

fn random_block() -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    rand::rng().fill(&mut b[..]);
    b
}

/// A zstd skippable frame holding `len` bytes: decoders skip it, so a frame followed by one
/// decodes to the same bytes.
fn skippable(len: usize) -> Vec<u8> {
    let mut f = 0x184D_2A50u32.to_le_bytes().to_vec();
    f.extend_from_slice(&(len as u32).to_le_bytes());
    f.resize(8 + len, 0);
    f
}

/// `rewind-receiver verify --json`: panics unless it passes and found no bad chunk.
fn assert_verify_clean(d: &Deployment) {
    let out = run(Command::new(bin("rewind-receiver"))
        .args(["verify", "--json", "--data"])
        .arg(d.data()));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "verify failed: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["bad"].as_array().map(Vec::len), Some(0), "{report}");
}

/// Starts a receiver with `limits` as the `[limits]` table of its configuration file.
fn serve_with_limits(d: &Deployment, limits: &str) -> Receiver {
    let config = d.path("receiver.toml");
    std::fs::write(&config, format!("[limits]\n{limits}\n")).unwrap();
    Receiver::start_with(&d.data(), &d.pki(), &["--config", config.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_padded_frame_from_another_agent_cannot_break_your_points() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut victim = Victim::seed(&d, &rx, 4 * MIB);

    // host2 sends block B, which host1 will write later, in frames that decode to B but are
    // not its stored form.
    let b = random_block();
    let hb = BlockHash::of(&b);
    let frame = chunk::compress(&b).unwrap();
    let mut c2 = client(&d, &rx, "host2").await;
    let s2 = begin(&mut c2, "intruder", MIB).await.expect("host2 begins");
    let with = |tail: Vec<u8>| [frame.clone(), tail].concat();
    let padded = with(skippable(6 << 20));
    assert!(padded.len() < 15 << 20, "the batch stays under 16 MiB");
    for (what, bad) in [
        ("6 MiB of skippable-frame padding", padded),
        ("a small skippable frame", with(skippable(16))),
        ("one trailing byte", with(vec![0])),
    ] {
        let st = upload(&mut c2, batch(&s2, 0, hb, bad))
            .await
            .expect_err(what);
        assert_eq!(st.code(), Code::InvalidArgument, "{what}: {st:?}");
        assert!(
            st.message().contains("is not one zstd frame"),
            "{what}: {}",
            st.message()
        );
    }
    assert_eq!(
        missing(&mut c2, &s2, &[hb]).await,
        vec![hb],
        "no refused frame was stored"
    );
    victim.assert_intact(&d);

    // host1 writes B and syncs through the real agent.
    disk::write_at(&victim.disk, 5 * BLOCK as u64, &b);
    victim.sync(&d, &rx);
    victim.assert_intact(&d);
    assert_verify_clean(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_answers_nothing_about_other_agents() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut victim = Victim::seed(&d, &rx, 4 * MIB);
    let image = std::fs::read(&victim.disk).unwrap();
    let blocks: Vec<&[u8]> = image.chunks(BLOCK).take(16).collect();
    let hashes: Vec<BlockHash> = blocks.iter().map(|b| BlockHash::of(b)).collect();

    let mut c2 = client(&d, &rx, "host2").await;
    let s2 = begin(&mut c2, "intruder", MIB).await.expect("host2 begins");
    let reported: BTreeSet<BlockHash> = missing(&mut c2, &s2, &hashes).await.into_iter().collect();
    assert_eq!(
        reported,
        hashes.iter().copied().collect(),
        "every chunk host1 holds is missing for host2"
    );

    // Content host1 holds and fresh content get the same answer.
    let known = chunk::compress(blocks[0]).unwrap();
    let fresh_block = random_block();
    let fresh = chunk::compress(&fresh_block).unwrap();
    for (what, index, hash, frame) in [
        ("host1's block", 0, hashes[0], known),
        ("a fresh block", 1, BlockHash::of(&fresh_block), fresh),
    ] {
        let len = frame.len() as u64;
        let reply = upload(&mut c2, batch(&s2, index, hash, frame))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(
            (reply.entries, reply.chunks_stored, reply.chunk_bytes),
            (1, 1, len),
            "{what}"
        );
    }

    // host1's other chunks stay unreadable to host2, on its own VM as on host1's.
    let read = |vm: &str, h: BlockHash| pb::ReadChunksRequest {
        vm: vm.into(),
        hashes: vec![h.0.to_vec()],
    };
    let st = c2
        .read_chunks(read("intruder", hashes[1]))
        .await
        .expect_err("a chunk host2 does not hold");
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    // host1's VM answers exactly as a VM that does not exist.
    let st = c2
        .read_chunks(read(VICTIM, hashes[1]))
        .await
        .expect_err("host1's VM");
    let none = c2
        .read_chunks(read("nonexistent", hashes[1]))
        .await
        .expect_err("no such VM");
    assert_eq!(
        (st.code(), st.message()),
        (
            none.code(),
            none.message().replace("nonexistent", VICTIM).as_str()
        ),
        "host1's VM is told apart from a VM that does not exist"
    );
    let own = c2
        .read_chunks(read("intruder", hashes[0]))
        .await
        .expect("host2 reads the chunk it sent itself")
        .into_inner();
    assert_eq!(own.chunks.len(), 1);

    victim.assert_intact(&d);
    victim.write_some();
    victim.sync(&d, &rx);
    victim.assert_intact(&d);
}

/// Samples a process's open descriptors every few milliseconds and keeps the most seen.
struct FdWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl FdWatch {
    fn start(pid: u32) -> FdWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut most = 0;
            while !flag.load(Ordering::SeqCst) {
                most = most.max(procfs::open_fds(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            most.max(procfs::open_fds(pid))
        });
        FdWatch { stop, thread }
    }

    fn most(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_strangers_cannot_starve_honest_agents() {
    const STRANGERS: usize = 1_100;
    const ADDRESSES: usize = 11;
    let d = Deployment::new();
    let rx = serve_with_limits(
        &d,
        "handshake_timeout = 2\nmax_handshakes_per_address = 50\nmax_handshakes = 200",
    );
    let mut victim = Victim::seed(&d, &rx, 4 * MIB);
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut lim = getrlimit(Resource::Nofile);
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim).unwrap();
    }
    let pid = rx.pid();
    let fds_before = procfs::open_fds(pid);
    let fds = FdWatch::start(pid);

    // Strangers connect from 127.0.0.2-12 and never start a TLS handshake.
    let started = Instant::now();
    let mut held = Vec::new();
    let mut not_connected = 0;
    for n in 0..STRANGERS {
        let from = SocketAddr::from(([127, 0, 0, 2 + (n % ADDRESSES) as u8], 0));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(from).unwrap();
        match tokio::time::timeout(Duration::from_secs(3), socket.connect(rx.addr())).await {
            Ok(Ok(s)) => held.push(s),
            _ => not_connected += 1,
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let fds_held = procfs::open_fds(pid);
    // Each stranger's socket waits for the receiver to close it.
    let mut closed_by_receiver = tokio::task::JoinSet::new();
    for mut s in held {
        closed_by_receiver.spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut byte = [0u8; 1];
            let _ = s.read(&mut byte).await;
        });
    }

    // An honest agent syncs from 127.0.0.1 while they are held.
    victim.write_some();
    let sync_started = Instant::now();
    victim.sync(&d, &rx);
    let sync_secs = sync_started.elapsed().as_secs_f64();

    // The receiver does not spin while strangers hold connections.
    let ticks = procfs::ticks_per_second();
    let cpu_before = procfs::cpu_ticks(pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_used = (procfs::cpu_ticks(pid) - cpu_before) as f64
        / ticks as f64
        / window.elapsed().as_secs_f64();

    // Every stranger is closed by the handshake deadline (2 s from its accept).
    let all_closed = tokio::time::timeout(Duration::from_secs(10), async {
        while closed_by_receiver.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    let still_open = closed_by_receiver.len();
    let fds_most = fds.most();
    eprintln!(
        "strangers: {} connected ({not_connected} not) in {connect_secs:.2}s; receiver fds \
         {fds_before} before, {fds_held} right after, {fds_most} at most; honest sync \
         {sync_secs:.2}s; receiver CPU {:.1}% of a core over 2 s; {still_open} still open",
        STRANGERS - not_connected,
        cpu_used * 100.0
    );
    assert!(
        fds_most < 600,
        "the receiver held {fds_most} descriptors for idle strangers"
    );
    assert!(
        cpu_used < 0.5,
        "the receiver used {:.0}% of a core while strangers idled",
        cpu_used * 100.0
    );
    assert!(
        all_closed,
        "{still_open} idle strangers still connected after the handshake deadline"
    );
    victim.assert_intact(&d);
}

/// How many streams of an Upload flood host2 can keep holding a 16 MiB claim: its budget for
/// messages still arriving (`max_partial_mib_per_agent` in [`flood_limits`]) over the claim.
const PARTIAL_MIB_PER_AGENT: u64 = 64;
const CLAIM: u32 = 16 << 20;
const MAX_HELD: usize = (PARTIAL_MIB_PER_AGENT * MIB / CLAIM as u64) as usize;

/// Limits under which only the message budget bounds a flood: the cap on an agent's Upload
/// streams is above the 128 streams it opens.
fn flood_limits(extra: &str) -> String {
    format!(
        "max_partial_mib = 256\nmax_partial_mib_per_agent = {PARTIAL_MIB_PER_AGENT}\n\
         max_uploads_per_agent = 128\n{extra}"
    )
}

/// Memory of the receiver before and while an attack held.
#[derive(Debug)]
struct Memory {
    rss_before: u64,
    rss_during: u64,
    peak: u64,
}

/// host2 opens 4 connections of 32 Upload streams, each sending a prefix that claims 16 MiB
/// and `body` bytes of it, never more; an honest host1 sync runs meanwhile. Returns once
/// every stream sent all it could, with the flood still holding.
async fn flood_unfinished_messages(
    d: &Deployment,
    rx: &Receiver,
    victim: &mut Victim,
    body: usize,
) -> (Flood, Memory) {
    let pid = rx.pid();
    let rss_before = procfs::status_bytes(pid, "VmRSS");
    let pki = d.pki();
    let attack = Attack {
        connections: 4,
        streams_per_connection: 32,
        path: UPLOAD.into(),
        claimed: CLAIM,
        body,
    };
    let total = attack.connections * attack.streams_per_connection;
    let mut flood = Flood::start(
        rx.addr(),
        &pki.join("ca.pem"),
        &pki.join("host2.pem"),
        &pki.join("host2.key"),
        &attack,
    )
    .await
    .expect("host2 opens its streams");
    victim.write_some();
    let honest = {
        let mut cmd = victim.sync_cmd(d, rx);
        tokio::spawn(async move {
            let started = Instant::now();
            let out = cmd.output().await.expect("spawn the agent");
            (out, started.elapsed())
        })
    };

    // Every stream has sent all its bytes or was refused, and the receiver refused all but
    // those its budget can hold.
    let settled = flood
        .wait(Duration::from_secs(20), |s| {
            s.iter().all(|s| s.settled())
                && s.iter().filter(|s| s.ended.is_some()).count() >= total - MAX_HELD
        })
        .await;
    let held: Vec<usize> = (0..total)
        .filter(|&i| flood.streams[i].ended.is_none())
        .collect();
    let rss_during = procfs::status_bytes(pid, "VmRSS");
    let peak_during = procfs::status_bytes(pid, "VmHWM");
    let refused = flood
        .streams
        .iter()
        .filter(|s| s.grpc_status() == Some(Code::ResourceExhausted as i32))
        .count();
    let by_budget = flood
        .streams
        .iter()
        .filter(|s| matches!(&s.ended, Some(Ending::Status(8, m)) if m.contains("max_partial_mib")))
        .count();
    let other: Vec<&Ending> = flood
        .streams
        .iter()
        .filter_map(|s| s.ended.as_ref())
        .filter(|e| !matches!(e, Ending::Status(8, _)))
        .collect();
    let sent: u64 = flood.streams.iter().map(|s| s.sent).sum();

    let (out, sync_time) = honest.await.unwrap();
    assert!(
        out.status.success(),
        "the honest sync failed during the attack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    victim.record(d, &report);
    let memory = Memory {
        rss_before,
        rss_during,
        peak: peak_during.max(procfs::status_bytes(pid, "VmHWM")),
    };
    let example = flood
        .streams
        .iter()
        .find_map(|s| match &s.ended {
            Some(Ending::Status(8, m)) => Some(m.clone()),
            _ => None,
        })
        .unwrap_or_default();
    eprintln!(
        "flood of {total} streams ({body} body bytes each): {} MiB sent, {refused} refused \
         with RESOURCE_EXHAUSTED ({by_budget} by the message budget, e.g. {example:?}), {} \
         held, other endings {other:?}; \
         receiver RSS {} MiB before, {} MiB during, peak {} MiB; honest sync {:.2}s, \
         {} streams still held when it ended",
        sent >> 20,
        held.len(),
        memory.rss_before >> 20,
        memory.rss_during >> 20,
        memory.peak >> 20,
        sync_time.as_secs_f64(),
        flood.streams.iter().filter(|s| s.ended.is_none()).count(),
    );
    assert!(
        settled,
        "the flood did not settle: {} streams held (budget allows {MAX_HELD}), {} still sending",
        held.len(),
        flood.streams.iter().filter(|s| !s.settled()).count()
    );
    assert!(
        by_budget > 0,
        "no stream was refused with RESOURCE_EXHAUSTED by the message budget"
    );
    assert!(other.is_empty(), "streams refused otherwise: {other:?}");
    assert!(
        memory.peak < 512 * MIB,
        "receiver peak RSS {} MiB",
        memory.peak >> 20
    );
    assert!(
        memory.peak.saturating_sub(memory.rss_before) < 300 * MIB,
        "receiver grew by {} MiB",
        (memory.peak - memory.rss_before) >> 20
    );
    (flood, memory)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_prefixes_pin_no_memory() {
    let d = Deployment::new();
    let rx = serve_with_limits(&d, &flood_limits(""));
    let mut victim = Victim::seed(&d, &rx, 4 * MIB);
    let (flood, _) = flood_unfinished_messages(&d, &rx, &mut victim, 0).await;
    drop(flood);
    victim.assert_intact(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_messages_pin_bounded_memory() {
    const MESSAGE_TIMEOUT: u64 = 5;
    let d = Deployment::new();
    let rx = serve_with_limits(
        &d,
        &flood_limits(&format!("message_timeout = {MESSAGE_TIMEOUT}")),
    );
    let mut victim = Victim::seed(&d, &rx, 4 * MIB);
    let (mut flood, _) = flood_unfinished_messages(&d, &rx, &mut victim, 4 << 20).await;
    let held: Vec<usize> = (0..flood.streams.len())
        .filter(|&i| flood.streams[i].ended.is_none())
        .collect();
    for &i in &held {
        assert!(
            flood.streams[i].done_sending,
            "held stream {i} did not get its 4 MiB in: {:?}",
            flood.streams[i]
        );
    }
    // Past the message deadline every held stream ends.
    let ended = flood
        .wait(Duration::from_secs(MESSAGE_TIMEOUT + 10), |s| {
            s.iter().all(|s| s.ended.is_some())
        })
        .await;
    assert!(ended, "held streams outlived the message deadline");
    for &i in &held {
        let ending = flood.streams[i].ended.as_ref().unwrap();
        assert!(
            matches!(ending, Ending::Status(4, _) | Ending::Reset(_)),
            "held stream {i} ended with {ending:?}"
        );
    }
    eprintln!(
        "held streams ended with {:?}",
        held.iter()
            .map(|&i| flood.streams[i].ended.clone())
            .collect::<Vec<_>>()
    );
    drop(flood);
    victim.assert_intact(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_begin_name_is_not_echoed() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut victim = Victim::seed(&d, &rx, 4 * MIB);
    let mut c = client(&d, &rx, "host2").await;
    let st = begin(&mut c, &"a".repeat(10_000), MIB)
        .await
        .expect_err("a 10,000-character VM name");
    assert_eq!(
        st.code(),
        Code::InvalidArgument,
        "{:?}: {:.200}",
        st.code(),
        st.message()
    );
    assert!(
        st.message().len() < 300,
        "the refusal echoes {} characters: {:.200}...",
        st.message().len(),
        st.message()
    );
    victim.assert_intact(&d);
    victim.write_some();
    victim.sync(&d, &rx);
    victim.assert_intact(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_blocks_past_the_end_is_refused() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut victim = Victim::seed(&d, &rx, MIB);
    let point = victim.digests[0].0;
    let mut c = client(&d, &rx, "host1").await;
    let page = |start: u64| pb::PointBlocksRequest {
        vm: VICTIM.into(),
        point,
        disk: "vda".into(),
        start,
        limit: 16,
    };
    let first = c
        .point_blocks(page(0))
        .await
        .expect("first page")
        .into_inner();
    assert_eq!(first.entries.first().map(|e| e.index), Some(0));
    for start in [16, 1 << 63, u64::MAX] {
        match c.point_blocks(page(start)).await {
            Err(st) => assert_eq!(st.code(), Code::InvalidArgument, "start {start}: {st:?}"),
            Ok(r) => {
                let r = r.into_inner();
                let indexes: Vec<u64> = r.entries.iter().map(|e| e.index).collect();
                assert!(
                    indexes.is_empty(),
                    "start {start} answered blocks {indexes:?}"
                );
                assert_eq!(r.next, 0, "start {start}");
            }
        }
    }
    victim.assert_intact(&d);
    victim.write_some();
    victim.sync(&d, &rx);
    victim.assert_intact(&d);
}

/// The receiver's default limits (`[limits]` in receiver/src/config.rs, and the HTTP/2 stream
/// cap in receiver/src/server.rs) that the load test counts on.
mod default_limits {
    use std::time::Duration;

    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MAX_HANDSHAKES: usize = 1024;
    pub const MAX_CONNECTIONS_PER_AGENT: usize = 12;
    pub const MAX_PARTIAL_MIB_PER_AGENT: u64 = 64;
    /// Concurrent HTTP/2 streams per connection.
    pub const MAX_STREAMS: usize = 32;
}

/// What happened to a stranger's connection.
enum StrangerEvent {
    Connected,
    NotConnected,
    /// The receiver closed it after it was held this long.
    Closed(Duration),
}

/// A stranger closed this long after connecting was closed at the receiver's handshake
/// deadline; one closed sooner was refused (past its address's share) or evicted (from a full
/// pool of pending handshakes).
const AT_DEADLINE: Duration = Duration::from_secs(default_limits::HANDSHAKE_TIMEOUT.as_secs() - 1);

/// Strangers holding idle TCP connections that never start a TLS handshake, one task each. A
/// stranger closed at the handshake deadline connects again at once, so the receiver's pool
/// stays full for as long as they run; one refused or evicted sooner stays away.
struct Strangers {
    events: tokio::sync::mpsc::UnboundedReceiver<StrangerEvent>,
    _tasks: tokio::task::JoinSet<()>,
    connected: usize,
    not_connected: usize,
    /// Closed before the handshake deadline.
    closed_early: usize,
    /// Closed at the handshake deadline.
    closed_at_deadline: usize,
    longest_held: Duration,
}

impl Strangers {
    /// Connects `count` strangers to `to` one after another, from `addresses` source addresses
    /// from 127.0.0.2 on, in turn.
    async fn connect(to: SocketAddr, count: usize, addresses: usize) -> Strangers {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..count {
            let from = std::net::IpAddr::from([127, 0, 0, 2 + (n % addresses) as u8]);
            match stranger_connect(from, to).await {
                Ok(s) => {
                    let _ = tx.send(StrangerEvent::Connected);
                    tasks.spawn(stranger_hold(s, from, to, tx.clone()));
                }
                Err(_) => {
                    let _ = tx.send(StrangerEvent::NotConnected);
                }
            }
        }
        let mut s = Strangers {
            events,
            _tasks: tasks,
            connected: 0,
            not_connected: 0,
            closed_early: 0,
            closed_at_deadline: 0,
            longest_held: Duration::ZERO,
        };
        s.catch_up();
        s
    }

    fn apply(&mut self, event: StrangerEvent) {
        match event {
            StrangerEvent::Connected => self.connected += 1,
            StrangerEvent::NotConnected => self.not_connected += 1,
            StrangerEvent::Closed(held) => {
                if held >= AT_DEADLINE {
                    self.closed_at_deadline += 1;
                } else {
                    self.closed_early += 1;
                }
                self.longest_held = self.longest_held.max(held);
            }
        }
    }

    /// Applies the events that arrived so far.
    fn catch_up(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.apply(event);
        }
    }

    /// Applies events until `done` holds or `timeout` passes; returns `done`.
    async fn wait(&mut self, timeout: Duration, done: impl Fn(&Strangers) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.apply(event),
                Ok(None) | Err(_) => return done(self),
            }
        }
        true
    }

    /// Connections the receiver has not closed yet.
    fn open(&mut self) -> usize {
        self.catch_up();
        self.connected - self.closed_early - self.closed_at_deadline
    }
}

async fn stranger_connect(
    from: std::net::IpAddr,
    to: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(Duration::from_secs(3), socket.connect(to))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Holds `s` until the receiver closes it, and connects again if that was at the deadline.
async fn stranger_hold(
    mut s: tokio::net::TcpStream,
    from: std::net::IpAddr,
    to: SocketAddr,
    events: tokio::sync::mpsc::UnboundedSender<StrangerEvent>,
) {
    use tokio::io::AsyncReadExt;
    loop {
        let since = Instant::now();
        // The receiver sends nothing before a ClientHello: this ends when it closes.
        let _ = s.read(&mut [0u8; 1]).await;
        let held = since.elapsed();
        let _ = events.send(StrangerEvent::Closed(held));
        if held < AT_DEADLINE {
            return;
        }
        match stranger_connect(from, to).await {
            Ok(again) => {
                s = again;
                let _ = events.send(StrangerEvent::Connected);
            }
            Err(_) => {
                let _ = events.send(StrangerEvent::NotConnected);
                return;
            }
        }
    }
}

/// How one of host2's streams ended, by the limit that refused it.
fn refusal_kind(ending: &Ending) -> &'static str {
    match ending {
        Ending::Status(8, m) if m.contains("max_uploads_per_agent") => "max_uploads_per_agent",
        Ending::Status(8, m) if m.contains("max_partial_mib_per_agent") => {
            "max_partial_mib_per_agent"
        }
        Ending::Status(8, m) if m.contains("max_partial_mib)") => "max_partial_mib",
        Ending::Status(8, _) => "other RESOURCE_EXHAUSTED",
        Ending::Status(..) => "other status",
        Ending::Reset(_) => "reset",
        Ending::Failed(_) => "failed",
    }
}

/// One honest sync under load, as measured.
struct HonestSync {
    secs: f64,
    sent_bytes: u64,
    /// Strangers' connections open when it started and when it ended.
    strangers_open: (usize, usize),
    /// host2's streams still held when it ended.
    streams_held: usize,
    out: std::process::Output,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_of_strangers_and_unfinished_streams_leaves_room_for_honest_syncs() {
    use default_limits::*;
    const STRANGERS: usize = 2_000;
    const ADDRESSES: usize = 20;
    const STREAMS: usize = 300;
    /// Half again host2's share of connections.
    const CONNECTION_ATTEMPTS: usize = MAX_CONNECTIONS_PER_AGENT * 3 / 2;
    const BODY: usize = 2 << 20;
    /// Streams that can hold a claim at once: host2's budget for messages still arriving.
    const HELD: usize = (MAX_PARTIAL_MIB_PER_AGENT * MIB / CLAIM as u64) as usize;
    const SYNCS: usize = 3;
    /// 4 MiB of changed data per honest sync.
    const CHANGED_BLOCKS: u64 = 64;
    const DISK: u64 = 64 * MIB;

    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut lim = getrlimit(Resource::Nofile);
        assert!(
            lim.maximum.is_none_or(|m| m > 2 * STRANGERS as u64),
            "RLIMIT_NOFILE's hard limit {:?} leaves no room for {STRANGERS} strangers",
            lim.maximum
        );
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim).unwrap();
    }
    let started = Instant::now();
    let d = Deployment::new();
    // No configuration file: the default limits.
    let rx = d.serve();
    let mut victim = Victim::seed(&d, &rx, DISK);
    let pid = rx.pid();
    let rss_before = procfs::status_bytes(pid, "VmRSS");
    let fds_before = procfs::open_fds(pid);
    let fds = FdWatch::start(pid);

    // Strangers from 127.0.0.2-21. The receiver keeps at most its pool of pending handshakes
    // and closes the others at once.
    let connecting = Instant::now();
    let mut strangers = Strangers::connect(rx.addr(), STRANGERS, ADDRESSES).await;
    let connect_secs = connecting.elapsed().as_secs_f64();
    let beyond_pool = STRANGERS - MAX_HANDSHAKES;
    let beyond_pool_closed = strangers
        .wait(Duration::from_secs(5), |s| s.closed_early >= beyond_pool)
        .await;
    let strangers_held = strangers.open();
    let fds_strangers = procfs::open_fds(pid);

    // host2 opens more connections than its share, then spreads its Upload streams over those
    // the receiver accepted.
    let pki = d.pki();
    let (ca, cert, key) = (
        pki.join("ca.pem"),
        pki.join("host2.pem"),
        pki.join("host2.key"),
    );
    let mut accepted = Vec::new();
    let mut refused_connections = Vec::new();
    for _ in 0..CONNECTION_ATTEMPTS {
        match h2raw::connect_accepted(rx.addr(), &ca, &cert, &key, Duration::from_secs(10)).await {
            Ok(c) => accepted.push(c),
            Err(e) => refused_connections.push(e.to_string()),
        }
    }
    let host2_connections = accepted.len();
    assert!(
        host2_connections <= MAX_CONNECTIONS_PER_AGENT,
        "host2 holds {host2_connections} connections, past max_connections_per_agent"
    );
    assert!(
        host2_connections * MAX_STREAMS >= STREAMS,
        "{host2_connections} connections cannot carry {STREAMS} streams; refusals: \
         {refused_connections:?}"
    );
    let flooding = Instant::now();
    let mut flood = Flood::over(accepted, STREAMS, UPLOAD, CLAIM, BODY)
        .await
        .expect("host2 opens its streams");
    // Every stream has sent all it could or was refused, and all but those host2's budget
    // can hold have ended.
    let flood_settled = flood
        .wait(Duration::from_secs(20), |s| {
            s.iter().all(|s| s.settled())
                && s.iter().filter(|s| s.ended.is_some()).count() >= STREAMS - HELD
        })
        .await;
    let settle_secs = flooding.elapsed().as_secs_f64();
    let rss_flood = procfs::status_bytes(pid, "VmRSS");

    // host1 syncs through the real agent while all of that holds.
    let mut syncs = Vec::new();
    for _ in 0..SYNCS {
        let first = rand::rng().random_range(0..DISK / BLOCK as u64 - CHANGED_BLOCKS);
        disk::random_blocks(
            &victim.disk,
            BLOCK as u64,
            first,
            CHANGED_BLOCKS,
            &mut rand::rng(),
        );
        let strangers_at_start = strangers.open();
        let sync_started = Instant::now();
        let out = victim
            .sync_cmd(&d, &rx)
            .output()
            .await
            .expect("spawn the agent");
        let secs = sync_started.elapsed().as_secs_f64();
        let mut sent_bytes = 0;
        if out.status.success() {
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            sent_bytes = report["sent_bytes"].as_u64().unwrap_or(0);
            victim.record(&d, &report);
        }
        flood.catch_up();
        syncs.push(HonestSync {
            secs,
            sent_bytes,
            strangers_open: (strangers_at_start, strangers.open()),
            streams_held: flood.streams.iter().filter(|s| s.ended.is_none()).count(),
            out,
        });
    }

    let peak = procfs::status_bytes(pid, "VmHWM");
    let rss_after = procfs::status_bytes(pid, "VmRSS");
    let fds_most = fds.most();
    strangers.catch_up();
    flood.catch_up();
    let mut refusals = std::collections::BTreeMap::new();
    for ending in flood.streams.iter().filter_map(|s| s.ended.as_ref()) {
        *refusals.entry(refusal_kind(ending)).or_insert(0) += 1;
    }
    let refused_8 = flood
        .streams
        .iter()
        .filter(|s| s.grpc_status() == Some(Code::ResourceExhausted as i32))
        .count();
    let held = flood.streams.iter().filter(|s| s.ended.is_none()).count();
    let unexpected: Vec<&Ending> = flood
        .streams
        .iter()
        .filter_map(|s| s.ended.as_ref())
        .filter(|e| !matches!(e, Ending::Status(8, _)))
        .take(5)
        .collect();
    let sent_mib = flood.streams.iter().map(|s| s.sent).sum::<u64>() >> 20;
    eprintln!(
        "strangers: {} connected ({} not) in {connect_secs:.2}s, {} closed early, {} at the \
         handshake deadline (longest held {:.1}s), {strangers_held} held after the first \
         wave (all beyond the pool closed: {beyond_pool_closed})",
        strangers.connected,
        strangers.not_connected,
        strangers.closed_early,
        strangers.closed_at_deadline,
        strangers.longest_held.as_secs_f64(),
    );
    eprintln!(
        "host2: {host2_connections} connections accepted, {} refused (e.g. {:?}); {STREAMS} \
         Upload streams, {sent_mib} MiB sent, settled in {settle_secs:.2}s ({flood_settled}): \
         {refused_8} refused with grpc-status 8, by kind {refusals:?}, {held} held, \
         unexpected endings {unexpected:?}",
        refused_connections.len(),
        refused_connections.first(),
    );
    for (i, sync) in syncs.iter().enumerate() {
        eprintln!(
            "honest sync {}: {:.2}s, {}, {:.1} MiB sent ({} strangers open at its start, {} at \
             its end; {} host2 streams held)",
            i + 1,
            sync.secs,
            if sync.out.status.success() {
                "ok"
            } else {
                "FAILED"
            },
            sync.sent_bytes as f64 / MIB as f64,
            sync.strangers_open.0,
            sync.strangers_open.1,
            sync.streams_held,
        );
    }
    eprintln!(
        "receiver: RSS {} MiB before, {} MiB with the flood settled, {} MiB after; peak \
         (VmHWM) {} MiB; fds {fds_before} before, {fds_strangers} with the strangers, \
         {fds_most} at most; {:.1}s in all",
        rss_before >> 20,
        rss_flood >> 20,
        rss_after >> 20,
        peak >> 20,
        started.elapsed().as_secs_f64(),
    );

    for (i, sync) in syncs.iter().enumerate() {
        assert!(
            sync.out.status.success(),
            "honest sync {} failed under load after {:.2}s: {}",
            i + 1,
            sync.secs,
            String::from_utf8_lossy(&sync.out.stderr)
        );
    }
    assert!(peak < 512 * MIB, "receiver peak RSS {} MiB", peak >> 20);
    // The pool of strangers and host2's share of connections, plus room for host1's
    // connections, catalog readers, packs, and sockets accepted while those they evicted are
    // still being closed; far below the 2,000 strangers and 24 connections offered.
    let fd_bound = fds_before + MAX_HANDSHAKES + MAX_CONNECTIONS_PER_AGENT + 200;
    assert!(
        fds_most < fd_bound,
        "the receiver held {fds_most} descriptors (bound {fd_bound})"
    );
    assert!(
        refused_8 > 0,
        "no host2 stream was refused with RESOURCE_EXHAUSTED"
    );
    assert!(
        flood_settled,
        "the flood did not settle: {held} streams held (host2's budget holds {HELD}), {} \
         still sending",
        flood.streams.iter().filter(|s| !s.settled()).count()
    );
    drop(flood);
    drop(strangers);
    victim.assert_intact(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_receiver_backs_off_and_recovers() {
    const STRANGERS: usize = 300;
    let d = Deployment::new();
    let config = d.path("receiver.toml");
    std::fs::write(&config, "[limits]\nhandshake_timeout = 2\n").unwrap();
    // A receiver with 128 descriptors: strangers take them all, so `accept` fails (EMFILE).
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=128:128")
        .arg("--")
        .arg(bin("rewind-receiver"));
    let rx = Receiver::start_via(
        cmd,
        &d.data(),
        &d.pki(),
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    );
    let mut victim = Victim::seed(&d, &rx, 4 * MIB);
    let pid = rx.pid();
    let mut held = Vec::new();
    for n in 0..STRANGERS {
        let from = SocketAddr::from(([127, 0, 1, 2 + (n % 6) as u8], 0));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(from).unwrap();
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(3), socket.connect(rx.addr())).await
        {
            held.push(s);
        }
    }
    // The receiver is out of descriptors (the rest wait in the listen backlog) ...
    let full = rewind_tests::wait_until(Duration::from_secs(10), || procfs::open_fds(pid) >= 120);
    assert!(full, "the strangers never took the receiver's descriptors");
    // ... and does not spin on the failing accept.
    let ticks = procfs::ticks_per_second();
    let before = procfs::cpu_ticks(pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu =
        (procfs::cpu_ticks(pid) - before) as f64 / ticks as f64 / window.elapsed().as_secs_f64();
    eprintln!(
        "out of descriptors: {} strangers connected, receiver CPU {:.1}% of a core",
        held.len(),
        cpu * 100.0
    );
    assert!(
        cpu < 0.5,
        "the receiver spun at {:.0}% of a core",
        cpu * 100.0
    );
    // Once the strangers are gone (or timed out), an honest agent gets through.
    drop(held);
    victim.write_some();
    victim.sync(&d, &rx);
    victim.assert_intact(&d);
}
