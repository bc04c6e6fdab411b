//! What a boot drill starts: QEMU's memory, vCPUs and machine family and the order of the
//! point's disks, from the point's captured configuration (QMP's figures for a QEMU VM, the
//! definition for a libvirt domain, see [`crate::domain_spec`]), with memory capped by what a
//! drill may take of the backup host.

use crate::domain_spec::{self, Firmware, Machine};
use crate::domain_xml::DomainXmlError;
use crate::points::PointInfo;
use thiserror::Error;

/// Memory when the configuration does not say, in MiB: enough for a small guest to boot.
const DEFAULT_MEMORY_MIB: u64 = 256;
/// Memory at least, in MiB: SeaBIOS and a kernel's early boot need about this much, so a
/// smaller figure would only turn a drill of a good point into a failed boot.
const MIN_MEMORY_MIB: u64 = 64;

#[derive(Debug, Error)]
pub(super) enum PlanError {
    /// The captured libvirt definition does not read.
    #[error(transparent)]
    Domain(#[from] DomainXmlError),
    /// No UEFI firmware (OVMF) is set up for drills, and a UEFI guest does not boot under the
    /// BIOS: refused rather than reported as a boot that timed out.
    #[error("UEFI firmware in the captured domain is not supported by drills yet")]
    Uefi,
}

impl PlanError {
    /// The message with its causes (roxmltree's position of a parse error), for the drill's
    /// reason.
    pub(super) fn reason(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// What the drill's QEMU gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BootPlan {
    pub(super) memory_mib: u64,
    pub(super) cpus: u64,
    pub(super) machine: Machine,
    /// Every disk of the point, by name, in boot order (QEMU's `bootindex` follows it).
    pub(super) disk_order: Vec<String>,
}

/// The plan for a point, memory at most `max_memory_mib`. A libvirt domain's definition gives
/// memory, vCPUs, machine family and boot order; a QEMU VM's figures give memory and vCPUs,
/// and it boots `pc` with its disks in the point's order. Err: the definition does not read, or
/// the guest needs UEFI.
pub(super) fn plan(point: &PointInfo, max_memory_mib: u64) -> Result<BootPlan, PlanError> {
    let null = serde_json::Value::Null;
    let config = point.config.as_ref().unwrap_or(&null);
    let names: Vec<String> = point.disks.iter().map(|d| d.name.clone()).collect();
    let (memory_bytes, cpus, machine, disk_order) = match domain_spec::of_config(config)? {
        Some(spec) => {
            if spec.firmware == Firmware::Uefi {
                return Err(PlanError::Uefi);
            }
            let mut order: Vec<String> = Vec::with_capacity(names.len());
            // The definition's order, then any disk of the point it does not list as a disk
            // (never seen: the agent found the disks there), each once.
            for name in spec.boot_order.into_iter().chain(names.iter().cloned()) {
                if names.contains(&name) && !order.contains(&name) {
                    order.push(name);
                }
            }
            (spec.memory_bytes, spec.vcpus, spec.machine, order)
        }
        None => (
            config["memory_bytes"].as_u64(),
            config["cpus"].as_u64(),
            Machine::Pc,
            names,
        ),
    };
    Ok(BootPlan {
        memory_mib: memory_bytes
            .map_or(DEFAULT_MEMORY_MIB, |b| (b >> 20).max(MIN_MEMORY_MIB))
            .min(max_memory_mib),
        cpus: cpus.unwrap_or(1).max(1),
        machine,
        disk_order,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::catalog::DiskId;
    use crate::points::PointDisk;
    use rewind_proto::DiskRoot;

    /// A point of `vm` with disks of these names and this configuration.
    pub(in crate::drill) fn point(disks: &[&str], config: serde_json::Value) -> PointInfo {
        PointInfo {
            id: 7,
            vm: "lv1".into(),
            created: "2024-01-01T00:00:00Z".into(),
            committed: "2024-01-01T00:00:01Z".into(),
            parent: None,
            consistency: "crash-consistent".into(),
            config: Some(config),
            config_text: None,
            locked_until: None,
            encrypted: None,
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, name)| PointDisk {
                    name: (*name).to_owned(),
                    size: 64 << 20,
                    block_size: 64 << 10,
                    root: DiskRoot::ZERO.to_hex(),
                    changed_blocks: 0,
                    disk_id: DiskId(i as i64 + 1),
                    root_leaf: DiskRoot::ZERO,
                })
                .collect(),
        }
    }

    /// A libvirt configuration around a domain definition.
    pub(in crate::drill) fn libvirt(xml: &str) -> serde_json::Value {
        serde_json::json!({
            "source": "libvirt", "uri": "qemu:///system", "domain": "lv1", "domain_xml": xml,
        })
    }

    const DOMAIN: &str = "<domain type='kvm'><name>lv1</name>\
        <memory unit='KiB'>3145728</memory><currentMemory unit='KiB'>1048576</currentMemory>\
        <vcpu placement='static' current='2'>4</vcpu>\
        <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type><boot dev='hd'/></os>\
        <devices><disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>\
        <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>\
        <disk type='block' device='disk'><target dev='vdb' bus='virtio'/><boot order='1'/>\
        </disk></devices></domain>";

    #[test]
    fn a_libvirt_point_boots_its_definition() {
        let p = point(&["vda", "vdb"], libvirt(DOMAIN));
        let want = BootPlan {
            memory_mib: 3072,
            cpus: 2,
            machine: Machine::Q35,
            disk_order: vec!["vdb".into(), "vda".into()],
        };
        assert_eq!(plan(&p, 4096).unwrap(), want);
        // The backup host's limit still holds.
        assert_eq!(plan(&p, 1024).unwrap().memory_mib, 1024);
    }

    #[test]
    fn a_qemu_point_and_missing_figures_keep_the_defaults() {
        let qemu = serde_json::json!({"source": "qemu", "memory_bytes": 1u64 << 31, "cpus": 3});
        let p = point(&["vdb", "vda"], qemu);
        let got = plan(&p, 4096).unwrap();
        assert_eq!(
            (got.memory_mib, got.cpus, got.machine),
            (2048, 3, Machine::Pc)
        );
        assert_eq!(got.disk_order, ["vdb", "vda"]);
        let bare = "<domain><name>lv1</name><devices>\
                    <disk><target dev='vda'/></disk></devices></domain>";
        // vdb is not in the definition: it still boots, after the disks it lists.
        let got = plan(&point(&["vdb", "vda"], libvirt(bare)), 4096).unwrap();
        assert_eq!(
            (got.memory_mib, got.cpus, got.machine),
            (256, 1, Machine::Pc)
        );
        assert_eq!(got.disk_order, ["vda", "vdb"]);
    }

    #[test]
    fn uefi_and_garbage_are_refused_with_a_reason() {
        let uefi = DOMAIN.replace("<os>", "<os firmware='efi'>");
        let err = plan(&point(&["vda"], libvirt(&uefi)), 4096).unwrap_err();
        assert!(matches!(err, PlanError::Uefi), "{err:?}");
        assert_eq!(
            err.reason(),
            "UEFI firmware in the captured domain is not supported by drills yet"
        );
        let err = plan(&point(&["vda"], libvirt("<domain><name>")), 4096).unwrap_err();
        assert!(
            matches!(err, PlanError::Domain(DomainXmlError::Parse(_))),
            "{err:?}"
        );
        let reason = err.reason();
        assert!(
            reason.starts_with("the captured domain XML does not parse: "),
            "{reason}"
        );
    }
}
