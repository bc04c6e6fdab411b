//! Replication across a rate-capped, delayed link: a network namespace behind a veth pair with
//! `tbf` on both ends, and our delaying TCP proxy adding the round-trip time.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, disk_of, wan, Deployment, Receiver};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;

#[test]
fn delay_proxy_holds_each_direction() {
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = echo.accept().unwrap();
        let mut b = [0u8; 1024];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => s.write_all(&b[..n]).unwrap(),
            }
        }
    });
    let proxy = wan::DelayProxy::start(upstream, Duration::from_millis(30)).unwrap();
    let mut c = TcpStream::connect(proxy.addr).unwrap();
    c.set_nodelay(true).unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let started = Instant::now();
    let reader = {
        let mut c = c.try_clone().unwrap();
        let want = payload.len();
        std::thread::spawn(move || {
            let mut got = vec![0u8; want];
            c.read_exact(&mut got).unwrap();
            got
        })
    };
    c.write_all(&payload).unwrap();
    let got = reader.join().unwrap();
    let took = started.elapsed();
    assert_eq!(got, payload, "bytes pass through unchanged and in order");
    assert!(took >= Duration::from_millis(60), "round trip {took:?}");
}

#[test]
fn replicates_through_a_long_slow_link() {
    if !wan::available() {
        eprintln!("skipped: needs root, ip and tc");
        return;
    }
    let d = Deployment::new();
    let ns = wan::Netns::create(&format!("rwt{}", std::process::id() % 100_000), 78, 200).unwrap();
    let rx = Receiver::start_via(
        ns.command(&bin("rewind-receiver")),
        &d.data(),
        &d.pki(),
        &format!("{}:0", ns.ns_addr),
        &[],
    );
    let proxy = wan::DelayProxy::start(rx.addr(), Duration::from_millis(20)).unwrap();
    let via = Receiver::dead(proxy.addr);

    let vda = d.path("vda.raw");
    disk::create(&vda, 48 << 20);
    let mut rng = rand::rng();
    disk::random_blocks(&vda, BLOCK, 0, 200, &mut rng);
    disk::random_blocks(&vda, BLOCK, 500, 100, &mut rng);
    let r1 = d.sync_ok(&via, "host1", "far", &[("vda", &vda)]);
    assert_eq!(disk_of(&r1, "vda")["changed_blocks"], 300);
    let changed = disk::scatter_writes(&vda, BLOCK, 768, 17, 3);
    let r2 = d.sync_ok(&via, "host1", "far", &[("vda", &vda)]);
    assert_eq!(disk_of(&r2, "vda")["changed_blocks"], changed.len() as u64);

    // The receiver really was only reachable inside the namespace.
    let direct = Command::new("ip")
        .args(["route", "get", &ns.ns_addr])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&direct.stdout).contains(&ns.host_addr));

    let out = d.path("restored.raw");
    let o = d.restore("far", "vda", &["--point", &r2["point"].to_string()], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(disk::digest(&out), disk::digest(&vda));
    drop(rx);
}
