//! libvirt-managed VMs through a real private libvirtd and real QEMU (TCG, no guest OS): each
//! point is one pull-mode backup job with a checkpoint; incrementals read exactly the blocks
//! written since the last committed point; restores are bit-exact; the chain survives libvirt
//! losing its checkpoint records, checkpoints deleted behind the agent's back, and an agent
//! killed mid-job; a boot drill starts QEMU with the captured domain's memory, vCPUs, machine
//! and disk boot order.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::libvirt::{self, Libvirtd};
use rewind_tests::qemu::Model;
use rewind_tests::{disk_of, sync_report, Deployment, Receiver};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;
const DOMAIN: &str = "lv1";

fn sync(d: &Deployment, rx: &Receiver, lv: &Libvirtd, env: &[(&str, &str)]) -> Output {
    let mut cmd = d.sync_cmd(rx, "host1", DOMAIN, &[], &[]);
    cmd.args(["--libvirt", &lv.uri(), "--domain", DOMAIN]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    rewind_tests::run(&mut cmd)
}

fn sync_ok(d: &Deployment, rx: &Receiver, lv: &Libvirtd) -> Value {
    sync_report(&sync(d, rx, lv, &[]))
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

fn check_restores(d: &Deployment, point: &Value, models: &[(&str, &Model)]) {
    let id = point["point"].as_u64().unwrap();
    for (disk, model) in models {
        let want = model.digest(&d.path(&format!("expected-{disk}.raw")));
        assert_eq!(
            d.restored_digest(DOMAIN, disk, id),
            want,
            "disk {disk} of point {id}"
        );
    }
}

/// The checkpoints of the domain, by name.
fn checkpoints(lv: &Libvirtd) -> Vec<String> {
    lv.virsh_ok(&["checkpoint-list", DOMAIN, "--name"])
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

fn no_job(lv: &Libvirtd) -> bool {
    !lv.virsh(&["backup-dumpxml", DOMAIN]).status.success()
}

/// Fields drop in order: the daemon first, while the deployment's folder (its socket) is
/// still there to destroy the domain through.
struct Setup {
    lv: Libvirtd,
    d: Deployment,
    rx: Receiver,
    images: Vec<PathBuf>,
    a: Model,
    b: Model,
}

fn setup(persistent: bool) -> Option<Setup> {
    if !libvirt::available() {
        eprintln!("libvirt is not installed: skipped (the test command installs it)");
        return None;
    }
    let d = Deployment::new();
    let rx = d.serve();
    let lv = Libvirtd::start(&d.path("libvirt"));
    let images = vec![
        libvirt::qcow2(d.dir.path(), "a.qcow2", 64 * MIB),
        libvirt::qcow2(d.dir.path(), "b.qcow2", 32 * MIB),
    ];
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    lv.start_domain(DOMAIN, &refs, persistent);
    Some(Setup {
        d,
        rx,
        lv,
        images,
        a: Model::new(64 * MIB),
        b: Model::new(32 * MIB),
    })
}

impl Setup {
    fn write(&mut self, unit: usize, pattern: u8, off: u64, len: u64) {
        self.lv.write(DOMAIN, unit, pattern, off, len);
        match unit {
            0 => self.a.write(off, len, pattern),
            _ => self.b.write(off, len, pattern),
        }
    }

    fn sync_ok(&self) -> Value {
        sync_ok(&self.d, &self.rx, &self.lv)
    }

    fn check(&self, point: &Value) {
        check_restores(&self.d, point, &[("sda", &self.a), ("sdb", &self.b)]);
    }
}

#[test]
fn a_two_disk_domain_seeds_then_sends_exactly_its_changed_blocks() {
    let Some(mut s) = setup(true) else { return };
    s.write(0, 0xab, MIB, 128 * 1024);
    s.write(0, 0x21, 10 * MIB, 3 * MIB);
    s.write(1, 0x11, 0, BLOCK);

    let p1 = s.sync_ok();
    assert_eq!(p1["consistency"], "crash-consistent");
    for disk in ["sda", "sdb"] {
        let src = disk_of(&p1, disk)["source"].as_str().unwrap().to_owned();
        assert!(src.starts_with("full-read"), "{disk}: {src}");
    }
    // The point carries the definition of the checkpoint its job created (the receiver keeps
    // it with the point).
    let cps = checkpoints(&s.lv);
    let config = &s.d.points(DOMAIN)[0]["config"];
    let cp_xml = config["checkpoint_xml"].as_str().unwrap_or_default();
    assert!(
        cps.len() == 1 && cp_xml.contains(&format!("<name>{}</name>", cps[0])),
        "{cps:?} {cp_xml}"
    );
    assert_eq!(disk_of(&p1, "sda")["changed_blocks"], 2 + 48);
    assert_eq!(disk_of(&p1, "sdb")["changed_blocks"], 1);
    s.check(&p1);
    // One checkpoint of ours between cycles, no job left.
    let cps = checkpoints(&s.lv);
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert!(cps[0].starts_with("rewind-"));
    assert!(no_job(&s.lv));

    let writes_a = [
        (MIB, BLOCK, 0xcd),
        (40 * MIB + 4096, 8192, 0x5a),
        (63 * MIB, MIB, 0x77),
    ];
    let writes_b = [(8 * MIB, 192 * 1024, 0x22)];
    for &(off, len, p) in &writes_a {
        s.write(0, p, off, len);
    }
    for &(off, len, p) in &writes_b {
        s.write(1, p, off, len);
    }
    let p2 = s.sync_ok();
    let want_a = blocks(&writes_a.map(|(o, l, _)| (o, l)));
    let want_b = blocks(&writes_b.map(|(o, l, _)| (o, l)));
    for (disk, want) in [("sda", want_a), ("sdb", want_b)] {
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
    s.check(&p2);
    let cps2 = checkpoints(&s.lv);
    assert_eq!(cps2.len(), 1, "{cps2:?}");
    assert_ne!(cps2, cps, "the chain moved to the new checkpoint");

    // Nothing written: an empty incremental.
    let p3 = s.sync_ok();
    for disk in ["sda", "sdb"] {
        assert_eq!(disk_of(&p3, disk)["changed_blocks"], 0, "{disk}");
        assert_eq!(disk_of(&p3, disk)["read_bytes"], 0, "{disk}");
    }
    s.check(&p3);

    // The domain's definition is kept with the point.
    let points = s.d.points(DOMAIN);
    let config = &points.last().unwrap()["config"];
    assert_eq!(config["source"], "libvirt");
    assert_eq!(config["domain"], DOMAIN);
    let xml = config["domain_xml"].as_str().unwrap();
    assert!(xml.contains(&s.images[0].display().to_string()), "{xml}");
}

#[test]
fn the_chain_survives_lost_records_deleted_checkpoints_and_a_killed_agent() {
    let Some(mut s) = setup(false) else { return };
    s.write(0, 0x01, 0, 4 * BLOCK);
    let p1 = s.sync_ok();
    s.check(&p1);

    // libvirt forgets the checkpoint (as after re-creating a transient domain): the agent
    // redefines it from its saved copy and the next point is still an exact incremental.
    let cp = checkpoints(&s.lv).remove(0);
    s.lv.virsh_ok(&["checkpoint-delete", DOMAIN, &cp, "--metadata"]);
    s.write(0, 0x02, 5 * MIB, BLOCK);
    let p2 = s.sync_ok();
    assert_eq!(disk_of(&p2, "sda")["source"], "dirty-bitmap");
    assert_eq!(disk_of(&p2, "sda")["changed_blocks"], 1);
    assert_eq!(disk_of(&p2, "sdb")["changed_blocks"], 0);
    s.check(&p2);

    // The checkpoint deleted behind the agent's back (bitmaps too): a full read that sends
    // only what the receiver lacks, then incrementals again.
    let cp = checkpoints(&s.lv).remove(0);
    s.lv.virsh_ok(&["checkpoint-delete", DOMAIN, &cp]);
    s.write(1, 0x03, 2 * MIB, BLOCK);
    let p3 = s.sync_ok();
    let src = disk_of(&p3, "sda")["source"].as_str().unwrap().to_owned();
    assert!(src.starts_with("full-read"), "{src}");
    assert_eq!(disk_of(&p3, "sdb")["changed_blocks"], 1);
    assert_eq!(
        disk_of(&p3, "sda")["sent_chunks"],
        0,
        "known chunks are not sent again"
    );
    s.check(&p3);
    s.write(0, 0x04, 7 * MIB, BLOCK);
    let p4 = s.sync_ok();
    assert_eq!(disk_of(&p4, "sda")["source"], "dirty-bitmap");
    assert_eq!(disk_of(&p4, "sda")["changed_blocks"], 1);
    s.check(&p4);

    // The agent killed with its job running: the next run ends that job, deletes the
    // checkpoint the uncommitted point made, and reads since the last committed point.
    let before = checkpoints(&s.lv);
    s.write(0, 0x05, 9 * MIB, BLOCK);
    let killed = sync(&s.d, &s.rx, &s.lv, &[("REWIND_FAULT", "libvirt-begun")]);
    assert!(!killed.status.success());
    assert!(!no_job(&s.lv), "the killed agent's job is still there");
    assert_eq!(checkpoints(&s.lv).len(), 2);
    s.write(0, 0x06, 11 * MIB, BLOCK);
    let p5 = s.sync_ok();
    assert_eq!(disk_of(&p5, "sda")["source"], "dirty-bitmap");
    assert_eq!(
        disk_of(&p5, "sda")["changed_blocks"],
        2,
        "both writes since p4"
    );
    s.check(&p5);
    let after = checkpoints(&s.lv);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(!before.contains(&after[0]));
    assert!(no_job(&s.lv));
}

#[test]
fn the_chain_survives_a_daemon_restart_a_domain_restart_and_a_lost_bitmap() {
    let Some(mut s) = setup(true) else { return };
    s.write(0, 0x01, 0, 2 * BLOCK);
    s.write(1, 0x02, MIB, BLOCK);
    let p1 = s.sync_ok();
    s.check(&p1);

    // libvirtd restarted between points (the domain keeps running): still incremental.
    s.lv.restart();
    s.write(0, 0x03, 3 * MIB, BLOCK);
    let p2 = s.sync_ok();
    assert_eq!(disk_of(&p2, "sda")["source"], "dirty-bitmap");
    assert_eq!(disk_of(&p2, "sda")["changed_blocks"], 1);
    s.check(&p2);

    // The domain shut down and started again (QEMU stores its bitmaps on the way out).
    s.lv.virsh_ok(&["destroy", DOMAIN]);
    s.lv.virsh_ok(&["start", DOMAIN]);
    s.write(1, 0x04, 5 * MIB, BLOCK);
    let p3 = s.sync_ok();
    assert_eq!(disk_of(&p3, "sdb")["source"], "dirty-bitmap");
    assert_eq!(disk_of(&p3, "sdb")["changed_blocks"], 1);
    assert_eq!(disk_of(&p3, "sda")["changed_blocks"], 0);
    s.check(&p3);

    // One disk's bitmap removed behind libvirt's back: the check fails, the checkpoint goes,
    // a full read sends nothing known, and the chain starts again.
    let cp = checkpoints(&s.lv).remove(0);
    let node = s.lv.node_of(DOMAIN, "sda");
    let cmd = format!(
        r#"{{"execute":"block-dirty-bitmap-remove","arguments":{{"node":"{node}","name":"{cp}"}}}}"#
    );
    s.lv.virsh_ok(&["qemu-monitor-command", DOMAIN, &cmd]);
    s.write(0, 0x05, 6 * MIB, BLOCK);
    let p4 = s.sync_ok();
    let src = disk_of(&p4, "sda")["source"].as_str().unwrap().to_owned();
    assert!(src.contains("inconsistent"), "{src}");
    assert_eq!(disk_of(&p4, "sda")["changed_blocks"], 1);
    assert_eq!(
        disk_of(&p4, "sda")["sent_chunks"],
        1,
        "only the new block travels"
    );
    s.check(&p4);
    let cps = checkpoints(&s.lv);
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert_ne!(cps[0], cp);
    s.write(0, 0x06, 8 * MIB, BLOCK);
    let p5 = s.sync_ok();
    assert_eq!(disk_of(&p5, "sda")["source"], "dirty-bitmap");
    assert_eq!(disk_of(&p5, "sda")["changed_blocks"], 1);
    s.check(&p5);
}

/// Writes into a shut-off domain's disk image as a guest would have (qemu-io updates the
/// image's enabled bitmaps), and into the model.
fn write_offline(s: &mut Setup, unit: usize, pattern: u8, off: u64, len: u64) {
    let cmd = format!("write -P {pattern:#x} {off} {len}");
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &cmd])
        .arg(&s.images[unit])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("wrote"),
        "qemu-io: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match unit {
        0 => s.a.write(off, len, pattern),
        _ => s.b.write(off, len, pattern),
    }
}

/// Each disk's changed blocks, dirty-bitmap source and bytes read equal exactly `want`.
fn assert_exact(p: &Value, want: &[(&str, u64)]) {
    for &(disk, n) in want {
        let r = disk_of(p, disk);
        assert_eq!(r["source"], "dirty-bitmap", "{disk}");
        assert_eq!(r["mode"], "delta", "{disk}");
        assert_eq!(r["changed_blocks"], n, "{disk}");
        assert_eq!(
            r["read_bytes"],
            n * BLOCK,
            "{disk}: only dirty blocks are read"
        );
    }
}

#[test]
fn a_shut_off_domain_keeps_its_chain_through_offline_points() {
    let Some(mut s) = setup(true) else { return };
    s.write(0, 0x31, 0, 2 * BLOCK);
    s.write(1, 0x32, MIB, BLOCK);
    let p1 = s.sync_ok();
    s.check(&p1);
    let seed_cp = checkpoints(&s.lv);

    // Written live, then the domain shut down (QEMU gets SIGTERM and stores its bitmaps), then
    // written while it is off: the offline point has exactly both.
    s.write(0, 0x33, 4 * MIB, BLOCK);
    s.lv.virsh_ok(&["destroy", DOMAIN]);
    let off_a = [(2 * MIB, BLOCK, 0x41), (20 * MIB + 4096, 8192, 0x42)];
    let off_b = [(3 * MIB, 2 * BLOCK, 0x43)];
    for &(off, len, p) in &off_a {
        write_offline(&mut s, 0, p, off, len);
    }
    for &(off, len, p) in &off_b {
        write_offline(&mut s, 1, p, off, len);
    }
    let p2 = s.sync_ok();
    assert_eq!(p2["consistency"], "offline");
    let mut want_a: Vec<(u64, u64)> = off_a.iter().map(|&(o, l, _)| (o, l)).collect();
    want_a.push((4 * MIB, BLOCK));
    let want_b: Vec<(u64, u64)> = off_b.iter().map(|&(o, l, _)| (o, l)).collect();
    assert_exact(&p2, &[("sda", blocks(&want_a)), ("sdb", blocks(&want_b))]);
    s.check(&p2);
    let cps = checkpoints(&s.lv);
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert_ne!(cps, seed_cp, "the chain moved to the offline checkpoint");
    assert_eq!(
        s.lv.virsh_ok(&["domstate", DOMAIN]).trim(),
        "shut off",
        "the agent never starts the domain"
    );

    // Another offline point: an exact incremental from the offline checkpoint.
    write_offline(&mut s, 1, 0x44, 9 * MIB, BLOCK);
    let p3 = s.sync_ok();
    assert_eq!(p3["consistency"], "offline");
    assert_exact(&p3, &[("sda", 0), ("sdb", 1)]);
    s.check(&p3);

    // Started again and written live: the live path continues from the offline checkpoint
    // with exactly the live writes.
    s.lv.virsh_ok(&["start", DOMAIN]);
    s.write(0, 0x45, 30 * MIB, 2 * BLOCK);
    s.write(1, 0x46, 12 * MIB, BLOCK);
    let p4 = s.sync_ok();
    assert_eq!(p4["consistency"], "crash-consistent");
    assert_exact(&p4, &[("sda", 2), ("sdb", 1)]);
    s.check(&p4);
    let cps = checkpoints(&s.lv);
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert!(cps[0].starts_with("rewind-"));
    assert!(no_job(&s.lv));
}

/// `restore --all --json` of a point into `out`, with extra flags; returns the report.
fn restore_all(d: &Deployment, vm: &str, point: u64, out: &Path, extra: &[&str]) -> Value {
    let o = rewind_tests::run(
        Command::new(rewind_tests::bin("rewind-receiver"))
            .args(["restore", "--data"])
            .arg(d.data())
            .args(["--vm", vm, "--all", "--json", "--point", &point.to_string()])
            .args(extra)
            .arg("--out-dir")
            .arg(out),
    );
    assert!(
        o.status.success(),
        "restore --all: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The digest of a restored image's content (`qemu-img convert -O raw`, as a peer tool reads it).
fn image_digest(image: &Path, scratch: &Path) -> rewind_tests::disk::Digest {
    let o = rewind_tests::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(scratch),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = rewind_tests::disk::digest(scratch);
    std::fs::remove_file(scratch).unwrap();
    d
}

/// Like `setup(true)`, but the domain also has a network interface (user mode: nothing on the
/// host), so the restore's rule about interfaces is seen.
fn setup_networked() -> Option<Setup> {
    setup_defined(|xml| {
        xml.replace(
            "</devices>",
            "<interface type='user'><mac address='52:54:00:12:34:56'/>\
             <model type='virtio'/></interface></devices>",
        )
    })
}

/// Like `setup(true)`, with `edit` applied to the domain's XML before it is defined.
fn setup_defined(edit: impl FnOnce(String) -> String) -> Option<Setup> {
    setup_images(false, edit)
}

/// Like [`setup_defined`]; with `raw_b`, the second disk is a raw file instead of a qcow2.
fn setup_images(raw_b: bool, edit: impl FnOnce(String) -> String) -> Option<Setup> {
    if !libvirt::available() {
        eprintln!("libvirt is not installed: skipped (the test command installs it)");
        return None;
    }
    let d = Deployment::new();
    let rx = d.serve();
    let lv = Libvirtd::start(&d.path("libvirt"));
    let b = if raw_b {
        let raw = d.path("b.raw");
        rewind_tests::disk::create(&raw, 32 * MIB);
        raw
    } else {
        libvirt::qcow2(d.dir.path(), "b.qcow2", 32 * MIB)
    };
    let images = vec![libvirt::qcow2(d.dir.path(), "a.qcow2", 64 * MIB), b];
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    let mut xml = libvirt::domain_xml(DOMAIN, &refs);
    if raw_b {
        let qcow = format!(
            "type='qcow2' cache='none'/><source file='{}'",
            images[1].display()
        );
        let raw = format!(
            "type='raw' cache='none'/><source file='{}'",
            images[1].display()
        );
        assert!(xml.contains(&qcow), "{xml}");
        xml = xml.replace(&qcow, &raw);
    }
    let xml = edit(xml);
    let file = d.path("defined.xml");
    std::fs::write(&file, xml).unwrap();
    lv.virsh_ok(&["define", &file.display().to_string()]);
    lv.virsh_ok(&["start", DOMAIN]);
    Some(Setup {
        d,
        rx,
        lv,
        images,
        a: Model::new(64 * MIB),
        b: Model::new(32 * MIB),
    })
}

#[test]
fn restore_all_writes_a_domain_xml_that_defines_and_starts_a_clone_on_the_restored_images() {
    let Some(mut s) = setup_networked() else {
        return;
    };
    s.write(0, 0xab, MIB, 128 * 1024);
    s.write(0, 0x21, 10 * MIB, 2 * MIB);
    s.write(1, 0x11, 0, BLOCK);
    s.write(1, 0x3c, 20 * MIB + 4096, 8192);
    let p1 = s.sync_ok();
    let id = p1["point"].as_u64().unwrap();
    let (want_a, want_b) = (s.a.clone(), s.b.clone());
    // A later point, so the restore is seen to take the point it was asked for.
    s.write(0, 0x99, MIB, BLOCK);
    s.sync_ok();
    let config = &s.d.points(DOMAIN)[0]["config"];
    assert_eq!(config["source"], "libvirt");
    let captured = config["domain_xml"].as_str().unwrap();
    assert!(captured.contains("<interface"), "{captured}");
    assert!(captured.contains("<uuid>"), "{captured}");

    let out = s.d.path("clone");
    let report = restore_all(&s.d, DOMAIN, id, &out, &["--format", "qcow2"]);
    let out = out.canonicalize().unwrap();
    let xml_path = out.join("domain.xml");
    assert_eq!(report["domain_xml"], xml_path.display().to_string());
    let name = format!("{DOMAIN}-restored-{id}");
    assert_eq!(report["domain_name"], name);
    assert!(report["domain_xml_skipped"].is_null());

    // The images are the point, bit for bit.
    for (disk, model) in [("sda", &want_a), ("sdb", &want_b)] {
        let got = image_digest(
            &out.join(format!("{disk}.qcow2")),
            &s.d.path(&format!("clone-{disk}.raw")),
        );
        let want = model.digest(&s.d.path(&format!("expected-{disk}.raw")));
        assert_eq!(got, want, "disk {disk} of point {id}");
    }

    // libvirt defines and starts the clone beside the running original.
    s.lv.virsh_ok(&["define", &xml_path.display().to_string()]);
    s.lv.virsh_ok(&["start", &name]);
    let live = s.lv.virsh_ok(&["dumpxml", &name]);
    for disk in ["sda", "sdb"] {
        let image = out.join(format!("{disk}.qcow2"));
        assert!(
            live.contains(&format!("<source file='{}'", image.display())),
            "{live}"
        );
    }
    for original in &s.images {
        assert!(!live.contains(&original.display().to_string()), "{live}");
    }
    assert!(!live.contains("<interface"), "{live}");
    let uuid = |xml: &str| {
        let start = xml.find("<uuid>").unwrap() + "<uuid>".len();
        xml[start..start + 36].to_owned()
    };
    assert_ne!(uuid(&live), uuid(captured), "a new UUID");
    assert_eq!(s.lv.virsh_ok(&["domstate", &name]).trim(), "running");
    s.lv.virsh_ok(&["destroy", &name]);

    // vmdk: images, but no domain.xml, and the report says why.
    let vmdk = s.d.path("clone-vmdk");
    let report = restore_all(&s.d, DOMAIN, id, &vmdk, &["--format", "vmdk"]);
    assert!(report["domain_xml"].is_null());
    assert!(report["domain_xml_skipped"].is_string(), "{report}");
    assert!(vmdk.join("sda.vmdk").exists());
    assert!(!vmdk.join("domain.xml").exists());

    // A VM that is not a libvirt domain: no domain.xml, as before.
    let raw = s.d.path("plain.raw");
    rewind_tests::disk::create(&raw, 4 * MIB);
    rewind_tests::disk::write_at(&raw, MIB, &[0x42; BLOCK as usize]);
    let p = s.d.sync_ok(&s.rx, "host1", "plain", &[("vda", &raw)]);
    let plain = s.d.path("plain-restored");
    let report = restore_all(&s.d, "plain", p["point"].as_u64().unwrap(), &plain, &[]);
    assert!(report["domain_xml"].is_null(), "{report}");
    assert!(report["domain_name"].is_null(), "{report}");
    assert!(plain.join("vda.raw").exists());
    assert!(plain.join("point.json").exists());
    assert!(!plain.join("domain.xml").exists());
}

#[test]
fn a_crashed_domain_is_read_in_full_offline_then_its_chain_goes_on() {
    let Some(mut s) = setup(true) else { return };
    s.write(0, 0x51, 0, 2 * BLOCK);
    s.write(1, 0x52, MIB, BLOCK);
    let p1 = s.sync_ok();
    s.check(&p1);
    let seed_cp = checkpoints(&s.lv);

    // Shut down cleanly (the checkpoint's bitmaps reach the images) and started again, then
    // QEMU killed (as in a host crash): the bitmaps stay flagged in-use in the images, so
    // they cannot be trusted; the offline point reads every disk and sends only what is new.
    s.lv.virsh_ok(&["destroy", DOMAIN]);
    s.lv.virsh_ok(&["start", DOMAIN]);
    let pid_file = s.lv.dir.join("run/qemu").join(format!("{DOMAIN}.pid"));
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.lv.virsh_ok(&["domstate", DOMAIN]).trim() != "shut off" {
        assert!(
            std::time::Instant::now() < deadline,
            "libvirt did not notice"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    write_offline(&mut s, 0, 0x53, 5 * MIB, BLOCK);
    let p2 = s.sync_ok();
    assert_eq!(p2["consistency"], "offline");
    for (disk, changed) in [("sda", 1), ("sdb", 0)] {
        let r = disk_of(&p2, disk);
        let src = r["source"].as_str().unwrap();
        assert!(
            src.starts_with("full-read") && src.contains("in use"),
            "{disk}: {src}"
        );
        assert_eq!(r["changed_blocks"], changed, "{disk}");
        assert_eq!(r["sent_chunks"], changed, "{disk}: known chunks stay home");
    }
    s.check(&p2);
    let cps = checkpoints(&s.lv);
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert_ne!(cps, seed_cp, "the crashed checkpoint is gone");

    // The new chain holds: an exact offline incremental.
    write_offline(&mut s, 1, 0x54, 7 * MIB, BLOCK);
    let p3 = s.sync_ok();
    assert_exact(&p3, &[("sda", 0), ("sdb", 1)]);
    s.check(&p3);
}

/// The arguments of the running drill QEMU of `vm` (its `setpriv` before the exec: the same
/// arguments), once it has them all.
fn drill_qemu_args(vm: &str) -> Option<Vec<String>> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("rewind-drill-{vm}")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|pid| {
            let raw = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter()
                .any(|a| a.contains("bootindex="))
                .then_some(args)
        })
}

/// The value after `option` in a command line.
fn after<'a>(args: &'a [String], option: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == option)
        .unwrap_or_else(|| panic!("no {option} in {args:?}"));
    &args[at + 1]
}

#[test]
fn a_boot_drill_starts_the_captured_domains_memory_cpus_machine_and_boot_order() {
    // 300 MiB (libvirt records 307200 KiB), 2 vCPUs, q35, and sdb booting before sda.
    let Some(s) = setup_defined(|xml| {
        let edited = xml
            .replace(
                "<memory unit='MiB'>128</memory><vcpu>1</vcpu>",
                "<memory unit='MiB'>300</memory><vcpu>2</vcpu>",
            )
            .replace("machine='pc'", "machine='q35'")
            .replace(
                "<target dev='sda' bus='scsi'/>",
                "<target dev='sda' bus='scsi'/><boot order='2'/>",
            )
            .replace(
                "<target dev='sdb' bus='scsi'/>",
                "<target dev='sdb' bus='scsi'/><boot order='1'/>",
            );
        assert!(
            edited.contains("<memory unit='MiB'>300</memory><vcpu>2</vcpu>")
                && edited.contains("machine='q35'")
                && edited.matches("<boot order=").count() == 2,
            "the test domain's XML changed: {edited}"
        );
        edited
    }) else {
        return;
    };
    let p = s.sync_ok();
    let tmp = s.d.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    // The disks hold no OS: the drill waits for a marker until it is stopped, and meanwhile
    // its QEMU's command line shows what it was given.
    let child = Command::new(rewind_tests::bin("rewind-receiver"))
        .args([
            "drill", "--json", "--vm", DOMAIN, "--boot", "--accel", "tcg",
        ])
        .args(["--boot-timeout", "300", "--data"])
        .arg(s.d.data())
        .env("TMPDIR", &tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = None;
    assert!(
        rewind_tests::wait_until(Duration::from_secs(60), || {
            seen = drill_qemu_args(DOMAIN);
            seen.is_some()
        }),
        "the drill's QEMU did not start"
    );
    let args = seen.unwrap();
    assert_eq!(after(&args, "-m"), "300", "{args:?}");
    assert_eq!(after(&args, "-smp"), "2", "{args:?}");
    assert_eq!(after(&args, "-machine"), "q35", "{args:?}");
    let boots = |id: &str, index: &str| {
        args.iter()
            .any(|a| a.contains(&format!("id={id},")) && a.ends_with(&format!("bootindex={index}")))
    };
    assert!(boots("sdb", "0") && boots("sda", "1"), "{args:?}");

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["reason"].as_str().unwrap().contains("cancelled"), "{v}");
    assert_eq!(v["point"], p["point"], "{v}");
    assert_eq!(v["memory_mib"], 300, "{v}");
    assert_eq!(v["cpus"], 2, "{v}");
    assert_eq!(v["machine"], "q35", "{v}");
    assert_eq!(v["disk_order"], serde_json::json!(["sdb", "sda"]), "{v}");
    assert!(
        rewind_tests::wait_until(Duration::from_secs(10), || {
            !rewind_tests::qemu::drill_running(DOMAIN)
        }),
        "the drill's QEMU outlived it"
    );

    // The catalog's record says the same.
    let o = rewind_tests::run(
        Command::new(rewind_tests::bin("rewind-receiver"))
            .args(["drills", "--json", "--vm", DOMAIN, "--data"])
            .arg(s.d.data()),
    );
    assert!(o.status.success());
    let h: Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["memory_mib", "cpus", "machine", "disk_order"] {
        assert_eq!(h[0][key], v[key], "{key}: {h}");
    }
}

#[test]
fn a_raw_disk_under_libvirt_is_read_in_full_and_sends_only_its_changed_chunks() {
    let Some(mut s) = setup_images(true, |x| x) else {
        return;
    };
    s.write(0, 0x61, 0, BLOCK);
    s.write(1, 0x62, MIB, 2 * BLOCK);
    let p1 = s.sync_ok();
    s.check(&p1);
    s.write(0, 0x63, 2 * MIB, BLOCK);
    s.write(1, 0x64, 5 * MIB, BLOCK);
    let p2 = s.sync_ok();
    let a = disk_of(&p2, "sda");
    assert_eq!(a["source"], "dirty-bitmap");
    assert_eq!(a["changed_blocks"], 1);
    // The raw disk has no bitmap: read in full, reported as such, and only the one new
    // chunk travels (the known-chunks rule).
    let b = disk_of(&p2, "sdb");
    assert_eq!(b["source"], "full-read: raw disk: no dirty bitmaps");
    assert_eq!(b["changed_blocks"], 1);
    assert_eq!(b["sent_chunks"], 1);
    s.check(&p2);
    // The checkpoint covers the qcow2 disk only; the chain goes on.
    s.write(0, 0x65, 3 * MIB, BLOCK);
    let p3 = s.sync_ok();
    assert_eq!(disk_of(&p3, "sda")["changed_blocks"], 1);
    assert_eq!(disk_of(&p3, "sdb")["changed_blocks"], 0);
    s.check(&p3);
    assert_eq!(checkpoints(&s.lv).len(), 1);
}
