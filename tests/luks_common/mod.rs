//! Helpers shared by the LUKS interop tests: run qemu-img / qemu-io / cryptsetup as oracles.
#![allow(dead_code)]

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::process::Command;

use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::image::luks::LuksImage;
use vhost_user_qcow2::image::BlockImage;
use vhost_user_qcow2::storage::{FileStorage, OpenFlags};

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f luks` with extra `-o` options (iter-time=10 added).
pub fn qemu_create(path: &Path, pw: &str, opts: &str, size: &str) {
    let mut o = "key-secret=s0,iter-time=10".to_string();
    if !opts.is_empty() {
        o.push(',');
        o.push_str(opts);
    }
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "luks", "--object"])
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("-o")
        .arg(o)
        .arg(path)
        .arg(size));
}

fn image_opts(path: &Path) -> String {
    format!("driver=luks,key-secret=s0,file.filename={}", path.display())
}

/// Runs qemu-io commands on a raw LUKS file.
pub fn qemu_io(path: &Path, pw: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("--image-opts")
        .arg(image_opts(path));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(&mut c)
}

/// Whether qemu-io can open the file with `pw`.
pub fn qemu_can_open(path: &Path, pw: &str) -> bool {
    Command::new("qemu-io")
        .arg("--object")
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("--image-opts")
        .arg(image_opts(path))
        .args(["-c", "read 0 512"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The plaintext QEMU sees: `qemu-img convert` of the LUKS image to raw.
pub fn qemu_plaintext(path: &Path, pw: &str) -> Vec<u8> {
    let out = PathBuf::from(format!("{}.plain", path.display()));
    let _ = std::fs::remove_file(&out);
    run(Command::new("qemu-img")
        .args(["convert", "--object"])
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("--image-opts")
        .arg(image_opts(path))
        .args(["-O", "raw"])
        .arg(&out));
    let data = std::fs::read(&out).expect("read plaintext");
    let _ = std::fs::remove_file(&out);
    data
}

/// Opens a raw LUKS file with our image layer.
pub fn open_ours(path: &Path, pw: &[u8], read_only: bool) -> LuksImage {
    let st = FileStorage::open(
        path,
        OpenFlags {
            read_only,
            direct: false,
        },
    )
    .expect("open file");
    LuksImage::open(Box::new(st), read_only, &Passphrase::new(pw)).expect("unlock")
}

/// Reads the whole guest disk through our layer.
pub fn read_all(img: &dyn BlockImage) -> Vec<u8> {
    let len = usize::try_from(img.capacity()).expect("fits");
    let mut buf = vec![0u8; len];
    img.read(0, &mut [IoSliceMut::new(&mut buf)]).expect("read");
    buf
}

/// Writes through our layer.
pub fn write(img: &dyn BlockImage, offset: u64, data: &[u8]) {
    img.write(offset, &[IoSlice::new(data)]).expect("write");
}

/// A deterministic test pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 131 + usize::from(seed) * 7 + i / 509) % 256).expect("byte"))
        .collect()
}

/// Renders an error with its sources.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
