//! One cycle of one VM as the agent's loops run it (`run`, for every VM of its configuration,
//! and `sync --interval`, for one): its health record (started, ended, achieved RPO on the
//! monotonic clock) and a stop that lets the point in flight finish within a grace period,
//! never cuts a guest freeze short, and leaves the VM clean.

use crate::error::SyncError;
use crate::health;
use crate::sync::{SyncConfig, SyncReport};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a cycle ended.
pub struct Ended {
    /// Its result; None when a stop dropped it (the point in flight was checkpointed and
    /// resumes on the next run).
    pub outcome: Option<Result<SyncReport, SyncError>>,
    /// Whether a stop came during the cycle.
    pub stopping: bool,
}

/// One VM's loop: what its cycles need to know of each other.
pub struct VmLoop {
    vm: String,
    /// When the cycle that took the newest point of this process started.
    last_capture: Option<Instant>,
}

impl VmLoop {
    pub fn new(vm: &str) -> VmLoop {
        VmLoop {
            vm: vm.to_owned(),
            last_capture: None,
        }
    }

    /// Runs `cycle` with `rpo` (seconds) as the VM's target, recorded in the agent's `state`
    /// folder. When `stop` resolves first, the
    /// cycle gets `grace` to finish, then as long as a guest freeze is in flight (at most
    /// [`crate::live::FREEZE_PHASE_MAX`]); if it is dropped, what it left in the VM described by
    /// `release` is removed.
    #[allow(clippy::too_many_arguments)]
    pub async fn cycle(
        &mut self,
        state: &Path,
        rpo: u64,
        cycle: impl Future<Output = Result<SyncReport, SyncError>>,
        release: Option<&SyncConfig>,
        stop: impl Future<Output = ()>,
        grace: Duration,
    ) -> Ended {
        let started = Instant::now();
        self.record(state, move |c, vm| health::cycle_started(c, vm, rpo))
            .await;
        // Boxed so that a stopped cycle can be dropped (closing its QMP connection) before the
        // VM is cleaned up.
        let mut cycle = Box::pin(cycle);
        let mut stopping = false;
        let outcome = tokio::select! {
            r = &mut cycle => Some(r),
            _ = stop => {
                stopping = true;
                tracing::info!(vm = %self.vm, grace = grace.as_secs(), "stopping: letting the point in flight finish");
                match tokio::time::timeout(grace, &mut cycle).await {
                    Ok(r) => Some(r),
                    // Never cut a cycle between a guest freeze and its thaw.
                    Err(_) => crate::sync::finish_freeze(&mut cycle).await,
                }
            }
        };
        let Some(outcome) = outcome else {
            drop(cycle);
            if let Some(cfg) = release {
                crate::sync::release_vm(cfg).await;
            }
            return Ended {
                outcome: None,
                stopping,
            };
        };
        let seconds = started.elapsed().as_secs_f64();
        let since = self
            .last_capture
            .filter(|_| outcome.is_ok())
            .map(|t| t.elapsed().as_secs_f64());
        if outcome.is_ok() {
            self.last_capture = Some(started);
        }
        // The record is written off the runtime; the outcome is shared with that task, so even
        // a task that panicked leaves the cycle's own result to report.
        let shared = Arc::new(outcome);
        let recorded = {
            let (state, vm, o) = (state.to_owned(), self.vm.clone(), shared.clone());
            tokio::task::spawn_blocking(move || {
                crate::state::open(&state)
                    .and_then(|c| health::cycle_ended(&c, &vm, rpo, seconds, since, &o))
            })
            .await
        };
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %self.vm, error = %e, "could not record the cycle"),
            Err(e) => tracing::warn!(vm = %self.vm, error = %e, "recording the cycle failed"),
        }
        // The task has ended (joined), so ours is the only reference left.
        let outcome = Arc::try_unwrap(shared).unwrap_or_else(|_| {
            Err(SyncError::Worker(
                "the cycle's result is still shared".into(),
            ))
        });
        Ended {
            outcome: Some(outcome),
            stopping,
        }
    }

    /// Writes to the VM's health record off the async runtime; a failure is only logged.
    async fn record(
        &self,
        state: &Path,
        f: impl FnOnce(&rusqlite::Connection, &str) -> rusqlite::Result<()> + Send + 'static,
    ) {
        let (state, vm) = (state.to_owned(), self.vm.clone());
        let done = tokio::task::spawn_blocking(move || {
            crate::state::open(&state).and_then(|c| f(&c, &vm))
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(vm = %self.vm, error = %e, "could not record the cycle");
        }
    }
}
