//! A raw gRPC client for tests that must send what a correct agent never would (corrupt
//! chunks, out-of-range blocks, foreign sessions) and check the exact refusal.

use rewind_proto::pb::{self, replication_client::ReplicationClient};
use rewind_proto::BlockHash;
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

/// Connects to `url` as agent `agent` of the PKI folder `pki` (its NAME.pem and NAME.key).
pub async fn as_agent(
    url: &str,
    pki: &Path,
    agent: &str,
) -> Result<ReplicationClient<Channel>, tonic::transport::Error> {
    connect(
        url,
        &pki.join("ca.pem"),
        Some((
            &pki.join(format!("{agent}.pem")),
            &pki.join(format!("{agent}.key")),
        )),
    )
    .await
}

/// Begins a session of `vm` with one disk `vda` of `size` bytes in blocks of `block_size`;
/// returns the session id.
pub async fn begin(
    c: &mut ReplicationClient<Channel>,
    vm: &str,
    size: u64,
    block_size: u32,
) -> Result<String, tonic::Status> {
    let r = c
        .begin(pb::BeginRequest {
            vm: vm.into(),
            disks: vec![pb::DiskSpec {
                name: "vda".into(),
                size,
                block_size,
            }],
            base_point: 0,
            resume_session: String::new(),
            keyring: Vec::new(),
            wrapped_keys: Vec::new(),
        })
        .await?;
    Ok(r.into_inner().session)
}

/// A batch of `session` staging `entries` (block index, leaf) of disk 0 and carrying `chunks`
/// (leaf, frame).
pub fn batch(
    session: &str,
    entries: &[(u64, BlockHash)],
    chunks: Vec<(BlockHash, Vec<u8>)>,
) -> pb::Batch {
    pb::Batch {
        session: session.into(),
        entries: entries
            .iter()
            .map(|(i, h)| pb::BlockEntry {
                disk: 0,
                index: *i,
                hash: h.0.to_vec(),
            })
            .collect(),
        chunks: chunks
            .into_iter()
            .map(|(h, data)| pb::Chunk {
                hash: h.0.to_vec(),
                data: data.into(),
            })
            .collect(),
    }
}

/// Uploads one batch in a stream of its own.
pub async fn upload(
    c: &mut ReplicationClient<Channel>,
    b: pb::Batch,
) -> Result<pb::UploadReply, tonic::Status> {
    c.upload(tokio_stream::iter(vec![b]))
        .await
        .map(|r| r.into_inner())
}
