//! Fault points for crash tests: `REWIND_FAULT=NAME` makes a Rewind process kill itself with
//! SIGKILL when it reaches the point called NAME, exactly as a crash or `kill -9` would at that
//! step. Unset (as in production) a point costs one environment lookup.

/// Kills the process with SIGKILL if `REWIND_FAULT` names this point.
pub fn point(name: &str) {
    if std::env::var("REWIND_FAULT").is_ok_and(|v| v == name) {
        tracing::warn!(point = name, "fault injected: SIGKILL");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
