//! The data folder: the catalog plus the pack files, opened once by `serve`.

use crate::catalog;
use crate::error::StoreError;
use crate::packs;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The folder of pack files inside the data folder.
pub const PACKS_DIR: &str = "packs";

/// An open data folder. All catalog writes go through one connection; callers run store work
/// on blocking threads.
pub struct Store {
    data: PathBuf,
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens or creates the data folder.
    pub fn open(data: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data).map_err(|source| StoreError::Io {
            path: data.to_owned(),
            source,
        })?;
        packs::ensure_dir(&data.join(PACKS_DIR))?;
        let conn = catalog::open_rw(data)?;
        // No upload of an earlier serve process can still be appending to its packs.
        catalog::seal_orphans(&conn, "serve")?;
        Ok(Store {
            data: data.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    pub fn data(&self) -> &Path {
        &self.data
    }

    pub fn packs_dir(&self) -> PathBuf {
        self.data.join(PACKS_DIR)
    }

    /// The catalog connection. A panic while it was held poisons nothing that SQLite's own
    /// transactions do not already protect, so a poisoned lock is taken over.
    pub fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}
