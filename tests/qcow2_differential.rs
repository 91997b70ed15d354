//! Differential workload: the same random writes / write-zeroes / discards / flushes of random
//! sizes and alignments go through our library on one copy of an image and through qemu-io on
//! another; `qemu-img compare` must agree and `qemu-img check` must be clean on ours.

use std::io::IoSlice;

use vhost_user_qcow2::image::{self, OpenOptions};

#[path = "support/workload.rs"]
mod workload;
use workload::{prepare, replay_and_compare, workload, Op, SIZE};

fn differential(name: &str, create: &[&str], with_backing: bool, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = prepare(dir.path(), create, with_backing);
    let ops = workload(seed, SIZE, 300);
    let img = image::open(&ours, &OpenOptions::default()).expect("open ours");
    for op in &ops {
        match *op {
            Op::Write(off, len, b) => {
                let data = vec![b; usize::try_from(len).expect("len")];
                // Split into two iovecs at a sector boundary.
                let cut = usize::try_from(len / 1024 * 512).expect("cut");
                img.write(
                    off,
                    &[IoSlice::new(&data[..cut]), IoSlice::new(&data[cut..])],
                )
                .expect("write");
            }
            Op::Zero(off, len) => {
                img.write_zeroes(off, len, true).expect("zeroes");
            }
            Op::Discard(off, len) => {
                img.discard(off, len).expect("discard");
            }
            Op::Flush => {
                img.flush().expect("flush");
            }
        }
    }
    img.flush().expect("flush");
    drop(img);
    if std::env::var_os("VUQ_KEEP").is_some() {
        let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
        std::fs::write(dir.path().join("cmds.txt"), cmds.join("\n")).expect("write cmds");
        eprintln!("kept {}", dir.keep().display());
    }
    replay_and_compare(name, seed, &ops, &ours, &theirs);
}

#[test]
fn differential_v3_default() {
    for seed in 1..=3 {
        differential("v3", &[], false, seed);
    }
}

#[test]
fn differential_v3_overlay() {
    for seed in 11..=12 {
        differential("v3-overlay", &[], true, seed);
    }
}

#[test]
fn differential_v2_overlay_and_small_clusters() {
    differential("v2", &["-o", "compat=0.10"], false, 21);
    differential("v2-overlay", &["-o", "compat=0.10"], true, 22);
    differential("c512", &["-o", "cluster_size=512"], false, 23);
    differential(
        "c4k-refcount1",
        &["-o", "cluster_size=4k,refcount_bits=1"],
        true,
        24,
    );
}

#[test]
fn differential_extended_l2() {
    differential("extl2", &["-o", "extended_l2=on"], false, 31);
    differential(
        "extl2-overlay",
        &["-o", "extended_l2=on,cluster_size=128k"],
        true,
        32,
    );
    differential(
        "extl2-overlay-b",
        &["-o", "extended_l2=on,cluster_size=32k"],
        true,
        33,
    );
}
