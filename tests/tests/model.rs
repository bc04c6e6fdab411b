//! Random disk histories, replicated in-process and restored, checked against a byte-array model.
//!
//! Each case writes, zeroes, rewrites and grows one or two raw disks over a few steps and syncs
//! after each one, with the agent library against a receiver served in-process on loopback
//! (mutual TLS, a throw-away PKI). The model is a `Vec<u8>` per disk: every sync must report
//! exactly the blocks whose content changed since the model's previous snapshot, and every
//! point of every disk must restore to the snapshot taken when it was synced.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rand::{RngCore, SeedableRng};
use rewind_agent::sync::SyncReport;
use rewind_proto::format::MIN_BLOCK_SIZE;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// The smallest block size the format allows: the most blocks per byte written.
const BS: u64 = MIN_BLOCK_SIZE as u64;

/// A disk stops growing past this size, so a case stays small.
const GROW_CAP: u64 = 3 << 20;

const VM: &str = "model";

/// An in-process deployment: PKI, receiver, agent sync and restore over one temporary folder.
mod inproc {
    use rewind_agent::client::{self, ReceiverConfig};
    use rewind_agent::sync::{sync_once, Bandwidth, DiskKind, DiskSource, SyncConfig, SyncReport};
    use rewind_proto::format::BlockSize;
    use rewind_receiver::config::Limits;
    use rewind_receiver::points::{self, PointInfo, PointSelector};
    use rewind_receiver::server::ServeError;
    use rewind_receiver::store::Store;
    use rewind_receiver::{catalog, pki, restore, server};
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    /// The agent identity the deployment issues a certificate for.
    pub const AGENT: &str = "host1";

    /// A temporary folder holding `pki/` (a CA, the receiver's and [`AGENT`]'s certificates),
    /// `data/` (the receiver's store), `state/` (the agent's) and whatever the test puts there.
    pub struct Deployment {
        dir: tempfile::TempDir,
    }

    impl Deployment {
        pub fn new() -> Deployment {
            let dir = tempfile::tempdir().unwrap();
            let d = Deployment { dir };
            pki::init(&d.pki(), &[]).unwrap();
            pki::issue(&d.pki(), AGENT, pki::LEAF_DAYS, false).unwrap();
            d
        }

        pub fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn pki(&self) -> PathBuf {
            self.path("pki")
        }

        pub fn data(&self) -> PathBuf {
            self.path("data")
        }

        /// Serves the data folder on a free loopback port, as `serve` does but without its
        /// signal handlers and background loops (retention, drills, clock): the listener is
        /// bound before this returns, so an agent can connect at once.
        pub async fn serve(&self) -> Receiver {
            let pki = pki::load_server(&self.pki()).unwrap();
            let admission = server::admission(&pki, Limits::default()).unwrap();
            let store = Arc::new(Store::open(&self.data()).unwrap());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(server::run(listener, admission, store, async move {
                // A dropped sender (a panicking test) stops the server too.
                let _ = stopped.await;
            }));
            Receiver {
                addr,
                stop: Some(stop),
                task: Some(task),
            }
        }

        /// One `sync --once` of `disks` (name, raw image) as [`AGENT`], with `block_size`.
        pub async fn sync(
            &self,
            rx: &Receiver,
            vm: &str,
            disks: &[(String, PathBuf)],
            block_size: u64,
        ) -> SyncReport {
            let cfg = SyncConfig {
                vm: vm.to_owned(),
                disks: disks
                    .iter()
                    .map(|(name, path)| DiskSource {
                        name: name.clone(),
                        path: path.clone(),
                        kind: DiskKind::Raw,
                    })
                    .collect(),
                live: None,
                libvirt: None,
                block_size: BlockSize::new(block_size).unwrap(),
                state_dir: self.path("state"),
                bwlimit: Bandwidth::fixed(None),
                codec: rewind_proto::crypt::Codec::Plain,
            };
            let receiver = ReceiverConfig {
                url: format!("https://{}", rx.addr),
                ca: self.pki().join("ca.pem"),
                cert: self.pki().join(format!("{AGENT}.pem")),
                key: self.pki().join(format!("{AGENT}.key")),
            };
            let mut c = client::connect(&receiver).await.unwrap();
            sync_once(&mut c, &cfg, Arc::new(|_, _| {})).await.unwrap()
        }

        /// The committed points of `vm`, oldest first, from the receiver's catalog.
        pub fn points(&self, vm: &str) -> Vec<PointInfo> {
            let conn = catalog::open_ro(&self.data()).unwrap();
            points::list(&conn, Some(vm)).unwrap()
        }

        /// `restore --point POINT --disk DISK --out OUT` (raw), returning the image's bytes.
        pub fn restore(&self, vm: &str, point: i64, disk: &str, out: &Path) -> Vec<u8> {
            let conn = catalog::open_ro(&self.data()).unwrap();
            let info = points::resolve(&conn, vm, &PointSelector::Id(point)).unwrap();
            let d = info.disks.iter().find(|d| d.name == disk).unwrap();
            restore::restore_disk(
                &conn,
                (&self.data(), &rewind_proto::crypt::Codec::Plain),
                point,
                d,
                out,
                &|_| {},
            )
            .unwrap();
            std::fs::read(out).unwrap()
        }
    }

    /// A receiver served in-process; dropping it asks the server to stop.
    pub struct Receiver {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: Option<JoinHandle<Result<(), ServeError>>>,
    }

    impl Receiver {
        /// Stops serving and waits until the server has finished (its store closed).
        pub async fn stop(mut self) {
            drop(self.stop.take());
            if let Some(task) = self.task.take() {
                task.await.unwrap().unwrap();
            }
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            drop(self.stop.take());
        }
    }
}

/// One change to a disk between two syncs. Offsets and picks are reduced modulo the disk's
/// current size (or its count of data blocks), so any value applies to any disk.
#[derive(Debug, Clone)]
enum Op {
    /// Random bytes (from `seed`) at any offset, block-aligned or not.
    Write {
        disk: usize,
        at: u64,
        len: u64,
        seed: u64,
    },
    /// Zeros over a whole block that holds data (nothing if none does).
    ZeroBlock { disk: usize, pick: usize },
    /// The bytes already there, written again.
    Rewrite { disk: usize, at: u64, len: u64 },
    /// `blocks` whole blocks longer, plus `extra` bytes (0: stays a whole number of blocks
    /// longer).
    Grow {
        disk: usize,
        blocks: u64,
        extra: u64,
    },
}

impl Op {
    fn disk(&self) -> usize {
        match *self {
            Op::Write { disk, .. }
            | Op::ZeroBlock { disk, .. }
            | Op::Rewrite { disk, .. }
            | Op::Grow { disk, .. } => disk,
        }
    }
}

/// A case: the disks' first sizes, then the changes made before each sync.
#[derive(Debug, Clone)]
struct History {
    sizes: Vec<u64>,
    steps: Vec<Vec<Op>>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, any::<u64>(), 1..=3 * BS, any::<u64>())
            .prop_map(|(disk, at, len, seed)| Op::Write { disk, at, len, seed }),
        1 => (0..2usize, any::<usize>()).prop_map(|(disk, pick)| Op::ZeroBlock { disk, pick }),
        1 => (0..2usize, any::<u64>(), 1..=3 * BS)
            .prop_map(|(disk, at, len)| Op::Rewrite { disk, at, len }),
        1 => (0..2usize, 1..=8u64, prop_oneof![Just(0u64), 1..BS])
            .prop_map(|(disk, blocks, extra)| Op::Grow { disk, blocks, extra }),
    ]
}

fn history() -> impl Strategy<Value = History> {
    let size = prop_oneof![
        (64..=512u64).prop_map(|blocks| blocks * BS),
        (256 << 10)..=(2u64 << 20),
    ];
    (vec(size, 1..=2), vec(vec(op(), 0..=5), 3..=8))
        .prop_map(|(sizes, steps)| History { sizes, steps })
}

/// A disk both as its raw image file and as the model's bytes.
struct Disk {
    name: String,
    path: PathBuf,
    file: std::fs::File,
    model: Vec<u8>,
}

impl Disk {
    fn create(name: String, path: PathBuf, size: u64) -> Disk {
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        Disk {
            name,
            path,
            file,
            model: vec![0; size as usize],
        }
    }

    fn write(&mut self, at: u64, bytes: &[u8]) {
        self.file.write_all_at(bytes, at).unwrap();
        self.model[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    }

    /// The range `[at, at + len)` reduced to fit the disk.
    fn span(&self, at: u64, len: u64) -> (u64, usize) {
        let size = self.model.len() as u64;
        let at = at % size;
        (at, len.min(size - at) as usize)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { at, len, seed, .. } => {
                let (at, n) = self.span(at, len);
                let mut bytes = vec![0; n];
                rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
                self.write(at, &bytes);
            }
            Op::ZeroBlock { pick, .. } => {
                let data: Vec<usize> = (0..blocks(&self.model))
                    .filter(|&i| !is_zero(block(&self.model, i)))
                    .collect();
                if !data.is_empty() {
                    let i = data[pick % data.len()];
                    let zeros = vec![0; block(&self.model, i).len()];
                    self.write(i as u64 * BS, &zeros);
                }
            }
            Op::Rewrite { at, len, .. } => {
                let (at, n) = self.span(at, len);
                let same = self.model[at as usize..at as usize + n].to_vec();
                self.write(at, &same);
            }
            Op::Grow { blocks, extra, .. } => {
                let size = self.model.len() as u64 + blocks * BS + extra;
                if size <= GROW_CAP {
                    self.file.set_len(size).unwrap();
                    self.model.resize(size as usize, 0);
                }
            }
        }
    }
}

fn blocks(bytes: &[u8]) -> usize {
    bytes.len().div_ceil(BS as usize)
}

/// Block `i` of a disk's bytes (the last may be short; empty past the end).
fn block(bytes: &[u8], i: usize) -> &[u8] {
    let start = (i * BS as usize).min(bytes.len());
    &bytes[start..(start + BS as usize).min(bytes.len())]
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// What a block holds as far as a point is concerned: nothing when it is all zeros or past
/// the end (a hole), else its bytes (so a short last block that grew is new content).
fn content(bytes: &[u8], i: usize) -> Option<&[u8]> {
    Some(block(bytes, i)).filter(|b| !is_zero(b))
}

/// Whether the receiver continues a disk of `prev` bytes with one of `now` bytes as a delta:
/// the same size, or grown from a whole number of blocks. Anything else (and a disk's first
/// point) is a full point of a new generation.
fn is_delta(prev: Option<&[u8]>, now: &[u8]) -> bool {
    prev.is_some_and(|p| {
        p.len() == now.len() || (p.len() < now.len() && (p.len() as u64).is_multiple_of(BS))
    })
}

/// The model's count of changed blocks: for a delta, the blocks whose content differs from the
/// previous snapshot; for a full point, the blocks that hold data (every one differs from
/// an empty base).
fn changed_blocks(prev: Option<&[u8]>, now: &[u8]) -> u64 {
    let base = prev.filter(|_| is_delta(prev, now)).unwrap_or(&[]);
    (0..blocks(base).max(blocks(now)))
        .filter(|&i| content(base, i) != content(now, i))
        .count() as u64
}

/// The first offset where two images differ, or where the shorter one ends.
fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// A synced point: its report and each disk's model snapshot at the sync.
struct Synced {
    report: SyncReport,
    snapshots: Vec<Vec<u8>>,
}

fn check(rt: &tokio::runtime::Runtime, h: &History) {
    let d = inproc::Deployment::new();
    std::fs::create_dir(d.path("disks")).unwrap();
    let mut disks: Vec<Disk> = h
        .sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let name = format!("vd{}", char::from(b'a' + i as u8));
            let path = d.path(&format!("disks/{name}.raw"));
            Disk::create(name, path, size)
        })
        .collect();
    let files: Vec<(String, PathBuf)> = disks
        .iter()
        .map(|k| (k.name.clone(), k.path.clone()))
        .collect();

    let synced = rt.block_on(async {
        let rx = d.serve().await;
        let mut synced: Vec<Synced> = Vec::new();
        for (step, ops) in h.steps.iter().enumerate() {
            for op in ops {
                let n = disks.len();
                disks[op.disk() % n].apply(op);
            }
            let report = d.sync(&rx, VM, &files, BS).await;
            let snapshots: Vec<Vec<u8>> = disks.iter().map(|k| k.model.clone()).collect();
            for (i, (k, now)) in disks.iter().zip(&snapshots).enumerate() {
                let prev = synced.last().map(|s| s.snapshots[i].as_slice());
                let r = report.disks.iter().find(|r| r.name == k.name).unwrap();
                let mode = if is_delta(prev, now) { "delta" } else { "full" };
                assert_eq!(r.size, now.len() as u64, "step {step}, {}: size", k.name);
                assert_eq!(r.mode, mode, "step {step}, {}: mode", k.name);
                assert_eq!(
                    r.changed_blocks,
                    changed_blocks(prev, now),
                    "step {step}, {} ({mode}): changed blocks",
                    k.name
                );
            }
            synced.push(Synced { report, snapshots });
        }
        rx.stop().await;
        synced
    });

    let points = d.points(VM);
    assert_eq!(
        points.iter().map(|p| p.id).collect::<Vec<_>>(),
        synced.iter().map(|s| s.report.point).collect::<Vec<_>>(),
        "one committed point per sync"
    );
    std::fs::create_dir(d.path("restored")).unwrap();
    for (s, p) in synced.iter().zip(&points) {
        for (k, want) in disks.iter().zip(&s.snapshots) {
            let reported = s.report.disks.iter().find(|r| r.name == k.name).unwrap();
            let stored = p.disks.iter().find(|r| r.name == k.name).unwrap();
            assert_eq!(
                (stored.changed_blocks, &stored.root),
                (reported.changed_blocks, &reported.root),
                "point {}, {}: the catalog records what the agent reported",
                p.id,
                k.name
            );
            let out = d.path(&format!("restored/{}-{}.raw", p.id, k.name));
            let got = d.restore(VM, p.id, &k.name, &out);
            assert!(
                got == *want,
                "point {}, {}: restored {} bytes, the model has {}; first difference at {}",
                p.id,
                k.name,
                got.len(),
                want.len(),
                first_difference(&got, want)
            );
        }
    }
}

#[test]
fn random_histories_restore_as_the_model_says() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 12,
        // Each case serves, syncs and restores for real: keep a failure's shrinking bounded.
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&history(), |h| {
        check(&rt, &h);
        Ok(())
    }) {
        panic!("{e}");
    }
}

#[test]
fn the_model_counts_changes_as_the_receiver_does() {
    let bs = BS as usize;
    let mut a = vec![0u8; 4 * bs];
    assert_eq!(changed_blocks(None, &a), 0, "an empty disk's full point");
    a[bs + 7] = 1;
    a[3 * bs] = 2;
    assert_eq!(changed_blocks(None, &a), 2, "full: the blocks with data");
    let mut b = a.clone();
    b[bs + 7] = 0;
    b[2 * bs + 1] = 3;
    assert_eq!(changed_blocks(Some(&a), &b), 2, "one zeroed, one written");
    assert_eq!(changed_blocks(Some(&a), &a), 0, "nothing changed");
    let mut grown = a.clone();
    grown.resize(6 * bs, 0);
    assert!(is_delta(Some(&a), &grown));
    assert_eq!(changed_blocks(Some(&a), &grown), 0, "new blocks are holes");
    let short = a[..3 * bs + 10].to_vec();
    let mut longer = short.clone();
    longer.resize(4 * bs, 0);
    assert!(
        !is_delta(Some(&short), &longer),
        "growth from a partial block"
    );
    assert_eq!(changed_blocks(Some(&short), &longer), 2, "a full point");
}
