//! `rewind-agent run`: the service. Protects every VM of the configuration file, each on its
//! own schedule; serves metrics; SIGHUP re-reads the file (VMs added, removed or changed take
//! effect at their next cycle); SIGTERM lets the cycles in flight finish for up to
//! `--stop-grace` seconds, then checkpoints them (their sessions resume on the next start) and
//! exits cleanly.

use crate::config::AgentFile;
use crate::service::{serve_metrics, Service};
use anyhow::{bail, Context};
use clap::Args;
use rewind_daemon::systemd::{self, NotifyState};
use rewind_proto::report::Chain;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    f.receiver_config()?;
    f.state_dir()?;
    Ok(f)
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
            tokio::spawn(serve_metrics(l, file.state_dir()?));
        }
        let mut service = Service::start(file.clone(), Duration::from_secs(a.stop_grace), a.json);
        let names: Vec<&str> = file.vm.iter().map(|v| v.name.as_str()).collect();
        systemd::notify(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("protecting {}", names.join(", "))),
        ]);
        systemd::spawn_watchdog();
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    systemd::reloading();
                    match load(&a) {
                        Ok(f) => {
                            tracing::info!(vms = f.vm.len(), "configuration reloaded");
                            service.reload(Arc::new(f));
                        }
                        Err(e) => tracing::error!(error = %Chain(&*e), "reload refused; keeping the running configuration"),
                    }
                    systemd::notify(&[NotifyState::Ready]);
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        systemd::notify(&[NotifyState::Stopping]);
        tracing::info!("stopping");
        service.stop().await;
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
