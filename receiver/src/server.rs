//! Serving the replication service over mutual TLS on a bound listener, until shutdown.

use crate::pki::ServerPki;
use crate::service::ReplicationService;
use crate::store::Store;
use rewind_proto::format::{H2_WINDOW_BYTES, MAX_MESSAGE_BYTES};
use rewind_proto::pb::replication_server::ReplicationServer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// Concurrent HTTP/2 streams per connection: an agent uses a handful; unlimited invites abuse.
const MAX_STREAMS: u32 = 64;

/// Serves until `shutdown` resolves. There is no plaintext mode: every client must present a
/// certificate signed by the PKI's CA.
pub async fn run(
    listener: TcpListener,
    pki: &ServerPki,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.cert, &pki.key))
        .client_ca_root(Certificate::from_pem(&pki.ca));
    let service = ReplicationServer::new(ReplicationService::new(store))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Small replies (window updates, MissingChunks answers) must not wait for Nagle's algorithm
    // and the peer's delayed ACK: that costs 40 ms per round trip. `tcp_nodelay` below only
    // applies to listeners tonic binds itself, so set it on each accepted socket.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY");
            }
        })
    });
    Server::builder()
        .tls_config(tls)?
        .initial_stream_window_size(H2_WINDOW_BYTES)
        .initial_connection_window_size(H2_WINDOW_BYTES)
        .max_concurrent_streams(MAX_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
