//! A read-only NBD server that serves disks of a point straight from the store, without
//! materialising an image: fixed newstyle handshake, `NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`,
//! structured replies (reads answer holes as `OFFSET_HOLE`), and the `base:allocation` metadata
//! context so clients such as `qemu-img` and `nbdcopy` skip holes. One thread per client, each
//! with its own read-only catalog connection: many clients at once, and `serve` keeps writing.

use crate::catalog::leaves::{self, Columns, Span};
use crate::catalog::{self, CatalogError, PointId};
use crate::chunks::{self, ChunkLocation, ChunkReader, ReadOrder};
use crate::points::PointDisk;
use rewind_proto::format::DiskGeometry;
use rewind_proto::nbd::*;
use rewind_proto::report::{chain, Chain};
use rewind_proto::{chunk, Leaf};
use rusqlite::Connection;
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// errno values NBD carries in error replies.
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;

/// Context id of `base:allocation`.
const ALLOCATION_ID: u32 = 1;

/// One disk of a point, served as an export named after the disk.
#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub point: i64,
    pub disk: PointDisk,
}

/// Bytes of block data served so far (drives progress bars).
pub type Served = Arc<AtomicU64>;

/// What a client connection needs to read a point.
#[derive(Clone)]
pub struct Exports {
    pub data: PathBuf,
    pub list: Vec<Export>,
    pub served: Served,
}

impl Exports {
    /// Every disk of `point`, each exported under its disk name.
    pub fn of_point(data: &Path, point: &crate::points::PointInfo) -> Exports {
        Exports {
            data: data.to_owned(),
            list: point
                .disks
                .iter()
                .map(|d| Export {
                    name: d.name.clone(),
                    point: point.id,
                    disk: d.clone(),
                })
                .collect(),
            served: Arc::new(AtomicU64::new(0)),
        }
    }
}

fn rd_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn rd_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn rd_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

/// Parses "u32 length + name" at the front of `data`.
fn take_name(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    Some((String::from_utf8_lossy(name).into_owned(), &data[4 + len..]))
}

/// A block's leaf and where its chunk lives; None when the catalog holds no chunk for the
/// leaf (quarantined by verify, or lost): a read of the block then fails, it is never served
/// as zeros.
type Located = (Leaf, Option<ChunkLocation>);

/// Reads a point's blocks from the store for one connection.
struct PointReader {
    conn: Connection,
    packs: Box<dyn ChunkReader>,
    export: Export,
    geometry: DiskGeometry,
}

impl PointReader {
    fn open(data: &Path, export: &Export) -> io::Result<PointReader> {
        let conn = catalog::open_ro(data).map_err(io::Error::other)?;
        let geometry = DiskGeometry::new(export.disk.size, export.disk.block_size)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PointReader {
            conn,
            packs: chunks::open(data).reader(ReadOrder::Random),
            export: export.clone(),
            geometry,
        })
    }

    /// Non-zero blocks with index in `first..end`, at the point, with or without their chunk.
    fn blocks(&self, first: u64, end: u64) -> io::Result<HashMap<u64, Located>> {
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
    fn block_bytes(&mut self, idx: u64, loc: &Located) -> io::Result<Vec<u8>> {
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
        chunk::open(loc.0, &frame, len).map_err(|e| io::Error::other(e.to_string()))
    }
}

/// Serves one client until it disconnects: the handshake and options, then its requests.
pub fn serve_client<S: Read + Write>(sock: S, exports: &Exports) -> io::Result<()> {
    let (r, w) = split(sock);
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    match negotiate(&mut r, &mut w, exports)? {
        Some(session) => transmit(&mut r, &mut w, exports, session),
        None => Ok(()),
    }
}

/// What the option haggling settled: the export, and how replies are made.
struct Session {
    export: Export,
    /// Structured replies (and so block status) were agreed.
    structured: bool,
    /// `base:allocation` was chosen as the meta context.
    allocation: bool,
}

/// The handshake (fixed newstyle) and the options, until the client picks an export (None:
/// it aborted).
fn negotiate(
    r: &mut impl Read,
    w: &mut impl Write,
    exports: &Exports,
) -> io::Result<Option<Session>> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&3u16.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    w.flush()?;
    let client_flags = rd_u32(r)?;
    let no_zeroes = client_flags & 2 != 0;
    let mut structured = false;
    let mut allocation = false;
    let flags =
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN;
    let export = loop {
        if rd_u64(r)? != IHAVEOPT {
            return Err(bad("bad option magic"));
        }
        let opt = rd_u32(r)?;
        let len = rd_u32(r)?;
        if len > MAX_OPTION {
            return Err(bad("option too long"));
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data)?;
        let find = |name: &str| {
            exports
                .list
                .iter()
                .find(|e| e.name == name || (name.is_empty() && exports.list.len() == 1))
        };
        match opt {
            OPT_STRUCTURED_REPLY => {
                structured = true;
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_LIST => {
                for e in &exports.list {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    option_reply(w, opt, REP_SERVER, &d)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                if meta_context(w, opt, &data, structured, |n| find(n).is_some())? {
                    allocation = true;
                }
            }
            OPT_GO | OPT_INFO => {
                let Some((name, _)) = take_name(&data) else {
                    option_reply(w, opt, REP_ERR_INVALID, b"malformed")?;
                    continue;
                };
                let Some(e) = find(&name) else {
                    option_reply(
                        w,
                        opt,
                        REP_ERR_UNKNOWN,
                        format!("no export {name:?}").as_bytes(),
                    )?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&e.disk.size.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(w, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(w, opt, REP_INFO, &bs)?;
                option_reply(w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break e.clone();
                }
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(e) = find(&name) else {
                    return Err(bad("unknown export"));
                };
                w.write_all(&e.disk.size.to_be_bytes())?;
                w.write_all(&flags.to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                break e.clone();
            }
            OPT_ABORT => {
                let _ = option_reply(w, opt, REP_ACK, &[]);
                return Ok(None);
            }
            _ => option_reply(w, opt, REP_ERR_UNSUP, b"unsupported option")?,
        }
    };
    Ok(Some(Session {
        export,
        structured,
        allocation,
    }))
}

/// Answers a `SET_META_CONTEXT` or `LIST_META_CONTEXT` option (only `base:allocation` is
/// offered); returns whether `base:allocation` was chosen.
fn meta_context(
    w: &mut impl Write,
    opt: u32,
    data: &[u8],
    structured: bool,
    known: impl Fn(&str) -> bool,
) -> io::Result<bool> {
    let Some((name, rest)) = take_name(data) else {
        option_reply(w, opt, REP_ERR_INVALID, b"malformed")?;
        return Ok(false);
    };
    if !structured || !known(&name) {
        option_reply(
            w,
            opt,
            REP_ERR_INVALID,
            b"structured replies and a known export first",
        )?;
        return Ok(false);
    }
    let count = rest
        .get(..4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut q = &rest[4.min(rest.len())..];
    let mut want = count == 0 && opt == OPT_LIST_META_CONTEXT;
    for _ in 0..count {
        let Some((query, tail)) = take_name(q) else {
            break;
        };
        q = tail;
        if query == "base:allocation" || (opt == OPT_LIST_META_CONTEXT && query == "base:") {
            want = true;
        }
    }
    if want {
        let mut d = ALLOCATION_ID.to_be_bytes().to_vec();
        d.extend_from_slice(b"base:allocation");
        option_reply(w, opt, REP_META_CONTEXT, &d)?;
    }
    option_reply(w, opt, REP_ACK, &[])?;
    Ok(want && opt == OPT_SET_META_CONTEXT)
}

/// One request's header.
struct Request {
    cflags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// The transmission phase: requests until the client disconnects.
fn transmit<R: Read, W: Write>(
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
    let mut reader = PointReader::open(&exports.data, &export)?;
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

/// Splits a stream into read and write halves (both sides of one socket).
fn split<S: Read + Write>(sock: S) -> (Half<S>, Half<S>) {
    let shared = Arc::new(std::sync::Mutex::new(sock));
    (Half(shared.clone()), Half(shared))
}

/// One half of a shared stream. Reads and writes alternate in NBD (one request, one reply), so
/// a mutex is never contended for long.
struct Half<S>(Arc<std::sync::Mutex<S>>);

impl<S: Read> Read for Half<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .read(buf)
    }
}

impl<S: Write> Write for Half<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .flush()
    }
}

/// Accepts clients on a listener forever, one thread each.
pub fn serve_unix(listener: std::os::unix::net::UnixListener, exports: Exports) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let ex = exports.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve_client(s, &ex) {
                        tracing::debug!(error = %Chain(&e), "NBD client ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
}

/// Accepts TCP clients forever, one thread each.
pub fn serve_tcp(listener: std::net::TcpListener, exports: Exports) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let ex = exports.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve_client(s, &ex) {
                        tracing::debug!(error = %Chain(&e), "NBD client ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
}
