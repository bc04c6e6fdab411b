//! Certificate lifetimes and revocation: a revoked agent is refused at the handshake and its
//! open connections end once serve reloads the list (SIGHUP); other agents are unaffected.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_proto::pb;
use rewind_tests::{disk, grpc, Deployment, Receiver};
use std::process::Command;
use std::time::Duration;

fn pki(d: &Deployment, args: &[&str]) -> std::process::Output {
    rewind_tests::run(
        Command::new(rewind_tests::bin("rewind-receiver"))
            .arg("pki")
            .args(args)
            .arg("--dir")
            .arg(d.pki()),
    )
}

fn metrics(addr: &str) -> String {
    rewind_tests::scrape_metrics(addr)
}

fn days_left(metrics: &str, subject: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with("rewind_certificate_days_left{") && l.contains(subject))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn list(d: &Deployment, rx: &Receiver, agent: &str, vm: &str) -> Result<usize, String> {
    let mut c = grpc::as_agent(&rx.url(), &d.pki(), agent)
        .await
        .map_err(|e| e.to_string())?;
    c.list_points(pb::ListPointsRequest { vm: vm.into() })
        .await
        .map(|r| r.into_inner().points.len())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_refused_and_sighup_applies_the_new_list() {
    let d = Deployment::new();
    let port = rewind_tests::free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let rx = Receiver::start_with(&d.data(), &d.pki(), &["--metrics", &metrics_addr]);
    let (a, b) = (d.path("a.raw"), d.path("b.raw"));
    for p in [&a, &b] {
        disk::create(p, 2 << 20);
        disk::random_blocks(p, 65536, 0, 8, &mut rand::rng());
    }
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &a)]);
    d.sync_ok(&rx, "host2", "vm2", &[("vda", &b)]);

    // host2 holds a connection open across the revocation.
    let mut held = grpc::as_agent(&rx.url(), &d.pki(), "host2").await.unwrap();
    let ask = pb::ListPointsRequest { vm: "vm2".into() };
    assert_eq!(
        held.list_points(ask.clone())
            .await
            .unwrap()
            .into_inner()
            .points
            .len(),
        1
    );

    let out = pki(&d, &["revoke", "--agent", "host2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.pki().join("crl.pem").is_file());
    // Not in force before serve reloads.
    assert_eq!(list(&d, &rx, "host2", "vm2").await, Ok(1));

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(rx.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    // The held connection ends, and new ones fail at the handshake.
    let mut ended = false;
    for _ in 0..250 {
        if held.list_points(ask.clone()).await.is_err() {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ended, "host2's open connection outlived its revocation");
    assert!(list(&d, &rx, "host2", "vm2").await.is_err());
    let out = d.sync(&rx, "host2", "vm2", &[("vda", &b)], &[]);
    assert!(!out.status.success(), "a revoked agent synced");

    // host1 is unaffected, and its points are intact.
    assert_eq!(list(&d, &rx, "host1", "vm1").await, Ok(1));
    d.sync_ok(&rx, "host1", "vm1", &[("vda", &a)]);
    let points = d.points("vm1");
    assert_eq!(points.len(), 2);
    let id = points[1]["id"].as_u64().unwrap();
    assert_eq!(d.restored_digest("vm1", "vda", id), disk::digest(&a));

    // The metric shows the receiver's certificate (one year) and host1's.
    let m = metrics(&metrics_addr);
    let receiver = days_left(&m, "subject=\"receiver\"").expect("receiver metric");
    assert!((360.0..=366.0).contains(&receiver), "{receiver}");
    assert!(days_left(&m, "agent=\"host1\"").is_some(), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_have_bounded_lives_and_renewal_keeps_revocation_whole() {
    let d = Deployment::new();
    for days in ["0", "5000"] {
        let out = pki(&d, &["issue", "--agent", "host3", "--days", days]);
        assert!(!out.status.success(), "--days {days} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("days"));
    }
    let out = pki(&d, &["issue", "--agent", "host3", "--days", "10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = rewind_tests::free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let rx = Receiver::start_with(&d.data(), &d.pki(), &["--metrics", &metrics_addr]);
    let a = d.path("a.raw");
    disk::create(&a, 1 << 20);
    disk::random_blocks(&a, 65536, 0, 4, &mut rand::rng());
    d.sync_ok(&rx, "host3", "vm3", &[("vda", &a)]);
    let left = days_left(&metrics(&metrics_addr), "agent=\"host3\"").expect("host3 metric");
    assert!((9.0..=10.1).contains(&left), "{left}");
    // The agent warns of the close expiry in its log and in `status`.
    let out = d.sync(&rx, "host3", "vm3", &[("vda", &a)], &[]);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("certificate expires soon"), "{log}");
    let conf = d.path("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "state = {:?}\n[receiver]\ncert = {:?}\n",
            d.path("state-host3"),
            d.pki().join("host3.pem")
        ),
    )
    .unwrap();
    let out = rewind_tests::run(
        Command::new(rewind_tests::bin("rewind-agent"))
            .args(["status", "--config"])
            .arg(&conf),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("expires in 9 days") || err.contains("expires in 10 days"),
        "{err}"
    );
    // A certificate of the default year draws no warning.
    let out = d.sync(&rx, "host1", "vm1", &[("vda", &a)], &[]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("expires soon"));

    // Renewal: the old pair is kept aside; both old and new work until revoked.
    let old_cert = std::fs::read(d.pki().join("host3.pem")).unwrap();
    let old_key = std::fs::read(d.pki().join("host3.key")).unwrap();
    let out = pki(&d, &["renew", "--agent", "host3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(std::fs::read(d.pki().join("host3.pem")).unwrap(), old_cert);
    std::fs::write(d.path("old.pem"), &old_cert).unwrap();
    std::fs::write(d.path("old.key"), &old_key).unwrap();
    d.sync_ok(&rx, "host3", "vm3", &[("vda", &a)]);
    let url = rx.url();
    let old = || {
        let (p, url) = (d.pki(), url.clone());
        let (c, k) = (d.path("old.pem"), d.path("old.key"));
        async move {
            let mut c = grpc::connect(&url, &p.join("ca.pem"), Some((&c, &k)))
                .await
                .map_err(|e| e.to_string())?;
            c.list_points(pb::ListPointsRequest { vm: "vm3".into() })
                .await
                .map(|r| r.into_inner().points.len())
                .map_err(|e| e.to_string())
        }
    };
    assert_eq!(old().await, Ok(3));

    // Revoking the agent revokes both certificates, after a restart as after SIGHUP.
    assert!(pki(&d, &["revoke", "--agent", "host3"]).status.success());
    drop(rx);
    let rx = Receiver::start(&d.data(), &d.pki());
    assert!(list(&d, &rx, "host3", "vm3").await.is_err());
    let url = rx.url();
    let old_refused = {
        let (p, url) = (d.pki(), url.clone());
        let (c, k) = (d.path("old.pem"), d.path("old.key"));
        match grpc::connect(&url, &p.join("ca.pem"), Some((&c, &k))).await {
            Err(_) => true,
            Ok(mut c) => c
                .list_points(pb::ListPointsRequest { vm: "vm3".into() })
                .await
                .is_err(),
        }
    };
    let refused = old_refused;
    assert!(refused, "the renewed-away certificate survived revocation");
    // Revoking again keeps the list whole; an unknown agent is an error.
    assert!(pki(&d, &["revoke", "--agent", "host3"]).status.success());
    let out = pki(&d, &["revoke", "--agent", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no certificate of agent nobody"));
}
