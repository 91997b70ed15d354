//! [`super::open_locked`]: which files an open locks, and how.

use std::path::Path;

use super::*;
use crate::qcow2::create::{create, CreateOptions};

fn qcow2(path: &Path, backing: Option<&str>) {
    create(
        path,
        &CreateOptions {
            size: 1 << 20,
            backing_file: backing.map(str::to_owned),
            backing_format: backing.map(|_| "qcow2".to_owned()),
            ..Default::default()
        },
    )
    .expect("create");
}

fn locked(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        locking: Locking::On,
        ..Default::default()
    }
}

#[test]
fn overlay_and_backing_are_locked_writer_and_reader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qcow2(&base, None);
    qcow2(&top, Some("base.qcow2"));
    let (_img, locks) = open_locked(&top, &locked(false), None).expect("open");
    let perms: Vec<_> = locks.locks().iter().map(|l| l.perms()).collect();
    assert_eq!(perms, vec![Perms::WRITE, Perms::READ]);
    // A second writer of the overlay, and any writer of the base, conflict.
    assert!(matches!(
        open_locked(&top, &locked(false), None),
        Err(ImageError::Lock(_))
    ));
    assert!(matches!(
        open_locked(&base, &locked(false), None),
        Err(ImageError::Lock(_))
    ));
    // Another overlay may read the same base.
    let top2 = dir.path().join("top2.qcow2");
    qcow2(&top2, Some("base.qcow2"));
    open_locked(&top2, &locked(false), None).expect("second overlay on the base");
}

#[test]
fn locks_go_with_the_image_and_force_share_needs_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    qcow2(&img, None);
    let opened = open_with_secret(&img, &locked(false), None).expect("open");
    let share = OpenOptions {
        read_only: true,
        locking: Locking::ForceShare,
        ..Default::default()
    };
    open_with_secret(&img, &share, None).expect("force-share beside a writer");
    assert!(matches!(
        open_with_secret(
            &img,
            &OpenOptions {
                locking: Locking::ForceShare,
                ..Default::default()
            },
            None
        ),
        Err(ImageError::ForceShareWritable)
    ));
    drop(opened);
    open_with_secret(&img, &locked(false), None).expect("writer after the first closed");
}

#[test]
fn inactive_open_takes_its_locks_only_on_activate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    qcow2(&img, None);
    let (_src, mut src_locks) = open_locked(&img, &locked(false), None).expect("source");
    let inactive = OpenOptions {
        locking: Locking::Inactive,
        ..Default::default()
    };
    let (_dst, mut dst_locks) = open_locked(&img, &inactive, None).expect("destination opens");
    assert!(
        dst_locks.activate().is_err(),
        "taken while the source writes"
    );
    src_locks.inactivate().expect("source lets go");
    dst_locks.activate().expect("destination takes over");
    assert_eq!(dst_locks.locks()[0].perms(), Perms::WRITE);
}
