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

mod commands;

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
}

impl<S: Read + Write> NbdClient<S> {
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
