//! A chain that heals itself: one VM's chain of points, against a real Debian guest, through
//! every event that can cut QEMU's change tracking: a clean restart, a killed QEMU, a live
//! migration, an online resize, a disk hot-added and removed, the disk replaced by an older copy
//! of itself and by a restore of an older point, and the guest trimming its file system.
//!
//! Every point is checked bit-exact: the guest is paused (QMP `stop`), the cycle runs, and the
//! restored point must equal the disk as `qemu-img convert -U` reads it, before the guest goes on
//! (`cont`). Each case also states what it must read and send: only dirty blocks where QEMU
//! kept the bitmap, a full read that sends only the chunks the receiver lacks where it did not.
//! One guest walks through all cases in order (four boots in all: a boot under TCG takes a
//! minute), so a failure names its case.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::guest::{self, Accel, BootOptions, Guest};
use rewind_tests::qemu::VmDisk;
use rewind_tests::{disk, disk_of, run, Deployment, Receiver};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const VM: &str = "chain";
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;
/// The guest image's disk.
const DISK_SIZE: u64 = 2 << 30;
/// Bounds on waits for the guest: a boot under TCG on a loaded 2-core host can take minutes.
const BOOT: Duration = Duration::from_secs(600);
const GUEST_SEES: Duration = Duration::from_secs(180);
/// What a boot (journal replay, logs, systemd's state) may write to the disk: every case that
/// boots allows this much more than its own writes.
const BOOT_WRITES: u64 = 64 * MIB;

struct Chain {
    d: Deployment,
    rx: Receiver,
    accel: Accel,
    /// One line per point: the measured results, printed at the end.
    results: Vec<String>,
    /// The points in order, to check that each is based on the one before.
    points: Vec<u64>,
}

impl Chain {
    /// Starts QEMU on `disk` in `dir` and, unless paused, waits for the guest to be ready.
    fn start(&self, case: &str, dir: &Path, disk: VmDisk, opts: BootOptions) -> Guest {
        let mut g = Guest::start(dir, disk, self.accel, &opts)
            .unwrap_or_else(|e| panic!("{case}: starting QEMU: {e:#}"));
        if !opts.paused && opts.incoming.is_none() {
            let t = g
                .wait_ready(BOOT)
                .unwrap_or_else(|e| panic!("{case}: the guest did not boot: {e:#}"));
            eprintln!("{case}: guest ready in {:.1} s", t.as_secs_f64());
        }
        g
    }

    /// One point of the chain, checked bit-exact against the paused disks; returns the report.
    fn point(&mut self, g: &mut Guest, case: &str, disks: &[(&str, &Path)]) -> Value {
        let running = g.monitor.execute("query-status", json!({})).unwrap()["running"] == true;
        if running {
            g.monitor.execute("stop", json!({})).unwrap();
        }
        let t = Instant::now();
        let out = self.d.sync_live(&self.rx, VM, &g.agent_qmp(), &[]);
        let wall = t.elapsed();
        assert!(
            out.status.success(),
            "{case}: the cycle failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).expect("sync --json prints JSON");
        let p = r["point"].as_u64().unwrap();
        for (name, path) in disks {
            let live = live_digest(&self.d, path);
            assert_eq!(
                self.d.restored_digest(VM, name, p),
                live,
                "{case}: disk {name} of point {p} differs from the paused disk"
            );
        }
        let names: Vec<&str> = r["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        let want: Vec<&str> = disks.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, want, "{case}: the point's disks");
        assert!(
            g.monitor.leftovers().is_empty(),
            "{case}: the cycle left {:?} in QEMU",
            g.monitor.leftovers()
        );
        if let Some(&prev) = self.points.last() {
            assert_eq!(
                r["base_point"], prev,
                "{case}: point {p} is not based on {prev}"
            );
        }
        self.points.push(p);
        if running {
            g.monitor.execute("cont", json!({})).unwrap();
        }
        for x in r["disks"].as_array().unwrap() {
            let line = format!(
                "{case}: point {p} {}: size {} source {:?} changed {} blocks, read {:.1} MiB, \
                 sent {:.1} MiB in {} chunks; cycle {:.1} s (process {:.1} s)",
                x["name"].as_str().unwrap(),
                x["size"],
                x["source"].as_str().unwrap(),
                x["changed_blocks"],
                mib(&x["read_bytes"]),
                mib(&x["sent_bytes"]),
                x["sent_chunks"],
                r["seconds"].as_f64().unwrap(),
                wall.as_secs_f64()
            );
            eprintln!("{line}");
            self.results.push(line);
        }
        r
    }
}

fn mib(v: &Value) -> f64 {
    v.as_u64().unwrap() as f64 / MIB as f64
}

fn source(r: &Value, disk: &str) -> String {
    disk_of(r, disk)["source"].as_str().unwrap().to_owned()
}

fn bytes(r: &Value, disk: &str, key: &str) -> u64 {
    disk_of(r, disk)[key].as_u64().unwrap()
}

/// The content digest of a qcow2 disk in use, read as `qemu-img convert -U` (force-share) sees it.
fn live_digest(d: &Deployment, path: &Path) -> disk::Digest {
    let raw = d.path("live.raw");
    let _ = std::fs::remove_file(&raw);
    sh_host(&[
        "qemu-img",
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let digest = disk::digest(&raw);
    std::fs::remove_file(&raw).unwrap();
    digest
}

fn sh_host(args: &[&str]) -> String {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell script in the guest; returns its output.
fn sh(g: &mut Guest, case: &str, script: &str) -> String {
    let out = g
        .exec(&["sh", "-c", script])
        .unwrap_or_else(|e| panic!("{case}: guest {script:?}: {e:#}"));
    assert!(out.success(), "{case}: guest {script:?}: {out:?}");
    out.stdout
}

/// Writes `mib` MiB of random data (no compression or dedup can hide it) to a guest file and
/// makes it durable.
fn write_file(g: &mut Guest, case: &str, path: &str, mib: u64) {
    sh(
        g,
        case,
        &format!("dd if=/dev/urandom of={path} bs=1M count={mib} conv=fsync status=none && sync"),
    );
}

/// Waits until the guest sees `dev` with `size` bytes (after a resize or a hot-add).
fn wait_guest_size(g: &mut Guest, case: &str, dev: &str, size: u64) {
    let deadline = Instant::now() + GUEST_SEES;
    loop {
        let out = g
            .exec(&[
                "sh",
                "-c",
                &format!("blockdev --getsize64 {dev} 2>/dev/null"),
            ])
            .unwrap();
        if out.stdout.trim() == size.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: the guest does not see {dev} with {size} bytes after {GUEST_SEES:?} ({:?})",
            out.stdout.trim()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether QEMU still lists a block device under the guest device `id`.
fn has_device(g: &mut Guest, id: &str) -> bool {
    let v = g.monitor.execute("query-block", json!({})).unwrap();
    let prefix = format!("/machine/peripheral/{id}/");
    v.as_array()
        .unwrap()
        .iter()
        .any(|b| b["qdev"].as_str().is_some_and(|q| q.starts_with(&prefix)))
}

#[test]
fn the_chain_of_points_stays_exact_through_restarts_migration_resize_hotplug_restore_and_trim() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut c = Chain {
        d,
        rx,
        accel: Accel::from_env(),
        results: Vec::new(),
        points: Vec::new(),
    };
    let image = guest::image().unwrap();
    let gdir = c.d.path("guest");
    std::fs::create_dir_all(&gdir).unwrap();
    let with_discard = || BootOptions {
        discard: true,
        ..BootOptions::default()
    };
    let mut g = Guest::boot_with(&gdir, &image, "qcow2", c.accel, &with_discard()).unwrap();
    let t = g.wait_ready(BOOT).unwrap();
    eprintln!("first boot: guest ready in {:.1} s", t.as_secs_f64());
    let vda = g.disk.path.clone();

    let r = c.point(&mut g, "first point", &[("vda", &vda)]);
    assert!(source(&r, "vda").starts_with("full-read"), "{r}");

    // 7. The guest trims its file system: the dirty bitmap has every discarded range, the
    // trimmed blocks read as whatever QEMU returns for them, and the restore equals the disk.
    let case = "7 fstrim";
    write_file(&mut g, case, "/root/trim-me", 32);
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert_eq!(source(&r, "vda"), "dirty-bitmap", "{case}: {r}");
    assert!(
        bytes(&r, "vda", "sent_bytes") >= 32 * MIB,
        "{case}: the random file is sent: {r}"
    );
    let trimmed = sh(
        &mut g,
        case,
        "rm /root/trim-me && sync && fstrim -v / && sync",
    );
    eprintln!("{case}: {}", trimmed.trim());
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert_eq!(source(&r, "vda"), "dirty-bitmap", "{case}: {r}");
    assert!(
        bytes(&r, "vda", "sent_bytes") < 8 * MIB,
        "{case}: a trim writes no new data, only file system metadata: {r}"
    );
    // The bitmap holds every trimmed range (gigabytes), but QEMU reports discarded clusters
    // of the qcow2 (v3) image as zeros: they become holes without being read.
    assert!(
        bytes(&r, "vda", "read_bytes") < 64 * MIB,
        "{case}: trimmed ranges are not read: {r}"
    );

    // 4. The disk grows online, to a size that is not a whole number of blocks; the guest
    // writes into the new area and into its partial last block.
    let case = "4 block_resize";
    let new_size = DISK_SIZE + 64 * MIB + 4096;
    g.monitor
        .execute(
            "block_resize",
            json!({"device": g.disk.drive, "size": new_size}),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    wait_guest_size(&mut g, case, "/dev/vda", new_size);
    sh(
        &mut g,
        case,
        &format!(
            "dd if=/dev/urandom of=/dev/vda bs=1M seek={} count=4 oflag=direct status=none && \
             dd if=/dev/urandom of=/dev/vda bs=4096 seek={} count=1 oflag=direct status=none && \
             sync",
            (DISK_SIZE + 8 * MIB) / MIB,
            (new_size - 4096) / 4096
        ),
    );
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert_eq!(bytes(&r, "vda", "size"), new_size, "{case}: {r}");
    let resized_point = r["point"].as_u64().unwrap();
    // QEMU resizes the bitmap with the disk, and the receiver continues a disk grown from a
    // whole number of blocks: only the writes are read.
    assert_eq!(source(&r, "vda"), "dirty-bitmap", "{case}: {r}");
    assert_eq!(disk_of(&r, "vda")["mode"], "delta", "{case}: {r}");
    assert!(
        bytes(&r, "vda", "read_bytes") < 4 * MIB + 16 * MIB,
        "{case}: only the writes are read: {r}"
    );

    // 5. A disk is hot-added, written, protected, and removed again.
    let case = "5 hot-add";
    let vdb = gdir.join("vdb.qcow2");
    sh_host(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        vdb.to_str().unwrap(),
        "64M",
    ]);
    g.monitor
        .execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "extra0",
                   "file": {"driver": "file", "filename": vdb.display().to_string()}}),
        )
        .unwrap_or_else(|e| panic!("{case}: blockdev-add: {e}"));
    g.monitor
        .execute(
            "device_add",
            json!({"driver": "virtio-blk-pci", "drive": "extra0", "id": "vdb"}),
        )
        .unwrap_or_else(|e| panic!("{case}: device_add: {e}"));
    wait_guest_size(&mut g, case, "/dev/vdb", 64 * MIB);
    sh(
        &mut g,
        case,
        "dd if=/dev/urandom of=/dev/vdb bs=1M count=8 oflag=direct status=none && sync",
    );
    let r = c.point(&mut g, case, &[("vda", &vda), ("vdb", &vdb)]);
    assert_eq!(source(&r, "vda"), "dirty-bitmap", "{case}: {r}");
    assert!(source(&r, "vdb").starts_with("full-read"), "{case}: {r}");
    assert_eq!(disk_of(&r, "vdb")["changed_blocks"], 8 * MIB / BLOCK);
    let case = "5 hot-added disk, next point";
    sh(
        &mut g,
        case,
        "dd if=/dev/urandom of=/dev/vdb bs=1M seek=32 count=1 oflag=direct status=none && sync",
    );
    let r = c.point(&mut g, case, &[("vda", &vda), ("vdb", &vdb)]);
    assert_eq!(source(&r, "vdb"), "dirty-bitmap", "{case}: {r}");
    assert_eq!(bytes(&r, "vdb", "read_bytes"), MIB, "{case}: {r}");
    let with_vdb = r["point"].as_u64().unwrap();
    let case = "5 hot-remove";
    g.monitor
        .execute("device_del", json!({"id": "vdb"}))
        .unwrap_or_else(|e| panic!("{case}: device_del: {e}"));
    let deadline = Instant::now() + GUEST_SEES;
    while has_device(&mut g, "vdb") {
        assert!(
            Instant::now() < deadline,
            "{case}: the guest did not release vdb in {GUEST_SEES:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // QEMU lets go of the device's node when the unplug completes (DEVICE_DELETED), which
    // may come after query-block stopped listing the device: the node may say "in use" until
    // then. Anything still holding it past the deadline (a node of ours) fails the test.
    loop {
        match g
            .monitor
            .execute("blockdev-del", json!({"node-name": "extra0"}))
        {
            Ok(_) => break,
            Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                let nodes = g.monitor.execute("query-named-block-nodes", json!({}));
                panic!("{case}: blockdev-del: {e}; nodes: {nodes:?}")
            }
        }
    }
    write_file(&mut g, case, "/root/after-unplug", 2);
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert_eq!(source(&r, "vda"), "dirty-bitmap", "{case}: {r}");
    let points = c.d.points(VM);
    let disks_of = |id: u64| -> Vec<String> {
        let p = points.iter().find(|p| p["id"] == id).unwrap();
        p["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(disks_of(with_vdb), ["vda", "vdb"], "{case}");
    assert_eq!(disks_of(r["point"].as_u64().unwrap()), ["vda"], "{case}");

    // 3. Live migration to a second QEMU on the same disk file (shared storage), with QEMU's
    // `dirty-bitmaps` capability; the agent then protects the VM through the destination.
    let case = "3 live migration";
    let ddir = c.d.path("guest-dst");
    std::fs::create_dir_all(&ddir).unwrap();
    let uri = format!("unix:{}", ddir.join("migrate.sock").display());
    let mut dst = c.start(
        case,
        &ddir,
        g.disk.clone(),
        BootOptions {
            incoming: Some(uri.clone()),
            ..with_discard()
        },
    );
    let took = g
        .migrate_to(&mut dst, &uri, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
    eprintln!("{case}: migrated in {:.1} s", took.as_secs_f64());
    drop(g);
    let mut g = dst;
    write_file(&mut g, case, "/root/after-migration", 4);
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    if source(&r, "vda") == "dirty-bitmap" {
        assert!(
            bytes(&r, "vda", "read_bytes") < 4 * MIB + 16 * MIB,
            "{case}: only the writes since the last point are read: {r}"
        );
    } else {
        eprintln!(
            "{case}: QEMU did not carry the dirty bitmap ({}): a deduplicated full read",
            source(&r, "vda")
        );
        assert!(
            bytes(&r, "vda", "sent_bytes") < 4 * MIB + 16 * MIB,
            "{case}: {r}"
        );
    }

    // 1. A clean restart: QEMU stores the persistent bitmap when it closes the image.
    let case = "1 clean restart";
    g.shutdown(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
    let disk = g.disk.clone();
    drop(g);
    // A copy of the disk as it is now, with its bitmap, for case 6.
    let stale = c.d.path("stale-copy.qcow2");
    std::fs::copy(&vda, &stale).unwrap();
    let mut g = c.start(case, &gdir, disk, with_discard());
    write_file(&mut g, case, "/root/after-restart", 4);
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert_eq!(source(&r, "vda"), "dirty-bitmap", "{case}: {r}");
    assert!(
        bytes(&r, "vda", "read_bytes") < 4 * MIB + BOOT_WRITES,
        "{case}: only the writes since the last point (the test's and the boot's): {r}"
    );

    // 2. QEMU killed: the bitmap created at run time is lost with it (or comes back
    // inconsistent); the next point reads everything and sends only what the receiver lacks.
    let case = "2 QEMU killed";
    write_file(&mut g, case, "/root/before-kill", 4);
    let disk = g.kill9();
    let mut g = c.start(case, &gdir, disk, with_discard());
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert!(source(&r, "vda").starts_with("full-read"), "{case}: {r}");
    let (read, sent) = (
        bytes(&r, "vda", "read_bytes"),
        bytes(&r, "vda", "sent_bytes"),
    );
    assert!(
        sent < 4 * MIB + BOOT_WRITES && sent * 4 < read,
        "{case}: only the writes since the last point (the test's, the journal replay's and \
         the boot's) are unknown to the receiver: {r}"
    );

    // 6a. The disk replaced by an older copy of its file, which carries a Rewind bitmap that is
    // consistent but stale: it records writes since an older point, not since the last one.
    // QEMU starts paused on it (no boot is needed to read it).
    let case = "6a disk replaced by an older copy with a stale bitmap";
    g.shutdown(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
    let disk = g.disk.clone();
    drop(g);
    std::fs::rename(&stale, &vda).unwrap();
    let mut g = c.start(
        case,
        &gdir,
        disk.clone(),
        BootOptions {
            paused: true,
            ..with_discard()
        },
    );
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert!(
        source(&r, "vda").contains("do not continue the last point"),
        "{case}: a stale bitmap was trusted: {r}"
    );
    let (read, sent) = (
        bytes(&r, "vda", "read_bytes"),
        bytes(&r, "vda", "sent_bytes"),
    );
    assert!(
        sent < BOOT_WRITES && sent * 4 < read,
        "{case}: the older copy's blocks are known to the receiver, except what its shutdown \
         wrote: {r}"
    );
    drop(g);

    // 6. The VM replaced by a restore of an older point into its disk, booted and protected
    // again: no bitmap of the old disk may be trusted, and the restored content is known to
    // the receiver, so only what the boot wrote is sent.
    let case = "6 restore of an older point";
    let out = c.d.restore(
        VM,
        "vda",
        &[
            "--point",
            &resized_point.to_string(),
            "--format",
            "qcow2",
            "--force",
        ],
        &vda,
    );
    assert!(
        out.status.success(),
        "{case}: restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut g = c.start(case, &gdir, disk, with_discard());
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert!(source(&r, "vda").starts_with("full-read"), "{case}: {r}");
    let (read, sent) = (
        bytes(&r, "vda", "read_bytes"),
        bytes(&r, "vda", "sent_bytes"),
    );
    assert!(
        sent < BOOT_WRITES && sent * 4 < read,
        "{case}: only what the boot wrote is unknown to the receiver: {r}"
    );
    let case = "6 restored VM, next point";
    write_file(&mut g, case, "/root/after-restore", 2);
    let r = c.point(&mut g, case, &[("vda", &vda)]);
    assert_eq!(source(&r, "vda"), "dirty-bitmap", "{case}: {r}");

    eprintln!("\nchain summary:");
    for line in &c.results {
        eprintln!("  {line}");
    }
}
