//! A TCP proxy on 127.0.0.1 whose link a test breaks on command: it passes bytes, stalls,
//! trickles, cuts every connection or goes down, and counts the bytes it forwarded.
//!
//! ```text
//!  agent -> 127.0.0.1:P (FaultLink: Pass | Stall | Trickle | Down, cut()) -> upstream
//! ```
//!
//! Each direction of a connection holds at most [`PIECE`] bytes: the proxy reads no more until
//! those are forwarded, so a stalled or trickling link leaves the rest in the endpoints' own
//! socket buffers and memory stays bounded however long the fault lasts.

use anyhow::Result;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Most bytes one direction of one connection holds between its read and its write.
const PIECE: usize = 64 * 1024;

/// Pause after a failed `accept` (out of descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// What the link does with the bytes of every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Forwards everything as it comes.
    Pass,
    /// Holds every byte in both directions; connections stay open.
    Stall,
    /// Forwards at most `bytes_per_sec` bytes a second per direction per connection.
    Trickle { bytes_per_sec: u64 },
    /// Resets every open connection and resets new ones as soon as they are accepted.
    Down,
}

/// What the test asked for, as every connection sees it.
#[derive(Debug, Clone, Copy)]
struct Control {
    mode: LinkMode,
    /// Bumped by every cut and every switch to [`LinkMode::Down`]: a connection that sees it
    /// differ from the value at its start resets. A counter, not a flag, so that a cut
    /// followed at once by `set(Pass)` still reaches every connection.
    cuts: u64,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
    /// Connections whose relay still runs.
    open: AtomicU64,
}

/// Counts a relay as open for as long as it lives.
struct OpenGuard(Arc<Counters>);

impl OpenGuard {
    fn new(counters: &Arc<Counters>) -> OpenGuard {
        counters.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(counters.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The proxy: listens on `addr` and forwards to its upstream on a thread of its own until
/// dropped.
pub struct FaultLink {
    pub addr: SocketAddr,
    control: watch::Sender<Control>,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultLink {
    /// Starts the proxy in [`LinkMode::Pass`] on a free loopback port.
    pub fn start(upstream: SocketAddr) -> Result<FaultLink> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (control, watcher) = watch::channel(Control {
            mode: LinkMode::Pass,
            cuts: 0,
        });
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = {
            let counters = counters.clone();
            std::thread::spawn(move || {
                rt.block_on(accept_loop(listener, upstream, watcher, counters, stopped));
                rt.shutdown_timeout(Duration::from_millis(100));
            })
        };
        Ok(FaultLink {
            addr,
            control,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Switches the link to `mode` for every open and future connection. Switching to
    /// [`LinkMode::Down`] also cuts every open connection.
    pub fn set(&self, mode: LinkMode) {
        self.control.send_modify(|c| {
            if mode == LinkMode::Down {
                c.cuts += 1;
            }
            c.mode = mode;
        });
    }

    /// Resets every open connection now; new ones are accepted as the mode says.
    pub fn cut(&self) {
        self.control.send_modify(|c| c.cuts += 1);
    }

    /// Bytes written to the upstream since the start.
    pub fn bytes_up(&self) -> u64 {
        self.counters.up.load(Ordering::SeqCst)
    }

    /// Bytes written back to clients since the start.
    pub fn bytes_down(&self) -> u64 {
        self.counters.down.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start, including those refused while down.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::SeqCst)
    }

    /// Connections still relayed: accepted and not yet ended on both sides (a closed client's
    /// bytes still queued in the sockets keep its connection open until forwarded).
    pub fn open_connections(&self) -> u64 {
        self.counters.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultLink {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: watch::Receiver<Control>,
    counters: Arc<Counters>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                };
                counters.connections.fetch_add(1, Ordering::SeqCst);
                if control.borrow().mode == LinkMode::Down {
                    reset(&client);
                    continue;
                }
                let open = OpenGuard::new(&counters);
                let relayed = relay(client, upstream, control.clone(), counters.clone());
                tokio::spawn(async move {
                    relayed.await;
                    drop(open);
                });
            }
        }
    }
}

/// Makes the coming drop of `stream` send a RST instead of a FIN, as a broken link shows to
/// its endpoints.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// One client connection: forwards both directions until both ended, or resets both sockets
/// when one side fails or the link is cut.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut control: watch::Receiver<Control>,
    counters: Arc<Counters>,
) {
    let Control { mode, cuts: epoch } = *control.borrow_and_update();
    if mode == LinkMode::Down {
        // Went down between the accept and this task's start.
        reset(&client);
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let broken = {
        let (client_r, client_w) = client.split();
        let (server_r, server_w) = server.split();
        let up = pump(client_r, server_w, &counters.up, control.clone(), epoch);
        let down = pump(server_r, client_w, &counters.down, control.clone(), epoch);
        tokio::select! {
            ended = async { tokio::try_join!(up, down) } => ended.is_err(),
            () = cut_since(&mut control, epoch) => true,
        }
    };
    if broken {
        reset(&client);
        reset(&server);
    }
}

/// Resolves once the link was cut (or went down) after `epoch`, or the proxy stops.
async fn cut_since(control: &mut watch::Receiver<Control>, epoch: u64) {
    let _ = control.wait_for(|c| c.cuts != epoch).await;
}

/// A direction's end: `Err` when the connection must be reset (a side failed).
type Pumped = std::result::Result<(), ()>;

/// Copies one direction as the link mode allows; passes the end of the stream on as a
/// half-close. Stops before the next piece once the link is cut after `epoch`: a busy copy may
/// not yield to [`relay`]'s watch for a while, and bytes must not cross a cut link meanwhile.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    count: &AtomicU64,
    mut control: watch::Receiver<Control>,
    epoch: u64,
) -> Pumped {
    let mut buf = vec![0u8; PIECE];
    let mut bucket = Bucket::default();
    loop {
        until_open(&mut control, epoch).await?;
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return Err(()),
        };
        let mut sent = 0;
        while sent < n {
            let k = allowance(&mut control, epoch, &mut bucket, n - sent).await?;
            to.write_all(&buf[sent..sent + k]).await.map_err(|_| ())?;
            count.fetch_add(k as u64, Ordering::SeqCst);
            sent += k;
        }
    }
    to.shutdown().await.map_err(|_| ())
}

/// The mode in force, or `Err` once the link was cut after `epoch`.
fn current(
    control: &mut watch::Receiver<Control>,
    epoch: u64,
) -> std::result::Result<LinkMode, ()> {
    let c = *control.borrow_and_update();
    if c.cuts == epoch {
        Ok(c.mode)
    } else {
        Err(())
    }
}

/// Waits while the link holds every byte (stalled or down), so that nothing more is read.
async fn until_open(control: &mut watch::Receiver<Control>, epoch: u64) -> Pumped {
    loop {
        let mode = current(control, epoch)?;
        if !matches!(mode, LinkMode::Stall | LinkMode::Down) {
            return Ok(());
        }
        control.changed().await.map_err(|_| ())?;
    }
}

/// How many of `want` bytes may go now: all of them on a passing link; on a trickling one
/// what the bucket holds, waiting for at least one byte; none while stalled or down.
async fn allowance(
    control: &mut watch::Receiver<Control>,
    epoch: u64,
    bucket: &mut Bucket,
    want: usize,
) -> std::result::Result<usize, ()> {
    loop {
        let wait = match current(control, epoch)? {
            LinkMode::Pass => {
                *bucket = Bucket::default();
                return Ok(want);
            }
            LinkMode::Trickle { bytes_per_sec } => match bucket.take(bytes_per_sec, want) {
                Ok(k) => return Ok(k),
                Err(wait) => Some(wait),
            },
            LinkMode::Stall | LinkMode::Down => {
                *bucket = Bucket::default();
                None
            }
        };
        match wait {
            Some(wait) => tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = control.changed() => changed.map_err(|_| ())?,
            },
            None => control.changed().await.map_err(|_| ())?,
        }
    }
}

/// A token bucket for a trickle: fills at the rate from the moment the trickle began, holding
/// at most one second's worth, so the link never bursts above its rate.
#[derive(Default)]
struct Bucket {
    tokens: f64,
    since: Option<Instant>,
}

impl Bucket {
    /// Takes up to `want` bytes at `rate` bytes a second, or says how long until one is due.
    fn take(&mut self, rate: u64, want: usize) -> std::result::Result<usize, Duration> {
        let rate = rate.max(1) as f64;
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        self.tokens = (self.tokens + rate * (now - since).as_secs_f64()).min(rate);
        self.since = Some(now);
        if self.tokens >= 1.0 {
            let k = (self.tokens as usize).min(want);
            self.tokens -= k as f64;
            Ok(k)
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}
