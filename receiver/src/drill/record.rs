//! A drill's report and its record in the catalog: `drill --json` and `drills --json` print it,
//! and every drill stores one (also when it fails).

use super::checks::CheckReport;
use crate::catalog::{self, drills, now_us};
use crate::error::StoreError;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One damaged block of a point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Damage {
    pub disk: String,
    /// None: the disk as a whole (its blocks do not give its root).
    pub block: Option<u64>,
    pub hash: String,
    pub problem: String,
}

/// A drill's record, as `drill --json` and `drills --json` print it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    pub id: i64,
    pub vm: String,
    pub point: Option<i64>,
    pub point_created: Option<String>,
    pub started: String,
    pub point_age_seconds: Option<f64>,
    pub verified_seconds: Option<f64>,
    pub blocks_verified: u64,
    pub bytes_verified: u64,
    pub damaged_blocks: u64,
    pub damaged: Vec<Damage>,
    pub booted: Option<bool>,
    pub boot_seconds: Option<f64>,
    pub rto_seconds: Option<f64>,
    /// "kvm" or "tcg" when booted.
    pub accel: Option<String>,
    /// What the boot gave QEMU, from the captured configuration (absent without a boot and
    /// in records from before): memory in MiB (capped by `--max-memory-mib`), vCPUs, the
    /// machine family ("pc" or "q35") and the disks in boot order.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub cpus: Option<u64>,
    #[serde(default)]
    pub machine: Option<String>,
    #[serde(default)]
    pub disk_order: Vec<String>,
    pub serial_tail: Option<String>,
    /// The application checks, in order (empty without any).
    #[serde(default)]
    pub checks: Vec<CheckReport>,
    /// Seconds from the drill's start until every check passed.
    #[serde(default)]
    pub healthy_seconds: Option<f64>,
    /// What the verify proved of each block: "content" (decoded, hashed to its leaf), or for
    /// an encrypted point without a key "ciphertext only ..." (absent in older records).
    #[serde(default)]
    pub checked: Option<String>,
    /// "passed" or "failed".
    pub result: String,
    /// Why it failed.
    pub reason: Option<String>,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.result == "passed"
    }
}

/// Stores a drill's record; returns its id.
pub(super) fn record(data: &Path, r: &DrillReport) -> Result<i64, StoreError> {
    let conn = catalog::open_rw(data)?;
    let detail = serde_json::to_string(r).unwrap_or_default();
    let row = drills::NewDrill {
        vm: &r.vm,
        point: r.point,
        started_us: catalog::parse_rfc3339(&r.started).unwrap_or_else(|_| now_us()),
        point_age_s: r.point_age_seconds,
        verified_s: r.verified_seconds,
        boot_s: r.boot_seconds,
        rto_s: r.rto_seconds,
        result: &r.result,
        reason: r.reason.as_deref(),
        detail: &detail,
    };
    Ok(drills::record(&conn, &row)?)
}

/// Recorded drills, oldest first (of one VM, or all).
pub fn history(conn: &Connection, vm: Option<&str>) -> Result<Vec<DrillReport>, StoreError> {
    let mut out = Vec::new();
    for (id, detail) in drills::history(conn, vm)? {
        if let Ok(mut r) = serde_json::from_str::<DrillReport>(&detail) {
            r.id = id;
            out.push(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_from_before_checks_still_load() {
        let old = r#"{"id":3,"vm":"web1","point":7,"point_created":"2024-01-01T00:00:00Z",
            "started":"2024-01-02T00:00:00Z","point_age_seconds":86400.0,"verified_seconds":1.5,
            "blocks_verified":10,"bytes_verified":40960,"damaged_blocks":0,"damaged":[],
            "booted":true,"boot_seconds":3.0,"rto_seconds":4.5,"accel":"tcg",
            "serial_tail":"login:","result":"passed","reason":null}"#;
        let r: DrillReport = serde_json::from_str(old).expect("old record loads");
        assert!(r.checks.is_empty() && r.healthy_seconds.is_none());
        assert!(r.memory_mib.is_none() && r.cpus.is_none() && r.machine.is_none());
        assert!(r.disk_order.is_empty());
        let with = serde_json::to_value(DrillReport {
            checks: vec![CheckReport {
                name: "db".into(),
                passed: true,
                ..CheckReport::default()
            }],
            healthy_seconds: Some(9.0),
            ..r
        })
        .expect("json");
        assert_eq!(with["healthy_seconds"], 9.0);
        let c = &with["checks"][0];
        for key in [
            "name",
            "command",
            "passed",
            "attempts",
            "exit_code",
            "stdout",
            "stderr",
            "passed_seconds",
            "problem",
        ] {
            assert!(c.get(key).is_some(), "{key} in {c}");
        }
    }
}
