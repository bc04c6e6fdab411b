//! The pack format: how chunk records lie in a pack, whatever store holds the pack.
//!
//! ```text
//!  <id as 16 hex digits>.pack
//!  +----------+------------------------------------------------------------+
//!  | RWPACK01 | record | record | ...                                      |
//!  +----------+------------------------------------------------------------+
//!  record = "RWCK" | blake3 hash (32) | frame length (u32 le) | zstd frame
//! ```
//! A pack is only ever appended to, so a crash can only leave unreferenced bytes at its end.
//! The catalog stores (pack, offset of the frame, frame length); the record header lets a
//! checker rebuild that index from the packs alone.

/// First bytes of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"RWPACK01";
/// First bytes of every record.
pub const RECORD_MAGIC: &[u8; 4] = b"RWCK";
/// Bytes of a record before its frame: magic, hash, length.
pub const RECORD_HEADER: u64 = 4 + 32 + 4;
/// A pack is closed once it passes 64 MiB: large enough to keep file counts low (a 1 TiB disk
/// makes ~16 k packs), small enough for gc to rewrite one quickly.
pub const PACK_TARGET_BYTES: u64 = 64 * 1024 * 1024;
/// Largest frame a catalog row may name: the bound ingest enforces, for the largest block.
pub const MAX_FRAME_BYTES: u32 = rewind_proto::format::MAX_FRAME_BYTES as u32;

/// The name of pack `id`.
pub fn pack_name(id: super::PackId) -> String {
    format!("{:016x}.pack", id.0)
}

/// The header of the record of `hash` whose frame is `len` bytes.
pub fn record_header(hash: &rewind_proto::BlockHash, len: u32) -> [u8; RECORD_HEADER as usize] {
    let mut h = [0u8; RECORD_HEADER as usize];
    h[..4].copy_from_slice(RECORD_MAGIC);
    h[4..36].copy_from_slice(hash.as_bytes());
    h[36..].copy_from_slice(&len.to_le_bytes());
    h
}

/// The frame of the record of `hash` at `at` in a whole pack's `bytes`, if the record header
/// before it names that chunk and that length.
pub fn frame_in<'a>(
    bytes: &'a [u8],
    at: super::ChunkLocation,
    hash: &rewind_proto::BlockHash,
) -> Option<&'a [u8]> {
    let start = usize::try_from(at.offset.checked_sub(RECORD_HEADER)?).ok()?;
    let end = start
        .checked_add(RECORD_HEADER as usize)?
        .checked_add(at.len as usize)?;
    let record = bytes.get(start..end)?;
    let (header, frame) = record.split_at(RECORD_HEADER as usize);
    (header == record_header(hash, at.len)).then_some(frame)
}
