//! The XML libvirt speaks: a domain's disks read from its definition, and the checkpoint and
//! pull-mode backup descriptions the agent hands to `virsh backup-begin`.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("libvirt's {what} is not valid XML")]
    Parse {
        what: &'static str,
        source: roxmltree::Error,
    },
    #[error("libvirt's {what} lacks {missing}")]
    Missing {
        what: &'static str,
        missing: &'static str,
    },
}

/// One disk of a domain, as its definition names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// The guest's device name (`vda`, `sdb`): the name the disk gets in Rewind.
    pub target: String,
    /// The image file or block device.
    pub source: PathBuf,
    /// The image format libvirt opens it with (`qcow2`, `raw`).
    pub format: String,
}

impl DomainDisk {
    /// Whether libvirt can keep a checkpoint bitmap in this disk (qcow2 only).
    pub fn has_bitmaps(&self) -> bool {
        self.format == "qcow2"
    }
}

/// What the agent reads of a domain's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: Option<String>,
    pub disks: Vec<DomainDisk>,
}

/// Reads the name, UUID and disks (`device='disk'` with a source) of a domain definition.
/// CD-ROMs, floppies and disks without media are not VM data and are left out.
pub fn parse_domain(xml: &str) -> Result<DomainInfo, XmlError> {
    let what = "domain XML";
    let doc = roxmltree::Document::parse(xml).map_err(|source| XmlError::Parse { what, source })?;
    let root = doc.root_element();
    let child_text = |node: roxmltree::Node, tag: &str| {
        node.children()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
            .map(|t| t.trim().to_owned())
    };
    let name = child_text(root, "name").ok_or(XmlError::Missing {
        what,
        missing: "a name",
    })?;
    let uuid = child_text(root, "uuid");
    let mut disks = Vec::new();
    if let Some(devices) = root.children().find(|n| n.has_tag_name("devices")) {
        for disk in devices.children().filter(|n| n.has_tag_name("disk")) {
            if disk.attribute("device").unwrap_or("disk") != "disk" {
                continue;
            }
            let target = disk
                .children()
                .find(|n| n.has_tag_name("target"))
                .and_then(|t| t.attribute("dev"));
            let source = disk
                .children()
                .find(|n| n.has_tag_name("source"))
                .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")));
            let (Some(target), Some(source)) = (target, source) else {
                continue;
            };
            let format = disk
                .children()
                .find(|n| n.has_tag_name("driver"))
                .and_then(|d| d.attribute("type"))
                .unwrap_or("raw");
            disks.push(DomainDisk {
                target: target.to_owned(),
                source: PathBuf::from(source),
                format: format.to_owned(),
            });
        }
    }
    Ok(DomainInfo { name, uuid, disks })
}

/// A checkpoint as the agent keeps it to redefine it: enough for `checkpoint-create
/// --redefine` (libvirt insists on the creation time), without the parent (only the newest
/// checkpoint of the chain is kept, so it has none to name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub name: String,
    pub creation_time: u64,
    /// Each disk: its name and whether it has a bitmap in this checkpoint.
    pub disks: Vec<(String, bool)>,
}

impl Checkpoint {
    /// Reads `virsh checkpoint-dumpxml --no-domain`.
    pub fn parse(xml: &str) -> Result<Checkpoint, XmlError> {
        let what = "checkpoint XML";
        let doc =
            roxmltree::Document::parse(xml).map_err(|source| XmlError::Parse { what, source })?;
        let root = doc.root_element();
        let text = |tag: &str| {
            root.children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(|t| t.trim().to_owned())
        };
        let name = text("name").ok_or(XmlError::Missing {
            what,
            missing: "a name",
        })?;
        let creation_time =
            text("creationTime")
                .and_then(|t| t.parse().ok())
                .ok_or(XmlError::Missing {
                    what,
                    missing: "a creation time",
                })?;
        let disks = root
            .children()
            .find(|n| n.has_tag_name("disks"))
            .map(|d| {
                d.children()
                    .filter(|n| n.has_tag_name("disk"))
                    .filter_map(|n| {
                        let name = n.attribute("name")?;
                        Some((name.to_owned(), n.attribute("checkpoint") == Some("bitmap")))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Checkpoint {
            name,
            creation_time,
            disks,
        })
    }

    /// The XML to redefine this checkpoint with.
    pub fn to_xml(&self) -> String {
        let mut out = format!(
            "<domaincheckpoint><name>{}</name><creationTime>{}</creationTime><disks>",
            escape(&self.name),
            self.creation_time
        );
        for (disk, bitmap) in &self.disks {
            out.push_str(&format!(
                "<disk name='{}' checkpoint='{}'/>",
                escape(disk),
                if *bitmap { "bitmap" } else { "no" }
            ));
        }
        out.push_str("</disks></domaincheckpoint>");
        out
    }
}

/// The bytes written to each disk since a checkpoint, from `checkpoint-dumpxml --size`
/// (disks whose bitmap is broken have no size and are left out).
pub fn dirty_sizes(xml: &str) -> Result<Vec<(String, u64)>, XmlError> {
    let what = "checkpoint XML";
    let doc = roxmltree::Document::parse(xml).map_err(|source| XmlError::Parse { what, source })?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .filter_map(|n| {
            let size = n.attribute("size")?.parse().ok()?;
            Some((n.attribute("name")?.to_owned(), size))
        })
        .collect())
}

/// The checkpoint a backup job creates: a bitmap in every disk that can hold one.
pub fn new_checkpoint_xml(name: &str, description: &str, disks: &[(String, bool)]) -> String {
    let mut out = format!(
        "<domaincheckpoint><name>{}</name><description>{}</description><disks>",
        escape(name),
        escape(description)
    );
    for (disk, bitmap) in disks {
        out.push_str(&format!(
            "<disk name='{}' checkpoint='{}'/>",
            escape(disk),
            if *bitmap { "bitmap" } else { "no" }
        ));
    }
    out.push_str("</disks></domaincheckpoint>");
    out
}

/// One disk of a pull-mode backup.
#[derive(Debug, Clone)]
pub struct BackupDisk {
    pub target: String,
    /// The checkpoint to export the changes since (None: the whole disk).
    pub since: Option<String>,
    /// Where QEMU keeps the old content of blocks the guest overwrites during the job.
    pub scratch: PathBuf,
}

/// The export name of a disk in a backup job, and the dirty bitmap's name in it.
pub fn export_names(target: &str) -> (String, String) {
    (target.to_owned(), format!("backup-{target}"))
}

/// A pull-mode backup exporting every disk over NBD on a unix socket.
pub fn backup_xml(socket: &Path, disks: &[BackupDisk]) -> String {
    let mut out = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks>",
        escape(&socket.display().to_string())
    );
    for d in disks {
        let (export, bitmap) = export_names(&d.target);
        let mode = match &d.since {
            Some(cp) => format!("backupmode='incremental' incremental='{}'", escape(cp)),
            None => "backupmode='full'".to_owned(),
        };
        out.push_str(&format!(
            "<disk name='{}' backup='yes' type='file' {mode} exportname='{}' exportbitmap='{}'>\
             <scratch file='{}'/></disk>",
            escape(&d.target),
            escape(&export),
            escape(&bitmap),
            escape(&d.scratch.display().to_string()),
        ));
    }
    out.push_str("</disks></domainbackup>");
    out
}

/// Reads the NBD socket of a running backup job from `virsh backup-dumpxml`.
pub fn backup_socket(xml: &str) -> Result<Option<PathBuf>, XmlError> {
    let what = "backup XML";
    let doc = roxmltree::Document::parse(xml).map_err(|source| XmlError::Parse { what, source })?;
    Ok(doc
        .descendants()
        .find(|n| n.has_tag_name("server"))
        .and_then(|s| s.attribute("socket"))
        .map(PathBuf::from))
}

/// Escapes text for an XML attribute or element.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
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

    const DOMAIN: &str = r#"<domain type='qemu'>
  <name>web1</name>
  <uuid>0b7e0b5c-1111-2222-3333-444455556666</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/a.qcow2'/>
      <backingStore type='file'><source file='/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <target dev='vdc' bus='virtio'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn a_domain_lists_its_data_disks_only() {
        let d = parse_domain(DOMAIN).expect("valid");
        assert_eq!(d.name, "web1");
        assert_eq!(
            d.uuid.as_deref(),
            Some("0b7e0b5c-1111-2222-3333-444455556666")
        );
        assert_eq!(
            d.disks,
            vec![
                DomainDisk {
                    target: "vda".into(),
                    source: "/var/lib/libvirt/images/a.qcow2".into(),
                    format: "qcow2".into(),
                },
                DomainDisk {
                    target: "vdb".into(),
                    source: "/dev/vg/data".into(),
                    format: "raw".into(),
                },
            ]
        );
        assert!(d.disks[0].has_bitmaps() && !d.disks[1].has_bitmaps());
        assert!(matches!(
            parse_domain("<domain>"),
            Err(XmlError::Parse { .. })
        ));
        assert!(matches!(
            parse_domain("<domain/>"),
            Err(XmlError::Missing { .. })
        ));
    }

    #[test]
    fn a_checkpoint_round_trips_without_its_parent() {
        let dump = "<domaincheckpoint>\n  <name>rewind-2</name>\n  <description>x</description>\n  \
                    <parent><name>rewind-1</name></parent>\n  <creationTime>1796387661</creationTime>\n  \
                    <disks>\n    <disk name='vda' checkpoint='bitmap' bitmap='rewind-2' size='196608'/>\n    \
                    <disk name='vdb' checkpoint='no'/>\n  </disks>\n</domaincheckpoint>\n";
        let cp = Checkpoint::parse(dump).expect("valid");
        assert_eq!(
            cp,
            Checkpoint {
                name: "rewind-2".into(),
                creation_time: 1796387661,
                disks: vec![("vda".into(), true), ("vdb".into(), false)],
            }
        );
        let xml = cp.to_xml();
        assert!(!xml.contains("parent"));
        assert_eq!(Checkpoint::parse(&xml).expect("valid"), cp);
        assert_eq!(
            dirty_sizes(dump).expect("valid"),
            vec![("vda".into(), 196608)]
        );
        assert!(matches!(
            Checkpoint::parse("<domaincheckpoint><name>a</name></domaincheckpoint>"),
            Err(XmlError::Missing { .. })
        ));
    }

    #[test]
    fn a_backup_names_its_socket_exports_and_bases() {
        let xml = backup_xml(
            Path::new("/state/vm/nbd.sock"),
            &[
                BackupDisk {
                    target: "vda".into(),
                    since: Some("rewind-1".into()),
                    scratch: "/state/vm/vda.scratch".into(),
                },
                BackupDisk {
                    target: "vdb".into(),
                    since: None,
                    scratch: "/state/vm/vdb.scratch".into(),
                },
            ],
        );
        let doc = roxmltree::Document::parse(&xml).expect("well-formed");
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .collect();
        assert_eq!(disks[0].attribute("incremental"), Some("rewind-1"));
        assert_eq!(disks[0].attribute("exportbitmap"), Some("backup-vda"));
        assert_eq!(disks[1].attribute("backupmode"), Some("full"));
        assert_eq!(
            backup_socket(&xml).expect("valid"),
            Some(PathBuf::from("/state/vm/nbd.sock"))
        );
        assert_eq!(escape("a'<&>\""), "a&apos;&lt;&amp;&gt;&quot;");
    }
}
