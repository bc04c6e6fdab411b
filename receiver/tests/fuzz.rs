//! Fuzzing the receiver's parsers of foreign bytes with the seeded mutation driver of
//! `rewind_proto::fuzz`: chunk frames as an agent sends them, and the configuration file.
//! Every input must give a result or an error, never a panic.

#![allow(clippy::unwrap_used)]

use rand::SeedableRng;
use rewind_proto::fuzz::{cases, mutate, seed};
use rewind_proto::{chunk, Leaf};
use std::time::Instant;

#[test]
fn chunk_frames_survive_mutation() {
    let data: Vec<u8> = (0..65_536u32).map(|i| (i * 31 % 251) as u8).collect();
    let leaf = Leaf::of(&data);
    let frame = chunk::compress(&data).unwrap();
    assert_eq!(chunk::verify(leaf, &frame, data.len()), Ok(()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let (n, started) = (cases(), Instant::now());
    let mut accepted = 0;
    for _ in 0..n {
        let m = mutate(&frame, &mut rng);
        // A mutated frame that still passes must decode to exactly the block.
        if chunk::verify(leaf, &m, data.len()).is_ok() {
            assert_eq!(chunk::open(leaf, &m, data.len()).unwrap(), data);
            accepted += 1;
        }
    }
    eprintln!(
        "chunk frames: {n} mutations in {:.1} s, {accepted} still the block, 0 panics",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn the_receiver_configuration_survives_mutation() {
    let example = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/receiver.toml.example"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, &example).unwrap();
    rewind_receiver::config::ReceiverFile::load(&path).expect("the example loads");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let (n, started) = (cases(), Instant::now());
    let mut refused = 0;
    for _ in 0..n {
        std::fs::write(&path, mutate(&example, &mut rng)).unwrap();
        match rewind_receiver::config::ReceiverFile::load(&path) {
            // Whatever loads also yields its limits and rules without panicking.
            Ok(f) => {
                let _ = f.limits.limits();
                let _ = rewind_receiver::store::Rules::from_file(&f);
            }
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "receiver.toml: {n} mutations in {:.1} s, {refused} refused, 0 panics",
        started.elapsed().as_secs_f64()
    );
    assert!(refused > 0);
}
