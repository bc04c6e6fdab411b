//! The seeded schedule: what each round writes and which faults strike when. A pure function
//! of (seed, round, the VMs' shapes), so a failing seed replays the same schedule; nothing the
//! run observes feeds back into it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

pub const BLOCK: u64 = 64 * 1024;
pub const MIB: u64 = 1 << 20;
/// The VM whose points `prune` may remove (the others keep every point).
pub const PRUNE_VM: usize = 0;
/// Points of the prune target that `prune --keep-last` keeps (locked ones stay too).
pub const KEEP_LAST: usize = 3;

/// A VM as the schedule sees it: raw image files or a live QEMU VM, and its disk sizes.
#[derive(Debug, Clone)]
pub struct Shape {
    pub live: bool,
    pub disks: Vec<u64>,
}

/// One write to one disk of a VM.
#[derive(Debug, Clone, Copy)]
pub struct Write {
    pub disk: usize,
    pub offset: u64,
    pub len: u64,
    pub fill: Fill,
}

/// What a write puts on the disk.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// Incompressible bytes from this seed (raw disks).
    Random(u64),
    /// Every byte this value (live disks, through `qemu-io write -P`); 0 writes zeros.
    Pattern(u8),
}

/// One VM's part of a round.
#[derive(Debug, Clone, Default)]
pub struct VmPlan {
    /// Written before the round's syncs start.
    pub writes: Vec<Write>,
    /// `--bwlimit` (MB/s) of the round's first sync, so that kills land mid-upload.
    pub bwlimit: Option<u32>,
    /// SIGKILL of the agent during the round's first sync.
    pub kill_agent: Option<Trigger>,
    /// Written while the agent is down, if the round's first sync failed (the VM runs on).
    pub outage_writes: Vec<Write>,
    /// SIGKILL of QEMU (live VM only).
    pub kill_qemu: Option<Duration>,
}

/// When a kill strikes.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// This long after the round's syncs started.
    At(Duration),
    /// Once this many bytes went up the link of this VM in the round (or when its sync ends
    /// before that): lands mid-upload whatever the speed of the build.
    Uploaded(usize, u64),
}

/// A fault on the agents' links.
#[derive(Debug, Clone, Copy)]
pub enum LinkFault {
    /// Every open connection reset.
    Cut,
    /// Connections reset and new ones refused for this long.
    Down(Duration),
    /// Every byte held for this long.
    Stall(Duration),
    /// At most this many bytes a second, for this long.
    Trickle(u64, Duration),
}

impl LinkFault {
    pub fn name(&self) -> &'static str {
        match self {
            LinkFault::Cut => "cut",
            LinkFault::Down(_) => "down",
            LinkFault::Stall(_) => "stall",
            LinkFault::Trickle(..) => "trickle",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LinkEvent {
    pub at: Duration,
    /// The link of this VM, or every link.
    pub link: Option<usize>,
    pub fault: LinkFault,
}

/// A `gc` or `prune` run during the syncs, and its SIGKILL.
#[derive(Debug, Clone, Copy)]
pub struct Offline {
    pub start: Duration,
    pub kill_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
pub struct ReceiverKill {
    pub when: Trigger,
    /// How long the receiver stays dead before it is started again.
    pub down_for: Duration,
}

/// Everything one round does.
#[derive(Debug, Clone)]
pub struct RoundPlan {
    pub vms: Vec<VmPlan>,
    pub receiver: Option<ReceiverKill>,
    pub links: Vec<LinkEvent>,
    pub gc: Option<Offline>,
    pub prune: Option<Offline>,
    /// Lock a point of the prune target after the round: this fraction picks which listed one.
    pub lock: Option<f64>,
    /// Seeds the choice of older points the round's check restores.
    pub sample_seed: u64,
}

/// The seed of one stream of the schedule: a SplitMix64 step over the run's seed, the round and
/// the stream, so that neighbouring seeds and rounds give unrelated streams.
pub fn stream(seed: u64, round: u64, which: u64) -> StdRng {
    let mut z = seed
        ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ which.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// The VMs of a run: `raw` raw VMs of one 32-64 MiB disk each, then the live VM (two qcow2
/// disks) if asked for.
pub fn shapes(seed: u64, raw: usize, live: bool) -> Vec<Shape> {
    let mut rng = stream(seed, u64::MAX, 0);
    let mut out: Vec<Shape> = (0..raw)
        .map(|_| Shape {
            live: false,
            disks: vec![rng.random_range(8..=16u64) * 4 * MIB],
        })
        .collect();
    if live {
        out.push(Shape {
            live: true,
            disks: vec![32 * MIB, 16 * MIB],
        });
    }
    out
}

/// A delay between `lo_ms` and `hi_ms`, uniform in its logarithm: short and long delays are
/// equally likely per decade, so kills land in short and long phases alike.
fn delay(rng: &mut StdRng, lo_ms: f64, hi_ms: f64) -> Duration {
    Duration::from_secs_f64(log_uniform(rng, lo_ms, hi_ms) / 1000.0)
}

fn log_uniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    rng.random_range(lo.ln()..hi.ln()).exp()
}

/// Half the kills strike at an instant, half at a point of an upload: from the first batch
/// (16 KiB: the handshake and the session's start) to well past most uploads (12 MiB).
fn trigger(rng: &mut StdRng, link: usize, hi_ms: f64) -> Trigger {
    if rng.random_bool(0.5) {
        Trigger::At(delay(rng, 5.0, hi_ms))
    } else {
        Trigger::Uploaded(
            link,
            log_uniform(rng, 16.0 * 1024.0, 12.0 * MIB as f64) as u64,
        )
    }
}

/// The round's plan.
pub fn round(seed: u64, round: u64, shapes: &[Shape]) -> RoundPlan {
    let mut rng = stream(seed, round, 1);
    let vms = shapes
        .iter()
        .enumerate()
        .map(|(vm, s)| {
            let writes = if round == 0 {
                seed_writes(&mut rng, s)
            } else {
                change_writes(&mut rng, s)
            };
            let bwlimit = rng.random_bool(0.6).then(|| rng.random_range(2..=8));
            let kill_agent = rng.random_bool(0.35).then(|| trigger(&mut rng, vm, 3000.0));
            let outage = rng.random_bool(0.4);
            let n = rng.random_range(1..=4);
            let outage_writes = (0..n)
                .map(|_| block_write(&mut rng, s))
                .filter(|_| outage)
                .collect();
            let kill_qemu = (s.live && rng.random_bool(0.1)).then(|| delay(&mut rng, 5.0, 1500.0));
            VmPlan {
                writes,
                bwlimit,
                kill_agent,
                outage_writes,
                kill_qemu,
            }
        })
        .collect();
    let receiver = rng.random_bool(0.3).then(|| ReceiverKill {
        when: {
            let link = rng.random_range(0..shapes.len());
            trigger(&mut rng, link, 1200.0)
        },
        down_for: Duration::from_millis(rng.random_range(0..500)),
    });
    let n_links = rng.random_range(0..=2);
    let links = (0..n_links)
        .map(|_| {
            let at = delay(&mut rng, 5.0, 2000.0);
            let link = (!rng.random_bool(0.25)).then(|| rng.random_range(0..shapes.len()));
            let p: f64 = rng.random();
            let lasting = Duration::from_millis(rng.random_range(100..1500));
            let fault = if p < 0.55 {
                LinkFault::Cut
            } else if p < 0.7 {
                LinkFault::Down(lasting)
            } else if p < 0.85 {
                LinkFault::Stall(lasting)
            } else {
                LinkFault::Trickle(rng.random_range(64 * 1024..1024 * 1024), lasting)
            };
            LinkEvent { at, link, fault }
        })
        .collect();
    let gc = offline(&mut rng);
    // The prune target exists once its first point is committed.
    let prune = offline(&mut rng).filter(|_| round > 0);
    let lock = rng.random_bool(0.12).then(|| rng.random());
    RoundPlan {
        vms,
        receiver,
        links,
        gc,
        prune,
        lock,
        sample_seed: rng.random(),
    }
}

/// A gc or prune run: most rounds have one, most of them are killed early in their run (both
/// take tens of milliseconds on these stores).
fn offline(rng: &mut StdRng) -> Option<Offline> {
    rng.random_bool(0.6).then(|| Offline {
        start: Duration::from_millis(rng.random_range(0..400)),
        kill_after: rng.random_bool(0.8).then(|| delay(rng, 1.0, 40.0)),
    })
}

/// First content: three or four runs of 2-6 MiB per disk (a quarter of a raw disk or so).
fn seed_writes(rng: &mut StdRng, s: &Shape) -> Vec<Write> {
    let mut out = Vec::new();
    for (disk, &size) in s.disks.iter().enumerate() {
        for _ in 0..rng.random_range(3..=4) {
            let len = rng.random_range(2..=6) * MIB;
            out.push(Write {
                disk,
                offset: rng.random_range(0..(size - len) / BLOCK) * BLOCK,
                len,
                fill: fill(rng, s),
            });
        }
    }
    out
}

/// A round's changes: scattered blocks, often a run of up to 16 MiB (the agent sends its first
/// 4 MiB batch at once and paces the rest by `--bwlimit`), writes smaller than a block, and
/// blocks that become zero again.
fn change_writes(rng: &mut StdRng, s: &Shape) -> Vec<Write> {
    let mut out: Vec<Write> = (0..rng.random_range(1..=8))
        .map(|_| block_write(rng, s))
        .collect();
    let disk = rng.random_range(0..s.disks.len());
    let size = s.disks[disk];
    if rng.random_bool(0.5) {
        let len = (rng.random_range(2..=16) * MIB).min(size / 2);
        out.push(Write {
            disk,
            offset: rng.random_range(0..(size - len) / BLOCK) * BLOCK,
            len,
            fill: fill(rng, s),
        });
    }
    if rng.random_bool(0.3) {
        for _ in 0..rng.random_range(1..=3) {
            out.push(Write {
                disk,
                offset: rng.random_range(0..size / 4096) * 4096,
                len: 4096,
                fill: fill(rng, s),
            });
        }
    }
    if rng.random_bool(0.2) {
        let len = rng.random_range(1..=4) * BLOCK;
        out.push(Write {
            disk,
            offset: rng.random_range(0..(size - len) / BLOCK) * BLOCK,
            len,
            fill: Fill::Pattern(0),
        });
    }
    out
}

fn block_write(rng: &mut StdRng, s: &Shape) -> Write {
    let disk = rng.random_range(0..s.disks.len());
    Write {
        disk,
        offset: rng.random_range(0..s.disks[disk] / BLOCK) * BLOCK,
        len: BLOCK,
        fill: fill(rng, s),
    }
}

fn fill(rng: &mut StdRng, s: &Shape) -> Fill {
    if s.live {
        Fill::Pattern(rng.random_range(1..=255))
    } else {
        Fill::Random(rng.random())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule_every_time() {
        let s = shapes(42, 3, true);
        let a = format!("{:?}", round(42, 7, &s));
        let b = format!("{:?}", round(42, 7, &shapes(42, 3, true)));
        assert_eq!(a, b);
        assert_ne!(a, format!("{:?}", round(43, 7, &s)));
        assert_ne!(a, format!("{:?}", round(42, 8, &s)));
    }

    #[test]
    fn writes_stay_inside_their_disk() {
        let s = shapes(5, 4, true);
        for r in 0..2000 {
            for (vm, p) in round(5, r, &s).vms.iter().enumerate() {
                for w in p.writes.iter().chain(&p.outage_writes) {
                    assert!(w.offset + w.len <= s[vm].disks[w.disk], "{w:?}");
                }
            }
        }
    }
}
