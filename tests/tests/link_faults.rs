//! Link faults between the real agent and the real receiver, made by our own proxy
//! ([`rewind_tests::faultlink`]): cuts at random instants of a seed and of an incremental, a
//! stall that ends, a stall that never does, and a link that carries one byte a second. Every
//! point completes once the link is back, restores bit-exact and sent less than 5% of its bytes
//! twice; a dead link ends `sync --once` with an error within a bound instead of hanging it.
//!
//! Random instants come from a seeded generator whose seed each test prints;
//! `LINK_FAULTS_SEED=N` repeats a run.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rewind_tests::faultlink::{FaultLink, LinkMode};
use rewind_tests::{disk, disk_of, wait_until, Deployment, Receiver};
use serde_json::Value;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;
/// Most of a point's bytes that may cross the link twice over all its attempts.
const MAX_RESENT: f64 = 0.05;
/// Longest a `sync --once` may hang on a link that carries nothing, or a byte a second. The
/// agent's HTTP/2 keepalive (a ping 30 s after the last frame read, 20 s for its answer) should
/// end it after about 50 s.
const DEAD_LINK_BOUND: Duration = Duration::from_secs(120);
/// Longest an agent may take to exit once its connection was reset.
const CUT_NOTICE_BOUND: Duration = Duration::from_secs(30);
/// How long the stall that ends lasts: under the keepalive's 50 s, so the sync rides it out.
const STALL: Duration = Duration::from_secs(15);
/// Cuts per point.
const CUTS: usize = 3;

/// A generator seeded from `LINK_FAULTS_SEED` or the clock; the seed is printed.
fn rng(test: &str) -> StdRng {
    let seed = std::env::var("LINK_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("link-faults: {test}: seed {seed} (LINK_FAULTS_SEED={seed} repeats it)");
    StdRng::seed_from_u64(seed)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// A `sync --once` running in the background, its output kept in files; killed if dropped
/// while it runs.
struct Agent {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Agent {
    fn running(&mut self) -> bool {
        self.child.try_wait().expect("poll agent").is_none()
    }

    /// Waits up to `timeout` for the agent to exit.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().expect("poll agent");
            status.is_some()
        });
        status
    }

    /// The agent's last line on stderr: its error, when it failed.
    fn error(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(nothing on stderr)")
            .to_owned()
    }

    fn report(&self) -> Value {
        let out = std::fs::read(&self.stdout).expect("agent stdout");
        serde_json::from_slice(&out).expect("sync --json prints JSON")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A receiver behind a [`FaultLink`], one VM with one disk, and the digest every committed
/// point must restore to.
struct Rig {
    d: Deployment,
    _rx: Receiver,
    link: FaultLink,
    /// The receiver as the agent sees it: the proxy's address.
    via: Receiver,
    vda: PathBuf,
    points: Vec<(u64, disk::Digest)>,
    attempts: usize,
}

impl Rig {
    /// A deployment whose disk is `size` bytes with its first `random` blocks random.
    fn new(size: u64, random: u64, rng: &mut StdRng) -> Rig {
        let d = Deployment::new();
        let rx = d.serve();
        let link = FaultLink::start(rx.addr()).unwrap();
        let via = Receiver::dead(link.addr);
        let vda = d.path("vda.raw");
        disk::create(&vda, size);
        disk::random_blocks(&vda, BLOCK, 0, random, rng);
        Rig {
            d,
            _rx: rx,
            link,
            via,
            vda,
            points: Vec::new(),
            attempts: 0,
        }
    }

    /// Starts `sync --once` through the link, limited to `bwlimit` MB/s if given.
    fn spawn(&mut self, bwlimit: Option<u64>) -> Agent {
        self.attempts += 1;
        let stdout = self.d.path(&format!("agent-{}.out", self.attempts));
        let stderr = self.d.path(&format!("agent-{}.err", self.attempts));
        let limit = bwlimit.map(|mb| mb.to_string());
        let mut extra = Vec::new();
        if let Some(l) = &limit {
            extra.extend(["--bwlimit", l.as_str()]);
        }
        let child = self
            .d
            .sync_cmd(&self.via, "host1", "vm1", &[("vda", &self.vda)], &extra)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn agent");
        Agent {
            child,
            stdout,
            stderr,
        }
    }

    /// Records a committed point: the disk as it is now is what it must restore to.
    fn committed(&mut self, report: &Value) {
        let point = report["point"].as_u64().expect("point id");
        self.points.push((point, disk::digest(&self.vda)));
    }

    /// A sync through the (working) link that must succeed; returns its report.
    fn sync_ok(&mut self) -> Value {
        let mut agent = self.spawn(None);
        let status = agent
            .wait(Duration::from_secs(120))
            .expect("a sync over a working link ends");
        assert!(status.success(), "sync failed: {}", agent.error());
        let report = agent.report();
        self.committed(&report);
        report
    }

    /// Every committed point is listed and restores to exactly the disk it was taken from.
    fn check_points(&self) {
        let listed = self.d.points("vm1");
        assert_eq!(
            listed.len(),
            self.points.len(),
            "no partial point is listed"
        );
        for (point, digest) in &self.points {
            assert_eq!(
                self.d.restored_digest("vm1", "vda", *point),
                *digest,
                "point {point} restores bit-exact"
            );
        }
    }

    /// The receiver's pack bytes once they stop growing (after a fault it still stages what
    /// arrived before).
    fn settled_pack_bytes(&self) -> u64 {
        settled(|| self.d.pack_bytes())
    }
}

/// A reading once it held still for 300 ms (at most 10 s of waiting).
fn settled<T: PartialEq>(mut read: impl FnMut() -> T) -> T {
    let mut last = read();
    let mut since = Instant::now();
    wait_until(Duration::from_secs(10), || {
        let now = read();
        if now != last {
            last = now;
            since = Instant::now();
        }
        since.elapsed() >= Duration::from_millis(300)
    });
    last
}

/// Waits until the agent's upload is under way (chunk data crossed the link since `before`),
/// then for `delay`, and returns how long after the upload started it then is: the instant
/// for a fault. Panics if the agent ended meanwhile.
fn into_upload(rig: &Rig, agent: &mut Agent, before: u64, delay: Duration) -> Duration {
    assert!(
        wait_until(Duration::from_secs(60), || rig.link.bytes_up()
            > before + MIB
            || !agent.running()),
        "the upload never got going"
    );
    let flowing = Instant::now();
    assert!(agent.running(), "the sync ended early: {}", agent.error());
    wait_until(delay + Duration::from_secs(1), || {
        flowing.elapsed() >= delay || !agent.running()
    });
    assert!(
        agent.running(),
        "the sync finished before its fault {delay:?} into the upload: make the point bigger"
    );
    flowing.elapsed()
}

/// Takes the pending point of `rig` through [`CUTS`] attempts, each cut at a random instant of
/// its upload (limited to `bwlimit` MB/s so that it lasts seconds), then one that finishes.
/// Asserts the point is `blocks` blocks, resumed, and re-sent less than [`MAX_RESENT`].
fn cut_and_resume(rig: &mut Rig, label: &str, blocks: u64, bwlimit: u64, rng: &mut StdRng) {
    let point_bytes = blocks * BLOCK;
    let rate = bwlimit as f64 * 1e6;
    let start_up = rig.link.bytes_up();
    let start_conns = rig.link.connections();
    let start_stored = rig.settled_pack_bytes();
    for k in 1..=CUTS {
        let before = rig.link.bytes_up();
        let stored_before = rig.settled_pack_bytes();
        // A random instant within the first third of what is left, so that every attempt
        // gets somewhere and the last one still has work.
        let left = point_bytes.saturating_sub(stored_before - start_stored);
        let delay = Duration::from_secs_f64(left as f64 / rate * rng.random_range(0.05..0.35));
        let mut agent = rig.spawn(Some(bwlimit));
        let at = into_upload(rig, &mut agent, before, delay);
        rig.link.cut();
        let cut = Instant::now();
        let status = agent
            .wait(CUT_NOTICE_BOUND)
            .expect("the agent notices a cut connection");
        let noticed = cut.elapsed();
        assert!(
            !status.success(),
            "a cut sync --once fails (it does not retry by itself)"
        );
        let up = rig.link.bytes_up() - before;
        let stored = rig.settled_pack_bytes() - stored_before;
        println!(
            "link-faults: {label}: cut {k} {:.2} s into the upload: {:.2} MiB up, {:.2} MiB \
             stored, {:.2} MiB lost; agent exited {} ms later: {}",
            at.as_secs_f64(),
            mib(up),
            mib(stored),
            mib(up.saturating_sub(stored)),
            noticed.as_millis(),
            agent.error()
        );
    }
    let report = rig.sync_ok();
    assert_eq!(report["resumed"], true, "the cut session resumes: {report}");
    assert_eq!(disk_of(&report, "vda")["changed_blocks"], blocks);
    let total = rig.link.bytes_up() - start_up;
    let resent = total.saturating_sub(point_bytes);
    let share = resent as f64 / point_bytes as f64;
    println!(
        "link-faults: {label}: point {:.1} MiB, {:.1} MiB up over {} attempts ({} connections), \
         last attempt sent {:.1} MiB, re-sent {:.2} MiB = {:.2}%",
        mib(point_bytes),
        mib(total),
        CUTS + 1,
        rig.link.connections() - start_conns,
        mib(report["sent_bytes"].as_u64().unwrap()),
        mib(resent),
        100.0 * share
    );
    assert!(
        share < MAX_RESENT,
        "{label}: re-sent {:.2}% of the point (limit {:.0}%)",
        100.0 * share,
        100.0 * MAX_RESENT
    );
}

#[test]
fn cuts_during_a_seed_resume_with_little_resent() {
    let mut rng = rng("cut seed");
    const BLOCKS: u64 = 2048; // 128 MiB of random data
    let mut rig = Rig::new(160 * MIB, BLOCKS, &mut rng);
    cut_and_resume(&mut rig, "cut seed", BLOCKS, 24, &mut rng);
    rig.check_points();
}

#[test]
fn cuts_during_an_incremental_resume_with_little_resent() {
    let mut rng = rng("cut incremental");
    const BLOCKS: u64 = 4096; // 256 MiB of random data, 30% of it rewritten
    let mut rig = Rig::new(256 * MIB, BLOCKS, &mut rng);
    rig.sync_ok();
    let changed = disk::scatter_writes(&rig.vda, BLOCK, BLOCKS, 1229, rng.random());
    cut_and_resume(
        &mut rig,
        "cut incremental",
        changed.len() as u64,
        16,
        &mut rng,
    );
    rig.check_points();
}

#[test]
fn stalls_are_ridden_out_or_detected() {
    let mut rng = rng("stall");
    const BLOCKS: u64 = 1024; // 64 MiB at 8 MB/s: about 8 s
    let mut rig = Rig::new(96 * MIB, BLOCKS, &mut rng);

    // A stall shorter than the keepalive's patience, in the middle of a seed.
    let before = rig.link.bytes_up();
    let mut agent = rig.spawn(Some(8));
    let expected = Duration::from_secs_f64((BLOCKS * BLOCK) as f64 / 8e6);
    into_upload(
        &rig,
        &mut agent,
        before,
        expected.mul_f64(rng.random_range(0.2..0.6)),
    );
    rig.link.set(LinkMode::Stall);
    let stalled = Instant::now();
    // A piece being written when the stall began still lands.
    let held = settled(|| (rig.link.bytes_up(), rig.link.bytes_down()));
    let gave_up = wait_until(STALL.saturating_sub(stalled.elapsed()), || !agent.running());
    assert_eq!(
        (rig.link.bytes_up(), rig.link.bytes_down()),
        held,
        "a stalled link holds every byte"
    );
    rig.link.set(LinkMode::Pass);
    let back = Instant::now();
    let status = agent
        .wait(Duration::from_secs(60))
        .expect("the sync ends once the link is back");
    if status.success() {
        let report = agent.report();
        rig.committed(&report);
        println!(
            "link-faults: stall {} s: the seed rode it out, committed {:.1} s after the link came back",
            STALL.as_secs(),
            back.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "link-faults: stall {} s: the seed failed {:.1} s after the stall began{}: {}",
            STALL.as_secs(),
            stalled.elapsed().as_secs_f64(),
            if gave_up { " (during it)" } else { "" },
            agent.error()
        );
        let report = rig.sync_ok();
        assert_eq!(report["resumed"], true, "{report}");
    }

    // A stall that never ends, in the middle of an incremental: the agent gives up by itself.
    let changed = disk::scatter_writes(&rig.vda, BLOCK, BLOCKS, 320, rng.random());
    let before = rig.link.bytes_up();
    let mut agent = rig.spawn(Some(8));
    let expected = Duration::from_secs_f64((changed.len() as u64 * BLOCK) as f64 / 8e6);
    into_upload(
        &rig,
        &mut agent,
        before,
        expected.mul_f64(rng.random_range(0.1..0.5)),
    );
    rig.link.set(LinkMode::Stall);
    let stalled = Instant::now();
    let status = agent.wait(DEAD_LINK_BOUND);
    let took = stalled.elapsed();
    println!(
        "link-faults: endless stall: the agent exited {:.1} s after the stall began ({}): {}",
        took.as_secs_f64(),
        status.map_or("still running".to_owned(), |s| s.to_string()),
        agent.error()
    );
    let status = status.unwrap_or_else(|| {
        panic!(
            "sync --once still hangs {} s into a stall that does not end",
            DEAD_LINK_BOUND.as_secs()
        )
    });
    assert!(!status.success(), "a sync over a dead link fails");
    rig.link.set(LinkMode::Pass);
    let report = rig.sync_ok();
    assert_eq!(report["resumed"], true, "{report}");
    assert_eq!(disk_of(&report, "vda")["changed_blocks"], changed.len());
    rig.check_points();
}

#[test]
fn a_byte_a_second_is_detected_and_resumed() {
    let mut rng = rng("trickle");
    const BLOCKS: u64 = 2048;
    let point_bytes = BLOCKS * BLOCK;
    let mut rig = Rig::new(160 * MIB, BLOCKS, &mut rng);
    let start_up = rig.link.bytes_up();
    let start_stored = rig.settled_pack_bytes();
    let mut agent = rig.spawn(Some(24));
    let expected = Duration::from_secs_f64(point_bytes as f64 / 24e6);
    into_upload(
        &rig,
        &mut agent,
        start_up,
        expected.mul_f64(rng.random_range(0.2..0.6)),
    );
    rig.link.set(LinkMode::Trickle { bytes_per_sec: 1 });
    let slowed = Instant::now();
    let slow_up = rig.link.bytes_up();
    let status = agent.wait(DEAD_LINK_BOUND);
    let took = slowed.elapsed();
    let trickled = rig.link.bytes_up() - slow_up;
    println!(
        "link-faults: trickle 1 B/s: the agent exited {:.1} s after the link slowed ({}), \
         {trickled} bytes trickled up meanwhile: {}",
        took.as_secs_f64(),
        status.map_or("still running".to_owned(), |s| s.to_string()),
        agent.error()
    );
    let status = status.unwrap_or_else(|| {
        panic!(
            "sync --once still hangs {} s into a 1 byte/s link",
            DEAD_LINK_BOUND.as_secs()
        )
    });
    assert!(!status.success(), "a sync over a 1 byte/s link fails");
    assert!(
        trickled <= took.as_secs() + 2,
        "the link kept to 1 byte/s: {trickled} bytes in {took:?}"
    );
    let first_up = rig.link.bytes_up() - start_up;
    let first_stored = rig.settled_pack_bytes() - start_stored;
    rig.link.set(LinkMode::Pass);
    // The dead attempt's bytes still queued in the sockets (up to about 10 MiB on loopback:
    // the exited agent's send buffer and the proxy's receive buffer) now flow to the receiver,
    // which stages the whole messages among them. A daemon retries at its next interval, long
    // after that connection ended; a retry racing it would ask for chunks on their way.
    assert!(
        wait_until(DEAD_LINK_BOUND, || rig.link.open_connections() == 0),
        "the dead attempt's connection never ended"
    );
    let flushed = rig.link.bytes_up() - start_up - first_up;
    let report = rig.sync_ok();
    assert_eq!(report["resumed"], true, "{report}");
    let total = rig.link.bytes_up() - start_up;
    let resent = total.saturating_sub(point_bytes);
    let share = resent as f64 / point_bytes as f64;
    println!(
        "link-faults: trickle 1 B/s: point {:.1} MiB, {:.1} MiB up over 2 attempts (the first \
         {:.2} MiB up, {:.2} MiB stored, {:.2} MiB flushed after the link came back; the last \
         sent {:.2} MiB), re-sent {:.2} MiB = {:.2}%",
        mib(point_bytes),
        mib(total),
        mib(first_up),
        mib(first_stored),
        mib(flushed),
        mib(report["sent_bytes"].as_u64().unwrap_or(0)),
        mib(resent),
        100.0 * share
    );
    assert!(share < MAX_RESENT, "re-sent {:.2}%", 100.0 * share);
    rig.check_points();
}

/// An echo server on a free port, serving each connection on its own thread.
fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Reads exactly `n` bytes, or says how the connection ended first.
fn read_n(c: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut got = vec![0u8; n];
    c.read_exact(&mut got)?;
    Ok(got)
}

#[test]
fn the_fault_link_obeys_its_mode() {
    let link = FaultLink::start(echo_server()).unwrap();
    let mut c = TcpStream::connect(link.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello").unwrap();
    assert_eq!(
        read_n(&mut c, 5).unwrap(),
        b"hello",
        "a passing link echoes"
    );
    // The proxy counts a piece after writing it, so the echo may arrive first.
    assert!(
        wait_until(Duration::from_secs(5), || (
            link.bytes_up(),
            link.bytes_down()
        ) == (5, 5)),
        "each direction counted: {} up, {} down",
        link.bytes_up(),
        link.bytes_down()
    );

    // Stalled: nothing moves either way, then everything held arrives in order.
    link.set(LinkMode::Stall);
    c.write_all(b"held").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 4];
    assert!(c.read(&mut b).is_err(), "nothing comes back while stalled");
    assert_eq!(link.bytes_up(), 5, "nothing goes up while stalled");
    link.set(LinkMode::Pass);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_n(&mut c, 4).unwrap(), b"held");

    // Trickling at 100 B/s each way: 150 bytes take over a second.
    link.set(LinkMode::Trickle { bytes_per_sec: 100 });
    let t = Instant::now();
    let payload: Vec<u8> = (0..150u8).collect();
    c.write_all(&payload).unwrap();
    assert_eq!(read_n(&mut c, 150).unwrap(), payload);
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    link.set(LinkMode::Pass);

    // A cut resets the open connection; a new one passes again.
    link.cut();
    assert!(read_n(&mut c, 1).is_err(), "a cut connection ends");
    let mut c = TcpStream::connect(link.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"again").unwrap();
    assert_eq!(read_n(&mut c, 5).unwrap(), b"again");

    // Down: the open connection ends and new ones are refused until the link passes again.
    link.set(LinkMode::Down);
    assert!(read_n(&mut c, 1).is_err(), "going down cuts connections");
    let mut refused = TcpStream::connect(link.addr).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = refused.write_all(b"x");
    assert!(read_n(&mut refused, 1).is_err(), "a down link refuses");
    link.set(LinkMode::Pass);
    let mut c = TcpStream::connect(link.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"back").unwrap();
    assert_eq!(read_n(&mut c, 4).unwrap(), b"back");
    assert_eq!(link.connections(), 4);
}
