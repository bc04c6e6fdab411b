//! The libvirt domain definition `restore --all` writes: the XML a point captured, rewritten
//! into a new domain (new name, no UUID) that boots the restored images, for `virsh define`.
//!
//! How it is written: roxmltree parses the captured text once, the rewrite is a list of edits
//! over byte ranges of that text (an element or attribute replaced, an element removed with its
//! line, a piece inserted), and they are applied in one pass. What the rules do not touch stays
//! byte for byte as captured: namespaced extensions (`xmlns:qemu`, `<qemu:commandline>`,
//! `<qemu:override>`), comments, attribute order and quoting, indentation, so a diff of the two
//! files shows exactly the rewrite. A tree writer (xmltree, quick-xml's events) would
//! re-serialise the whole document and re-home namespace prefixes, and would be a new dependency
//! for a handful of edits. Every piece of text inserted here is escaped here, and the result is
//! parsed again before it is returned.
//!
//! The rules ([`rewrite`]):
//! - `<domain id='N'>`: the runtime id is removed.
//! - `<name>`: the new name. `<uuid>`: removed (libvirt makes a new one at define). `<genid>`:
//!   emptied (libvirt makes a new VM generation ID). `<sysinfo>`'s `<entry name='uuid'>`:
//!   removed, or libvirt would give the clone the original's UUID from it.
//! - A `<disk>` (device `disk`, the default) whose `<target dev>` is a restored disk becomes
//!   `type='file'` with `<source file='IMAGE'/>` (absolute; the captured source goes with its
//!   index, seclabels and encryption), `<driver type>` the restored format (a
//!   `<driver name='qemu' .../>` added if it had none), and one empty `<backingStore/>` in place
//!   of any captured ones (libvirt honours a captured chain and would open the restored image on
//!   top of the old base; the restored image stands alone). `<mirror>` (a block job's runtime
//!   state), `<encryption>` and `<auth>` are removed: the image holds what the guest saw, in
//!   clear, in a local file. Everything else of the disk (target, bus, address, boot order,
//!   cache, serial, alias) stays.
//! - Every other `<disk>` (CD-ROMs, floppies, LUNs, anything not in the point) is removed: the
//!   restore has no image for it.
//! - `<interface>` elements are removed; with `keep_network` they stay without `<mac>` (libvirt
//!   makes a new address, so the clone does not clash with the original) and `<target>` (the
//!   original's host tap device).

mod edits;

use edits::Edits;
use std::collections::BTreeMap;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DomainXmlError {
    /// The point's configuration names libvirt but carries no domain XML.
    #[error("the point's libvirt configuration has no domain_xml")]
    NoXml,
    /// The captured text is not well-formed XML.
    #[error("the captured domain XML does not parse")]
    Parse(#[source] roxmltree::Error),
    /// The captured document is not a `<domain>`.
    #[error("the captured XML is not a <domain> definition (root <{0}>)")]
    NotDomain(String),
    /// The captured `<domain>` has no `<name>`.
    #[error("the captured domain XML has no <name>")]
    NoName,
    /// libvirt refuses empty names and names with a slash.
    #[error("invalid domain name {0:?}: libvirt needs a non-empty name without '/'")]
    BadName(String),
    /// A restored disk has no `<disk device='disk'>` with its target in the captured XML.
    #[error("restored disk {0} has no <disk> with <target dev='{0}'> in the captured domain XML")]
    UnknownDisk(String),
    /// libvirt's XML is text: an image path must be UTF-8.
    #[error("the restored image path {0:?} is not UTF-8")]
    Path(PathBuf),
    /// Two edits touch the same bytes (a bug in the rules, never the input's fault).
    #[error("internal error: overlapping edits at byte {0} of the domain XML")]
    Overlap(usize),
    /// The rewritten text does not parse (a bug in the rules, never the input's fault).
    #[error("internal error: the rewritten domain XML does not parse")]
    Rewritten(#[source] roxmltree::Error),
}

/// An image format libvirt boots (`<driver type>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverType {
    Raw,
    Qcow2,
}

impl DriverType {
    /// The driver type of a `restore --format`, or `None` for the formats libvirt does not
    /// boot as they are (vmdk, vhdx: convert them, or restore as raw or qcow2).
    pub fn for_restore(format: &str) -> Option<DriverType> {
        match format {
            "raw" => Some(DriverType::Raw),
            "qcow2" => Some(DriverType::Qcow2),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            DriverType::Raw => "raw",
            DriverType::Qcow2 => "qcow2",
        }
    }
}

/// One restored disk: the Rewind disk name is the domain's target (`vda`, `sdb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    pub target: String,
    /// Absolute path of the restored image.
    pub image: PathBuf,
    pub format: DriverType,
}

/// What the new domain is.
#[derive(Debug, Clone)]
pub struct NewDomain<'a> {
    /// Its name; `None` for `<original>-restored-<point>`.
    pub name: Option<&'a str>,
    /// The point restored (for the default name).
    pub point: i64,
    pub disks: &'a [RestoredDisk],
    /// Keep `<interface>` elements (without their MAC addresses).
    pub keep_network: bool,
}

/// The rewritten definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The new domain's name (for `virsh start`).
    pub name: String,
    pub xml: String,
}

/// The domain XML of a point's configuration: `None` when the VM is not a libvirt domain.
pub fn captured(config: &serde_json::Value) -> Result<Option<&str>, DomainXmlError> {
    if config["source"] != "libvirt" {
        return Ok(None);
    }
    config["domain_xml"]
        .as_str()
        .map(Some)
        .ok_or(DomainXmlError::NoXml)
}

/// Applies the module's rules to a captured domain XML.
pub fn rewrite(captured: &str, new: &NewDomain) -> Result<Rewritten, DomainXmlError> {
    let doc = roxmltree::Document::parse(captured).map_err(DomainXmlError::Parse)?;
    let root = doc.root_element();
    if !is(root, "domain") {
        return Err(DomainXmlError::NotDomain(root.tag_name().name().to_owned()));
    }
    let mut edits = Edits::new(captured);
    let mut restored: BTreeMap<&str, &RestoredDisk> =
        new.disks.iter().map(|d| (d.target.as_str(), d)).collect();

    if let Some(id) = root.attribute_node("id") {
        edits.remove_attribute(id);
    }
    let name_node = children(root, "name")
        .next()
        .ok_or(DomainXmlError::NoName)?;
    let original = name_node.text().unwrap_or("").trim();
    let name = match new.name {
        Some(n) => n.to_owned(),
        None => format!("{original}-restored-{}", new.point),
    };
    if name.is_empty() || name.contains('/') {
        return Err(DomainXmlError::BadName(name));
    }
    edits.replace(name_node.range(), format!("<name>{}</name>", escape(&name)));
    for uuid in children(root, "uuid") {
        edits.remove_line(uuid);
    }
    for genid in children(root, "genid") {
        edits.replace(genid.range(), "<genid/>".to_owned());
    }
    for entry in children(root, "sysinfo")
        .flat_map(|s| children(s, "system"))
        .flat_map(|s| children(s, "entry"))
        .filter(|e| e.attribute("name") == Some("uuid"))
    {
        edits.remove_line(entry);
    }

    for devices in children(root, "devices") {
        for disk in children(devices, "disk") {
            let target = children(disk, "target")
                .next()
                .and_then(|t| t.attribute("dev"));
            let is_disk = disk.attribute("device").unwrap_or("disk") == "disk";
            match target.filter(|_| is_disk).and_then(|t| restored.remove(t)) {
                Some(image) => rewrite_disk(&mut edits, disk, image)?,
                None => edits.remove_line(disk),
            }
        }
        for interface in children(devices, "interface") {
            if new.keep_network {
                for gone in children(interface, "mac").chain(children(interface, "target")) {
                    edits.remove_line(gone);
                }
            } else {
                edits.remove_line(interface);
            }
        }
    }
    if let Some(target) = restored.into_keys().next() {
        return Err(DomainXmlError::UnknownDisk(target.to_owned()));
    }
    let xml = edits.apply()?;
    roxmltree::Document::parse(&xml).map_err(DomainXmlError::Rewritten)?;
    Ok(Rewritten { name, xml })
}

/// Points one captured `<disk>` at its restored image (the disk rules of the module doc).
fn rewrite_disk(
    edits: &mut Edits,
    disk: roxmltree::Node,
    image: &RestoredDisk,
) -> Result<(), DomainXmlError> {
    let path = image
        .image
        .to_str()
        .ok_or_else(|| DomainXmlError::Path(image.image.clone()))?;
    let format = image.format.as_str();
    edits.set_attribute(disk, "type", "file");
    let old_source = children(disk, "source").next();
    // Added elements go on lines of their own when the source has one.
    let join = old_source
        .and_then(|s| edits.indent_of(s))
        .map_or(String::new(), |indent| format!("\n{indent}"));
    let mut source = format!("<source file='{}'/>", escape(path));
    match children(disk, "driver").next() {
        Some(driver) => edits.set_attribute(driver, "type", format),
        None => source = format!("<driver name='qemu' type='{format}'/>{join}{source}"),
    }
    let mut backing = children(disk, "backingStore");
    match backing.next() {
        Some(first) => edits.replace(first.range(), "<backingStore/>".to_owned()),
        None => source = format!("{source}{join}<backingStore/>"),
    }
    for extra in backing {
        edits.remove_line(extra);
    }
    match old_source {
        Some(old) => edits.replace(old.range(), source),
        None => {
            // A restored disk always had a source (the agent read it); place one anyway.
            let at = disk
                .first_child()
                .map_or(disk.range().end, |c| c.range().start);
            edits.insert(at, source);
        }
    }
    for gone in ["mirror", "encryption", "auth"] {
        for node in children(disk, gone) {
            edits.remove_line(node);
        }
    }
    Ok(())
}

/// Whether `node` is the libvirt element `name` (no namespace: `qemu:` elements never match).
pub(crate) fn is(node: roxmltree::Node, name: &str) -> bool {
    node.is_element() && node.tag_name().namespace().is_none() && node.tag_name().name() == name
}

pub(crate) fn children<'a, 'i: 'a>(
    node: roxmltree::Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> + 'a {
    node.children().filter(move |c| is(*c, name))
}

/// Escapes text for an element's content or a quoted attribute value.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running persistent domain's `virsh dumpxml` (live: ids, aliases, index, a backing
    /// chain), with a namespaced override, a CD-ROM, a third disk not in the point, a network
    /// interface, sysinfo carrying the UUID and a generation ID.
    const CAPTURED: &str = r#"<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>0b6b2c1a-5d0e-4e55-9d8c-2f0a3c7e9a11</uuid>
  <genid>2f1c4a2e-1111-2222-3333-444455556666</genid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Example</entry>
      <entry name='uuid'>0b6b2c1a-5d0e-4e55-9d8c-2f0a3c7e9a11</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web1.qcow2' index='3'/>
      <backingStore type='file' index='4'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/debian12-base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/web1-data' index='2'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
      <serial>data-1</serial>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/scratch/web1-tmp.raw'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/debian-12.iso' index='1'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default' portid='5a3f' bridge='virbr0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
  </devices>
  <qemu:override>
    <qemu:device alias='virtio-disk0'>
      <qemu:frontend><qemu:property name='share-rw' type='bool' value='true'/></qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
"#;

    fn restored(format: DriverType) -> Vec<RestoredDisk> {
        vec![
            RestoredDisk {
                target: "vda".into(),
                image: "/restore/web1/vda.qcow2".into(),
                format,
            },
            RestoredDisk {
                target: "vdb".into(),
                image: "/restore/web1/it's & <b>.qcow2".into(),
                format,
            },
        ]
    }

    fn new(disks: &[RestoredDisk], keep_network: bool) -> NewDomain<'_> {
        NewDomain {
            name: None,
            point: 42,
            disks,
            keep_network,
        }
    }

    #[test]
    fn a_captured_domain_becomes_a_clone_on_the_restored_images() {
        let disks = restored(DriverType::Qcow2);
        let out = rewrite(CAPTURED, &new(&disks, false)).unwrap();
        assert_eq!(out.name, "web1-restored-42");
        let want = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1-restored-42</name>
  <genid/>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Example</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='/restore/web1/vda.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source file='/restore/web1/it&apos;s &amp; &lt;b&gt;.qcow2'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
      <serial>data-1</serial>
      <alias name='virtio-disk1'/>
    </disk>
    <serial type='pty'>
      <target port='0'/>
    </serial>
  </devices>
  <qemu:override>
    <qemu:device alias='virtio-disk0'>
      <qemu:frontend><qemu:property name='share-rw' type='bool' value='true'/></qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
"#;
        assert_eq!(out.xml, want);
        // A peer reading: the escaped path is the path.
        let doc = roxmltree::Document::parse(&out.xml).unwrap();
        let sources: Vec<_> = doc
            .descendants()
            .filter(|n| is(*n, "source"))
            .filter_map(|n| n.attribute("file"))
            .collect();
        assert_eq!(
            sources,
            ["/restore/web1/vda.qcow2", "/restore/web1/it's & <b>.qcow2"]
        );
    }

    #[test]
    fn keep_network_keeps_interfaces_without_their_mac_and_tap() {
        let disks = restored(DriverType::Raw);
        let out = rewrite(
            CAPTURED,
            &NewDomain {
                name: Some("web1-test"),
                ..new(&disks, true)
            },
        )
        .unwrap();
        assert_eq!(out.name, "web1-test");
        assert!(out.xml.contains("<name>web1-test</name>"));
        assert!(out.xml.contains(
            "    <interface type='network'>\n      \
             <source network='default' portid='5a3f' bridge='virbr0'/>\n      \
             <model type='virtio'/>\n      <alias name='net0'/>\n    </interface>\n"
        ));
        assert!(!out.xml.contains("<mac"));
        assert!(!out.xml.contains("vnet3"));
        assert_eq!(out.xml.matches("type='raw'").count(), 2);
        assert!(!out.xml.contains("type='qcow2'"), "every driver is raw now");
    }

    #[test]
    fn added_elements_follow_the_source_lines_indentation() {
        let xml = "<domain>\n  <name>i</name>\n  <devices>\n    <disk type='file'>\n      \
                   <source file='/a.qcow2'/>\n      <target dev='vda'/>\n    </disk>\n  \
                   </devices>\n</domain>\n";
        let disks = [RestoredDisk {
            target: "vda".into(),
            image: "/r/vda.qcow2".into(),
            format: DriverType::Qcow2,
        }];
        let out = rewrite(xml, &new(&disks, false)).unwrap();
        assert_eq!(
            out.xml,
            "<domain>\n  <name>i-restored-42</name>\n  <devices>\n    <disk type='file'>\n      \
             <driver name='qemu' type='qcow2'/>\n      <source file='/r/vda.qcow2'/>\n      \
             <backingStore/>\n      <target dev='vda'/>\n    </disk>\n  </devices>\n\
             </domain>\n"
        );
    }

    #[test]
    fn a_minimal_disk_gets_a_driver_a_type_and_an_empty_backing_store() {
        let xml = "<domain type='qemu'><name>m</name><devices>\
                   <disk><source file='/a.img'/><target dev='sda' bus='scsi'/></disk>\
                   </devices></domain>";
        let disks = [RestoredDisk {
            target: "sda".into(),
            image: "/r/sda.raw".into(),
            format: DriverType::Raw,
        }];
        let out = rewrite(xml, &new(&disks, false)).unwrap();
        assert_eq!(
            out.xml,
            "<domain type='qemu'><name>m-restored-42</name><devices>\
             <disk type='file'><driver name='qemu' type='raw'/><source file='/r/sda.raw'/>\
             <backingStore/><target dev='sda' bus='scsi'/></disk></devices></domain>"
        );
    }

    /// Whether an error is the one a case expects.
    type Expect = fn(&DomainXmlError) -> bool;

    #[test]
    fn bad_input_is_a_typed_error() {
        let disks = restored(DriverType::Qcow2);
        let cases: [(&str, Expect); 4] = [
            ("<domain><name>x</name", |e| {
                matches!(e, DomainXmlError::Parse(_))
            }),
            (
                "<network><name>x</name></network>",
                |e| matches!(e, DomainXmlError::NotDomain(n) if n == "network"),
            ),
            ("<domain><devices/></domain>", |e| {
                matches!(e, DomainXmlError::NoName)
            }),
            (
                "<domain><name>x</name><devices><disk device='cdrom'>\
                 <target dev='vda'/></disk></devices></domain>",
                |e| matches!(e, DomainXmlError::UnknownDisk(d) if d == "vda"),
            ),
        ];
        for (xml, want) in cases {
            let err = rewrite(xml, &new(&disks, false)).unwrap_err();
            assert!(want(&err), "{xml}: {err:?}");
        }
        let err = rewrite(
            CAPTURED,
            &NewDomain {
                name: Some("a/b"),
                ..new(&disks, false)
            },
        )
        .unwrap_err();
        assert!(matches!(err, DomainXmlError::BadName(_)), "{err:?}");
    }

    #[test]
    fn only_libvirt_configurations_carry_a_domain_xml() {
        let qemu = serde_json::json!({"source": "qemu", "name": "x"});
        assert_eq!(captured(&qemu).unwrap(), None);
        let lv = serde_json::json!({"source": "libvirt", "domain_xml": "<domain/>"});
        assert_eq!(captured(&lv).unwrap(), Some("<domain/>"));
        let broken = serde_json::json!({"source": "libvirt", "domain_xml": 3});
        assert!(matches!(captured(&broken), Err(DomainXmlError::NoXml)));
        assert_eq!(DriverType::for_restore("vmdk"), None);
        assert_eq!(DriverType::for_restore("qcow2"), Some(DriverType::Qcow2));
    }
}
