//! What Rewind's two daemons (`rewind-agent`, `rewind-receiver`) need from the host they run
//! on: talking to systemd, logging, serving `/metrics` and choosing the TLS crypto.
//!
//! This crate is **not part of the contract** between agent and receiver (that is
//! `rewind-proto`): nothing here goes on the wire or on disk, so either daemon's side of it can
//! change without the other. It depends on nothing in `rewind-proto`, nor `rewind-proto` on it.
//! It lives at `proto/daemon/` only because the workspace's top-level folders are fixed
//! (Cargo.toml, proto/, agent/, receiver/, tests/, systemd/) and it is shared by both daemons.
//!
//! - [`systemd`]: the `sd_notify` protocol (readiness, reload, stop, watchdog), built on the
//!   `sd-notify` crate, with the service manager's variables read once and hidden from children.
//! - [`logging`]: `tracing` to the journal under systemd, to stderr otherwise.
//! - [`metrics`]: the plain-HTTP Prometheus endpoint (axum on hyper's HTTP/1).
//! - [`tls`]: the one rustls crypto provider of the process (ring).

pub mod logging;
pub mod metrics;
pub mod systemd;
pub mod tls;
