//! Sessions: begin (or resume) the session of a VM's next point, claim and release VMs, and
//! answer which chunks an agent's own store lacks.

use super::*;

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
    Ok(())
}

/// The VM's id and owner, if it exists.
pub(super) fn vm_row(conn: &Connection, vm: &str) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row("SELECT id, owner FROM vms WHERE name = ?1", [vm], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// Largest random step between two point ids of a VM.
pub(super) const POINT_ID_STEP: i64 = 1 << 16;
/// First point ids of VMs are drawn below this: ids stay below 2^53, exact in any JSON reader.
pub(super) const FIRST_POINT_ID_MAX: i64 = 1 << 40;

/// The id of a VM's next point, after its newest point `latest`. Ids only grow within a VM
/// (versioned nodes need that), but by a random step, and a VM's first id is random: the ids
/// an agent sees say nothing about how many points other agents committed meanwhile.
pub(super) fn new_point_id(conn: &Connection, latest: Option<i64>) -> rusqlite::Result<i64> {
    let mut taken = conn.prepare_cached("SELECT 1 FROM points WHERE id = ?1")?;
    loop {
        let id = match latest {
            Some(p) => p + rand::random_range(1..=POINT_ID_STEP),
            None => rand::random_range(1..FIRST_POINT_ID_MAX),
        };
        if !taken.exists([id])? {
            return Ok(id);
        }
    }
}

/// Whether a VM with no point has seen no session progress for `timeout`: its name is then
/// free for another agent.
pub(super) fn claim_expired(
    conn: &Connection,
    vm_id: i64,
    timeout: std::time::Duration,
) -> rusqlite::Result<bool> {
    if latest_point(conn, vm_id)?.is_some() {
        return Ok(false);
    }
    let last: i64 = conn.query_row(
        "SELECT MAX(COALESCE((SELECT MAX(updated_us) FROM sessions WHERE vm_id = ?1), 0), created_us)
         FROM vms WHERE id = ?1",
        [vm_id],
        |r| r.get(0),
    )?;
    Ok(crate::clock::cautious_now(conn)? - last >= timeout.as_micros() as i64)
}

/// The open sessions of a VM (of one owner, if given) other than `keep`.
pub(super) fn open_sessions_of(
    conn: &Connection,
    vm_id: i64,
    owner: Option<&str>,
    keep: &str,
) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM sessions WHERE vm_id = ?1 AND state = 'open' AND id <> ?3
           AND (?2 IS NULL OR owner = ?2)",
    )?;
    let rows = stmt.query_map(params![vm_id, owner, keep], |r| r.get(0))?;
    rows.collect()
}

/// Hands a VM with no point to `owner`, abandoning its former owner's sessions (their staged
/// rows are the caller's to drop, outside the transaction).
pub(super) fn release_claim(
    conn: &Connection,
    vm_id: i64,
    owner: &str,
) -> rusqlite::Result<Vec<String>> {
    let abandoned = open_sessions_of(conn, vm_id, None, "")?;
    conn.execute(
        "UPDATE sessions SET state = 'abandoned' WHERE vm_id = ?1 AND state = 'open'",
        [vm_id],
    )?;
    conn.execute(
        "UPDATE vms SET owner = ?2, created_us = ?3 WHERE id = ?1",
        params![vm_id, owner, now_us()],
    )?;
    Ok(abandoned)
}

pub(super) fn check_vm_quota(
    conn: &Connection,
    owner: &str,
    quota: &crate::config::Quota,
) -> Result<(), StoreError> {
    if let Some(max) = quota.vms {
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM vms WHERE owner = ?1", [owner], |r| {
            r.get(0)
        })?;
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
            let mine: bool = self.conn().query_row(
                "SELECT EXISTS(SELECT 1 FROM sessions s JOIN vms v ON v.id = s.vm_id
                     WHERE s.id = ?1 AND s.owner = ?2 AND s.state = 'open' AND v.name = ?3)",
                params![resume, owner, spec.vm],
                |r| r.get(0),
            )?;
            if mine {
                self.drop_staged(resume)?;
            }
        }
        let mut dead: Vec<String> = Vec::new();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let vm_id = claim_vm(&tx, spec, owner, rules.claim_timeout, &quota, &mut dead)?;
        let latest = latest_point(&tx, vm_id)?;
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
        hashes: &[Leaf],
    ) -> Result<Vec<Leaf>, StoreError> {
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
        let mut stmt =
            conn.prepare_cached("SELECT 1 FROM chunks WHERE owner = ?1 AND hash = ?2")?;
        let mut out = Vec::new();
        for h in hashes {
            if h.is_zero() {
                continue;
            }
            if !stmt.exists(params![owner, &h.0[..]])? {
                out.push(*h);
            }
        }
        Ok(out)
    }

    /// Where a session of `owner` stands.
    pub fn session_state(&self, owner: &str, session_id: &str) -> Result<SessionState, StoreError> {
        let conn = self.reader()?;
        let row: Option<(String, String, Option<i64>)> = conn
            .query_row(
                "SELECT owner, state, point_id FROM sessions WHERE id = ?1",
                [session_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(match row {
            Some((o, state, point)) if o == owner => match (state.as_str(), point) {
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
) -> Result<i64, StoreError> {
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
            tx.execute(
                "INSERT INTO vms(name, owner, created_us) VALUES (?1, ?2, ?3)",
                params![spec.vm, owner, now_us()],
            )?;
            tx.last_insert_rowid()
        }
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
    vm_id: i64,
) -> Result<Resumable, StoreError> {
    let Some(resume) = &spec.resume else {
        return Ok(Resumable::No);
    };
    let found: Option<(String, String, i64, Option<i64>)> = tx
        .query_row(
            "SELECT owner, state, vm_id, point_id FROM sessions WHERE id = ?1",
            [resume],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    Ok(match found {
        Some((o, state, v, point)) if o == owner && v == vm_id => match state.as_str() {
            "committed" => Resumable::Committed(point),
            "open" => {
                // Staged entries are dropped: the agent re-sends its whole delta (the disk may
                // have changed since), but chunks already stored stay held.
                tx.execute("DELETE FROM session_blocks WHERE session_id = ?1", [resume])?;
                tx.execute("DELETE FROM session_disks WHERE session_id = ?1", [resume])?;
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
    vm_id: i64,
    owner: &str,
    resumed: Option<&str>,
    quota: &crate::config::Quota,
    dead: &mut Vec<String>,
) -> Result<(), StoreError> {
    let keep = resumed.unwrap_or("");
    dead.extend(open_sessions_of(tx, vm_id, Some(owner), keep)?);
    tx.execute(
        "UPDATE sessions SET state = 'abandoned'
         WHERE vm_id = ?1 AND owner = ?2 AND state = 'open' AND id <> ?3",
        params![vm_id, owner, keep],
    )?;
    if resumed.is_none() {
        if let Some(max) = quota.sessions {
            let open: i64 = tx.query_row(
                "SELECT COUNT(*) FROM sessions WHERE owner = ?1 AND state = 'open'",
                [owner],
                |r| r.get(0),
            )?;
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
    vm_id: i64,
    owner: &str,
    latest: Option<i64>,
) -> Result<String, StoreError> {
    let now = now_us();
    Ok(match resumed {
        Some(id) => {
            tx.execute(
                "UPDATE sessions SET base_point = ?2, created_us = ?3, updated_us = ?3 WHERE id = ?1",
                params![id, latest, now],
            )?;
            id
        }
        None => {
            let id = new_session_id();
            tx.execute(
                "INSERT INTO sessions(id, vm_id, owner, base_point, state, created_us, updated_us)
                 VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?5)",
                params![id, vm_id, owner, latest, now],
            )?;
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
        Some(p) => {
            let mut stmt = tx.prepare(
                "SELECT name, disk_id, size, block_size FROM point_disks WHERE point_id = ?1",
            )?;
            let rows = stmt.query_map([p], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)? as u64,
                        r.get::<_, i64>(3)? as u64,
                    ),
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        }
        None => HashMap::new(),
    };
    let mut modes = Vec::new();
    for (pos, d) in spec.disks.iter().enumerate() {
        let base_disk = base_disks
            .get(&d.name)
            .and_then(|&(disk_id, size, bs)| continues(size, bs, &d.geometry).then_some(disk_id));
        tx.execute(
            "INSERT INTO session_disks(session_id, pos, name, size, block_size, base_disk)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                session,
                pos as i64,
                d.name,
                d.geometry.size as i64,
                d.geometry.block_size.bytes() as i64,
                base_disk
            ],
        )?;
        let mode = if base_disk.is_some() {
            DiskMode::Delta
        } else {
            DiskMode::Full
        };
        modes.push((d.name.clone(), mode));
    }
    Ok(modes)
}
