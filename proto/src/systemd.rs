//! The systemd service protocol (`sd_notify`): readiness, watchdog keep-alives and stopping,
//! sent as datagrams to `$NOTIFY_SOCKET`, and logging to the journal. Both daemons use it;
//! outside systemd it does nothing (logs go to stderr).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one notification (e.g. `READY=1`); returns whether a socket was there to take it.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    // Abstract sockets ("@name") are not used by systemd for services; plain paths are.
    sock.send_to(state.as_bytes(), path).is_ok()
}

/// How often to send `WATCHDOG=1`: half the interval systemd asked for, if it asked.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` at half the interval systemd asked for, from a task of the current tokio
/// runtime, for as long as the runtime runs; does nothing when no watchdog was asked for.
pub fn spawn_watchdog() {
    if let Some(every) = watchdog_interval() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                notify("WATCHDOG=1");
            }
        });
    }
}

/// Logs through `tracing` (filter from `$REWIND_LOG`, default info): to the journal, with
/// structured fields, when systemd connected our output to it (`$JOURNAL_STREAM`); to stderr
/// otherwise (with colour on a terminal).
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter =
        || EnvFilter::try_from_env("REWIND_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journal) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter())
                .with(journal)
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
