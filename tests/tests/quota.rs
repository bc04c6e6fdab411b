//! Per-agent quotas and VM name claims: one agent can neither fill the store for everyone nor
//! hold a VM name it never committed a point of.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_proto::pb::{self, replication_client::ReplicationClient};
use rewind_tests::{disk, grpc, Deployment, Receiver};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

async fn client(d: &Deployment, rx: &Receiver, agent: &str) -> ReplicationClient<Channel> {
    grpc::as_agent(&rx.url(), &d.pki(), agent).await.unwrap()
}

async fn begin(c: &mut ReplicationClient<Channel>, vm: &str) -> Result<String, tonic::Status> {
    c.begin(pb::BeginRequest {
        vm: vm.into(),
        disks: vec![pb::DiskSpec {
            name: "vda".into(),
            size: 1 << 20,
            block_size: 65536,
        }],
        base_point: 0,
        resume_session: String::new(),
        keyring: Vec::new(),
        wrapped_keys: Vec::new(),
    })
    .await
    .map(|r| r.into_inner().session)
}

fn serve_with(d: &Deployment, config: &str) -> Receiver {
    let path = d.path("receiver.toml");
    std::fs::write(&path, config).unwrap();
    Receiver::start_with(&d.data(), &d.pki(), &["--config", path.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_with_resource_exhausted_naming_the_limit() {
    let d = Deployment::new();
    let rx = serve_with(
        &d,
        "[agent.host2]\nvms = 1\nstored_mib = 1\n[agent.host1]\nsessions = 2\n",
    );
    // host2: one VM, 256 KiB of incompressible blocks, fits.
    let a = d.path("a.raw");
    disk::create(&a, 4 << 20);
    disk::random_blocks(&a, 65536, 0, 4, &mut rand::rng());
    let first = d.sync_ok(&rx, "host2", "small", &[("vda", &a)]);
    let point = first["point"].as_u64().unwrap();

    let mut c2 = client(&d, &rx, "host2").await;
    let st = begin(&mut c2, "second").await.expect_err("a second VM");
    assert_eq!(st.code(), Code::ResourceExhausted);
    assert!(st.message().contains("quota vms = 1"), "{}", st.message());

    let before = disk::digest(&a);
    // 1 MiB more does not fit in 1 MiB: the upload is refused and nothing is committed.
    disk::random_blocks(&a, 65536, 8, 16, &mut rand::rng());
    let out = d.sync(&rx, "host2", "small", &[("vda", &a)], &[]);
    assert!(!out.status.success(), "over its storage quota");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stored_mib = 1"), "{err}");
    let points = d.points("small");
    assert_eq!(points.len(), 1);
    assert_eq!(points[0]["id"].as_u64().unwrap(), point);

    // host1 is not limited by host2's quotas, but by its own session quota: repeated begins of
    // one VM replace each other; a third VM's open session is one too many.
    let b = d.path("b.raw");
    disk::create(&b, 8 << 20);
    disk::random_blocks(&b, 65536, 0, 64, &mut rand::rng());
    d.sync_ok(&rx, "host1", "big", &[("vda", &b)]);
    let mut c1 = client(&d, &rx, "host1").await;
    for _ in 0..5 {
        begin(&mut c1, "v1").await.expect("begin v1 again");
    }
    begin(&mut c1, "v2").await.expect("second open session");
    let st = begin(&mut c1, "v3")
        .await
        .expect_err("a third open session");
    assert_eq!(st.code(), Code::ResourceExhausted);
    assert!(
        st.message().contains("quota sessions = 2"),
        "{}",
        st.message()
    );
    // A finished session frees its slot.
    d.sync_ok(&rx, "host1", "v1", &[("vda", &b)]);
    begin(&mut c1, "v3").await.expect("a slot was freed");

    // host2's committed point is intact: it restores to the disk as it was.
    assert_eq!(d.restored_digest("small", "vda", point), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncommitted_claim_on_a_vm_name_expires() {
    let d = Deployment::new();
    let rx = serve_with(&d, "[limits]\nvm_claim_timeout = 1\n");
    let mut c1 = client(&d, &rx, "host1").await;
    let mut c2 = client(&d, &rx, "host2").await;
    begin(&mut c2, "web1").await.expect("host2 claims the name");
    let st = begin(&mut c1, "web1").await.expect_err("claimed");
    assert_eq!(st.code(), Code::PermissionDenied);
    // Without progress, the claim lapses and host1 gets the name.
    let mut got = false;
    for _ in 0..100 {
        if begin(&mut c1, "web1").await.is_ok() {
            got = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(got, "the claim never expired");
    let a = d.path("a.raw");
    disk::create(&a, 1 << 20);
    disk::random_blocks(&a, 65536, 0, 4, &mut rand::rng());
    let p = d.sync_ok(&rx, "host1", "web1", &[("vda", &a)]);
    // Once a point is committed the name is owned for good.
    let since = std::time::Instant::now();
    while since.elapsed() < Duration::from_millis(1500) {
        let st = begin(&mut c2, "web1").await.expect_err("owned");
        assert_eq!(st.code(), Code::PermissionDenied);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        d.restored_digest("web1", "vda", p["point"].as_u64().unwrap()),
        disk::digest(&a)
    );
}
