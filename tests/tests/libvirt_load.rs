//! A libvirt point is one instant across all of a domain's disks, while a writer keeps writing
//! to both (through the monitor, as a guest would): every point restores to a prefix of the
//! writer's sequence, and the last one holds all of it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::libvirt::{self, Libvirtd};
use rewind_tests::{sync_report, Deployment};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;
const DOMAIN: &str = "load1";
/// Writes in the sequence: 2 disks x 64 blocks.
const WRITES: u64 = 128;

#[test]
fn points_are_one_instant_across_disks_under_a_concurrent_writer() {
    if !libvirt::available() {
        eprintln!("libvirt is not installed: skipped (the test command installs it)");
        return;
    }
    let d = Deployment::new();
    let rx = d.serve();
    let lv = Libvirtd::start(&d.path("libvirt"));
    let a = libvirt::qcow2(d.dir.path(), "a.qcow2", 8 * MIB);
    let b = libvirt::qcow2(d.dir.path(), "b.qcow2", 8 * MIB);
    lv.start_domain(DOMAIN, &[&a, &b], true);
    let sync = || {
        let mut cmd = d.sync_cmd(&rx, "host1", DOMAIN, &[], &[]);
        cmd.args(["--libvirt", &lv.uri(), "--domain", DOMAIN]);
        sync_report(&rewind_tests::run(&mut cmd))["point"]
            .as_u64()
            .unwrap()
    };
    // Sequence number k goes to disk k % 2, block k / 2, with pattern (k % 251) + 1.
    let stop = AtomicBool::new(false);
    let (total, mut points) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) && k < WRITES {
                lv.write(
                    DOMAIN,
                    (k % 2) as usize,
                    (k % 251) as u8 + 1,
                    (k / 2) * BLOCK,
                    BLOCK,
                );
                k += 1;
            }
            k
        });
        let mut points = Vec::new();
        for _ in 0..3 {
            points.push(sync());
        }
        stop.store(true, Ordering::Relaxed);
        (writer.join().unwrap(), points)
    });
    points.push(sync());

    let mut prefixes = Vec::new();
    for p in &points {
        let mut present = BTreeSet::new();
        for disk in 0..2u64 {
            let name = if disk == 0 { "sda" } else { "sdb" };
            let out = d.path(&format!("load-{p}-{name}.raw"));
            let o = d.restore(DOMAIN, name, &["--point", &p.to_string()], &out);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let bytes = std::fs::read(&out).unwrap();
            for block in 0..(8 * MIB / BLOCK) {
                let k = block * 2 + disk;
                let range = (block * BLOCK) as usize..((block + 1) * BLOCK) as usize;
                let first = bytes[range.start];
                if first != 0 {
                    assert_eq!(
                        first,
                        (k % 251) as u8 + 1,
                        "point {p}: block {block} of {name}"
                    );
                    assert!(bytes[range].iter().all(|&x| x == first), "torn block");
                    present.insert(k);
                }
            }
        }
        let m = present.len() as u64;
        assert_eq!(
            present,
            (0..m).collect::<BTreeSet<_>>(),
            "point {p} is not a prefix of the writes"
        );
        prefixes.push(m);
    }
    assert!(prefixes.windows(2).all(|w| w[0] <= w[1]), "{prefixes:?}");
    assert_eq!(
        *prefixes.last().unwrap(),
        total,
        "the last point holds every write"
    );
    eprintln!("writes {total}, points hold prefixes {prefixes:?}");
}
