//! The service behind `rewind-agent run`: every VM of the configuration file protected by a
//! loop of its own (a cycle every interval, re-reading the file's current version before
//! each), VMs added by a reload started, VMs removed stopped and forgotten, and a stop that
//! lets cycles in flight finish within a grace period. Signals and printing stay in the CLI.

use crate::client;
use crate::config::AgentFile;
use crate::cycle::{next_due, VmLoop};
use crate::error::SyncError;
use crate::health;
use crate::sync::sync_once;
use rewind_proto::report::{self, Chain};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The VMs being protected, one task each.
pub struct Service {
    files: watch::Sender<Arc<AgentFile>>,
    stop: watch::Sender<bool>,
    tasks: HashMap<String, JoinHandle<()>>,
    grace: Duration,
    json: bool,
}

impl Service {
    /// Starts protecting every VM of `file`. `grace`: how long a cycle in flight may still
    /// run after [`Service::stop`]; `json`: print each committed point as a JSON line.
    pub fn start(file: Arc<AgentFile>, grace: Duration, json: bool) -> Service {
        let (files, _) = watch::channel(file.clone());
        let (stop, _) = watch::channel(false);
        let mut s = Service {
            files,
            stop,
            tasks: HashMap::new(),
            grace,
            json,
        };
        s.spawn_new(&file);
        s
    }

    /// Takes a re-read configuration: changed VMs see it at their next cycle, new ones start,
    /// removed ones stop after their cycle in flight.
    pub fn reload(&mut self, file: Arc<AgentFile>) {
        // The new file first: a task started for a new VM must find it (`send_replace` stores
        // it even while no loop listens).
        self.files.send_replace(file.clone());
        self.spawn_new(&file);
    }

    fn spawn_new(&mut self, file: &AgentFile) {
        self.tasks.retain(|_, t| !t.is_finished());
        for v in &file.vm {
            if !self.tasks.contains_key(&v.name) {
                let (interval, rpo) = file.timing(v);
                tracing::info!(vm = %v.name, interval, rpo, "protecting");
                let task = protect(
                    v.name.clone(),
                    self.files.subscribe(),
                    self.stop.subscribe(),
                    self.grace,
                    self.json,
                );
                self.tasks.insert(v.name.clone(), tokio::spawn(task));
            }
        }
    }

    /// Stops every loop: cycles in flight finish within the grace period or are checkpointed
    /// (their sessions resume on the next start). Returns once all loops ended.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for (_, t) in self.tasks {
            let _ = t.await;
        }
    }
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
        // On the runtime's clock, which the loop's waits use (and tests can pause).
        let started = tokio::time::Instant::now();
        // A configuration the file no longer allows (a reload changed it) fails this cycle as
        // a configuration error; the loop goes on and takes the next reload.
        let cfg = file
            .cycle(entry)
            .and_then(|c| Ok((c, file.receiver_config()?)))
            .map_err(|e| report::chain(&e));
        let state = file.state.clone().unwrap_or_default();
        let cycle = async {
            let (cfg, receiver) = cfg.as_ref().map_err(|e| SyncError::Config(e.clone()))?;
            let mut c = client::connect(receiver).await?;
            sync_once(&mut c, cfg, Arc::new(|_, _| {})).await
        };
        let release = cfg.as_ref().ok().map(|(c, _)| c);
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
        if !wait_next(&name, started, interval, &mut files, &mut stop).await {
            return;
        }
    }
}

/// Waits for the next cycle: one interval after this one started (at once when it ran
/// longer); a reload re-reads the interval. False when the agent stops.
async fn wait_next(
    name: &str,
    started: tokio::time::Instant,
    interval: u64,
    files: &mut watch::Receiver<Arc<AgentFile>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut due = next_due(started, interval);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => return true,
            _ = stopped(stop) => return false,
            changed = files.changed() => {
                if changed.is_err() {
                    return false;
                }
                let f = files.borrow().clone();
                match f.vm.iter().find(|v| v.name == name) {
                    None => return true,
                    Some(e) => due = next_due(started, f.timing(e).0),
                }
            }
        }
    }
}

/// Serves the agent's metrics from its state database.
pub async fn serve_metrics(listener: tokio::net::TcpListener, state: PathBuf) {
    rewind_daemon::metrics::serve(listener, move || {
        crate::state::open(&state)
            .and_then(|c| health::render(&c, health::now_us()))
            .ok()
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use tokio::time::{sleep, Instant};

    /// A file protecting VM `a` every `interval` seconds, or only VM `b` when None.
    fn file(interval: Option<u64>) -> Arc<AgentFile> {
        let text = match interval {
            Some(i) => format!("[[vm]]\nname = \"a\"\nqmp = \"/q\"\ninterval = {i}\n"),
            None => "[[vm]]\nname = \"b\"\nqmp = \"/q\"\n".to_owned(),
        };
        Arc::new(toml::from_str(&text).unwrap())
    }

    /// How `wait_next` for VM `a` (interval 30 s, its cycle started now) ends when `meanwhile`
    /// runs beside it with the file and stop senders, and how long it waited on the runtime's
    /// paused clock.
    async fn wait_with<M, F>(meanwhile: M) -> (bool, Duration)
    where
        M: FnOnce(watch::Sender<Arc<AgentFile>>, watch::Sender<bool>) -> F,
        F: Future<Output = ()>,
    {
        let (files, mut files_rx) = watch::channel(file(Some(30)));
        let (stop, mut stop_rx) = watch::channel(false);
        files_rx.borrow_and_update();
        let started = Instant::now();
        let waited = async {
            let next = wait_next("a", started, 30, &mut files_rx, &mut stop_rx).await;
            (next, started.elapsed())
        };
        tokio::join!(waited, meanwhile(files, stop)).0
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_cycle_waits_an_interval_from_the_start_and_a_reload_rereads_it() {
        let s = Duration::from_secs;
        // Nothing happens: due 30 s after the start.
        let quiet = wait_with(|files, stop| async move {
            sleep(s(100)).await;
            drop((files, stop));
        });
        assert_eq!(quiet.await, (true, s(30)));
        // At 5 s a reload sets 10 s: due at 10 s, counted from the same start.
        let shorter = wait_with(|files, stop| async move {
            sleep(s(5)).await;
            files.send_replace(file(Some(10)));
            sleep(s(100)).await;
            drop(stop);
        });
        assert_eq!(shorter.await, (true, s(10)));
        // At 5 s a reload sets 3 s: already due.
        let past = wait_with(|files, stop| async move {
            sleep(s(5)).await;
            files.send_replace(file(Some(3)));
            sleep(s(100)).await;
            drop(stop);
        });
        assert_eq!(past.await, (true, s(5)));
        // At 7 s the VM leaves the file: the loop looks at once (and stops protecting it).
        let removed = wait_with(|files, stop| async move {
            sleep(s(7)).await;
            files.send_replace(file(None));
            sleep(s(100)).await;
            drop(stop);
        });
        assert_eq!(removed.await, (true, s(7)));
        // At 4 s the agent stops: no next cycle.
        let stopped = wait_with(|files, stop| async move {
            sleep(s(4)).await;
            stop.send_replace(true);
            sleep(s(100)).await;
            drop(files);
        });
        assert_eq!(stopped.await, (false, s(4)));
    }
}
