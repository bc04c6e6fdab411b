//! A raw HTTP/2 client for tests that must misbehave below gRPC: it opens streams, sends a
//! message's length prefix and part of its body, and never finishes, to check that the
//! receiver bounds what such streams can hold.

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::SendStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// Data frames are sent in pieces of this size, each within the flow-control window granted.
const PIECE: usize = 64 * 1024;

/// Connects to `addr` over TLS as the agent whose certificate and key are given, trusting
/// `ca` for the receiver (named `localhost`), and completes the HTTP/2 handshake.
pub async fn connect(
    addr: SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<SendRequest<Bytes>> {
    let (send, conn) = open(addr, ca, cert, key).await?;
    tokio::spawn(async move {
        // Ends when the receiver closes the connection or every stream and handle is gone.
        let _ = conn.await;
    });
    Ok(send)
}

/// Like [`connect`], then waits up to `timeout` for the receiver to answer a PING. A receiver
/// closes a connection it refuses (one past a per-agent cap) right after the TLS handshake,
/// which the client's side of TLS 1.3 does not wait for: such a connection fails here instead
/// of at its first stream.
pub async fn connect_accepted(
    addr: SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
    timeout: Duration,
) -> anyhow::Result<SendRequest<Bytes>> {
    let (send, mut conn) = open(addr, ca, cert, key).await?;
    let mut ping = conn
        .ping_pong()
        .ok_or_else(|| anyhow::anyhow!("the connection's pings were taken"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque()))
        .await
        .map_err(|_| anyhow::anyhow!("no answer to a PING within {timeout:?}"))??;
    Ok(send)
}

type Connection = h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>;

async fn open(
    addr: SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(SendRequest<Bytes>, Connection)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&std::fs::read(ca)?) {
        roots.add(c?)?;
    }
    let certs =
        CertificateDer::pem_slice_iter(&std::fs::read(cert)?).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&std::fs::read(key)?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    Ok(h2::client::handshake(tls).await?)
}

/// How a stream ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The receiver answered with this grpc-status and grpc-message.
    Status(i32, String),
    /// The receiver reset the stream.
    Reset(h2::Reason),
    /// The stream or its connection failed otherwise.
    Failed(String),
}

/// What one stream has done so far.
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    /// Bytes sent, prefix included.
    pub sent: u64,
    /// Every byte it meant to send went out.
    pub done_sending: bool,
    /// Why sending stopped early (the stream was reset, or its connection closed).
    pub send_error: Option<String>,
    /// How it ended, once it has.
    pub ended: Option<Ending>,
}

impl StreamState {
    /// Sent all it could: every byte, or until the receiver refused or reset it.
    pub fn settled(&self) -> bool {
        self.done_sending || self.send_error.is_some() || self.ended.is_some()
    }

    /// The grpc-status it ended with, if it ended with one.
    pub fn grpc_status(&self) -> Option<i32> {
        match self.ended {
            Some(Ending::Status(code, _)) => Some(code),
            _ => None,
        }
    }
}

/// What streams of a [`Flood`] do, in the path and the message they start.
#[derive(Debug, Clone)]
pub struct Attack {
    pub connections: usize,
    pub streams_per_connection: usize,
    /// The gRPC method, e.g. `/rewind.v1.Replication/Upload`.
    pub path: String,
    /// The length the message's prefix claims.
    pub claimed: u32,
    /// Bytes of the message body sent after the prefix; the stream is then held open.
    pub body: usize,
}

enum Event {
    Sent(usize, u64),
    DoneSending(usize),
    SendFailed(usize, String),
    Ended(usize, Ending),
}

/// Streams that each start a gRPC message and never finish it, held open until dropped.
pub struct Flood {
    pub streams: Vec<StreamState>,
    events: mpsc::UnboundedReceiver<Event>,
    stop: watch::Sender<bool>,
    _handles: Vec<SendRequest<Bytes>>,
}

impl Flood {
    /// Opens `attack.connections` connections as the given agent and every stream on them;
    /// returns once all streams are open, while their bytes are still being sent.
    pub async fn start(
        addr: SocketAddr,
        ca: &Path,
        cert: &Path,
        key: &Path,
        attack: &Attack,
    ) -> anyhow::Result<Flood> {
        let mut connections = Vec::new();
        for _ in 0..attack.connections {
            connections.push(connect(addr, ca, cert, key).await?);
        }
        let streams = attack.connections * attack.streams_per_connection;
        Flood::over(
            connections,
            streams,
            &attack.path,
            attack.claimed,
            attack.body,
        )
        .await
    }

    /// Opens `streams` streams on `connections`, each sending the prefix of a message to
    /// `path` claiming `claimed` bytes and `body` bytes of it: the first connection takes an
    /// even share (rounded up), then the next. Returns once all streams are open, while their
    /// bytes are still being sent.
    pub async fn over(
        connections: Vec<SendRequest<Bytes>>,
        streams: usize,
        path: &str,
        claimed: u32,
        body: usize,
    ) -> anyhow::Result<Flood> {
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let share = streams.div_ceil(connections.len().max(1));
        let mut id = 0;
        for send in &connections {
            for _ in 0..share.min(streams - id) {
                let mut ready = send.clone().ready().await?;
                let req = http::Request::builder()
                    .method("POST")
                    .uri(format!("https://localhost{path}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())?;
                let (response, stream) = ready.send_request(req, false)?;
                tokio::spawn(watch_response(id, response, tx.clone()));
                tokio::spawn(send_message(
                    id,
                    stream,
                    claimed,
                    body,
                    tx.clone(),
                    stopped.clone(),
                ));
                id += 1;
            }
        }
        Ok(Flood {
            streams: vec![StreamState::default(); id],
            events,
            stop,
            _handles: connections,
        })
    }

    /// Applies the events that arrived so far, without waiting for more.
    pub fn catch_up(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.apply(event);
        }
    }

    /// Applies events until `done` holds for the streams or `timeout` passes; returns `done`.
    pub async fn wait(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[StreamState]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&self.streams) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.apply(event),
                Ok(None) | Err(_) => return done(&self.streams),
            }
        }
        true
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Sent(id, n) => self.streams[id].sent += n,
            Event::DoneSending(id) => self.streams[id].done_sending = true,
            Event::SendFailed(id, e) => self.streams[id].send_error = Some(e),
            Event::Ended(id, ending) => self.streams[id].ended = Some(ending),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Sends the prefix and `body` bytes of a message claiming `claimed` bytes, then holds the
/// stream open (never ending it) until the flood stops or the receiver resets it.
async fn send_message(
    id: usize,
    mut stream: SendStream<Bytes>,
    claimed: u32,
    body: usize,
    tx: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&claimed.to_be_bytes());
    let filler = Bytes::from(vec![0x5a; PIECE]);
    let pieces = std::iter::once(Bytes::from(prefix)).chain(
        (0..body)
            .step_by(PIECE)
            .map(|at| filler.slice(..PIECE.min(body - at))),
    );
    let mut outcome = Ok(());
    for piece in pieces {
        let n = piece.len() as u64;
        outcome = send_piece(&mut stream, piece).await;
        if outcome.is_err() {
            break;
        }
        let _ = tx.send(Event::Sent(id, n));
    }
    let _ = tx.send(match outcome {
        Ok(()) => Event::DoneSending(id),
        Err(e) => Event::SendFailed(id, e),
    });
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        _ = poll_fn(|cx| stream.poll_reset(cx)) => {}
    }
}

/// Sends `data` as the stream's flow-control window allows.
async fn send_piece(stream: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), String> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        while stream.capacity() == 0 {
            poll_fn(|cx| {
                if let Poll::Ready(r) = stream.poll_reset(cx) {
                    return Poll::Ready(Err(match r {
                        Ok(reason) => format!("reset: {reason:?}"),
                        Err(e) => e.to_string(),
                    }));
                }
                stream.poll_capacity(cx).map(|c| match c {
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("stream closed".to_owned()),
                })
            })
            .await?;
        }
        let n = stream.capacity().min(data.len());
        stream
            .send_data(data.split_to(n), false)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Waits for the response and reports the grpc-status it carries, in its headers (a
/// trailers-only answer) or its trailers.
async fn watch_response(id: usize, response: ResponseFuture, tx: mpsc::UnboundedSender<Event>) {
    let ending = match response.await {
        Err(e) => ending_of(e),
        Ok(r) => match grpc_status(r.headers()) {
            Some(ending) => ending,
            None => {
                let mut body = r.into_body();
                let mut failed = None;
                while let Some(data) = body.data().await {
                    match data {
                        Ok(d) => {
                            let _ = body.flow_control().release_capacity(d.len());
                        }
                        Err(e) => {
                            failed = Some(ending_of(e));
                            break;
                        }
                    }
                }
                match failed {
                    Some(ending) => ending,
                    None => match body.trailers().await {
                        Ok(Some(t)) => grpc_status(&t).unwrap_or_else(|| {
                            Ending::Failed("trailers without grpc-status".into())
                        }),
                        Ok(None) => Ending::Failed("no trailers".into()),
                        Err(e) => ending_of(e),
                    },
                }
            }
        },
    };
    let _ = tx.send(Event::Ended(id, ending));
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Ending> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some(Ending::Status(code, message))
}

/// A grpc-message as sent: percent-encoded UTF-8.
fn percent_decode(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let hex = text
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (text[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ending_of(e: h2::Error) -> Ending {
    match e.reason() {
        Some(reason) if e.is_reset() => Ending::Reset(reason),
        _ => Ending::Failed(e.to_string()),
    }
}
