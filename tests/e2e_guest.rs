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

use rig::{
    run_guest_fio, run_guest_kill_restart, run_guest_live_resize, Backend, ImageCase, OverlayMaker,
};

#[test]
fn raw_image_guest_fio_verify_via_daemon() {
    run_guest_fio(&ImageCase::raw(), Backend::Daemon);
}

#[test]
fn raw_image_guest_fio_verify_via_qemu_storage_daemon() {
    run_guest_fio(&ImageCase::raw(), Backend::QemuStorageDaemon);
}

#[test]
fn qcow2_image_guest_fio_verify_via_daemon() {
    run_guest_fio(&ImageCase::qcow2(), Backend::Daemon);
}

#[test]
fn qcow2_image_guest_fio_verify_via_qemu_storage_daemon() {
    run_guest_fio(&ImageCase::qcow2(), Backend::QemuStorageDaemon);
}

/// A qcow2 overlay (made by qemu-img) over a qcow2 base holding a pattern: the guest's writes go
/// to the overlay, partial-cluster writes copy the rest up from the base, the guest reads the
/// base through the overlay, and the base stays byte-for-byte unchanged.
#[test]
fn qcow2_overlay_guest_fio_verify_via_daemon() {
    run_guest_fio(
        &ImageCase::qcow2_overlay(OverlayMaker::QemuImg),
        Backend::Daemon,
    );
}

/// The same flow with qemu-storage-daemon: the reference for what the checks expect.
#[test]
fn qcow2_overlay_guest_fio_verify_via_qemu_storage_daemon() {
    run_guest_fio(
        &ImageCase::qcow2_overlay(OverlayMaker::QemuImg),
        Backend::QemuStorageDaemon,
    );
}

/// The overlay made by our own `create --backing`.
#[test]
fn qcow2_overlay_made_by_us_guest_fio_verify_via_daemon() {
    run_guest_fio(
        &ImageCase::qcow2_overlay(OverlayMaker::Ours),
        Backend::Daemon,
    );
}

/// A raw LUKS1 file made by qemu-img, served with `--key-secret-file`; qemu-io opens it with the
/// same secret for the checks, and no plaintext pattern may appear in the file. (The qcow2+LUKS
/// cases are in tests/luks_e2e_guest.rs.)
fn luks_case(tag: &str) -> ImageCase {
    const PASS: &str = "e2e-raw-luks-pass";
    let key =
        std::env::temp_dir().join(format!("vuq-e2e-raw-luks-{}-{tag}.key", std::process::id()));
    std::fs::write(&key, PASS).expect("key file");
    ImageCase::luks(
        PASS,
        vec!["--key-secret-file".to_owned(), key.display().to_string()],
    )
}

#[test]
fn raw_luks_image_guest_fio_verify_via_daemon() {
    run_guest_fio(&luks_case("daemon"), Backend::Daemon);
}

#[test]
fn raw_luks_image_guest_fio_verify_via_qemu_storage_daemon() {
    run_guest_fio(&luks_case("qsd"), Backend::QemuStorageDaemon);
}

/// The rig must be able to fail: with the backend writing 1 MiB away from where the guest
/// thinks, the guest's own fio verification passes, so only the host-side qemu-io checks can
/// notice, and they must.
#[test]
fn rig_detects_writes_that_land_in_the_wrong_place() {
    let Some(message) =
        rig::run_guest_fio_expecting_failure(&ImageCase::raw(), &rig::shifted_raw_view())
    else {
        return;
    };
    assert!(
        message.contains("qemu-io pattern checks failed"),
        "expected the host-side checks to fail, got: {message:?}"
    );
}

/// The overlay served without its backing file: the small writes fill their clusters with
/// zeroes instead of the base's data, which only the "base content elsewhere" checks see.
#[test]
fn rig_detects_an_overlay_that_lost_its_backing_file() {
    let Some(message) = rig::run_guest_fio_expecting_failure(
        &ImageCase::qcow2_overlay(OverlayMaker::QemuImg),
        &rig::overlay_without_backing_view(),
    ) else {
        return;
    };
    assert!(
        message.contains("qemu-io pattern checks failed"),
        "expected the base-content checks to fail, got: {message:?}"
    );
}

/// The base image served instead of the overlay: the guest writes into the backing file, which
/// the before/after hash must notice.
#[test]
fn rig_detects_writes_into_the_backing_file() {
    let Some(message) = rig::run_guest_fio_expecting_failure(
        &ImageCase::qcow2_overlay(OverlayMaker::QemuImg),
        &rig::overlay_base_instead_view(),
    ) else {
        return;
    };
    assert!(
        message.contains("backing file") && message.contains("changed"),
        "expected the backing-file hash check to fail, got: {message:?}"
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

#[test]
fn raw_guest_fio_verify_survives_three_daemon_sigkills() {
    run_guest_kill_restart(&ImageCase::raw(), 3);
}

#[test]
fn qcow2_luks_guest_fio_verify_survives_three_daemon_sigkills() {
    const PASS: &str = "e2e-kill-pass";
    let key = std::env::temp_dir().join(format!("vuq-e2e-kill-{}.key", std::process::id()));
    std::fs::write(&key, PASS).expect("key file");
    let case = ImageCase::qcow2_luks(
        PASS,
        vec!["--key-secret-file".to_owned(), key.display().to_string()],
    );
    run_guest_kill_restart(&case, 3);
}

#[test]
fn raw_live_resize_under_guest_io() {
    run_guest_live_resize(&ImageCase::raw(), 320 * 1024 * 1024);
}
