//! The random workload shared by the differential tests (library and daemon): writes,
//! write-zeroes, discards and flushes of random sizes and sector alignments.

use std::path::{Path, PathBuf};

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

/// Runs a program that must succeed.
fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {:?} failed: {}{}",
        &args[..args.len().min(6)],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

/// Size of the images [`prepare`] makes.
pub const SIZE: u64 = 32 << 20;

/// Makes `ours.qcow2` in `dir` with qemu-img (extra `create` arguments such as
/// `["-o", "compat=0.10"]`, optionally over a pre-filled `base.qcow2`), gives it a little content
/// written by QEMU, and copies it to `theirs.qcow2`. Returns (ours, theirs).
pub fn prepare(dir: &Path, create: &[&str], with_backing: bool) -> (PathBuf, PathBuf) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create);
    if with_backing {
        let base = dir.join("base.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p(&base), "32M"],
        );
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x3c 0 32M", p(&base)],
        );
        args.extend_from_slice(&["-b", "base.qcow2", "-F", "qcow2"]);
    }
    args.extend_from_slice(&[p(&ours), "32M"]);
    run("qemu-img", &args);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x99 64k 1M", p(&ours)],
    );
    std::fs::copy(&ours, &theirs).expect("copy");
    (ours, theirs)
}

/// Replays `ops` on `theirs` with qemu-io, then asserts that `qemu-img compare` finds the two
/// images equal and that `qemu-img check` is clean (no corruption, no leaks) on `ours`.
pub fn replay_and_compare(name: &str, seed: u64, ops: &[Op], ours: &Path, theirs: &Path) {
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(p(theirs));
    run("qemu-io", &args);
    for (what, args) in [
        (
            "compare",
            vec!["compare", "-f", "qcow2", "-F", "qcow2", p(ours), p(theirs)],
        ),
        ("check", vec!["check", p(ours)]),
    ] {
        let out = std::process::Command::new("qemu-img")
            .args(&args)
            .output()
            .expect("spawn");
        assert!(
            out.status.success(),
            "{name} seed {seed}: qemu-img {what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
