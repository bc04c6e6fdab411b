//! `rewind-receiver restore`: write disks of a point as raw (sparse), qcow2, vmdk or vhdx
//! images; `--all` writes every disk plus the VM's configuration and a QEMU command line, or
//! for a libvirt domain a definition of a clone on the restored images (`domain.xml`).

use crate::convert::{self, FORMATS};
use crate::domain_xml::{self, DriverType, NewDomain, RestoredDisk};
use crate::points::{self, PointDisk, PointInfo, PointSelector};
use crate::{catalog, restore};
use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rewind_proto::crypt::Codec;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").args(["point", "at"])))]
#[command(group(clap::ArgGroup::new("what").args(["disk", "all"]).required(true)))]
pub struct RestoreArgs {
    /// Data folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The folder's object store, s3://BUCKET[/PREFIX]: checked against the one it recorded
    /// (its packs are read from there in any case).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// The VM.
    #[arg(long)]
    pub vm: String,
    /// The disk to restore.
    #[arg(long)]
    pub disk: Option<String>,
    /// Restore every disk of the point into --out-dir, with the VM's configuration.
    #[arg(long, requires = "out_dir")]
    pub all: bool,
    /// Point id (default: the newest point).
    #[arg(long)]
    pub point: Option<i64>,
    /// The newest point created at or before this RFC 3339 time.
    #[arg(long)]
    pub at: Option<String>,
    /// Output image (with --disk).
    #[arg(long, required_unless_present = "all")]
    pub out: Option<PathBuf>,
    /// Output folder (with --all).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Image format: raw, qcow2, vmdk or vhdx.
    #[arg(long, default_value = "raw")]
    pub format: String,
    /// With --all for a libvirt domain: the name of the domain domain.xml defines (default:
    /// <original>-restored-<point id>).
    #[arg(long, requires = "all")]
    pub name: Option<String>,
    /// With --all for a libvirt domain: keep its network interfaces in domain.xml (without
    /// their MAC addresses); by default the clone has none.
    #[arg(long, requires = "all")]
    pub keep_network: bool,
    /// Overwrite outputs that exist.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub encryption: super::EncryptionArgs,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

fn bar(size: u64, msg: String) -> ProgressBar {
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(msg);
    bar
}

/// Restores one disk in the asked format; returns (bytes written for raw, seconds).
fn restore_one(
    (conn, codec): (&rusqlite::Connection, &Codec),
    a: &RestoreArgs,
    point: &PointInfo,
    disk: &PointDisk,
    out: &Path,
) -> anyhow::Result<serde_json::Value> {
    if out.exists() && !a.force {
        return Err(crate::error::StoreError::OutputExists(out.to_owned()).into());
    }
    let started = std::time::Instant::now();
    let b = bar(
        disk.size,
        format!("restore {}/{}@{}", a.vm, disk.name, point.id),
    );
    let written = if a.format == "raw" {
        let stats = restore::restore_disk(conn, (&a.data, codec), point.id, disk, out, &|pos| {
            b.set_position(pos)
        })
        .with_context(|| {
            format!(
                "restoring {} of point {} to {}",
                disk.name,
                point.id,
                out.display()
            )
        })?;
        stats.bytes_written
    } else {
        // qemu-img reads through the NBD export in its own order: the leaf map it is served
        // is checked against the point's root first.
        restore::check_leaves(conn, point.id, disk)?;
        let served = Arc::new(AtomicU64::new(0));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = {
            let (served, done, b) = (served.clone(), done.clone(), b.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    b.set_position(served.load(Ordering::Relaxed));
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
        };
        let r = convert::restore_as(
            (&a.data, codec),
            point.id,
            disk,
            &a.format,
            out,
            served.clone(),
        );
        done.store(true, Ordering::Relaxed);
        let _ = ticker.join();
        r.with_context(|| {
            format!(
                "restoring {} of point {} to {}",
                disk.name,
                point.id,
                out.display()
            )
        })?;
        served.load(Ordering::Relaxed)
    };
    b.finish_and_clear();
    Ok(serde_json::json!({
        "disk": disk.name, "out": out, "format": a.format, "size": disk.size, "root": disk.root,
        "bytes_read": written, "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// What `--all` wrote for a libvirt domain.
#[derive(Default)]
struct DomainReport {
    /// domain.xml and the name it defines.
    written: Option<(PathBuf, String)>,
    /// Why a libvirt point got no domain.xml.
    skipped: Option<String>,
}

/// Writes `dir/domain.xml` when the point is a libvirt domain's; `files` are the restored
/// disks' (name, file name in `dir`, format).
fn write_domain_xml(
    a: &RestoreArgs,
    point: &PointInfo,
    dir: &Path,
    files: &[(String, String, String)],
) -> anyhow::Result<DomainReport> {
    let Some(config) = point.config.as_ref() else {
        return Ok(DomainReport::default());
    };
    let Some(captured) = domain_xml::captured(config)? else {
        return Ok(DomainReport::default());
    };
    let Some(format) = DriverType::for_restore(&a.format) else {
        return Ok(DomainReport {
            written: None,
            skipped: Some(format!(
                "libvirt does not boot {} images as they are: restore with --format raw or \
                 qcow2 for a domain.xml",
                a.format
            )),
        });
    };
    let dir = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let disks: Vec<RestoredDisk> = files
        .iter()
        .map(|(name, file, _)| RestoredDisk {
            target: name.clone(),
            image: dir.join(file),
            format,
        })
        .collect();
    let new = NewDomain {
        name: a.name.as_deref(),
        point: point.id,
        disks: &disks,
        keep_network: a.keep_network,
    };
    let clone = domain_xml::rewrite(captured, &new)?;
    let path = dir.join("domain.xml");
    std::fs::write(&path, clone.xml).with_context(|| format!("writing {}", path.display()))?;
    Ok(DomainReport {
        written: Some((path, clone.name)),
        skipped: None,
    })
}

pub fn run(a: RestoreArgs) -> anyhow::Result<()> {
    crate::chunks::location::check(&a.data, a.store.as_deref())?;
    if !FORMATS.contains(&a.format.as_str()) {
        bail!(
            "unknown format {:?}: use raw, qcow2, vmdk or vhdx",
            a.format
        );
    }
    let conn = catalog::open_ro(&a.data)
        .with_context(|| format!("opening the catalog in {}", a.data.display()))?;
    let which = match (a.point, &a.at) {
        (Some(id), _) => PointSelector::Id(id),
        (None, Some(at)) => PointSelector::At(at.clone()),
        (None, None) => PointSelector::Newest,
    };
    let point = points::resolve(&conn, &a.vm, &which)?;
    let key = a.encryption.key()?;
    let codec = crate::keys::codec_for(&conn, &point, &key, crate::keys::Need::Plaintext)?;
    let point = crate::keys::open_point(&point, &codec)?;
    let mut reports = Vec::new();
    let mut domain = DomainReport::default();
    if a.all {
        let dir = a.out_dir.clone().context("--all needs --out-dir")?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ext = if a.format == "raw" {
            "raw"
        } else {
            a.format.as_str()
        };
        let mut files = Vec::new();
        for disk in &point.disks {
            let file = format!("{}.{ext}", disk.name);
            reports.push(restore_one(
                (&conn, &codec),
                &a,
                &point,
                disk,
                &dir.join(&file),
            )?);
            files.push((disk.name.clone(), file, a.format.clone()));
        }
        std::fs::write(
            dir.join("point.json"),
            serde_json::to_string_pretty(&point)?,
        )
        .context("writing point.json")?;
        if let Some(config) = point.config.as_ref().filter(|c| c["source"] == "qemu") {
            let script = dir.join("run-qemu.sh");
            std::fs::write(&script, convert::qemu_command(config, &files))
                .context("writing run-qemu.sh")?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        domain = write_domain_xml(&a, &point, &dir, &files).with_context(|| {
            format!(
                "the disks and point.json of point {} are restored in {}, but not domain.xml",
                point.id,
                dir.display()
            )
        })?;
    } else {
        let name = a.disk.clone().context("--disk or --all")?;
        let disk = point.disks.iter().find(|d| d.name == name).ok_or_else(|| {
            crate::error::StoreError::UnknownDisk {
                point: point.id,
                disk: name.clone(),
            }
        })?;
        let out = a.out.clone().context("--out")?;
        reports.push(restore_one((&conn, &codec), &a, &point, disk, &out)?);
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "vm": a.vm, "point": point.id, "created": point.created, "disks": reports,
                "domain_xml": domain.written.as_ref().map(|(path, _)| path),
                "domain_name": domain.written.as_ref().map(|(_, name)| name),
                "domain_xml_skipped": domain.skipped,
            })
        );
    } else {
        for r in &reports {
            println!(
                "restored {}/{} point {} ({}) to {} as {}: {} bytes, every chunk verified (root {}), {:.2}s",
                a.vm, r["disk"].as_str().unwrap_or(""), point.id, point.created,
                r["out"].as_str().unwrap_or(""), a.format, r["size"], r["root"].as_str().unwrap_or(""),
                r["seconds"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some((path, name)) = &domain.written {
            println!(
                "wrote {0}: define and start the clone with `virsh define {0}` and `virsh start {name}`",
                path.display()
            );
        }
        if let Some(why) = &domain.skipped {
            println!("no domain.xml: {why}");
        }
    }
    Ok(())
}
