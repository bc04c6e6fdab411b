//! A second offsite copy: a receiver pulls another receiver's points with a replica identity.
//! Only the chunks it lacks travel, every point keeps its roots and restores bit-exact from the
//! copy, the replica identity cannot write to the primary, and a primary that prunes and
//! collects everything (or is wiped) takes nothing from the copy.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::copying::{replica, wait_points};
use rewind_tests::faultlink::{FaultLink, LinkMode};
use rewind_tests::{bin, disk, Deployment, Receiver};
use std::process::Command;
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

/// A copy receiver of `primary` (reached at `rx`), with its own PKI and data folder, pulling
/// every second with replica identity `copy1`.
fn start_copy(primary: &Deployment, rx: &Receiver) -> (Deployment, Receiver) {
    let (copy, config) = copy_setup(primary, rx);
    let crx = Receiver::start_with(
        &copy.data(),
        &copy.pki(),
        &["--config", config.to_str().unwrap()],
    );
    (copy, crx)
}

/// The replica identity on `primary`, and a copy deployment with its configuration file.
fn copy_setup(primary: &Deployment, rx: &Receiver) -> (Deployment, std::path::PathBuf) {
    replica(primary, rx.addr())
}

/// The copy events of `d`'s catalog: (local point, detail).
fn copy_events(d: &Deployment) -> Vec<(i64, serde_json::Value)> {
    let conn = rusqlite::Connection::open(d.data().join("catalog.sqlite")).unwrap();
    let mut stmt = conn
        .prepare("SELECT point, detail FROM events WHERE kind = 'copy' ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(|r| {
            let (p, d) = r.unwrap();
            (p, serde_json::from_str(&d).unwrap())
        })
        .collect()
}

/// When the copy last looked at the source for `vm` (microseconds), 0 before its first run.
fn last_check(d: &Deployment, vm: &str) -> i64 {
    let conn = rusqlite::Connection::open(d.data().join("catalog.sqlite")).unwrap();
    conn.query_row(
        "SELECT COALESCE(MAX(checked_us), 0) FROM copy_lag WHERE vm = ?1",
        [vm],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

/// A primary receiver holding one point of `vm1` (agent `host1`): a disk of `mib` MiB whose
/// first `blocks` blocks are random; the disk's path and digest.
fn seeded(mib: u64, blocks: u64) -> (Deployment, Receiver, std::path::PathBuf, disk::Digest) {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, mib * MIB);
    disk::random_blocks(&vda, BLOCK, 0, blocks, &mut rand::rng());
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want = disk::digest(&vda);
    (d, rx, vda, want)
}

/// Waits for two more copy runs over `vm` after now.
fn wait_two_runs(d: &Deployment, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..2 {
        let seen = last_check(d, vm);
        while last_check(d, vm) <= seen {
            assert!(Instant::now() < deadline, "no copy run came");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_copy_pulls_only_missing_chunks_and_keeps_its_points_when_the_primary_prunes_everything() {
    let (d, rx, vda, want1) = seeded(32, 200);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 50, 3, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want2 = disk::digest(&vda);

    let (copy, crx) = start_copy(&d, &rx);
    let got = wait_points(&copy, "vm1", 2);
    let primary = d.points("vm1");
    // Same creation times and roots as the primary's points.
    for (a, b) in got.iter().zip(&primary) {
        assert_eq!(a["created"], b["created"]);
        assert_eq!(a["disks"][0]["root"], b["disks"][0]["root"]);
        assert_eq!(a["consistency"], b["consistency"]);
    }
    // The seed's 200 chunks travelled once; the incremental sent its 3 changed blocks and
    // their 3 chunks only.
    let ev = copy_events(&copy);
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[0].1["chunks"], 200, "{ev:?}");
    assert_eq!(
        (ev[1].1["entries"].as_u64(), ev[1].1["chunks"].as_u64()),
        (Some(3), Some(3)),
        "{ev:?}"
    );
    let id = |p: &serde_json::Value| p["id"].as_u64().unwrap();
    assert_eq!(copy.restored_digest("vm1", "vda", id(&got[0])), want1);
    assert_eq!(copy.restored_digest("vm1", "vda", id(&got[1])), want2);

    // The replica identity can read, never write: a sync with its certificate is refused.
    let o = d.sync(&rx, "copy1", "vm9", &[("vda", &vda)], &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("replica identity may only read"), "{err}");
    assert!(d.try_points("vm9").is_err());

    // A new point on the primary arrives at the copy.
    disk::random_blocks(&vda, BLOCK, 300, 2, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want3 = disk::digest(&vda);
    let got = wait_points(&copy, "vm1", 3);
    assert_eq!(copy.restored_digest("vm1", "vda", id(&got[2])), want3);

    // The primary prunes everything it may and collects the space; the copy runs again and
    // keeps every point.
    let o = rewind_tests::run(
        Command::new(bin("rewind-receiver"))
            .args(["prune", "--vm", "vm1", "--keep-last", "1", "--data"])
            .arg(d.data()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = rewind_tests::run(
        Command::new(bin("rewind-receiver"))
            .args(["gc", "--grace", "0", "--data"])
            .arg(d.data()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.points("vm1").len(), 1);
    wait_two_runs(&copy, "vm1");
    // Then the primary is wiped.
    drop(rx);
    std::fs::remove_dir_all(d.data()).unwrap();
    let kept = copy.points("vm1");
    assert_eq!(kept.len(), 3);
    drop(crx);
    assert_eq!(copy.restored_digest("vm1", "vda", id(&kept[0])), want1);
    assert_eq!(copy.restored_digest("vm1", "vda", id(&kept[1])), want2);
    assert_eq!(copy.restored_digest("vm1", "vda", id(&kept[2])), want3);
}

#[test]
fn a_copy_killed_before_a_commit_resumes_that_point_and_never_makes_it_twice() {
    let (d, rx, vda, want1) = seeded(16, 100);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 10, 5, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want2 = disk::digest(&vda);
    let (copy, config) = copy_setup(&d, &rx);

    // The first run is killed (SIGKILL) right before it commits its first point.
    let status = Command::new(bin("rewind-receiver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(copy.data())
        .arg("--pki")
        .arg(copy.pki())
        .arg("--config")
        .arg(&config)
        .env("REWIND_FAULT", "copy-before-commit")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    assert!(copy.try_points("vm1").map_or(true, |p| p.is_empty()));
    let conn = rusqlite::Connection::open(copy.data().join("catalog.sqlite")).unwrap();
    let pending: i64 = conn
        .query_row("SELECT COUNT(*) FROM copies WHERE point IS NULL", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(pending, 1);
    drop(conn);

    // The next run resumes that point: both points, once each; the resumed one read no chunk
    // again (all 100 were durable before the kill).
    let crx = Receiver::start_with(
        &copy.data(),
        &copy.pki(),
        &["--config", config.to_str().unwrap()],
    );
    wait_points(&copy, "vm1", 2);
    wait_two_runs(&copy, "vm1");
    let got = copy.points("vm1");
    assert_eq!(got.len(), 2);
    let ev = copy_events(&copy);
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[0].1["chunks"], 0, "{ev:?}");
    assert_eq!(ev[1].1["chunks"], 5, "{ev:?}");
    drop(crx);
    let id = |p: &serde_json::Value| p["id"].as_u64().unwrap();
    assert_eq!(copy.restored_digest("vm1", "vda", id(&got[0])), want1);
    assert_eq!(copy.restored_digest("vm1", "vda", id(&got[1])), want2);
}

#[test]
fn a_copy_keeps_to_its_bandwidth_limit() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 32 * MIB);
    // 200 random blocks: 12.5 MiB that do not compress.
    disk::random_blocks(&vda, BLOCK, 0, 200, &mut rand::rng());
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let (copy, config) = copy_setup(&d, &rx);
    // Metrics too, on a free port (the table keys go before [copy]).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("metrics = \"{metrics}\"\n{text}bwlimit_mbit = 20\n"),
    )
    .unwrap();
    let started = Instant::now();
    let _crx = Receiver::start_with(
        &copy.data(),
        &copy.pki(),
        &["--config", config.to_str().unwrap()],
    );
    wait_points(&copy, "vm1", 1);
    let took = started.elapsed();
    wait_two_runs(&copy, "vm1");
    // At 20 Mbit/s (2.5 MB/s) with at most a second's worth ahead, 13.1 MB cannot arrive in
    // under (13.1 - 2.5) / 2.5 = 4.2 s. (A lower bound: a slow machine only adds to it.)
    let bytes = copy_events(&copy)[0].1["chunk_bytes"].as_u64().unwrap();
    assert!(bytes > 13_000_000, "{bytes}");
    let floor = (bytes as f64 - 2.5e6) / 2.5e6;
    assert!(took.as_secs_f64() >= floor, "{took:?} for {bytes} bytes");
    // Caught up: the lag the last run saw is 0, and the run's age is exported.
    let m = rewind_tests::scrape_metrics(&metrics);
    let lag = format!(
        "rewind_copy_lag_seconds{{source=\"https://{}\",vm=\"vm1\"}} 0.000",
        rx.addr()
    );
    assert!(m.contains(&lag), "{m}");
    assert!(m.contains("rewind_copy_last_run_age_seconds{"), "{m}");
}

#[test]
fn a_vm_that_exists_on_the_copy_is_never_written_by_it() {
    let d = Deployment::new();
    let rx = d.serve();
    let (a, z, l) = (d.path("a.raw"), d.path("z.raw"), d.path("l.raw"));
    for p in [&a, &z, &l] {
        disk::create(p, 4 * MIB);
        disk::random_blocks(p, BLOCK, 0, 8, &mut rand::rng());
    }
    d.sync_ok(&rx, "host1", "alpha", &[("vda", &a)]);
    d.sync_ok(&rx, "host1", "zulu", &[("vda", &z)]);
    // The copy's own agent protects a VM of the same name on the copy, before any copy run.
    let (copy, config) = copy_setup(&d, &rx);
    let local = {
        let own = copy.serve();
        copy.sync_ok(&own, "host1", "alpha", &[("vda", &l)])
    };
    let crx = Receiver::start_with(
        &copy.data(),
        &copy.pki(),
        &["--config", config.to_str().unwrap()],
    );
    wait_points(&copy, "zulu", 1);
    // Two more runs over every VM: alpha was tried at least once in between.
    wait_two_runs(&copy, "zulu");
    drop(crx);
    let points = copy.points("alpha");
    assert_eq!(points.len(), 1, "{points:?}");
    assert_eq!(
        points[0]["disks"][0]["root"],
        rewind_tests::disk_of(&local, "vda")["root"]
    );
    let conn = rusqlite::Connection::open(copy.data().join("catalog.sqlite")).unwrap();
    let copied: i64 = conn
        .query_row("SELECT COUNT(*) FROM copies WHERE vm = 'alpha'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(copied, 0);
    let alpha = copy.points("alpha")[0]["id"].as_u64().unwrap();
    assert_eq!(
        copy.restored_digest("alpha", "vda", alpha),
        disk::digest(&l)
    );
    let zulu = copy.points("zulu")[0]["id"].as_u64().unwrap();
    assert_eq!(copy.restored_digest("zulu", "vda", zulu), disk::digest(&z));

    // Nor is a copied VM written by the copy's own agents, even one whose name is the source
    // agent's (the copy's PKI issued it): the copy's history is the source's alone.
    let own = copy.serve();
    let o = copy.sync(&own, "host1", "zulu", &[("vda", &l)], &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("VM zulu is a copy of https://{}'s", rx.addr())),
        "{err}"
    );
    assert_eq!(copy.points("zulu").len(), 1);
}

#[test]
fn a_chunk_the_copy_quarantined_comes_back_from_the_source_with_the_next_point() {
    let (d, rx, vda, want1) = seeded(16, 100);
    let mut rng = rand::rng();
    let (copy, config) = copy_setup(&d, &rx);
    let start = || {
        Receiver::start_with(
            &copy.data(),
            &copy.pki(),
            &["--config", config.to_str().unwrap()],
        )
    };
    let crx = start();
    wait_points(&copy, "vm1", 1);
    drop(crx);

    // The copy's disk rots one byte of a seed chunk; its verify quarantines that chunk.
    copy.flip_pack_byte(0xff);
    let verify = || {
        rewind_tests::run(
            Command::new(bin("rewind-receiver"))
                .args(["verify", "--json", "--data"])
                .arg(copy.data()),
        )
    };
    let o = verify();
    assert!(!o.status.success());
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["bad"].as_array().map(Vec::len), Some(1), "{r}");

    // The primary's next point changes three other blocks. The copy of it also brings the
    // quarantined chunk back from the source (its block is unchanged since the copy's base):
    // four entries, four chunks; the copy verifies clean and both points restore bit-exact.
    disk::random_blocks(&vda, BLOCK, 97, 3, &mut rng);
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want2 = disk::digest(&vda);
    let crx = start();
    let got = wait_points(&copy, "vm1", 2);
    drop(crx);
    let ev = copy_events(&copy);
    assert_eq!(
        (ev[1].1["entries"].as_u64(), ev[1].1["chunks"].as_u64()),
        (Some(4), Some(4)),
        "{ev:?}"
    );
    let o = verify();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let id = |p: &serde_json::Value| p["id"].as_u64().unwrap();
    assert_eq!(copy.restored_digest("vm1", "vda", id(&got[0])), want1);
    assert_eq!(copy.restored_digest("vm1", "vda", id(&got[1])), want2);
}

#[test]
fn a_copy_whose_source_link_fails_mid_point_resumes_without_reading_what_is_durable() {
    // 5000 random blocks: five batches of entries (1024 blocks each), at most three read at a
    // time, so when the first is durable the last ones have not all arrived.
    const BLOCKS: u64 = 5000;
    let (d, rx, _, want) = seeded(320, BLOCKS);
    // The copy reaches the primary through a link slow enough that the last batches are
    // still to come when the first is durable.
    let link = FaultLink::start(rx.addr()).unwrap();
    link.set(LinkMode::Trickle {
        bytes_per_sec: 32 << 20,
    });
    let (copy, config) = replica(&d, link.addr);
    let crx = Receiver::start_with(
        &copy.data(),
        &copy.pki(),
        &["--config", config.to_str().unwrap()],
    );
    // Once the first batch's chunks are durable on the copy, the link goes down: the reads
    // in flight fail, and with them the run. It stays down until the copy tries it again (a
    // connection refused), so no read of this run gets through.
    let indexed = || {
        rusqlite::Connection::open(copy.data().join("catalog.sqlite"))
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM chunks", [], |r| r.get::<_, i64>(0)))
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while indexed() < 1024 {
        assert!(Instant::now() < deadline, "no batch was staged");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tried = link.connections();
    link.set(LinkMode::Down);
    let held = indexed();
    assert!(
        held < BLOCKS as i64,
        "the point was copied before the link went down"
    );
    while link.connections() == tried {
        assert!(
            Instant::now() < deadline,
            "the copy never tried the link again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    link.set(LinkMode::Pass);
    // The next run resumes the point: only the chunks the copy lacked travel again (fewer
    // than all: so a run did fail and another resumed), the point is made once, and it
    // restores bit-exact.
    let got = wait_points(&copy, "vm1", 1);
    drop(crx);
    assert_eq!(got.len(), 1);
    let ev = copy_events(&copy);
    assert_eq!(ev.len(), 1, "{ev:?}");
    let resent = ev[0].1["chunks"].as_i64().unwrap();
    assert!(
        resent <= BLOCKS as i64 - held,
        "{resent} chunks read again, {held} were durable"
    );
    assert_eq!(indexed(), BLOCKS as i64);
    assert_eq!(
        copy.restored_digest("vm1", "vda", got[0]["id"].as_u64().unwrap()),
        want
    );
}

/// The TLS of a Copy service of a test's own, behind `pki`'s receiver certificate: what a
/// copy with the replica identity takes for its primary.
fn source_tls(pki: &std::path::Path) -> tonic::transport::ServerTlsConfig {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |name: &str| std::fs::read(pki.join(name)).unwrap();
    ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("receiver.pem"),
            read("receiver.key"),
        ))
        .client_ca_root(Certificate::from_pem(read("ca.pem")))
}

/// A copy's settings with `pki`'s replica identity `copy1`, pulling from `source`.
fn copy_config(
    pki: &std::path::Path,
    source: String,
    parallel: usize,
) -> rewind_receiver::copy::CopyConfig {
    rewind_receiver::copy::CopyConfig {
        source,
        ca: pki.join("ca.pem"),
        cert: pki.join("copy1.pem"),
        key: pki.join("copy1.key"),
        every: Duration::from_secs(1),
        bwlimit: None,
        parallel,
    }
}

/// A source that answers `CopyVms` with one VM and history id `history`, and refuses every
/// other call, counting them: what a compromised or impostor primary could send.
struct HistorySource {
    history: String,
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HistorySource {
    fn refuse<T>(&self) -> Result<tonic::Response<T>, tonic::Status> {
        self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(tonic::Status::unavailable("this source serves no points"))
    }
}

#[tonic::async_trait]
impl rewind_proto::pb::copy_server::Copy for HistorySource {
    async fn copy_vms(
        &self,
        _: tonic::Request<rewind_proto::pb::CopyVmsRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::CopyVmsReply>, tonic::Status> {
        Ok(tonic::Response::new(rewind_proto::pb::CopyVmsReply {
            vms: vec![rewind_proto::pb::CopyVm {
                vm: "vm1".into(),
                owner: "host1".into(),
            }],
            history: self.history.clone(),
        }))
    }

    async fn copy_points(
        &self,
        _: tonic::Request<rewind_proto::pb::CopyPointsRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::CopyPointsReply>, tonic::Status> {
        self.refuse()
    }

    async fn copy_blocks(
        &self,
        _: tonic::Request<rewind_proto::pb::PointBlocksRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::PointBlocksReply>, tonic::Status> {
        self.refuse()
    }

    async fn copy_chunks(
        &self,
        _: tonic::Request<rewind_proto::pb::ReadChunksRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::ReadChunksReply>, tonic::Status> {
        self.refuse()
    }

    async fn copy_keys(
        &self,
        _: tonic::Request<rewind_proto::pb::DataKeysRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::DataKeysReply>, tonic::Status> {
        self.refuse()
    }
}

#[test]
fn a_source_sending_a_history_id_that_is_not_short_hex_is_refused_before_any_point_is_asked() {
    use rewind_receiver::copy::CopyError;
    use tonic::transport::Server;
    let primary = Deployment::new();
    let pki = primary.pki();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let copy = Deployment::new();
    let store = std::sync::Arc::new(rewind_receiver::store::Store::open(&copy.data()).unwrap());
    let mut replica_made = false;
    // Not hex, too long, a path, and then a good id (which gets past the check).
    for (history, refused) in [
        ("g".repeat(32), true),
        ("a".repeat(65), true),
        ("../../etc".to_owned(), true),
        ("0123456789abcdef0123456789ABCDEF".to_owned(), false),
    ] {
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let source = HistorySource {
            history: history.clone(),
            asked: asked.clone(),
        };
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        if !replica_made {
            // The replica identity and its settings, as a real copy has them.
            let _ = replica(&primary, addr);
            replica_made = true;
        }
        let server = Server::builder()
            .tls_config(source_tls(&pki))
            .unwrap()
            .add_service(rewind_proto::pb::copy_server::CopyServer::new(source))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let serving = rt.spawn(server);
        let cfg = copy_config(&pki, format!("https://{addr}"), 1);
        let run = rt.block_on(rewind_receiver::copy::run_once(&store, &cfg));
        serving.abort();
        let taken = asked.load(std::sync::atomic::Ordering::SeqCst);
        if refused {
            match run {
                Err(CopyError::Answer(what)) => assert_eq!(what, "a history id", "{history}"),
                other => panic!("history {history:?} was taken: {other:?}"),
            }
            assert_eq!(taken, 0, "{history}: the copy asked for points");
        } else {
            // Past the check: the copy asks for the VM's points, which this source refuses.
            let report = run.unwrap();
            assert_eq!((report.vms, report.failed_vms), (1, 1));
            assert!(taken >= 1, "a good history id stopped the copy");
        }
        // Nothing was made on the copy either way.
        assert!(copy.try_points("vm1").map_or(true, |p| p.is_empty()));
    }
}

/// What a [`Relay`] saw.
#[derive(Default)]
struct RelaySeen {
    /// Chunk reads being answered now, and the most at once.
    in_flight: usize,
    most: usize,
    /// The chunks each read asked for, in the order the reads came.
    reads: Vec<Vec<Vec<u8>>>,
    /// Block index of each leaf the source listed.
    leaves: std::collections::HashMap<Vec<u8>, u64>,
}

/// A Copy service that forwards every call to the real primary, holding each chunk read for
/// `delay` first (a long link's round trip), and records what it saw.
struct Relay {
    to: rewind_proto::pb::copy_client::CopyClient<tonic::transport::Channel>,
    delay: Duration,
    seen: std::sync::Arc<std::sync::Mutex<RelaySeen>>,
}

#[tonic::async_trait]
impl rewind_proto::pb::copy_server::Copy for Relay {
    async fn copy_vms(
        &self,
        req: tonic::Request<rewind_proto::pb::CopyVmsRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::CopyVmsReply>, tonic::Status> {
        self.to.clone().copy_vms(req.into_inner()).await
    }

    async fn copy_points(
        &self,
        req: tonic::Request<rewind_proto::pb::CopyPointsRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::CopyPointsReply>, tonic::Status> {
        self.to.clone().copy_points(req.into_inner()).await
    }

    async fn copy_blocks(
        &self,
        req: tonic::Request<rewind_proto::pb::PointBlocksRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::PointBlocksReply>, tonic::Status> {
        let reply = self.to.clone().copy_blocks(req.into_inner()).await?;
        let mut seen = self.seen.lock().unwrap();
        for e in &reply.get_ref().entries {
            seen.leaves.insert(e.hash.clone(), e.index);
        }
        Ok(reply)
    }

    async fn copy_chunks(
        &self,
        req: tonic::Request<rewind_proto::pb::ReadChunksRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::ReadChunksReply>, tonic::Status> {
        let req = req.into_inner();
        {
            let mut seen = self.seen.lock().unwrap();
            seen.in_flight += 1;
            seen.most = seen.most.max(seen.in_flight);
            seen.reads.push(req.hashes.clone());
        }
        tokio::time::sleep(self.delay).await;
        let reply = self.to.clone().copy_chunks(req).await;
        self.seen.lock().unwrap().in_flight -= 1;
        reply
    }

    async fn copy_keys(
        &self,
        req: tonic::Request<rewind_proto::pb::DataKeysRequest>,
    ) -> Result<tonic::Response<rewind_proto::pb::DataKeysReply>, tonic::Status> {
        self.to.clone().copy_keys(req.into_inner()).await
    }
}

#[test]
fn a_copy_keeps_parallel_reads_in_flight_across_batches_and_reads_the_batches_in_order() {
    use tonic::transport::Server;
    // Three batches of entries (a batch references 64 MiB of blocks: 1024 of 64 KiB), each
    // block different and compressible.
    const BLOCKS: u64 = 2600;
    const PER_BATCH: u64 = 1024;
    const PARALLEL: usize = 3;
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 192 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&vda).unwrap();
        for i in 0..BLOCKS {
            let line = format!("block {i:08}\n");
            let block: Vec<u8> = line.bytes().cycle().take(BLOCK as usize).collect();
            f.write_all_at(&block, i * BLOCK).unwrap();
        }
    }
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &vda)]);
    let want = disk::digest(&vda);

    let pki = d.pki();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (copy, _) = replica(&d, addr);
    // The relay on a runtime of one thread: calls are seen in the order they arrive.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(RelaySeen::default()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = {
        let seen = seen.clone();
        let to_primary = copy_config(&pki, format!("https://{}", rx.addr()), 1);
        let tls = source_tls(&pki);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let to = rewind_receiver::copy::connect(&to_primary).await.unwrap();
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let relay = Relay {
                    to,
                    delay: Duration::from_millis(30),
                    seen,
                };
                Server::builder()
                    .tls_config(tls)
                    .unwrap()
                    .add_service(rewind_proto::pb::copy_server::CopyServer::new(relay))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        })
    };

    let store = std::sync::Arc::new(rewind_receiver::store::Store::open(&copy.data()).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt
        .block_on(rewind_receiver::copy::run_once(
            &store,
            &copy_config(&pki, format!("https://{addr}"), PARALLEL),
        ))
        .unwrap();
    drop(store);
    let _ = stop.send(());
    relay.join().unwrap();
    assert_eq!((report.points, report.failed_vms), (1, 0));

    let seen = seen.lock().unwrap();
    // `parallel` is what the whole copy has in flight, not each batch: with three batches
    // fetched at once, reads per batch would put up to nine in flight.
    assert_eq!(seen.most, PARALLEL, "reads in flight at most");
    // Every block's chunk read once, and the reads in batch order: a younger batch's reads
    // never go out before an older batch's.
    let batches: Vec<u64> = seen
        .reads
        .iter()
        .map(|hashes| {
            let of: std::collections::BTreeSet<u64> =
                hashes.iter().map(|h| seen.leaves[h] / PER_BATCH).collect();
            assert_eq!(of.len(), 1, "a read spans batches {of:?}");
            *of.first().unwrap()
        })
        .collect();
    // A younger batch's read can overtake only reads of the older batch that already hold a
    // slot (the slots go first come first served, but a read goes out when its batch's task
    // next runs): fewer than `parallel`. Reads per batch would let a younger batch's reads
    // through from the start.
    let overtaken = (0..batches.len())
        .map(|i| batches[..i].iter().filter(|&&b| b > batches[i]).count())
        .max()
        .unwrap_or(0);
    assert!(
        overtaken < PARALLEL,
        "reads out of batch order: {batches:?}"
    );
    assert_eq!(batches.last(), Some(&((BLOCKS - 1) / PER_BATCH)));
    let asked: std::collections::HashSet<&Vec<u8>> = seen.reads.iter().flatten().collect();
    assert_eq!(asked.len() as u64, BLOCKS);
    assert_eq!(
        seen.reads.iter().map(Vec::len).sum::<usize>() as u64,
        BLOCKS
    );
    drop(seen);
    let got = copy.points("vm1");
    assert_eq!(got.len(), 1);
    assert_eq!(
        copy.restored_digest("vm1", "vda", got[0]["id"].as_u64().unwrap()),
        want
    );
}
