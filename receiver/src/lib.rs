//! Rewind's receiver: verifies and stores the points agents send, and restores them.
//!
//! - [`pki`]: the deployment's CA, server and agent certificates.
//! - [`catalog`]: the SQLite catalog, owner of every SQL statement (schema, queries, time helpers).
//! - [`chunks`]: the chunk store (today local pack files) holding chunk data.
//! - [`store`]: the open data folder.
//! - [`ingest`]: sessions, batches and commits (the write path).
//! - [`points`]: listing and resolving points (the read path).
//! - [`restore`]: writing a point's disk back as a raw image.
//! - [`domain_xml`]: the libvirt domain definition `restore --all` writes for the restored disks.
//! - [`domain_spec`]: what a boot drill takes from a captured libvirt domain (memory, vCPUs,
//!   machine, firmware, boot order).
//! - [`drill`]: DR drills (verify, boot, application checks through [`guest_agent`]).
//! - [`schedule`]: when `serve`'s scheduled retention and drills are due (pure functions).
//! - [`service`] and [`server`]: the gRPC face over mutual TLS.
//! - [`admission`] and [`budget`]: what each peer may hold (connections, handshakes, memory).
//! - [`cli`]: one module per subcommand.

pub mod admission;
pub mod budget;
pub mod catalog;
pub mod chunks;
pub mod cli;
pub mod clock;
pub mod config;
pub mod convert;
pub mod copy;
pub mod diff;
pub mod domain_spec;
pub mod domain_xml;
pub mod drill;
pub mod error;
pub mod gc;
pub mod guest_agent;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod nbd_server;
pub mod object_lock;
pub mod pki;
pub mod points;
pub mod prune;
pub mod readback;
pub mod repack;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod verify;
