//! `rewind-agent run`: the service. Protects every VM of the configuration file, each on its
//! own schedule; serves metrics; SIGHUP re-reads the file (VMs added, removed or changed take
//! effect at their next cycle); SIGTERM lets the cycles in flight finish for up to
//! `--stop-grace` seconds, then checkpoints them (their sessions resume on the next start) and
//! exits cleanly.

use crate::client::{self, ReceiverConfig};
use crate::config::{parse_disk, AgentFile, VmEntry};
use crate::cycle::VmLoop;
use crate::health;
use crate::sync::{sync_once, LiveSource, SyncConfig};
use anyhow::{bail, Context};
use clap::Args;
use rewind_proto::format::{BlockSize, DEFAULT_BLOCK_SIZE};
use rewind_proto::report::{self, Chain};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Configuration file (TOML); the flags below override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Receiver URL, e.g. https://backup.example.net:7443.
    #[arg(long)]
    pub receiver: Option<String>,
    /// CA certificate that signed the receiver's certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This agent's certificate.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This agent's private key.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Folder for the agent's state database.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Seconds between points (every VM without its own).
    #[arg(long)]
    pub interval: Option<u64>,
    /// RPO target in seconds (every VM without its own).
    #[arg(long)]
    pub rpo: Option<u64>,
    /// Upload limit in MB/s outside bandwidth windows.
    #[arg(long, value_name = "MB_PER_SEC")]
    pub bwlimit: Option<f64>,
    /// Block size in bytes.
    #[arg(long)]
    pub block_size: Option<u64>,
    /// Only these VMs of the file (repeatable).
    #[arg(long = "only", value_name = "VM")]
    pub only: Vec<String>,
    /// Seconds a cycle in flight may still run after SIGTERM before it is checkpointed.
    #[arg(long, default_value_t = 30)]
    pub stop_grace: u64,
    /// Print each committed point as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The file with the flags applied, checked.
pub fn load(a: &RunArgs) -> anyhow::Result<AgentFile> {
    let mut f = match &a.config {
        Some(p) => AgentFile::load(p)?,
        None => AgentFile::default(),
    };
    macro_rules! over {
        ($($flag:ident => $($key:ident).+),* $(,)?) => {
            $(if let Some(v) = &a.$flag { f.$($key).+ = Some(v.clone()); })*
        };
    }
    over!(receiver => receiver.url, ca => receiver.ca, cert => receiver.cert,
          key => receiver.key, state => state, metrics => metrics, interval => interval,
          rpo => rpo, bwlimit => bwlimit, block_size => block_size);
    if !a.only.is_empty() {
        for name in &a.only {
            if !f.vm.iter().any(|v| &v.name == name) {
                bail!("--only {name}: no such VM in the configuration");
            }
        }
        f.vm.retain(|v| a.only.contains(&v.name));
    }
    f.check()?;
    if f.vm.is_empty() {
        bail!("no VMs to protect: list them as [[vm]] entries in the configuration file");
    }
    receiver(&f)?;
    state_dir(&f)?;
    Ok(f)
}

fn receiver(f: &AgentFile) -> anyhow::Result<ReceiverConfig> {
    let r = &f.receiver;
    match (&r.url, &r.ca, &r.cert, &r.key) {
        (Some(url), Some(ca), Some(cert), Some(key)) => Ok(ReceiverConfig {
            url: url.clone(),
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => bail!(
            "the receiver needs url, ca, cert and key ([receiver] or --receiver/--ca/--cert/--key)"
        ),
    }
}

fn state_dir(f: &AgentFile) -> anyhow::Result<PathBuf> {
    f.state
        .clone()
        .context("the state folder is not set (state = ... or --state)")
}

/// The cycle of `vm` as the file describes it now.
fn plan(f: &AgentFile, vm: &VmEntry) -> anyhow::Result<SyncConfig> {
    let (disks, live) = match &vm.qmp {
        Some(qmp) => (
            Vec::new(),
            Some(LiveSource {
                qmp: qmp.clone(),
                guest_agent: vm.guest_agent.clone(),
                only: vm.disks.clone(),
            }),
        ),
        None => (
            vm.disks
                .iter()
                .map(|d| parse_disk(d))
                .collect::<Result<Vec<_>, _>>()?,
            None,
        ),
    };
    Ok(SyncConfig {
        vm: vm.name.clone(),
        disks,
        live,
        block_size: BlockSize::new(
            vm.block_size
                .or(f.block_size)
                .unwrap_or(DEFAULT_BLOCK_SIZE as u64),
        )?,
        state_dir: state_dir(f)?,
        bwlimit: {
            let (f, vm) = (f.clone(), vm.clone());
            crate::sync::Bandwidth(Arc::new(move || {
                f.bwlimit_at(&vm, time::OffsetDateTime::now_utc())
            }))
        },
    })
}

/// Resolves when the stop flag is raised.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// One VM's loop: a cycle every interval until the VM leaves the configuration or the agent
/// stops.
async fn protect(
    name: String,
    mut files: watch::Receiver<Arc<AgentFile>>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    json: bool,
) {
    let mut vm_loop = VmLoop::new(&name);
    loop {
        if *stop.borrow() {
            return;
        }
        let file = files.borrow_and_update().clone();
        let Some(entry) = file.vm.iter().find(|v| v.name == name) else {
            tracing::info!(vm = %name, "no longer in the configuration: stopped protecting it");
            // Its points stay on the receiver; `status` no longer reports it.
            if let Some(state) = &file.state {
                if let Ok(conn) = crate::state::open(state) {
                    let _ = health::forget(&conn, &name);
                }
            }
            return;
        };
        let (interval, rpo) = file.timing(entry);
        let started = Instant::now();
        let cfg = plan(&file, entry);
        let state = file.state.clone().unwrap_or_default();
        let receiver_cfg = receiver(&file);
        let cycle = async {
            let cfg = cfg
                .as_ref()
                .map_err(|e| crate::error::SyncError::Worker(report::chain(&**e)))?;
            let rcfg =
                receiver_cfg.map_err(|e| crate::error::SyncError::Worker(report::chain(&*e)))?;
            let mut c = client::connect(&rcfg).await?;
            sync_once(&mut c, cfg, Arc::new(|_, _| {})).await
        };
        let release = cfg.as_ref().ok();
        let ended = vm_loop
            .cycle(&state, rpo, cycle, release, stopped(&mut stop), grace)
            .await;
        let Some(outcome) = ended.outcome else {
            tracing::warn!(vm = %name, "checkpointed: the point in flight resumes on the next start");
            return;
        };
        let seconds = started.elapsed().as_secs_f64();
        match &outcome {
            Ok(r) => {
                crate::sync::log_committed(r);
                if json {
                    if let Ok(line) = serde_json::to_string(r) {
                        println!("{line}");
                    }
                }
            }
            Err(e) => {
                tracing::error!(vm = %name, kind = e.kind(), error = %Chain(e), seconds = format!("{seconds:.2}"), "cycle failed; retrying next interval")
            }
        }
        // Next cycle one interval after this one started (at once when it ran longer); a
        // reload re-reads the interval.
        let mut due = started + Duration::from_secs(interval.max(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => break,
                _ = stopped(&mut stop) => return,
                changed = files.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let f = files.borrow().clone();
                    match f.vm.iter().find(|v| v.name == name) {
                        None => break,
                        Some(e) => due = started + Duration::from_secs(f.timing(e).0.max(1)),
                    }
                }
            }
        }
    }
}

/// Serves the agent's metrics from its state database.
async fn serve_metrics(listener: tokio::net::TcpListener, state: PathBuf) {
    rewind_proto::scrape::serve(listener, move || {
        crate::state::open(&state)
            .and_then(|c| health::render(&c))
            .ok()
    })
    .await;
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let file = Arc::new(load(&a)?);
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        if let Some(m) = file.metrics {
            let l = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("binding the metrics address {m}"))?;
            let addr = l.local_addr()?;
            tracing::info!(%addr, "metrics");
            println!("rewind-agent metrics on http://{addr}/metrics");
            tokio::spawn(serve_metrics(l, state_dir(&file)?));
        }
        let (files_tx, files_rx) = watch::channel(file.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let grace = Duration::from_secs(a.stop_grace);
        let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let spawn_new = |f: &AgentFile, tasks: &mut HashMap<String, tokio::task::JoinHandle<()>>| {
            tasks.retain(|_, t| !t.is_finished());
            for v in &f.vm {
                if !tasks.contains_key(&v.name) {
                    let (i, r) = f.timing(v);
                    tracing::info!(vm = %v.name, interval = i, rpo = r, "protecting");
                    tasks.insert(
                        v.name.clone(),
                        tokio::spawn(protect(v.name.clone(), files_rx.clone(), stop_rx.clone(), grace, a.json)),
                    );
                }
            }
        };
        spawn_new(&file, &mut tasks);
        let names: Vec<&str> = file.vm.iter().map(|v| v.name.as_str()).collect();
        rewind_proto::systemd::notify(&format!("READY=1\nSTATUS=protecting {}", names.join(", ")));
        rewind_proto::systemd::spawn_watchdog();
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    rewind_proto::systemd::notify("RELOADING=1");
                    match load(&a) {
                        Ok(f) => {
                            let f = Arc::new(f);
                            tracing::info!(vms = f.vm.len(), "configuration reloaded");
                            // The new file first: a task started for a new VM must find it.
                            let _ = files_tx.send(f.clone());
                            spawn_new(&f, &mut tasks);
                        }
                        Err(e) => tracing::error!(error = %Chain(&*e), "reload refused; keeping the running configuration"),
                    }
                    rewind_proto::systemd::notify("READY=1");
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        rewind_proto::systemd::notify("STOPPING=1");
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
        for (_, t) in tasks {
            let _ = t.await;
        }
        // The runtime's end would cancel the thaws still going on in the background.
        if crate::sync::thaws_in_flight() {
            tracing::info!(limit = crate::live::KEEP_THAWING_MAX.as_secs(), "waiting for a guest thaw to be confirmed (signal again to skip)");
            tokio::select! {
                _ = crate::sync::wait_thaws(crate::live::KEEP_THAWING_MAX) => {}
                _ = term.recv() => tracing::warn!("exiting before a guest thaw was confirmed: the next start thaws the guest"),
                _ = int.recv() => tracing::warn!("exiting before a guest thaw was confirmed: the next start thaws the guest"),
            }
        }
        tracing::info!("stopped");
        Ok(())
    })
}
