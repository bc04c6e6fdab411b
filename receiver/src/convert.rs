//! Restoring a point's disk into an image format other than raw (qcow2, vmdk, vhdx): the point
//! is served over NBD from the store on a private unix socket, and `qemu-img convert` reads it,
//! skipping holes through `base:allocation`, so no raw copy is ever materialised.

use crate::nbd_server::{self, Export, Exports, Served};
use crate::points::PointDisk;
use std::path::Path;
use std::process::{Command, Stdio};
use thiserror::Error;

/// Formats `restore --format` writes.
pub const FORMATS: [&str; 4] = ["raw", "qcow2", "vmdk", "vhdx"];

#[derive(Debug, Error)]
pub enum ConvertError {
    /// The format is not one of [`FORMATS`].
    #[error("unknown format {0:?}: use raw, qcow2, vmdk or vhdx")]
    Format(String),
    /// A file or socket operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// qemu-img failed.
    #[error("qemu-img convert failed: {0}")]
    QemuImg(String),
}

/// Writes disk `disk` of point `point` to `out` in `format` (not raw). `served` counts the bytes
/// read from the store, for progress.
pub fn restore_as(
    (data, codec): (&Path, &rewind_proto::crypt::Codec),
    point: i64,
    disk: &PointDisk,
    format: &str,
    out: &Path,
    served: Served,
) -> Result<(), ConvertError> {
    if !FORMATS.contains(&format) || format == "raw" {
        return Err(ConvertError::Format(format.to_owned()));
    }
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock)?;
    let exports = Exports {
        data: data.to_owned(),
        list: vec![Export {
            name: disk.name.clone(),
            point,
            disk: disk.clone(),
        }],
        served,
        codec: codec.clone(),
    };
    std::thread::spawn(move || nbd_server::serve_unix(listener, exports));
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = out.with_file_name(format!(".{file_name}.rewind-partial"));
    let _ = std::fs::remove_file(&tmp);
    let src = format!("nbd+unix:///{}?socket={}", disk.name, sock.display());
    let output = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", format])
        .arg(&src)
        .arg(&tmp)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(ConvertError::QemuImg(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// A shell script that boots the restored disks with QEMU, from a captured QEMU configuration.
pub fn qemu_command(config: &serde_json::Value, disks: &[(String, String, String)]) -> String {
    let mut lines = vec![
        "#!/bin/sh".to_owned(),
        "# Boots the restored disks with the VM's captured configuration.".to_owned(),
        "# Isolated like a drill: -nodefaults -nic none, so QEMU adds no network device (nor"
            .to_owned(),
        "# its default e1000 on user networking). Add yours before attaching this VM to a"
            .to_owned(),
        "# network: a VM restored after a compromise must not reach one by default.".to_owned(),
        "cd \"$(dirname \"$0\")\"".to_owned(),
        "exec qemu-system-x86_64 \\".to_owned(),
    ];
    if let Some(name) = config["name"].as_str() {
        lines.push(format!("  -name '{}' \\", name.replace('\'', "")));
    }
    let mem_mib = config["memory_bytes"]
        .as_u64()
        .map_or(1024, |b| (b >> 20).max(64));
    lines.push(format!("  -m {mem_mib} \\"));
    if let Some(cpus) = config["cpus"].as_u64() {
        lines.push(format!("  -smp {cpus} \\"));
    }
    lines.push("  -accel kvm -accel tcg -nodefaults -nic none -vga std \\".to_owned());
    for (name, file, format) in disks {
        lines.push(format!(
            "  -drive file={file},format={format},if=none,id=drive-{name} -device virtio-blk-pci,drive=drive-{name},id={name} \\"
        ));
    }
    lines.push("  \"$@\"".to_owned());
    lines.join("\n") + "\n"
}
