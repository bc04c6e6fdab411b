//! The scale case: a simulated 1 TiB disk (sparse: only what the points change exists) gets
//! one point after another, each changing 16 random blocks, sent by a minimal agent over gRPC
//! The first point writes one block in every group of [`TREE_FANOUT`] (one chunk, deduplicated),
//! as a real disk's first point fills its tree's upper levels: a commit's tree update reads
//! every child of the few upper nodes it changes, so on a disk filling up point by point its
//! cost would grow with the disk's populated regions, not with the history, until they are
//! all there.
//! (Begin, one Upload, Commit with the root kept by an in-memory Merkle tree). At 10, 100,
//! 1000, ... points: the median Begin and commit times of the last 50 points, the catalog's size, and
//! how long a prune of the oldest point takes (the median of seven): the commit and the prune
//! must stay flat as points accumulate, and the catalog grow by a constant amount per point.

use anyhow::{bail, Result};
use rand::{Rng, RngCore, SeedableRng};
use rewind_proto::format::{DiskGeometry, TREE_FANOUT};
use rewind_proto::pb;
use rewind_proto::tree::{self, MemStore, NodeStore, Shape};
use rewind_proto::{chunk, BlockHash};
use rewind_tests::grpc;
use serde::Serialize;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const SIZE: u64 = 1 << 40;
const BLOCK: u64 = 64 * 1024;
const CHANGED: usize = 16;
/// Prunes timed at each mark (the median is shown).
const PRUNES: u64 = 7;

/// Figures at one number of points.
#[derive(Debug, Serialize)]
pub struct Figures {
    pub points: u64,
    pub begin_ms: f64,
    pub commit_ms: f64,
    pub catalog_mb: f64,
    pub prune_ms: f64,
}

/// Bytes of the catalog and its write-ahead log.
fn catalog_bytes(data: &Path) -> u64 {
    ["catalog.sqlite", "catalog.sqlite-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Runs the case against a receiver keeping its packs at `url` (local packs when empty);
/// returns the figures.
pub fn run(
    bins: &Path,
    w: &Path,
    env: &[(&'static str, String)],
    url: &str,
    points: u64,
) -> Result<Vec<Figures>> {
    let data = w.join("data-scale");
    let extra: &[&str] = if url.is_empty() {
        &[]
    } else {
        &["--store", url]
    };
    let (mut rx, addr) = super::serve(bins, env, &data, &w.join("pki"), extra)?;
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(points_loop(bins, w, env, &data, &addr, points));
    super::stop(&mut rx);
    result
}

async fn points_loop(
    bins: &Path,
    w: &Path,
    env: &[(&'static str, String)],
    data: &Path,
    addr: &str,
    points: u64,
) -> Result<Vec<Figures>> {
    let mut c = grpc::as_agent(&format!("https://{addr}"), &w.join("pki"), "bench").await?;
    let geometry = DiskGeometry::new(SIZE, BLOCK)?;
    let shape = Shape::of(&geometry);
    let mut tree = MemStore::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut base = 0u64;
    let mut commits = Vec::new();
    let mut begins = Vec::new();
    let mut out = Vec::new();
    let mut next_mark = 10;
    let mut block = vec![0u8; BLOCK as usize];
    for n in 1..=points {
        let t = Instant::now();
        let begin = c
            .begin(pb::BeginRequest {
                vm: "scale".into(),
                disks: vec![pb::DiskSpec {
                    name: "vda".into(),
                    size: SIZE,
                    block_size: BLOCK as u32,
                }],
                base_point: base,
                resume_session: String::new(),
                keyring: Vec::new(),
                wrapped_keys: Vec::new(),
            })
            .await?
            .into_inner();
        begins.push(t.elapsed().as_secs_f64() * 1e3);
        let mut entries = Vec::with_capacity(CHANGED);
        let mut chunks = Vec::with_capacity(CHANGED);
        if n == 1 {
            rng.fill_bytes(&mut block[..BLOCK as usize / 2]);
            let leaf = BlockHash::of(&block);
            for index in (0..SIZE / BLOCK).step_by(TREE_FANOUT as usize) {
                tree.put(0, index, leaf.into())?;
                entries.push((index, leaf));
            }
            chunks.push((leaf, chunk::compress(&block)?));
        }
        for _ in 0..if n == 1 { 0 } else { CHANGED } {
            let index = rng.random_range(0..SIZE / BLOCK);
            // Half random, half repetitive: compressible like real data.
            rng.fill_bytes(&mut block[..BLOCK as usize / 2]);
            let leaf = BlockHash::of(&block);
            tree.put(0, index, leaf.into())?;
            entries.push((index, leaf));
            chunks.push((leaf, chunk::compress(&block)?));
        }
        grpc::upload(&mut c, grpc::batch(&begin.session, &entries, chunks)).await?;
        let top = tree::update(shape, entries.iter().map(|e| e.0), &mut tree)?;
        let root = tree::root(&geometry, top);
        let t = Instant::now();
        let reply = c
            .commit(pb::CommitRequest {
                session: begin.session.clone(),
                roots: vec![pb::DiskRoot {
                    name: "vda".into(),
                    root: root.0.to_vec(),
                    changed_blocks: entries.len() as u64,
                }],
                config: String::new(),
                consistency: String::new(),
                manifest_mac: Vec::new(),
                taken_us: 0,
            })
            .await?
            .into_inner();
        commits.push(t.elapsed().as_secs_f64() * 1e3);
        base = reply.point;
        if n == next_mark || n == points {
            let commit_ms = median(commits.iter().rev().take(50).copied().collect());
            let begin_ms = median(begins.iter().rev().take(50).copied().collect());
            // Prunes of the oldest point each; the median: now and then a prune takes 20-70 ms
            // at any number of points while serve runs (no lock wait, fsyncs under 2 ms: the
            // cause is not pinned down).
            let mut prunes = Vec::new();
            for k in 1..=PRUNES {
                let t = Instant::now();
                let o = Command::new(bins.join("rewind-receiver"))
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                    .args(["prune", "--vm", "scale", "--keep-last"])
                    .arg(n.saturating_sub(k).max(1).to_string())
                    .arg("--data")
                    .arg(data)
                    .output()?;
                prunes.push(t.elapsed().as_secs_f64() * 1e3);
                if !o.status.success() {
                    bail!("prune failed: {}", String::from_utf8_lossy(&o.stderr));
                }
            }
            let prune_ms = median(prunes);
            out.push(Figures {
                points: n,
                begin_ms,
                commit_ms,
                catalog_mb: catalog_bytes(data) as f64 / 1e6,
                prune_ms,
            });
            eprintln!("  {n} points: commit {commit_ms:.1} ms, prune {prune_ms:.0} ms");
            next_mark *= 10;
        }
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
