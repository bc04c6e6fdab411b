//! A libvirt job's scratch files (the old content of blocks the guest overwrites while the job
//! reads) must never hurt the guest: a job that may not fit is not started, and a job whose
//! folder fills up anyway is ended and the guest resumed, its writes intact. The agent's state
//! folder is a small ext4 of its own here, so it really runs out of room.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::libvirt::{self, Libvirtd, SmallFs};
use rewind_tests::qemu::Model;
use rewind_tests::{disk_of, sync_report, Deployment};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

fn sync_cmd(d: &Deployment, rx: &rewind_tests::Receiver, lv: &Libvirtd, dom: &str) -> Command {
    let mut cmd = d.sync_cmd(rx, "host1", dom, &[], &[]);
    cmd.args(["--libvirt", &lv.uri(), "--domain", dom])
        .args(["--scratch-reserve-mib", "4"]);
    cmd
}

fn checkpoints(lv: &Libvirtd, dom: &str) -> Vec<String> {
    lv.virsh_ok(&["checkpoint-list", dom, "--name"])
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

fn no_job(lv: &Libvirtd, dom: &str) -> bool {
    !lv.virsh(&["backup-dumpxml", dom]).status.success()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_job_whose_scratch_files_may_not_fit_is_not_started_and_the_chain_waits() {
    if !libvirt::available() {
        eprintln!("libvirt is not installed: skipped (the test command installs it)");
        return;
    }
    const DOM: &str = "room1";
    let d = Deployment::new();
    let rx = d.serve();
    let fs = SmallFs::mount(&d.path("state-host1"), 96 * MIB);
    let lv = Libvirtd::start(&d.path("libvirt"));
    let a = libvirt::qcow2(d.dir.path(), "a.qcow2", 64 * MIB);
    let b = libvirt::qcow2(d.dir.path(), "b.qcow2", 32 * MIB);
    lv.start_domain(DOM, &[&a, &b], true);
    let (mut ma, mb) = (Model::new(64 * MIB), Model::new(32 * MIB));

    lv.write(DOM, 0, 0x11, 0, BLOCK);
    ma.write(0, BLOCK, 0x11);
    let p1 = sync_report(&rewind_tests::run(&mut sync_cmd(&d, &rx, &lv, DOM)));
    let seed_cps = checkpoints(&lv, DOM);
    assert_eq!(seed_cps.len(), 1, "{seed_cps:?}");

    // 12 MiB written since the checkpoint: the job may need 12 MiB of scratch plus the 4 MiB
    // reserve, and only 10 MiB are free.
    lv.write(DOM, 0, 0x22, 8 * MIB, 12 * MIB);
    ma.write(8 * MIB, 12 * MIB, 0x22);
    fs.fill_until(10 * MIB);
    let o = rewind_tests::run(&mut sync_cmd(&d, &rx, &lv, DOM));
    assert!(!o.status.success(), "the cycle must fail");
    let err = stderr(&o);
    assert!(
        err.contains("scratch folder") && err.contains("MiB free") && err.contains("16 MiB"),
        "{err}"
    );
    assert!(no_job(&lv, DOM), "no job was begun");
    assert_eq!(checkpoints(&lv, DOM), seed_cps, "the chain is untouched");
    assert_eq!(lv.virsh_ok(&["domstate", DOM]).trim(), "running");
    assert_eq!(d.points(DOM).len(), 1, "no point was made");

    // Room again: the next point is the exact incremental from the seed's checkpoint.
    fs.empty();
    let p2 = sync_report(&rewind_tests::run(&mut sync_cmd(&d, &rx, &lv, DOM)));
    let r = disk_of(&p2, "sda");
    assert_eq!(r["source"], "dirty-bitmap");
    assert_eq!(r["changed_blocks"], 12 * MIB / BLOCK);
    assert_eq!(disk_of(&p2, "sdb")["changed_blocks"], 0);
    for (p, want_a) in [(&p1, None), (&p2, Some(&ma))] {
        let id = p["point"].as_u64().unwrap();
        if let Some(model) = want_a {
            let want = model.digest(&d.path("expected-sda.raw"));
            assert_eq!(d.restored_digest(DOM, "sda", id), want, "sda of point {id}");
        }
        let want = mb.digest(&d.path("expected-sdb.raw"));
        assert_eq!(d.restored_digest(DOM, "sdb", id), want, "sdb of point {id}");
    }
    assert_eq!(checkpoints(&lv, DOM).len(), 1);
}

/// A real Debian guest on an overlay of the test image, on virtio, with a guest agent.
fn guest_domain(lv: &Libvirtd, name: &str, overlay: &Path) {
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
         <on_poweroff>destroy</on_poweroff>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
         <video><model type='none'/></video><memballoon model='none'/></devices></domain>",
        overlay.display()
    );
    let file = lv.dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    lv.virsh_ok(&["define", &file.display().to_string()]);
    lv.virsh_ok(&["start", name]);
}

/// A guest agent command through libvirt; Err is libvirt's message (e.g. agent not up yet).
fn agent(lv: &Libvirtd, dom: &str, cmd: &Value) -> Result<Value, String> {
    let o = lv.virsh(&["qemu-agent-command", dom, &cmd.to_string()]);
    if !o.status.success() {
        return Err(stderr(&o));
    }
    Ok(serde_json::from_slice::<Value>(&o.stdout).unwrap()["return"].clone())
}

/// Runs `argv` in the guest and returns its pid (guest-exec does not wait).
fn guest_spawn(lv: &Libvirtd, dom: &str, argv: &[&str]) -> u64 {
    let cmd = json!({"execute": "guest-exec", "arguments": {
        "path": argv[0], "arg": &argv[1..], "capture-output": true}});
    agent(lv, dom, &cmd).unwrap()["pid"].as_u64().unwrap()
}

/// Waits for a guest process to exit; returns its status (the guest-exec-status answer).
fn guest_wait(lv: &Libvirtd, dom: &str, pid: u64, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let cmd = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let st = agent(lv, dom, &cmd).unwrap();
        if st["exited"] == true {
            return st;
        }
        assert!(Instant::now() < deadline, "guest process {pid}: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls `check` until it holds (an event, not a timer: the deadline is only a safety net).
fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` is stopped (SIGSTOP at a fault point).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

#[test]
fn a_scratch_folder_that_fills_during_the_job_never_leaves_the_guest_paused() {
    if !libvirt::available() {
        eprintln!("libvirt is not installed: skipped (the test command installs it)");
        return;
    }
    const DOM: &str = "fill1";
    let image = rewind_tests::guest::image().expect("guest image");
    let d = Deployment::new();
    let rx = d.serve();
    let fs = SmallFs::mount(&d.path("state-host1"), 1 << 30);
    let lv = Libvirtd::start(&d.path("libvirt"));
    let overlay = d.path("guest.qcow2");
    let o = rewind_tests::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&image)
            .arg(&overlay),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    guest_domain(&lv, DOM, &overlay);
    let ping = json!({"execute": "guest-ping"});
    wait_for("the guest agent", Duration::from_secs(600), || {
        agent(&lv, DOM, &ping).is_ok()
    });
    let sync_once = || rewind_tests::run(&mut sync_cmd(&d, &rx, &lv, DOM));
    sync_report(&sync_once());

    // 32 MiB written since the seed: the job expects about that much scratch, and has room.
    let dd = |conv: &str| {
        guest_spawn(
            &lv,
            DOM,
            &[
                "/bin/dd",
                "if=/dev/urandom",
                "of=/var/tmp/fill",
                "bs=1M",
                "count=32",
                "oflag=direct",
                conv,
            ],
        )
    };
    let st = guest_wait(&lv, DOM, dd("conv=fsync"), Duration::from_secs(300));
    assert_eq!(st["exitcode"], 0, "{st}");

    // The agent stops just after the job began; meanwhile something else fills the folder,
    // and the guest overwrites the file: QEMU cannot keep the old content, the guest's write
    // fails and libvirt pauses the domain.
    // Its upload is capped at 1 MB/s, so sending the 32 MiB of random data takes about half
    // a minute: the guard, which looks every half second, acts long before the cycle ends.
    let child = sync_cmd(&d, &rx, &lv, DOM)
        .args(["--bwlimit", "1"])
        .env("REWIND_PAUSE", "libvirt-begun")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let agent_pid = child.id();
    wait_for(
        "the agent at libvirt-begun",
        Duration::from_secs(120),
        || stopped(agent_pid),
    );
    fs.fill_until(2 * MIB);
    let writer = dd("conv=notrunc,fsync");
    let reason = || {
        lv.virsh_ok(&["domstate", "--reason", DOM])
            .trim()
            .to_owned()
    };
    wait_for(
        "the domain to pause on an I/O error",
        Duration::from_secs(300),
        || reason() == "paused (I/O error)",
    );

    // The agent goes on: its guard ends the job within half a second and resumes the domain,
    // and the cycle fails saying why; the guest's write completes.
    let cont = Command::new("kill")
        .args(["-CONT", &agent_pid.to_string()])
        .status()
        .unwrap();
    assert!(cont.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "the cycle must fail: {err} {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("paused on an I/O error"), "{err}");
    assert!(reason().starts_with("running"), "{}", reason());
    assert!(no_job(&lv, DOM));
    let st = guest_wait(&lv, DOM, writer, Duration::from_secs(300));
    assert_eq!(st["exitcode"], 0, "the guest's write went through: {st}");

    // Room again: the chain goes on from the seed's checkpoint (dirty bitmap, not a full
    // read), and a point taken with the guest paused equals its disk bit for bit.
    fs.empty();
    let p = sync_report(&sync_once());
    assert_eq!(disk_of(&p, "vda")["source"], "dirty-bitmap", "{p}");
    assert!(disk_of(&p, "vda")["changed_blocks"].as_u64().unwrap() >= 32 * MIB / BLOCK);
    let sync_fs = guest_spawn(&lv, DOM, &["/bin/sync"]);
    guest_wait(&lv, DOM, sync_fs, Duration::from_secs(120));
    lv.virsh_ok(&["suspend", DOM]);
    let last = sync_report(&sync_once());
    assert_eq!(disk_of(&last, "vda")["source"], "dirty-bitmap");
    lv.virsh_ok(&["destroy", DOM]);
    let raw = d.path("guest.raw");
    let o = rewind_tests::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&overlay)
            .arg(&raw),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let id = last["point"].as_u64().unwrap();
    assert_eq!(
        d.restored_digest(DOM, "vda", id),
        rewind_tests::disk::digest(&raw),
        "the last point is the guest's disk"
    );
    assert_eq!(checkpoints(&lv, DOM).len(), 1);
}
