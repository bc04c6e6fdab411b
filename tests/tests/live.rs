//! Live QEMU VMs (real `qemu-system-x86_64` under TCG, no guest OS): one transaction captures
//! all disks at one instant, only dirty blocks are read, the bitmap lifecycle loses no change
//! when a cycle fails at any step, and a VM restarted without its bitmap falls back to one
//! deduplicated full read.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::qemu::{Model, Monitor, Vm};
use rewind_tests::{disk_of, Deployment};
use serde_json::json;
use std::collections::BTreeSet;

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

fn check_restores(d: &Deployment, vm: &str, point: u64, models: &[(&str, &Model)]) {
    for (disk, model) in models {
        let want = model.digest(&d.path(&format!("expected-{disk}.raw")));
        assert_eq!(
            d.restored_digest(vm, disk, point),
            want,
            "disk {disk} of point {point}"
        );
    }
}

fn blocks(ranges: &[(u64, u64)]) -> u64 {
    let mut set = BTreeSet::new();
    for &(off, len) in ranges {
        for b in off / BLOCK..(off + len).div_ceil(BLOCK) {
            set.insert(b);
        }
    }
    set.len() as u64
}

#[test]
fn two_disks_incremental_points_read_only_dirty_blocks() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut vm = Vm::create(d.dir.path(), &[64 * MIB, 32 * MIB]);
    let (mut a, mut b) = (Model::new(64 * MIB), Model::new(32 * MIB));
    for (off, len, p) in [(MIB, 128 * 1024, 0xab), (10 * MIB, 3 * MIB, 0x21)] {
        vm.monitor.write("drive0", p, off, len);
        a.write(off, len, p);
    }
    vm.monitor.write("drive1", 0x11, 0, BLOCK);
    b.write(0, BLOCK, 0x11);

    let p1 = d.sync_live_ok(&rx, "web1", &vm.agent_qmp());
    assert_eq!(p1["consistency"], "crash-consistent");
    assert_eq!(disk_of(&p1, "vda")["changed_blocks"], 2 + 48);
    assert_eq!(disk_of(&p1, "vdb")["changed_blocks"], 1);
    assert!(disk_of(&p1, "vda")["source"]
        .as_str()
        .unwrap()
        .starts_with("full-read"));
    // The first point reads only allocated extents.
    assert_eq!(disk_of(&p1, "vda")["read_bytes"], 50 * BLOCK);
    check_restores(
        &d,
        "web1",
        p1["point"].as_u64().unwrap(),
        &[("vda", &a), ("vdb", &b)],
    );

    let writes_a = [
        (MIB, BLOCK, 0xcd),
        (40 * MIB + 4096, 8192, 0x5a),
        (63 * MIB, MIB, 0x77),
    ];
    let writes_b = [(8 * MIB, 192 * 1024, 0x22)];
    for &(off, len, p) in &writes_a {
        vm.monitor.write("drive0", p, off, len);
        a.write(off, len, p);
    }
    for &(off, len, p) in &writes_b {
        vm.monitor.write("drive1", p, off, len);
        b.write(off, len, p);
    }
    let p2 = d.sync_live_ok(&rx, "web1", &vm.agent_qmp());
    let want_a = blocks(&writes_a.map(|(o, l, _)| (o, l)));
    let want_b = blocks(&writes_b.map(|(o, l, _)| (o, l)));
    for (disk, want) in [("vda", want_a), ("vdb", want_b)] {
        let r = disk_of(&p2, disk);
        assert_eq!(r["source"], "dirty-bitmap", "{disk}");
        assert_eq!(r["mode"], "delta", "{disk}");
        assert_eq!(r["changed_blocks"], want, "{disk}");
        assert_eq!(
            r["read_bytes"],
            want * BLOCK,
            "{disk}: only dirty blocks are read"
        );
    }
    check_restores(
        &d,
        "web1",
        p2["point"].as_u64().unwrap(),
        &[("vda", &a), ("vdb", &b)],
    );
    check_restores(
        &d,
        "web1",
        p1["point"].as_u64().unwrap(),
        &[("vda", &{
            let mut m = Model::new(64 * MIB);
            m.write(MIB, 128 * 1024, 0xab);
            m.write(10 * MIB, 3 * MIB, 0x21);
            m
        })],
    );

    // The configuration is kept with the point; nothing is left in QEMU.
    let points = d.points("web1");
    let config = &points[1]["config"];
    assert_eq!(config["source"], "qemu");
    assert_eq!(config["name"], "testvm");
    let names: Vec<&str> = config["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vda", "vdb"]);
    assert_eq!(config["disks"][0]["format"], "qcow2");
    assert_eq!(points[1]["consistency"], "crash-consistent");
    assert!(
        vm.monitor.leftovers().is_empty(),
        "{:?}",
        vm.monitor.leftovers()
    );
    assert_eq!(vm.monitor.bitmaps("drive0").len(), 1);

    // A guest agent that does not answer: the cycle neither hangs nor fails, and the point says
    // it is only crash-consistent.
    vm.monitor.write("drive1", 0x23, 0, BLOCK);
    b.write(0, BLOCK, 0x23);
    let qga = vm.dir.join("qga.sock");
    let out = d.sync_live(
        &rx,
        "web1",
        &vm.agent_qmp(),
        &["--guest-agent", qga.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p3: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p3["consistency"], "crash-consistent");
    assert_eq!(disk_of(&p3, "vdb")["changed_blocks"], 1);
    check_restores(
        &d,
        "web1",
        p3["point"].as_u64().unwrap(),
        &[("vda", &a), ("vdb", &b)],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest agent unavailable"));

    // --disk limits the set; an unknown one is a clear error.
    let out = d.sync_live(&rx, "web1", &vm.agent_qmp(), &["--disk", "vdz"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no disk named vdz"));
}

#[test]
fn points_are_one_instant_across_disks_under_load() {
    let d = Deployment::new();
    let rx = d.serve();
    let vm = Vm::create(d.dir.path(), &[16 * MIB, 16 * MIB]);
    let qmp = vm.agent_qmp();
    let test_qmp = vm.dir.join("aux.qmp");
    // A writer on its own monitor connection: sequence number k goes to disk k % 2, block k / 2,
    // with pattern (k % 251) + 1.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut m = Monitor::connect(&test_qmp);
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && k < 512 {
                m.write(
                    &format!("drive{}", k % 2),
                    (k % 251) as u8 + 1,
                    (k / 2) * BLOCK,
                    BLOCK,
                );
                k += 1;
            }
            k
        })
    };
    let mut points = Vec::new();
    for _ in 0..4 {
        points.push(d.sync_live_ok(&rx, "load", &qmp)["point"].as_u64().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = writer.join().unwrap();
    points.push(d.sync_live_ok(&rx, "load", &qmp)["point"].as_u64().unwrap());

    let mut prefixes = Vec::new();
    for p in &points {
        let mut present = BTreeSet::new();
        for disk in 0..2u64 {
            let name = if disk == 0 { "vda" } else { "vdb" };
            let out = d.path(&format!("load-{p}-{name}.raw"));
            let o = d.restore("load", name, &["--point", &p.to_string()], &out);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let bytes = std::fs::read(&out).unwrap();
            for block in 0..(16 * MIB / BLOCK) {
                let k = block * 2 + disk;
                let first = bytes[(block * BLOCK) as usize];
                if first != 0 {
                    assert_eq!(
                        first,
                        (k % 251) as u8 + 1,
                        "point {p}: block {block} of {name}"
                    );
                    assert!(
                        bytes[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize]
                            .iter()
                            .all(|&x| x == first)
                    );
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

#[test]
fn a_cycle_that_fails_at_any_step_loses_nothing() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut vm = Vm::create(d.dir.path(), &[32 * MIB]);
    let mut a = Model::new(32 * MIB);
    let write = |vm: &mut Vm, a: &mut Model, off: u64, p: u8| {
        vm.monitor.write("drive0", p, off, BLOCK);
        a.write(off, BLOCK, p);
    };
    write(&mut vm, &mut a, 0, 1);
    d.sync_live_ok(&rx, "f", &vm.agent_qmp());

    // 1. The agent is SIGKILLed right after the transaction: fleecing node, job and bitmaps leak.
    write(&mut vm, &mut a, 2 * MIB, 2);
    let mut cmd = d.sync_cmd(&rx, "host1", "f", &[], &[]);
    cmd.arg("--qmp")
        .arg(vm.agent_qmp())
        .env("REWIND_FAULT", "after-transaction");
    let killed = rewind_tests::run(&mut cmd);
    assert!(!killed.status.success(), "the fault point kills the agent");
    assert!(
        !vm.monitor.leftovers().is_empty(),
        "the kill left nodes behind"
    );
    write(&mut vm, &mut a, 4 * MIB, 4);
    let r = d.sync_live_ok(&rx, "f", &vm.agent_qmp());
    assert_eq!(disk_of(&r, "vda")["source"], "dirty-bitmap");
    assert_eq!(
        disk_of(&r, "vda")["changed_blocks"],
        2,
        "writes before and after the kill"
    );
    check_restores(&d, "f", r["point"].as_u64().unwrap(), &[("vda", &a)]);
    assert!(
        vm.monitor.leftovers().is_empty(),
        "{:?}",
        vm.monitor.leftovers()
    );
    assert_eq!(vm.monitor.bitmaps("drive0").len(), 1);

    // 2. The receiver is down: the cycle fails after the capture; bitmaps are merged back.
    write(&mut vm, &mut a, 5 * MIB, 5);
    drop(rx);
    let dead = d.sync_live(&rx_placeholder(&d), "f", &vm.agent_qmp(), &[]);
    assert!(!dead.status.success());
    assert!(
        vm.monitor.leftovers().is_empty(),
        "{:?}",
        vm.monitor.leftovers()
    );
    write(&mut vm, &mut a, 6 * MIB, 6);
    let rx = d.serve();
    let r = d.sync_live_ok(&rx, "f", &vm.agent_qmp());
    assert_eq!(disk_of(&r, "vda")["changed_blocks"], 2);
    check_restores(&d, "f", r["point"].as_u64().unwrap(), &[("vda", &a)]);

    // 3. An export of ours is already present (e.g. from a crashed cycle).
    let sock = vm.dir.join("stray.sock");
    vm.monitor
        .execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock.display().to_string()}}}),
        )
        .unwrap();
    let node = node_of(&mut vm.monitor, "drive0");
    vm.monitor
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "rewind-exp-vda", "node-name": node, "name": "vda"}),
        )
        .unwrap();
    write(&mut vm, &mut a, 7 * MIB, 7);
    let r = d.sync_live(&rx, "f", &vm.agent_qmp(), &[]);
    // Our export is removed; the foreign NBD server (not started by us) is refused clearly.
    if r.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        check_restores(&d, "f", v["point"].as_u64().unwrap(), &[("vda", &a)]);
    } else {
        assert!(String::from_utf8_lossy(&r.stderr).contains("NBD server not started by Rewind"));
        vm.monitor.execute("nbd-server-stop", json!({})).unwrap();
        let v = d.sync_live_ok(&rx, "f", &vm.agent_qmp());
        assert_eq!(disk_of(&v, "vda")["changed_blocks"], 1);
        check_restores(&d, "f", v["point"].as_u64().unwrap(), &[("vda", &a)]);
    }
    assert!(
        vm.monitor.leftovers().is_empty(),
        "{:?}",
        vm.monitor.leftovers()
    );
}

/// A receiver address where nothing listens (the real one was stopped).
fn rx_placeholder(d: &Deployment) -> rewind_tests::Receiver {
    let rx = d.serve();
    let addr = rx.addr();
    drop(rx);
    rewind_tests::Receiver::dead(addr)
}

fn node_of(m: &mut Monitor, drive: &str) -> String {
    let v = m.execute("query-block", json!({})).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|x| x["device"] == drive)
        .map(|x| x["inserted"]["node-name"].as_str().unwrap().to_owned())
        .unwrap()
}

#[test]
fn a_vm_restarted_without_its_bitmap_gets_one_full_deduplicated_read() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut vm = Vm::create(d.dir.path(), &[32 * MIB]);
    let mut a = Model::new(32 * MIB);
    for (i, off) in [0u64, 5 * MIB, 9 * MIB].into_iter().enumerate() {
        // Random-looking content so compression cannot hide a re-send.
        vm.monitor.write("drive0", 0x30 + i as u8, off, MIB);
        a.write(off, MIB, 0x30 + i as u8);
    }
    d.sync_live_ok(&rx, "r", &vm.agent_qmp());
    vm.monitor.write("drive0", 0x40, 20 * MIB, BLOCK);
    a.write(20 * MIB, BLOCK, 0x40);
    // The guest flushes (its writes are durable), then the power is cut: the persistent bitmap
    // comes back inconsistent.
    vm.monitor
        .execute(
            "human-monitor-command",
            json!({"command-line": "qemu-io drive0 flush"}),
        )
        .unwrap();
    let disks = vm.kill9();
    let mut vm = Vm::start(d.dir.path(), disks);
    let r = d.sync_live_ok(&rx, "r", &vm.agent_qmp());
    let src = disk_of(&r, "vda")["source"].as_str().unwrap().to_owned();
    assert!(src.starts_with("full-read"), "{src}");
    assert_eq!(
        disk_of(&r, "vda")["changed_blocks"],
        1,
        "hash comparison keeps the delta exact"
    );
    assert!(
        r["sent_bytes"].as_u64().unwrap() < 2 * BLOCK,
        "only the new chunk is sent"
    );
    check_restores(&d, "r", r["point"].as_u64().unwrap(), &[("vda", &a)]);
    // Tracking resumes.
    vm.monitor.write("drive0", 0x41, 21 * MIB, BLOCK);
    a.write(21 * MIB, BLOCK, 0x41);
    let r = d.sync_live_ok(&rx, "r", &vm.agent_qmp());
    assert_eq!(disk_of(&r, "vda")["source"], "dirty-bitmap");
    assert_eq!(disk_of(&r, "vda")["read_bytes"], BLOCK);
    check_restores(&d, "r", r["point"].as_u64().unwrap(), &[("vda", &a)]);
}

#[test]
fn offline_qcow2_keeps_its_incremental_chain() {
    let d = Deployment::new();
    let rx = d.serve();
    let img = d.path("stopped.qcow2");
    let sh = |args: &[&str]| {
        let out = rewind_tests::run(std::process::Command::new(args[0]).args(&args[1..]));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = img.display().to_string();
    sh(&["qemu-img", "create", "-q", "-f", "qcow2", &p, "16M"]);
    let mut a = Model::new(16 * MIB);
    sh(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", &p]);
    a.write(0, MIB, 0x61);
    let spec = format!("qcow2:{p}");
    let disks = [("vda", std::path::Path::new(&spec))];
    let r1 = d.sync_ok(&rx, "host1", "off", &disks);
    assert_eq!(r1["consistency"], "offline");
    assert_eq!(disk_of(&r1, "vda")["changed_blocks"], 16);
    sh(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 8M 128k", &p]);
    a.write(8 * MIB, 128 * 1024, 0x62);
    let r2 = d.sync_ok(&rx, "host1", "off", &disks);
    assert_eq!(disk_of(&r2, "vda")["source"], "dirty-bitmap");
    assert_eq!(disk_of(&r2, "vda")["changed_blocks"], 2);
    assert_eq!(disk_of(&r2, "vda")["read_bytes"], 2 * BLOCK);
    check_restores(&d, "off", r2["point"].as_u64().unwrap(), &[("vda", &a)]);
    // Exactly one bitmap of ours is left in the image, enabled, for the next start of the VM.
    let info = rewind_tests::run(std::process::Command::new("qemu-img").args([
        "info",
        "--output=json",
        &p,
    ]));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let bitmaps = v["format-specific"]["data"]["bitmaps"].as_array().unwrap();
    assert_eq!(bitmaps.len(), 1);
    assert_eq!(bitmaps[0]["flags"], json!(["auto"]));
}

/// A VM restarted without its bitmap needs a full read; when that cycle fails after its capture
/// (the agent killed, or the receiver dying under it), the bitmap it created records only the
/// writes after the capture. The next cycle must read in full again, not trust that bitmap, or
/// its point would miss the writes made before the failed capture (found by rewind-chaos).
#[test]
fn a_failed_full_read_is_read_in_full_again() {
    for how in [
        "agent killed after the capture",
        "receiver killed mid-upload",
    ] {
        let d = Deployment::new();
        let mut rx = d.serve();
        let mut vm = Vm::create(d.dir.path(), &[16 * MIB]);
        let mut a = Model::new(16 * MIB);
        vm.monitor.write("drive0", 1, 0, BLOCK);
        a.write(0, BLOCK, 1);
        d.sync_live_ok(&rx, "fr", &vm.agent_qmp());
        vm.monitor
            .execute(
                "human-monitor-command",
                json!({"command-line": "qemu-io drive0 flush"}),
            )
            .unwrap();
        let disks = vm.kill9();
        let mut vm = Vm::start(d.dir.path(), disks);
        vm.monitor.write("drive0", 2, MIB, BLOCK);
        a.write(MIB, BLOCK, 2);
        if how.starts_with("agent") {
            let mut cmd = d.sync_cmd(&rx, "host1", "fr", &[], &[]);
            cmd.arg("--qmp")
                .arg(vm.agent_qmp())
                .env("REWIND_FAULT", "after-transaction");
            assert!(!rewind_tests::run(&mut cmd).status.success());
        } else {
            drop(rx);
            rx = rewind_tests::Receiver::start_via(
                {
                    let mut c = std::process::Command::new(rewind_tests::bin("rewind-receiver"));
                    c.env("REWIND_FAULT", "after-pack-sync");
                    c
                },
                &d.data(),
                &d.pki(),
                "127.0.0.1:0",
                &[],
            );
            let out = d.sync_live(&rx, "fr", &vm.agent_qmp(), &[]);
            assert!(!out.status.success(), "{how}: the cycle fails");
            assert!(
                rx.wait_exit(std::time::Duration::from_secs(15)).is_some(),
                "serve died at its fault point"
            );
            rx = d.serve();
        }
        let r = d.sync_live_ok(&rx, "fr", &vm.agent_qmp());
        let source = disk_of(&r, "vda")["source"].as_str().unwrap().to_owned();
        assert!(source.starts_with("full-read"), "{how}: {source}");
        check_restores(&d, "fr", r["point"].as_u64().unwrap(), &[("vda", &a)]);
        // Tracking resumes from the committed full read.
        vm.monitor.write("drive0", 3, 2 * MIB, BLOCK);
        a.write(2 * MIB, BLOCK, 3);
        let r = d.sync_live_ok(&rx, "fr", &vm.agent_qmp());
        assert_eq!(disk_of(&r, "vda")["source"], "dirty-bitmap", "{how}");
        check_restores(&d, "fr", r["point"].as_u64().unwrap(), &[("vda", &a)]);
    }
}
