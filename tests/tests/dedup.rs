//! Dedup over the wire: the agent never sends a chunk its owner already holds on the receiver.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use rewind_tests::{disk, disk_of, Deployment};

const BLOCK: u64 = 64 * 1024;

#[test]
fn identical_content_is_never_sent_twice() {
    let d = Deployment::new();
    let rx = d.serve();
    let a = d.path("a.raw");
    disk::create(&a, 16 * 1024 * 1024);
    disk::random_blocks(&a, BLOCK, 0, 64, &mut rand::rng());
    let first = d.sync_ok(&rx, "host1", "web1", &[("vda", &a)]);
    assert!(first["sent_bytes"].as_u64().unwrap() >= 64 * BLOCK);

    // Re-sync of an unchanged disk: nothing sent.
    let again = d.sync_ok(&rx, "host1", "web1", &[("vda", &a)]);
    assert_eq!(again["sent_bytes"], 0);

    // Another VM of the same owner whose disk equals the stored one: full mode, all blocks
    // listed as changed, but no chunk bytes travel.
    let b = d.path("b.raw");
    std::fs::copy(&a, &b).expect("copy");
    let clone = d.sync_ok(&rx, "host1", "web2", &[("vda", &b)]);
    assert_eq!(disk_of(&clone, "vda")["mode"], "full");
    assert_eq!(disk_of(&clone, "vda")["changed_blocks"], 64);
    assert_eq!(clone["sent_bytes"], 0);
    assert_eq!(
        disk_of(&clone, "vda")["root"],
        disk_of(&first, "vda")["root"]
    );

    // A second disk of the same VM with the same content as the first: sent once.
    let c = d.path("c.raw");
    disk::create(&c, 8 * 1024 * 1024);
    disk::random_blocks(&c, BLOCK, 0, 16, &mut rand::rng());
    let c2 = d.path("c2.raw");
    std::fs::copy(&c, &c2).expect("copy");
    let two = d.sync_ok(&rx, "host1", "web3", &[("vda", &c), ("vdb", &c2)]);
    let sent: u64 = two["sent_bytes"].as_u64().unwrap();
    assert!((16 * BLOCK..17 * BLOCK).contains(&sent), "sent {sent}");
    assert_eq!(disk_of(&two, "vdb")["sent_bytes"], 0);

    // A block repeated many times inside one disk is sent once.
    let r = d.path("r.raw");
    disk::create(&r, 8 * 1024 * 1024);
    let block: Vec<u8> = (0..BLOCK).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..50 {
        disk::write_at(&r, i * BLOCK, &block);
    }
    let rep = d.sync_ok(&rx, "host1", "web4", &[("vda", &r)]);
    assert_eq!(disk_of(&rep, "vda")["changed_blocks"], 50);
    assert_eq!(disk_of(&rep, "vda")["sent_chunks"], 1);

    for (vm, path, point) in [
        ("web2", &b, &clone),
        ("web3", &c2, &two),
        ("web4", &r, &rep),
    ] {
        let want = disk::digest(path);
        let disk_name = if vm == "web3" { "vdb" } else { "vda" };
        assert_eq!(
            d.restored_digest(vm, disk_name, point["point"].as_u64().unwrap()),
            want,
            "{vm}"
        );
    }
}

#[test]
fn another_owner_must_send_its_own_copy() {
    // Answering "held" for another owner's chunks would leak what they store.
    let d = Deployment::new();
    let rx = d.serve();
    let a = d.path("a.raw");
    disk::create(&a, 4 * 1024 * 1024);
    disk::random_blocks(&a, BLOCK, 0, 8, &mut rand::rng());
    d.sync_ok(&rx, "host1", "web1", &[("vda", &a)]);
    let other = d.sync_ok(&rx, "host2", "db1", &[("vda", &a)]);
    assert!(other["sent_bytes"].as_u64().unwrap() >= 8 * BLOCK);
    assert_eq!(
        d.restored_digest("db1", "vda", other["point"].as_u64().unwrap()),
        disk::digest(&a)
    );
}
