//! The daemon serving encrypted images: `create --encrypt luks` makes a qcow2+LUKS image,
//! `serve --key-secret-file` exports it, libblkio writes and reads through the socket, and
//! QEMU reads the same plaintext while the file holds none of it.

#![allow(clippy::cast_possible_truncation)]

mod common;
mod luks_common;

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Command, Stdio};

use blkio::{Blkio, Blkioq, ReqFlags};
use common::{spawn_serve, wait_timeout, BIN};
use luks_common::run;

fn complete(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::uninit()];
    let n = q.do_io(&mut c, 1, None, None).expect("do_io");
    assert_eq!(n, 1);
    // SAFETY: do_io initialised the first `n` completions.
    unsafe { c[0].assume_init_read() }.ret
}

fn qemu_plain(f: &Path, pw: &str, driver: &str) -> Vec<u8> {
    let out = f.with_extension("plain");
    let _ = std::fs::remove_file(&out);
    run(Command::new("qemu-img")
        .args(["convert", "--object"])
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("--image-opts")
        .arg(format!(
            "driver={driver},{}key-secret=s0,file.filename={}",
            if driver == "qcow2" { "encrypt." } else { "" },
            f.display()
        ))
        .args(["-O", "raw"])
        .arg(&out));
    std::fs::read(&out).expect("plain")
}

fn serve_and_write(image: &Path, key: &Path, dir: &Path, marker: &[u8], extra: &[&str]) -> Vec<u8> {
    let sock = dir.join(format!(
        "{}.sock",
        image.file_name().and_then(|n| n.to_str()).expect("name")
    ));
    let mut args = vec![
        "--key-secret-file",
        key.to_str().expect("p"),
        "--num-queues",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut child = spawn_serve(&sock, image, &args);
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed().as_secs() < 30,
            "no socket: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The socket file appears at bind(), a moment before listen(): retry a refused connect.
    let mut tries = 0;
    let mut b = loop {
        let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
        b.set_str("path", sock.to_str().expect("p")).expect("path");
        match b.connect() {
            Ok(()) => break b,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!(
                "connect: {e:?}\n{}",
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            ),
        }
    };
    b.set_i32("num-queues", 1).expect("nq");
    let mut out = b.start().expect("start");
    let region = b.alloc_mem_region(1 << 20).expect("region");
    b.map_mem_region(&region).expect("map");
    // SAFETY: the region is a live mapping of region.len bytes owned by `b`; each request is
    // waited for before the buffer is touched again.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    let data: Vec<u8> = marker.iter().copied().cycle().take(256 * 1024).collect();
    let q = &mut out.queues[0];
    buf[..data.len()].copy_from_slice(&data);
    q.write(64 * 1024, buf.as_ptr(), data.len(), 0, ReqFlags::empty());
    assert_eq!(complete(q), 0);
    // The guest's buffer is not modified by the write (encryption went to a bounce buffer).
    assert_eq!(&buf[..data.len()], &data[..]);
    q.flush(0, ReqFlags::empty());
    assert_eq!(complete(q), 0);
    buf[..data.len()].fill(0);
    q.read(
        64 * 1024,
        buf.as_mut_ptr(),
        data.len(),
        0,
        ReqFlags::empty(),
    );
    assert_eq!(complete(q), 0);
    assert_eq!(&buf[..data.len()], &data[..]);
    drop(out);
    drop(b);
    let _ = child.kill();
    let _ = child.wait();
    data
}

#[test]
fn created_and_served_encrypted_images_match_qemu_and_leak_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("key");
    std::fs::write(&key, "daemon-pass").expect("key");
    let marker = b"SERVED-PLAINTEXT";
    // --direct: O_DIRECT on the file (tempfile's /tmp is on disk; tmpfs refuses O_DIRECT).
    for (fmt, driver, extra) in [
        ("qcow2", "qcow2", &[][..]),
        ("raw", "luks", &[]),
        ("qcow2", "qcow2", &["--direct"]),
        ("raw", "luks", &["--direct"]),
    ] {
        let image = dir.path().join(format!("enc{}.{driver}", extra.len()));
        let out = run(Command::new(BIN)
            .args([
                "create",
                "-f",
                fmt,
                "--encrypt",
                "luks",
                "--iter-time",
                "10",
            ])
            .arg("--key-secret-file")
            .arg(&key)
            .arg(&image)
            .arg("4M")
            .stdin(Stdio::null()));
        assert!(out.contains("Formatting"), "{out}");
        let data = serve_and_write(&image, &key, dir.path(), marker, extra);
        let plain = qemu_plain(&image, "daemon-pass", driver);
        assert_eq!(plain.len(), 4 << 20);
        assert_eq!(
            &plain[64 * 1024..64 * 1024 + data.len()],
            &data[..],
            "{fmt} {extra:?}"
        );
        let raw = std::fs::read(&image).expect("read");
        assert!(
            !raw.windows(marker.len()).any(|w| w == marker),
            "plaintext in the {fmt} file"
        );
        if fmt == "qcow2" {
            run(Command::new("qemu-img")
                .args([
                    "check",
                    "--object",
                    "secret,id=s0,data=daemon-pass",
                    "--image-opts",
                ])
                .arg(format!(
                    "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
                    image.display()
                )));
        }
    }
}

#[test]
fn serving_an_encrypted_image_without_a_key_fails_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let image = dir.path().join("nokey.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
        ])
        .arg("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10")
        .arg(&image)
        .arg("1M"));
    let sock = dir.path().join("s.sock");
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_timeout(&mut child, 30).expect("exits");
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("a key is needed"), "{err}");
    assert!(!sock.exists());
}
