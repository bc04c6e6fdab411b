//! A read-only NBD server that serves disks of a point straight from the store, without
//! materialising an image: fixed newstyle handshake, `NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`,
//! structured replies (reads answer holes as `OFFSET_HOLE`), and the `base:allocation` metadata
//! context so clients such as `qemu-img` and `nbdcopy` skip holes. One thread per client, each
//! with its own read-only catalog connection: many clients at once, and `serve` keeps writing.
//!
//! `handshake` settles the export and the options, `transmit` answers requests, and `reader`
//! reads a point's blocks from the store.

use crate::points::PointDisk;
use rewind_proto::report::Chain;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

mod handshake;
mod reader;
mod transmit;

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
    /// How the point's chunks decode (its key, for an encrypted point).
    pub codec: rewind_proto::crypt::Codec,
}

impl Exports {
    /// Every disk of `point`, each exported under its disk name.
    pub fn of_point(
        data: &Path,
        point: &crate::points::PointInfo,
        codec: rewind_proto::crypt::Codec,
    ) -> Exports {
        Exports {
            codec,
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

/// Big-endian integers of the protocol.
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

/// A peer that broke the protocol.
fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Serves one client until it disconnects: the handshake and options, then its requests.
pub fn serve_client<S: Read + Write>(sock: S, exports: &Exports) -> io::Result<()> {
    let (r, w) = split(sock);
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    match handshake::negotiate(&mut r, &mut w, exports)? {
        Some(session) => transmit::transmit(&mut r, &mut w, exports, session),
        None => Ok(()),
    }
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
