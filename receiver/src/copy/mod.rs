//! A second offsite copy: this receiver pulls another receiver's points on a schedule.
//!
//! - [`source`]: the primary's Copy service, for replica identities only (read, never write);
//! - [`pull`]: the copying side, which makes each new source point a local point through the
//!   ingest path (only missing chunks travel; roots checked at commit);
//! - [`history`]: a source whose catalog was rebuilt (point ids handed out again): the points
//!   the copy holds are matched by id and creation time, the others copied as new points.
//!
//! The copy keeps its own retention and locks: nothing the source does (prune, gc, a
//! compromise) reaches what the copy holds, since the copy only ever adds points and the Copy
//! service has no call that writes. Configured by the `[copy]` table of the configuration:
//!
//! ```toml
//! [copy]
//! from = "https://primary.example:7443"
//! ca = "/etc/rewind/primary-ca.pem"     # the primary's CA
//! cert = "/etc/rewind/replica.pem"      # rewind-receiver pki issue --replica (on the primary)
//! key = "/etc/rewind/replica.key"
//! every = 300                           # seconds between copy runs
//! bwlimit_mbit = 0                      # 0: no limit
//! parallel = 8                          # chunk reads in flight (the whole copy's)
//! ```

mod fetch;
mod history;
pub mod pull;
pub mod source;

use crate::error::StoreError;
use crate::store::Store;
use rewind_proto::pb::copy_client::CopyClient;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The `[copy]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyFile {
    pub from: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_every")]
    pub every: u64,
    #[serde(default)]
    pub bwlimit_mbit: u64,
    #[serde(default = "default_parallel")]
    pub parallel: usize,
}

fn default_every() -> u64 {
    300
}

/// Reads in flight: 8 fill a 1 Gbit/s link at 50 ms round trip (85%; 4 fill 68%).
fn default_parallel() -> usize {
    8
}

/// A copy's settings, as runs use them.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// The source's URL: also its name in the catalog's copy records.
    pub source: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub every: Duration,
    /// Chunk bytes per second read from the source (None: no limit).
    pub bwlimit: Option<u64>,
    pub parallel: usize,
}

impl From<&CopyFile> for CopyConfig {
    fn from(f: &CopyFile) -> CopyConfig {
        CopyConfig {
            source: f.from.clone(),
            ca: f.ca.clone(),
            cert: f.cert.clone(),
            key: f.key.clone(),
            every: Duration::from_secs(f.every.max(1)),
            bwlimit: (f.bwlimit_mbit > 0).then(|| f.bwlimit_mbit * 1_000_000 / 8),
            parallel: f.parallel.clamp(1, 16),
        }
    }
}

#[derive(Debug, Error)]
pub enum CopyError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the source's URL {0} is not https://HOST:PORT")]
    Url(String),
    #[error("connecting to the source")]
    Connect(#[from] tonic::transport::Error),
    #[error("the source refused: {}", .0.message())]
    Refused(#[from] tonic::Status),
    #[error("the source sent {0} that cannot be right")]
    Answer(&'static str),
    #[error("staging a batch: {0}")]
    Worker(String),
    #[error("VM {0} exists here and was not copied from this source: it is left alone")]
    Foreign(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("catalog")]
    Catalog(#[from] rusqlite::Error),
}

/// What one copy run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub vms: u64,
    /// VMs whose copy failed this run (logged; retried at the next run).
    pub failed_vms: u64,
    pub points: u64,
    pub entries: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
}

/// Holds reads from the source to a byte rate; shared by the batches being fetched.
pub struct RateLimit {
    rate: Option<u64>,
    /// When counting began, and the bytes counted since.
    spent: std::sync::Mutex<(Instant, u64)>,
}

impl RateLimit {
    pub fn new(rate: Option<u64>) -> RateLimit {
        RateLimit {
            rate,
            spent: std::sync::Mutex::new((Instant::now(), 0)),
        }
    }

    /// Counts `bytes` read, waiting until the rate allows them.
    pub async fn spend(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let wait = {
            let mut g = self
                .spent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (start, spent) = &mut *g;
            // Time spent idle (walking leaves, VMs with nothing new) earns at most a second's
            // worth of bytes: no unthrottled burst after it.
            let earned = start.elapsed().as_secs_f64() * rate as f64;
            if earned > *spent as f64 + rate as f64 {
                *start = Instant::now() - Duration::from_secs(1);
                *spent = rate;
            }
            *spent += bytes;
            let due = Duration::from_secs_f64(*spent as f64 / rate as f64);
            due.checked_sub(start.elapsed())
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, CopyError> {
    std::fs::read(path).map_err(|source| CopyError::Read {
        path: path.clone(),
        source,
    })
}

/// A client of the source's Copy service.
pub async fn connect(cfg: &CopyConfig) -> Result<CopyClient<Channel>, CopyError> {
    let host = url::Url::parse(&cfg.source)
        .ok()
        .filter(|u| u.scheme() == "https")
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()))
        .ok_or_else(|| CopyError::Url(cfg.source.clone()))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&cfg.ca)?))
        .identity(Identity::from_pem(read(&cfg.cert)?, read(&cfg.key)?))
        .domain_name(host);
    let channel = Endpoint::from_shared(cfg.source.clone())
        .map_err(|_| CopyError::Url(cfg.source.clone()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(300))
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .tcp_nodelay(true)
        .connect()
        .await?;
    let max = rewind_proto::format::MAX_MESSAGE_BYTES;
    Ok(CopyClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// One copy run: connects and copies every new point.
pub async fn run_once(store: &Arc<Store>, cfg: &CopyConfig) -> Result<CopyReport, CopyError> {
    let mut client = connect(cfg).await?;
    let limit = Arc::new(RateLimit::new(cfg.bwlimit));
    pull::run_once(&mut client, store, cfg, &limit).await
}

/// Copies on `cfg`'s schedule until the process stops; a failed run is logged and retried at
/// the next one.
pub async fn run_loop(store: Arc<Store>, cfg: CopyConfig) {
    loop {
        let started = Instant::now();
        match run_once(&store, &cfg).await {
            Ok(r) => tracing::info!(
                source = %cfg.source,
                points = r.points,
                chunks = r.chunks,
                bytes = r.chunk_bytes,
                secs = started.elapsed().as_secs_f64(),
                "copy run"
            ),
            Err(e) => {
                tracing::warn!(source = %cfg.source, error = %rewind_proto::report::Chain(&e), "copy run failed; retried at the next run")
            }
        }
        tokio::time::sleep(cfg.every).await;
    }
}
