//! A raw gRPC client for tests that must send what a correct agent never would (corrupt
//! chunks, out-of-range blocks, foreign sessions) and check the exact refusal.

use rewind_proto::pb::replication_client::ReplicationClient;
use std::path::Path;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Connects to `url` trusting `ca`, presenting `identity` (cert, key) if given.
pub async fn connect(
    url: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ReplicationClient<Channel>, tonic::transport::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("read CA")))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).expect("read cert"),
            std::fs::read(key).expect("read key"),
        ));
    }
    let channel = Endpoint::from_shared(url.to_owned())
        .expect("url")
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(ReplicationClient::new(channel).max_encoding_message_size(64 << 20))
}
