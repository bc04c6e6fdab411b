//! What a boot drill takes from a captured libvirt domain: memory, vCPUs, machine family,
//! firmware and the boot order of its disks, read once from the point's domain XML into typed
//! values.
//!
//! Only what a drill's QEMU honours is read; the rest of the definition (devices, CPU model,
//! NUMA, ...) describes the production host's machine, and a drill boots its own isolated one.
//! A value that is absent or unreadable is `None` and the drill falls back to its defaults (a
//! definition libvirt accepted always has them, so this is for hand-edited or foreign XML), but
//! a document that is not a domain definition is an error: the drill fails saying so instead of
//! booting something that was never captured.

use crate::domain_xml::{self, children, is, DomainXmlError};

/// The machine family QEMU starts (`-machine`). The version in libvirt's machine type
/// (`pc-q35-7.2`, `pc-i440fx-8.2`) belongs to the production host's QEMU and may not exist on
/// this one; the family is what the guest's drivers depend on (q35: PCIe, AHCI; pc: i440FX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    Pc,
    Q35,
}

impl Machine {
    /// QEMU's name of the family, as `-machine` takes it and the drill report shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
        }
    }
}

/// The firmware the guest boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's default BIOS (SeaBIOS).
    Bios,
    /// UEFI: `<os firmware='efi'>`, or a `<loader>` (see [`parse`]).
    Uefi,
}

/// What a drill boots of a domain definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// `<memory>` in bytes: the most the guest has, which its kernel sized itself for at boot
    /// (`<currentMemory>` is a balloon target, which a drill has no balloon for).
    pub memory_bytes: Option<u64>,
    /// The vCPUs online at boot: `<vcpu current='M'>`, else the `<vcpu>` count.
    pub vcpus: Option<u64>,
    pub machine: Machine,
    pub firmware: Firmware,
    /// The `<target dev>` of each `<disk device='disk'>`, in boot order: disks with
    /// `<boot order='N'/>` by N, then the others in definition order (the order in which
    /// `<os><boot dev='hd'/>` tries them).
    pub boot_order: Vec<String>,
}

/// The spec of a point's captured configuration: `None` when the VM is not a libvirt domain.
pub fn of_config(config: &serde_json::Value) -> Result<Option<DomainSpec>, DomainXmlError> {
    domain_xml::captured(config)?.map(parse).transpose()
}

/// Reads a domain definition. A `<loader>` counts as UEFI (in practice it is OVMF's pflash)
/// unless it is a `type='rom'` whose path names no UEFI build (a custom SeaBIOS, which a drill
/// may replace with QEMU's own).
pub fn parse(xml: &str) -> Result<DomainSpec, DomainXmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(DomainXmlError::Parse)?;
    let root = doc.root_element();
    if !is(root, "domain") {
        return Err(DomainXmlError::NotDomain(root.tag_name().name().to_owned()));
    }
    let memory_bytes = children(root, "memory")
        .next()
        .and_then(|m| {
            let value = m.text()?.trim().parse::<u64>().ok()?;
            value.checked_mul(unit_scale(m.attribute("unit").unwrap_or(""))?)
        })
        .filter(|&bytes| bytes > 0);
    let vcpus = children(root, "vcpu").next().and_then(|v| {
        v.attribute("current")
            .and_then(count)
            .or_else(|| v.text().and_then(count))
    });
    let os = children(root, "os").next();
    let machine = os
        .and_then(|os| children(os, "type").next())
        .and_then(|t| t.attribute("machine"))
        .map_or(Machine::Pc, |m| {
            if m.contains("q35") {
                Machine::Q35
            } else {
                Machine::Pc
            }
        });
    let firmware = if os.is_some_and(is_uefi) {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    Ok(DomainSpec {
        memory_bytes,
        vcpus,
        machine,
        firmware,
        boot_order: boot_order(root),
    })
}

/// A positive count (vCPUs, a boot order).
fn count(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|&n| n > 0)
}

/// Bytes per unit of libvirt's scaled integers (its `virScaleInteger`, case-insensitive):
/// none is KiB (the default of `<memory>`); `b`, `byte` and `bytes` are 1; a letter of
/// k m g t p e alone or with `iB` is a power of 1024, with `B` a power of 1000.
fn unit_scale(unit: &str) -> Option<u64> {
    let unit = unit.trim().to_ascii_lowercase();
    if unit.is_empty() {
        return Some(1024);
    }
    if matches!(unit.as_str(), "b" | "byte" | "bytes") {
        return Some(1);
    }
    let mut chars = unit.chars();
    let power = match chars.next()? {
        'k' => 1,
        'm' => 2,
        'g' => 3,
        't' => 4,
        'p' => 5,
        'e' => 6,
        _ => return None,
    };
    let base: u64 = match chars.as_str() {
        "" | "ib" => 1024,
        "b" => 1000,
        _ => return None,
    };
    base.checked_pow(power)
}

/// Whether `<os>` boots UEFI (the rule of [`parse`]).
fn is_uefi(os: roxmltree::Node) -> bool {
    if os.attribute("firmware") == Some("efi") {
        return true;
    }
    children(os, "loader").any(|loader| {
        let path = loader.text().unwrap_or("").to_ascii_lowercase();
        let names_uefi = ["ovmf", "edk2", "aavmf", "efi"]
            .iter()
            .any(|w| path.contains(w));
        loader.attribute("type") != Some("rom") || names_uefi
    })
}

/// The disks' targets in boot order (see [`DomainSpec::boot_order`]).
fn boot_order(root: roxmltree::Node) -> Vec<String> {
    let mut disks: Vec<(Option<u64>, usize, String)> = Vec::new();
    for disk in children(root, "devices").flat_map(|d| children(d, "disk")) {
        if disk.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let Some(target) = children(disk, "target")
            .next()
            .and_then(|t| t.attribute("dev"))
        else {
            continue;
        };
        let order = children(disk, "boot")
            .next()
            .and_then(|b| b.attribute("order"))
            .and_then(count);
        disks.push((order, disks.len(), target.to_owned()));
    }
    // Ordered disks first (by their order), then the rest as defined.
    disks.sort_by_key(|(order, at, _)| (order.is_none(), *order, *at));
    disks.into_iter().map(|(_, _, target)| target).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A domain with the given `<memory>` element and nothing else of note.
    fn with_memory(memory: &str) -> DomainSpec {
        parse(&format!(
            "<domain type='kvm'><name>m</name>{memory}</domain>"
        ))
        .unwrap()
    }

    #[test]
    fn memory_honours_libvirts_units() {
        let cases: [(&str, Option<u64>); 12] = [
            ("<memory>1048576</memory>", Some(1 << 30)),
            ("<memory unit='KiB'>307200</memory>", Some(300 << 20)),
            ("<memory unit='k'>2048</memory>", Some(2 << 20)),
            ("<memory unit='GiB'>2</memory>", Some(2 << 30)),
            ("<memory unit='G'>1</memory>", Some(1 << 30)),
            ("<memory unit='MiB'>300</memory>", Some(300 << 20)),
            ("<memory unit='MB'>500</memory>", Some(500_000_000)),
            ("<memory unit='KB'>3</memory>", Some(3000)),
            ("<memory unit='bytes'>536870912</memory>", Some(512 << 20)),
            ("<memory unit='b'>4096</memory>", Some(4096)),
            ("<memory unit='TB'>1</memory>", Some(1_000_000_000_000)),
            ("<memory unit='tib'>1</memory>", Some(1 << 40)),
        ];
        for (xml, want) in cases {
            assert_eq!(with_memory(xml).memory_bytes, want, "{xml}");
        }
    }

    #[test]
    fn unreadable_memory_is_left_to_the_drills_default() {
        for xml in [
            "",
            "<memory unit='furlongs'>3</memory>",
            "<memory unit='KiB'>lots</memory>",
            "<memory unit='KiB'>0</memory>",
            "<memory unit='EiB'>99999</memory>",
            "<memory unit='KiB'/>",
        ] {
            assert_eq!(with_memory(xml).memory_bytes, None, "{xml}");
        }
    }

    #[test]
    fn vcpus_are_the_current_count_when_given() {
        let vcpus = |vcpu: &str| {
            parse(&format!("<domain><name>c</name>{vcpu}</domain>"))
                .unwrap()
                .vcpus
        };
        assert_eq!(vcpus("<vcpu placement='static'>4</vcpu>"), Some(4));
        assert_eq!(
            vcpus("<vcpu placement='static' current='2'>8</vcpu>"),
            Some(2)
        );
        assert_eq!(vcpus("<vcpu current='x'>3</vcpu>"), Some(3));
        assert_eq!(vcpus("<vcpu>0</vcpu>"), None);
        assert_eq!(vcpus(""), None);
    }

    #[test]
    fn the_machine_family_comes_from_the_machine_type() {
        let machine = |os: &str| {
            parse(&format!("<domain><name>q</name>{os}</domain>"))
                .unwrap()
                .machine
        };
        let q35 = "<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>";
        assert_eq!(machine(q35), Machine::Q35);
        assert_eq!(
            machine("<os><type machine='q35'>hvm</type></os>"),
            Machine::Q35
        );
        let i440fx = "<os><type arch='x86_64' machine='pc-i440fx-8.2'>hvm</type></os>";
        assert_eq!(machine(i440fx), Machine::Pc);
        assert_eq!(machine("<os><type>hvm</type></os>"), Machine::Pc);
        assert_eq!(machine(""), Machine::Pc);
        assert_eq!(Machine::Q35.as_str(), "q35");
    }

    #[test]
    fn uefi_is_recognised() {
        let firmware = |os: &str| {
            parse(&format!("<domain><name>u</name>{os}</domain>"))
                .unwrap()
                .firmware
        };
        let cases = [
            ("<os firmware='efi'><type>hvm</type></os>", Firmware::Uefi),
            (
                "<os><type>hvm</type><loader readonly='yes' type='pflash'>\
                 /usr/share/OVMF/OVMF_CODE_4M.fd</loader></os>",
                Firmware::Uefi,
            ),
            (
                "<os><loader type='rom'>/usr/share/edk2/x64/OVMF.fd</loader></os>",
                Firmware::Uefi,
            ),
            ("<os><loader secure='yes'/></os>", Firmware::Uefi),
            (
                "<os><loader type='rom'>/usr/share/seabios/bios.bin</loader></os>",
                Firmware::Bios,
            ),
            ("<os firmware='bios'><type>hvm</type></os>", Firmware::Bios),
            ("<os><type>hvm</type><boot dev='hd'/></os>", Firmware::Bios),
            ("", Firmware::Bios),
        ];
        for (os, want) in cases {
            assert_eq!(firmware(os), want, "{os}");
        }
    }

    #[test]
    fn disks_boot_by_their_order_then_as_defined() {
        let xml = "<domain><name>b</name><os><boot dev='hd'/></os><devices>\
                   <disk device='disk'><target dev='vda'/></disk>\
                   <disk device='cdrom'><target dev='sda'/><boot order='1'/></disk>\
                   <disk><target dev='vdb'/><boot order='3'/></disk>\
                   <disk type='block'><target dev='vdc'/></disk>\
                   <disk><target dev='vdd'/><boot order='2'/></disk>\
                   <disk><source file='/no/target.img'/></disk>\
                   </devices></domain>";
        assert_eq!(parse(xml).unwrap().boot_order, ["vdd", "vdb", "vda", "vdc"]);
    }

    #[test]
    fn a_libvirt_configuration_gives_its_spec_and_others_none() {
        let xml = "<domain type='qemu'><name>lv1</name><memory unit='KiB'>307200</memory>\
                   <vcpu placement='static'>2</vcpu>\
                   <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>\
                   <devices><disk type='file' device='disk'><target dev='sda' bus='scsi'/>\
                   </disk><disk type='file' device='disk'><target dev='sdb' bus='scsi'/>\
                   <boot order='1'/></disk></devices></domain>";
        let config = serde_json::json!({
            "source": "libvirt", "uri": "qemu:///system", "domain": "lv1", "domain_xml": xml,
        });
        let spec = of_config(&config).unwrap().unwrap();
        assert_eq!(
            spec,
            DomainSpec {
                memory_bytes: Some(300 << 20),
                vcpus: Some(2),
                machine: Machine::Q35,
                firmware: Firmware::Bios,
                boot_order: vec!["sdb".into(), "sda".into()],
            }
        );
        let qemu = serde_json::json!({"source": "qemu", "memory_bytes": 1 << 30, "cpus": 2});
        assert_eq!(of_config(&qemu).unwrap(), None);
    }

    /// Whether an error is the one a case expects.
    type Expect = fn(&DomainXmlError) -> bool;

    #[test]
    fn a_definition_that_does_not_read_is_a_typed_error() {
        let cases: [(serde_json::Value, Expect); 4] = [
            (
                serde_json::json!({"source": "libvirt", "domain_xml": "<domain><memory>"}),
                |e| matches!(e, DomainXmlError::Parse(_)),
            ),
            (
                serde_json::json!({"source": "libvirt", "domain_xml": "not XML at all"}),
                |e| matches!(e, DomainXmlError::Parse(_)),
            ),
            (
                serde_json::json!({"source": "libvirt", "domain_xml": "<network/>"}),
                |e| matches!(e, DomainXmlError::NotDomain(n) if n == "network"),
            ),
            (serde_json::json!({"source": "libvirt"}), |e| {
                matches!(e, DomainXmlError::NoXml)
            }),
        ];
        for (config, want) in cases {
            let err = of_config(&config).unwrap_err();
            assert!(want(&err), "{config}: {err:?}");
        }
    }
}
