//! Restores as raw, qcow2, vmdk and vhdx images (identical content per `qemu-img compare`),
//! `--all` with a configuration that boots the restored disks, and the read-only NBD export
//! (several clients at once, a writable qcow2 overlay that leaves the store untouched).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::qemu::{Model, Monitor, Vm};
use rewind_tests::{bin, disk, run, Deployment};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

fn compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b));
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_format_restores_identical_content() {
    let d = Deployment::new();
    let rx = d.serve();
    let src = d.path("src.raw");
    disk::mixed(&src, 48 * MIB + 4096, 5);
    let r = d.sync_ok(&rx, "host1", "fmt", &[("vda", &src)]);
    let point = r["point"].to_string();
    let raw = d.path("r.raw");
    assert!(d
        .restore("fmt", "vda", &["--point", &point], &raw)
        .status
        .success());
    assert_eq!(disk::digest(&raw), disk::digest(&src));
    for fmt in ["qcow2", "vmdk", "vhdx"] {
        let out = d.path(&format!("r.{fmt}"));
        let o = d.restore("fmt", "vda", &["--point", &point, "--format", fmt], &out);
        assert!(
            o.status.success(),
            "{fmt}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        compare(&raw, "raw", &out, fmt);
        compare(&src, "raw", &out, fmt);
    }
    let o = d.restore(
        "fmt",
        "vda",
        &["--point", &point, "--format", "iso"],
        &d.path("x"),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown format"));
}

#[test]
fn restore_all_writes_every_disk_and_a_bootable_configuration() {
    let d = Deployment::new();
    let rx = d.serve();
    let mut vm = Vm::create(d.dir.path(), &[32 * MIB, 16 * MIB]);
    let (mut a, mut b) = (Model::new(32 * MIB), Model::new(16 * MIB));
    vm.monitor.write("drive0", 0x31, MIB, 3 * BLOCK);
    a.write(MIB, 3 * BLOCK, 0x31);
    vm.monitor.write("drive1", 0x32, 0, BLOCK);
    b.write(0, BLOCK, 0x32);
    let r = d.sync_live_ok(&rx, "cfg", &vm.agent_qmp());
    drop(vm);
    let out_dir = d.path("restored");
    let o = run(Command::new(bin("rewind-receiver"))
        .args([
            "restore",
            "--all",
            "--format",
            "qcow2",
            "--vm",
            "cfg",
            "--point",
            &r["point"].to_string(),
            "--data",
        ])
        .arg(d.data())
        .arg("--out-dir")
        .arg(&out_dir));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = std::fs::read_to_string(out_dir.join("run-qemu.sh")).unwrap();
    for (disk, model) in [("vda", &a), ("vdb", &b)] {
        let file = format!("{disk}.qcow2");
        assert!(script.contains(&format!("file={file}")), "{script}");
        let expected = d.path(&format!("exp-{disk}.raw"));
        disk::create(&expected, model.size);
        for &(off, len, p) in &model.writes {
            disk::write_at(&expected, off, &vec![p; len as usize]);
        }
        compare(&expected, "raw", &out_dir.join(&file), "qcow2");
    }
    let point: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("point.json")).unwrap())
            .unwrap();
    assert_eq!(point["config"]["name"], "testvm");

    // The script starts QEMU with every restored disk attached.
    let pid = out_dir.join("q.pid");
    let qmp = out_dir.join("q.qmp");
    let o = run(Command::new("sh")
        .arg(out_dir.join("run-qemu.sh"))
        .args(["-S", "-display", "none", "-daemonize", "-pidfile"])
        .arg(&pid)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display())));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut m = Monitor::connect(&qmp);
    // Isolated: no network device at all (QEMU's default is an e1000 on user networking).
    let pci = m.execute("query-pci", serde_json::json!({})).unwrap();
    let classes: Vec<u64> = pci
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|bus| bus["devices"].as_array().unwrap().clone())
        .map(|dev| dev["class_info"]["class"].as_u64().unwrap())
        .collect();
    assert!(
        !classes.iter().any(|c| c >> 8 == 0x02),
        "a network controller is attached: {classes:x?}"
    );
    assert!(script.contains("-nic none"), "{script}");
    let blocks = m.execute("query-block", serde_json::json!({})).unwrap();
    let files: Vec<String> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["inserted"]["file"].as_str().map(str::to_owned))
        .collect();
    let _ = Command::new("kill")
        .arg(std::fs::read_to_string(&pid).unwrap().trim())
        .status();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files.iter().any(|f| f.ends_with("vda.qcow2"))
            && files.iter().any(|f| f.ends_with("vdb.qcow2"))
    );
}

struct Export(std::process::Child);

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn export(d: &Deployment, vm: &str, point: &str, how: &[&str]) -> Export {
    let child = Command::new(bin("rewind-receiver"))
        .args(["export", "--vm", vm, "--point", point, "--data"])
        .arg(d.data())
        .args(how)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Export(child)
}

fn wait_for(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(p).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.exists(), "{} never appeared", p.display());
}

#[test]
fn nbd_export_serves_clients_and_clones_without_touching_the_store() {
    let d = Deployment::new();
    let rx = d.serve();
    let src = d.path("src.raw");
    disk::mixed(&src, 64 * MIB, 9);
    let r = d.sync_ok(&rx, "host1", "exp", &[("vda", &src)]);
    let point = r["point"].to_string();
    let sock = d.path("exp.sock");
    let _e = export(&d, "exp", &point, &["--unix", sock.to_str().unwrap()]);
    wait_for(&sock);
    let url = format!("nbd+unix:///vda?socket={}", sock.display());

    // Two clients at once.
    let copies: Vec<_> = (0..2)
        .map(|i| {
            let out = d.path(&format!("copy{i}.raw"));
            let child = Command::new("nbdcopy").arg(&url).arg(&out).spawn().unwrap();
            (child, out)
        })
        .collect();
    for (mut child, out) in copies {
        assert!(child.wait().unwrap().success());
        assert_eq!(disk::digest(&out), disk::digest(&src));
    }
    let conv = d.path("conv.qcow2");
    let o = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", &url])
        .arg(&conv));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    compare(&src, "raw", &conv, "qcow2");

    // An instant clone: a writable qcow2 overlay on the export.
    let packs_before = d.pack_bytes();
    let clone = d.path("clone.qcow2");
    let o = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &url])
        .arg(&clone));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x99 0 1M"])
        .arg(&clone));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x99 0 1M"])
        .arg(&clone));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("read 1048576/1048576"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(d.pack_bytes(), packs_before, "the store is untouched");
    assert_eq!(
        d.restored_digest("exp", "vda", r["point"].as_u64().unwrap()),
        disk::digest(&src)
    );

    // TCP on loopback, and a missing export is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _t = export(
        &d,
        "exp",
        &point,
        &["--listen", &format!("127.0.0.1:{port}")],
    );
    let tcp_url = format!("nbd://127.0.0.1:{port}/vda");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut info = run(Command::new("nbdinfo").arg("--size").arg(&tcp_url));
    while !info.status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        info = run(Command::new("nbdinfo").arg("--size").arg(&tcp_url));
    }
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        (64 * MIB).to_string()
    );
    let missing = run(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/nope")));
    assert!(!missing.status.success());
}
