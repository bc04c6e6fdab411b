//! Refusals: every one is a clear error with the right gRPC code, and leaves the store
//! unchanged.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_proto::pb::{self, replication_client::ReplicationClient};
use rewind_proto::{chunk, BlockHash};
use rewind_tests::{disk, grpc, Deployment, Receiver};
use tonic::transport::Channel;
use tonic::Code;

const BLOCK: usize = 64 * 1024;

async fn client(d: &Deployment, rx: &Receiver, agent: &str) -> ReplicationClient<Channel> {
    grpc::as_agent(&rx.url(), &d.pki(), agent)
        .await
        .expect("connect")
}

fn all_points(d: &Deployment) -> Vec<serde_json::Value> {
    let out = rewind_tests::run(
        std::process::Command::new(rewind_tests::bin("rewind-receiver"))
            .args(["points", "--json", "--data"])
            .arg(d.data()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

async fn begin(
    c: &mut ReplicationClient<Channel>,
    vm: &str,
    size: u64,
) -> Result<String, tonic::Status> {
    grpc::begin(c, vm, size, BLOCK as u32).await
}

fn block(seed: u8) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn batch(
    session: &str,
    entries: &[(u64, BlockHash)],
    chunks: Vec<(BlockHash, Vec<u8>)>,
) -> pb::Batch {
    grpc::batch(session, entries, chunks)
}

async fn upload(
    c: &mut ReplicationClient<Channel>,
    b: pb::Batch,
) -> Result<pb::UploadReply, tonic::Status> {
    grpc::upload(c, b).await
}

async fn missing(c: &mut ReplicationClient<Channel>, session: &str, h: BlockHash) -> bool {
    let r = c
        .missing_chunks(pb::MissingChunksRequest {
            session: session.into(),
            hashes: vec![h.0.to_vec()],
        })
        .await
        .expect("missing_chunks")
        .into_inner();
    r.missing.len() == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_are_refused() {
    let d = Deployment::new();
    let rx = d.serve();
    let pki = d.pki();
    // No client certificate: the TLS handshake or the first call fails.
    let refused = match grpc::connect(&rx.url(), &pki.join("ca.pem"), None).await {
        Err(_) => true,
        Ok(mut c) => begin(&mut c, "web1", 1 << 20).await.is_err(),
    };
    assert!(refused, "a client without a certificate got in");

    // A certificate from another CA.
    let other = Deployment::new();
    let op = other.pki();
    let refused = match grpc::connect(
        &rx.url(),
        &pki.join("ca.pem"),
        Some((&op.join("host1.pem"), &op.join("host1.key"))),
    )
    .await
    {
        Err(_) => true,
        Ok(mut c) => begin(&mut c, "web1", 1 << 20).await.is_err(),
    };
    assert!(refused, "a certificate from a foreign CA got in");

    // The real agent binary with a foreign certificate fails with a clear error.
    let vda = d.path("vda.raw");
    disk::create(&vda, 1 << 20);
    let out = rewind_tests::run(
        std::process::Command::new(rewind_tests::bin("rewind-agent"))
            .args([
                "sync",
                "--once",
                "--vm",
                "web1",
                "--receiver",
                &rx.url(),
                "--ca",
            ])
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(op.join("host1.pem"))
            .arg("--key")
            .arg(op.join("host1.key"))
            .arg("--state")
            .arg(d.path("st"))
            .arg("--disk")
            .arg(format!("vda={}", vda.display())),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
    assert!(all_points(&d).is_empty(), "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_touch_another_agents_vm() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 4 << 20);
    disk::random_blocks(&vda, BLOCK as u64, 0, 4, &mut rand::rng());
    d.sync_ok(&rx, "host1", "web1", &[("vda", &vda)]);

    let out = d.sync(&rx, "host2", "web1", &[("vda", &vda)], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to another agent"), "{err}");

    let mut c2 = client(&d, &rx, "host2").await;
    let st = begin(&mut c2, "web1", 4 << 20)
        .await
        .expect_err("begin refused");
    assert_eq!(st.code(), Code::PermissionDenied);
    // Reading is refused too, exactly as for a VM that does not exist: reads tell an agent
    // nothing about other agents' VMs.
    let st = c2
        .list_points(pb::ListPointsRequest { vm: "web1".into() })
        .await
        .expect_err("reading is refused too");
    assert_eq!(st.code(), Code::NotFound);
    let none = c2
        .list_points(pb::ListPointsRequest {
            vm: "nosuch".into(),
        })
        .await
        .expect_err("no such VM");
    assert_eq!(none.code(), Code::NotFound);
    assert_eq!(
        st.message().replace("web1", "X"),
        none.message().replace("nosuch", "X")
    );

    // A session id of host1's is invisible to host2.
    let mut c1 = client(&d, &rx, "host1").await;
    let s1 = begin(&mut c1, "web1", 4 << 20).await.expect("host1 begins");
    let data = block(1);
    let h = BlockHash::of(&data);
    let st = upload(
        &mut c2,
        batch(&s1, &[(0, h)], vec![(h, chunk::compress(&data).unwrap())]),
    )
    .await
    .expect_err("foreign session");
    assert_eq!(st.code(), Code::NotFound);
    let list = c1
        .list_points(pb::ListPointsRequest { vm: "web1".into() })
        .await
        .expect("owner reads its points")
        .into_inner();
    assert_eq!(list.points.len(), 1);
    assert_eq!(all_points(&d).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batches_are_refused_and_store_nothing() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut c = client(&d, &rx, "host1").await;
    let s = begin(&mut c, "web1", 1 << 20).await.expect("begin");
    let good = block(7);
    let h = BlockHash::of(&good);
    let frame = chunk::compress(&good).unwrap();

    // Data that does not hash to its name.
    let other = chunk::compress(&block(8)).unwrap();
    let st = upload(&mut c, batch(&s, &[(0, h)], vec![(h, other)]))
        .await
        .expect_err("wrong hash");
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("hashes to"), "{}", st.message());
    assert!(missing(&mut c, &s, h).await, "the bad chunk was not stored");

    // A block index past the end of the 1 MiB (16-block) disk.
    let st = upload(&mut c, batch(&s, &[(16, h)], vec![(h, frame.clone())]))
        .await
        .expect_err("past end");
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("past the end"), "{}", st.message());
    assert!(missing(&mut c, &s, h).await);

    // A disk the session does not have.
    let mut b = batch(&s, &[(0, h)], vec![(h, frame.clone())]);
    b.entries[0].disk = 3;
    let st = upload(&mut c, b).await.expect_err("no such disk");
    assert_eq!(st.code(), Code::InvalidArgument);

    // A reference to a chunk the agent never sent.
    let st = upload(&mut c, batch(&s, &[(0, h)], vec![]))
        .await
        .expect_err("not held");
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert!(st.message().contains("does not hold"), "{}", st.message());

    // A decompression bomb: 8 MiB of 'a' claimed for a 64 KiB block.
    let bomb_data = vec![b'a'; 8 << 20];
    let bomb = chunk::compress(&bomb_data).unwrap();
    let hb = BlockHash::of(&bomb_data);
    let st = upload(&mut c, batch(&s, &[(1, hb)], vec![(hb, bomb)]))
        .await
        .expect_err("bomb");
    assert_eq!(st.code(), Code::InvalidArgument);

    // A hash of the wrong length.
    let mut b = batch(&s, &[(0, h)], vec![]);
    b.entries[0].hash = vec![1, 2, 3];
    let st = upload(&mut c, b).await.expect_err("short hash");
    assert_eq!(st.code(), Code::InvalidArgument);

    // A message over the 16 MiB limit.
    let big = pb::Batch {
        session: s.clone(),
        entries: vec![],
        chunks: vec![pb::Chunk {
            hash: h.0.to_vec(),
            data: vec![0x5a; 17 << 20].into(),
        }],
    };
    let st = upload(&mut c, big).await.expect_err("oversize");
    assert_ne!(st.code(), Code::Ok);

    // A correct batch still works after all that, and a wrong root commits nothing.
    upload(&mut c, batch(&s, &[(0, h)], vec![(h, frame)]))
        .await
        .expect("good batch");
    assert!(!missing(&mut c, &s, h).await);
    let st = c
        .commit(pb::CommitRequest {
            session: s.clone(),
            roots: vec![pb::DiskRoot {
                name: "vda".into(),
                root: vec![9; 32],
                changed_blocks: 1,
            }],
            config: String::new(),
            consistency: String::new(),
            manifest_mac: Vec::new(),
            taken_us: 0,
        })
        .await
        .expect_err("wrong root");
    assert_eq!(st.code(), Code::DataLoss);
    for (config, consistency) in [("not json", ""), ("[1]", ""), ("{}", "bogus")] {
        let st = c
            .commit(pb::CommitRequest {
                session: s.clone(),
                roots: vec![],
                config: config.into(),
                consistency: consistency.into(),
                manifest_mac: Vec::new(),
                taken_us: 0,
            })
            .await
            .expect_err("bad point metadata");
        assert_eq!(st.code(), Code::InvalidArgument, "{config} {consistency}");
    }
    assert!(all_points(&d).is_empty(), "no point from a mismatched root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_geometry_are_validated() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut c = client(&d, &rx, "host1").await;
    for vm in ["../etc", "a/b", "", ".hidden", "x y"] {
        let st = begin(&mut c, vm, 1 << 20).await.expect_err("bad VM name");
        assert_eq!(st.code(), Code::InvalidArgument, "{vm:?}");
    }
    let bad_disk = c
        .begin(pb::BeginRequest {
            vm: "web1".into(),
            disks: vec![pb::DiskSpec {
                name: "../../vda".into(),
                size: 1 << 20,
                block_size: BLOCK as u32,
            }],
            base_point: 0,
            resume_session: String::new(),
            keyring: Vec::new(),
            wrapped_keys: Vec::new(),
        })
        .await
        .expect_err("bad disk name");
    assert_eq!(bad_disk.code(), Code::InvalidArgument);
    let bad_block = c
        .begin(pb::BeginRequest {
            vm: "web1".into(),
            disks: vec![pb::DiskSpec {
                name: "vda".into(),
                size: 1 << 20,
                block_size: 1000,
            }],
            base_point: 0,
            resume_session: String::new(),
            keyring: Vec::new(),
            wrapped_keys: Vec::new(),
        })
        .await
        .expect_err("bad block size");
    assert_eq!(bad_block.code(), Code::InvalidArgument);
    let huge = begin(&mut c, "web1", 1 << 50).await.expect_err("too large");
    assert_eq!(huge.code(), Code::InvalidArgument);
    assert!(all_points(&d).is_empty());

    // The agent binary validates too, before contacting anyone.
    let vda = d.path("vda.raw");
    disk::create(&vda, 1 << 20);
    let out = d.sync(&rx, "host1", "../x", &[("vda", &vda)], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid VM name"));
}
