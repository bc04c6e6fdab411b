//! The contract both sides of Rewind share: the gRPC messages, the block/chunk format and the
//! Merkle root that proves a stored point equals the source disk.
//!
//! - [`format`]: every limit and magic number, each with why it has that value.
//! - [`names`]: validation of VM and disk names (no path tricks).
//! - [`hash`]: the 32-byte hashes, one type per role: [`BlockHash`] (a block, its chunk's name),
//!   [`NodeHash`] (a tree node) and [`DiskRoot`] (a disk's root).
//! - [`chunk`]: compressing and verifying the stored form of a block.
//! - [`crypt`]: client-side encryption: keyrings, key files, sealed chunks, manifest MACs.
//! - [`tree`]: the Merkle tree over a disk's leaves and its root.
//! - [`report`]: an error and its causes as one line, each cause said once.
//! - [`nbd`]: NBD wire constants. [`faults`]: the `REWIND_FAULT`/`REWIND_PAUSE` crash points.
//!   [`fuzz`]: the mutation driver.
//! - [`pb`]: the generated gRPC code.
//!
//! What the daemons need from their host (systemd notification, logging, the `/metrics`
//! endpoint, the TLS crypto provider) is not part of the contract: it is `rewind-daemon`, in
//! `proto/daemon/`.

pub mod chunk;
pub mod crypt;
pub mod faults;
pub mod format;
pub mod fuzz;
pub mod hash;
pub mod names;
pub mod nbd;
pub mod report;
pub mod tree;

/// Generated from `proto/rewind.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("rewind.v1");
}

pub use hash::{BlockHash, DiskRoot, NodeHash};
