//! The protected VMs and the content each point must restore to: raw image files written in
//! place, and a live QEMU VM written through its monitor (`qemu-io`, as a guest writes) with a
//! raw mirror of every write as the reference model.

use crate::plan::{Fill, Shape, Write, BLOCK};
use rand::{RngCore, SeedableRng};
use rewind_tests::disk::{self, Digest};
use rewind_tests::qemu::{Vm, VmDisk};
use serde_json::json;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The content of every disk of a VM at one instant, in disk order.
pub type Snapshot = Vec<Digest>;

pub struct Disk {
    pub name: String,
    /// The image itself (raw VM) or the mirror of every write (live VM): what a restore of a
    /// point taken now must equal.
    pub image: PathBuf,
}

enum Kind {
    Raw,
    Live {
        dir: PathBuf,
        vm: Option<Vm>,
        /// Disks of a killed QEMU, to start it again on.
        disks: Vec<VmDisk>,
    },
}

pub struct Machine {
    pub name: String,
    pub disks: Vec<Disk>,
    kind: Kind,
}

impl Machine {
    pub fn new(work: &Path, index: usize, shape: &Shape) -> Machine {
        if !shape.live {
            let image = work.join(format!("vm{index}-vda.raw"));
            disk::create(&image, shape.disks[0]);
            return Machine {
                name: format!("vm{index}"),
                disks: vec![Disk {
                    name: "vda".into(),
                    image,
                }],
                kind: Kind::Raw,
            };
        }
        let dir = work.join("live0");
        std::fs::create_dir_all(&dir).expect("live VM folder");
        let vm = Vm::create(&dir, &shape.disks);
        let disks = vm
            .disks
            .iter()
            .map(|d| {
                let image = dir.join(format!("mirror-{}.raw", d.id));
                disk::create(&image, d.size);
                Disk {
                    name: d.id.clone(),
                    image,
                }
            })
            .collect();
        Machine {
            name: "live0".into(),
            disks,
            kind: Kind::Live {
                dir,
                vm: Some(vm),
                disks: Vec::new(),
            },
        }
    }

    /// The agent's `--disk` or `--qmp` arguments.
    pub fn target(&self) -> Vec<OsString> {
        match &self.kind {
            Kind::Raw => self
                .disks
                .iter()
                .flat_map(|d| {
                    let mut spec = OsString::from(format!("{}=", d.name));
                    spec.push(&d.image);
                    [OsString::from("--disk"), spec]
                })
                .collect(),
            Kind::Live { dir, .. } => vec!["--qmp".into(), dir.join("agent.qmp").into()],
        }
    }

    /// Applies writes (a live VM must be running) and, for a live VM, flushes them so that a
    /// SIGKILL of QEMU cannot take them back.
    pub fn apply(&mut self, writes: &[Write]) {
        for w in writes {
            let d = &self.disks[w.disk];
            match w.fill {
                Fill::Random(seed) => {
                    let mut buf = vec![0u8; w.len as usize];
                    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut buf);
                    buf[0] |= 1; // never an all-zero block
                    write_at(&d.image, w.offset, &buf);
                }
                Fill::Pattern(p) => write_at(&d.image, w.offset, &vec![p; w.len as usize]),
            }
            if let Kind::Live { vm: Some(vm), .. } = &mut self.kind {
                let Fill::Pattern(p) = w.fill else {
                    unreachable!("live writes are patterns")
                };
                vm.monitor
                    .write(&format!("drive{}", w.disk), p, w.offset, w.len);
            }
        }
        if let Kind::Live { vm: Some(vm), .. } = &mut self.kind {
            for i in 0..self.disks.len() {
                vm.monitor
                    .execute(
                        "human-monitor-command",
                        json!({"command-line": format!("qemu-io drive{i} flush")}),
                    )
                    .expect("flush");
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.disks.iter().map(|d| disk::digest(&d.image)).collect()
    }

    /// Bytes in the disks' non-zero blocks: what a full copy would send uncompressed.
    pub fn full_copy_bytes(&self) -> u64 {
        self.disks.iter().map(|d| nonzero_bytes(&d.image)).sum()
    }

    /// SIGKILL of QEMU (a host crash: the persistent bitmaps come back inconsistent).
    pub fn kill_qemu(&mut self) -> bool {
        match &mut self.kind {
            Kind::Live { vm, disks, .. } => match vm.take() {
                Some(v) => {
                    *disks = v.kill9();
                    true
                }
                None => false,
            },
            Kind::Raw => false,
        }
    }

    /// Starts a killed QEMU again on its disks.
    pub fn ensure_running(&mut self) {
        if let Kind::Live { dir, vm, disks } = &mut self.kind {
            if vm.is_none() {
                *vm = Some(Vm::start(dir, std::mem::take(disks)));
            }
        }
    }
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.write_all_at(data, offset).expect("write image");
    // The agent's first read of a disk bypasses the page cache.
    f.sync_data().expect("sync image");
}

fn nonzero_bytes(path: &Path) -> u64 {
    let f = File::open(path).expect("open image");
    let size = f.metadata().expect("stat image").len();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut total = 0;
    let mut off = 0;
    while off < size {
        let n = BLOCK.min(size - off) as usize;
        f.read_exact_at(&mut buf[..n], off).expect("read image");
        if buf[..n].iter().any(|&b| b != 0) {
            total += n as u64;
        }
        off += BLOCK;
    }
    total
}
