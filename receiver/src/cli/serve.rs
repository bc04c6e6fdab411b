//! `rewind-receiver serve`: accept points from agents until SIGTERM or SIGINT.

use crate::config::{DrillSchedule, ReceiverFile};
use crate::error::StoreError;
use crate::schedule;
use crate::store::Store;
use anyhow::Context;
use clap::Args;
use rewind_daemon::systemd::{self, NotifyState};
use rewind_proto::report::Chain;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); the flags below override its keys. SIGHUP re-reads it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data folder holding the catalog and the packs.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Address to listen on, default 127.0.0.1:7443 (port 0 picks a free port; the chosen
    /// address is printed).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// PKI folder with ca.pem, receiver.pem and receiver.key.
    #[arg(long)]
    pub pki: Option<PathBuf>,
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
    /// Seconds between scheduled prune + gc runs (default 3600).
    #[arg(long)]
    pub prune_interval: Option<u64>,
    /// Keep packs on S3-compatible object storage, s3://BUCKET[/PREFIX] (endpoint and keys
    /// from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the
    /// [store] table). Recorded in the data folder on first use.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
}

/// The configuration file with the flags applied.
pub fn load(a: &ServeArgs) -> anyhow::Result<ReceiverFile> {
    let mut f = match &a.config {
        Some(p) => ReceiverFile::load(p)?,
        None => ReceiverFile::default(),
    };
    if a.data.is_some() {
        f.data.clone_from(&a.data);
    }
    if a.listen.is_some() {
        f.listen = a.listen;
    }
    if a.pki.is_some() {
        f.pki.clone_from(&a.pki);
    }
    if a.metrics.is_some() {
        f.metrics = a.metrics;
    }
    if a.prune_interval.is_some() {
        f.prune_interval = a.prune_interval;
    }
    if let Some(url) = &a.store {
        f.store.get_or_insert_with(Default::default).url = Some(url.clone());
    }
    let policy = a.keep.policy();
    if !policy.is_empty() {
        f.retention = Some(policy);
    }
    for (vm, p) in &a.per_vm {
        f.vm.entry(vm.clone()).or_default().retention = Some(*p);
    }
    if f.data.is_none() {
        anyhow::bail!("the data folder is not set (data = ... or --data)");
    }
    if f.pki.is_none() {
        anyhow::bail!("the PKI folder is not set (pki = ... or --pki)");
    }
    Ok(f)
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

/// Prune then gc on a schedule ([`schedule::next_prune`]), on blocking threads, with the
/// configuration in force at each run; failures are logged and retried next time.
async fn retention_loop(data: PathBuf, mut files: watch::Receiver<Arc<ReceiverFile>>) {
    let mut last = tokio::time::Instant::now();
    loop {
        let due = schedule::next_prune(last, &files.borrow());
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            changed = files.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        last = tokio::time::Instant::now();
        let file = files.borrow().clone();
        let data = data.clone();
        let r = tokio::task::spawn_blocking(move || run_retention(&data, &file)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %Chain(&e), "scheduled retention failed"),
            Err(e) => tracing::error!(error = %e, "scheduled retention crashed"),
        }
    }
}

/// One scheduled retention run: prune each VM of [`schedule::prune_plan`], then gc if any was.
fn run_retention(data: &Path, file: &ReceiverFile) -> Result<(), StoreError> {
    let mut conn = crate::catalog::open_rw(data)?;
    let vms = crate::points::list(&conn, None)?.into_iter().map(|p| p.vm);
    let plan = schedule::prune_plan(file, vms);
    for (name, p) in &plan {
        for vm in crate::prune::prune(&mut conn, Some(name), p, false)? {
            tracing::info!(vm = %vm.vm, removed = vm.removed.len(), rows = vm.rows_touched, "scheduled prune");
        }
    }
    if !plan.is_empty() {
        let g = crate::gc::gc(&mut conn, data, 6 * 3600)?;
        tracing::info!(
            chunks = g.chunks_removed,
            freed = g.bytes_before.saturating_sub(g.bytes_after),
            "scheduled gc"
        );
    }
    Ok(())
}

/// Runs each VM's scheduled drill when it is due ([`schedule::drills_due`], by the catalog's
/// record of its last drill, so a restart does not repeat one), one at a time, as a `drill`
/// child process.
async fn drill_loop(data: PathBuf, files: watch::Receiver<Arc<ReceiverFile>>) {
    let mut state = schedule::DrillState {
        serve_started_us: crate::catalog::now_us(),
        ..schedule::DrillState::default()
    };
    let mut warned = false;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let file = files.borrow().clone();
        if !warned && std::env::var_os("INVOCATION_ID").is_some() && file_has_boot_drills(&file) {
            // The shipped unit denies /dev/kvm and W+X memory (QEMU's TCG needs it).
            tracing::warn!("boot drills scheduled from serve run inside its sandbox: if QEMU cannot start there, schedule them with rewind-drill@VM.timer instead");
            warned = true;
        }
        let (d, f) = (data.clone(), file.clone());
        let last = tokio::task::spawn_blocking(move || last_drills(&d, &f)).await;
        state.last_drill_us = match last {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(error = %Chain(&e), "drill schedule: reading the catalog failed");
                continue;
            }
            Err(_) => continue,
        };
        for (vm, s) in schedule::drills_due(&file, crate::catalog::now_us(), &state) {
            state
                .attempted_us
                .insert(vm.clone(), crate::catalog::now_us());
            run_drill(&data, &vm, &s).await;
        }
    }
}

/// The start of the last recorded drill of each VM that has a drill schedule.
fn last_drills(
    data: &Path,
    file: &ReceiverFile,
) -> Result<BTreeMap<String, Option<i64>>, StoreError> {
    let conn = crate::catalog::open_ro(data)?;
    let mut out = BTreeMap::new();
    for p in crate::points::list(&conn, None)? {
        if file.drill(&p.vm).is_some() && !out.contains_key(&p.vm) {
            let last = crate::catalog::drills::last_started(&conn, &p.vm)?;
            out.insert(p.vm, last);
        }
    }
    Ok(out)
}

/// Runs one scheduled drill of `vm` as a `drill` child process and logs how it ended.
async fn run_drill(data: &Path, vm: &str, s: &DrillSchedule) {
    // The schedule's checks reach the child as a checks file that lives until it exits.
    let checks = match checks_file(&s.checks) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(vm = %vm, error = %Chain(&*e), "scheduled drill not started: writing its checks file failed");
            return;
        }
    };
    // /proc/self/exe still runs this binary after an upgrade replaced the file.
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.args(["drill", "--json", "--vm", vm, "--data"])
        .arg(data)
        .args(["--boot-timeout", &s.boot_timeout.to_string()])
        .args([
            "--accel",
            match s.accel {
                crate::drill::Accel::Auto => "auto",
                crate::drill::Accel::Kvm => "kvm",
                crate::drill::Accel::Tcg => "tcg",
            },
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if s.boot {
        cmd.arg("--boot");
    }
    if s.key_check {
        cmd.arg("--key-check");
    }
    if let Some(re) = &s.expect_serial {
        cmd.args(["--expect-serial", re]);
    }
    if let Some(f) = &checks {
        cmd.arg("--checks").arg(f.path());
    }
    for (flag, path) in [
        ("--encryption-key", &s.encryption_key),
        ("--recovery-key", &s.recovery_key),
        ("--passphrase-file", &s.passphrase_file),
    ] {
        if let Some(p) = path {
            cmd.arg(flag).arg(p);
        }
    }
    tracing::info!(vm = %vm, boot = s.boot, checks = s.checks.len(), keyed = s.encryption_key.is_some() || s.recovery_key.is_some(), "scheduled drill");
    match cmd.status().await {
        Ok(st) if st.success() => tracing::info!(vm = %vm, "scheduled drill passed"),
        Ok(_) => {
            tracing::error!(vm = %vm, "scheduled drill FAILED (see `rewind-receiver drills --vm {vm}`)")
        }
        Err(e) => tracing::error!(vm = %vm, error = %e, "scheduled drill could not start"),
    }
}

/// A temporary checks file holding `checks`, or None when there are none.
fn checks_file(
    checks: &[crate::drill::CheckSpec],
) -> anyhow::Result<Option<tempfile::NamedTempFile>> {
    if checks.is_empty() {
        return Ok(None);
    }
    let text = toml::to_string(&crate::drill::ChecksFile {
        check: checks.to_vec(),
    })?;
    let mut f = tempfile::Builder::new()
        .prefix("rewind-drill-checks.")
        .suffix(".toml")
        .tempfile()?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(Some(f))
}

fn file_has_boot_drills(f: &ReceiverFile) -> bool {
    f.drill.as_ref().is_some_and(|d| d.boot)
        || f.vm
            .values()
            .any(|v| v.drill.as_ref().is_some_and(|d| d.boot))
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let file = Arc::new(load(&a)?);
    let data = file.data.clone().unwrap_or_default();
    let pki_dir = file.pki.clone().unwrap_or_default();
    let listen = file
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7443)));
    let pki = crate::pki::load_server(&pki_dir).context("loading the receiver's certificates")?;
    match crate::admission::raise_nofile() {
        Ok(n) => tracing::info!(nofile = n, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the descriptor limit"),
    }
    let admission = crate::server::admission(&pki, file.limits.limits())
        .context("setting up TLS with the receiver's certificates")?;
    if let Some(t) = crate::pki::not_after(&pki.cert) {
        let days = (t - crate::catalog::now_us() / 1_000_000) / 86_400;
        if days < 30 {
            tracing::warn!(
                days,
                "the receiver's certificate expires soon: rewind-receiver pki renew --receiver"
            );
        }
    }
    let wanted = match &file.store {
        Some(t) => match &t.url {
            Some(url) => Some(crate::chunks::location::Location::new(url, t)?),
            None => anyhow::bail!("[store] needs url = \"s3://BUCKET[/PREFIX]\""),
        },
        None => None,
    };
    let store = Arc::new(
        Store::open_at(&data, wanted.as_ref())
            .with_context(|| format!("opening data folder {}", data.display()))?,
    );
    if let Some(loc) = crate::chunks::location::recorded(&data)? {
        tracing::info!(store = %loc.shown(), "packs on object storage");
    }
    store.set_rules(crate::store::Rules::from_file(&file));
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        println!("rewind-receiver listening on {addr}");
        systemd::notify(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("serving on {addr}")),
        ]);
        systemd::spawn_watchdog();
        if let Some(m) = file.metrics {
            let l = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("binding the metrics address {m}"))?;
            tracing::info!(addr = %m, "metrics");
            let adm = admission.clone();
            let receiver_expiry = crate::pki::not_after(&pki.cert);
            tokio::spawn(crate::metrics::serve(l, data.clone(), move || {
                crate::metrics::render_certificates(receiver_expiry, &adm.agent_expiry())
            }));
        }
        let (files_tx, files_rx) = watch::channel(file.clone());
        tokio::spawn(crate::clock::watch(data.clone()));
        tokio::spawn(retention_loop(data.clone(), files_rx.clone()));
        tokio::spawn(drill_loop(data.clone(), files_rx));
        tokio::spawn(reload_on_hangup(
            a.clone(),
            files_tx,
            hup,
            pki_dir.clone(),
            admission.clone(),
            store.clone(),
        ));
        if let Some(c) = &file.copy {
            let cfg = crate::copy::CopyConfig::from(c);
            tracing::info!(source = %cfg.source, every = cfg.every.as_secs(), "copying");
            tokio::spawn(crate::copy::run_loop(store.clone(), cfg));
        }
        if crate::chunks::location::recorded(&data)?.is_some() {
            tokio::spawn(snapshot_loop(data.clone(), store.clone()));
            tokio::spawn(lock_loop(data.clone()));
        }
        tracing::info!(%addr, data = %data.display(), "serving");
        let kept = store.clone();
        crate::server::run(listener, admission, store, shutdown_signal(term, int))
            .await
            .context("serving")?;
        // A clean stop leaves the newest commits in the bucket's catalog snapshot.
        if kept.commits() > 0 {
            let d = data.clone();
            match tokio::task::spawn_blocking(move || crate::snapshot::take(&d)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %Chain(&e), "catalog snapshot at stop failed")
                }
                Err(e) => tracing::error!(error = %e, "catalog snapshot at stop failed"),
            }
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// With packs on object storage: a catalog snapshot into the bucket at most
/// [`crate::snapshot::INTERVAL`] after each commit (commits meanwhile share it).
async fn snapshot_loop(data: PathBuf, store: Arc<Store>) {
    let mut seen = 0;
    loop {
        while store.commits() == seen {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(crate::snapshot::INTERVAL.saturating_sub(Duration::from_secs(2))).await;
        let now = store.commits();
        let d = data.clone();
        match tokio::task::spawn_blocking(move || crate::snapshot::take(&d)).await {
            Ok(Ok(_)) => seen = now,
            // Still due: tried again an interval later.
            Ok(Err(e)) => tracing::error!(error = %Chain(&e), "catalog snapshot failed"),
            Err(e) => tracing::error!(error = %e, "catalog snapshot failed"),
        }
    }
}

/// With packs on object storage: locked points' packs put under Object Lock (see
/// [`crate::object_lock`]) every [`crate::object_lock::INTERVAL`].
async fn lock_loop(data: PathBuf) {
    loop {
        tokio::time::sleep(crate::object_lock::INTERVAL).await;
        let d = data.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<usize, StoreError> {
            let conn = crate::catalog::open_rw(&d)?;
            crate::object_lock::apply(&conn, &*crate::chunks::open(&d)?)
        })
        .await;
        match done {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(packs = n, "pack objects put under Object Lock"),
            Ok(Err(e)) => tracing::error!(error = %Chain(&e), "applying Object Lock failed"),
            Err(e) => tracing::error!(error = %e, "applying Object Lock failed"),
        }
    }
}

/// SIGHUP: re-read the configuration and the PKI folder's revocation list; retention, RPO
/// targets, drill schedules and quotas change at once, and connections of newly revoked agents
/// are closed; the listen address, data folder, PKI folder, metrics address and limits change
/// at the next start.
async fn reload_on_hangup(
    a: ServeArgs,
    files: watch::Sender<Arc<ReceiverFile>>,
    mut hup: tokio::signal::unix::Signal,
    pki_dir: PathBuf,
    admission: Arc<crate::admission::Admission>,
    store: Arc<Store>,
) {
    while hup.recv().await.is_some() {
        systemd::reloading();
        match crate::pki::load_server(&pki_dir)
            .map_err(anyhow::Error::from)
            .and_then(|p| Ok(crate::server::tls_config(&p)?))
        {
            Ok((config, verifier)) => {
                let closed = admission.reload(config, verifier);
                tracing::info!(closed, "certificates and revocation list reloaded");
            }
            Err(e) => {
                tracing::error!(error = %Chain(&*e), "PKI reload refused; keeping the running certificates")
            }
        }
        match load(&a) {
            Ok(f) => {
                let old = files.borrow().clone();
                if (&old.data, old.listen, &old.pki, old.metrics)
                    != (&f.data, f.listen, &f.pki, f.metrics)
                {
                    tracing::warn!(
                        "data, listen, pki and metrics changes take effect at the next start"
                    );
                }
                store.set_rules(crate::store::Rules::from_file(&f));
                tracing::info!(vms = f.vm.len(), "configuration reloaded");
                let _ = files.send(Arc::new(f));
            }
            Err(e) => {
                tracing::error!(error = %Chain(&*e), "reload refused; keeping the running configuration")
            }
        }
        systemd::notify(&[NotifyState::Ready]);
    }
}

/// Resolves at SIGTERM or SIGINT (handlers installed by the caller before it says READY, so a
/// signal right after readiness is never fatal).
async fn shutdown_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    systemd::notify(&[NotifyState::Stopping]);
    tracing::info!("stopping: finishing requests in flight");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::CheckSpec;

    #[test]
    fn a_schedules_checks_reach_the_drill_as_a_checks_file() {
        assert!(checks_file(&[]).expect("no checks").is_none());
        let specs = [
            CheckSpec {
                name: "db".into(),
                command: vec!["sqlite3".into(), "/a b.db".into(), "PRAGMA \"x\"".into()],
                expect_exit: 2,
                expect_output: Some("^ok$".into()),
                timeout: Some(7),
            },
            CheckSpec {
                name: String::new(),
                command: vec!["true".into()],
                expect_exit: 0,
                expect_output: None,
                timeout: None,
            },
        ];
        let f = checks_file(&specs).expect("written").expect("a file");
        let checks = crate::drill::load_checks(f.path()).expect("the drill reads it");
        assert_eq!(checks.len(), 2);
        assert_eq!(checks[0].name, "db");
        assert_eq!(checks[0].command(), specs[0].command);
        assert_eq!(checks[0].expect_exit, 2);
        assert_eq!(
            checks[0].expect_output.as_ref().map(regex::Regex::as_str),
            Some("^ok$")
        );
        assert_eq!(checks[0].timeout, Some(Duration::from_secs(7)));
        assert_eq!(checks[1].name, "true");
        let path = f.path().to_owned();
        drop(f);
        assert!(!path.exists(), "removed once the drill is done");
    }
}
