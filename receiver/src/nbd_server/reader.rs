//! Reads a point's blocks from the store for one NBD connection, each checked against its hash.

use super::Export;
use crate::catalog::leaves::{self, Columns, Span};
use crate::catalog::{self, CatalogError, PointId};
use crate::chunks::{self, ChunkLocation, ChunkReader, ReadOrder};
use rewind_proto::crypt::Codec;
use rewind_proto::format::DiskGeometry;
use rewind_proto::report::chain;
use rewind_proto::BlockHash;
use rusqlite::Connection;
use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::path::Path;

/// A block's leaf and where its chunk lives; None when the catalog holds no chunk for the
/// leaf (quarantined by verify, or lost): a read of the block then fails, it is never served
/// as zeros.
pub(super) type Located = (BlockHash, Option<ChunkLocation>);

/// Reads a point's blocks from the store for one connection.
pub(super) struct PointReader {
    conn: Connection,
    packs: Box<dyn ChunkReader>,
    export: Export,
    codec: Codec,
    pub(super) geometry: DiskGeometry,
}

impl PointReader {
    pub(super) fn open(data: &Path, export: &Export, codec: &Codec) -> io::Result<PointReader> {
        let conn = catalog::open_ro(data).map_err(io::Error::other)?;
        let geometry = DiskGeometry::new(export.disk.size, export.disk.block_size)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PointReader {
            conn,
            packs: chunks::open(data)
                .map_err(io::Error::other)?
                .reader(ReadOrder::Random),
            export: export.clone(),
            codec: codec.clone(),
            geometry,
        })
    }

    /// Non-zero blocks with index in `first..end`, at the point, with or without their chunk.
    pub(super) fn blocks(&self, first: u64, end: u64) -> io::Result<HashMap<u64, Located>> {
        let span = Span::leaves(
            self.export.disk.disk_id,
            PointId(self.export.point),
            first..end,
        );
        let mut out = HashMap::new();
        leaves::at_point(&self.conn, &span, Columns::Located, |n| {
            out.insert(n.idx, (n.hash, n.at));
            Ok::<_, CatalogError>(ControlFlow::Continue(()))
        })
        .map_err(|e| match e {
            CatalogError::Sql(e) => io::Error::other(e),
            CatalogError::HashLength(e) => io::Error::other(e.to_string()),
        })?;
        Ok(out)
    }

    /// Bytes of block `idx` (verified against its hash).
    pub(super) fn block_bytes(&mut self, idx: u64, loc: &Located) -> io::Result<Vec<u8>> {
        let len = self.geometry.block_len(idx).unwrap_or(0);
        let at = loc.1.ok_or_else(|| {
            io::Error::other(format!(
                "chunk {} is missing from the store (quarantined by verify, or lost)",
                loc.0
            ))
        })?;
        let frame = self
            .packs
            .read(at, &loc.0)
            .map_err(|e| io::Error::other(chain(&e)))?;
        self.codec
            .decode(loc.0, &frame, len)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}
