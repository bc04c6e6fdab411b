//! Step 2 of a cycle: settle a session a crash left (adopt its point if its commit landed),
//! then begin, or resume, the session of the next point. The receiver's plan says, for each
//! disk, whether the point is a delta on the base or a full point, and which chunks it lost.

use super::*;

/// The session of this cycle's point, as the receiver planned it.
pub(super) struct Begun {
    pub(super) session: String,
    /// The point this one builds on (0: none).
    pub(super) base_point: u64,
    /// For each disk, in order: a full point (no base for it), or a delta.
    pub(super) full: Vec<bool>,
    /// Chunks the receiver lost (verify quarantined them): sent again where the disks still
    /// hold them.
    pub(super) heal: Arc<HashSet<BlockHash>>,
    /// Whether the session resumes one a stopped or crashed cycle checkpointed.
    pub(super) resumed: bool,
}

/// Begins the session of the next point of `cfg.vm`, whose disks are `specs`, and records it
/// as pending in the agent's state.
pub(super) async fn begin(
    client: &mut ReplicationClient<Channel>,
    cfg: &SyncConfig,
    specs: &[(String, DiskGeometry)],
    wrapped: &[rewind_proto::crypt::WrappedKey],
) -> Result<Begun, SyncError> {
    let mut conn = state::open(&cfg.state_dir)?;

    // A session left by a crash: if its commit landed, adopt it before anything else.
    let mut vm_state = state::vm_state(&conn, &cfg.vm)?;
    if let Some(pending) = vm_state.pending_session.clone() {
        let status = client
            .session_status(pb::SessionStatusRequest { session: pending })
            .await
            .map_err(SyncError::refused("SessionStatus"))?
            .into_inner();
        if status.state == pb::SessionState::Committed as i32 {
            tracing::info!(vm = %cfg.vm, point = status.point, "adopting a point committed before a crash");
            state::apply_pending(&mut conn, &cfg.vm, status.point as i64)?;
            vm_state = state::vm_state(&conn, &cfg.vm)?;
        }
    }

    let request = pb::BeginRequest {
        vm: cfg.vm.clone(),
        disks: specs
            .iter()
            .map(|(name, g)| pb::DiskSpec {
                name: name.clone(),
                size: g.size,
                block_size: g.block_size.get(),
            })
            .collect(),
        base_point: vm_state.base_point.unwrap_or(0) as u64,
        resume_session: vm_state.pending_session.clone().unwrap_or_default(),
        keyring: cfg
            .codec
            .keyring_id()
            .map(|k| k.0.to_vec())
            .unwrap_or_default(),
        wrapped_keys: wrapped
            .iter()
            .map(|w| pb::WrappedKey {
                key_id: w.key_id.to_vec(),
                recovery: w.recovery.as_bytes().to_vec(),
                blob: w.blob.clone(),
            })
            .collect(),
    };
    let mut plan = client
        .begin(request.clone())
        .await
        .map_err(SyncError::refused("Begin"))?
        .into_inner();
    if plan.committed_point != 0 {
        state::apply_pending(&mut conn, &cfg.vm, plan.committed_point as i64)?;
        let again = pb::BeginRequest {
            base_point: plan.committed_point,
            resume_session: String::new(),
            ..request
        };
        plan = client
            .begin(again)
            .await
            .map_err(SyncError::refused("Begin"))?
            .into_inner();
    }
    let resumed = vm_state.pending_session.as_deref() == Some(plan.session.as_str());
    if plan.disks.len() != specs.len() || plan.disks.iter().zip(specs).any(|(p, d)| p.name != d.0) {
        return Err(SyncError::Protocol(
            "the plan does not list our disks in order",
        ));
    }
    let full: Vec<bool> = plan
        .disks
        .iter()
        .map(|p| p.mode != pb::DiskMode::Delta as i32)
        .collect();
    let heal: Arc<HashSet<BlockHash>> = Arc::new(
        plan.heal
            .iter()
            .map(|h| BlockHash::from_slice(h))
            .collect::<Result<_, _>>()
            .map_err(|_| SyncError::Protocol("a malformed hash in the heal list"))?,
    );
    if !heal.is_empty() {
        tracing::warn!(vm = %cfg.vm, chunks = heal.len(), "the receiver lost chunks this VM needs: sending them again where the disks still hold them");
    }
    state::start_pending(
        &mut conn,
        &cfg.vm,
        &plan.session,
        &specs
            .iter()
            .zip(&full)
            .map(|((n, g), f)| (n.clone(), *g, *f))
            .collect::<Vec<_>>(),
    )?;
    drop(conn);
    Ok(Begun {
        session: plan.session,
        base_point: plan.base_point,
        full,
        heal,
        resumed,
    })
}
