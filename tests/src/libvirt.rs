//! A private libvirt daemon for tests: Debian 12's monolithic `libvirtd`, started as root in
//! its own mount namespace with libvirt's fixed folders (`/etc/libvirt`, `/run/libvirt`,
//! `/var/lib/libvirt`, `/var/cache/libvirt`, `/var/log/libvirt`) bound to a temporary folder,
//! its sockets there too, so tests run side by side and never touch the host's libvirt.
//! QEMU runs as root without cgroups, security driver or ownership changes. The daemon's QEMU
//! capability cache is kept in `/var/cache/rewind-tests/libvirt-qemu` (a cold start probes
//! QEMU for ~9 s; a warm one starts in well under a second).
//!
//! Domains are TCG, without guest OS, with virtio-scsi disks: `qemu-io` through the monitor
//! writes to a SCSI disk's drive (`scsi0-0-0-N`) as a guest would, before and during a backup
//! job (it passes the job's copy-before-write filter).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the capability cache is kept between runs.
const CAPS_CACHE: &str = "/var/cache/rewind-tests/libvirt-qemu";

/// A running private libvirtd; stopped (with its domains destroyed) on drop.
pub struct Libvirtd {
    pub dir: PathBuf,
    child: Option<Child>,
}

/// Whether this machine can run the daemon (libvirt-daemon-system installed).
pub fn available() -> bool {
    Path::new("/usr/sbin/libvirtd").exists()
        && Command::new("virsh")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

impl Libvirtd {
    /// Starts a daemon whose folders live under `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Libvirtd {
        let dir = std::path::absolute(dir).expect("absolute");
        for sub in ["etc/qemu", "run", "lib/qemu", "cache", "log", "sock"] {
            std::fs::create_dir_all(dir.join(sub)).expect("libvirt folder");
        }
        if Path::new(CAPS_CACHE).join("capabilities").exists() {
            let _ = Command::new("cp")
                .arg("-a")
                .arg(CAPS_CACHE)
                .arg(dir.join("cache/qemu"))
                .status();
        }
        let d = dir.display();
        std::fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{d}/sock\"\nunix_sock_group = \"root\"\n\
                 unix_sock_ro_perms = \"0700\"\nunix_sock_rw_perms = \"0700\"\n\
                 auth_unix_ro = \"none\"\nauth_unix_rw = \"none\"\n\
                 log_outputs = \"3:file:{d}/log/libvirtd.log\"\n"
            ),
        )
        .expect("libvirtd.conf");
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\n\
             security_driver = \"none\"\ncgroup_controllers = [ ]\nstdio_handler = \"file\"\n\
             remember_owner = 0\nnamespaces = [ ]\n",
        )
        .expect("qemu.conf");
        std::fs::write(dir.join("etc/libvirt.conf"), "").expect("libvirt.conf");
        let script = format!(
            "mount --bind '{d}/etc' /etc/libvirt && \
             mount -t tmpfs -o mode=755 tmpfs /run && mkdir /run/libvirt && \
             mount --bind '{d}/run' /run/libvirt && \
             mount --bind '{d}/lib' /var/lib/libvirt && \
             mount --bind '{d}/cache' /var/cache/libvirt && \
             mount --bind '{d}/log' /var/log/libvirt && \
             exec libvirtd --config '{d}/etc/libvirtd.conf' --pid-file '{d}/libvirtd.pid'"
        );
        for folder in [
            "/etc/libvirt",
            "/var/lib/libvirt",
            "/var/cache/libvirt",
            "/var/log/libvirt",
        ] {
            std::fs::create_dir_all(folder).expect("mount point");
        }
        std::fs::write(dir.join("start.sh"), script).expect("start script");
        let mut daemon = Libvirtd { dir, child: None };
        daemon.launch();
        if !Path::new(CAPS_CACHE).join("capabilities").exists() {
            let _ = std::fs::create_dir_all(Path::new(CAPS_CACHE).parent().expect("parent"));
            let _ = Command::new("cp")
                .arg("-a")
                .arg(daemon.dir.join("cache/qemu"))
                .arg(CAPS_CACHE)
                .status();
        }
        daemon
    }

    /// Runs the daemon in its namespace (see `start.sh`) and waits until it answers.
    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("libvirtd.stdout")).expect("log");
        let script = self.dir.join("start.sh").display().to_string();
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "/bin/sh", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start libvirtd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.virsh(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer: {}",
                std::fs::read_to_string(self.dir.join("libvirtd.stdout")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the daemon and starts it again on the same folders; its domains keep running
    /// meanwhile, as under a real libvirtd restart.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        self.launch();
    }

    /// The node name QEMU gives the format layer of a domain's disk (`sda`), from query-block.
    pub fn node_of(&self, domain: &str, target: &str) -> String {
        let out = self.virsh_ok(&[
            "qemu-monitor-command",
            domain,
            r#"{"execute":"query-block"}"#,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("query-block JSON");
        let alias = format!("scsi0-0-0-{}", (target.as_bytes()[2] - b'a'));
        v["return"]
            .as_array()
            .expect("block list")
            .iter()
            .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(&alias)))
            .and_then(|b| b["inserted"]["node-name"].as_str())
            .unwrap_or_else(|| panic!("no node for {target} in {out}"))
            .to_owned()
    }

    /// The connection URI the agent is given.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.join("sock/libvirt-sock").display()
        )
    }

    /// Runs `virsh -c URI ARGS` in the C locale.
    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .expect("run virsh")
    }

    /// Like [`Libvirtd::virsh`], but panics unless it succeeded; returns its output.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Defines (persistent) or creates (transient) and starts a TCG domain without guest OS
    /// whose disks are the given qcow2 images on virtio-scsi, as `sda`, `sdb`, ...
    pub fn start_domain(&self, name: &str, images: &[&Path], persistent: bool) {
        let xml = domain_xml(name, images);
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("domain XML");
        let path = file.display().to_string();
        if persistent {
            self.virsh_ok(&["define", &path]);
            self.virsh_ok(&["start", name]);
        } else {
            self.virsh_ok(&["create", &path]);
        }
    }

    /// Writes `len` bytes of `pattern` at `offset` of disk number `unit` of a running domain,
    /// through its drive, as a guest would.
    pub fn write(&self, domain: &str, unit: usize, pattern: u8, offset: u64, len: u64) {
        let cmd = format!("qemu-io -d scsi0-0-0-{unit} \"write -P {pattern:#x} {offset} {len}\"");
        let out = self.virsh_ok(&["qemu-monitor-command", "--hmp", domain, &cmd]);
        // The monitor answers qemu-io's errors but virsh exits 0: an answer is an error.
        assert!(out.trim().is_empty(), "qemu-io on {domain}: {out}");
    }
}

/// Creates an empty qcow2 image of `size` bytes at `dir/name`.
pub fn qcow2(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(size.to_string())
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// A small ext4 file system loop-mounted at a folder (an agent's state folder, where a libvirt
/// job's scratch files go), so a test can run it out of room. Mount it before
/// [`Libvirtd::start`]: the daemon's private mount namespace copies the mount table once, and
/// QEMU must see the same file system. Unmounted (lazily) when dropped.
pub struct SmallFs {
    pub path: PathBuf,
    image: PathBuf,
}

impl SmallFs {
    /// Creates `path` and mounts a fresh ext4 of `size` bytes there (its image beside it).
    pub fn mount(path: &Path, size: u64) -> SmallFs {
        let image = path.with_extension("ext4");
        std::fs::create_dir_all(path).expect("mount point");
        let file = std::fs::File::create(&image).expect("file system image");
        file.set_len(size).expect("size the image");
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image)
            .output()
            .expect("run mkfs.ext4");
        assert!(
            mkfs.status.success(),
            "{}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        let mount = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            mount.status.success(),
            "{}",
            String::from_utf8_lossy(&mount.stderr)
        );
        SmallFs {
            path: path.to_owned(),
            image,
        }
    }

    /// Bytes an unprivileged writer may still use.
    pub fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.path).expect("statvfs");
        st.f_bavail * st.f_frsize
    }

    /// Fills the file system with a ballast file until `leave` bytes stay free.
    pub fn fill_until(&self, leave: u64) {
        let ballast = self.path.join("ballast");
        let _ = std::fs::remove_file(&ballast);
        let len = self.free().saturating_sub(leave);
        let out = Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(&ballast)
            .output()
            .expect("run fallocate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Removes the ballast: the room is back.
    pub fn empty(&self) {
        std::fs::remove_file(self.path.join("ballast")).expect("remove the ballast");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A domain's XML: TCG, no network, no display, a guest agent channel, the disks on SCSI.
pub fn domain_xml(name: &str, images: &[&Path]) -> String {
    let mut disks = String::new();
    for (i, img) in images.iter().enumerate() {
        let target = format!("sd{}", (b'a' + i as u8) as char);
        disks.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>\
             <source file='{}'/><target dev='{target}' bus='scsi'/>\
             <address type='drive' controller='0' bus='0' target='0' unit='{i}'/></disk>",
            img.display()
        ));
    }
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><on_poweroff>destroy</on_poweroff>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <controller type='scsi' index='0' model='virtio-scsi'/>{disks}\
         <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
         <video><model type='none'/></video><memballoon model='none'/></devices></domain>"
    )
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if let Ok(list) = String::from_utf8(self.virsh(&["list", "--name"]).stdout) {
            for name in list.lines().map(str::trim).filter(|n| !n.is_empty()) {
                let _ = self.virsh(&["destroy", name]);
            }
        }
        if let Some(mut child) = self.child.take() {
            // A domain the daemon could not destroy outlives it (libvirt keeps domains across
            // daemon restarts): its QEMU, named by the daemon's pid file, is killed here.
            for qemu in qemu_pids(&self.dir.join("run")) {
                let _ = Command::new("kill")
                    .args(["-KILL", &qemu.to_string()])
                    .status();
            }
            let pid = child.id().to_string();
            // unshare exec'd the shell, which exec'd libvirtd: the child is the daemon.
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

/// The QEMU processes of the domains libvirt started from `run` (its `/run/libvirt`): the
/// pid files it keeps in `qemu/`, where the process is still a QEMU.
fn qemu_pids(run: &Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir(run.join("qemu")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        })
        .collect()
}
