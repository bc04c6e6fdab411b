//! The drill's boot step: serves the point over NBD on a private socket, puts a throw-away
//! qcow2 overlay on each disk and boots the point's [`BootPlan`] (its captured configuration)
//! in an isolated QEMU (no network devices), watching the serial console for a marker; then
//! runs the application checks in the running guest. The overlays, the sockets and QEMU are
//! removed whatever happens.

use super::checks::CheckReport;
use super::plan::BootPlan;
use super::{health, tail, Accel, DrillOptions};
use crate::nbd_server::{self, Exports};
use crate::points::PointInfo;
use rewind_proto::crypt::Codec;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Serial console bytes kept for the report.
const SERIAL_TAIL: usize = 2048;
/// Console bytes held while booting: the guest decides how much it prints, and the marker is
/// looked for every 50 ms, long before this much scrolls past.
const CONSOLE_KEPT: usize = 1 << 20;
/// The guest-agent channel's socket in the drill's private folder.
pub(super) const QGA_SOCKET: &str = "qga.sock";
/// Prefix of a drill's temporary folder: `rewind-drill.PID.` then random characters.
const TEMP_PREFIX: &str = "rewind-drill.";

/// What one boot did.
pub(super) struct Boot {
    pub(super) accel: &'static str,
    /// QEMU ran: it did not exit before showing anything on the console.
    pub(super) started: bool,
    pub(super) serial_tail: String,
    pub(super) boot_seconds: f64,
    pub(super) result: Result<(), String>,
    /// The checks' reports once they ran (empty when they did not).
    pub(super) checks: Vec<CheckReport>,
    /// None without checks or when the boot failed; else the seconds from the drill's start
    /// until every check passed, or the failed check's reason.
    pub(super) healthy: Option<Result<f64, String>>,
}

/// Kills and reaps QEMU when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pipe's bytes as a thread collects them (the last [`CONSOLE_KEPT`] or more).
type Console = Arc<Mutex<Vec<u8>>>;

/// Boots the point under the accelerator `opts.accel` names; `Auto` is KVM when it can be
/// used, then TCG when QEMU did not start under KVM. Err: the boot could not be set up.
pub(super) fn boot_point(
    (data, codec): (&Path, &Codec),
    point: &PointInfo,
    plan: &BootPlan,
    opts: &DrillOptions,
    started: Instant,
) -> Result<Boot, String> {
    let boot_under = |accel: &'static str| boot((data, codec), point, plan, opts, started, accel);
    Ok(match opts.accel {
        Accel::Kvm => boot_under("kvm")?,
        Accel::Tcg => boot_under("tcg")?,
        Accel::Auto if !kvm_usable() => boot_under("tcg")?,
        Accel::Auto => {
            let b = boot_under("kvm")?;
            if b.started {
                b
            } else {
                tracing::warn!(
                    error = b.result.as_ref().err().map(String::as_str).unwrap_or(""),
                    "QEMU did not start under KVM: drilling under TCG"
                );
                boot_under("tcg")?
            }
        }
    })
}

/// Whether KVM can be used (the device exists and opens read-write).
fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Collects a pipe's bytes on a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> Console {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut v) = b.lock() {
                v.extend_from_slice(&chunk[..n]);
                if v.len() > 2 * CONSOLE_KEPT {
                    let cut = v.len() - CONSOLE_KEPT;
                    v.drain(..cut);
                }
            }
        }
    });
    buf
}

/// What a console has collected so far.
fn seen(buf: &Console) -> Vec<u8> {
    buf.lock().map(|b| b.clone()).unwrap_or_default()
}

/// Removes the temporary folders of drills that were killed (their process is gone), so a
/// SIGKILLed drill leaves nothing behind once the next one runs.
fn remove_stale_folders() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Boots the point's disks (through overlays on our NBD export) until the console shows the
/// marker, the timeout passes, QEMU exits or the drill is cancelled; then runs the checks, if
/// any, in the running guest. QEMU is killed and the folder removed before it returns.
fn boot(
    (data, codec): (&Path, &Codec),
    point: &PointInfo,
    plan: &BootPlan,
    opts: &DrillOptions,
    started: Instant,
    accel: &'static str,
) -> Result<Boot, String> {
    remove_stale_folders();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}.", std::process::id()))
        .tempdir()
        .map_err(|e| format!("creating the drill's folder: {e}"))?;
    let sock = export_point((data, codec), point, dir.path())?;
    let qga = dir.path().join(QGA_SOCKET);
    let mut cmd = qemu_command(point, plan, opts, accel, &qga);
    add_disks(&mut cmd, point, plan, dir.path(), &sock)?;
    let boot_started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
    let serial = child.stdout.take().map(collect).unwrap_or_default();
    let stderr = child.stderr.take().map(collect).unwrap_or_default();
    let mut qemu = Qemu(child);
    rewind_proto::faults::point("drill-mid-boot");
    let (result, exited_silent) = watch_console(&mut qemu, &serial, &stderr, opts, boot_started);
    let boot_seconds = boot_started.elapsed().as_secs_f64();
    let (checks, healthy) = if result.is_ok() && !opts.checks.is_empty() {
        let (reports, healthy) =
            health::run_checks(&qga, &opts.checks, opts.boot_timeout, started, &opts.cancel);
        (reports, Some(healthy))
    } else {
        (Vec::new(), None)
    };
    drop(qemu);
    Ok(Boot {
        accel,
        started: !exited_silent,
        serial_tail: tail(&seen(&serial), SERIAL_TAIL),
        boot_seconds,
        result,
        checks,
        healthy,
    })
}

/// Serves every disk of the point read-only over NBD on a socket in `dir`; returns the socket.
fn export_point(
    (data, codec): (&Path, &Codec),
    point: &PointInfo,
    dir: &Path,
) -> Result<PathBuf, String> {
    let sock = dir.join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock)
        .map_err(|e| format!("binding {}: {e}", sock.display()))?;
    let exports = Exports::of_point(data, point, codec.clone());
    std::thread::spawn(move || nbd_server::serve_unix(listener, exports));
    Ok(sock)
}

/// QEMU for the plan's memory, vCPUs and machine, isolated (no network device, console on
/// stdout), with the guest-agent channel on `qga` when there are checks; disks come next.
fn qemu_command(
    point: &PointInfo,
    plan: &BootPlan,
    opts: &DrillOptions,
    accel: &str,
    qga: &Path,
) -> Command {
    // QEMU dies with the drill even when the drill is SIGKILLed (setpriv sets the parent-death
    // signal, then runs QEMU); without setpriv, only the drill's own cleanup stops it.
    let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"]);
        c
    } else {
        Command::new("qemu-system-x86_64")
    };
    cmd.args(["-name", &format!("rewind-drill-{}", point.vm)])
        .args(["-machine", plan.machine.as_str(), "-accel", accel])
        .args(["-m", &plan.memory_mib.to_string()])
        .args(["-smp", &plan.cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        // Isolated: no network device at all, console on stdout.
        .args(["-nic", "none", "-serial", "stdio", "-no-reboot"]);
    if !opts.checks.is_empty() {
        // The guest agent's channel: a serial port on a socket only this drill can reach (its
        // folder is private), not a network.
        let path = qga.display().to_string().replace(',', ",,");
        cmd.arg("-chardev")
            .arg(format!("socket,id=qga0,path={path},server=on,wait=off"))
            .args(["-device", "virtio-serial"])
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]);
    }
    cmd
}

/// Creates a throw-away qcow2 overlay in `dir` on each disk's NBD export at `sock`, and gives
/// the overlays to QEMU as its boot disks, in the plan's boot order (the firmware tries them
/// by `bootindex`, as the guest's own firmware would).
fn add_disks(
    cmd: &mut Command,
    point: &PointInfo,
    plan: &BootPlan,
    dir: &Path,
    sock: &Path,
) -> Result<(), String> {
    for (i, name) in plan.disk_order.iter().enumerate() {
        let d = point
            .disks
            .iter()
            .find(|d| &d.name == name)
            .ok_or_else(|| {
                format!("internal error: the boot plan names {name}, not in the point")
            })?;
        let overlay = dir.join(format!("{}.qcow2", d.name));
        let backing = format!("nbd+unix:///{}?socket={}", d.name, sock.display());
        let out = Command::new("qemu-img")
            .args([
                "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", &backing,
            ])
            .arg(&overlay)
            .arg(d.size.to_string())
            .output()
            .map_err(|e| format!("running qemu-img: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "creating the overlay of {}: {}",
                d.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        cmd.arg("-drive").arg(format!(
            "file={},format=qcow2,if=none,id=drive-{}",
            overlay.display(),
            d.name
        ));
        cmd.arg("-device").arg(format!(
            "virtio-blk-pci,drive=drive-{},id={},bootindex={i}",
            d.name, d.name
        ));
    }
    Ok(())
}

/// Watches the console every 50 ms until it shows the marker (Ok), or QEMU exits, the drill is
/// cancelled or the boot timeout passes (Err, the reason). Also says whether QEMU exited
/// without printing anything (it did not start).
fn watch_console(
    qemu: &mut Qemu,
    serial: &Console,
    stderr: &Console,
    opts: &DrillOptions,
    boot_started: Instant,
) -> (Result<(), String>, bool) {
    loop {
        let console = seen(serial);
        let hit = match &opts.expect_serial {
            Some(re) => re.is_match(&String::from_utf8_lossy(&console)),
            None => !console.is_empty(),
        };
        if hit {
            return (Ok(()), false);
        }
        if let Ok(Some(status)) = qemu.0.try_wait() {
            let reason = format!(
                "QEMU exited ({status}) before the boot marker: {}",
                tail(&seen(stderr), SERIAL_TAIL).trim()
            );
            return (Err(reason), console.is_empty());
        }
        if opts.cancel.load(Ordering::Relaxed) {
            return (Err("cancelled (signal) while booting".into()), false);
        }
        if boot_started.elapsed() >= opts.boot_timeout {
            let what = match &opts.expect_serial {
                Some(re) => format!("{:?} did not appear", re.as_str()),
                None => "no console output".to_owned(),
            };
            let reason = format!(
                "boot timed out after {} s: {what}; the console showed last: {:?}",
                opts.boot_timeout.as_secs(),
                tail(&console, SERIAL_TAIL)
            );
            return (Err(reason), false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::{plan, tests::libvirt, tests::point};
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn options(max_memory_mib: u64) -> DrillOptions {
        DrillOptions {
            point: None,
            boot: true,
            boot_timeout: Duration::from_secs(5),
            expect_serial: None,
            cancel: Arc::new(AtomicBool::new(false)),
            max_memory_mib,
            accel: Accel::Tcg,
            checks: Vec::new(),
            progress: Arc::new(|_: u64, _: u64| {}),
            key: crate::keys::Key::None,
            key_check: false,
        }
    }

    /// The value after each of QEMU's options `names` in a command.
    fn values(cmd: &Command, names: &[&str]) -> Vec<String> {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        names
            .iter()
            .map(|name| {
                let at = args.iter().position(|a| a == name).unwrap();
                args[at + 1].clone()
            })
            .collect()
    }

    #[test]
    fn a_libvirt_point_boots_with_its_domains_memory_cpus_and_machine() {
        let xml = "<domain type='kvm'><name>lv1</name><memory unit='GiB'>3</memory>\
                   <vcpu placement='static' current='2'>4</vcpu>\
                   <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>\
                   <devices><disk device='disk'><target dev='sda'/></disk></devices></domain>";
        let p = point(&["sda"], libvirt(xml));
        let qga = Path::new("/nonexistent/qga.sock");
        let cmd = qemu_command(&p, &plan(&p, 4096).unwrap(), &options(4096), "tcg", qga);
        assert_eq!(
            values(&cmd, &["-m", "-smp", "-machine", "-accel", "-name"]),
            ["3072", "2", "q35", "tcg", "rewind-drill-lv1"]
        );
        // Capped by what the drill may take of the host.
        let cmd = qemu_command(&p, &plan(&p, 512).unwrap(), &options(512), "tcg", qga);
        assert_eq!(
            values(&cmd, &["-m", "-smp", "-machine"]),
            ["512", "2", "q35"]
        );

        // A QEMU VM's figures, the pc machine as before.
        let qemu = serde_json::json!({"source": "qemu", "memory_bytes": 1u64 << 30, "cpus": 3});
        let p = point(&["vda"], qemu);
        let cmd = qemu_command(&p, &plan(&p, 4096).unwrap(), &options(4096), "kvm", qga);
        assert_eq!(
            values(&cmd, &["-m", "-smp", "-machine"]),
            ["1024", "3", "pc"]
        );
    }
}
