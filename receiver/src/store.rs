//! The data folder: the catalog plus the chunk store, opened once by `serve`.

use crate::catalog;
use crate::chunks::{self, ChunkStore, ChunkWriter};
use crate::config::{Quota, ReceiverFile};
use crate::error::StoreError;
use rusqlite::Connection;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The lock file that keeps a second `serve` off a data folder.
pub const SERVE_LOCK: &str = "serve.lock";

/// Read-only catalog connections kept between reads (more are opened while more reads run).
const READERS_KEPT: usize = 8;

/// What the configuration says about each agent's use of the store: quotas, and how long a VM
/// name with no point stays claimed. `serve` sets them at start and on SIGHUP.
#[derive(Debug, Clone)]
pub struct Rules {
    pub quota: Quota,
    pub agents: BTreeMap<String, Quota>,
    pub claim_timeout: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            quota: Quota::default(),
            agents: BTreeMap::new(),
            claim_timeout: crate::config::Limits::default().vm_claim_timeout,
        }
    }
}

impl Rules {
    pub fn from_file(f: &ReceiverFile) -> Rules {
        Rules {
            quota: f.quota.unwrap_or_default(),
            agents: f.agent.clone(),
            claim_timeout: f.limits.limits().vm_claim_timeout,
        }
    }

    /// The quotas of `agent`.
    pub fn quota(&self, agent: &str) -> Quota {
        self.agents.get(agent).copied().unwrap_or(self.quota)
    }
}

/// An open data folder. All catalog writes go through one connection; callers run store work
/// on blocking threads.
pub struct Store {
    data: PathBuf,
    /// Where chunk frames are stored.
    chunks: Arc<dyn ChunkStore>,
    /// The writer. parking_lot's lock can be handed to a waiting thread (`unlock_fair`): a
    /// stepped commit does that between its steps, so other agents' writes interleave.
    conn: parking_lot::Mutex<Connection>,
    /// Idle read-only connections, for lookups that run side by side (see [`Store::reader`]).
    readers: Mutex<Vec<Connection>>,
    rules: RwLock<Arc<Rules>>,
    /// One lock per VM that serialises its commits (see [`Store::commit`]).
    pub(crate) commit_locks: Mutex<std::collections::HashMap<crate::catalog::VmId, Arc<Mutex<()>>>>,
    /// The data folder's serve lock, held while the store is open.
    _serve_lock: std::fs::File,
    /// Points committed since the store was opened (what makes a catalog snapshot due).
    pub(crate) commits: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens or creates the data folder, its packs where it recorded them (local by default).
    pub fn open(data: &Path) -> Result<Store, StoreError> {
        Self::open_at(data, None)
    }

    /// Opens or creates the data folder; with `wanted`, its packs in that object store (a new
    /// folder records it; an existing one must have recorded the same bucket and prefix).
    pub fn open_at(
        data: &Path,
        wanted: Option<&chunks::location::Location>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data).map_err(|source| StoreError::Io {
            path: data.to_owned(),
            source,
        })?;
        // One serve per data folder: the cleanup below removes what a running serve's commit
        // in progress has written. The lock ends with the process.
        let lock = crate::gc::open_lock_file(&data.join(SERVE_LOCK))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| StoreError::InUse(data.to_owned()))?;
        let (chunks, published) = chunks::create(data, wanted)?;
        let conn = catalog::open_rw(data)?;
        // No upload of an earlier serve process can still be appending to its packs; those it
        // left unpublished are in the bucket now, with their digests and versions.
        catalog::seal_orphans(&conn, "serve")?;
        for r in &published {
            catalog::packs::seal(&conn, r)?;
        }
        // A stepped commit cut short by a crash left nodes at an id no point has: remove them
        // before any point of its VM can commit over them.
        let mut conn = conn;
        let mut warned = false;
        while crate::ingest::forget_pending_step(&mut conn, None)? {
            if !warned {
                tracing::warn!("removing the nodes of commits cut short");
                warned = true;
            }
        }
        // Staged rows of sessions that can never commit (a crash came before they were dropped).
        crate::catalog::sessions::drop_closed_staged(&conn)?;
        Ok(Store {
            data: data.to_owned(),
            chunks,
            conn: parking_lot::Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            rules: RwLock::new(Arc::new(Rules::default())),
            commit_locks: Mutex::new(std::collections::HashMap::new()),
            _serve_lock: lock,
            commits: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Puts new quotas and claim rules in force.
    pub fn set_rules(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
    }

    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Points committed since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The chunk store, for readers of chunk frames.
    pub fn chunks(&self) -> &dyn ChunkStore {
        &*self.chunks
    }

    /// A chunk writer of its own, for one upload stream.
    pub fn chunk_writer(&self) -> Box<dyn ChunkWriter> {
        self.chunks.writer()
    }

    /// The catalog connection. (A panic while it was held poisons nothing that SQLite's own
    /// transactions do not already protect; parking_lot's lock has no poisoning.)
    pub fn conn(&self) -> parking_lot::MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    /// A read-only catalog connection of its own, for lookups that need not wait for the
    /// writer or for each other: in WAL mode readers run side by side, each on the last
    /// commit. Lookups of chunks spread over a large catalog wait on the disk for most pages,
    /// and several in flight are served about three times as fast as one after another.
    pub fn reader(&self) -> Result<Reader<'_>, StoreError> {
        let kept = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match kept {
            Some(c) => c,
            None => catalog::open_reader(&self.data)?,
        };
        Ok(Reader {
            store: self,
            conn: Some(conn),
        })
    }
}

/// A read-only catalog connection from [`Store::reader`], kept for the next reader when dropped.
pub struct Reader<'a> {
    store: &'a Store,
    conn: Option<Connection>,
}

impl Deref for Reader<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a reader holds its connection until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        let mut idle = self.store.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < READERS_KEPT {
            idle.extend(self.conn.take());
        }
    }
}
