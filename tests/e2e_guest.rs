//! End-to-end: a Linux guest in QEMU (TCG) does I/O through vhost-user-blk, fio verifies it with
//! crc32c on both queues, and qemu-io checks afterwards that the bytes landed in the image file.
//!
//! Needs qemu-system-x86_64, qemu-io, qemu-img, qemu-storage-daemon, fio, busybox-static and
//! linux-image-amd64 (.ci/run installs them); fails when they are missing unless
//! `VUQ_SKIP_E2E=1`. `VUQ_E2E_BACKENDS=daemon,qsd` selects backends. See docs/testing.md.

#[path = "guest/rig.rs"]
mod rig;
#[path = "guest/vm.rs"]
mod vm;

use rig::{run_guest_fio, Backend, ImageCase};

#[test]
fn raw_image_guest_fio_verify_via_daemon() {
    run_guest_fio(&ImageCase::raw(), Backend::Daemon);
}

#[test]
fn raw_image_guest_fio_verify_via_qemu_storage_daemon() {
    run_guest_fio(&ImageCase::raw(), Backend::QemuStorageDaemon);
}

/// The rig must be able to fail: with the backend writing 1 MiB away from where the guest
/// thinks, the guest's own fio verification passes, so only the host-side qemu-io checks can
/// notice, and they must.
#[test]
fn rig_detects_writes_that_land_in_the_wrong_place() {
    let Some(message) = rig::run_guest_fio_with_misplaced_writes() else {
        return;
    };
    assert!(
        message.contains("qemu-io pattern checks failed"),
        "expected the host-side checks to fail, got: {message:?}"
    );
}

/// The guest script travels base64-encoded on the kernel command line; our encoder must agree
/// with coreutils for every padding case.
#[test]
fn script_encoding_matches_coreutils_base64() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    for input in [
        "",
        "a",
        "ab",
        "abc",
        "abcd",
        "fio --name=x\n$DEV 'q' \"z\"\u{1}\u{ff}",
    ] {
        let mut child = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn base64");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("base64 output");
        assert!(out.status.success());
        assert_eq!(
            vm::base64(input.as_bytes()),
            String::from_utf8_lossy(&out.stdout),
            "{input:?}"
        );
    }
}

#[test]
fn restarted_qemu_reattaches_to_daemon() {
    rig::run_guest_reconnect(&ImageCase::raw(), Backend::Daemon);
}

#[test]
fn restarted_qemu_reattaches_to_qemu_storage_daemon() {
    rig::run_guest_reconnect(&ImageCase::raw(), Backend::QemuStorageDaemon);
}
