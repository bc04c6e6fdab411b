//! The NBD transmission phase: requests until the client disconnects. Reads answer holes as
//! `OFFSET_HOLE`, block status answers `base:allocation`, and every write is refused.

use super::handshake::Session;
use super::reader::PointReader;
use super::{bad, rd_u16, rd_u32, rd_u64, Export, Exports, ALLOCATION_ID};
use rewind_proto::nbd::*;
use rewind_proto::report::Chain;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;

/// errno values NBD carries in error replies.
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;

/// One request's header.
struct Request {
    cflags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// The transmission phase: requests until the client disconnects.
pub(super) fn transmit<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &Exports,
    session: Session,
) -> io::Result<()> {
    let Session {
        export,
        structured,
        allocation,
    } = session;
    let mut reader = PointReader::open(&exports.data, &export, &exports.codec)?;
    let size = export.disk.size;
    loop {
        let magic = match rd_u32(r) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Err(bad("bad request magic"));
        }
        let req = Request {
            cflags: rd_u16(r)?,
            kind: rd_u16(r)?,
            cookie: rd_u64(r)?,
            offset: rd_u64(r)?,
            len: rd_u32(r)?,
        };
        if req.kind == CMD_WRITE {
            // Drain the payload before refusing, so the stream stays in sync.
            io::copy(&mut r.by_ref().take(u64::from(req.len)), &mut io::sink())?;
        }
        let end = req.offset.checked_add(u64::from(req.len));
        let in_range = end.is_some_and(|e| e <= size);
        let cookie = req.cookie;
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => reply_err(w, structured, cookie, EPERM)?,
            CMD_FLUSH | CMD_CACHE => simple_ok(w, structured, cookie)?,
            CMD_READ if !in_range || req.len > MAX_REQUEST => {
                let errno = if req.len > MAX_REQUEST {
                    EOVERFLOW
                } else {
                    EINVAL
                };
                reply_err(w, structured, cookie, errno)?
            }
            CMD_READ => read(w, &mut reader, exports, &export, structured, &req)?,
            CMD_BLOCK_STATUS if !allocation || !structured => {
                reply_err(w, structured, cookie, EINVAL)?
            }
            CMD_BLOCK_STATUS if !in_range || req.len == 0 => {
                reply_err(w, structured, cookie, EINVAL)?
            }
            CMD_BLOCK_STATUS => block_status(w, &reader, size, &req)?,
            _ => reply_err(w, structured, cookie, EINVAL)?,
        }
    }
}

/// An error reply.
fn reply_err(w: &mut impl Write, structured: bool, cookie: u64, errno: u32) -> io::Result<()> {
    if structured {
        let msg = b"";
        w.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
        w.write_all(&REPLY_FLAG_DONE.to_be_bytes())?;
        w.write_all(&REPLY_TYPE_ERROR.to_be_bytes())?;
        w.write_all(&cookie.to_be_bytes())?;
        w.write_all(&(6u32 + msg.len() as u32).to_be_bytes())?;
        w.write_all(&errno.to_be_bytes())?;
        w.write_all(&(msg.len() as u16).to_be_bytes())?;
        w.write_all(msg)?;
    } else {
        w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
        w.write_all(&errno.to_be_bytes())?;
        w.write_all(&cookie.to_be_bytes())?;
    }
    w.flush()
}

/// A read: the blocks' chunks, checked against their hashes; a block whose chunk cannot be
/// read fails the whole request with EIO (never zeros in its place).
fn read(
    w: &mut impl Write,
    reader: &mut PointReader,
    exports: &Exports,
    export: &Export,
    structured: bool,
    req: &Request,
) -> io::Result<()> {
    let Request {
        cflags,
        cookie,
        offset,
        len,
        ..
    } = *req;
    let bs = reader.geometry.block_size.bytes();
    let first = offset / bs;
    let last = (offset + u64::from(len)).div_ceil(bs);
    let blocks = reader.blocks(first, last)?;
    let mut buf = vec![0u8; len as usize];
    let mut failed = false;
    for (&idx, loc) in blocks.iter() {
        let data = match reader.block_bytes(idx, loc) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(export = %export.name, block = idx, error = %Chain(&e), "chunk unreadable");
                failed = true;
                break;
            }
        };
        let bstart = idx * bs;
        let s = bstart.max(offset);
        let e = (bstart + data.len() as u64).min(offset + u64::from(len));
        if s < e {
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - bstart) as usize..(e - bstart) as usize]);
        }
    }
    if failed {
        return reply_err(w, structured, req.cookie, EIO);
    }
    exports.served.fetch_add(u64::from(len), Ordering::Relaxed);
    if structured && cflags & 0x4 == 0 && blocks.is_empty() && len > 0 {
        // One hole chunk for an all-zero range.
        w.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
        w.write_all(&REPLY_FLAG_DONE.to_be_bytes())?;
        w.write_all(&REPLY_TYPE_OFFSET_HOLE.to_be_bytes())?;
        w.write_all(&cookie.to_be_bytes())?;
        w.write_all(&12u32.to_be_bytes())?;
        w.write_all(&offset.to_be_bytes())?;
        w.write_all(&len.to_be_bytes())?;
    } else if structured {
        w.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
        w.write_all(&REPLY_FLAG_DONE.to_be_bytes())?;
        w.write_all(&REPLY_TYPE_OFFSET_DATA.to_be_bytes())?;
        w.write_all(&cookie.to_be_bytes())?;
        w.write_all(&(8 + len).to_be_bytes())?;
        w.write_all(&offset.to_be_bytes())?;
        w.write_all(&buf)?;
    } else {
        w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
        w.write_all(&0u32.to_be_bytes())?;
        w.write_all(&cookie.to_be_bytes())?;
        w.write_all(&buf)?;
    }
    w.flush()
}

/// A block status reply for `base:allocation`: data where the point has a block, a zero
/// hole elsewhere, looking at most 1 GiB ahead.
fn block_status(
    w: &mut impl Write,
    reader: &PointReader,
    size: u64,
    req: &Request,
) -> io::Result<()> {
    let Request {
        cflags,
        cookie,
        offset,
        len,
        ..
    } = *req;
    let bs = reader.geometry.block_size.bytes();
    let first = offset / bs;
    // Look at most 1 GiB ahead, so a reply stays small.
    let last = (offset + u64::from(len))
        .div_ceil(bs)
        .min(first + (1 << 30) / bs);
    let blocks = reader.blocks(first, last)?;
    let mut descs: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    let stop = (last * bs).min(offset + u64::from(len)).min(size);
    while pos < stop {
        let idx = pos / bs;
        let flag = if blocks.contains_key(&idx) {
            0
        } else {
            STATE_HOLE | STATE_ZERO
        };
        let next = ((idx + 1) * bs).min(stop);
        let n = (next - pos) as u32;
        match descs.last_mut() {
            Some(d) if d.1 == flag => d.0 += n,
            _ => descs.push((n, flag)),
        }
        pos = next;
        if cflags & CMD_FLAG_REQ_ONE != 0 && descs.len() > 1 {
            descs.truncate(1);
            break;
        }
    }
    w.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&REPLY_FLAG_DONE.to_be_bytes())?;
    w.write_all(&REPLY_TYPE_BLOCK_STATUS.to_be_bytes())?;
    w.write_all(&cookie.to_be_bytes())?;
    w.write_all(&(4 + 8 * descs.len() as u32).to_be_bytes())?;
    w.write_all(&ALLOCATION_ID.to_be_bytes())?;
    for (n, f) in descs {
        w.write_all(&n.to_be_bytes())?;
        w.write_all(&f.to_be_bytes())?;
    }
    w.flush()
}

fn simple_ok(w: &mut impl Write, structured: bool, cookie: u64) -> io::Result<()> {
    if structured {
        w.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
        w.write_all(&REPLY_FLAG_DONE.to_be_bytes())?;
        w.write_all(&REPLY_TYPE_NONE.to_be_bytes())?;
        w.write_all(&cookie.to_be_bytes())?;
        w.write_all(&0u32.to_be_bytes())?;
    } else {
        w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
        w.write_all(&0u32.to_be_bytes())?;
        w.write_all(&cookie.to_be_bytes())?;
    }
    w.flush()
}
