//! The guest freeze around a live capture, and its guarantees: bounded, and thawed on every
//! exit path (a stopping agent waits for a freeze in flight; thaws that time out go on in the
//! background until the guest says thawed).

use super::*;
/// Cycles of this process between a guest freeze and its thaw. A stopping agent must not cut
/// such a cycle short: the thaw would never run and the guest would stay frozen.
static FREEZES_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether a cycle of this process may have guest file systems frozen right now.
fn freeze_in_flight() -> bool {
    FREEZES_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// Lets a cycle being stopped run on while a guest freeze is in flight (dropped between freeze
/// and thaw, it would leave the guest frozen), which is at most [`live::FREEZE_PHASE_MAX`];
/// returns its result if it finished meanwhile.
pub async fn finish_freeze<F: std::future::Future + Unpin>(cycle: &mut F) -> Option<F::Output> {
    while freeze_in_flight() {
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(100), &mut *cycle).await {
            return Some(done);
        }
    }
    None
}

/// After a cycle was dropped by a stop signal: removes what it left in the VM (exports, our
/// filters with the device put back on its disk, fleecing nodes and images, the NBD server),
/// within 30 s. Bitmaps stay, so the next cycle loses no write.
pub async fn release_vm(cfg: &SyncConfig) {
    let Some(src) = &cfg.live else { return };
    let released = tokio::time::timeout(Duration::from_secs(30), async {
        let mut qmp = Qmp::connect(&src.qmp).await?;
        let work = Workdir::new(&cfg.state_dir, &cfg.vm).map_err(|e| QmpError::Io {
            path: cfg.state_dir.display().to_string(),
            source: e,
        })?;
        live::cleanup(&mut qmp, &work).await
    })
    .await;
    match released {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(vm = %cfg.vm, ?removed, "stopped cycle's leftovers removed from the VM")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(vm = %cfg.vm, error = %Chain(&e), "could not clean up the VM: the next run does")
        }
        Err(_) => {
            tracing::warn!(vm = %cfg.vm, "cleaning up the VM took over 30 s: the next run does")
        }
    }
}

/// Counts a freeze in flight while alive.
struct FreezeGuard;

impl FreezeGuard {
    fn new() -> Self {
        FREEZES_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        FreezeGuard
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        FREEZES_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Background thaws of this process still running (see [`live::keep_thawing`]).
static THAWS_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Keeps thawing the guest behind `path` in a task of its own, so the cycle goes on at once.
fn spawn_thaw(path: std::path::PathBuf, marker: std::path::PathBuf) {
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            THAWS_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    THAWS_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let counted = Counted;
    tokio::spawn(async move {
        let _counted = counted;
        live::keep_thawing(&path, &marker).await;
    });
}

/// Waits, up to `limit`, for this process's background thaws to confirm the guests thawed;
/// returns whether none is left. An agent about to exit calls it: its runtime's end would
/// cancel them (the marker they leave makes the next run thaw instead).
pub async fn wait_thaws(limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while THAWS_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Whether background thaws of this process are running.
pub fn thaws_in_flight() -> bool {
    THAWS_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// Freezes (if a guest agent is given), captures, and always thaws. Returns whether the file
/// systems were frozen during the capture, and how the disks were fleeced.
///
/// The freeze phase is bounded by [`live::FREEZE_PHASE_MAX`]: a freeze that does not answer in
/// [`live::MAX_FREEZE`] makes the point crash-consistent at once, and a thaw that does not
/// answer in [`live::THAW_TIMEOUT`] goes on in the background until the guest says `thawed`.
pub(super) async fn capture_live(
    qmp: &mut Qmp,
    work: &Workdir,
    caps: &[DiskCapture],
    freezer: Option<live::Freezer>,
) -> Result<(Option<FreezeTimes>, live::Fleecing), SyncError> {
    live::create_fleece_files(work, caps).await?;
    // The views go in before any freeze (the mode a frozen guest gets); only the instant
    // itself runs under it.
    let mut mode = live::Fleecing::choose(caps, freezer.is_some());
    live::add_views(qmp, work, caps, mode).await?;
    let Some(mut freezer) = freezer else {
        live::capture(qmp, work, caps, mode).await?;
        live::settle(qmp, caps, mode).await?;
        return Ok((None, mode));
    };
    let _guard = FreezeGuard::new();
    let freezing = Instant::now();
    let outcome = match freezer.freeze().await {
        Ok(o) => o,
        Err(e) => live::FreezeOutcome::NotFrozen(format!(
            "the guest agent did not answer: {}",
            report::chain(&e)
        )),
    };
    let frozen_at = Instant::now();
    let freezer = match outcome {
        live::FreezeOutcome::Frozen(n) => {
            tracing::info!(filesystems = n, "guest file systems frozen");
            crate::faults::point("frozen");
            Some(freezer)
        }
        live::FreezeOutcome::NotFrozen(why) => {
            tracing::warn!(reason = %why, "guest not frozen: the point is crash-consistent");
            None
        }
        live::FreezeOutcome::Unsure(why) => {
            tracing::warn!(reason = %why, "guest freeze failed: the point is crash-consistent; thawing in the background");
            let (path, marker) = (freezer.path().to_owned(), freezer.marker().to_owned());
            // Its connection goes first: the guest agent serves one client at a time.
            drop(freezer);
            spawn_thaw(path, marker);
            None
        }
    };
    let Some(freezer) = freezer else {
        let unfrozen = live::Fleecing::choose(caps, false);
        if unfrozen != mode {
            live::remove_views(qmp, caps, mode).await?;
            live::add_views(qmp, work, caps, unfrozen).await?;
            mode = unfrozen;
        }
        live::capture(qmp, work, caps, mode).await?;
        live::settle(qmp, caps, mode).await?;
        return Ok((None, mode));
    };
    let captured =
        tokio::time::timeout(live::MAX_FREEZE, live::capture(qmp, work, caps, mode)).await;
    let held = frozen_at.elapsed();
    let (path, marker) = (freezer.path().to_owned(), freezer.marker().to_owned());
    if let Err(e) = freezer.thaw().await {
        tracing::error!(error = %Chain(&e), "guest thaw failed; thawing in the background");
        spawn_thaw(path, marker);
    }
    let times = FreezeTimes {
        phase: freezing.elapsed(),
        held,
    };
    match captured {
        Ok(r) => r.map_err(SyncError::from)?,
        Err(_) => {
            return Err(SyncError::Protocol(
                "the capture took longer than the freeze limit",
            ))
        }
    }
    live::settle(qmp, caps, mode).await?;
    Ok((Some(times), mode))
}

/// How long a point's freeze took: the whole phase (request, hooks, capture, thaw's answer
/// after the thaw hooks) and the part Rewind held the file systems frozen (from the answer that
/// they froze to the thaw request: the capture).
#[derive(Debug, Clone, Copy)]
pub(super) struct FreezeTimes {
    pub(super) phase: Duration,
    pub(super) held: Duration,
}
