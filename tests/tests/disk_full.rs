//! The receiver's disk fills up during a sync: the agent gets a clear error, nothing committed
//! is damaged, and once space is freed the store takes points again (continuous mode retries by
//! itself). The data folder lives on a small loop-mounted ext4 file system made for the test.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{disk, run, wait_until, Deployment, Receiver};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

/// A small ext4 file system mounted on a folder; unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn new(image: &Path, mount: &Path, mib: u64) -> SmallFs {
        SmallFs::with_args(image, mount, mib, &[])
    }

    /// With extra `mkfs.ext4` arguments.
    fn with_args(image: &Path, mount: &Path, mib: u64, args: &[&str]) -> SmallFs {
        disk::create(image, mib * MIB);
        let ok = |c: &mut Command| {
            let o = run(c);
            assert!(
                o.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .args(args)
            .arg(image));
        std::fs::create_dir_all(mount).unwrap();
        ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(mount));
        SmallFs(mount.to_owned())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg("-l").arg(&self.0));
    }
}

/// Failed cycles of host1's agent so far, from its `status`.
fn cycles_failed(d: &Deployment) -> u64 {
    let o = run(Command::new(rewind_tests::bin("rewind-agent"))
        .args(["status", "--json", "--state"])
        .arg(d.path("state-host1")));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["vm"] == "full")
        .and_then(|v| v["cycles_failed"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_full_receiver_disk_fails_cleanly_and_recovers() {
    let d = Deployment::new();
    let fs = SmallFs::new(&d.path("fs.img"), &d.path("mnt"), 160);
    let data = fs.0.join("data");
    let rx = Receiver::start(&data, &d.pki());
    let vda = d.path("vda.raw");
    disk::create(&vda, 256 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 160, &mut rand::rng()); // 10 MiB
    let mut agent_cmd = d.sync_cmd(&rx, "host1", "full", &[("vda", &vda)], &[]);
    let first = run(&mut agent_cmd);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let first_digest = disk::digest(&vda);

    // Leave about 30 MiB free, then try to send 100 MiB of new data.
    let filler = fs.0.join("filler");
    let free = rustix::fs::statvfs(&fs.0).unwrap();
    let avail = free.f_bavail * free.f_frsize;
    disk::create(&filler, 0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, avail - 30 * MIB).unwrap();
    drop(f);
    disk::random_blocks(&vda, BLOCK, 400, 1600, &mut rand::rng());
    let out = run(&mut d.sync_cmd(&rx, "host1", "full", &[("vda", &vda)], &[]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("receiver storage is full"), "{err}");
    // Nothing committed is damaged, and no partial point is listed.
    let points = run(Command::new(rewind_tests::bin("rewind-receiver"))
        .args(["points", "--json", "--data"])
        .arg(&data));
    let points: serde_json::Value = serde_json::from_slice(&points.stdout).unwrap();
    assert_eq!(points.as_array().unwrap().len(), 1);
    let first = points[0]["id"].as_u64().unwrap().to_string();
    let restored = d.path("p1.raw");
    let o = run(Command::new(rewind_tests::bin("rewind-receiver"))
        .args([
            "restore", "--vm", "full", "--disk", "vda", "--point", &first, "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&restored));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(disk::digest(&restored), first_digest);
    std::fs::remove_file(&restored).unwrap();

    // Continuous mode keeps retrying: space is freed once one of its cycles failed too, and
    // the next cycle gets through.
    let failed_before = cycles_failed(&d);
    let mut agent = d.spawn_continuous(&rx, "full", &[("vda", &vda)], 1);
    assert!(
        wait_until(Duration::from_secs(60), || cycles_failed(&d)
            > failed_before),
        "continuous mode never tried against the full disk"
    );
    std::fs::remove_file(&filler).unwrap();
    let done = wait_until(Duration::from_secs(60), || {
        let o = run(Command::new(rewind_tests::bin("rewind-receiver"))
            .args(["points", "--json", "--data"])
            .arg(&data));
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() >= 2))
    });
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(
        done,
        "the agent never got a point through after space was freed"
    );
    let want = disk::digest(&vda);
    let o = run(Command::new(rewind_tests::bin("rewind-receiver"))
        .args(["points", "--json", "--data"])
        .arg(&data));
    let points: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let newest = points.as_array().unwrap().last().unwrap()["id"]
        .as_u64()
        .unwrap()
        .to_string();
    let o = run(Command::new(rewind_tests::bin("rewind-receiver"))
        .args([
            "restore", "--vm", "full", "--disk", "vda", "--point", &newest, "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&restored));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(disk::digest(&restored), want);
    drop(rx);
}

/// A restore onto a file system too small for the image fails with the file system's error,
/// promptly (its writer threads stopping must stop the decoder, not leave it waiting), and
/// leaves neither the image nor its partial file behind.
#[test]
fn a_restore_onto_a_full_disk_fails_cleanly() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("big.raw");
    disk::create(&vda, 64 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 1024, &mut rand::rng()); // 64 MiB, incompressible
    let p = d.sync_ok(&rx, "host1", "big", &[("vda", &vda)])["point"]
        .as_u64()
        .unwrap();
    let fs = SmallFs::new(&d.path("small.img"), &d.path("small"), 16);
    let out = fs.0.join("restored.raw");
    let mut child = Command::new(rewind_tests::bin("rewind-receiver"))
        .args(["restore", "--vm", "big", "--disk", "vda", "--point"])
        .arg(p.to_string())
        .arg("--data")
        .arg(d.data())
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let finished = wait_until(Duration::from_secs(60), || {
        child.try_wait().unwrap().is_some()
    });
    if !finished {
        child.kill().unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(finished, "the restore hung on a full disk");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!out.exists());
    assert!(!fs.0.join(".restored.raw.rewind-partial").exists());
}

/// Fills a file system: a file of zeros written until the file system refuses more.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

/// The agent's state folder fills up: the cycle fails with a clear error, nothing committed is
/// damaged, and once space is freed the next cycle is correct.
#[test]
fn a_full_agent_state_folder_fails_cleanly_and_recovers() {
    let d = Deployment::new();
    let rx = d.serve();
    // 4 KiB blocks, as on any real host: with blocks smaller than a memory page (mkfs's default
    // for tiny file systems), SQLite's shared-memory file cannot be given its pages up front,
    // and a write to it on a full file system kills the process with SIGBUS.
    let fs = SmallFs::with_args(&d.path("state.img"), &d.path("statefs"), 8, &["-b", "4096"]);
    let state = fs.0.join("state");
    std::fs::create_dir_all(&state).unwrap();
    // The agent's state folder (state-host1) lives on the small file system.
    std::os::unix::fs::symlink(&state, d.path("state-host1")).unwrap();
    let vda = d.path("vda.raw");
    disk::create(&vda, 256 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 64, &mut rand::rng());
    let first = d.sync_ok(&rx, "host1", "st", &[("vda", &vda)]);
    let first_digest = disk::digest(&vda);

    fill(&fs.0.join("filler"));
    // Many changed blocks: the scan's pending leaves need room the state no longer has.
    disk::random_blocks(&vda, BLOCK, 1000, 3000, &mut rand::rng());
    let out = d.sync(&rx, "host1", "st", &[("vda", &vda)], &[]);
    assert!(
        !out.status.success(),
        "a sync with a full state folder succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent state") && err.contains("full"),
        "{:?} stdout {} stderr {err}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    // The first point is intact.
    let p1 = first["point"].as_u64().unwrap();
    assert_eq!(d.restored_digest("st", "vda", p1), first_digest);

    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let next = d.sync_ok(&rx, "host1", "st", &[("vda", &vda)]);
    let p = next["point"].as_u64().unwrap();
    assert_eq!(d.restored_digest("st", "vda", p), disk::digest(&vda));
    // And the one after it is a correct delta again.
    disk::random_blocks(&vda, BLOCK, 10, 5, &mut rand::rng());
    let last = d.sync_ok(&rx, "host1", "st", &[("vda", &vda)]);
    assert_eq!(
        d.restored_digest("st", "vda", last["point"].as_u64().unwrap()),
        disk::digest(&vda)
    );
}
