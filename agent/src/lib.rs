//! Rewind's host agent: finds the changed blocks of a VM's disks and streams them to a receiver.
//!
//! - [`source`]: raw image files and block devices (size, data extents, reads).
//! - [`scan`]: hash-scan change detection against the last committed point.
//! - [`state`]: the agent's local SQLite state.
//! - [`client`]: the mutual-TLS connection to the receiver.
//! - [`sync`]: one replication cycle, end to end.
//! - [`clock`]: the time source of timing decisions (RPO, upload pace), manual in tests.
//! - [`keys`]: the keyrings of encrypted VMs, unlocked once per key file.
//! - [`cli`]: one module per subcommand.

pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod cycle;
pub mod error;
pub mod faults;
pub mod health;
pub mod keys;
pub mod libvirt;
pub mod live;
pub mod nbd;
pub mod offline;
pub mod qcow2;
pub mod qmp;
pub mod rollback;
pub mod scan;
pub mod service;
pub mod source;
pub mod state;
pub mod sync;
