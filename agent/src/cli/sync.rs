//! `rewind-agent sync`: one point with `--once`, otherwise one every `--interval` seconds.

use crate::client;
use crate::sync::{sync_once, DiskSource, LiveSource, Progress, SyncConfig, SyncReport};
use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rewind_daemon::systemd::{self, NotifyState};
use rewind_proto::format::{BlockSize, DEFAULT_BLOCK_SIZE};
use rewind_proto::report::Chain;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub conn: super::ReceiverArgs,
    /// Folder for the agent's state database.
    #[arg(long)]
    pub state: PathBuf,
    /// The VM's name.
    #[arg(long)]
    pub vm: String,
    /// A disk as NAME=PATH (raw image or block device) or NAME=qcow2:PATH (offline qcow2 image
    /// with a persistent bitmap); repeat for each disk. With --qmp, just NAME limits the disks.
    #[arg(long = "disk", value_name = "NAME=PATH")]
    pub disks: Vec<String>,
    /// QMP socket of a running QEMU VM: its disks are discovered and captured live.
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// QEMU guest agent socket: freeze the guest's file systems around each capture.
    #[arg(long, value_name = "SOCKET", requires = "qmp")]
    pub guest_agent: Option<PathBuf>,
    /// libvirt connection URI (e.g. qemu:///system) of a libvirt-managed VM, with --domain:
    /// each point is a pull-mode backup job with a checkpoint.
    #[arg(long, value_name = "URI", requires = "domain", conflicts_with = "qmp")]
    pub libvirt: Option<String>,
    /// The libvirt domain's name.
    #[arg(long, value_name = "NAME", requires = "libvirt")]
    pub domain: Option<String>,
    /// Freeze the libvirt guest's file systems through its guest agent around each job.
    #[arg(long, requires = "libvirt")]
    pub freeze: bool,
    /// Free space (MiB) a libvirt backup job must leave in the state folder beyond what its
    /// scratch files are expected to need; a job that would not is not started.
    #[arg(long, value_name = "MIB", default_value_t = crate::libvirt::DEFAULT_SCRATCH_RESERVE_MIB, requires = "libvirt")]
    pub scratch_reserve_mib: u64,
    /// Take one point and exit.
    #[arg(long)]
    pub once: bool,
    /// Seconds between points without --once.
    #[arg(long, default_value_t = 60)]
    pub interval: u64,
    /// Block size in bytes (power of two, 4 KiB to 4 MiB).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE as u64)]
    pub block_size: u64,
    /// Limit the compressed upload rate, in MB/s.
    #[arg(long, value_name = "MB_PER_SEC")]
    pub bwlimit: Option<f64>,
    #[command(flatten)]
    pub encryption: super::EncryptionArgs,
    /// Pad encrypted chunks to 4 KiB buckets, so their sizes tell less about the data's
    /// compressibility (costs storage).
    #[arg(long, requires = "encryption_key")]
    pub pad_chunks: bool,
    /// Print each point as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_disk(spec: &str) -> anyhow::Result<DiskSource> {
    Ok(crate::config::parse_disk(spec)?)
}

fn print(report: &SyncReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "point {} of {} committed ({}), {} bytes sent in {:.2}s{}",
            report.point,
            report.vm,
            report.created,
            report.sent_bytes,
            report.seconds,
            if report.resumed { ", resumed" } else { "" }
        );
        for d in &report.disks {
            println!(
                "  {:<8} {:>14} B  {:<5}  {:>9} changed  {:>12} B read  {:>12} B sent  root {}",
                d.name, d.size, d.mode, d.changed_blocks, d.read_bytes, d.sent_bytes, d.root
            );
        }
    }
    Ok(())
}

/// SIGTERM and SIGINT, in every mode: a cycle between a guest freeze and its thaw finishes its
/// thaw before the agent exits (see [`crate::sync::finish_freeze`]).
struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    fn install() -> anyhow::Result<Stop> {
        Ok(Stop {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Before the agent exits: waits for the guest thaws still going on in the background (at most
/// [`crate::live::KEEP_THAWING_MAX`]), unless a further signal says not to wait.
async fn drain_thaws(stop: &mut Stop) {
    if !crate::sync::thaws_in_flight() {
        return;
    }
    tracing::info!(
        limit = crate::live::KEEP_THAWING_MAX.as_secs(),
        "waiting for the guest thaw to be confirmed before exiting (signal again to skip)"
    );
    tokio::select! {
        _ = crate::sync::wait_thaws(crate::live::KEEP_THAWING_MAX) => {}
        _ = stop.recv() => tracing::warn!(
            "exiting before the guest thaw was confirmed: the next run thaws the guest"
        ),
    }
}

pub fn run(a: SyncArgs) -> anyhow::Result<()> {
    let libvirt = match (&a.libvirt, &a.domain) {
        (Some(uri), Some(domain)) => {
            for d in &a.disks {
                if d.contains('=') {
                    bail!("--disk {d:?}: with --libvirt, name disks only (their paths come from libvirt)");
                }
                rewind_proto::names::disk(d)?;
            }
            Some(crate::libvirt::LibvirtSource {
                uri: uri.clone(),
                domain: domain.clone(),
                freeze: a.freeze,
                scratch_reserve: a.scratch_reserve_mib << 20,
                only: a.disks.clone(),
            })
        }
        _ => None,
    };
    let (disks, live) = match &a.qmp {
        _ if libvirt.is_some() => (Vec::new(), None),
        Some(qmp) => {
            for d in &a.disks {
                if d.contains('=') {
                    bail!("--disk {d:?}: with --qmp, name disks only (their paths come from QEMU)");
                }
                rewind_proto::names::disk(d)?;
            }
            let live = LiveSource {
                qmp: qmp.clone(),
                guest_agent: a.guest_agent.clone(),
                only: a.disks.clone(),
            };
            (Vec::new(), Some(live))
        }
        None if a.disks.is_empty() => {
            bail!("give the disks with --disk NAME=PATH, or a running VM with --qmp or --libvirt")
        }
        None => (
            a.disks
                .iter()
                .map(|d| parse_disk(d))
                .collect::<anyhow::Result<Vec<_>>>()?,
            None,
        ),
    };
    if a.bwlimit.is_some_and(|mb| mb.is_nan() || mb <= 0.0) {
        bail!("--bwlimit must be positive (MB/s)");
    }
    let block_size = BlockSize::new(a.block_size)?;
    let cfg = SyncConfig {
        vm: a.vm.clone(),
        disks,
        live,
        libvirt,
        block_size,
        state_dir: a.state.clone(),
        bwlimit: crate::sync::Bandwidth::fixed(a.bwlimit.map(|mb| (mb * 1e6) as u64)),
        codec: a.encryption.codec(a.pad_chunks)?,
    };
    let receiver = a.conn.config();
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        // Every mode stops cleanly on SIGTERM or SIGINT: between cycles at once; during one,
        // the cycle is dropped (its session resumes on the next run) unless guest file systems
        // are frozen, when the capture and thaw finish first (live::FREEZE_PHASE_MAX at most).
        // Thaws still going on in the background are waited for before exiting.
        let mut stop = Stop::install()?;
        let r = cycles(&a, &cfg, &receiver, &mut stop).await;
        drain_thaws(&mut stop).await;
        r
    })
}

/// Runs the cycles: one with `--once`, else one every interval until stopped.
async fn cycles(
    a: &SyncArgs,
    cfg: &SyncConfig,
    receiver: &client::ReceiverConfig,
    stop: &mut Stop,
) -> anyhow::Result<()> {
    if !a.once {
        systemd::notify(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("protecting {}", cfg.vm)),
        ]);
        systemd::spawn_watchdog();
    }
    let mut vm_loop = crate::cycle::VmLoop::new(&cfg.vm);
    loop {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("sync {}", cfg.vm));
        let progress: Progress = {
            let bar = bar.clone();
            Arc::new(move |pos, total| {
                bar.set_length(total);
                bar.set_position(pos);
            })
        };
        let rpo = 2 * a.interval.max(1);
        let cycle = async {
            let mut c = client::connect(receiver).await?;
            sync_once(&mut c, cfg, progress).await
        };
        // No grace: a stopped cycle checkpoints at once (but never inside a guest freeze).
        let ended = vm_loop
            .cycle(
                &cfg.state_dir,
                rpo,
                cycle,
                Some(cfg),
                stop.recv(),
                Duration::ZERO,
            )
            .await;
        bar.finish_and_clear();
        let result = match ended.outcome {
            Some(r) if !ended.stopping => r,
            _ => {
                if a.once {
                    bail!("stopped before the point of VM {} was committed: it resumes on the next run", cfg.vm);
                }
                systemd::notify(&[NotifyState::Stopping]);
                tracing::warn!(vm = %cfg.vm, "stopped: the point in flight resumes on the next run");
                return Ok(());
            }
        };
        match result {
            Ok(report) => {
                crate::sync::log_committed(&report);
                print(&report, a.json)?
            }
            Err(e) if a.once => {
                return Err(anyhow::Error::new(e).context(format!("syncing VM {}", cfg.vm)))
            }
            Err(e) => {
                tracing::error!(vm = %cfg.vm, error = %Chain(&e), "cycle failed; retrying next interval")
            }
        }
        if a.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep_until(crate::cycle::next_due(tokio::time::Instant::now(), a.interval)) => {}
            _ = stop.recv() => {
                systemd::notify(&[NotifyState::Stopping]);
                return Ok(());
            }
        }
    }
}
