//! End-to-end: a Linux guest in QEMU (TCG) does I/O through vhost-user-blk, fio verifies it with
//! crc32c on both queues, and qemu-io checks afterwards that the bytes landed in the image file.
//!
//! Needs qemu-system-x86_64, qemu-io, qemu-img, qemu-storage-daemon, fio, busybox-static and
//! linux-image-amd64 (.ci/run installs them); fails when they are missing unless
//! `VUQ_SKIP_E2E=1`. `VUQ_E2E_BACKENDS=daemon,qsd` selects backends. See docs/testing.md.

#[path = "guest/rig.rs"]
mod rig;

use rig::{run_guest_fio, Backend, ImageCase};

#[test]
fn raw_image_guest_fio_verify_via_daemon() {
    run_guest_fio(&ImageCase::raw(), Backend::Daemon);
}

#[test]
fn raw_image_guest_fio_verify_via_qemu_storage_daemon() {
    run_guest_fio(&ImageCase::raw(), Backend::QemuStorageDaemon);
}
