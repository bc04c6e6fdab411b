//! The gRPC face of the store: translates messages to store calls and store errors to statuses.
//! Every call is attributed to the agent named by its client certificate.

use crate::chunks::ChunkStoreError;
use crate::error::StoreError;
use crate::ingest::{
    self, BeginSpec, DiskMode, DiskSpec, Entry, IncomingChunk, SessionState, UploadError,
    UploadRoom,
};
use crate::pki::identity_of;
use crate::points;
use crate::store::Store;
use futures::StreamExt;
use rewind_proto::format::DiskGeometry;
use rewind_proto::pb;
use rewind_proto::pb::replication_server::Replication;
use rewind_proto::report::chain;
use rewind_proto::{BlockHash, DiskRoot};
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// Longest status message sent to a peer.
const MAX_STATUS_CHARS: usize = 400;

/// The replication service over one store.
#[derive(Clone)]
pub struct ReplicationService {
    store: Arc<Store>,
    /// Room for decoded batches, shared by every upload stream.
    room: UploadRoom,
    /// Each agent's slots for store work on blocking threads.
    agents: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

/// Store calls (other than an upload's own pipeline) one agent may have running or queued on
/// blocking threads: work there cannot be cancelled, so a peer that resets its requests must
/// not pile it up. A rollback keeps 16 ReadChunks requests in flight.
const CALLS_PER_AGENT: usize = 16;

impl ReplicationService {
    /// An upload stream: its batches decoded into the store's pipeline
    /// ([`ingest::receive_upload`]), which seals the packs with one of the agent's call slots.
    async fn receive_upload(
        &self,
        owner: String,
        stream: Streaming<pb::Batch>,
    ) -> Result<pb::UploadReply, Status> {
        let batches = stream.map(|batch| batch.and_then(decode_batch));
        let slot = self.calls(&owner);
        let stats =
            ingest::receive_upload(self.store.clone(), owner.clone(), &self.room, batches, slot)
                .await
                .map_err(upload_status)?;
        Ok(pb::UploadReply {
            entries: stats.entries,
            chunks_stored: stats.chunks_stored,
            chunk_bytes: stats.chunk_bytes,
        })
    }

    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            room: UploadRoom::default(),
            agents: Arc::new(std::sync::Mutex::new(HashMap::new())),
        }
    }

    /// One of `agent`'s call slots, waiting for one to be free.
    async fn calls(&self, agent: &str) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let sem = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(agent.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(CALLS_PER_AGENT)))
            .clone();
        sem.acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the receiver is shutting down"))
    }
}

/// The agent identity of a request: the common name of its verified client certificate. A
/// replica identity is refused: it may only read, through the Copy service.
fn caller<T>(req: &Request<T>) -> Result<String, Status> {
    let certs = req.peer_certs();
    let first = certs.as_ref().and_then(|c| c.first());
    if first.is_some_and(|c| crate::pki::is_replica(c.as_ref())) {
        return Err(Status::permission_denied(
            "a replica identity may only read through the Copy service",
        ));
    }
    first
        .and_then(|c| identity_of(c.as_ref()))
        .ok_or_else(|| Status::unauthenticated("a client certificate naming the agent is required"))
}

/// Maps a store error to the status an agent can act on; its message is the error's whole
/// chain, so the cause reaches the agent.
pub fn to_status(e: StoreError) -> Status {
    use StoreError::*;
    if let Quota { .. } = e {
        let msg = chain(&e);
        tracing::warn!(message = %msg, "quota refused a request");
        return Status::resource_exhausted(msg);
    }
    if e.is_disk_full() {
        let msg = chain(&e);
        tracing::error!(error = %msg, "receiver disk full");
        return Status::resource_exhausted(format!("receiver storage is full: {msg}"));
    }
    // Peer-supplied names are cut where the errors are made; this bounds the rest.
    let mut msg = chain(&e);
    if msg.len() > MAX_STATUS_CHARS {
        let cut = (0..=MAX_STATUS_CHARS)
            .rev()
            .find(|&i| msg.is_char_boundary(i))
            .unwrap_or(0);
        msg.truncate(cut);
        msg.push_str("...");
    }
    let status = match e {
        Name(_)
        | Geometry { .. }
        | DiskCount { .. }
        | DuplicateDisk(_)
        | NoSuchDisk { .. }
        | BlockOutOfRange { .. }
        | HashLength(_)
        | Chunk(_)
        | UnreferencedChunk(_)
        | ChunkLength { .. }
        | TooLarge { .. }
        | RootSet(_)
        | BadConfig { .. }
        | ManifestMac(_)
        | BadConsistency(_)
        | BadTime(_)
        | NoPolicy => Status::invalid_argument(msg),
        Protected(_) | GcRunning => Status::failed_precondition(msg),
        NotOwner { .. } | CopiedVm { .. } => Status::permission_denied(msg),
        KeyringMismatch { .. } | Key(_) => Status::failed_precondition(msg),
        UnknownVm(_)
        | UnknownSession(_)
        | UnknownPoint { .. }
        | NoPointAt { .. }
        | UnknownDisk { .. }
        | NotHeld(_) => Status::not_found(msg),
        SessionClosed(_) | ChunkNotHeld { .. } => Status::failed_precondition(msg),
        BaseMoved { .. } | CommitRunning(_) => Status::aborted(msg),
        NotPublished(_) => Status::unavailable(msg),
        NoSnapshot(_) => Status::not_found(msg),
        Cancelled => Status::cancelled(msg),
        // Damaged stored data keeps its kind: the caller learns it is data loss, not a fault
        // of its request or a passing failure.
        RootMismatch { .. }
        | MissingChunk(_)
        | RestoredRoot { .. }
        | CorruptRecord { .. }
        | Pack(ChunkStoreError::BadRecord { .. }) => Status::data_loss(msg),
        Quota { .. } => Status::resource_exhausted(msg),
        // The object store unreachable or refusing: a passing failure the agent retries.
        Pack(ChunkStoreError::Remote { .. }) => Status::unavailable(msg),
        Pack(ChunkStoreError::Conflict { .. } | ChunkStoreError::Location(_)) => {
            Status::internal(msg)
        }
        Sql(_) | Pack(ChunkStoreError::Io { .. }) | Io { .. } | OutputExists(_) | InUse(_) => {
            Status::internal(msg)
        }
    };
    tracing::warn!(code = ?status.code(), message = status.message(), "request refused");
    status
}

/// Maps why an upload stream stopped to its status.
fn upload_status(e: UploadError<Status>) -> Status {
    match e {
        UploadError::Caller(status) => status,
        UploadError::Store(e) => to_status(e),
        UploadError::Worker(e) => Status::internal(format!("worker failed: {e}")),
        UploadError::Reader(e) => Status::internal(format!("reader failed: {e}")),
        UploadError::ShuttingDown => Status::unavailable("the receiver is shutting down"),
    }
}

fn leaf(bytes: &[u8]) -> Result<BlockHash, Status> {
    BlockHash::from_slice(bytes).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub(crate) fn leaves(hashes: &[Vec<u8>]) -> Result<Vec<BlockHash>, Status> {
    hashes.iter().map(|h| leaf(h)).collect()
}

/// Runs store work on a blocking thread, holding one of its agent's call slots (see
/// [`ReplicationService::calls`]) until the work ends, even if the caller has gone.
pub(crate) async fn blocking<T: Send + 'static>(
    slot: tokio::sync::OwnedSemaphorePermit,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        f()
    })
    .await
    .map_err(|e| Status::internal(format!("worker failed: {e}")))?
    .map_err(to_status)
}

/// A page of leaves as PointBlocks (and CopyBlocks) send it.
pub(crate) fn blocks_reply(page: crate::readback::LeafPage) -> pb::PointBlocksReply {
    pb::PointBlocksReply {
        size: page.size,
        block_size: page.block_size as u32,
        root: page.root.0.to_vec(),
        entries: page
            .leaves
            .into_iter()
            .map(|(i, l)| pb::BlockEntry {
                disk: 0,
                index: i,
                hash: l.0.to_vec(),
            })
            .collect(),
        next: page.next.unwrap_or(0),
    }
}

/// Chunk frames as ReadChunks (and CopyChunks) send them.
pub(crate) fn chunks_reply(chunks: Vec<(BlockHash, Vec<u8>)>) -> pb::ReadChunksReply {
    pb::ReadChunksReply {
        chunks: chunks
            .into_iter()
            .map(|(h, data)| pb::Chunk {
                hash: h.0.to_vec(),
                data: data.into(),
            })
            .collect(),
    }
}

/// The keyring a Begin names: 16 bytes, or none.
pub(crate) fn keyring_of(b: &[u8]) -> Result<Option<rewind_proto::crypt::KeyringId>, Status> {
    if b.is_empty() {
        return Ok(None);
    }
    rewind_proto::crypt::KeyringId::from_slice(b)
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!("a keyring id is 16 bytes, got {}", b.len()))
        })
}

/// Wrapped data keys as sent: each of the shape [`rewind_proto::crypt::WrappedKey`] has.
pub(crate) fn wrapped_of(
    keys: &[pb::WrappedKey],
) -> Result<Vec<rewind_proto::crypt::WrappedKey>, Status> {
    use rewind_proto::crypt::{RecoveryPublic, WrappedKey, WRAPPED_MAX};
    keys.iter()
        .map(|k| {
            match (
                <[u8; 8]>::try_from(k.key_id.as_slice()),
                RecoveryPublic::from_slice(&k.recovery),
            ) {
                (Ok(key_id), Some(recovery)) if k.blob.len() == WRAPPED_MAX => Ok(WrappedKey {
                    key_id,
                    recovery,
                    blob: k.blob.clone(),
                }),
                _ => Err(Status::invalid_argument(format!(
                    "a wrapped key has an 8-byte id, a 32-byte recovery key and {WRAPPED_MAX} bytes"
                ))),
            }
        })
        .collect()
}

/// Wrapped data keys as sent.
pub(crate) fn wrapped_to_pb(keys: Vec<rewind_proto::crypt::WrappedKey>) -> Vec<pb::WrappedKey> {
    keys.into_iter()
        .map(|w| pb::WrappedKey {
            key_id: w.key_id.to_vec(),
            recovery: w.recovery.as_bytes().to_vec(),
            blob: w.blob,
        })
        .collect()
}

/// A point as ListPoints (and the Copy service) send it.
pub(crate) fn point_info(p: points::PointInfo) -> pb::PointInfo {
    let (keyring, manifest_mac, taken_us, config_hash) = match p.encrypted {
        Some(e) => (
            hex::decode(&e.keyring).unwrap_or_default(),
            e.mac,
            e.taken_us,
            e.config_hash.to_vec(),
        ),
        None => (Vec::new(), Vec::new(), 0, Vec::new()),
    };
    pb::PointInfo {
        keyring,
        manifest_mac,
        taken_us,
        config_hash,
        id: p.id as u64,
        vm: p.vm,
        created: p.created,
        consistency: p.consistency,
        disks: p
            .disks
            .into_iter()
            .map(|d| pb::PointDisk {
                name: d.name,
                size: d.size,
                block_size: d.block_size as u32,
                root: d.root_leaf.0.to_vec(),
            })
            .collect(),
    }
}

pub use crate::ingest::DecodedBatch;

/// Turns a batch as received into store values, refusing any hash that is not 32 bytes; the
/// store checks the rest ([`Store::verify_batch`]). Public for the fuzz tests.
pub fn decode_batch(batch: pb::Batch) -> Result<DecodedBatch, Status> {
    let entries = batch
        .entries
        .iter()
        .map(|e| {
            Ok(Entry {
                pos: e.disk,
                index: e.index,
                leaf: leaf(&e.hash)?,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let chunks = batch
        .chunks
        .into_iter()
        .map(|c| {
            Ok(IncomingChunk {
                hash: leaf(&c.hash)?,
                frame: c.data,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    Ok((batch.session, entries, chunks))
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn begin(
        &self,
        req: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginReply>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let disks = r
            .disks
            .iter()
            .map(|d| {
                let geometry =
                    DiskGeometry::new(d.size, u64::from(d.block_size)).map_err(|source| {
                        to_status(StoreError::Geometry {
                            disk: d.name.clone(),
                            source,
                        })
                    })?;
                Ok(DiskSpec {
                    name: d.name.clone(),
                    geometry,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let spec = BeginSpec {
            vm: r.vm,
            disks,
            base_point: (r.base_point != 0).then_some(r.base_point as i64),
            resume: (!r.resume_session.is_empty()).then_some(r.resume_session),
            keyring: keyring_of(&r.keyring)?,
            wrapped: wrapped_of(&r.wrapped_keys)?,
            copy_of: None,
        };
        let store = self.store.clone();
        let plan = blocking(self.calls(&owner).await?, move || {
            store.begin(&owner, &spec)
        })
        .await?;
        tracing::info!(session = %plan.session, base = ?plan.base_point, "session begun");
        Ok(Response::new(pb::BeginReply {
            session: plan.session,
            base_point: plan.base_point.unwrap_or(0) as u64,
            disks: plan
                .modes
                .into_iter()
                .map(|(name, mode)| pb::DiskPlan {
                    name,
                    mode: match mode {
                        DiskMode::Delta => pb::DiskMode::Delta,
                        DiskMode::Full => pb::DiskMode::Full,
                    } as i32,
                })
                .collect(),
            committed_point: plan.committed_point.unwrap_or(0) as u64,
            heal: plan.heal.iter().map(|h| h.0.to_vec()).collect(),
        }))
    }

    async fn missing_chunks(
        &self,
        req: Request<pb::MissingChunksRequest>,
    ) -> Result<Response<pb::MissingChunksReply>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let hashes = leaves(&r.hashes)?;
        let store = self.store.clone();
        let missing = blocking(self.calls(&owner).await?, move || {
            store.missing(&owner, &r.session, &hashes)
        })
        .await?;
        Ok(Response::new(pb::MissingChunksReply {
            missing: missing.into_iter().map(|h| h.0.to_vec()).collect(),
        }))
    }

    async fn upload(
        &self,
        req: Request<Streaming<pb::Batch>>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        let owner = caller(&req)?;
        let stream = req.into_inner();
        // The work runs in its own task: when the connection breaks, hyper drops this handler,
        // and batches that arrived whole must still be staged (and the packs sealed) so that a
        // resumed session does not send them again.
        let svc = self.clone();
        tokio::spawn(async move { svc.receive_upload(owner, stream).await })
            .await
            .map_err(|e| Status::internal(format!("upload worker failed: {e}")))?
            .map(Response::new)
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitReply>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let roots = r
            .roots
            .iter()
            .map(|d| {
                let root = DiskRoot::from_slice(&d.root)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                Ok((d.name.clone(), root))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let store = self.store.clone();
        let session = r.session.clone();
        let meta = crate::ingest::PointMeta {
            config: r.config,
            consistency: r.consistency,
            mac: r.manifest_mac,
            taken_us: r.taken_us,
        };
        let done = blocking(self.calls(&owner).await?, move || {
            store.commit(&owner, &session, &roots, &meta)
        })
        .await?;
        tracing::info!(session = %r.session, point = done.point, "point committed");
        Ok(Response::new(pb::CommitReply {
            point: done.point as u64,
            created: done.created,
        }))
    }

    async fn session_status(
        &self,
        req: Request<pb::SessionStatusRequest>,
    ) -> Result<Response<pb::SessionStatusReply>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let store = self.store.clone();
        let state = blocking(self.calls(&owner).await?, move || {
            store.session_state(&owner, &r.session)
        })
        .await?;
        let (state, point) = match state {
            SessionState::Unknown => (pb::SessionState::Unknown, 0),
            SessionState::Open => (pb::SessionState::Open, 0),
            SessionState::Committed(p) => (pb::SessionState::Committed, p as u64),
        };
        Ok(Response::new(pb::SessionStatusReply {
            state: state as i32,
            point,
        }))
    }

    async fn list_points(
        &self,
        req: Request<pb::ListPointsRequest>,
    ) -> Result<Response<pb::ListPointsReply>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let store = self.store.clone();
        let list = blocking(self.calls(&owner).await?, move || {
            let conn = store.reader()?;
            crate::ingest::owned_vm(&conn, &r.vm, &owner)?;
            points::list(&conn, Some(&r.vm))
        })
        .await?;
        Ok(Response::new(pb::ListPointsReply {
            points: list.into_iter().map(point_info).collect(),
        }))
    }

    async fn point_blocks(
        &self,
        req: Request<pb::PointBlocksRequest>,
    ) -> Result<Response<pb::PointBlocksReply>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let store = self.store.clone();
        let page = blocking(self.calls(&owner).await?, move || {
            store.point_leaves(&owner, &r.vm, r.point as i64, &r.disk, r.start, r.limit)
        })
        .await?;
        Ok(Response::new(blocks_reply(page)))
    }

    async fn read_chunks(
        &self,
        req: Request<pb::ReadChunksRequest>,
    ) -> Result<Response<pb::ReadChunksReply>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let hashes = leaves(&r.hashes)?;
        let store = self.store.clone();
        let chunks = blocking(self.calls(&owner).await?, move || {
            store.read_chunks(&owner, &r.vm, &hashes)
        })
        .await?;
        Ok(Response::new(chunks_reply(chunks)))
    }

    async fn record_rollback(
        &self,
        req: Request<pb::RollbackEvent>,
    ) -> Result<Response<pb::RollbackRecorded>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let detail = serde_json::json!({"disk": r.disk, "blocks": r.blocks, "bytes": r.bytes, "dry_run": r.dry_run});
        let store = self.store.clone();
        let id = blocking(self.calls(&owner).await?, move || {
            store.record_rollback(&owner, &r.vm, r.point as i64, &r.disk, &detail)
        })
        .await?;
        tracing::info!(event = id, "rollback recorded");
        Ok(Response::new(pb::RollbackRecorded { event: id as u64 }))
    }

    async fn data_keys(
        &self,
        req: Request<pb::DataKeysRequest>,
    ) -> Result<Response<pb::DataKeysReply>, Status> {
        let owner = caller(&req)?;
        let r = req.into_inner();
        let store = self.store.clone();
        let (keys, more) = blocking(self.calls(&owner).await?, move || {
            store.data_keys(&owner, &r.vm, (&r.after_key_id, &r.after_recovery))
        })
        .await?;
        Ok(Response::new(pb::DataKeysReply {
            keys: wrapped_to_pb(keys),
            more,
        }))
    }
}
