//! The guest's file systems frozen around a job's start through libvirt's guest agent
//! support (`domfsfreeze`/`domfsthaw`), bounded by [`FREEZE_LIMIT`], the thaw retried.

use super::virsh::Virsh;
use super::FREEZE_LIMIT;
use std::time::{Duration, Instant};

/// Freezes the guest's file systems within [`FREEZE_LIMIT`]; false (with a warning) when it
/// cannot, and then a thaw is sent anyway, since a late agent may still run the freeze.
pub(super) async fn freeze_guest(virsh: &Virsh, d: &str) -> bool {
    let limit = FREEZE_LIMIT.as_secs().to_string();
    let _ = virsh
        .run(&["guest-agent-timeout", d, "--timeout", &limit])
        .await;
    match virsh
        .run_within(&["domfsfreeze", d], FREEZE_LIMIT + Duration::from_secs(5))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(domain = d, error = %e, "cannot freeze the guest: taking a crash-consistent point");
            thaw_guest(virsh.clone(), d.to_owned()).await;
            false
        }
    }
}

/// Thaws the guest; if that fails, keeps trying in the background (an agent that answers
/// late may have frozen the guest after its freeze timed out) for up to ten minutes.
pub(super) async fn thaw_guest(virsh: Virsh, d: String) {
    if virsh.run(&["domfsthaw", &d]).await.is_ok() {
        return;
    }
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if virsh.run(&["domfsthaw", &d]).await.is_ok() {
                return;
            }
        }
        tracing::error!(domain = %d, "could not confirm the guest thawed in ten minutes");
    });
}
