//! Many VMs on one agent: cycles of several VMs that share one state folder (threads of one
//! `run`, or separate `sync --once` processes) never fail on each other's locks.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, Deployment};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;

#[test]
fn four_concurrent_syncs_share_one_state_folder() {
    let d = Deployment::new();
    let rx = d.serve();
    let disks: Vec<_> = (0..4)
        .map(|n| {
            let p = d.path(&format!("vm{n}.raw"));
            disk::create(&p, 8 << 20);
            p
        })
        .collect();
    let mut rng = rand::rng();
    for round in 0..20 {
        for p in &disks {
            disk::random_blocks(p, BLOCK, (round * 3) % 120, 6, &mut rng);
        }
        let children: Vec<_> = disks
            .iter()
            .enumerate()
            .map(|(n, p)| {
                d.sync_cmd(&rx, "host1", &format!("vm{n}"), &[("vda", p)], &[])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (n, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}, vm{n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for (n, p) in disks.iter().enumerate() {
        let vm = format!("vm{n}");
        let points = d.points(&vm);
        assert_eq!(points.len(), 20, "{vm}");
        let last = points[19]["id"].as_u64().unwrap();
        assert_eq!(d.restored_digest(&vm, "vda", last), disk::digest(p), "{vm}");
    }
}

#[test]
fn one_run_protects_eight_vms_without_failed_cycles() {
    const VMS: usize = 8;
    const RUN: Duration = Duration::from_secs(60);
    let d = Deployment::new();
    let rx = d.serve();
    let pki = d.pki();
    let disks: Vec<_> = (0..VMS)
        .map(|n| {
            let p = d.path(&format!("vm{n}.raw"));
            disk::create(&p, 8 << 20);
            disk::random_blocks(&p, BLOCK, 0, 16, &mut rand::rng());
            p
        })
        .collect();
    let mut config = format!(
        "state = \"{}\"\ninterval = 1\n[receiver]\nurl = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n",
        d.path("state-host1").display(),
        rx.url(),
        pki.join("ca.pem").display(),
        pki.join("host1.pem").display(),
        pki.join("host1.key").display(),
    );
    for (n, p) in disks.iter().enumerate() {
        config.push_str(&format!(
            "[[vm]]\nname = \"vm{n}\"\ndisks = [\"vda={}\"]\n\n",
            p.display()
        ));
    }
    let conf = d.path("agent.toml");
    std::fs::write(&conf, config).unwrap();
    let mut child = Command::new(bin("rewind-agent"))
        .args(["run", "--json", "--config"])
        .arg(&conf)
        .env("REWIND_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let collect = |r: Box<dyn std::io::Read + Send>| {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        lines
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    // Every disk changes every second while the agent runs.
    let started = Instant::now();
    let mut rng = rand::rng();
    let mut round = 0;
    while started.elapsed() < RUN {
        for p in &disks {
            disk::random_blocks(p, BLOCK, (round * 5) % 100, 4, &mut rng);
        }
        round += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "run exited with {status}");
    let failed: Vec<String> = err
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("cycle failed"))
        .cloned()
        .collect();
    let points = out.lock().unwrap().len();
    eprintln!(
        "8 VMs for {RUN:?}: {points} points committed, {} cycles failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed cycles: {failed:#?}");
    for n in 0..VMS {
        let listed = d.points(&format!("vm{n}"));
        assert!(listed.len() >= 10, "vm{n} has only {} points", listed.len());
    }
    // With the writes stopped, one more cycle of a VM restores bit-exact.
    let out = d.sync(&rx, "host1", "vm0", &[("vda", &disks[0])], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = d.points("vm0");
    let newest = after.last().unwrap()["id"].as_u64().unwrap();
    assert_eq!(
        d.restored_digest("vm0", "vda", newest),
        disk::digest(&disks[0])
    );
}
