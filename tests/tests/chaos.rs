//! A short `rewind-chaos` run, as CI can afford it: raw VMs replicating under SIGKILLs of the
//! agent, the receiver, gc and prune and under link faults, with every invariant checked after
//! every round; then a few rounds with a live QEMU VM when QEMU is installed. The long run is
//! described in the README.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{bin, run};
use serde_json::Value;
use std::process::Command;

/// Runs `rewind-chaos --json ARGS`; it must pass, and its figures are returned.
fn chaos(args: &[&str]) -> Value {
    let out = run(Command::new(bin("rewind-chaos")).arg("--json").args(args));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rewind-chaos {args:?} failed:\n{log}");
    eprintln!("{log}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn raw_vms_survive_random_kills_and_link_faults() {
    // Seed 16's schedule strikes every process kind several times in ten rounds.
    let fig = chaos(&["--seed", "16", "--rounds", "10", "--vms", "2"]);
    assert_eq!(fig["points"]["lost"], 0, "{fig}");
    assert!(fig["points"]["checked"].as_u64().unwrap() >= 20, "{fig}");
    assert_eq!(
        fig["verify_clean"], 11,
        "a clean verify after every round and at the end"
    );
    for process in ["agent", "receiver", "gc", "prune"] {
        assert!(
            fig["kills"][process]["total"].as_u64().unwrap() > 0,
            "no {process} was killed: {fig}"
        );
    }
    let hit: u64 = fig["link_faults"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| f["hit"].as_u64().unwrap())
        .sum();
    assert!(hit > 0, "no link fault struck a sync: {fig}");
}

#[test]
fn a_live_vm_survives_random_kills_and_link_faults() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-system-x86_64 is missing: skipped");
        return;
    }
    let fig = chaos(&["--seed", "7", "--rounds", "4", "--vms", "1", "--live"]);
    assert_eq!(fig["live"], true, "{fig}");
    assert_eq!(fig["points"]["lost"], 0, "{fig}");
    // Four rounds and the final sync, of two VMs.
    assert!(fig["points"]["committed"].as_u64().unwrap() >= 10, "{fig}");
}
