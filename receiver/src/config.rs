//! The receiver's configuration file (TOML). Every key has a `serve` flag that overrides it;
//! SIGHUP re-reads the file and applies retention, RPO targets and drill schedules (the data
//! folder, listen address, PKI and metrics address need a restart).
//!
//! ```toml
//! data = "/srv/rewind"
//! listen = "0.0.0.0:7443"
//! pki = "/etc/rewind/pki"
//! metrics = "127.0.0.1:9750"
//! prune_interval = 3600          # seconds between prune + gc runs
//! rpo = 3600                     # default RPO target (seconds) for `status`
//!
//! [retention]                    # default keep rules for every VM
//! last = 24
//! daily = 14
//!
//! [drill]                        # default drill schedule for every VM (optional)
//! every = 86400                  # seconds
//! boot = true
//! boot_timeout = 120
//! expect_serial = "login:"
//!
//! [vm.web1]                      # per-VM overrides
//! rpo = 300
//! retention = { last = 48, hourly = 72 }
//! drill = { every = 21600, boot = true }
//! ```

use crate::retention::Policy;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// A scheduled drill.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSchedule {
    /// Seconds between drills.
    pub every: u64,
    #[serde(default)]
    pub boot: bool,
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout: u64,
    pub expect_serial: Option<String>,
}

fn default_boot_timeout() -> u64 {
    120
}

/// Per-VM settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    pub rpo: Option<u64>,
    pub retention: Option<Policy>,
    pub drill: Option<DrillSchedule>,
}

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverFile {
    pub data: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub pki: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub prune_interval: Option<u64>,
    pub rpo: Option<u64>,
    pub retention: Option<Policy>,
    pub drill: Option<DrillSchedule>,
    #[serde(default)]
    pub vm: BTreeMap<String, VmSettings>,
}

impl ReceiverFile {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<ReceiverFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let f: ReceiverFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let invalid = |what: String| ConfigError::Invalid {
            path: path.to_owned(),
            what,
        };
        for (name, v) in &f.vm {
            rewind_proto::names::vm(name).map_err(|e| invalid(format!("[vm.{name}]: {e}")))?;
            if v.rpo == Some(0) {
                return Err(invalid(format!("[vm.{name}] rpo must be positive")));
            }
            if let Some(d) = &v.drill {
                check_drill(d).map_err(|e| invalid(format!("[vm.{name}] drill: {e}")))?;
            }
        }
        if let Some(d) = &f.drill {
            check_drill(d).map_err(|e| invalid(format!("[drill]: {e}")))?;
        }
        if f.rpo == Some(0) {
            return Err(invalid("rpo must be positive".into()));
        }
        if f.prune_interval == Some(0) {
            return Err(invalid("prune_interval must be positive (seconds)".into()));
        }
        Ok(f)
    }

    /// The retention rules of `vm`.
    pub fn policy(&self, vm: &str) -> Policy {
        self.vm
            .get(vm)
            .and_then(|v| v.retention)
            .or(self.retention)
            .unwrap_or_default()
    }

    /// The RPO target of `vm` in seconds.
    pub fn rpo(&self, vm: &str) -> Option<u64> {
        self.vm.get(vm).and_then(|v| v.rpo).or(self.rpo)
    }

    /// The drill schedule of `vm`, if any.
    pub fn drill(&self, vm: &str) -> Option<&DrillSchedule> {
        self.vm
            .get(vm)
            .and_then(|v| v.drill.as_ref())
            .or(self.drill.as_ref())
    }
}

fn check_drill(d: &DrillSchedule) -> Result<(), String> {
    if d.every == 0 {
        return Err("every must be positive (seconds)".into());
    }
    if let Some(re) = &d.expect_serial {
        regex::Regex::new(re).map_err(|e| format!("expect_serial: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ReceiverFile, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r.toml");
        std::fs::write(&p, text).expect("write");
        ReceiverFile::load(&p)
    }

    #[test]
    fn per_vm_settings_override_defaults() {
        let f = parse(
            r#"
            data = "/srv/rewind"
            listen = "127.0.0.1:7443"
            rpo = 3600
            [retention]
            last = 5
            [drill]
            every = 86400
            [vm.web1]
            rpo = 300
            retention = { hourly = 24 }
            drill = { every = 600, boot = true, expect_serial = "login:" }
            "#,
        )
        .expect("valid");
        assert_eq!(f.data.as_deref(), Some(Path::new("/srv/rewind")));
        assert_eq!(f.rpo("web1"), Some(300));
        assert_eq!(f.rpo("db1"), Some(3600));
        assert_eq!(f.policy("web1").hourly, Some(24));
        assert_eq!(f.policy("web1").last, None);
        assert_eq!(f.policy("db1").last, Some(5));
        assert_eq!(f.drill("web1").map(|d| d.every), Some(600));
        assert_eq!(
            f.drill("db1").map(|d| (d.every, d.boot, d.boot_timeout)),
            Some((86400, false, 120))
        );
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse("dta = \"/x\"").expect_err("unknown key").to_string();
        assert!(e.contains("dta"), "{e}");
        let e = parse("[vm.\"bad name\"]\nrpo = 5")
            .expect_err("bad vm")
            .to_string();
        assert!(e.contains("bad name"), "{e}");
        let e = parse("prune_interval = 0").expect_err("zero").to_string();
        assert!(e.contains("prune_interval"), "{e}");
        let e = parse("[drill]\nevery = 0").expect_err("zero").to_string();
        assert!(e.contains("every"), "{e}");
        let e = parse("[vm.a]\ndrill = { every = 5, expect_serial = \"(\" }")
            .expect_err("regex")
            .to_string();
        assert!(e.contains("expect_serial"), "{e}");
        let e = parse("[retention]\nlast = -1")
            .expect_err("negative")
            .to_string();
        assert!(e.contains("last") || e.contains("invalid"), "{e}");
    }
}
