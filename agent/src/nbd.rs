//! A small synchronous NBD client: fixed-newstyle handshake, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`, then `NBD_CMD_READ` and `NBD_CMD_BLOCK_STATUS`
//! with structured replies. Reads and writes of many ranges keep several requests in flight;
//! every length the server sends is bounded before it is allocated.
//!
//! ```text
//!  server: "NBDMAGIC" "IHAVEOPT" flags(u16)      client: flags(u32)
//!  client: "IHAVEOPT" option(u32) len(u32) data  server: 0x3e889045565a9 option type len data
//!  request: 0x25609513 flags(u16) type(u16) cookie(u64) offset(u64) len(u32)
//!  structured reply: 0x668e33ef flags(u16) type(u16) cookie(u64) len(u32) payload
//! ```
//! (numbers big-endian, as the protocol says).

use rewind_proto::nbd::*;
pub use rewind_proto::nbd::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use thiserror::Error;

/// Largest read we ask for: QEMU's server accepts up to 32 MiB.
pub const MAX_READ: u32 = 4 * 1024 * 1024;
/// Requests the pipelined calls keep in flight (each round trip to qemu-nbd costs ~0.1 ms).
pub const PIPELINE: usize = 16;
/// Largest option reply or structured chunk header payload we accept besides read data.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Block status is asked for in pieces of at most 1 GiB (the length field is 32 bits).
const STATUS_PIECE: u64 = 1 << 30;
/// Replies are read through a buffer of this size: one receive then holds several headers
/// (read a few bytes at a time), while read data larger than the buffer goes straight into
/// its destination.
const REPLY_BUFFER: usize = 16 * 1024;

#[derive(Debug, Error)]
pub enum NbdError {
    /// The socket failed or the server went away (also mid-reply).
    #[error("NBD connection")]
    Io(#[from] io::Error),
    /// The server does not speak fixed-newstyle NBD.
    #[error("NBD server sent bad magic: {0:#x}")]
    BadMagic(u64),
    /// The server has no export of that name.
    #[error("NBD export {0:?} does not exist")]
    NoSuchExport(String),
    /// The server refused an option.
    #[error("NBD server refused option {option} (reply {reply:#x}): {message}")]
    OptionRefused {
        option: u32,
        reply: u32,
        message: String,
    },
    /// The server did not grant a metadata context we need.
    #[error("NBD server did not grant metadata context {0:?}")]
    NoContext(String),
    /// A request failed on the server.
    #[error("NBD {command} at offset {offset}: server error {errno}: {message}")]
    Command {
        command: &'static str,
        offset: u64,
        errno: u32,
        message: String,
    },
    /// The server broke the protocol.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
}

fn proto<T>(msg: impl Into<String>) -> Result<T, NbdError> {
    Err(NbdError::Protocol(msg.into()))
}

/// One extent of a metadata context: `length` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// An open NBD export.
pub struct NbdClient<S: Read + Write = UnixStream> {
    /// Replies are read through the buffer; requests are written to the stream under it.
    sock: BufReader<S>,
    size: u64,
    contexts: HashMap<String, u32>,
    cookie: u64,
}

impl NbdClient<UnixStream> {
    /// Connects to a unix socket and opens `export`, asking for the metadata contexts `meta`
    /// (e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`).
    pub fn connect_unix(path: &Path, export: &str, meta: &[&str]) -> Result<Self, NbdError> {
        NbdClient::handshake(UnixStream::connect(path)?, export, meta)
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_vec(r: &mut impl Read, len: u32, limit: u32) -> Result<Vec<u8>, NbdError> {
    if len > limit {
        return proto(format!("payload of {len} bytes exceeds {limit}"));
    }
    let mut v = vec![0; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Encodes an option request.
/// The errno and message of a structured error chunk's payload.
fn error_payload(payload: &[u8]) -> Result<(u32, String), NbdError> {
    if payload.len() < 6 {
        return proto("short error chunk");
    }
    let errno = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let mlen = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    let message = String::from_utf8_lossy(payload.get(6..6 + mlen).unwrap_or(&[])).into_owned();
    Ok((errno, message))
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn name_field(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

impl<S: Read + Write> NbdClient<S> {
    /// Runs the handshake on a connected stream.
    pub fn handshake(mut sock: S, export: &str, meta: &[&str]) -> Result<Self, NbdError> {
        let magic = read_u64(&mut sock)?;
        if magic != NBDMAGIC {
            return Err(NbdError::BadMagic(magic));
        }
        let opt_magic = read_u64(&mut sock)?;
        if opt_magic != IHAVEOPT {
            return Err(NbdError::BadMagic(opt_magic));
        }
        let flags = read_u16(&mut sock)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return proto("server is not fixed-newstyle");
        }
        let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        sock.write_all(&client_flags.to_be_bytes())?;

        let mut me = NbdClient {
            sock: BufReader::with_capacity(REPLY_BUFFER, sock),
            size: 0,
            contexts: HashMap::new(),
            cookie: 0,
        };
        me.send_option(OPT_STRUCTURED_REPLY, &[])?;
        me.expect_ack(OPT_STRUCTURED_REPLY, export)?;

        if !meta.is_empty() {
            let mut data = name_field(export);
            data.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            for q in meta {
                data.extend_from_slice(&name_field(q));
            }
            me.send_option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (kind, payload) = me.option_reply(OPT_SET_META_CONTEXT, export)?;
                match kind {
                    REP_META_CONTEXT if payload.len() >= 4 => {
                        let id =
                            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        let name = String::from_utf8_lossy(&payload[4..]).into_owned();
                        me.contexts.insert(name, id);
                    }
                    REP_ACK => break,
                    _ => return proto(format!("unexpected reply {kind} to SET_META_CONTEXT")),
                }
            }
            for q in meta {
                if !me.contexts.contains_key(*q) {
                    return Err(NbdError::NoContext((*q).to_owned()));
                }
            }
        }

        let mut data = name_field(export);
        data.extend_from_slice(&0u16.to_be_bytes());
        me.send_option(OPT_GO, &data)?;
        loop {
            let (kind, payload) = me.option_reply(OPT_GO, export)?;
            match kind {
                REP_INFO if payload.len() >= 2 => {
                    let info = u16::from_be_bytes([payload[0], payload[1]]);
                    if info == INFO_EXPORT {
                        if payload.len() < 12 {
                            return proto("short NBD_INFO_EXPORT");
                        }
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&payload[2..10]);
                        me.size = u64::from_be_bytes(b);
                    }
                }
                REP_ACK => break,
                _ => return proto(format!("unexpected reply {kind} to GO")),
            }
        }
        Ok(me)
    }

    /// Writes to the server (under the reply buffer).
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sock.get_mut().write_all(bytes)
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), NbdError> {
        self.send(&option(opt, data))?;
        Ok(())
    }

    /// Reads one option reply; turns error replies into errors.
    fn option_reply(&mut self, opt: u32, export: &str) -> Result<(u32, Vec<u8>), NbdError> {
        let magic = read_u64(&mut self.sock)?;
        if magic != REPLY_MAGIC {
            return Err(NbdError::BadMagic(magic));
        }
        let got_opt = read_u32(&mut self.sock)?;
        let kind = read_u32(&mut self.sock)?;
        let len = read_u32(&mut self.sock)?;
        let payload = read_vec(&mut self.sock, len, MAX_OPTION_REPLY)?;
        if got_opt != opt {
            return proto(format!("reply for option {got_opt}, asked {opt}"));
        }
        if kind & (1 << 31) != 0 {
            if kind == REP_ERR_UNKNOWN && opt == OPT_GO {
                return Err(NbdError::NoSuchExport(export.to_owned()));
            }
            return Err(NbdError::OptionRefused {
                option: opt,
                reply: kind,
                message: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        Ok((kind, payload))
    }

    fn expect_ack(&mut self, opt: u32, export: &str) -> Result<(), NbdError> {
        match self.option_reply(opt, export)? {
            (REP_ACK, _) => Ok(()),
            (kind, _) => proto(format!("expected ACK to option {opt}, got {kind}")),
        }
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn next_cookie(&mut self) -> u64 {
        self.cookie += 1;
        self.cookie
    }

    /// Reads exactly `buf.len()` bytes at `offset` (split into requests of at most
    /// [`MAX_READ`]). Holes the server reports are zero-filled.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        let mut done = 0usize;
        while done < buf.len() {
            let len = (buf.len() - done).min(MAX_READ as usize);
            self.read_one(&mut buf[done..done + len], offset + done as u64)?;
            done += len;
        }
        Ok(())
    }

    fn read_one(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        let cookie = self.next_cookie();
        let len = buf.len() as u32;
        self.send(&request(CMD_READ, 0, cookie, offset, len))?;
        let end = offset + u64::from(len);
        let mut covered = 0u64;
        loop {
            let h = self.reply_header(cookie, "read", offset)?;
            match h.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    if h.len < 8 {
                        return proto("short OFFSET_DATA chunk");
                    }
                    let at = read_u64(&mut self.sock)?;
                    let n = u64::from(h.len - 8);
                    if at < offset || at + n > end {
                        return proto(format!("data chunk {at}+{n} outside {offset}+{len}"));
                    }
                    let s = (at - offset) as usize;
                    self.sock.read_exact(&mut buf[s..s + n as usize])?;
                    covered += n;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if h.len != 12 {
                        return proto("bad OFFSET_HOLE chunk");
                    }
                    let at = read_u64(&mut self.sock)?;
                    let n = u64::from(read_u32(&mut self.sock)?);
                    if at < offset || at + n > end {
                        return proto(format!("hole chunk {at}+{n} outside {offset}+{len}"));
                    }
                    let s = (at - offset) as usize;
                    buf[s..s + n as usize].fill(0);
                    covered += n;
                }
                REPLY_TYPE_NONE => {
                    if h.len != 0 {
                        return proto("NONE chunk with payload");
                    }
                }
                SIMPLE => {
                    self.sock.read_exact(buf)?;
                    return Ok(());
                }
                other => return proto(format!("unexpected chunk type {other} in a read reply")),
            }
            if h.done {
                break;
            }
        }
        if covered != u64::from(len) {
            return proto(format!("read reply covered {covered} of {len} bytes"));
        }
        Ok(())
    }

    /// The extents of metadata context `context` over `[offset, offset + length)`, merged
    /// across requests, covering the whole range.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let id = *self
            .contexts
            .get(context)
            .ok_or_else(|| NbdError::NoContext(context.to_owned()))?;
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let len = (end - pos).min(STATUS_PIECE) as u32;
            let cookie = self.next_cookie();
            self.send(&request(CMD_BLOCK_STATUS, 0, cookie, pos, len))?;
            let mut got = Vec::new();
            loop {
                let h = self.reply_header(cookie, "block status", pos)?;
                match h.kind {
                    REPLY_TYPE_BLOCK_STATUS => {
                        if h.len < 4 || (h.len - 4) % 8 != 0 || h.len > MAX_OPTION_REPLY * 16 {
                            return proto("bad BLOCK_STATUS chunk length");
                        }
                        let ctx = read_u32(&mut self.sock)?;
                        let mut at = pos;
                        let mut descs = Vec::new();
                        for _ in 0..(h.len - 4) / 8 {
                            let l = u64::from(read_u32(&mut self.sock)?);
                            let f = read_u32(&mut self.sock)?;
                            descs.push(Extent {
                                offset: at,
                                length: l,
                                flags: f,
                            });
                            at += l;
                        }
                        if ctx == id {
                            got = descs;
                        }
                    }
                    REPLY_TYPE_NONE => {}
                    other => {
                        return proto(format!(
                            "unexpected chunk type {other} in a block status reply"
                        ))
                    }
                }
                if h.done {
                    break;
                }
            }
            let advanced: u64 = got.iter().map(|e| e.length).sum();
            if advanced == 0 {
                return proto("block status made no progress");
            }
            for e in got {
                // A reply may run past the range asked for (the spec lets the last extent do
                // so); what lies past it is not ours to report.
                if e.offset >= end {
                    break;
                }
                let length = e.length.min(end - e.offset);
                if length == 0 {
                    continue;
                }
                match out.last_mut() {
                    Some(last)
                        if last.flags == e.flags && last.offset + last.length == e.offset =>
                    {
                        last.length += length
                    }
                    _ => out.push(Extent { length, ..e }),
                }
            }
            pos = (pos + advanced).min(end);
        }
        Ok(out)
    }

    /// Reads many ranges (each at most [`MAX_READ`] bytes) keeping up to [`PIPELINE`] requests
    /// in flight; `deliver(i, bytes)` gets range `i` as soon as its reply is complete (replies
    /// may come in any order). Holes are zero-filled. After an error the connection is not
    /// reusable.
    pub fn read_many(
        &mut self,
        ranges: &[(u64, usize)],
        deliver: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), NbdError> {
        // cookie -> (range index, buffer, bytes covered)
        let mut inflight: HashMap<u64, (usize, Vec<u8>, u64)> = HashMap::new();
        // Buffers of delivered ranges, reused (cleared) for the next ones.
        let mut spare: Vec<Vec<u8>> = Vec::new();
        // New requests go out together, in one write.
        let mut requests = Vec::new();
        let mut next = 0;
        while next < ranges.len() || !inflight.is_empty() {
            while next < ranges.len() && inflight.len() < PIPELINE {
                let (offset, len) = ranges[next];
                if len > MAX_READ as usize {
                    return proto(format!("read of {len} bytes is over the {MAX_READ} limit"));
                }
                let cookie = self.next_cookie();
                requests.extend_from_slice(&request(CMD_READ, 0, cookie, offset, len as u32));
                let mut buf = spare.pop().unwrap_or_default();
                buf.clear();
                buf.resize(len, 0);
                inflight.insert(cookie, (next, buf, 0));
                next += 1;
            }
            if !requests.is_empty() {
                self.send(&requests)?;
                requests.clear();
            }
            let (cookie, h) =
                self.any_reply("read", |c| inflight.get(&c).map(|(i, _, _)| ranges[*i].0))?;
            let Some((i, buf, covered)) = inflight.get_mut(&cookie) else {
                return proto(format!("reply for unknown cookie {cookie}"));
            };
            let (offset, len) = ranges[*i];
            let end = offset + len as u64;
            match h.kind {
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    let data = h.kind == REPLY_TYPE_OFFSET_DATA;
                    if (data && h.len < 8) || (!data && h.len != 12) {
                        return proto("bad read reply chunk");
                    }
                    let at = read_u64(&mut self.sock)?;
                    let n = if data {
                        u64::from(h.len - 8)
                    } else {
                        u64::from(read_u32(&mut self.sock)?)
                    };
                    if at < offset || at + n > end {
                        return proto(format!("chunk {at}+{n} outside {offset}+{len}"));
                    }
                    let s = (at - offset) as usize;
                    let piece = &mut buf[s..s + n as usize];
                    if data {
                        self.sock.read_exact(piece)?;
                    } else {
                        piece.fill(0);
                    }
                    *covered += n;
                }
                REPLY_TYPE_NONE if h.len == 0 => {}
                SIMPLE => {
                    self.sock.read_exact(buf)?;
                    *covered = len as u64;
                }
                other => return proto(format!("unexpected chunk type {other} in a read reply")),
            }
            if h.done {
                if let Some((i, buf, covered)) = inflight.remove(&cookie) {
                    if covered != len as u64 {
                        return proto(format!("read reply covered {covered} of {len} bytes"));
                    }
                    deliver(i, &buf);
                    spare.push(buf);
                }
            }
        }
        Ok(())
    }

    /// Writes many (offset, bytes) pieces, each at most [`MAX_READ`] bytes, keeping up to
    /// [`PIPELINE`] requests in flight. After an error the connection is not reusable.
    pub fn write_many(&mut self, writes: &[(u64, &[u8])]) -> Result<(), NbdError> {
        let mut inflight: HashMap<u64, u64> = HashMap::new();
        let mut next = 0;
        while next < writes.len() || !inflight.is_empty() {
            while next < writes.len() && inflight.len() < PIPELINE {
                let (offset, data) = writes[next];
                if data.len() > MAX_READ as usize {
                    return proto(format!(
                        "write of {} bytes is over the {MAX_READ} limit",
                        data.len()
                    ));
                }
                let cookie = self.next_cookie();
                self.send(&request(CMD_WRITE, 0, cookie, offset, data.len() as u32))?;
                self.send(data)?;
                inflight.insert(cookie, offset);
                next += 1;
            }
            let (cookie, h) = self.any_reply("write", |c| inflight.get(&c).copied())?;
            if !inflight.contains_key(&cookie) {
                return proto(format!("reply for unknown cookie {cookie}"));
            }
            if h.len != 0 {
                return proto("write reply with payload");
            }
            if h.done {
                inflight.remove(&cookie);
            }
        }
        Ok(())
    }

    /// Reads one reply header for any request in flight; `offset_of(cookie)` names the
    /// request's offset for error messages. An error chunk becomes an error (not drained).
    fn any_reply(
        &mut self,
        command: &'static str,
        offset_of: impl Fn(u64) -> Option<u64>,
    ) -> Result<(u64, ReplyHeader), NbdError> {
        let magic = read_u32(&mut self.sock)?;
        let (cookie, header, failure) = match magic {
            STRUCTURED_REPLY_MAGIC => {
                let flags = read_u16(&mut self.sock)?;
                let kind = read_u16(&mut self.sock)?;
                let cookie = read_u64(&mut self.sock)?;
                let len = read_u32(&mut self.sock)?;
                if kind & REPLY_TYPE_ERROR_BIT != 0 {
                    let (errno, message) =
                        error_payload(&read_vec(&mut self.sock, len, MAX_OPTION_REPLY)?)?;
                    (cookie, None, Some((errno, message)))
                } else {
                    let done = flags & REPLY_FLAG_DONE != 0;
                    (cookie, Some(ReplyHeader { done, kind, len }), None)
                }
            }
            SIMPLE_REPLY_MAGIC => {
                let errno = read_u32(&mut self.sock)?;
                let cookie = read_u64(&mut self.sock)?;
                if errno != 0 {
                    (cookie, None, Some((errno, String::new())))
                } else {
                    let h = ReplyHeader {
                        done: true,
                        kind: SIMPLE,
                        len: 0,
                    };
                    (cookie, Some(h), None)
                }
            }
            other => return Err(NbdError::BadMagic(u64::from(other))),
        };
        match (header, failure) {
            (Some(h), _) => Ok((cookie, h)),
            (None, Some((errno, message))) => Err(NbdError::Command {
                command,
                offset: offset_of(cookie).unwrap_or(0),
                errno,
                message,
            }),
            (None, None) => proto("empty reply"),
        }
    }

    /// Reads one reply header for `cookie`; error chunks become errors (after draining them).
    fn reply_header(
        &mut self,
        cookie: u64,
        command: &'static str,
        offset: u64,
    ) -> Result<ReplyHeader, NbdError> {
        let magic = read_u32(&mut self.sock)?;
        match magic {
            STRUCTURED_REPLY_MAGIC => {
                let flags = read_u16(&mut self.sock)?;
                let kind = read_u16(&mut self.sock)?;
                let got = read_u64(&mut self.sock)?;
                let len = read_u32(&mut self.sock)?;
                if got != cookie {
                    return proto(format!("reply for cookie {got}, expected {cookie}"));
                }
                if kind & REPLY_TYPE_ERROR_BIT != 0 {
                    let (errno, message) =
                        error_payload(&read_vec(&mut self.sock, len, MAX_OPTION_REPLY)?)?;
                    // Drain the rest of the reply so the connection stays usable.
                    let mut done = flags & REPLY_FLAG_DONE != 0;
                    while !done {
                        let h = self.reply_header(cookie, command, offset);
                        match h {
                            Ok(h) => {
                                read_vec(&mut self.sock, h.len, MAX_READ + 8)?;
                                done = h.done;
                            }
                            Err(_) => break,
                        }
                    }
                    return Err(NbdError::Command {
                        command,
                        offset,
                        errno,
                        message,
                    });
                }
                Ok(ReplyHeader {
                    done: flags & REPLY_FLAG_DONE != 0,
                    kind,
                    len,
                })
            }
            SIMPLE_REPLY_MAGIC => {
                let errno = read_u32(&mut self.sock)?;
                let got = read_u64(&mut self.sock)?;
                if got != cookie {
                    return proto(format!("reply for cookie {got}, expected {cookie}"));
                }
                if errno != 0 {
                    return Err(NbdError::Command {
                        command,
                        offset,
                        errno,
                        message: String::new(),
                    });
                }
                Ok(ReplyHeader {
                    done: true,
                    kind: SIMPLE,
                    len: 0,
                })
            }
            other => Err(NbdError::BadMagic(u64::from(other))),
        }
    }

    /// Writes `data` at `offset` (the export must be writable).
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), NbdError> {
        let mut done = 0usize;
        while done < data.len() {
            let len = (data.len() - done).min(MAX_READ as usize);
            let cookie = self.next_cookie();
            let at = offset + done as u64;
            self.send(&request(CMD_WRITE, 0, cookie, at, len as u32))?;
            self.send(&data[done..done + len])?;
            self.finish_simple(cookie, "write", at)?;
            done += len;
        }
        Ok(())
    }

    /// Writes zeros over `len` bytes at `offset`, letting the server punch holes.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        let cookie = self.next_cookie();
        self.send(&request(CMD_WRITE_ZEROES, 0, cookie, offset, len))?;
        self.finish_simple(cookie, "write zeroes", offset)
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        let cookie = self.next_cookie();
        self.send(&request(CMD_FLUSH, 0, cookie, 0, 0))?;
        self.finish_simple(cookie, "flush", 0)
    }

    /// Reads a reply that carries no data.
    fn finish_simple(
        &mut self,
        cookie: u64,
        command: &'static str,
        offset: u64,
    ) -> Result<(), NbdError> {
        loop {
            let h = self.reply_header(cookie, command, offset)?;
            if h.kind != REPLY_TYPE_NONE && h.kind != SIMPLE {
                return proto(format!(
                    "unexpected chunk type {} in a {command} reply",
                    h.kind
                ));
            }
            if h.done {
                return Ok(());
            }
        }
    }

    /// Says goodbye (NBD_CMD_DISC); errors are ignored since the connection ends anyway.
    pub fn disconnect(mut self) {
        let cookie = self.next_cookie();
        let _ = self.send(&request(CMD_DISC, 0, cookie, 0, 0));
    }

    /// Aborts option haggling (for callers that only wanted to probe).
    pub fn abort(mut self) {
        let _ = self.send(&option(OPT_ABORT, &[]));
    }
}

/// Pseudo chunk type for a simple (non-structured) reply.
const SIMPLE: u16 = u16::MAX;

struct ReplyHeader {
    done: bool,
    kind: u16,
    len: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding() {
        let r = request(CMD_READ, 0, 7, 0x1000, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[6..8], &[0, 0]);
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().expect("8")), 7);
        assert_eq!(u64::from_be_bytes(r[16..24].try_into().expect("8")), 0x1000);
        assert_eq!(u32::from_be_bytes(r[24..28].try_into().expect("4")), 512);
        let o = option(OPT_GO, b"xy");
        assert_eq!(&o[0..8], b"IHAVEOPT");
        assert_eq!(u32::from_be_bytes(o[8..12].try_into().expect("4")), OPT_GO);
        assert_eq!(u32::from_be_bytes(o[12..16].try_into().expect("4")), 2);
    }

    #[test]
    fn refuses_a_non_nbd_server() {
        let fake = io::Cursor::new(b"HTTP/1.1 200 OK\r\n\r\n".to_vec());
        let rw = ReadWrite(fake, Vec::new());
        assert!(matches!(
            NbdClient::handshake(rw, "x", &[]),
            Err(NbdError::BadMagic(_))
        ));
    }

    struct ReadWrite(io::Cursor<Vec<u8>>, Vec<u8>);
    impl Read for ReadWrite {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for ReadWrite {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.1.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
