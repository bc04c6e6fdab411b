//! Who may hold a connection, and for how long: the receiver's own accept loop, TLS handshake
//! and connection registry, so that no stranger and no single agent can take the descriptors,
//! the handshake slots or the connections that honest agents need.
//!
//! - A connection that has not finished its TLS handshake is a stranger's: strangers share a
//!   pool of handshake slots, capped per source address; when the pool is full the oldest
//!   pending handshake is dropped for the new one (an honest handshake takes milliseconds, so
//!   an attacker must churn faster than that to keep one out), and each has a deadline.
//! - A verified connection counts against its agent (named by its certificate) and the total;
//!   past either cap it is closed at once.
//! - A verified connection with no request in flight for the idle timeout is closed; one whose
//!   agent a reloaded revocation list names is closed at once, ending its streams.
//! - `accept` failing for want of descriptors (EMFILE) backs off instead of spinning.

use crate::config::Limits;
use crate::pki::identity_of;
use futures::task::AtomicWaker;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::ServerConfig;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// Longest `accept` backs off when the process is out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One verified connection, as the registry and the request layer see it.
pub struct ConnState {
    /// The agent its certificate names.
    pub agent: String,
    cert: CertificateDer<'static>,
    /// Requests in flight.
    active: AtomicUsize,
    /// When the last request started or ended.
    last: Mutex<Instant>,
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl ConnState {
    /// Ends the connection: its next read fails, so hyper drops it and its streams.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Marks a request of this connection as started; the guard marks it ended.
    pub fn request(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::SeqCst);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        ActiveRequest(self.clone())
    }
}

/// A request in flight on a connection (see [`ConnState::request`]).
pub struct ActiveRequest(Arc<ConnState>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Registry {
    /// Pending handshakes by arrival order: source address and the task doing it.
    handshakes: BTreeMap<u64, (IpAddr, Option<tokio::task::AbortHandle>)>,
    per_address: HashMap<IpAddr, usize>,
    next: u64,
    /// Verified connections by the peer's address and port.
    conns: HashMap<SocketAddr, Arc<ConnState>>,
    per_agent: HashMap<String, usize>,
    /// Refusals, for logs and tests.
    refused: u64,
    /// When each agent's certificate (as last presented) expires, in seconds since the epoch.
    expiry: BTreeMap<String, i64>,
}

/// Counts of what the registry holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    pub handshakes: usize,
    pub connections: usize,
    pub refused: u64,
}

/// The accept side of the receiver: limits, TLS and the registry of connections.
pub struct Admission {
    limits: Limits,
    /// The TLS configuration in force and its client verifier (replaced when the revocation
    /// list is reloaded).
    tls: RwLock<(Arc<ServerConfig>, Arc<dyn ClientCertVerifier>)>,
    registry: Mutex<Registry>,
}

impl Admission {
    /// `config` must verify client certificates with `verifier`.
    pub fn new(
        limits: Limits,
        config: Arc<ServerConfig>,
        verifier: Arc<dyn ClientCertVerifier>,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            tls: RwLock::new((config, verifier)),
            registry: Mutex::new(Registry::default()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the registry holds now.
    pub fn stats(&self) -> AdmissionStats {
        let r = self.registry();
        AdmissionStats {
            handshakes: r.handshakes.len(),
            connections: r.conns.len(),
            refused: r.refused,
        }
    }

    /// When the certificate each agent last presented expires (seconds since the epoch).
    pub fn agent_expiry(&self) -> Vec<(String, i64)> {
        self.registry()
            .expiry
            .iter()
            .map(|(a, t)| (a.clone(), *t))
            .collect()
    }

    /// The verified connection whose peer is `remote`.
    pub fn conn(&self, remote: SocketAddr) -> Option<Arc<ConnState>> {
        self.registry().conns.get(&remote).cloned()
    }

    /// Puts a new TLS configuration in force (a reloaded revocation list) and closes every open
    /// connection whose certificate `verifier` (the new configuration's) no longer accepts.
    /// Returns how many were closed.
    pub fn reload(
        &self,
        config: Arc<ServerConfig>,
        verifier: Arc<dyn ClientCertVerifier>,
    ) -> usize {
        // In force first: a handshake that started under the old list is checked against the
        // new one when it is admitted (see `admit_connection`).
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = (config, verifier.clone());
        let now = UnixTime::now();
        let conns: Vec<Arc<ConnState>> = self.registry().conns.values().cloned().collect();
        let mut closed = 0;
        for c in conns {
            if let Err(e) = verifier.verify_client_cert(&c.cert, &[], now) {
                tracing::warn!(agent = %c.agent, error = %e, "closing a connection its certificate no longer allows");
                c.close();
                closed += 1;
            }
        }
        closed
    }

    /// Takes a handshake slot for a stranger at `ip`, dropping the oldest pending handshake if
    /// the pool is full. `None`: this address holds its share already.
    fn admit_handshake(&self, ip: IpAddr) -> Option<u64> {
        let mut r = self.registry();
        if r.per_address.get(&ip).copied().unwrap_or(0) >= self.limits.max_handshakes_per_address {
            r.refused += 1;
            return None;
        }
        if r.handshakes.len() >= self.limits.max_handshakes {
            if let Some((_, (old_ip, task))) = r.handshakes.pop_first() {
                release_address(&mut r.per_address, old_ip);
                if let Some(t) = task {
                    t.abort();
                }
                r.refused += 1;
            }
        }
        let seq = r.next;
        r.next += 1;
        r.handshakes.insert(seq, (ip, None));
        *r.per_address.entry(ip).or_insert(0) += 1;
        Some(seq)
    }

    fn handshake_task(&self, seq: u64, task: tokio::task::AbortHandle) {
        let mut r = self.registry();
        match r.handshakes.get_mut(&seq) {
            Some(slot) => slot.1 = Some(task),
            // Evicted before its task was known.
            None => task.abort(),
        }
    }

    fn end_handshake(&self, seq: u64) {
        let mut r = self.registry();
        if let Some((ip, _)) = r.handshakes.remove(&seq) {
            release_address(&mut r.per_address, ip);
        }
    }

    /// Registers a verified connection of `agent`, or refuses it past a cap.
    fn admit_connection(
        &self,
        remote: SocketAddr,
        agent: String,
        cert: CertificateDer<'static>,
    ) -> Option<Arc<ConnState>> {
        let expires = x509_parser::parse_x509_certificate(cert.as_ref())
            .ok()
            .map(|(_, c)| c.validity().not_after.timestamp());
        // The list in force now, not the one the handshake began under.
        let verifier = self.tls.read().unwrap_or_else(|p| p.into_inner()).1.clone();
        if let Err(e) = verifier.verify_client_cert(&cert, &[], UnixTime::now()) {
            tracing::warn!(agent = %agent, error = %e, "connection refused: certificate no longer accepted");
            return None;
        }
        let mut r = self.registry();
        if r.conns.contains_key(&remote) {
            // The earlier connection from this address and port has not ended yet.
            r.refused += 1;
            return None;
        }
        if let Some(t) = expires {
            r.expiry.insert(agent.clone(), t);
        }
        let of_agent = r.per_agent.get(&agent).copied().unwrap_or(0);
        if of_agent >= self.limits.max_connections_per_agent
            || r.conns.len() >= self.limits.max_connections
        {
            r.refused += 1;
            tracing::warn!(agent = %agent, of_agent, total = r.conns.len(), "connection refused: over the connection limit");
            return None;
        }
        let state = Arc::new(ConnState {
            agent: agent.clone(),
            cert,
            active: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        *r.per_agent.entry(agent).or_insert(0) += 1;
        r.conns.insert(remote, state.clone());
        Some(state)
    }

    fn end_connection(&self, remote: SocketAddr, state: &Arc<ConnState>) {
        let mut r = self.registry();
        if !r.conns.get(&remote).is_some_and(|c| Arc::ptr_eq(c, state)) {
            return;
        }
        if let Some(c) = r.conns.remove(&remote) {
            if let Some(n) = r.per_agent.get_mut(&c.agent) {
                *n -= 1;
                if *n == 0 {
                    r.per_agent.remove(&c.agent);
                }
            }
        }
    }

    /// Accepts connections until the returned stream's receiver is dropped, handing on those
    /// whose handshake verified within the limits.
    pub fn incoming(self: &Arc<Self>, listener: TcpListener) -> mpsc::Receiver<io::Result<Conn>> {
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(v) => v,
                        Err(e) => {
                            // Out of descriptors or memory: the error repeats until a
                            // connection ends, so wait instead of spinning on it.
                            tracing::warn!(error = %e, "accept failed; backing off");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    },
                };
                let Some(seq) = me.admit_handshake(peer.ip()) else {
                    continue;
                };
                let task = tokio::spawn(me.clone().handshake(seq, tcp, peer, tx.clone()));
                me.handshake_task(seq, task.abort_handle());
            }
        });
        rx
    }

    async fn handshake(
        self: Arc<Self>,
        seq: u64,
        tcp: TcpStream,
        peer: SocketAddr,
        tx: mpsc::Sender<io::Result<Conn>>,
    ) {
        struct Slot<'a>(&'a Admission, u64);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                self.0.end_handshake(self.1);
            }
        }
        let slot = Slot(&self, seq);
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let config = self.tls.read().unwrap_or_else(|p| p.into_inner()).0.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let tls =
            match tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
        drop(slot);
        let Some(cert) = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned()
        else {
            return;
        };
        let Some(agent) = identity_of(cert.as_ref()) else {
            tracing::warn!(%peer, "a certificate without a valid agent name");
            return;
        };
        let Some(state) = self.admit_connection(peer, agent, cert) else {
            return;
        };
        let idle = self.limits.idle_timeout;
        let conn = Conn {
            inner: tls,
            idle_check: Box::pin(tokio::time::sleep(idle)),
            idle,
            state,
            admission: self.clone(),
            peer,
        };
        let _ = tx.send(Ok(conn)).await;
    }
}

fn release_address(per_address: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = per_address.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            per_address.remove(&ip);
        }
    }
}

/// A verified connection: the TLS stream, closed when idle, revoked or cut by the registry.
pub struct Conn {
    inner: TlsStream<TcpStream>,
    idle_check: Pin<Box<Sleep>>,
    idle: Duration,
    state: Arc<ConnState>,
    admission: Arc<Admission>,
    peer: SocketAddr,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.admission.end_connection(self.peer, &self.state);
    }
}

impl Conn {
    /// An error once the connection must end: closed by the registry, or idle too long.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.state.waker.register(cx.waker());
        if self.state.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the receiver",
            ));
        }
        while self.idle_check.as_mut().poll(cx).is_ready() {
            let since = *self.state.last.lock().unwrap_or_else(|p| p.into_inner());
            if self.state.active.load(Ordering::SeqCst) == 0 && since.elapsed() >= self.idle {
                tracing::debug!(agent = %self.state.agent, "closing an idle connection");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle connection closed",
                ));
            }
            let next = if self.state.active.load(Ordering::SeqCst) > 0 {
                Instant::now() + self.idle
            } else {
                since + self.idle
            };
            self.idle_check.as_mut().reset(next);
        }
        Ok(())
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.state.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the receiver",
            )));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Raises the soft limit on open descriptors to the hard limit (the shipped unit sets both):
/// connections, packs and catalog readers all take descriptors, and 1024 is quickly gone.
pub fn raise_nofile() -> io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if let Some(max) = lim.maximum {
        if lim.current.is_none_or(|c| c < max) {
            lim.current = Some(max);
            setrlimit(Resource::Nofile, lim).map_err(io::Error::from)?;
        }
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}
