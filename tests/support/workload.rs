//! The random workload shared by the differential tests (library and daemon): writes,
//! write-zeroes, discards and flushes of random sizes and sector alignments.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One request: offsets and lengths in bytes, multiples of 512.
pub enum Op {
    /// Fill with one byte value.
    Write(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
    Flush,
}

impl Op {
    /// The same request as a qemu-io command (write-zeroes may unmap, as ours may).
    pub fn qemu_io(&self) -> String {
        match *self {
            Op::Write(off, len, b) => format!("write -P {b} {off} {len}"),
            Op::Zero(off, len) => format!("write -z -u {off} {len}"),
            Op::Discard(off, len) => format!("discard {off} {len}"),
            Op::Flush => "flush".into(),
        }
    }
}

/// `n` requests over a disk of `size` bytes, reproducible from `seed`.
pub fn workload(seed: u64, size: u64, n: usize) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ops = Vec::new();
    for _ in 0..n {
        let sectors = size / 512;
        let len_s: u64 = match rng.random_range(0..10) {
            0..=5 => rng.random_range(1..=16),
            6..=8 => rng.random_range(1..=512),
            _ => rng.random_range(1..=4096),
        };
        let start = rng.random_range(0..sectors - len_s.min(sectors - 1));
        let len_s = len_s.min(sectors - start);
        let (off, len) = (start * 512, len_s * 512);
        ops.push(match rng.random_range(0..20) {
            0..=12 => Op::Write(off, len, rng.random_range(1..=255u8)),
            13..=15 => Op::Zero(off, len),
            16..=18 => Op::Discard(off, len),
            _ => Op::Flush,
        });
    }
    ops
}
