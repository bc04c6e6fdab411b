//! Connecting to a receiver over mutual TLS with windows sized for long fat links.

use crate::error::SyncError;
use rewind_proto::format::{H2_WINDOW_BYTES, MAX_MESSAGE_BYTES};
use rewind_proto::pb::replication_client::ReplicationClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where and how to reach the receiver.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, SyncError> {
    std::fs::read(path).map_err(|source| SyncError::Credentials {
        path: path.to_owned(),
        source,
    })
}

/// The host part of an https URL, without IPv6 brackets (the name the certificate must carry).
fn host_of(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().map(str::to_owned);
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    (!host.is_empty()).then(|| host.to_owned())
}

/// Warn this many days before the agent's certificate expires.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Days until the certificate in a PEM file expires (negative once it has), if it parses.
pub fn cert_days_left(pem: &[u8]) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((cert.validity().not_after.timestamp() - now).div_euclid(86_400))
}

/// Opens a channel to the receiver and returns a client for it.
pub async fn connect(cfg: &ReceiverConfig) -> Result<ReplicationClient<Channel>, SyncError> {
    let cert = read(&cfg.cert)?;
    if let Some(days) = cert_days_left(&cert).filter(|d| *d < EXPIRY_WARNING_DAYS) {
        tracing::warn!(
            days,
            cert = %cfg.cert.display(),
            "the agent's certificate expires soon: renew it (rewind-receiver pki renew --agent NAME)"
        );
    }
    let host = host_of(&cfg.url).ok_or_else(|| SyncError::BadUrl(cfg.url.clone()))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&cfg.ca)?))
        .identity(Identity::from_pem(cert, read(&cfg.key)?))
        .domain_name(host);
    let endpoint = Endpoint::from_shared(cfg.url.clone())
        .map_err(|_| SyncError::BadUrl(cfg.url.clone()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(15))
        .initial_stream_window_size(H2_WINDOW_BYTES)
        .initial_connection_window_size(H2_WINDOW_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await?;
    Ok(ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn hosts() {
        assert_eq!(
            host_of("https://127.0.0.1:7443").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(host_of("https://[::1]:7443/").as_deref(), Some("::1"));
        assert_eq!(
            host_of("https://backup.example:1").as_deref(),
            Some("backup.example")
        );
        assert_eq!(host_of("http://127.0.0.1:7443"), None);
        assert_eq!(host_of("https://"), None);
    }
}
