//! `rewind-receiver serve`: accept points from agents until SIGTERM or SIGINT.

use crate::store::Store;
use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data folder holding the catalog and the packs.
    #[arg(long)]
    pub data: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// PKI folder with ca.pem, receiver.pem and receiver.key.
    #[arg(long)]
    pub pki: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP: keep it on loopback or a
    /// monitoring network).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Retention for every VM, applied by prune + gc every --prune-interval seconds.
    #[command(flatten)]
    pub keep: super::KeepArgs,
    /// Retention for one VM instead of the --keep-* defaults, as VM:RULE=N[,RULE=N...] with
    /// RULE one of last, hourly, daily, weekly, monthly, yearly (repeatable).
    #[arg(long = "retention", value_name = "VM:RULES", value_parser = parse_vm_policy)]
    pub per_vm: Vec<(String, crate::retention::Policy)>,
    /// Seconds between scheduled prune + gc runs (with any --keep-* rule).
    #[arg(long, default_value_t = 3600)]
    pub prune_interval: u64,
}

fn parse_vm_policy(spec: &str) -> Result<(String, crate::retention::Policy), String> {
    let (vm, rules) = spec
        .split_once(':')
        .ok_or("expected VM:RULE=N[,RULE=N...]")?;
    rewind_proto::names::vm(vm).map_err(|e| e.to_string())?;
    let mut p = crate::retention::Policy::default();
    for rule in rules.split(',') {
        let (k, n) = rule
            .split_once('=')
            .ok_or_else(|| format!("{rule:?}: expected RULE=N"))?;
        let n: u32 = n
            .parse()
            .map_err(|_| format!("{rule:?}: N must be a number"))?;
        let slot = match k {
            "last" => &mut p.last,
            "hourly" => &mut p.hourly,
            "daily" => &mut p.daily,
            "weekly" => &mut p.weekly,
            "monthly" => &mut p.monthly,
            "yearly" => &mut p.yearly,
            other => return Err(format!("unknown rule {other:?}")),
        };
        *slot = Some(n);
    }
    Ok((vm.to_owned(), p))
}

/// Prune then gc on a schedule, on blocking threads; failures are logged and retried next time.
async fn retention_loop(
    data: PathBuf,
    policy: crate::retention::Policy,
    per_vm: Vec<(String, crate::retention::Policy)>,
    every: u64,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(every.max(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let data = data.clone();
        let per_vm = per_vm.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<(), crate::error::StoreError> {
            let mut conn = crate::catalog::open_rw(&data)?;
            let vms: Vec<String> = crate::points::list(&conn, None)?
                .into_iter()
                .map(|p| p.vm)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            for name in vms {
                let p = per_vm.iter().find(|(v, _)| *v == name).map_or(policy, |(_, p)| *p);
                if p.is_empty() {
                    continue;
                }
                for vm in crate::prune::prune(&mut conn, Some(&name), &p, false)? {
                    tracing::info!(vm = %vm.vm, removed = vm.removed.len(), rows = vm.rows_touched, "scheduled prune");
                }
            }
            let g = crate::gc::gc(&mut conn, &data, 6 * 3600)?;
            tracing::info!(chunks = g.chunks_removed, freed = g.bytes_before.saturating_sub(g.bytes_after), "scheduled gc");
            Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "scheduled retention failed"),
            Err(e) => tracing::error!(error = %e, "scheduled retention crashed"),
        }
    }
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let pki = crate::pki::load_server(&a.pki).context("loading the receiver's certificates")?;
    let store = Arc::new(
        Store::open(&a.data)
            .with_context(|| format!("opening data folder {}", a.data.display()))?,
    );
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        println!("rewind-receiver listening on {addr}");
        rewind_proto::systemd::notify(&format!("READY=1\nSTATUS=serving on {addr}"));
        if let Some(every) = rewind_proto::systemd::watchdog_interval() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    rewind_proto::systemd::notify("WATCHDOG=1");
                }
            });
        }
        if let Some(m) = a.metrics {
            let l = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("binding the metrics address {m}"))?;
            tracing::info!(addr = %m, "metrics");
            tokio::spawn(crate::metrics::serve(l, a.data.clone()));
        }
        let policy = a.keep.policy();
        if !policy.is_empty() || !a.per_vm.is_empty() {
            tracing::info!(?policy, per_vm = ?a.per_vm, every = a.prune_interval, "scheduled retention");
            tokio::spawn(retention_loop(
                a.data.clone(),
                policy,
                a.per_vm.clone(),
                a.prune_interval,
            ));
        }
        tracing::info!(%addr, data = %a.data.display(), "serving");
        crate::server::run(listener, &pki, store, shutdown_signal())
            .await
            .context("serving")?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    wait_for_signal().await;
    rewind_proto::systemd::notify("STOPPING=1");
    tracing::info!("stopping: finishing requests in flight");
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
