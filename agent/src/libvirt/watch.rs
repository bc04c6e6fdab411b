//! The guard of a running backup job: a full scratch folder must not leave the guest paused.
//!
//! While a pull-mode job runs, QEMU copies the old content of every block the guest
//! overwrites into the job's scratch file before the write goes through. When that copy fails
//! (the scratch folder is full, despite the room checked before the job), the guest's write
//! fails with it, and libvirt's default error policy pauses the domain ("paused (I/O error)")
//! with the write queued. The watch looks at the domain's state every [`PERIOD`]; on such a
//! pause it ends the job (the copy-before-write filter goes with it) and resumes the domain,
//! whose queued writes are then retried straight to the disk. The guest is paused at most
//! [`PERIOD`] plus the job's end (bounded by `JOB_END_LIMIT`) plus one `virsh resume`.
//!
//! The cycle then fails (its exports are gone) and settles as any failed cycle: the new
//! checkpoint is deleted, and the base, which recorded every write since it, stays. A domain
//! paused for any other reason (an operator's `virsh suspend`, an I/O error with no job of
//! ours) is never resumed.

use super::virsh::Virsh;
use super::{end_job, LibvirtError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the domain's state is looked at during a job.
pub const PERIOD: Duration = Duration::from_millis(500);

/// A running watch; dropping it stops the watch.
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
    tripped: Arc<AtomicBool>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// Starts watching `domain`, whose backup job (ours) just began.
    pub fn start(virsh: Virsh, domain: String) -> Watch {
        let tripped = Arc::new(AtomicBool::new(false));
        let flag = tripped.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(PERIOD).await;
                if let Ok(state) = virsh.run(&["domstate", "--reason", &domain]).await {
                    if paused_on_io_error(&state) {
                        flag.store(true, Ordering::SeqCst);
                        tracing::error!(domain = %domain, "the domain paused on an I/O error during the backup job (its scratch folder is full): ending the job and resuming the domain");
                        rescue(&virsh, &domain).await;
                        return;
                    }
                }
            }
        });
        Watch { task, tripped }
    }

    /// Whether the watch found the domain paused and ended the job.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }
}

/// Whether `virsh domstate --reason` says the domain paused on an I/O error.
pub fn paused_on_io_error(state: &str) -> bool {
    let s = state.trim();
    s.starts_with("paused") && s.contains("I/O error")
}

/// Ends the job, then resumes the domain; failures are logged (the next cycle tries again,
/// see [`resume_after_job`]).
async fn rescue(virsh: &Virsh, domain: &str) {
    if let Err(e) = end_job(virsh, domain).await {
        tracing::error!(domain = %domain, error = %e, "cannot end the backup job of a paused domain");
    }
    match virsh.run(&["resume", domain]).await {
        Ok(_) => tracing::warn!(domain = %domain, "domain resumed after its backup job ended"),
        Err(e) => {
            tracing::error!(domain = %domain, error = %e, "cannot resume the domain after ending its backup job")
        }
    }
}

/// After ending a job of ours (this cycle's, or one a killed cycle left): a domain that
/// paused on an I/O error while it ran (its scratch folder filled) is resumed. True: it was.
pub async fn resume_after_job(virsh: &Virsh, domain: &str) -> Result<bool, LibvirtError> {
    let state = virsh.run(&["domstate", "--reason", domain]).await?;
    if !paused_on_io_error(&state) {
        return Ok(false);
    }
    virsh.run(&["resume", domain]).await?;
    tracing::warn!(domain = %domain, "resumed the domain, paused on an I/O error during the backup job");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_io_error_pause_counts() {
        assert!(paused_on_io_error("paused (I/O error)\n"));
        assert!(!paused_on_io_error("paused (user)"));
        assert!(!paused_on_io_error("running (booted)"));
        assert!(!paused_on_io_error("running (unpaused)"));
        assert!(!paused_on_io_error("shut off (destroyed)"));
    }
}
