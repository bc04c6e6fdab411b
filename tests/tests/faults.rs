//! Crashes at the receiver's fault points (`REWIND_FAULT=NAME`): each test runs the real binary
//! until it SIGKILLs itself at one point, then restarts normally and checks that every listed
//! point restores bit-exact, that verify finds no bad chunk, and that running the interrupted
//! work again finishes it (a sync sends only the chunks the store lacks; prune and gc reach the
//! state an uninterrupted run gives; a restore writes the whole image).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, disk, disk_of, run, wait_until, Deployment, Receiver};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;
/// Longest a process is given to reach its fault point, or to stop when asked.
const EXIT_WAIT: Duration = Duration::from_secs(15);

/// One VM's disk and the content digest each of its points must restore to.
struct Taken {
    vm: &'static str,
    disk: PathBuf,
    /// Extra `sync` flags (a block size) used for every point.
    flags: &'static [&'static str],
    digests: BTreeMap<u64, disk::Digest>,
}

impl Taken {
    fn new(d: &Deployment, vm: &'static str, size: u64) -> Taken {
        let disk = d.path(&format!("{vm}.raw"));
        disk::create(&disk, size);
        Taken {
            vm,
            disk,
            flags: &[],
            digests: BTreeMap::new(),
        }
    }

    fn sync_cmd(&self, d: &Deployment, rx: &Receiver, extra: &[&str]) -> Command {
        let mut flags = self.flags.to_vec();
        flags.extend_from_slice(extra);
        d.sync_cmd(rx, "host1", self.vm, &[("vda", &self.disk)], &flags)
    }

    /// A sync that must fail (its receiver dies under it).
    fn sync_failing(&self, d: &Deployment, rx: &Receiver) -> Output {
        run(&mut self.sync_cmd(d, rx, &[]))
    }

    /// A sync that must succeed; records the disk's digest for its point and returns the report.
    fn sync(&mut self, d: &Deployment, rx: &Receiver) -> Value {
        let out = run(&mut self.sync_cmd(d, rx, &[]));
        assert!(
            out.status.success(),
            "sync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        self.digests
            .insert(r["point"].as_u64().unwrap(), disk::digest(&self.disk));
        r
    }

    fn ids(&self) -> Vec<u64> {
        self.digests.keys().copied().collect()
    }

    /// Every listed point is one taken here and restores to the content it was taken from.
    /// Returns the listed ids.
    fn assert_listed_restore(&self, d: &Deployment) -> Vec<u64> {
        let listed: Vec<u64> = d
            .points(self.vm)
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect();
        for id in &listed {
            let want = self
                .digests
                .get(id)
                .unwrap_or_else(|| panic!("point {id} is listed but was never committed"));
            assert_eq!(
                &d.restored_digest(self.vm, "vda", *id),
                want,
                "point {id} of {} does not restore bit-exact",
                self.vm
            );
        }
        listed
    }
}

/// `serve` that SIGKILLs itself at fault point `point`.
fn serve_faulting(d: &Deployment, point: &str) -> Receiver {
    let mut cmd = Command::new(bin("rewind-receiver"));
    cmd.env("REWIND_FAULT", point);
    Receiver::start_via(cmd, &d.data(), &d.pki(), "127.0.0.1:0", &[])
}

/// Stops a normal `serve` with SIGTERM; it must exit cleanly.
fn stop(rx: Receiver) {
    let status = rx.terminate(EXIT_WAIT).expect("serve stops on SIGTERM");
    assert!(status.success(), "serve stopped with {status}");
}

/// `rewind-receiver ARGS --data D`, with fault point `fault` armed if given.
fn receiver(d: &Deployment, fault: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("rewind-receiver"));
    cmd.args(args).arg("--data").arg(d.data());
    if let Some(point) = fault {
        cmd.env("REWIND_FAULT", point);
    }
    run(&mut cmd)
}

fn json_ok(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The process died by SIGKILL, i.e. it reached its fault point (nothing else kills it).
fn assert_killed_at(status: ExitStatus, point: &str) {
    assert_eq!(
        status.signal(),
        Some(9),
        "not killed at fault point {point}: {status}"
    );
}

/// A faulting `serve` must have died by itself, at its point.
fn assert_serve_killed_at(mut rx: Receiver, point: &str) {
    let status = rx
        .wait_exit(EXIT_WAIT)
        .unwrap_or_else(|| panic!("serve still runs: fault point {point} never reached"));
    assert_killed_at(status, point);
}

/// `verify --json`: passes and reports no bad or quarantined chunk. Returns the chunks checked.
fn assert_verify_clean(d: &Deployment) -> u64 {
    let o = receiver(d, None, &["verify", "--json"]);
    let report: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert!(
        o.status.success(),
        "verify failed: {report} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(report["bad"].as_array().map(Vec::len), Some(0), "{report}");
    assert_eq!(
        report["quarantined"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    report["chunks_checked"].as_u64().unwrap()
}

fn catalog(d: &Deployment) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        d.data().join("catalog.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

fn catalog_count(d: &Deployment, sql: &str) -> u64 {
    catalog(d)
        .query_row(sql, [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

/// Chunks the catalog indexes (the store holds them as far as any agent is told).
fn indexed_chunks(d: &Deployment) -> u64 {
    catalog_count(d, "SELECT COUNT(*) FROM chunks")
}

/// Pack files in the data folder and the packs the catalog lists, by file name.
fn pack_files_and_rows(d: &Deployment) -> (BTreeSet<String>, BTreeSet<String>) {
    let files = std::fs::read_dir(d.data().join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let conn = catalog(d);
    let mut stmt = conn.prepare("SELECT id FROM packs").unwrap();
    let rows = stmt
        .query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|id| format!("{:016x}.pack", id.unwrap()))
        .collect();
    (files, rows)
}

/// Writes one random block at each of `indexes`, through one open file.
fn random_blocks_at(path: &Path, block: u64, indexes: impl Iterator<Item = u64>) {
    use rand::RngCore;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = vec![0u8; block as usize];
    let mut rng = rand::rng();
    for i in indexes {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, i * block).unwrap();
    }
    f.sync_all().unwrap();
}

/// The report's chunk count and bytes sent for disk `vda`.
fn sent(r: &Value) -> (u64, u64) {
    let disk = disk_of(r, "vda");
    (
        disk["sent_chunks"].as_u64().unwrap(),
        disk["sent_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn serve_killed_after_pack_sync_resends_only_unindexed_chunks() {
    const POINT: &str = "after-pack-sync";
    const SEED: u64 = 384; // 24 MiB of random blocks
    const CHANGE: u64 = 384;
    let d = Deployment::new();
    let mut vm = Taken::new(&d, "aps", 64 * MIB);
    let rx = d.serve();
    disk::random_blocks(&vm.disk, BLOCK, 0, SEED, &mut rand::rng());
    vm.sync(&d, &rx);
    disk::random_blocks(&vm.disk, BLOCK, SEED, CHANGE, &mut rand::rng());
    let base = indexed_chunks(&d);

    // First a part of the change is stored and indexed: the upload is cut short by killing the
    // agent, then serve stops cleanly.
    let packs_before = d.pack_bytes();
    let mut agent = vm
        .sync_cmd(&d, &rx, &["--bwlimit", "16"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || d.pack_bytes()
            > packs_before + 8 * MIB),
        "the upload never got going"
    );
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the upload ended before it could be interrupted"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    stop(rx);
    let indexed_first = indexed_chunks(&d) - base;

    // The resumed upload: serve dies right after its first new chunks are durable in a pack.
    let rx = serve_faulting(&d, POINT);
    let packs_before_crash = d.pack_bytes();
    let o = vm.sync_failing(&d, &rx);
    assert!(
        !o.status.success(),
        "the sync survived its receiver's death"
    );
    assert_serve_killed_at(rx, POINT);
    let orphaned = d.pack_bytes() - packs_before_crash;

    let rx = d.serve();
    let indexed_at_restart = indexed_chunks(&d) - base;
    assert_eq!(
        indexed_at_restart, indexed_first,
        "chunks of the killed group were indexed though the kill came before its transaction"
    );
    assert!(orphaned > 0, "the killed group wrote nothing to a pack");
    assert_eq!(vm.assert_listed_restore(&d).len(), 1, "no partial point");
    assert_verify_clean(&d);

    let r = vm.sync(&d, &rx);
    let (chunks, bytes) = sent(&r);
    let full = (SEED + CHANGE) * BLOCK;
    eprintln!(
        "{POINT}: first run indexed {indexed_first} of {CHANGE} changed chunks; the killed group \
         left {orphaned} unindexed bytes in a pack; the next sync (resumed: {}) sent {chunks} \
         chunks, {bytes} bytes, of a disk holding {full} bytes",
        r["resumed"]
    );
    assert_eq!(
        chunks,
        CHANGE - indexed_at_restart,
        "the sync sends exactly the chunks the catalog lacks"
    );
    assert_eq!(
        indexed_chunks(&d) - base - indexed_at_restart,
        chunks,
        "every chunk sent was new to the store"
    );
    assert!(bytes < CHANGE * BLOCK, "stored chunks were sent again");
    assert!(bytes < full / 2, "{bytes} of {full}: not well under a copy");
    assert_eq!(vm.assert_listed_restore(&d).len(), 2);
    assert_verify_clean(&d);

    // The kill left a pack of unindexed chunks only (the resumed upload wrote a pack of its
    // own): gc reclaims all of it.
    let before_gc = d.pack_bytes();
    let gc = json_ok(&receiver(&d, None, &["gc", "--grace", "0", "--json"]));
    let freed = before_gc - d.pack_bytes();
    eprintln!("{POINT}: gc then freed {freed} bytes ({gc})");
    assert!(
        freed >= orphaned,
        "gc freed {freed} bytes of the {orphaned} the kill left unindexed"
    );
    assert_eq!(vm.assert_listed_restore(&d).len(), 2);
    assert_verify_clean(&d);
}

#[test]
fn serve_killed_between_batches_of_a_group_resends_only_unindexed_chunks() {
    const POINT: &str = "between-batches";
    const SEED: u64 = 512; // 32 MiB of random blocks
    const CHANGE: u64 = 384; // 24 MiB: six 4 MiB batches, sent faster than 100 ms apart
    let d = Deployment::new();
    let mut vm = Taken::new(&d, "bb", 64 * MIB);
    let rx = d.serve();
    disk::random_blocks(&vm.disk, BLOCK, 0, SEED, &mut rand::rng());
    vm.sync(&d, &rx);
    stop(rx);
    disk::random_blocks(&vm.disk, BLOCK, SEED, CHANGE, &mut rand::rng());
    let base = indexed_chunks(&d);
    let packs_before_crash = d.pack_bytes();

    let rx = serve_faulting(&d, POINT);
    let o = vm.sync_failing(&d, &rx);
    assert!(
        !o.status.success(),
        "the sync went through: no group held two batches"
    );
    assert_serve_killed_at(rx, POINT);
    let written = d.pack_bytes() - packs_before_crash;

    let rx = d.serve();
    let indexed_before = indexed_chunks(&d) - base;
    assert!(
        written > indexed_before * BLOCK,
        "the killed group's chunks were not in a pack before the kill"
    );
    assert_eq!(vm.assert_listed_restore(&d).len(), 1, "no partial point");
    assert_verify_clean(&d);

    let r = vm.sync(&d, &rx);
    let (chunks, bytes) = sent(&r);
    let full = (SEED + CHANGE) * BLOCK;
    eprintln!(
        "{POINT}: groups committed before the kill indexed {indexed_before} of {CHANGE} changed \
         chunks; {written} bytes were in packs at the kill; the next sync (resumed: {}) sent \
         {chunks} chunks, {bytes} bytes, of a disk holding {full} bytes",
        r["resumed"]
    );
    assert_eq!(
        chunks,
        CHANGE - indexed_before,
        "the sync sends exactly the chunks the catalog lacks"
    );
    assert_eq!(
        indexed_chunks(&d) - base - indexed_before,
        chunks,
        "every chunk sent was new to the store"
    );
    assert!(bytes < full / 2, "{bytes} of {full}: not well under a copy");
    assert_eq!(vm.assert_listed_restore(&d).len(), 2);
    assert_verify_clean(&d);
}

#[test]
fn serve_killed_between_commit_steps_resends_nothing() {
    const POINT: &str = "commit-between-steps";
    const SMALL: u64 = 4096;
    /// Level-1 nodes (256 blocks each) the change touches: more than a whole commit's 1,024.
    const NODES: u64 = 1100;
    let d = Deployment::new();
    let mut vm = Taken::new(&d, "steps", (NODES + 1) * 256 * SMALL);
    vm.flags = &["--block-size", "4096"];
    let rx = d.serve();
    random_blocks_at(&vm.disk, SMALL, 0..16);
    vm.sync(&d, &rx);
    stop(rx);
    // One block in each of NODES level-1 nodes.
    random_blocks_at(&vm.disk, SMALL, (1..=NODES).map(|n| n * 256));
    let base = indexed_chunks(&d);

    let rx = serve_faulting(&d, POINT);
    let o = vm.sync_failing(&d, &rx);
    assert!(!o.status.success(), "the commit went through unstepped");
    assert_serve_killed_at(rx, POINT);
    let pending = catalog_count(&d, "SELECT COUNT(*) FROM pending_commits");
    let step_nodes = catalog_count(
        &d,
        "SELECT COUNT(*) FROM nodes WHERE point IN (SELECT point FROM pending_commits)",
    );

    let rx = d.serve();
    assert_eq!(
        catalog_count(&d, "SELECT COUNT(*) FROM pending_commits"),
        0,
        "the cut-short commit is cleaned up at start"
    );
    assert_eq!(vm.assert_listed_restore(&d).len(), 1, "no partial point");
    assert_verify_clean(&d);
    let indexed_before = indexed_chunks(&d) - base;
    assert_eq!(
        indexed_before, NODES,
        "the whole upload was indexed before the commit"
    );

    let r = vm.sync(&d, &rx);
    let (chunks, bytes) = sent(&r);
    eprintln!(
        "{POINT}: the kill left {pending} pending commit with {step_nodes} nodes written by its \
         first step; the next sync (resumed: {}) sent {chunks} chunks, {bytes} bytes, of \
         {NODES} changed blocks ({} bytes)",
        r["resumed"],
        NODES * SMALL
    );
    assert_eq!(pending, 1, "the kill came inside the stepped commit");
    assert!(step_nodes > 0, "the first step wrote no nodes");
    assert_eq!(disk_of(&r, "vda")["changed_blocks"], NODES);
    assert_eq!(chunks, 0, "every chunk was stored before the commit");
    assert_eq!(bytes, 0);
    assert_eq!(vm.assert_listed_restore(&d).len(), 2);
    assert_verify_clean(&d);
}

/// gc killed at `point` while rewriting a pack three quarters dead; a second gc finishes.
fn gc_killed_at(point: &str) {
    let d = Deployment::new();
    let mut vm = Taken::new(&d, "gc", 8 * MIB);
    let rx = d.serve();
    disk::random_blocks(&vm.disk, BLOCK, 0, 32, &mut rand::rng());
    vm.sync(&d, &rx);
    disk::random_blocks(&vm.disk, BLOCK, 0, 24, &mut rand::rng());
    vm.sync(&d, &rx);
    disk::random_blocks(&vm.disk, BLOCK, 40, 4, &mut rand::rng());
    vm.sync(&d, &rx);
    // Removing the first point kills 24 of the 32 chunks of its pack.
    let ids = vm.ids();
    let pruned = json_ok(&receiver(
        &d,
        None,
        &["prune", "--vm", vm.vm, "--keep-last", "2", "--json"],
    ));
    assert_eq!(pruned["vms"][0]["removed"], serde_json::json!([ids[0]]));
    let before = d.pack_bytes();

    let o = receiver(&d, Some(point), &["gc", "--grace", "0", "--json"]);
    assert_killed_at(o.status, point);
    let at_kill = d.pack_bytes();
    assert_eq!(vm.assert_listed_restore(&d), ids[1..]);
    assert_verify_clean(&d);

    let again = json_ok(&receiver(&d, None, &["gc", "--grace", "0", "--json"]));
    let after = d.pack_bytes();
    eprintln!(
        "{point}: pack bytes {before} before gc, {at_kill} at the kill, {after} after a second \
         gc ({again})"
    );
    assert!(
        after <= before,
        "gc left more than it found: {after} > {before}"
    );
    assert!(
        before - after >= 24 * BLOCK,
        "the 24 dead chunks' space was not freed: {before} -> {after}"
    );
    let (files, rows) = pack_files_and_rows(&d);
    assert_eq!(files, rows, "pack files and the catalog's packs differ");
    assert_eq!(vm.assert_listed_restore(&d), ids[1..]);
    assert_verify_clean(&d);
    drop(rx);
}

/// Verify lists chunks, then reads them: a gc that moves chunks in between (copy, repoint,
/// unlink the old pack) must not make verify quarantine the good, moved copies.
#[test]
fn verify_racing_gc_quarantines_nothing_good() {
    const POINT: &str = "verify-after-listing";
    let d = Deployment::new();
    let mut vm = Taken::new(&d, "race", 8 * MIB);
    let rx = d.serve();
    disk::random_blocks(&vm.disk, BLOCK, 0, 32, &mut rand::rng());
    vm.sync(&d, &rx);
    disk::random_blocks(&vm.disk, BLOCK, 0, 24, &mut rand::rng());
    vm.sync(&d, &rx);
    let ids = vm.ids();
    json_ok(&receiver(
        &d,
        None,
        &["prune", "--vm", vm.vm, "--keep-last", "1", "--json"],
    ));

    let verify = Command::new(bin("rewind-receiver"))
        .args(["verify", "--json", "--data"])
        .arg(d.data())
        .env("REWIND_PAUSE", POINT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stat = format!("/proc/{}/stat", verify.id());
    let reached = wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('T'))
        })
    });
    // The first point's pack held 32 chunks, 24 of them dead now: gc moves the 8 live ones.
    let gc = reached.then(|| receiver(&d, None, &["gc", "--grace", "0", "--json"]));
    // Verify goes on whatever happened, so no stopped process outlives a failing test.
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&verify),
        rustix::process::Signal::CONT,
    );
    let out = verify.wait_with_output().unwrap();
    assert!(reached, "verify never reached {POINT}");
    let gc = json_ok(&gc.unwrap());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "verify after gc moved chunks under it: {report} {} (gc: {gc})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["bad"], serde_json::json!([]), "gc: {gc}");
    assert_eq!(vm.assert_listed_restore(&d), ids[1..]);
    assert_verify_clean(&d);
    drop(rx);
}

#[test]
fn gc_killed_after_copy_is_finished_by_the_next_gc() {
    gc_killed_at("gc-after-copy");
}

#[test]
fn gc_killed_between_forgetting_and_unlinking_a_pack_is_finished_by_the_next_gc() {
    gc_killed_at("gc-before-unlink");
}

#[test]
fn gc_killed_after_repoint_is_finished_by_the_next_gc() {
    gc_killed_at("gc-after-repoint");
}

#[test]
fn prune_killed_between_points_is_finished_by_the_next_prune() {
    const POINT: &str = "prune-between-points";
    let d = Deployment::new();
    let mut vm = Taken::new(&d, "prune", 8 * MIB);
    let rx = d.serve();
    for round in 0..6u64 {
        if round == 0 {
            disk::random_blocks(&vm.disk, BLOCK, 0, 32, &mut rand::rng());
        } else {
            disk::scatter_writes(&vm.disk, BLOCK, 64, 6, round);
        }
        vm.sync(&d, &rx);
    }
    let ids = vm.ids();
    let keep = ["prune", "--vm", vm.vm, "--keep-last", "2", "--json"];
    let mut dry_run = keep.to_vec();
    dry_run.push("--dry-run");
    let planned = json_ok(&receiver(&d, None, &dry_run))["vms"][0]["removed"].clone();
    // The policy: the two newest stay.
    assert_eq!(planned, serde_json::json!(ids[..4]));

    let o = receiver(&d, Some(POINT), &keep);
    assert_killed_at(o.status, POINT);
    // Newest first: the kill came right after the newest removable point went.
    let left = vm.assert_listed_restore(&d);
    assert_eq!(left, [ids[0], ids[1], ids[2], ids[4], ids[5]]);
    assert_verify_clean(&d);

    let done = json_ok(&receiver(&d, None, &keep));
    assert_eq!(
        done["vms"][0]["removed"],
        serde_json::json!(ids[..3]),
        "the second prune removes what the first left"
    );
    let left = vm.assert_listed_restore(&d);
    assert_eq!(left, ids[4..], "the set an uninterrupted prune leaves");
    eprintln!(
        "{POINT}: points {ids:?}; after the kill {:?} remained; after a second prune {left:?}",
        [ids[0], ids[1], ids[2], ids[4], ids[5]]
    );
    assert_verify_clean(&d);
    drop(rx);
}

#[test]
fn restore_killed_mid_write_leaves_no_image_and_runs_again() {
    const POINT: &str = "restore-mid-write";
    let d = Deployment::new();
    let mut vm = Taken::new(&d, "rst", 16 * MIB);
    let rx = d.serve();
    // More than the 128 blocks (two 4 MiB batches) the fault point waits for.
    disk::random_blocks(&vm.disk, BLOCK, 0, 200, &mut rand::rng());
    vm.sync(&d, &rx);
    disk::scatter_writes(&vm.disk, BLOCK, 256, 8, 7);
    vm.sync(&d, &rx);
    let newest = *vm.ids().last().unwrap();
    let out = d.path("restored.raw");
    let partial = d.path(".restored.raw.rewind-partial");
    let args = [
        "restore",
        "--vm",
        vm.vm,
        "--disk",
        "vda",
        "--point",
        &newest.to_string(),
        "--out",
        out.to_str().unwrap(),
    ];

    let o = receiver(&d, Some(POINT), &args);
    assert_killed_at(o.status, POINT);
    assert!(
        !out.exists(),
        "a killed restore left an image at its output path"
    );
    let partial_left = std::fs::metadata(&partial).map(|m| m.len()).ok();
    assert_eq!(vm.assert_listed_restore(&d).len(), 2);
    assert_verify_clean(&d);

    let o = receiver(&d, None, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(disk::digest(&out), vm.digests[&newest]);
    assert!(
        !partial.exists(),
        "the partial file is not left behind by a restore that completed"
    );
    eprintln!(
        "{POINT}: after the kill no image at the output path; partial file left: {partial_left:?} \
         bytes; the second restore wrote the image bit-exact"
    );
    drop(rx);
}

/// A drill killed after verifying its point, or while its QEMU boots, leaves no QEMU running,
/// no record, an untouched store and (once the next drill ran) no temporary folder; the next
/// drill passes.
#[test]
fn drills_killed_after_verify_and_mid_boot_leave_nothing_behind() {
    let d = Deployment::new();
    let mut vm = Taken::new(&d, "drilled", 4 * MIB);
    let rx = d.serve();
    disk::write_at(&vm.disk, 0, &disk::boot_sector("REWIND-FAULT-DRILL"));
    disk::random_blocks(&vm.disk, BLOCK, 8, 4, &mut rand::rng());
    vm.sync(&d, &rx);
    drop(rx);
    let tmp = d.path("drill-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let packs = pack_files_and_rows(&d);
    let bytes = d.pack_bytes();
    let drill = |fault: Option<&str>| {
        let mut cmd = Command::new(bin("rewind-receiver"));
        cmd.args([
            "drill",
            "--json",
            "--vm",
            vm.vm,
            "--boot",
            "--boot-timeout",
            "120",
            "--data",
        ])
        .arg(d.data())
        .env("TMPDIR", &tmp);
        if let Some(f) = fault {
            cmd.env("REWIND_FAULT", f);
        }
        run(&mut cmd)
    };
    for point in ["drill-after-verify", "drill-mid-boot"] {
        assert_killed_at(drill(Some(point)).status, point);
        assert!(
            wait_until(EXIT_WAIT, || !rewind_tests::qemu::drill_running(vm.vm)),
            "QEMU outlived the drill killed at {point}"
        );
    }
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_some(),
        "the drill killed mid-boot left its folder"
    );
    let o = drill(None);
    let v = json_ok(&o);
    assert_eq!(v["result"], "passed", "{v}");
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "the next drill removed the killed drill's folder"
    );
    let conn = catalog(&d);
    let recorded: i64 = conn
        .query_row("SELECT COUNT(*) FROM drills", [], |r| r.get(0))
        .unwrap();
    assert_eq!(recorded, 1, "killed drills leave no record");
    assert_eq!(pack_files_and_rows(&d), packs);
    assert_eq!(d.pack_bytes(), bytes, "a drill never writes to the store");
    vm.assert_listed_restore(&d);
    assert_verify_clean(&d);
}
