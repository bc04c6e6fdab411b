//! Fault points for crash tests: `REWIND_FAULT=NAME` makes a Rewind process kill itself with
//! SIGKILL when it reaches the point called NAME, exactly as a crash or `kill -9` would at that
//! step. `REWIND_PAUSE=NAME` stops it there instead (SIGSTOP), so a test can act at exactly that
//! step and then let it go on with SIGCONT. Unset (as in production) a point costs two
//! environment lookups.

/// Kills the process with SIGKILL if `REWIND_FAULT` names this point; stops it with SIGSTOP
/// if `REWIND_PAUSE` does.
pub fn point(name: &str) {
    let me = rustix::process::getpid();
    if std::env::var("REWIND_FAULT").is_ok_and(|v| v == name) {
        tracing::warn!(point = name, "fault injected: SIGKILL");
        let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
    }
    if std::env::var("REWIND_PAUSE").is_ok_and(|v| v == name) {
        tracing::warn!(point = name, "fault injected: SIGSTOP");
        let _ = rustix::process::kill_process(me, rustix::process::Signal::STOP);
    }
}
