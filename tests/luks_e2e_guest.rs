//! End-to-end on an encrypted image: a Linux guest (QEMU, TCG) runs fio with crc32c verify on a
//! qcow2+LUKS image made by qemu-img and served by our daemon with `--key-secret-file`;
//! afterwards qemu-io (with the secret) checks the guest's bytes are in the file and
//! `qemu-img check` passes. Same gates as tests/e2e_guest.rs (`VUQ_SKIP_E2E=1` skips).

#[path = "guest/rig.rs"]
#[allow(dead_code)]
mod rig;

use std::process::Command;

use rig::{run_guest_fio, Backend, ImageCase};

const PASS: &str = "e2e-luks-pass";

fn qcow2_luks() -> ImageCase {
    let key = std::env::temp_dir().join(format!("vuq-e2e-luks-{}.key", std::process::id()));
    std::fs::write(&key, PASS).expect("key file");
    ImageCase {
        name: "qcow2+luks",
        format_opts: "driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0".to_owned(),
        objects: vec![format!("secret,id=sec0,data={PASS}")],
        daemon_args: vec!["--key-secret-file".to_owned(), key.display().to_string()],
        create: Box::new(|path, size| {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "--object"])
                .arg(format!("secret,id=sec0,data={PASS}"))
                .args([
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                ])
                .arg(path)
                .arg(size.to_string())
                .output()
                .map_err(|e| format!("qemu-img: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        }),
        qemu_img_check: true,
    }
}

#[test]
fn qcow2_luks_image_made_by_qemu_img_guest_fio_verify_via_daemon() {
    run_guest_fio(&qcow2_luks(), Backend::Daemon);
}
