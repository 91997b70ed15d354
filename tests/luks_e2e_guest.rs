//! End-to-end on an encrypted image: a Linux guest (QEMU, TCG) runs fio with crc32c verify on a
//! qcow2+LUKS image made by qemu-img and served by our daemon with `--key-secret-file`;
//! afterwards qemu-io (with the secret) checks the guest's bytes are in the file, the rig checks
//! no plaintext pattern is in it, and `qemu-img check` passes. qemu-storage-daemon runs the same
//! case for comparison. Same gates as tests/e2e_guest.rs (`VUQ_SKIP_E2E=1` skips).

#[path = "guest/rig.rs"]
#[allow(dead_code)]
mod rig;
#[path = "guest/vm.rs"]
#[allow(dead_code)]
mod vm;

use rig::{run_guest_fio, Backend, ImageCase};

const PASS: &str = "e2e-luks-pass";

fn case() -> ImageCase {
    let key = std::env::temp_dir().join(format!("vuq-e2e-luks-{}.key", std::process::id()));
    std::fs::write(&key, PASS).expect("key file");
    ImageCase::qcow2_luks(
        PASS,
        vec!["--key-secret-file".to_owned(), key.display().to_string()],
    )
}

#[test]
fn qcow2_luks_image_made_by_qemu_img_guest_fio_verify_via_daemon() {
    run_guest_fio(&case(), Backend::Daemon);
}

#[test]
fn qcow2_luks_image_made_by_qemu_img_guest_fio_verify_via_qemu_storage_daemon() {
    run_guest_fio(&case(), Backend::QemuStorageDaemon);
}
