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
//! accel = "auto"                 # auto, kvm or tcg (nested KVM can be slower than TCG)
//! checks = [                     # run in the booted guest through qemu-ga (need boot = true)
//!   { name = "system", command = ["systemctl", "is-system-running"] },
//! ]
//!
//! [vm.web1]                      # per-VM overrides
//! rpo = 300
//! retention = { last = 48, hourly = 72 }
//! drill = { every = 21600, boot = true, checks = [
//!   { name = "database", command = ["sqlite3", "/var/lib/app/app.db", "PRAGMA integrity_check"], expect_output = "^ok$", timeout = 120 },
//! ] }
//!
//! [limits]                       # what peers may take (defaults shown; restart to apply)
//! handshake_timeout = 10         # seconds a TLS handshake may take
//! idle_timeout = 300             # seconds a connection may sit with no request
//! max_handshakes = 1024          # pending handshakes (the oldest is dropped past this)
//! max_handshakes_per_address = 64
//! max_connections = 4096         # verified connections in all
//! max_connections_per_agent = 12
//! max_partial_mib = 256          # bytes of request messages received but not yet whole
//! max_partial_mib_per_agent = 64
//! message_timeout = 60           # seconds a started message may take to arrive whole
//! stream_idle_timeout = 300      # seconds an upload stream may go without a message
//! max_uploads_per_agent = 16     # concurrent Upload streams of one agent
//! vm_claim_timeout = 86400       # seconds a VM name with no point stays its first agent's
//!
//! [quota]                        # per-agent quotas (default: none)
//! vms = 100                      # VMs an agent may own
//! sessions = 16                  # open (uncommitted) sessions of an agent
//! stored_mib = 2097152           # compressed chunk bytes an agent may hold, in MiB
//!
//! [agent.host1]                  # one agent's quotas instead of [quota]
//! vms = 400
//!
//! [copy]                         # copy another receiver's points (see `copy`; restart to apply)
//! from = "https://primary.example:7443"
//! ca = "/etc/rewind/primary-ca.pem"
//! cert = "/etc/rewind/replica.pem"
//! key = "/etc/rewind/replica.key"
//! every = 300
//! ```

use crate::retention::Policy;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}")]
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
    /// QEMU's accelerator for boot drills (`auto`, `kvm` or `tcg`).
    #[serde(default)]
    pub accel: crate::drill::Accel,
    /// Application checks run in the booted guest, in order.
    #[serde(default)]
    pub checks: Vec<crate::drill::CheckSpec>,
    /// An encrypted VM's key file (or recovery key file), put here on purpose: with it the
    /// drill checks content and can boot; without it, it checks ciphertext and structure.
    pub encryption_key: Option<std::path::PathBuf>,
    pub recovery_key: Option<std::path::PathBuf>,
    /// The key file's passphrase file.
    pub passphrase_file: Option<std::path::PathBuf>,
    /// Only check that the key still opens the point (see `drill --key-check`).
    #[serde(default)]
    pub key_check: bool,
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

/// What peers may take of the receiver (see the module docs for the keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    pub max_connections: usize,
    pub max_connections_per_agent: usize,
    pub max_partial_bytes: usize,
    pub max_partial_bytes_per_agent: usize,
    pub message_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub max_uploads_per_agent: usize,
    pub vm_claim_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        LimitsFile::default().limits()
    }
}

/// The `[limits]` table: every key optional, defaults in [`LimitsFile::limits`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub handshake_timeout: Option<u64>,
    pub idle_timeout: Option<u64>,
    pub max_handshakes: Option<usize>,
    pub max_handshakes_per_address: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_agent: Option<usize>,
    pub max_partial_mib: Option<usize>,
    pub max_partial_mib_per_agent: Option<usize>,
    pub message_timeout: Option<u64>,
    pub stream_idle_timeout: Option<u64>,
    pub max_uploads_per_agent: Option<usize>,
    pub vm_claim_timeout: Option<u64>,
}

impl LimitsFile {
    /// The limits with defaults for the keys not given. Each default leaves an honest agent
    /// room (it uses a few connections, one stream per VM in sync, messages of about 4 MiB)
    /// while bounding what a stranger or a hostile agent can hold.
    pub fn limits(&self) -> Limits {
        let secs = |v: Option<u64>, d: u64| Duration::from_secs(v.unwrap_or(d).max(1));
        Limits {
            // A handshake takes milliseconds on any link an agent syncs over.
            handshake_timeout: secs(self.handshake_timeout, 10),
            idle_timeout: secs(self.idle_timeout, 300),
            max_handshakes: self.max_handshakes.unwrap_or(1024).max(1),
            max_handshakes_per_address: self.max_handshakes_per_address.unwrap_or(64).max(1),
            // Under the descriptors the shipped unit grants (LimitNOFILE=65536).
            max_connections: self.max_connections.unwrap_or(4096).max(1),
            // An agent's `run` opens one connection per VM cycle in flight; each connection
            // may hold a 16 MiB HTTP/2 window the receiver has not read yet.
            max_connections_per_agent: self.max_connections_per_agent.unwrap_or(12).max(1),
            // Partial messages: 256 MiB in all keeps the receiver's peak under 512 MiB.
            max_partial_bytes: self.max_partial_mib.unwrap_or(256).max(16) << 20,
            max_partial_bytes_per_agent: self.max_partial_mib_per_agent.unwrap_or(64).max(16) << 20,
            message_timeout: secs(self.message_timeout, 60),
            // The agent sends an empty batch on an upload stream every 60 s it has nothing.
            stream_idle_timeout: secs(self.stream_idle_timeout, 300),
            max_uploads_per_agent: self.max_uploads_per_agent.unwrap_or(16).max(1),
            // A name is owned once a point commits; before that, a day without progress
            // frees it for another agent (no squatting on names by Begin alone).
            vm_claim_timeout: secs(self.vm_claim_timeout, 86_400),
        }
    }
}

/// Per-agent quotas; a key not given is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// VMs the agent may own.
    pub vms: Option<u64>,
    /// Open (uncommitted) sessions of the agent.
    pub sessions: Option<u64>,
    /// Compressed chunk bytes the agent may hold, in MiB.
    pub stored_mib: Option<u64>,
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
    #[serde(default)]
    pub limits: LimitsFile,
    pub quota: Option<Quota>,
    /// Per-agent quotas instead of `quota`.
    #[serde(default)]
    pub agent: BTreeMap<String, Quota>,
    /// Packs on an object store (`url = "s3://BUCKET/PREFIX"`, endpoint, region, ...).
    pub store: Option<crate::chunks::location::StoreTable>,
    /// A second offsite copy of another receiver, pulled on a schedule (see [`crate::copy`]).
    pub copy: Option<crate::copy::CopyFile>,
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

    /// The quotas of `agent`.
    pub fn quota(&self, agent: &str) -> Quota {
        self.agent
            .get(agent)
            .copied()
            .or(self.quota)
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
    if !d.checks.is_empty() && !d.boot {
        return Err("checks need boot = true".into());
    }
    for c in &d.checks {
        crate::drill::Check::parse(c).map_err(|e| format!("checks: {e}"))?;
    }
    if d.encryption_key.is_some() && d.recovery_key.is_some() {
        return Err("give encryption_key or recovery_key, not both".into());
    }
    if d.key_check && (d.boot || (d.encryption_key.is_none() && d.recovery_key.is_none())) {
        return Err("key_check needs encryption_key or recovery_key, and no boot".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_proto::report::chain;

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
            drill = { every = 600, boot = true, expect_serial = "login:", accel = "tcg" }
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
            f.drill("web1").map(|d| d.accel),
            Some(crate::drill::Accel::Tcg)
        );
        assert_eq!(
            f.drill("db1").map(|d| d.accel),
            Some(crate::drill::Accel::Auto)
        );
        assert_eq!(
            f.drill("db1").map(|d| (d.every, d.boot, d.boot_timeout)),
            Some((86400, false, 120))
        );
    }

    #[test]
    fn the_module_docs_example_is_valid() {
        let docs: String = include_str!("config.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
            .collect();
        let example = docs
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block");
        let f = parse(example).expect("the example parses");
        let web1 = f.drill("web1").expect("web1 drill");
        assert_eq!(web1.checks.len(), 1);
        assert_eq!(web1.checks[0].expect_output.as_deref(), Some("^ok$"));
        assert_eq!(web1.checks[0].timeout, Some(120));
        assert_eq!(
            f.drill("db1").map(|d| d.checks[0].command.clone()),
            Some(vec!["systemctl".to_owned(), "is-system-running".to_owned()])
        );
    }

    #[test]
    fn drill_checks_parse_with_defaults() {
        let f = parse(
            r#"
            [vm.web1]
            drill = { every = 600, boot = true, checks = [
              { name = "db", command = ["sqlite3", "/a.db", "PRAGMA integrity_check"], expect_output = "^ok$" },
              { command = ["/bin/true"], expect_exit = 3, timeout = 5 },
            ] }
            "#,
        )
        .expect("valid");
        let d = f.drill("web1").expect("drill");
        let checks: Vec<crate::drill::Check> = d
            .checks
            .iter()
            .map(crate::drill::Check::parse)
            .collect::<Result<_, _>>()
            .expect("checks");
        assert_eq!(checks[0].name, "db");
        assert_eq!(checks[0].expect_exit, 0);
        assert_eq!(checks[0].timeout, None);
        assert_eq!(checks[1].name, "/bin/true", "named for its command");
        assert_eq!(checks[1].expect_exit, 3);
        assert_eq!(checks[1].timeout, Some(Duration::from_secs(5)));
        assert!(f.drill("other").is_none());
    }

    #[test]
    fn a_drill_schedule_names_its_key_on_purpose() {
        let f = parse(
            r#"
            [vm.enc]
            drill = { every = 3600, key_check = true, encryption_key = "/etc/rewind/enc.key", passphrase_file = "/etc/rewind/enc.pass" }
            "#,
        )
        .expect("valid");
        let d = f.drill("enc").expect("drill");
        assert!(d.key_check);
        assert_eq!(
            d.encryption_key.as_deref(),
            Some(std::path::Path::new("/etc/rewind/enc.key"))
        );
        assert_eq!(d.recovery_key, None);
        for bad in [
            "[drill]\nevery = 5\nkey_check = true",
            "[drill]\nevery = 5\nencryption_key = \"/a\"\nrecovery_key = \"/b\"",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mistakes_are_named() {
        let e = chain(&parse("dta = \"/x\"").expect_err("unknown key"));
        assert!(e.contains("dta"), "{e}");
        let e = chain(&parse("[vm.\"bad name\"]\nrpo = 5").expect_err("bad vm"));
        assert!(e.contains("bad name"), "{e}");
        let e = chain(&parse("prune_interval = 0").expect_err("zero"));
        assert!(e.contains("prune_interval"), "{e}");
        let e = chain(&parse("[drill]\nevery = 0").expect_err("zero"));
        assert!(e.contains("every"), "{e}");
        let e = chain(
            &parse("[vm.a]\ndrill = { every = 5, expect_serial = \"(\" }").expect_err("regex"),
        );
        assert!(e.contains("expect_serial"), "{e}");
        let e = chain(
            &parse("[drill]\nevery = 5\nchecks = [ { command = [\"true\"] } ]")
                .expect_err("checks without boot"),
        );
        assert!(e.contains("checks need boot"), "{e}");
        let e = chain(
            &parse("[drill]\nevery = 5\nboot = true\nchecks = [ { name = \"x\", command = [] } ]")
                .expect_err("empty command"),
        );
        assert!(
            e.contains("[drill]") && e.contains("\"x\": the command is empty"),
            "{e}"
        );
        let e = chain(&parse(
            "[vm.a]\ndrill = { every = 5, boot = true, checks = [ { command = [\"x\"], expect_output = \"(\" } ] }",
        )
        .expect_err("regex"));
        assert!(e.contains("[vm.a]") && e.contains("expect_output"), "{e}");
        let e = chain(
            &parse("[drill]\nevery = 5\nboot = true\nchecks = [ { command = [\"x\"], exit = 1 } ]")
                .expect_err("unknown key"),
        );
        assert!(e.contains("exit"), "{e}");
        let e = chain(&parse("[retention]\nlast = -1").expect_err("negative"));
        assert!(e.contains("last") || e.contains("invalid"), "{e}");
    }
}
