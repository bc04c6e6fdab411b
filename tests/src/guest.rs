//! Real Debian 12 guests for end-to-end tests: a bootable disk image built once from Debian
//! packages and cached, booted as copy-on-write overlays that tests drive through the guest agent.
//!
//! The image (built by [`image`], about a minute with a warm network):
//! ```text
//! 0        512            1 MiB                                        2 GiB
//! | MBR    | GRUB core.img | ext4 "rewind-root" (partition 1, bootable)  |
//!   boot.img  embedded config: linux + initrd from partition 1, console=ttyS0
//! ```
//! Nothing is mounted or loop-attached: the root tree comes from `mmdebstrap`, the file system
//! from `mkfs.ext4 -d`, the partition table from `sfdisk` on the image file, and GRUB's boot
//! sector and core image are written into place as `grub-bios-setup` would.
//! The guest prints [`READY_MARKER`] on its serial console once `qemu-guest-agent` runs;
//! tests then talk to it only through `guest-exec` (it has no network and no password).

use crate::qemu::{Monitor, VmDisk};
use anyhow::{bail, ensure, Context as _};
use rustix::fs::{flock, FlockOperation};
use serde_json::{json, Value};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bump to force a rebuild when something outside the constants below changes the image.
const RECIPE_VERSION: &str = "rewind-guest 1";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// The kernel and init the tests need, the agent they talk to (which needs `dbus` for
/// `guest-shutdown`), and tools tests run inside the guest. `udev` and `initramfs-tools` are
/// dependencies anyway; naming them keeps the image bootable if the kernel's choice changes.
const PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "udev",
    "systemd-sysv",
    "dbus",
    "qemu-guest-agent",
    "sqlite3",
    "e2fsprogs",
    "fio",
];
/// No recommended packages and no documentation: a smaller tree is a quicker `mkfs -d`.
const MMDEBSTRAP_OPTIONS: &[&str] = &[
    "--mode=root",
    "--variant=minbase",
    "--aptopt=APT::Install-Recommends \"false\"",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
];
/// Virtual size of the guest disk; sparse, so it costs only what the guest wrote.
const DISK_SIZE: u64 = 2 << 30;
/// Start of partition 1: the usual 1 MiB alignment, which leaves room for GRUB's core image.
const PART_START: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// The root file system is found by label, so the kernel needs no device name.
const ROOT_LABEL: &str = "rewind-root";
/// Printed on the serial console by `rewind-ready.service` once the guest agent has started.
pub const READY_MARKER: &str = "REWIND-GUEST-READY";
/// `rw` because nothing needs the classic fsck-before-remount dance on a test guest.
const KERNEL_CMDLINE: &str = "root=LABEL=rewind-root rw console=ttyS0,115200";
/// Just enough GRUB to read partition 1 and start Linux, talking on the serial port.
const GRUB_MODULES: &[&str] = &[
    "biosdisk",
    "part_msdos",
    "ext2",
    "linux",
    "boot",
    "serial",
    "terminal",
    "echo",
];
/// GRUB's script, embedded in core.img, so the disk needs no /boot/grub.
/// `{kernel}`, `{initrd}` and `{cmdline}` are filled in at build time.
const GRUB_CONFIG: &str = "serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set root=(hd0,msdos1)
echo 'GRUB: loading Linux'
linux /boot/{kernel} {cmdline}
initrd /boot/{initrd}
boot
";
/// Files written into the root tree after `mmdebstrap` (path relative to the root, content).
const FILES: &[(&str, &str)] = &[
    ("etc/hostname", "rewind-guest\n"),
    (
        "etc/fstab",
        "LABEL=rewind-root / ext4 rw,errors=remount-ro 0 1\n",
    ),
    (
        "etc/systemd/system/rewind-ready.service",
        "[Unit]
Description=Tell the test harness the guest is up
Wants=qemu-guest-agent.service
After=qemu-guest-agent.service multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo REWIND-GUEST-READY > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
",
    ),
    ("usr/local/bin/rewind-app", APP_SCRIPT),
    ("etc/qemu/fsfreeze-hook.d/rewind-app", APP_HOOK),
    (
        "etc/systemd/system/rewind-app.service",
        "[Unit]
Description=Rewind test application (SQLite and file writes under fsync)

[Service]
ExecStart=/usr/local/bin/rewind-app
",
    ),
    // The guest agent runs the freeze hooks (Debian's runs none unless told to).
    (
        "etc/systemd/system/qemu-guest-agent.service.d/hook.conf",
        "[Service]
ExecStart=
ExecStart=-/usr/sbin/qemu-ga --fsfreeze-hook=/etc/qemu/fsfreeze-hook
",
    ),
    // A root shell on the console for whoever debugs a guest by hand; tests never log in.
    (
        "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
        "[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
",
    ),
];
/// The test application: numbered transactions, each durable (fsync) in an SQLite database and
/// a log file before the next starts; it pauses between transactions while the freeze hook
/// asks it to. Started by tests (`systemctl start rewind-app`), not at boot.
pub const APP_DB: &str = "/var/lib/app/app.db";
pub const APP_LOG: &str = "/var/lib/app/log.txt";
/// One line per freeze (`freeze SECONDS last=ID quiet|busy`) and thaw (`thaw SECONDS`),
/// written and synced by the hook before the guest agent freezes the file systems.
pub const FREEZE_LOG: &str = "/var/lib/app/freeze.log";
const APP_SCRIPT: &str = r#"#!/bin/sh
# rewind-app: commits numbered transactions to an SQLite database and a log file, each made
# durable before the next; pauses between transactions while /run/rewind-app.pause exists.
set -eu
dir=/var/lib/app
db=$dir/app.db
mkdir -p $dir
sqlite3 $db "PRAGMA journal_mode=DELETE;
  CREATE TABLE IF NOT EXISTS tx(id INTEGER PRIMARY KEY, payload BLOB NOT NULL, digest TEXT NOT NULL);" >/dev/null
i=$(sqlite3 $db "SELECT coalesce(max(id), 0) FROM tx")
echo $$ > /run/rewind-app.pid
while :; do
  while [ -e /run/rewind-app.pause ]; do
    : > /run/rewind-app.paused
    sleep 0.02
  done
  rm -f /run/rewind-app.paused
  i=$((i + 1))
  sqlite3 $db "PRAGMA synchronous=FULL;
    BEGIN; INSERT INTO tx VALUES($i, randomblob(16384), hex(randomblob(8))); COMMIT;"
  echo $i >> $dir/log.txt
  sync $dir/log.txt
  echo $i > /run/rewind-app.last
done
"#;
const APP_HOOK: &str = r#"#!/bin/sh
# Quiesces rewind-app for a guest-agent freeze: asks it to pause, waits (5 s at most) until it
# is between transactions, and records its last committed transaction, synced before the
# file systems freeze. A hook must never hang a freeze: a busy app is recorded as such.
dir=/var/lib/app
log=$dir/freeze.log
case "$1" in
freeze)
  # Cheap under emulation: no systemctl in the freeze path.
  kill -0 "$(cat /run/rewind-app.pid 2>/dev/null)" 2>/dev/null || exit 0
  rm -f /run/rewind-app.paused
  : > /run/rewind-app.pause
  n=0
  while [ ! -e /run/rewind-app.paused ] && [ $n -lt 250 ]; do sleep 0.02; n=$((n + 1)); done
  if [ -e /run/rewind-app.paused ]; then state=quiet; else state=busy; fi
  last=$(sqlite3 $dir/app.db "SELECT coalesce(max(id), 0) FROM tx" 2>/dev/null || echo unknown)
  echo "freeze $(date +%s.%N) last=$last $state" >> $log
  sync $log
  ;;
thaw)
  [ -e /run/rewind-app.pause ] || exit 0
  rm -f /run/rewind-app.pause
  echo "thaw $(date +%s.%N)" >> $log
  ;;
esac
exit 0
"#;
/// Scripts in the root tree that must be executable.
const EXECUTABLES: &[&str] = &[
    "usr/local/bin/rewind-app",
    "etc/qemu/fsfreeze-hook.d/rewind-app",
];
/// Unit links made after `mmdebstrap` (link relative to the root, target).
const LINKS: &[(&str, &str)] = &[(
    "etc/systemd/system/multi-user.target.wants/rewind-ready.service",
    "../rewind-ready.service",
)];
/// Unit links removed: timers that would start apt or fstrim in the middle of a test (and write
/// to the disk under test), and a getty on a screen nobody sees.
const UNLINKS: &[&str] = &[
    "etc/systemd/system/timers.target.wants/apt-daily.timer",
    "etc/systemd/system/timers.target.wants/apt-daily-upgrade.timer",
    "etc/systemd/system/timers.target.wants/dpkg-db-backup.timer",
    "etc/systemd/system/timers.target.wants/e2scrub_all.timer",
    "etc/systemd/system/timers.target.wants/fstrim.timer",
    "etc/systemd/system/getty.target.wants/getty@tty1.service",
];
/// GRUB's i386-pc images, from the `grub-pc-bin` package.
const GRUB_DIR: &str = "/usr/lib/grub/i386-pc";
/// boot.img: the LBA of core.img's first sector (u64), which `grub-bios-setup` fills in.
const BOOT_KERNEL_SECTOR: usize = 0x5c;
/// boot.img: a `jmp` over the check that trusts only 0x80..0x8f as a boot drive;
/// `grub-bios-setup` replaces it with two `nop`s for hard disks.
const BOOT_DRIVE_CHECK: usize = 0x66;
/// MBR: boot code ends here; the disk signature and partition table follow.
const MBR_CODE_END: usize = 440;
/// core.img's first sector (diskboot.img) ends in a block list: the LBA (u64) of the rest of
/// core.img, then its length in sectors (u16, set by `grub-mkimage`) and load segment (u16).
const DISKBOOT_BLOCKLIST_START: usize = 0x1f4;
/// Where the image cache lives unless `REWIND_TEST_CACHE` says otherwise.
const CACHE_DIR: &str = "/var/cache/rewind-tests";
/// Guest memory: a minimal Debian boots comfortably in it.
const GUEST_MEMORY: &str = "512M";

/// Path of the cached guest image, built first if it is missing.
///
/// The name carries a hash of the whole recipe, so a changed recipe builds a new image and
/// never reuses a stale one. The image appears only complete: it is built in a work folder
/// and renamed into place. A file lock makes concurrent callers (several test binaries) wait
/// for one build; an interrupted build leaves only its work folder, which the next build
/// removes. Building needs root and a Debian mirror; it prints progress on stderr.
pub fn image() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("REWIND_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CACHE_DIR));
    let key = recipe_key();
    let path = cache.join(format!("debian12-{key}.qcow2"));
    if path.exists() {
        return Ok(path);
    }
    fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let lock_path = cache.join(format!("debian12-{key}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
        progress("another process is building the guest image: waiting for it");
        flock(&lock, FlockOperation::LockExclusive).context("lock the image cache")?;
    }
    if path.exists() {
        return Ok(path);
    }
    let started = Instant::now();
    let work = cache.join(format!("debian12-{key}.build"));
    remove_work_dir(&work)?;
    fs::create_dir(&work).with_context(|| format!("create {}", work.display()))?;
    let built = build(&work, &key, &path);
    let cleaned = remove_work_dir(&work);
    built?;
    cleaned?;
    progress(&format!(
        "guest image built in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        path.display()
    ));
    Ok(path)
}

/// A short hash of everything that decides the image's content.
fn recipe_key() -> String {
    let recipe = format!(
        "{RECIPE_VERSION}\n{SUITE}\n{MIRROR}\n{PACKAGES:?}\n{MMDEBSTRAP_OPTIONS:?}\n\
         {DISK_SIZE}\n{PART_START}\n{ROOT_LABEL}\n{READY_MARKER}\n{KERNEL_CMDLINE}\n\
         {GRUB_MODULES:?}\n{GRUB_CONFIG}\n{FILES:?}\n{EXECUTABLES:?}\n{LINKS:?}\n{UNLINKS:?}"
    );
    blake3::hash(recipe.as_bytes()).to_hex()[..16].to_owned()
}

/// A progress line that reaches the terminal even while libtest captures test output.
fn progress(line: &str) {
    let _ = writeln!(std::io::stderr(), "rewind-tests: {line}");
}

/// Builds the image in `work` and renames it to `dest`.
fn build(work: &Path, key: &str, dest: &Path) -> anyhow::Result<()> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "building the guest image needs root (mmdebstrap --mode=root, mkfs.ext4 -d keeps owners)"
    );
    for (tool, package) in [
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("sfdisk", "fdisk"),
        ("grub-mkimage", "grub-common"),
        ("qemu-img", "qemu-utils"),
        ("dd", "coreutils"),
    ] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()?
                .success(),
            "{tool} is missing: apt-get install {package}"
        );
    }
    ensure!(
        Path::new(GRUB_DIR).join("boot.img").exists(),
        "{GRUB_DIR} is missing: apt-get install grub-pc-bin"
    );
    let step = Instant::now();
    let say = |what: &str| {
        progress(&format!(
            "guest image [{:>3.0} s] {what}",
            step.elapsed().as_secs_f64()
        ))
    };

    let root = work.join("root");
    say(&format!(
        "mmdebstrap {SUITE}: {} (about a minute)",
        PACKAGES.join(" ")
    ));
    let mut mm = Command::new("mmdebstrap");
    mm.args(MMDEBSTRAP_OPTIONS)
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&root)
        .arg(MIRROR);
    run_logged(&mut mm, &work.join("mmdebstrap.log"))?;

    say("configuring the root tree");
    configure(&root, key)?;
    let boot = root.join("boot");
    let kernel = only_file(&boot, "vmlinuz-")?;
    let initrd = only_file(&boot, "initrd.img-")?;

    say("mkfs.ext4 -d (the root file system)");
    let fs_img = work.join("fs.img");
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", ROOT_LABEL])
        // Initialize inode tables and journal now: otherwise the guest kernel zeroes them in
        // the background after boot, writes a test would see as guest changes.
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
        .arg(&root)
        .arg(&fs_img)
        .arg(format!("{}k", (DISK_SIZE - PART_START) / 1024));
    run_logged(&mut mkfs, &work.join("mkfs.log"))?;

    say("grub-mkimage (i386-pc core image with an embedded config)");
    let cfg = work.join("early.cfg");
    fs::write(
        &cfg,
        GRUB_CONFIG
            .replace("{kernel}", &kernel)
            .replace("{initrd}", &initrd)
            .replace("{cmdline}", KERNEL_CMDLINE),
    )?;
    let core = work.join("core.img");
    let mut mkimage = Command::new("grub-mkimage");
    mkimage
        .args([
            "-O",
            "i386-pc",
            "-d",
            GRUB_DIR,
            "-p",
            "(hd0,msdos1)/boot/grub",
            "-c",
        ])
        .arg(&cfg)
        .arg("-o")
        .arg(&core)
        .args(GRUB_MODULES);
    run_logged(&mut mkimage, &work.join("grub-mkimage.log"))?;

    say("assembling the disk (sfdisk, GRUB, dd of the file system)");
    let raw = work.join("disk.raw");
    File::create(&raw)?.set_len(DISK_SIZE)?;
    let table = format!(
        "label: dos\nstart={}, type=83, bootable\n",
        PART_START / SECTOR
    );
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.arg("-q").arg(&raw);
    run_with_input(&mut sfdisk, table.as_bytes(), &work.join("sfdisk.log"))?;
    install_grub(
        &raw,
        &fs::read(Path::new(GRUB_DIR).join("boot.img"))?,
        &fs::read(&core)?,
    )?;
    let mut dd = Command::new("dd");
    dd.arg(format!("if={}", fs_img.display()))
        .arg(format!("of={}", raw.display()))
        .args(["bs=1M", &format!("seek={}", PART_START >> 20)])
        .args(["conv=notrunc,sparse", "status=none"]);
    run_logged(&mut dd, &work.join("dd.log"))?;
    fs::remove_file(&fs_img)?;

    say("qemu-img convert to qcow2");
    let qcow2 = work.join("image.qcow2");
    let mut convert = Command::new("qemu-img");
    convert
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2);
    run_logged(&mut convert, &work.join("convert.log"))?;
    let f = File::open(&qcow2)?;
    f.sync_all()?;
    // Read-only: guests write to overlays, never to the shared base.
    fs::set_permissions(&qcow2, fs::Permissions::from_mode(0o444))?;
    fs::rename(&qcow2, dest).with_context(|| format!("rename to {}", dest.display()))?;
    if let Some(dir) = dest.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes the test configuration into the root tree.
fn configure(root: &Path, key: &str) -> anyhow::Result<()> {
    // A fixed machine id: an empty one makes systemd's first boot prompt on the console.
    let machine_id = blake3::hash(key.as_bytes()).to_hex()[..32].to_owned();
    fs::write(root.join("etc/machine-id"), format!("{machine_id}\n"))?;
    for (rel, content) in FILES {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
    }
    for rel in EXECUTABLES {
        let path = root.join(rel);
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    for (rel, target) in LINKS {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path)
            .with_context(|| format!("link {}", path.display()))?;
    }
    for rel in UNLINKS {
        match fs::remove_file(root.join(rel)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove {rel}"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The name of the one file in `dir` that starts with `prefix` (the kernel, the initrd).
fn only_file(dir: &Path, prefix: &str) -> anyhow::Result<String> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    ensure!(
        names.len() == 1,
        "expected one {prefix}* in {}, found {names:?}",
        dir.display()
    );
    Ok(names.remove(0))
}

/// Places GRUB on an MBR disk image as `grub-bios-setup` does: boot.img's code (with the
/// location of core.img) in the MBR, keeping the partition table, and core.img in the gap
/// between the MBR and partition 1.
fn install_grub(disk: &Path, boot_img: &[u8], core_img: &[u8]) -> anyhow::Result<()> {
    ensure!(boot_img.len() == 512, "boot.img is not one sector");
    ensure!(
        core_img.len() >= 512 && (SECTOR as usize + core_img.len()) as u64 <= PART_START,
        "core.img ({} bytes) does not fit before partition 1",
        core_img.len()
    );
    let mut boot = boot_img.to_vec();
    boot[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&1u64.to_le_bytes());
    if boot[BOOT_DRIVE_CHECK] == 0xeb {
        boot[BOOT_DRIVE_CHECK..BOOT_DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    }
    let mut core = core_img.to_vec();
    core[DISKBOOT_BLOCKLIST_START..DISKBOOT_BLOCKLIST_START + 8]
        .copy_from_slice(&2u64.to_le_bytes());
    let f = File::options().write(true).open(disk)?;
    f.write_all_at(&boot[..MBR_CODE_END], 0)?;
    f.write_all_at(&core, SECTOR)?;
    f.sync_all()?;
    Ok(())
}

/// Runs a build tool with its output in `log`; on failure the error carries the log's end.
fn run_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    run_with_input(cmd, &[], log)
}

fn run_with_input(cmd: &mut Command, input: &[u8], log: &Path) -> anyhow::Result<()> {
    let out = File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(input)?;
    drop(stdin);
    let status = child.wait()?;
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        bail!(
            "{:?} failed ({status}):\n{}",
            cmd.get_program(),
            tail(&text, 3000)
        );
    }
    Ok(())
}

/// Removes a build's work folder, first unmounting anything an interrupted `mmdebstrap` left
/// mounted in it (it bind-mounts the host's /proc and /sys: never recurse into those).
/// Limit: if only the test process was SIGKILLed, its orphaned `mmdebstrap` may still run and
/// make this removal, and so that one next build, fail.
fn remove_work_dir(work: &Path) -> anyhow::Result<()> {
    if !work.exists() {
        return Ok(());
    }
    let base = fs::canonicalize(work)?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(&base))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for m in &mounts {
        let status = Command::new("umount").arg("-l").arg(m).status()?;
        ensure!(status.success(), "umount -l {} failed", m.display());
    }
    fs::remove_dir_all(work).with_context(|| format!("remove {}", work.display()))
}

/// Undoes the octal escapes (`\040` for a space) of a path in /proc/self/mountinfo.
fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |a, c| a.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `n` bytes of a text, cut at a character boundary.
fn tail(text: &str, n: usize) -> &str {
    let mut start = text.len().saturating_sub(n);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// How QEMU runs the guest. TCG is the default: nested KVM on the test machines boots a real
/// guest far slower than TCG does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    /// `REWIND_TEST_ACCEL` (`tcg` or `kvm`), TCG when unset.
    pub fn from_env() -> Accel {
        match std::env::var("REWIND_TEST_ACCEL").as_deref() {
            Err(_) | Ok("") | Ok("tcg") => Accel::Tcg,
            Ok("kvm") => Accel::Kvm,
            Ok(other) => panic!("REWIND_TEST_ACCEL must be tcg or kvm, not {other:?}"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// What a command run in the guest returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// The exit code, or `None` if a signal ended the command.
    pub code: Option<i32>,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A synchronous connection to a guest's `qemu-guest-agent` (its virtio-serial socket).
pub struct GuestAgent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl GuestAgent {
    /// Connects and synchronizes with `guest-sync`, so replies meant for an earlier client are
    /// skipped. Waits up to `timeout` for the agent to answer.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<GuestAgent> {
        let sock =
            UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        sock.set_read_timeout(Some(timeout))?;
        let mut agent = GuestAgent {
            reader: BufReader::new(sock.try_clone()?),
            writer: sock,
        };
        let id = (u64::from(std::process::id()) << 20) | u64::from(rand::random::<u16>());
        agent.send("guest-sync", json!({ "id": id }))?;
        loop {
            let v = agent.read()?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                break;
            }
        }
        // Later replies come quickly, or the guest is stuck: fail the test, do not hang it.
        agent
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(agent)
    }

    fn send(&mut self, cmd: &str, args: Value) -> anyhow::Result<()> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").context("write to the guest agent")?;
        Ok(())
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .context("read from the guest agent")?;
            ensure!(n > 0, "the guest agent closed the connection");
            // Anything that is not JSON is noise from before the sync.
            if let Ok(v) = serde_json::from_str(&line) {
                return Ok(v);
            }
        }
    }

    /// Runs an agent command; `Err` carries the agent's error description.
    pub fn execute(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        self.send(cmd, args)?;
        let v = self.read()?;
        match v.get("return") {
            Some(r) => Ok(r.clone()),
            None => bail!("{cmd}: {}", v["error"]["desc"].as_str().unwrap_or("?")),
        }
    }

    /// Runs `argv` in the guest (`guest-exec`, searched in the agent's PATH) and waits up to
    /// `timeout` for it to end.
    pub fn exec(&mut self, argv: &[&str], timeout: Duration) -> anyhow::Result<ExecOutput> {
        let (path, args) = argv.split_first().context("an empty command")?;
        let started = self.execute(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
        )?;
        let pid = started["pid"]
            .as_i64()
            .context("guest-exec returned no pid")?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.execute("guest-exec-status", json!({ "pid": pid }))?;
            if st["exited"] == true {
                let text = |key: &str| -> anyhow::Result<String> {
                    let b64 = st[key].as_str().unwrap_or("");
                    Ok(String::from_utf8_lossy(&base64_decode(b64)?).into_owned())
                };
                return Ok(ExecOutput {
                    code: st["exitcode"].as_i64().map(|c| c as i32),
                    signal: st["signal"].as_i64().map(|s| s as i32),
                    stdout: text("out-data")?,
                    stderr: text("err-data")?,
                });
            }
            ensure!(
                Instant::now() < deadline,
                "{argv:?} still runs in the guest after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `guest-shutdown` (powerdown): the agent sends no reply to it.
    pub fn shutdown(&mut self) -> anyhow::Result<()> {
        self.send("guest-shutdown", json!({}))
    }
}

/// Decodes standard base64 (with or without padding), as `guest-exec-status` sends output.
fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b'\n' | b'\r' => continue,
            _ => bail!("not base64: byte {c:#04x}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// A running Debian guest on a copy-on-write overlay of the cached image, killed (SIGKILL) on
/// drop. Its disk is device `vda` on drive `drive0`, like the first disk of a [`crate::qemu::Vm`].
pub struct Guest {
    pub dir: PathBuf,
    pub disk: VmDisk,
    pub accel: Accel,
    /// The test's monitor; the agent gets [`Guest::agent_qmp`].
    pub monitor: Monitor,
    qemu: Qemu,
    agent: Option<GuestAgent>,
    started: Instant,
    /// How much of the serial log has been searched for the marker already.
    serial_seen: u64,
}

impl Guest {
    /// Creates `dir/vda.qcow2` over `image` and boots it. Sockets (`agent.qmp`, `test.qmp`,
    /// `qga.sock`), the serial log (`serial.log`) and QEMU's own messages (`qemu.log`) go to
    /// `dir`.
    pub fn boot(dir: &Path, image: &Path, accel: Accel) -> anyhow::Result<Guest> {
        Guest::boot_from(dir, image, "qcow2", accel)
    }

    /// [`Guest::boot`] over an image of the given format (`raw` for a restored disk).
    pub fn boot_from(
        dir: &Path,
        image: &Path,
        format: &str,
        accel: Accel,
    ) -> anyhow::Result<Guest> {
        Guest::boot_with(dir, image, format, accel, &BootOptions::default())
    }

    /// [`Guest::boot_from`] with QEMU run as `opts` asks.
    pub fn boot_with(
        dir: &Path,
        image: &Path,
        format: &str,
        accel: Accel,
        opts: &BootOptions,
    ) -> anyhow::Result<Guest> {
        let overlay = dir.join("vda.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
            .arg(image)
            .arg(&overlay)
            .output()
            .context("qemu-img")?;
        ensure!(
            out.status.success(),
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let disk = VmDisk {
            id: "vda".into(),
            drive: "drive0".into(),
            path: overlay,
            size: DISK_SIZE,
        };
        Guest::start(dir, disk, accel, opts)
    }

    /// Starts QEMU on an existing qcow2 disk (a guest shut down or killed before, a restored
    /// image, or the same file as a migration source's: shared storage), with its sockets and
    /// logs in `dir` as [`Guest::boot`] has them. Returns once the test's monitor answers; a
    /// booting guest then needs [`Guest::wait_ready`].
    pub fn start(
        dir: &Path,
        disk: VmDisk,
        accel: Accel,
        opts: &BootOptions,
    ) -> anyhow::Result<Guest> {
        for f in ["agent.qmp", "test.qmp", "qga.sock", "serial.log"] {
            let _ = fs::remove_file(dir.join(f));
        }
        let sock = |name: &str| format!("unix:{},server=on,wait=off", dir.join(name).display());
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "pc", "-accel", accel.name(), "-m", GUEST_MEMORY])
            .args(["-nodefaults", "-nic", "none", "-display", "none"])
            .args(["-name", "rewind-guest"]);
        cmd.arg("-serial")
            .arg(format!("file:{}", dir.join("serial.log").display()))
            .arg("-qmp")
            .arg(sock("agent.qmp"))
            .arg("-qmp")
            .arg(sock("test.qmp"))
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                dir.join("qga.sock").display()
            ))
            .args(["-device", "virtio-serial"])
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id={}{}",
                disk.path.display(),
                disk.drive,
                if opts.discard { ",discard=unmap" } else { "" }
            ))
            .arg("-device")
            .arg(format!(
                "virtio-blk-pci,drive={},id={}",
                disk.drive, disk.id
            ));
        if opts.paused {
            cmd.arg("-S");
        }
        if let Some(uri) = &opts.incoming {
            cmd.arg("-incoming").arg(uri);
        }
        let log = File::create(dir.join("qemu.log"))?;
        let started = Instant::now();
        let mut qemu = Qemu(
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawn qemu-system-x86_64")?,
        );
        let qmp = dir.join("test.qmp");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !qmp.exists() {
            if let Some(status) = qemu.try_wait()? {
                bail!(
                    "QEMU exited ({status}): {}",
                    fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
                );
            }
            ensure!(Instant::now() < deadline, "QEMU made no QMP socket in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        // QEMU can still fail after it made the socket (e.g. KVM refusing the CPU model):
        // report its own message rather than a reset connection.
        let monitor = std::panic::catch_unwind(|| Monitor::connect(&qmp)).map_err(|_| {
            anyhow::anyhow!(
                "QEMU's monitor failed: {}",
                fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
            )
        })?;
        Ok(Guest {
            dir: dir.to_owned(),
            disk,
            accel,
            monitor,
            qemu,
            agent: None,
            started,
            serial_seen: 0,
        })
    }

    /// Migrates the running guest to `dest` (started with [`BootOptions::incoming`] set to
    /// `uri`, on the same disk file: shared storage), with the `dirty-bitmaps` capability on
    /// both sides so that QEMU carries the disks' dirty bitmaps along. Waits up to `timeout`
    /// for the migration to complete and the destination to run; returns how long that took.
    /// This QEMU stays behind, paused, with its images released.
    pub fn migrate_to(
        &mut self,
        dest: &mut Guest,
        uri: &str,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let caps = json!({"capabilities": [{"capability": "dirty-bitmaps", "state": true}]});
        for m in [&mut dest.monitor, &mut self.monitor] {
            m.execute("migrate-set-capabilities", caps.clone())
                .map_err(|e| anyhow::anyhow!("migrate-set-capabilities: {e}"))?;
        }
        let started = Instant::now();
        self.monitor
            .execute("migrate", json!({ "uri": uri }))
            .map_err(|e| anyhow::anyhow!("migrate: {e}"))?;
        let deadline = started + timeout;
        loop {
            let info = self
                .monitor
                .execute("query-migrate", json!({}))
                .map_err(|e| anyhow::anyhow!("query-migrate: {e}"))?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => bail!("the migration ended {info}"),
                _ => {}
            }
            ensure!(
                Instant::now() < deadline,
                "the migration did not complete in {timeout:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        loop {
            let st = dest
                .monitor
                .execute("query-status", json!({}))
                .map_err(|e| anyhow::anyhow!("query-status: {e}"))?;
            if st["running"] == true {
                return Ok(started.elapsed());
            }
            ensure!(
                Instant::now() < deadline,
                "the destination does not run {timeout:?} after the migration began: {st}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, as a host crash would; returns the disk for a later [`Guest::start`].
    pub fn kill9(self) -> VmDisk {
        self.disk.clone()
    }

    pub fn agent_qmp(&self) -> PathBuf {
        self.dir.join("agent.qmp")
    }

    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// Everything the guest printed on its serial console so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.serial_log()).unwrap_or_default()).into_owned()
    }

    /// Waits until the guest prints [`READY_MARKER`] (its agent runs), QEMU exits, or `timeout`
    /// passes. Returns the time since QEMU started.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        loop {
            if let Ok(mut f) = File::open(self.serial_log()) {
                // Search from a little before what was seen, so a marker split across two
                // reads is still found.
                let from = self.serial_seen.saturating_sub(READY_MARKER.len() as u64);
                f.seek(SeekFrom::Start(from))?;
                buf.clear();
                f.read_to_end(&mut buf)?;
                if buf
                    .windows(READY_MARKER.len())
                    .any(|w| w == READY_MARKER.as_bytes())
                {
                    return Ok(self.started.elapsed());
                }
                self.serial_seen = from + buf.len() as u64;
            }
            if let Some(status) = self.qemu.try_wait()? {
                bail!(
                    "QEMU exited ({status}) before the guest was ready: {}\nserial:\n{}",
                    fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default(),
                    tail(&self.serial(), 3000)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the guest was not ready after {timeout:?} ({}); serial:\n{}",
                    self.accel.name(),
                    tail(&self.serial(), 3000)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The guest agent connection, opened on first use.
    pub fn agent(&mut self) -> anyhow::Result<&mut GuestAgent> {
        if self.agent.is_none() {
            let a = GuestAgent::connect(&self.dir.join("qga.sock"), Duration::from_secs(120))?;
            self.agent = Some(a);
        }
        self.agent.as_mut().context("no guest agent")
    }

    /// Closes the test's guest agent connection: the guest agent serves one client at a time,
    /// and the agent under test (`--guest-agent`) needs it.
    pub fn release_agent(&mut self) {
        self.agent = None;
    }

    /// Runs a command in the guest through the guest agent (up to 5 minutes).
    pub fn exec(&mut self, argv: &[&str]) -> anyhow::Result<ExecOutput> {
        self.agent()?.exec(argv, Duration::from_secs(300))
    }

    /// Shuts the guest down through its agent and waits up to `timeout` for QEMU to exit.
    pub fn shutdown(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.agent()?.shutdown()?;
        self.agent = None;
        self.wait_exit(timeout)?
            .with_context(|| format!("QEMU still runs {timeout:?} after guest-shutdown"))
    }

    /// Waits up to `timeout` for QEMU to exit; `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.qemu.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How [`Guest::start`] runs QEMU. The default is what [`Guest::boot`] gives.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// `discard=unmap` on the drive: the guest's TRIM reaches the image.
    pub discard: bool,
    /// `-S`: the CPUs stay stopped, the guest never boots (QEMU serves its disk as a VM would).
    pub paused: bool,
    /// `-incoming URI`: a migration destination, which runs the guest once it arrived.
    pub incoming: Option<String>,
}

/// The QEMU process, killed (SIGKILL) and reaped when dropped, even if the guest's setup fails
/// half-way.
struct Qemu(Child);

impl Qemu {
    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.0.try_wait()?)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_agent_output() {
        assert_eq!(base64_decode("cnVubmluZwo=").unwrap(), b"running\n");
        assert_eq!(base64_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a*b").is_err());
    }

    #[test]
    fn the_ready_unit_prints_the_marker() {
        let unit = FILES
            .iter()
            .find(|(p, _)| p.ends_with("rewind-ready.service"))
            .unwrap()
            .1;
        assert!(unit.contains(&format!("echo {READY_MARKER} > /dev/ttyS0")));
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/x\\"), "/x\\");
    }

    #[test]
    fn grub_is_placed_like_grub_bios_setup_does() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.raw");
        let mut mbr = vec![0u8; 512];
        mbr[446] = 0x80; // partition table entry: must survive
        mbr[510..].copy_from_slice(&[0x55, 0xaa]);
        fs::write(&disk, &mbr).unwrap();
        let mut boot = vec![0x11u8; 512];
        boot[BOOT_DRIVE_CHECK] = 0xeb;
        let core = vec![0x22u8; 4096];
        install_grub(&disk, &boot, &core).unwrap();
        let d = fs::read(&disk).unwrap();
        assert_eq!(d[0], 0x11);
        assert_eq!(
            &d[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8],
            &[1, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&d[BOOT_DRIVE_CHECK..BOOT_DRIVE_CHECK + 2], &[0x90, 0x90]);
        assert_eq!(d[446], 0x80);
        assert_eq!(&d[510..512], &[0x55, 0xaa]);
        assert_eq!(d[512], 0x22);
        assert_eq!(
            &d[512 + DISKBOOT_BLOCKLIST_START..][..8],
            &[2, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(d.len(), 512 + 4096);
        assert!(install_grub(&disk, &boot, &vec![0u8; PART_START as usize]).is_err());
    }
}
