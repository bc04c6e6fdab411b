//! The primary's side of a copy: the Copy service, which a second receiver holding a replica
//! identity calls to read every VM's points, leaves and chunks. It only reads; a replica
//! identity is refused by every Replication call (`service::caller`), so it can neither
//! write nor delete.

use crate::catalog::points as rows;
use crate::error::StoreError;
use crate::service::{blocking, blocks_reply, chunks_reply, leaves, point_info};
use crate::store::Store;
use rewind_proto::pb;
use rewind_proto::pb::copy_server::Copy;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

/// Store calls all replicas together may have running on blocking threads (a copy keeps a
/// few chunk reads in flight per VM).
const REPLICA_CALLS: usize = 16;

/// Most points one CopyPoints answer lists.
const MAX_POINTS_PAGE: u32 = 256;

/// The Copy service over one store.
#[derive(Clone)]
pub struct CopySource {
    store: Arc<Store>,
    calls: Arc<Semaphore>,
}

impl CopySource {
    pub fn new(store: Arc<Store>) -> CopySource {
        CopySource {
            store,
            calls: Arc::new(Semaphore::new(REPLICA_CALLS)),
        }
    }

    /// A call slot, once the request is shown to come from a replica identity.
    async fn replica<T>(&self, req: &Request<T>) -> Result<OwnedSemaphorePermit, Status> {
        let certs = req.peer_certs();
        let ok = certs
            .as_ref()
            .and_then(|c| c.first())
            .is_some_and(|c| crate::pki::is_replica(c.as_ref()));
        if !ok {
            return Err(Status::permission_denied(
                "the Copy service is for replica identities (pki issue --replica)",
            ));
        }
        self.calls
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the receiver is shutting down"))
    }
}

/// The owner of VM `vm`.
fn owner_of(store: &Store, vm: &str) -> Result<String, StoreError> {
    rows::vm_owner(&*store.reader()?, vm)?
        .map(|(_, owner)| owner)
        .ok_or_else(|| StoreError::UnknownVm(vm.to_owned()))
}

#[tonic::async_trait]
impl Copy for CopySource {
    async fn copy_vms(
        &self,
        req: Request<pb::CopyVmsRequest>,
    ) -> Result<Response<pb::CopyVmsReply>, Status> {
        let slot = self.replica(&req).await?;
        let store = self.store.clone();
        let (vms, history) = blocking(slot, move || {
            let conn = store.reader()?;
            let mut out = Vec::new();
            for (_, vm) in rows::vms(&conn, None)? {
                if let Some((_, owner)) = rows::vm_owner(&conn, &vm)? {
                    out.push(pb::CopyVm { vm, owner });
                }
            }
            Ok((out, crate::catalog::copies::history_id(&conn)?))
        })
        .await?;
        Ok(Response::new(pb::CopyVmsReply { vms, history }))
    }

    async fn copy_points(
        &self,
        req: Request<pb::CopyPointsRequest>,
    ) -> Result<Response<pb::CopyPointsReply>, Status> {
        let slot = self.replica(&req).await?;
        let r = req.into_inner();
        let limit = r.limit.clamp(1, MAX_POINTS_PAGE) as usize;
        let store = self.store.clone();
        let list = blocking(slot, move || {
            crate::points::list(&*store.reader()?, Some(&r.vm))
        })
        .await?;
        let points = list
            .into_iter()
            .filter(|p| p.id as u64 > r.after)
            .take(limit)
            .map(|p| pb::CopyPoint {
                created_us: crate::catalog::parse_rfc3339(&p.created).unwrap_or(0),
                // The text as the agent sent it: an encrypted point's MAC binds its hash.
                config: p.config_text.clone().unwrap_or_default(),
                info: Some(point_info(p)),
            })
            .collect();
        Ok(Response::new(pb::CopyPointsReply { points }))
    }

    async fn copy_blocks(
        &self,
        req: Request<pb::PointBlocksRequest>,
    ) -> Result<Response<pb::PointBlocksReply>, Status> {
        let slot = self.replica(&req).await?;
        let r = req.into_inner();
        let store = self.store.clone();
        let page = blocking(slot, move || {
            let owner = owner_of(&store, &r.vm)?;
            store.point_leaves(&owner, &r.vm, r.point as i64, &r.disk, r.start, r.limit)
        })
        .await?;
        Ok(Response::new(blocks_reply(page)))
    }

    async fn copy_chunks(
        &self,
        req: Request<pb::ReadChunksRequest>,
    ) -> Result<Response<pb::ReadChunksReply>, Status> {
        let slot = self.replica(&req).await?;
        let r = req.into_inner();
        let hashes = leaves(&r.hashes)?;
        let store = self.store.clone();
        let chunks = blocking(slot, move || {
            let owner = owner_of(&store, &r.vm)?;
            store.read_chunks(&owner, &r.vm, &hashes)
        })
        .await?;
        Ok(Response::new(chunks_reply(chunks)))
    }

    async fn copy_keys(
        &self,
        req: Request<pb::DataKeysRequest>,
    ) -> Result<Response<pb::DataKeysReply>, Status> {
        let slot = self.replica(&req).await?;
        let r = req.into_inner();
        let store = self.store.clone();
        let (keys, more) = blocking(slot, move || {
            let owner = owner_of(&store, &r.vm)?;
            store.data_keys(&owner, &r.vm, (&r.after_key_id, &r.after_recovery))
        })
        .await?;
        Ok(Response::new(pb::DataKeysReply {
            keys: crate::service::wrapped_to_pb(keys),
            more,
        }))
    }
}
