//! The systemd service protocol (`sd_notify`): readiness, watchdog keep-alives and stopping,
//! sent as datagrams to `$NOTIFY_SOCKET`, and logging to the journal. Both daemons use it;
//! outside systemd it does nothing (logs go to stderr).
//!
//! [`take_environment`] reads the service manager's variables once, at the start of `main`, and
//! removes them from the environment: the processes a daemon starts (a drill's QEMU, qemu-img,
//! qemu-nbd) must not talk to systemd in its name, nor see its watchdog. A watchdog meant for
//! another process (`$WATCHDOG_PID`) is ignored, and abstract sockets (`@name`) work.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;
use std::time::Duration;

/// What the service manager told this process.
#[derive(Debug, Default)]
struct Manager {
    socket: Option<OsString>,
    watchdog: Option<Duration>,
}

static MANAGER: OnceLock<Manager> = OnceLock::new();

/// The variables the protocol uses, removed from the environment by [`take_environment`].
const VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` and removes them from the
/// environment. Call it first thing in `main`, before any thread starts (the environment is
/// not thread-safe to change). Later calls do nothing.
pub fn take_environment() {
    MANAGER.get_or_init(|| {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|p| p.trim().parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(|u| Duration::from_micros(u / 2));
        for v in VARIABLES {
            std::env::remove_var(v);
        }
        Manager { socket, watchdog }
    });
}

fn manager() -> &'static Manager {
    take_environment();
    MANAGER.get_or_init(Manager::default)
}

/// Sends one notification (e.g. `READY=1`); returns whether a socket was there to take it.
pub fn notify(state: &str) -> bool {
    let Some(path) = manager().socket.as_ref() else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
                .is_ok()
        }
        None => sock.send_to(state.as_bytes(), path).is_ok(),
    }
}

/// How often to send `WATCHDOG=1`: half the interval systemd asked for, if it asked this
/// process (not another one, by `$WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    manager().watchdog
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test of this process that touches the manager's variables (they are global).
    #[test]
    fn the_environment_is_taken_once_and_a_foreign_watchdog_ignored() {
        let name = format!("rewind-notify-test-{}", std::process::id());
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name")
        };
        let sock = UnixDatagram::bind_addr(&addr).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        std::env::set_var("WATCHDOG_USEC", "2000000");
        std::env::set_var("WATCHDOG_PID", "1");
        take_environment();
        for v in VARIABLES {
            assert!(
                std::env::var_os(v).is_none(),
                "{v} is still set for children"
            );
        }
        assert_eq!(
            watchdog_interval(),
            None,
            "the watchdog was meant for pid 1"
        );
        assert!(notify("READY=1"));
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).expect("notification");
        assert_eq!(&buf[..n], b"READY=1");
    }
}
