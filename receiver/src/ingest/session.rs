//! Sessions: begin (or resume) the session of a VM's next point, claim and release VMs, and
//! answer which chunks an agent's own store lacks.

use super::*;
use crate::catalog::points;

pub(super) fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

pub(super) fn validate_begin(spec: &BeginSpec) -> Result<(), StoreError> {
    names::vm(&spec.vm)?;
    if spec.disks.is_empty() || spec.disks.len() > MAX_DISKS {
        return Err(StoreError::DiskCount {
            got: spec.disks.len(),
            max: MAX_DISKS,
        });
    }
    let mut seen = HashSet::new();
    for d in &spec.disks {
        names::disk(&d.name)?;
        if !seen.insert(d.name.as_str()) {
            return Err(StoreError::DuplicateDisk(d.name.clone()));
        }
    }
    if spec.wrapped.len() > MAX_WRAPPED_PER_BEGIN
        || (!spec.wrapped.is_empty() && spec.keyring.is_none())
    {
        return Err(StoreError::TooLarge {
            what: "wrapped data keys in one Begin (or any without a keyring)",
            got: spec.wrapped.len(),
            max: MAX_WRAPPED_PER_BEGIN,
        });
    }
    Ok(())
}

/// Most wrapped data keys one Begin may carry (a keyring's data keys and a session key).
const MAX_WRAPPED_PER_BEGIN: usize = 64;

/// Keeps the Begin's wrapped data keys in its transaction: durable before any chunk sealed
/// with them can be sent.
fn keep_wrapped(tx: &Connection, owner: &str, spec: &BeginSpec) -> Result<(), StoreError> {
    let Some(keyring) = spec.keyring else {
        return Ok(());
    };
    if !crate::catalog::keys::insert_all(tx, owner, &keyring.0, &spec.wrapped, now_us())? {
        return Err(StoreError::Quota {
            agent: owner.to_owned(),
            what: "wrapped data keys".into(),
            key: "data_keys",
            limit: crate::catalog::keys::MAX_PER_OWNER as u64,
        });
    }
    Ok(())
}

/// The VM's id and owner, if it exists.
pub(super) fn vm_row(conn: &Connection, vm: &str) -> rusqlite::Result<Option<(VmId, String)>> {
    points::vm_owner(conn, vm)
}

/// Largest random step between two point ids of a VM.
pub(super) const POINT_ID_STEP: i64 = 1 << 16;
/// First point ids of VMs are drawn below this: ids stay below 2^53, exact in any JSON reader.
pub(super) const FIRST_POINT_ID_MAX: i64 = 1 << 40;

/// The id of a VM's next point, after its newest point `latest`. Ids only grow within a VM
/// (versioned nodes need that), but by a random step, and a VM's first id is random: the ids
/// an agent sees say nothing about how many points other agents committed meanwhile.
pub(super) fn new_point_id(conn: &Connection, latest: Option<i64>) -> rusqlite::Result<i64> {
    loop {
        let id = match latest {
            Some(p) => p + rand::random_range(1..=POINT_ID_STEP),
            None => rand::random_range(1..FIRST_POINT_ID_MAX),
        };
        if !points::taken(conn, id)? {
            return Ok(id);
        }
    }
}

/// Whether a VM with no point has seen no session progress for `timeout`: its name is then
/// free for another agent.
pub(super) fn claim_expired(
    conn: &Connection,
    vm_id: VmId,
    timeout: std::time::Duration,
) -> rusqlite::Result<bool> {
    if latest_point(conn, vm_id)?.is_some() {
        return Ok(false);
    }
    let last = points::last_activity(conn, vm_id)?;
    Ok(crate::clock::cautious_now(conn)? - last >= timeout.as_micros() as i64)
}

/// The open sessions of a VM (of one owner, if given) other than `keep`.
pub(super) fn open_sessions_of(
    conn: &Connection,
    vm_id: VmId,
    owner: Option<&str>,
    keep: &str,
) -> rusqlite::Result<Vec<String>> {
    sessions::open_of_vm(conn, vm_id, owner, keep)
}

/// Hands a VM with no point to `owner`, abandoning its former owner's sessions (their staged
/// rows are the caller's to drop, outside the transaction).
pub(super) fn release_claim(
    conn: &Connection,
    vm_id: VmId,
    owner: &str,
) -> rusqlite::Result<Vec<String>> {
    let abandoned = open_sessions_of(conn, vm_id, None, "")?;
    sessions::abandon_all_of_vm(conn, vm_id)?;
    points::hand_over(conn, vm_id, owner, now_us())?;
    Ok(abandoned)
}

pub(super) fn check_vm_quota(
    conn: &Connection,
    owner: &str,
    quota: &crate::config::Quota,
) -> Result<(), StoreError> {
    if let Some(max) = quota.vms {
        let n = points::vms_of(conn, owner)?;
        if n as u64 >= max {
            return Err(StoreError::Quota {
                agent: owner.to_owned(),
                what: format!("{n} VMs"),
                key: "vms",
                limit: max,
            });
        }
    }
    Ok(())
}

impl Store {
    /// Opens a session for the VM's next point (creating the VM, owned by `owner`, on first
    /// use), or resumes `spec.resume`. On error nothing is written.
    pub fn begin(&self, owner: &str, spec: &BeginSpec) -> Result<BeginPlan, StoreError> {
        validate_begin(spec)?;
        let rules = self.rules();
        let quota = rules.quota(owner);
        if let Some(resume) = &spec.resume {
            // The rows a resumed session staged before are dropped (the agent re-sends its
            // whole delta), in bounded steps before the begin's own transaction.
            let mine = sessions::is_open_of(&self.conn(), resume, owner, &spec.vm)?;
            if mine {
                self.drop_staged(resume)?;
            }
        }
        let mut dead: Vec<String> = Vec::new();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let vm_id = claim_vm(&tx, spec, owner, rules.claim_timeout, &quota, &mut dead)?;
        if let Some(source) = crate::catalog::copies::copied_from(&tx, &spec.vm)? {
            if spec.copy_of.as_ref() != Some(&source) {
                return Err(StoreError::CopiedVm {
                    vm: spec.vm.clone(),
                    from: source,
                });
            }
        }
        let latest = latest_point(&tx, vm_id)?;
        settle_keyring(&tx, vm_id, spec, latest)?;
        keep_wrapped(&tx, owner, spec)?;
        let session_id = match resumable(&tx, spec, owner, vm_id)? {
            Resumable::Committed(point) => {
                return Ok(BeginPlan {
                    session: spec.resume.clone().unwrap_or_default(),
                    base_point: latest,
                    modes: vec![],
                    committed_point: point,
                    heal: Vec::new(),
                })
            }
            Resumable::Open(id) => Some(id),
            Resumable::No => None,
        };
        supersede(&tx, vm_id, owner, session_id.as_deref(), &quota, &mut dead)?;
        let id = open_session_row(&tx, session_id, vm_id, owner, latest)?;
        let base = if spec.base_point == latest {
            latest
        } else {
            None
        };
        let modes = plan_disks(&tx, &id, spec, base)?;
        let heal = crate::verify::heal_list(&tx, vm_id)?;
        tx.commit()?;
        drop(conn);
        // Superseded sessions' staged rows, in bounded steps now that the begin is done.
        for id in dead {
            if let Err(e) = self.drop_staged(&id) {
                tracing::warn!(error = %Chain(&e), "dropping a superseded session's staged rows failed");
            }
        }
        Ok(BeginPlan {
            session: id,
            base_point: latest,
            modes,
            committed_point: None,
            heal,
        })
    }

    /// The hashes among `hashes` that `owner` does not hold. Chunks are stored per owner, so the
    /// answer never depends on other agents' data.
    pub fn missing(
        &self,
        owner: &str,
        session: &str,
        hashes: &[BlockHash],
    ) -> Result<Vec<BlockHash>, StoreError> {
        if hashes.len() > MAX_QUERY_HASHES {
            return Err(StoreError::TooLarge {
                what: "hashes in one question",
                got: hashes.len(),
                max: MAX_QUERY_HASHES,
            });
        }
        // A reader connection: questions never wait for, or hold up, the writer.
        let conn = self.reader()?;
        open_session(&conn, owner, session)?;
        Ok(crate::catalog::chunks::missing(&conn, owner, hashes)?)
    }

    /// Where a session of `owner` stands.
    pub fn session_state(&self, owner: &str, session_id: &str) -> Result<SessionState, StoreError> {
        let conn = self.reader()?;
        let row = sessions::outcome(&conn, session_id)?;
        Ok(match row {
            Some(o) if o.owner == owner => match (o.state.as_str(), o.point_id) {
                ("committed", Some(p)) => SessionState::Committed(p),
                ("open", _) => SessionState::Open,
                _ => SessionState::Unknown,
            },
            _ => SessionState::Unknown,
        })
    }
}

/// The VM's id for `owner`: its own VM, a new one, or a name whose first agent's claim
/// expired (its sessions are added to `dead`). Another agent's VM is refused.
fn claim_vm(
    tx: &Connection,
    spec: &BeginSpec,
    owner: &str,
    claim_timeout: std::time::Duration,
    quota: &crate::config::Quota,
    dead: &mut Vec<String>,
) -> Result<VmId, StoreError> {
    Ok(match vm_row(tx, &spec.vm)? {
        Some((id, o)) if o == owner => id,
        Some((id, _)) if claim_expired(tx, id, claim_timeout)? => {
            check_vm_quota(tx, owner, quota)?;
            dead.extend(release_claim(tx, id, owner)?);
            tracing::info!(vm = %spec.vm, agent = owner, "an unfinished claim on a VM name expired; the name passes to this agent");
            id
        }
        Some(_) => {
            return Err(StoreError::NotOwner {
                vm: spec.vm.clone(),
                caller: owner.to_owned(),
            })
        }
        None => {
            check_vm_quota(tx, owner, quota)?;
            points::new_vm(tx, &spec.vm, owner, now_us())?
        }
    })
}

/// Encryption is fixed by a VM's first point: until the VM has one, the Begin's keyring (or
/// none) becomes the VM's; after, every Begin must name the same.
fn settle_keyring(
    tx: &Connection,
    vm_id: VmId,
    spec: &BeginSpec,
    latest: Option<i64>,
) -> Result<(), StoreError> {
    let has = points::keyring(tx, vm_id)?;
    let sent = spec.keyring.map(|k| k.0.to_vec());
    if has == sent {
        return Ok(());
    }
    if latest.is_none() {
        return Ok(points::set_keyring(tx, vm_id, sent.as_deref())?);
    }
    let shown = |k: &Option<Vec<u8>>| match k {
        None => "plain (no keyring)".to_owned(),
        Some(k) => format!("encrypted with keyring {}", hex::encode(k)),
    };
    Err(StoreError::KeyringMismatch {
        vm: spec.vm.clone(),
        has: shown(&has),
        sent: shown(&sent),
    })
}

/// What `spec.resume` names.
enum Resumable {
    /// A session of this agent and VM that committed (at this point): the agent adopts it.
    Committed(Option<i64>),
    /// A session of this agent and VM still open: it goes on, its staged entries dropped.
    Open(String),
    /// Nothing to resume.
    No,
}

fn resumable(
    tx: &Connection,
    spec: &BeginSpec,
    owner: &str,
    vm_id: VmId,
) -> Result<Resumable, StoreError> {
    let Some(resume) = &spec.resume else {
        return Ok(Resumable::No);
    };
    let found = sessions::outcome(tx, resume)?;
    Ok(match found {
        Some(o) if o.owner == owner && o.vm_id == vm_id => match o.state.as_str() {
            "committed" => Resumable::Committed(o.point_id),
            "open" => {
                // Staged entries are dropped: the agent re-sends its whole delta (the disk may
                // have changed since), but chunks already stored stay held.
                sessions::restart(tx, resume)?;
                Resumable::Open(resume.clone())
            }
            _ => Resumable::No,
        },
        _ => Resumable::No,
    })
}

/// A new session supersedes the agent's other open sessions of this VM (added to `dead`):
/// only one of them could ever commit, and a crashed agent must not fill its session quota
/// with them. A new session (not `resumed`) must fit the agent's session quota.
fn supersede(
    tx: &Connection,
    vm_id: VmId,
    owner: &str,
    resumed: Option<&str>,
    quota: &crate::config::Quota,
    dead: &mut Vec<String>,
) -> Result<(), StoreError> {
    let keep = resumed.unwrap_or("");
    dead.extend(open_sessions_of(tx, vm_id, Some(owner), keep)?);
    sessions::abandon_others(tx, vm_id, owner, keep)?;
    if resumed.is_none() {
        if let Some(max) = quota.sessions {
            let open = sessions::open_count(tx, owner)?;
            if open as u64 >= max {
                return Err(StoreError::Quota {
                    agent: owner.to_owned(),
                    what: format!("{open} open sessions"),
                    key: "sessions",
                    limit: max,
                });
            }
        }
    }
    Ok(())
}

/// The session's row: the resumed one re-dated on the VM's newest point, or a new one.
fn open_session_row(
    tx: &Connection,
    resumed: Option<String>,
    vm_id: VmId,
    owner: &str,
    latest: Option<i64>,
) -> Result<String, StoreError> {
    let now = now_us();
    Ok(match resumed {
        Some(id) => {
            sessions::redate(tx, &id, latest, now)?;
            id
        }
        None => {
            let id = new_session_id();
            let row = sessions::NewSession {
                id: &id,
                vm_id,
                owner,
                base_point: latest,
                now_us: now,
            };
            sessions::insert(tx, &row)?;
            id
        }
    })
}

/// Records the session's disks, each continuing its disk at `base` (the VM's newest point,
/// when the agent builds on it) where the geometry allows ([`continues`]): a delta; any other
/// disk is a full point of a new generation.
fn plan_disks(
    tx: &Connection,
    session: &str,
    spec: &BeginSpec,
    base: Option<i64>,
) -> Result<Vec<(String, DiskMode)>, StoreError> {
    let base_disks: HashMap<String, (i64, u64, u64)> = match base {
        Some(p) => points::base_disks(tx, p)?
            .into_iter()
            .map(|d| (d.name, (d.disk_id, d.size, d.block_size)))
            .collect(),
        None => HashMap::new(),
    };
    let mut modes = Vec::new();
    for (pos, d) in spec.disks.iter().enumerate() {
        let base_disk = base_disks
            .get(&d.name)
            .and_then(|&(disk_id, size, bs)| continues(size, bs, &d.geometry).then_some(disk_id));
        let row = sessions::SessionDiskRow {
            name: d.name.clone(),
            size: d.geometry.size as i64,
            block_size: d.geometry.block_size.bytes() as i64,
            base_disk,
        };
        sessions::add_disk(tx, session, pos, &row)?;
        let mode = if base_disk.is_some() {
            DiskMode::Delta
        } else {
            DiskMode::Full
        };
        modes.push((d.name.clone(), mode));
    }
    Ok(modes)
}
