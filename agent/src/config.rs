//! The agent's configuration file (TOML) for `rewind-agent run`: the receiver, credentials,
//! state folder, interval or RPO target, bandwidth limits with time-of-day windows, and many
//! VMs, each a QMP socket or a list of disks. `run` flags override the global keys; SIGHUP
//! re-reads the file.
//!
//! ```toml
//! state = "/var/lib/rewind-agent"
//! metrics = "127.0.0.1:9751"
//! rpo = 300                 # seconds; the interval defaults to half of it
//! bwlimit = 100             # MB/s outside any window
//! utc_offset = "+01:00"     # the windows' clock (default UTC)
//!
//! [receiver]
//! url = "https://backup.example.net:7443"
//! ca = "/etc/rewind/pki/ca.pem"
//! cert = "/etc/rewind/pki/host1.pem"
//! key = "/etc/rewind/pki/host1.key"
//!
//! [[bandwidth]]             # first matching window wins; end before start wraps midnight
//! start = "08:00"
//! end = "18:00"
//! mbps = 20
//!
//! [[vm]]
//! name = "web1"
//! qmp = "/run/qemu/web1.qmp"
//! guest_agent = "/run/qemu/web1.qga"
//!
//! [[vm]]
//! name = "app1"
//! libvirt = "qemu:///system"  # a libvirt-managed VM: backup jobs with checkpoints
//! domain = "app1"
//! freeze = true               # through libvirt's guest agent support
//! scratch_reserve_mib = 256   # free space a job leaves beyond its scratch files' need
//!
//! [[vm]]
//! name = "db1"
//! encryption_key = "/etc/rewind/keys/db1.key"   # client-side encryption (fixed by the first point)
//! passphrase_file = "/etc/rewind/keys/db1.pass"
//! disks = ["vda=/dev/vg0/db1", "vdb=qcow2:/var/lib/vms/db1-data.qcow2"]
//! interval = 30
//! ```

use crate::client::ReceiverConfig;
use crate::sync::{Bandwidth, DiskKind, DiskSource, LiveSource, SyncConfig};
use rewind_proto::format::{BlockSize, DEFAULT_BLOCK_SIZE};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use time::{OffsetDateTime, UtcOffset};

/// Seconds between points when neither an interval nor an RPO target is given.
pub const DEFAULT_INTERVAL: u64 = 60;

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
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverSection {
    pub url: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A time-of-day bandwidth limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// "HH:MM", inclusive.
    pub start: String,
    /// "HH:MM", exclusive; before `start` means the window wraps midnight.
    pub end: String,
    /// MB/s while the window is open.
    pub mbps: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    pub name: String,
    pub qmp: Option<PathBuf>,
    pub guest_agent: Option<PathBuf>,
    /// libvirt connection URI of a libvirt-managed VM (with `domain`).
    pub libvirt: Option<String>,
    /// The libvirt domain's name.
    pub domain: Option<String>,
    /// Freeze the libvirt guest's file systems around each job.
    #[serde(default)]
    pub freeze: bool,
    /// Free space (MiB) a libvirt job must leave in the state folder beyond its scratch files'
    /// expected need.
    pub scratch_reserve_mib: Option<u64>,
    /// NAME=PATH or NAME=qcow2:PATH; with `qmp` or `libvirt`, just NAME limits the disks.
    #[serde(default)]
    pub disks: Vec<String>,
    pub interval: Option<u64>,
    pub rpo: Option<u64>,
    pub bwlimit: Option<f64>,
    pub block_size: Option<u64>,
    /// Key file of the keyring that encrypts this VM's chunks (fixed by its first point).
    pub encryption_key: Option<PathBuf>,
    /// File whose first line is the key file's passphrase.
    pub passphrase_file: Option<PathBuf>,
    /// Pad encrypted chunks to 4 KiB buckets.
    #[serde(default)]
    pub pad_chunks: bool,
}

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub state: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    #[serde(default)]
    pub receiver: ReceiverSection,
    pub interval: Option<u64>,
    pub rpo: Option<u64>,
    pub block_size: Option<u64>,
    pub bwlimit: Option<f64>,
    pub utc_offset: Option<String>,
    #[serde(default)]
    pub bandwidth: Vec<Window>,
    #[serde(default)]
    pub vm: Vec<VmEntry>,
}

fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn offset(text: &str) -> Option<UtcOffset> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1i8, &text[1..]),
        b'-' => (-1i8, &text[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i8, i8) = (h.parse().ok()?, m.parse().ok()?);
    UtcOffset::from_hms(sign * h, sign * m, 0).ok()
}

/// Parses `NAME=PATH`, `NAME=raw:PATH` or `NAME=qcow2:PATH`.
pub fn parse_disk(spec: &str) -> Result<DiskSource, ConfigError> {
    let bad = |why: &str| ConfigError::Invalid(format!("disk {spec:?}: {why}"));
    let (name, path) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=PATH or NAME=qcow2:PATH"))?;
    rewind_proto::names::disk(name).map_err(|e| bad(&e.to_string()))?;
    let (kind, path) = match path.strip_prefix("qcow2:") {
        Some(p) => (DiskKind::Qcow2, p),
        None => (DiskKind::Raw, path.strip_prefix("raw:").unwrap_or(path)),
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    Ok(DiskSource {
        name: name.to_owned(),
        path: PathBuf::from(path),
        kind,
    })
}

impl AgentFile {
    pub fn load(path: &Path) -> Result<AgentFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Checks what serde cannot: names, disks, windows, the clock offset, positive numbers.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        let mut seen = std::collections::HashSet::new();
        for v in &self.vm {
            rewind_proto::names::vm(&v.name)
                .map_err(|e| ConfigError::Invalid(format!("[[vm]] {:?}: {e}", v.name)))?;
            if !seen.insert(&v.name) {
                return bad(format!("VM {:?} is listed twice", v.name));
            }
            match (&v.libvirt, &v.domain, &v.qmp) {
                (Some(_), None, _) => return bad(format!("VM {}: libvirt needs domain", v.name)),
                (None, Some(_), _) => return bad(format!("VM {}: domain needs libvirt", v.name)),
                (Some(_), Some(_), Some(_)) => {
                    return bad(format!("VM {}: give qmp or libvirt, not both", v.name))
                }
                _ => {}
            }
            if v.freeze && v.libvirt.is_none() {
                return bad(format!(
                    "VM {}: freeze needs libvirt (with qmp, give guest_agent)",
                    v.name
                ));
            }
            if v.scratch_reserve_mib.is_some() && v.libvirt.is_none() {
                return bad(format!("VM {}: scratch_reserve_mib needs libvirt", v.name));
            }
            match (v.qmp.is_some() || v.libvirt.is_some(), v.disks.is_empty()) {
                (false, true) => return bad(format!("VM {}: give qmp or disks", v.name)),
                (true, false) => {
                    for d in &v.disks {
                        if d.contains('=') {
                            return bad(format!(
                                "VM {}: with qmp or libvirt, disks are names only (got {d:?})",
                                v.name
                            ));
                        }
                        rewind_proto::names::disk(d)
                            .map_err(|e| ConfigError::Invalid(format!("VM {}: {e}", v.name)))?;
                    }
                }
                (false, false) => {
                    for d in &v.disks {
                        parse_disk(d)?;
                    }
                }
                (true, true) => {}
            }
            if v.guest_agent.is_some() && v.qmp.is_none() {
                return bad(format!("VM {}: guest_agent needs qmp", v.name));
            }
            for (what, n) in [("interval", v.interval), ("rpo", v.rpo)] {
                if n == Some(0) {
                    return bad(format!("VM {}: {what} must be positive", v.name));
                }
            }
        }
        for (what, n) in [("interval", self.interval), ("rpo", self.rpo)] {
            if n == Some(0) {
                return bad(format!("{what} must be positive"));
            }
        }
        let limits = std::iter::once(("bwlimit".to_owned(), self.bwlimit)).chain(
            self.vm
                .iter()
                .map(|v| (format!("VM {} bwlimit", v.name), v.bwlimit)),
        );
        for (what, mb) in limits {
            if mb.is_some_and(|mb| mb.is_nan() || mb <= 0.0) {
                return bad(format!("{what} must be positive (MB/s)"));
            }
        }
        for w in &self.bandwidth {
            if minutes(&w.start).is_none() || minutes(&w.end).is_none() {
                return bad(format!(
                    "bandwidth window {}-{}: times are HH:MM",
                    w.start, w.end
                ));
            }
            if w.mbps.is_nan() || w.mbps <= 0.0 {
                return bad(format!(
                    "bandwidth window {}-{}: mbps must be positive",
                    w.start, w.end
                ));
            }
        }
        if let Some(o) = &self.utc_offset {
            if offset(o).is_none() {
                return bad(format!("utc_offset {o:?}: expected +HH:MM or -HH:MM"));
            }
        }
        Ok(())
    }

    /// The receiver and this agent's credentials, all four given.
    pub fn receiver_config(&self) -> Result<ReceiverConfig, ConfigError> {
        let r = &self.receiver;
        match (&r.url, &r.ca, &r.cert, &r.key) {
            (Some(url), Some(ca), Some(cert), Some(key)) => Ok(ReceiverConfig {
                url: url.clone(),
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => Err(ConfigError::Invalid(
                "the receiver needs url, ca, cert and key ([receiver] or \
                 --receiver/--ca/--cert/--key)"
                    .into(),
            )),
        }
    }

    /// The state folder.
    pub fn state_dir(&self) -> Result<PathBuf, ConfigError> {
        self.state.clone().ok_or_else(|| {
            ConfigError::Invalid("the state folder is not set (state = ... or --state)".into())
        })
    }

    /// The cycle of `vm` as the file describes it now.
    pub fn cycle(&self, vm: &VmEntry) -> Result<SyncConfig, ConfigError> {
        let libvirt = match (&vm.libvirt, &vm.domain) {
            (Some(uri), Some(domain)) => Some(crate::libvirt::LibvirtSource {
                uri: uri.clone(),
                domain: domain.clone(),
                freeze: vm.freeze,
                scratch_reserve: vm
                    .scratch_reserve_mib
                    .unwrap_or(crate::libvirt::DEFAULT_SCRATCH_RESERVE_MIB)
                    << 20,
                only: vm.disks.clone(),
            }),
            _ => None,
        };
        let (disks, live) = match &vm.qmp {
            _ if libvirt.is_some() => (Vec::new(), None),
            Some(qmp) => (
                Vec::new(),
                Some(LiveSource {
                    qmp: qmp.clone(),
                    guest_agent: vm.guest_agent.clone(),
                    only: vm.disks.clone(),
                }),
            ),
            None => (
                vm.disks
                    .iter()
                    .map(|d| parse_disk(d))
                    .collect::<Result<Vec<_>, _>>()?,
                None,
            ),
        };
        let block_size = vm
            .block_size
            .or(self.block_size)
            .unwrap_or(DEFAULT_BLOCK_SIZE as u64);
        Ok(SyncConfig {
            vm: vm.name.clone(),
            disks,
            live,
            libvirt,
            block_size: BlockSize::new(block_size)
                .map_err(|e| ConfigError::Invalid(format!("vm {}: {e}", vm.name)))?,
            state_dir: self.state_dir()?,
            bwlimit: {
                let (f, vm) = (self.clone(), vm.clone());
                Bandwidth(Arc::new(move |now| f.bwlimit_at(&vm, now)))
            },
            codec: crate::keys::codec(
                vm.encryption_key.as_deref(),
                vm.passphrase_file.as_deref(),
                vm.pad_chunks,
            )
            .map_err(|e| {
                ConfigError::Invalid(format!(
                    "vm {}: key file: {}",
                    vm.name,
                    rewind_proto::report::Chain(&e)
                ))
            })?,
        })
    }

    /// Interval and RPO target of `vm` in seconds: each defaults from the other (the interval
    /// is half the RPO target; the target twice the interval).
    pub fn timing(&self, vm: &VmEntry) -> (u64, u64) {
        let interval = vm.interval.or(self.interval);
        let rpo = vm.rpo.or(self.rpo);
        match (interval, rpo) {
            (Some(i), Some(r)) => (i, r),
            (Some(i), None) => (i, 2 * i),
            (None, Some(r)) => ((r / 2).max(1), r),
            (None, None) => (DEFAULT_INTERVAL, 2 * DEFAULT_INTERVAL),
        }
    }

    /// The upload limit for `vm` at `now`, in bytes per second: the first open window, else
    /// the VM's or the global `bwlimit`.
    pub fn bwlimit_at(&self, vm: &VmEntry, now: OffsetDateTime) -> Option<u64> {
        let local = now.to_offset(
            self.utc_offset
                .as_deref()
                .and_then(offset)
                .unwrap_or(UtcOffset::UTC),
        );
        let m = u32::from(local.hour()) * 60 + u32::from(local.minute());
        let open = self
            .bandwidth
            .iter()
            .find(|w| match (minutes(&w.start), minutes(&w.end)) {
                (Some(s), Some(e)) if s <= e => s <= m && m < e,
                (Some(s), Some(e)) => m >= s || m < e,
                _ => false,
            });
        open.map(|w| w.mbps)
            .or(vm.bwlimit)
            .or(self.bwlimit)
            .map(|mb| (mb * 1e6) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn parse(text: &str) -> Result<AgentFile, ConfigError> {
        let f: AgentFile = toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        f.check()?;
        Ok(f)
    }

    #[test]
    fn timing_defaults_from_each_other() {
        let f = parse(
            r#"
            rpo = 300
            [[vm]]
            name = "a"
            disks = ["vda=/dev/x"]
            [[vm]]
            name = "b"
            qmp = "/run/b.qmp"
            interval = 10
            [[vm]]
            name = "c"
            qmp = "/run/c.qmp"
            rpo = 40
            interval = 30
            "#,
        )
        .expect("valid");
        assert_eq!(f.timing(&f.vm[0]), (150, 300));
        assert_eq!(f.timing(&f.vm[1]), (10, 300));
        assert_eq!(f.timing(&f.vm[2]), (30, 40));
        let plain = parse("[[vm]]\nname = \"a\"\nqmp = \"/q\"").expect("valid");
        assert_eq!(plain.timing(&plain.vm[0]), (60, 120));
    }

    #[test]
    fn bandwidth_windows_by_time_of_day() {
        let f = parse(
            r#"
            bwlimit = 100
            utc_offset = "+02:00"
            [[bandwidth]]
            start = "08:00"
            end = "18:00"
            mbps = 20
            [[bandwidth]]
            start = "22:00"
            end = "02:00"
            mbps = 500
            [[vm]]
            name = "a"
            qmp = "/q"
            [[vm]]
            name = "b"
            qmp = "/q2"
            bwlimit = 7
            "#,
        )
        .expect("valid");
        let a = &f.vm[0];
        // 07:30 UTC is 09:30 at +02:00: inside the day window.
        assert_eq!(
            f.bwlimit_at(a, datetime!(2026-11-24 07:30 UTC)),
            Some(20_000_000)
        );
        // 16:30 UTC is 18:30: outside both windows.
        assert_eq!(
            f.bwlimit_at(a, datetime!(2026-11-24 16:30 UTC)),
            Some(100_000_000)
        );
        // 21:00 UTC is 23:00 and 23:30 UTC is 01:30: the night window wraps midnight.
        assert_eq!(
            f.bwlimit_at(a, datetime!(2026-11-24 21:00 UTC)),
            Some(500_000_000)
        );
        assert_eq!(
            f.bwlimit_at(a, datetime!(2026-11-24 23:30 UTC)),
            Some(500_000_000)
        );
        assert_eq!(
            f.bwlimit_at(a, datetime!(2026-11-25 00:00 UTC)),
            Some(100_000_000)
        );
        // A VM's own limit applies outside the windows.
        assert_eq!(
            f.bwlimit_at(&f.vm[1], datetime!(2026-11-24 16:30 UTC)),
            Some(7_000_000)
        );
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("[[vm]]\nname = \"a\"", "give qmp or disks"),
            ("[[vm]]\nname = \"a b\"\nqmp = \"/q\"", "a b"),
            (
                "[[vm]]\nname = \"a\"\nqmp = \"/q\"\n[[vm]]\nname = \"a\"\nqmp = \"/r\"",
                "twice",
            ),
            ("[[vm]]\nname = \"a\"\ndisks = [\"novalue\"]", "NAME=PATH"),
            (
                "[[vm]]\nname = \"a\"\nqmp = \"/q\"\ndisks = [\"vda=/x\"]",
                "names only",
            ),
            (
                "[[bandwidth]]\nstart = \"8\"\nend = \"18:00\"\nmbps = 1",
                "HH:MM",
            ),
            (
                "[[bandwidth]]\nstart = \"08:00\"\nend = \"18:00\"\nmbps = 0",
                "positive",
            ),
            ("utc_offset = \"CET\"", "utc_offset"),
            ("interval = 0", "interval"),
            ("bwlimit = 0", "bwlimit"),
            (
                "[[vm]]\nname = \"a\"\nqmp = \"/q\"\nbwlimit = -1",
                "VM a bwlimit",
            ),
            ("intervall = 5", "intervall"),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
