//! The seeded mutation driver of the fuzz tests on both sides (a stable-toolchain stand-in for
//! a coverage-guided fuzzer): `REWIND_FUZZ_CASES` sets the mutations per target, and
//! `REWIND_FUZZ_SEED` replays one seed.

use rand::Rng;

/// Mutations per target: `REWIND_FUZZ_CASES`, or 5,000 (the short run CI does).
pub fn cases() -> usize {
    std::env::var("REWIND_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

/// The seed of a run: `REWIND_FUZZ_SEED`, or a fixed one.
pub fn seed() -> u64 {
    std::env::var("REWIND_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed)
}

/// One random mutation of `input`: flipped bits, overwritten bytes (often with boundary
/// values), a cut, an insertion or a duplicated run.
pub fn mutate(input: &[u8], rng: &mut impl Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if out.is_empty() {
            out.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..out.len());
        match rng.random_range(0..6) {
            0 => out[at] ^= 1 << rng.random_range(0..8),
            1 => out[at] = [0, 0xff, 0x7f, 0x80, 1][rng.random_range(0..5)],
            2 => {
                let n = rng.random_range(1..=8).min(out.len() - at);
                for b in &mut out[at..at + n] {
                    *b = 0xff;
                }
            }
            3 => out.truncate(at),
            4 => {
                let mut extra = vec![0u8; rng.random_range(1..64)];
                rng.fill_bytes(&mut extra);
                out.splice(at..at, extra);
            }
            _ => {
                let end = (at + rng.random_range(1..256)).min(out.len());
                let run = out[at..end].to_vec();
                out.splice(at..at, run);
            }
        }
    }
    out
}
