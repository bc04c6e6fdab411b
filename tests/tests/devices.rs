//! Block devices as disks (a loop device over an image, as LVM volumes would be), and the
//! continuous mode that takes a point every interval.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{disk, disk_of, run, wait_until, Deployment};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;

/// A loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(image: &Path) -> Loop {
        let out = run(Command::new("losetup").args(["-f", "--show"]).arg(image));
        assert!(
            out.status.success(),
            "losetup failed (tests run as root on a kernel with loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run(Command::new("losetup").arg("-d").arg(&self.0));
    }
}

#[test]
fn block_device_disk_replicates_and_restores() {
    let d = Deployment::new();
    let rx = d.serve();
    let image = d.path("lv.img");
    disk::create(&image, 32 * 1024 * 1024);
    disk::random_blocks(&image, BLOCK, 5, 30, &mut rand::rng());
    let dev = Loop::attach(&image);
    let r = d.sync_ok(&rx, "host1", "db1", &[("vdb", &dev.0)]);
    assert_eq!(disk_of(&r, "vdb")["size"], 32 * 1024 * 1024);
    assert_eq!(disk_of(&r, "vdb")["changed_blocks"], 30);

    let written = disk::scatter_writes(&dev.0, BLOCK, 512, 9, 4);
    let r2 = d.sync_ok(&rx, "host1", "db1", &[("vdb", &dev.0)]);
    assert_eq!(disk_of(&r2, "vdb")["changed_blocks"], written.len() as u64);
    assert_eq!(
        d.restored_digest("db1", "vdb", r2["point"].as_u64().unwrap()),
        disk::digest(&image)
    );
}

#[test]
fn continuous_mode_takes_a_point_every_interval() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 4 * 1024 * 1024);
    disk::random_blocks(&vda, BLOCK, 0, 4, &mut rand::rng());
    let mut agent = d.spawn_continuous(&rx, "web1", &[("vda", &vda)], 1);
    assert!(wait_until(Duration::from_secs(30), || {
        d.try_points("web1").is_ok_and(|p| p.len() >= 2)
    }));
    disk::random_blocks(&vda, BLOCK, 20, 3, &mut rand::rng());
    let want = disk::digest(&vda);
    let mut newest = 0;
    assert!(wait_until(Duration::from_secs(30), || {
        let points = d.points("web1");
        newest = points.last().unwrap()["id"].as_u64().unwrap();
        points.iter().any(|p| p["disks"][0]["changed_blocks"] == 3)
    }));
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert_eq!(d.restored_digest("web1", "vda", newest), want);
}
