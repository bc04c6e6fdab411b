//! Freezing and thawing the guest's file systems through the QEMU guest agent, with a marker
//! that says the freeze is ours and a background thaw that keeps trying within a bound.

use super::*;

/// Longest one `guest-fsfreeze-thaw` or `guest-fsfreeze-status` may take. The guest agent
/// serves commands in order, so a thaw queued behind a freeze whose hooks still run answers
/// only once they end: past this bound the thaw goes on in the background ([`keep_thawing`]).
pub const THAW_TIMEOUT: Duration = Duration::from_secs(5);
/// The pauses between attempts of [`keep_thawing`] (about 3 minutes in all): a freeze that
/// timed out may still freeze the guest when its hooks end, so thaws go on until the guest
/// agent says `thawed`, or this runs out (then the next cycle thaws, see [`Freezer::freeze`]).
pub const THAW_RETRY_PAUSES_SECS: [u64; 12] = [1, 2, 4, 8, 15, 15, 15, 15, 30, 30, 30, 30];
/// Longest [`keep_thawing`] runs: its pauses, and each of its attempts bounded by the
/// guest-sync (5 s), thaw and status limits.
pub const KEEP_THAWING_MAX: Duration = {
    let mut secs = (THAW_RETRY_PAUSES_SECS.len() as u64 + 1) * (5 + 2 * THAW_TIMEOUT.as_secs());
    let mut i = 0;
    while i < THAW_RETRY_PAUSES_SECS.len() {
        secs += THAW_RETRY_PAUSES_SECS[i];
        i += 1;
    }
    Duration::from_secs(secs)
};
/// Longest a cycle stays between "about to freeze" and "thawed or handed to [`keep_thawing`]":
/// the status checks and the recovery thaw, the freeze, the capture under it and the thaw.
/// A stopping agent waits this long at most for a cycle to thaw what it froze.
pub const FREEZE_PHASE_MAX: Duration = Duration::from_secs(
    3 * THAW_TIMEOUT.as_secs() + 2 * MAX_FREEZE.as_secs() + 2 * THAW_TIMEOUT.as_secs(),
);

/// The file that says this agent froze the guest's file systems and has not seen them thawed
/// since. It is written before the freeze is sent, so an agent killed at any point after
/// leaves it; the next cycle thaws a freeze it finds only when this file is there, so a freeze
/// another tool holds is never thawed by us.
pub fn freeze_marker(work: &Workdir) -> PathBuf {
    work.dir.join("guest-frozen-by-rewind")
}

/// What the guest agent says of its file systems (`guest-fsfreeze-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// What [`Freezer::freeze`] achieved.
#[derive(Debug)]
pub enum FreezeOutcome {
    /// This many file systems (at least one) are frozen by us: thaw them after the capture.
    Frozen(u64),
    /// Nothing of ours is frozen (the reason says why): the point is crash-consistent.
    NotFrozen(String),
    /// The freeze timed out or its answer was lost: the guest agent may still freeze (its hooks
    /// run), so the caller hands the path to [`keep_thawing`]. The point is crash-consistent.
    Unsure(String),
}

/// Freezes and thaws guest file systems through the QEMU guest agent.
pub struct Freezer {
    qga: Qmp,
    path: PathBuf,
    marker: PathBuf,
}

impl Freezer {
    /// Connects to the guest agent at `path`; `marker` is [`freeze_marker`] of the VM.
    pub async fn connect(path: &Path, marker: PathBuf) -> Result<Freezer, QmpError> {
        Ok(Freezer {
            qga: Qmp::connect_guest_agent(path).await?,
            path: path.to_owned(),
            marker,
        })
    }

    /// The guest agent's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The freeze marker this freezer writes.
    pub fn marker(&self) -> &Path {
        &self.marker
    }

    async fn bounded(&mut self, command: &str, limit: Duration) -> Result<Value, QmpError> {
        tokio::time::timeout(limit, self.qga.execute(command, json!({})))
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))?
    }

    /// `guest-fsfreeze-status`, within [`THAW_TIMEOUT`].
    pub async fn status(&mut self) -> Result<FreezeStatus, QmpError> {
        status(&mut self.qga, &self.path).await
    }

    /// Freezes the guest's file systems, only when they are not frozen already:
    /// - frozen, with our marker there: an agent killed between freeze and thaw left them so;
    ///   they are thawed first (and the marker removed);
    /// - frozen, without our marker: another tool holds the freeze; we neither freeze nor thaw;
    /// - a freeze that reports 0 file systems frozen is thawed and is no freeze at all;
    /// - the freeze waits at most [`MAX_FREEZE`] (the guest's fsfreeze hooks run before it
    ///   answers); past that the outcome is [`FreezeOutcome::Unsure`] and this connection is
    ///   useless (its late answer would be taken for the next one's).
    ///
    /// Errors only when the guest agent does not answer the status check: then nothing was sent
    /// that could freeze the guest.
    pub async fn freeze(&mut self) -> Result<FreezeOutcome, QmpError> {
        let mut status = self.status().await?;
        if self.marker.exists() {
            if status == FreezeStatus::Frozen {
                tracing::warn!(
                    guest_agent = %self.path.display(),
                    "the guest's file systems are still frozen by an earlier run of the agent \
                     (killed between freeze and thaw): thawing them"
                );
                if let Err(e) = self.bounded("guest-fsfreeze-thaw", THAW_TIMEOUT).await {
                    return Ok(FreezeOutcome::Unsure(format!(
                        "thawing the freeze an earlier run left: {}",
                        chain(&e)
                    )));
                }
                status = self.status().await?;
            }
            if status == FreezeStatus::Thawed {
                remove_marker(&self.marker);
            }
        }
        if status == FreezeStatus::Frozen {
            return Ok(FreezeOutcome::NotFrozen(
                "the guest's file systems are already frozen by another tool: leaving that \
                 freeze alone"
                    .into(),
            ));
        }
        // Before the freeze goes out: from here on a killed agent may leave the guest frozen.
        if let Err(e) = std::fs::write(&self.marker, b"") {
            return Ok(FreezeOutcome::NotFrozen(format!(
                "cannot write the freeze marker {}: {e}",
                self.marker.display()
            )));
        }
        match self.bounded("guest-fsfreeze-freeze", MAX_FREEZE).await {
            Ok(n) => match n.as_u64().unwrap_or(0) {
                0 => {
                    // The guest agent counts itself frozen even with nothing frozen.
                    match self.bounded("guest-fsfreeze-thaw", THAW_TIMEOUT).await {
                        Ok(_) => {
                            remove_marker(&self.marker);
                            Ok(FreezeOutcome::NotFrozen(
                                "the guest agent froze no file system".into(),
                            ))
                        }
                        Err(e) => Ok(FreezeOutcome::Unsure(format!(
                            "froze no file system, then the thaw failed: {}",
                            chain(&e)
                        ))),
                    }
                }
                n => Ok(FreezeOutcome::Frozen(n)),
            },
            // The guest agent thaws what it froze when a freeze fails; the status says whether
            // it did, so that case too goes through the thaw-until-thawed path.
            Err(QmpError::Timeout(_)) => Ok(FreezeOutcome::Unsure(format!(
                "the guest agent did not answer the freeze within {} s (slow fsfreeze hooks?)",
                MAX_FREEZE.as_secs()
            ))),
            Err(e) => Ok(FreezeOutcome::Unsure(format!(
                "the freeze failed: {}",
                chain(&e)
            ))),
        }
    }

    /// Thaws what [`Freezer::freeze`] froze, within [`THAW_TIMEOUT`], and removes the marker.
    /// On an error the caller hands the path to [`keep_thawing`].
    pub async fn thaw(mut self) -> Result<(), QmpError> {
        self.bounded("guest-fsfreeze-thaw", THAW_TIMEOUT).await?;
        remove_marker(&self.marker);
        Ok(())
    }
}

async fn status(qga: &mut Qmp, path: &Path) -> Result<FreezeStatus, QmpError> {
    let v = tokio::time::timeout(
        THAW_TIMEOUT,
        qga.execute("guest-fsfreeze-status", json!({})),
    )
    .await
    .map_err(|_| QmpError::Timeout("guest-fsfreeze-status".into()))??;
    match v.as_str() {
        Some("thawed") => Ok(FreezeStatus::Thawed),
        Some("frozen") => Ok(FreezeStatus::Frozen),
        _ => Err(QmpError::Protocol {
            path: path.display().to_string(),
            message: format!("guest-fsfreeze-status returned {v}"),
        }),
    }
}

fn remove_marker(marker: &Path) {
    if let Err(e) = std::fs::remove_file(marker) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(marker = %marker.display(), error = %e, "cannot remove the freeze marker");
        }
    }
}

/// Sends `guest-fsfreeze-thaw` over fresh connections (each attempt bounded by the guest-sync
/// and [`THAW_TIMEOUT`] limits), pausing by [`THAW_RETRY_PAUSES_SECS`], until
/// `guest-fsfreeze-status` says `thawed`; then removes `marker`. Returns whether it got there.
/// Giving up leaves the marker, so the next cycle thaws the freeze it finds.
pub async fn keep_thawing(path: &Path, marker: &Path) -> bool {
    let attempt = || async {
        let mut qga = Qmp::connect_guest_agent(path).await?;
        let thawed =
            tokio::time::timeout(THAW_TIMEOUT, qga.execute("guest-fsfreeze-thaw", json!({})))
                .await
                .map_err(|_| QmpError::Timeout("guest-fsfreeze-thaw".into()))?;
        // A thaw of nothing frozen fails in some guest agents: the status decides.
        if let Err(e) = thawed {
            tracing::debug!(error = %Chain(&e), "guest-fsfreeze-thaw");
        }
        status(&mut qga, path).await
    };
    let started = Instant::now();
    for (i, pause) in std::iter::once(0).chain(THAW_RETRY_PAUSES_SECS).enumerate() {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        match attempt().await {
            Ok(FreezeStatus::Thawed) => {
                remove_marker(marker);
                tracing::info!(
                    attempt = i + 1,
                    seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "guest file systems thawed"
                );
                return true;
            }
            Ok(FreezeStatus::Frozen) => {
                tracing::warn!(
                    attempt = i + 1,
                    "guest file systems still frozen; retrying the thaw"
                )
            }
            Err(e) => {
                tracing::warn!(attempt = i + 1, error = %Chain(&e), "guest thaw not confirmed yet; retrying")
            }
        }
    }
    tracing::error!(
        guest_agent = %path.display(),
        seconds = format!("{:.0}", started.elapsed().as_secs_f64()),
        "gave up thawing the guest's file systems; the next cycle thaws them"
    );
    false
}
