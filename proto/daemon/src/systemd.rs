//! The systemd service protocol (`sd_notify`): readiness, reloading, stopping and watchdog
//! keep-alives, sent as datagrams to `$NOTIFY_SOCKET`. Outside systemd it does nothing.
//!
//! [`take_environment`] reads the service manager's variables once, at the start of `main`, and
//! removes them from the environment: the processes a daemon starts (a drill's QEMU, qemu-img,
//! qemu-nbd) must not talk to systemd in its name, nor see its watchdog. A watchdog meant for
//! another process (`$WATCHDOG_PID`) is ignored, and abstract sockets (`@name`) work.
//!
//! The `sd-notify` crate (0.5) gives the states ([`NotifyState`], their wire form) and reads the
//! watchdog ([`sd_notify::watchdog_enabled`], which checks `$WATCHDOG_PID`). Sending stays here,
//! in [`notify`], because `sd_notify::notify` does not fit those guarantees: it reads
//! `$NOTIFY_SOCKET` at every call (so it would find nothing once the variable is removed, and
//! its variants that remove it are `unsafe fn`s, which this workspace forbids), and it connects
//! to `@name` as a file path, so abstract sockets fail.

use std::ffi::OsStr;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

pub use sd_notify::NotifyState;

/// What the service manager told this process.
#[derive(Debug, Default)]
struct Manager {
    socket: Option<SocketAddr>,
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
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|s| address(&s));
        // None when the watchdog is meant for another pid, or the value does not parse.
        let watchdog = sd_notify::watchdog_enabled()
            .filter(|d| !d.is_zero())
            .map(|d| d / 2);
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

/// The socket `$NOTIFY_SOCKET` names, as libsystemd reads it: `/path` is a file, `@name` an
/// abstract socket; anything else (empty, relative, `vsock:`) is not ours to use.
fn address(value: &OsStr) -> Option<SocketAddr> {
    let bytes = value.as_encoded_bytes();
    match bytes.first()? {
        b'/' => SocketAddr::from_pathname(value).ok(),
        b'@' => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..]).ok()
        }
        _ => None,
    }
}

/// One datagram: the states one per line, as `sd_notify(3)` reads them.
fn message(states: &[NotifyState<'_>]) -> String {
    states
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends `states` in one datagram (e.g. `[Ready, Status("serving")]`); returns whether it went
/// out. Outside systemd, or when the socket refuses it, nothing happens: a daemon never fails
/// because its service manager did not hear it.
pub fn notify(states: &[NotifyState<'_>]) -> bool {
    let Some(addr) = manager().socket.as_ref() else {
        return false;
    };
    let sent =
        UnixDatagram::unbound().and_then(|s| s.send_to_addr(message(states).as_bytes(), addr));
    if let Err(e) = &sent {
        tracing::debug!(error = %e, "the service manager's socket refused a notification");
    }
    sent.is_ok()
}

/// `RELOADING=1` with `MONOTONIC_USEC` (the time it began, which systemd 253 and later use to
/// match the reload with its `READY=1`). Follow it with `READY=1` once the reload is done.
pub fn reloading() -> bool {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
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
                notify(&[NotifyState::Watchdog]);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;

    #[test]
    fn only_absolute_paths_and_abstract_names_are_sockets() {
        let file = address(OsStr::new("/run/systemd/notify")).expect("a path");
        assert_eq!(
            file.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let abs = address(OsStr::new("@/org/freedesktop/systemd1/notify")).expect("a name");
        assert_eq!(
            abs.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify"[..])
        );
        for other in ["", "notify.sock", "vsock:2:1234"] {
            assert!(address(OsStr::new(other)).is_none(), "{other:?}");
        }
    }

    #[test]
    fn states_go_one_per_line() {
        let status = format!("serving on {}", "127.0.0.1:1");
        assert_eq!(
            message(&[NotifyState::Ready, NotifyState::Status(&status)]),
            "READY=1\nSTATUS=serving on 127.0.0.1:1"
        );
        assert_eq!(message(&[NotifyState::Watchdog]), "WATCHDOG=1");
    }

    /// The only test of this process that touches the manager's variables (they are global).
    #[test]
    fn the_environment_is_taken_once_and_a_foreign_watchdog_ignored() {
        let name = format!("rewind-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
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
        assert!(notify(&[NotifyState::Ready]));
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).expect("notification");
        assert_eq!(&buf[..n], b"READY=1");
        assert!(reloading());
        let n = sock.recv(&mut buf).expect("notification");
        let reload = std::str::from_utf8(&buf[..n]).expect("text");
        let (first, time) = reload.split_once('\n').expect("two lines");
        assert_eq!(first, "RELOADING=1");
        let usec = time.strip_prefix("MONOTONIC_USEC=").expect("a time");
        assert!(usec.parse::<u64>().is_ok_and(|t| t > 0), "{reload}");
    }
}
