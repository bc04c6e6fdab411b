//! Serving the replication service over mutual TLS on a bound listener, until shutdown.
//!
//! The TLS handshake happens in [`crate::admission`] (deadlines, connection caps, revocation),
//! every request passes [`crate::budget`] (bounded memory), then tonic serves the calls.

use crate::admission::Admission;
use crate::budget::{BudgetLayer, Budgets};
use crate::config::Limits;
use crate::pki::ServerPki;
use crate::service::ReplicationService;
use crate::store::Store;
use rewind_proto::format::MAX_MESSAGE_BYTES;
use rewind_proto::pb::replication_server::ReplicationServer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;

/// Concurrent HTTP/2 streams per connection: an agent uses a handful; unlimited invites abuse.
const MAX_STREAMS: u32 = 32;
/// HTTP/2 receive window of a stream and of a connection: what a peer may have in flight that
/// the receiver holds before its handler reads it. 16 MiB still fills 1 Gbit/s at 50 ms RTT
/// (6.25 MB in flight) with room for 2.5x more, while a hostile agent whose handlers stall can
/// make the receiver buffer at most 16 MiB per connection (12 connections by default).
const RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Largest header block a request may send (names and a few metadata entries need < 1 KiB).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Why serving could not start or stopped.
#[derive(Debug, Error)]
pub enum ServeError {
    /// A PEM file of the PKI folder does not hold what it should.
    #[error("{what}")]
    Pem {
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    /// The certificates or the key were refused by rustls.
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    /// The CA or the revocation list could not make a client verifier.
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The HTTP/2 server failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

type TlsPair = (Arc<ServerConfig>, Arc<dyn ClientCertVerifier>);

/// The receiver's TLS configuration: its certificate, clients verified against the CA and the
/// revocation list, HTTP/2 only.
pub fn tls_config(pki: &ServerPki) -> Result<TlsPair, ServeError> {
    let pem = |what| move |source| ServeError::Pem { what, source };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pki.ca) {
        roots.add(c.map_err(pem("ca.pem"))?)?;
    }
    let crls = match &pki.crl {
        Some(crl) => CertificateRevocationListDer::pem_slice_iter(crl)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem("crl.pem"))?,
        None => Vec::new(),
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()?;
    let certs = CertificateDer::pem_slice_iter(&pki.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("receiver.pem"))?;
    let key = PrivateKeyDer::from_pem_slice(&pki.key).map_err(pem("receiver.key"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), verifier))
}

/// The accept side for `pki` under `limits`.
pub fn admission(pki: &ServerPki, limits: Limits) -> Result<Arc<Admission>, ServeError> {
    let (config, verifier) = tls_config(pki)?;
    Ok(Admission::new(limits, config, verifier))
}

/// Serves until `shutdown` resolves. There is no plaintext mode: every client must present a
/// certificate signed by the PKI's CA and not revoked.
pub async fn run(
    listener: TcpListener,
    admission: Arc<Admission>,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let budgets = Budgets::new(admission.limits().clone(), Some(admission.clone()));
    let service = ReplicationServer::new(ReplicationService::new(store.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let copy = rewind_proto::pb::copy_server::CopyServer::new(
        crate::copy::source::CopySource::new(store.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = ReceiverStream::new(admission.incoming(listener));
    Server::builder()
        .initial_stream_window_size(RECEIVE_WINDOW_BYTES)
        .initial_connection_window_size(RECEIVE_WINDOW_BYTES)
        .max_concurrent_streams(MAX_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(BudgetLayer(budgets))
        .add_service(service)
        .add_service(copy)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
