//! Rollback moves only the blocks that differ, leaves the disk equal to the point (root
//! verified), works backwards and forwards, for raw files and qcow2 images, and refuses disks in
//! use, other agents' VMs and points that do not exist.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::qemu::Vm;
use rewind_tests::{disk, run, Deployment, Receiver};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

fn rollback(
    d: &Deployment,
    rx: &Receiver,
    agent: &str,
    vm: &str,
    point: u64,
    disk: &str,
    extra: &[&str],
) -> Output {
    run(d
        .agent_cmd(rx, agent, "rollback")
        .args([
            "--json",
            "--vm",
            vm,
            "--point",
            &point.to_string(),
            "--disk",
            disk,
        ])
        .args(extra))
}

fn ok(o: Output) -> Value {
    assert!(
        o.status.success(),
        "rollback failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn raw_disk_rolls_back_and_forward_moving_only_differences() {
    let d = Deployment::new();
    let rx = d.serve();
    let vda = d.path("vda.raw");
    disk::create(&vda, 64 * MIB);
    disk::random_blocks(&vda, BLOCK, 0, 256, &mut rand::rng());
    let p1 = d.sync_ok(&rx, "host1", "rb", &[("vda", &vda)])["point"]
        .as_u64()
        .unwrap();
    let first = disk::digest(&vda);
    let s1 = disk::scatter_writes(&vda, BLOCK, 1024, 10, 1);
    let p2 = d.sync_ok(&rx, "host1", "rb", &[("vda", &vda)])["point"]
        .as_u64()
        .unwrap();
    let second = disk::digest(&vda);
    // 1% of the disk written since point 2 (one block of it zeroed).
    let mut s2 = disk::scatter_writes(&vda, BLOCK, 1024, 10, 2);
    disk::write_at(&vda, 5 * BLOCK, &vec![0u8; BLOCK as usize]);
    s2.insert(5);
    let spec = format!("vda={}", vda.display());

    let dry = ok(rollback(&d, &rx, "host1", "rb", p2, &spec, &["--dry-run"]));
    assert_eq!(dry["disks"][0]["blocks_differing"], s2.len() as u64);
    assert_eq!(dry["disks"][0]["bytes_written"], 0);
    assert_ne!(disk::digest(&vda), second, "a dry run changes nothing");

    let r = ok(rollback(&d, &rx, "host1", "rb", p2, &spec, &[]));
    let disk0 = &r["disks"][0];
    assert_eq!(disk0["blocks_differing"], s2.len() as u64);
    assert_eq!(disk0["verified"], true);
    // Random blocks do not compress: ~64 KiB fetched for each block whose data came back.
    let fetched = disk0["bytes_fetched"].as_u64().unwrap();
    let with_data = s2.iter().filter(|&&b| b < 256 || s1.contains(&b)).count() as u64;
    assert!(
        fetched >= with_data * BLOCK && fetched < (with_data + 1) * BLOCK,
        "fetched {fetched}"
    );
    assert!(fetched < 64 * MIB / 50, "about 1% of the disk moved");
    assert_eq!(disk::digest(&vda), second);

    let back = ok(rollback(&d, &rx, "host1", "rb", p1, &spec, &[]));
    assert_eq!(back["disks"][0]["blocks_differing"], s1.len() as u64);
    assert_eq!(disk::digest(&vda), first);
    let fwd = ok(rollback(&d, &rx, "host1", "rb", p2, &spec, &[]));
    assert_eq!(fwd["disks"][0]["blocks_differing"], s1.len() as u64);
    assert_eq!(disk::digest(&vda), second);
    assert_eq!(
        d.points("rb").len(),
        2,
        "rollback never deletes or adds points"
    );

    // Refusals: another agent's VM (refused as if it did not exist), a point that does not
    // exist.
    let o = rollback(&d, &rx, "host2", "rb", p2, &spec, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no VM named \"rb\""));
    let o = rollback(&d, &rx, "host1", "rb", 99, &spec, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no point 99"));
    assert_eq!(disk::digest(&vda), second, "refusals change nothing");
}

fn sh(args: &[&str]) {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 16 MiB qcow2 image with 2 MiB written, its first point (synced as VM `q` of `host1`, which
/// gives the image the agent's dirty bitmap) and that point restored to `want.raw`: (image
/// path, `qcow2:` disk spec, point, restored file).
fn qcow2_point(d: &Deployment, rx: &Receiver) -> (String, String, u64, std::path::PathBuf) {
    let p = d.path("img.qcow2").display().to_string();
    sh(&["qemu-img", "create", "-q", "-f", "qcow2", &p, "16M"]);
    sh(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 2M", &p]);
    let spec = format!("qcow2:{p}");
    let r = d.sync_ok(rx, "host1", "q", &[("vda", Path::new(&spec))]);
    let point = r["point"].as_u64().unwrap();
    let want = d.path("want.raw");
    assert!(d
        .restore("q", "vda", &["--point", &point.to_string()], &want)
        .status
        .success());
    (p, spec, point, want)
}

/// Fails unless the qcow2 image `img` holds exactly the raw image `want`.
fn same_content(want: &Path, img: &str) {
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(want)
        .arg(img));
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn qcow2_rolls_back_through_qemu_nbd_and_a_running_vm_is_refused() {
    let d = Deployment::new();
    let rx = d.serve();
    let (p, spec, point, want) = qcow2_point(&d, &rx);
    let img = Path::new(&p);
    sh(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 1M 128k", &p]);
    sh(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x43 8M 64k", &p]);
    let r = ok(rollback(
        &d,
        &rx,
        "host1",
        "q",
        point,
        &format!("vda=qcow2:{p}"),
        &[],
    ));
    assert_eq!(r["disks"][0]["blocks_differing"], 3);
    assert_eq!(r["disks"][0]["verified"], true);
    // The image's bitmap and the agent's last point say which blocks can differ: only those
    // are read (and the three written ones re-read to verify).
    assert_eq!(r["disks"][0]["compared"], "dirty bitmap + point chain");
    assert_eq!(r["disks"][0]["bytes_read"], 6 * BLOCK);
    same_content(&want, &p);
    // The writable export was closed cleanly: the bitmap is not left in-use (inconsistent),
    // so the next cycle still reads only what changed: the 3 blocks the rollback rewrote, of
    // which the one at 8 MiB is zero again and known so from the allocation map, not read.
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(img));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let flags = info["format-specific"]["data"]["bitmaps"][0]["flags"].clone();
    assert_eq!(flags, serde_json::json!(["auto"]), "{info}");
    let next = d.sync_ok(&rx, "host1", "q", &[("vda", Path::new(&spec))]);
    assert_eq!(next["disks"][0]["source"], "dirty-bitmap", "{next}");
    assert_eq!(next["disks"][0]["read_bytes"], 2 * BLOCK, "{next}");
    assert_eq!(next["disks"][0]["changed_blocks"], 0, "{next}");

    // A disk a running QEMU holds is refused, untouched.
    let mut vm = Vm::create(&d.path(""), &[16 * MIB]);
    vm.monitor.write("drive0", 0x44, 0, BLOCK);
    let held = vm.disks[0].path.display().to_string();
    let o = rollback(
        &d,
        &rx,
        "host1",
        "q",
        point,
        &format!("vda=qcow2:{held}"),
        &[],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by a running VM"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(vm);
}

#[test]
fn qcow2_rolls_back_to_an_older_point_through_bitmap_and_point_chain() {
    let d = Deployment::new();
    let rx = d.serve();
    let (p, spec, first, want) = qcow2_point(&d, &rx);
    // A later point changes block 64 (zero in the first point) ...
    sh(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 4M 64k", &p]);
    let second = d.sync_ok(&rx, "host1", "q", &[("vda", Path::new(&spec))]);
    assert_eq!(second["disks"][0]["changed_blocks"], 1, "{second}");
    // ... and block 16 is written after it (dirty in the image's bitmap).
    sh(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x43 1M 64k", &p]);
    let r = ok(rollback(
        &d,
        &rx,
        "host1",
        "q",
        first,
        &format!("vda=qcow2:{p}"),
        &[],
    ));
    // Candidates: the dirty block and the block the two points differ in; both differ.
    assert_eq!(
        r["disks"][0]["compared"], "dirty bitmap + point chain",
        "{r}"
    );
    assert_eq!(r["disks"][0]["blocks_differing"], 2, "{r}");
    assert_eq!(r["disks"][0]["bytes_read"], 4 * BLOCK, "{r}");
    assert_eq!(r["disks"][0]["verified"], true, "{r}");
    same_content(&want, &p);
}
