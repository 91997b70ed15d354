//! Differential workload: the same random writes / write-zeroes / discards / flushes of random
//! sizes and alignments go through our library on one copy of an image and through qemu-io on
//! another; `qemu-img compare` must agree and `qemu-img check` must be clean on ours.

use std::io::IoSlice;
use std::path::Path;
use std::process::Command;

use vhost_user_qcow2::image::{self, OpenOptions};

#[path = "support/workload.rs"]
mod workload;
use workload::{workload, Op};

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {:?} failed: {}{}",
        &args[..args.len().min(6)],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

fn differential(name: &str, create: &[&str], with_backing: bool, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 32u64 << 20;
    if with_backing {
        let base = dir.path().join("base.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p(&base), "32M"],
        );
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x3c 0 32M", p(&base)],
        );
    }
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create);
    if with_backing {
        args.extend_from_slice(&["-b", "base.qcow2", "-F", "qcow2"]);
    }
    args.push(p(&ours));
    args.push("32M");
    run("qemu-img", &args);
    // A little pre-existing content written by QEMU.
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x99 64k 1M", p(&ours)],
    );
    std::fs::copy(&ours, &theirs).expect("copy");

    let ops = workload(seed, size, 300);
    let img = image::open(&ours, &OpenOptions::default()).expect("open ours");
    let mut cmds: Vec<String> = Vec::new();
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
        cmds.push(op.qemu_io());
    }
    img.flush().expect("flush");
    drop(img);
    let mut qargs: Vec<&str> = vec!["-f", "qcow2"];
    for c in &cmds {
        qargs.push("-c");
        qargs.push(c);
    }
    qargs.push(p(&theirs));
    run("qemu-io", &qargs);
    if std::env::var_os("VUQ_KEEP").is_some() {
        std::fs::write(dir.path().join("cmds.txt"), cmds.join("\n")).expect("write cmds");
        eprintln!("kept {}", dir.keep().display());
    }

    let out = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            p(&ours),
            p(&theirs),
        ])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{name} seed {seed}: qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let chk = Command::new("qemu-img")
        .args(["check", p(&ours)])
        .output()
        .expect("spawn");
    assert!(
        chk.status.success(),
        "{name} seed {seed}: qemu-img check: {}",
        String::from_utf8_lossy(&chk.stdout)
    );
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
