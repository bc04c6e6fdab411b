//! `virsh` as a subprocess: one call, bounded in time, in the C locale (libvirt's messages are
//! translated on hosts with libvirt-l10n, and the agent matches a few of them).
//!
//! Why a subprocess and not the `virt` crate: the safe bindings have no backup, checkpoint,
//! freeze or job-abort calls (each would be unsafe FFI, which the workspace forbids); they pin
//! an exact `libc`; and they would make every agent host link libvirt, libvirt user or not.
//! virsh is present wherever libvirt is, returns structured data as XML, and costs ~30 ms a call.

use std::time::Duration;
use tokio::process::Command;

/// Longest one virsh call may take unless the caller says otherwise. libvirt serialises a
/// domain's jobs and waits 30 s for its state lock before giving up, so this leaves room for
/// one such wait.
pub const CALL_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    /// virsh could not be started (not installed?).
    #[error("cannot run virsh (is libvirt-clients installed?)")]
    Spawn(#[source] std::io::Error),
    /// virsh ran and reported an error.
    #[error("virsh {command}: {message}")]
    Failed { command: String, message: String },
    /// virsh did not answer in time; it was killed (libvirt may still finish the operation).
    #[error("virsh {command}: no answer in {} s", limit.as_secs())]
    Timeout { command: String, limit: Duration },
}

impl VirshError {
    /// libvirt's message, for matching (empty for failures to run virsh at all).
    pub fn message(&self) -> &str {
        match self {
            VirshError::Failed { message, .. } => message,
            _ => "",
        }
    }
}

/// One libvirt connection, by URI (`qemu:///system`, `qemu:///system?socket=...`).
#[derive(Debug, Clone)]
pub struct Virsh {
    uri: String,
}

impl Virsh {
    pub fn new(uri: &str) -> Virsh {
        Virsh {
            uri: uri.to_owned(),
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `virsh -c URI ARGS...` within [`CALL_LIMIT`] and returns its standard output.
    pub async fn run(&self, args: &[&str]) -> Result<String, VirshError> {
        self.run_within(args, CALL_LIMIT).await
    }

    /// Runs one call within `limit`; past it the process is killed.
    pub async fn run_within(&self, args: &[&str], limit: Duration) -> Result<String, VirshError> {
        let command = args.first().copied().unwrap_or_default().to_owned();
        let child = Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(VirshError::Spawn)?;
        let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(out) => out.map_err(VirshError::Spawn)?,
            Err(_) => return Err(VirshError::Timeout { command, limit }),
        };
        if !out.status.success() {
            return Err(VirshError::Failed {
                command,
                message: error_text(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// virsh's error lines as one message: "error: " prefixes dropped, lines joined with "; ".
fn error_text(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim().trim_start_matches("error: ").trim())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "failed without a message".to_owned()
    } else {
        lines.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_become_one_message() {
        let e = "error: Failed to delete checkpoint t-2\nerror: internal error: bitmap 't-2' not found in backing chain of 'vda'\n\n";
        assert_eq!(
            error_text(e),
            "Failed to delete checkpoint t-2; internal error: bitmap 't-2' not found in backing chain of 'vda'"
        );
        assert_eq!(error_text("\n"), "failed without a message");
    }
}
