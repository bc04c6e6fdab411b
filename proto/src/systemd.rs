//! The systemd service protocol (`sd_notify`): readiness, watchdog keep-alives and stopping,
//! sent as datagrams to `$NOTIFY_SOCKET`. Both daemons use it; outside systemd it does nothing.

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
