//! A full fleecing folder (the folder that holds the copy-before-write images while a live point
//! is read) never reaches the guest: with one disk (or frozen file systems) the agent's own
//! filter breaks the point instead of the guest's write; with several disks captured at one
//! instant, the capture is refused before it touches the guest. Either way the point fails
//! cleanly, nothing is left in the VM, and the next point is correct.
//!
//! The small folder is a `tmpfs` mounted over the agent's fleecing folder (root only).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::qemu::{Model, Monitor, Vm};
use rewind_tests::{wait_until, Deployment};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A tmpfs of `size` mounted at `dir` until dropped.
struct SmallFolder(PathBuf);

impl SmallFolder {
    fn mount(dir: &Path, size: &str) -> SmallFolder {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFolder(dir.to_owned())
    }
}

impl Drop for SmallFolder {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The agent's fleecing folder for VM `vm` (`STATE/live/VM`).
fn fleecing_folder(d: &Deployment, vm: &str) -> PathBuf {
    d.path("state-host1").join("live").join(vm)
}

/// The guest is running normally as far as QEMU's block layer goes: not stopped by an I/O error
/// (the VM was started with `-S`, so its status stays `prelaunch`), and no device saw an error.
fn assert_guest_unharmed(m: &mut Monitor) {
    let status = m.execute("query-status", json!({})).unwrap();
    assert_eq!(status["status"], "prelaunch", "{status}");
    let blocks = m.execute("query-block", json!({})).unwrap();
    for b in blocks.as_array().unwrap() {
        assert_eq!(b["io-status"], "ok", "{b}");
    }
}

/// Whether process `pid` is stopped (state `T` in /proc/PID/stat).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state == "T")
}

fn restored_equals(d: &Deployment, vm: &str, point: u64, disk: &str, model: &Model) {
    let want = model.digest(&d.path(&format!("expected-{disk}.raw")));
    assert_eq!(
        d.restored_digest(vm, disk, point),
        want,
        "{disk} of point {point}"
    );
}

#[test]
fn a_full_fleecing_folder_breaks_the_point_never_the_guest() {
    if !root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let d = Deployment::new();
    let rx = d.serve();
    let mut vm = Vm::create(d.dir.path(), &[32 * MIB]);
    let mut a = Model::new(32 * MIB);
    vm.monitor.write("drive0", 0x51, 0, 24 * MIB);
    a.write(0, 24 * MIB, 0x51);
    let seed = d.sync_live_ok(&rx, "fl", &vm.agent_qmp())["point"]
        .as_u64()
        .unwrap();
    vm.monitor.write("drive0", 0x52, 30 * MIB, MIB);
    a.write(30 * MIB, MIB, 0x52);

    // 1 MiB of room: the old data of a 16 MiB guest write cannot fit.
    let small = SmallFolder::mount(&fleecing_folder(&d, "fl"), "1m");
    let mut cmd = d.sync_cmd(&rx, "host1", "fl", &[], &[]);
    cmd.arg("--qmp")
        .arg(vm.agent_qmp())
        .env("REWIND_PAUSE", "after-export")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let agent = cmd.spawn().unwrap();
    let pid = agent.id();
    assert!(
        wait_until(Duration::from_secs(60), || stopped(pid)),
        "the agent reaches its export"
    );
    // The guest overwrites 16 MiB the point has not read yet, while the view is held.
    let started = Instant::now();
    vm.monitor.write("drive0", 0x53, 0, 16 * MIB);
    let write_time = started.elapsed();
    a.write(0, 16 * MIB, 0x53);
    assert_guest_unharmed(&mut vm.monitor);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::CONT,
    )
    .unwrap();
    let out = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the broken point fails: {stderr}");
    assert!(
        stderr.contains("the fleecing folder is full"),
        "the agent says why: {stderr}"
    );
    eprintln!(
        "guest wrote 16 MiB in {:.0} ms over a full 1 MiB fleecing folder; agent: {}",
        write_time.as_secs_f64() * 1000.0,
        stderr.lines().last().unwrap_or("")
    );
    assert!(
        vm.monitor.leftovers().is_empty(),
        "{:?}",
        vm.monitor.leftovers()
    );
    assert_guest_unharmed(&mut vm.monitor);
    assert_eq!(d.points("fl").len(), 1, "no point for the broken capture");

    // With room again, the next point holds every write, before and during the broken one.
    drop(small);
    let r = d.sync_live_ok(&rx, "fl", &vm.agent_qmp());
    let p = r["point"].as_u64().unwrap();
    restored_equals(&d, "fl", p, "vda", &a);
    restored_equals(&d, "fl", seed, "vda", &{
        let mut m = Model::new(32 * MIB);
        m.write(0, 24 * MIB, 0x51);
        m
    });
    assert_eq!(d.points("fl").len(), 2);
}

#[test]
fn one_instant_across_disks_is_refused_before_the_guest_when_the_folder_is_small() {
    if !root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let d = Deployment::new();
    let rx = d.serve();
    let mut vm = Vm::create(d.dir.path(), &[16 * MIB, 16 * MIB]);
    let mut a = Model::new(16 * MIB);
    let mut b = Model::new(16 * MIB);
    vm.monitor.write("drive0", 0x61, 0, 8 * MIB);
    a.write(0, 8 * MIB, 0x61);
    vm.monitor.write("drive1", 0x62, 0, 8 * MIB);
    b.write(0, 8 * MIB, 0x62);
    d.sync_live_ok(&rx, "two", &vm.agent_qmp());
    vm.monitor.write("drive1", 0x63, MIB, MIB);
    b.write(MIB, MIB, 0x63);
    let bitmaps = (vm.monitor.bitmaps("drive0"), vm.monitor.bitmaps("drive1"));

    let small = SmallFolder::mount(&fleecing_folder(&d, "two"), "4m");
    let out = d.sync_live(&rx, "two", &vm.agent_qmp(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("fleecing folder") && stderr.contains("MiB free"),
        "{stderr}"
    );
    assert!(
        vm.monitor.leftovers().is_empty(),
        "{:?}",
        vm.monitor.leftovers()
    );
    assert_eq!(
        (vm.monitor.bitmaps("drive0"), vm.monitor.bitmaps("drive1")),
        bitmaps,
        "the guest was not touched"
    );
    assert_guest_unharmed(&mut vm.monitor);

    drop(small);
    let r = d.sync_live_ok(&rx, "two", &vm.agent_qmp());
    let p = r["point"].as_u64().unwrap();
    restored_equals(&d, "two", p, "vda", &a);
    restored_equals(&d, "two", p, "vdb", &b);
}
