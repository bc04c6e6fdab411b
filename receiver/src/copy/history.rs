//! A source whose history changed: `recover` rebuilt its catalog from a snapshot (or it was
//! set up anew at the same address), so the point ids it hands out after that may be ids of
//! points this copy already holds. Before copying anything of such a VM, the copy lists every
//! point the source has and takes over the copies of those it holds (same id, same creation
//! time); the others, whatever their ids, are copied as new points after them.

use super::pull::{blocking, POINTS_PAGE};
use super::CopyError;
use crate::catalog::{copies, events, now_us};
use crate::store::Store;
use rewind_proto::pb;
use rewind_proto::pb::copy_client::CopyClient;
use std::sync::Arc;
use tonic::transport::Channel;

/// Matches every point of `vm` the source lists against what this copy holds of it from the
/// source's earlier histories, a page at a time; records an event saying how many matched.
pub(super) async fn take_over(
    client: &mut CopyClient<Channel>,
    store: &Arc<Store>,
    src: copies::Source<'_>,
    vm: &str,
) -> Result<(), CopyError> {
    let (mut after, mut listed, mut held) = (0i64, 0usize, 0usize);
    loop {
        let page = client
            .copy_points(pb::CopyPointsRequest {
                vm: vm.to_owned(),
                after: after as u64,
                limit: POINTS_PAGE,
            })
            .await?
            .into_inner()
            .points;
        let Some(last) = page.last() else {
            break;
        };
        let next = last.info.as_ref().map_or(0, |i| i.id as i64);
        let mut ids = Vec::with_capacity(page.len());
        for p in &page {
            let id = p.info.as_ref().map_or(0, |i| i.id as i64);
            if id <= ids.last().map_or(after, |&(last, _)| last) {
                return Err(CopyError::Answer("point ids that do not grow"));
            }
            ids.push((id, p.created_us));
        }
        listed += ids.len();
        held += blocking(|| copies::carry_over(&mut store.conn(), src, vm, &ids))?;
        after = next;
    }
    tracing::warn!(
        vm,
        source = src.url,
        listed,
        held,
        "the source's history changed (its catalog was rebuilt by recover, or made anew): the \
         points this copy holds are kept, the others are copied as new points"
    );
    blocking(|| -> Result<(), CopyError> {
        let conn = store.conn();
        let vm_id = crate::catalog::points::vm_owner(&conn, vm)?.map(|(id, _)| id);
        let detail = serde_json::json!({
            "source": src.url,
            "history": src.history,
            "listed": listed,
            "held": held,
        })
        .to_string();
        events::record(
            &conn,
            &events::NewEvent {
                vm: vm_id,
                kind: "copy-history",
                point: None,
                detail: &detail,
                at_us: now_us(),
            },
        )?;
        Ok(())
    })
}
