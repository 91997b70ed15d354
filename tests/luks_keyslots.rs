//! Keyslot management interop with QEMU: slots we add unlock in qemu-io, slots `qemu-img amend`
//! adds unlock here, removing works both ways, the last slot is never removed.

mod luks_common;

use std::path::Path;
use std::process::Command;

use luks_common::*;
use vhost_user_qcow2::crypto::luks::{Iterations, LuksArea, LuksError, LuksVolume};
use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::storage::{FileStorage, OpenFlags};

fn with_volume<R>(f: &Path, pw: &[u8], op: impl FnOnce(&LuksArea<'_>, &mut LuksVolume) -> R) -> R {
    let st = FileStorage::open(f, OpenFlags::default()).expect("open");
    let area = LuksArea::whole(&st).expect("area");
    let mut vol = LuksVolume::unlock(&area, &Passphrase::new(pw)).expect("unlock");
    op(&area, &mut vol)
}

fn amend_add(f: &Path, old: &str, new: &str) {
    run(Command::new("qemu-img")
        .args(["amend", "--object"])
        .arg(format!("secret,id=s0,data={old}"))
        .arg("--object")
        .arg(format!("secret,id=s1,data={new}"))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            f.display()
        ))
        .args(["-o", "state=active,new-secret=s1,iter-time=10"]));
}

#[test]
fn slots_added_here_open_in_qemu_and_slots_qemu_adds_open_here() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("k.luks");
    qemu_create(&f, "one", "", "256K");
    qemu_io(&f, "one", &["write -P 0x33 0 256k"]);
    let plain = qemu_plaintext(&f, "one");

    let slot = with_volume(&f, b"one", |a, v| {
        v.add_key(a, &Passphrase::new(b"two"), Iterations::Fixed(1000))
    })
    .expect("add");
    assert_eq!(slot, 1);
    assert!(qemu_can_open(&f, "two"));
    assert_eq!(qemu_plaintext(&f, "two"), plain);

    amend_add(&f, "one", "three");
    let img = open_ours(&f, b"three", true);
    assert_eq!(read_all(&img), plain);
    drop(img);

    // Remove the slot "one" opens (0); "one" no longer opens anywhere, the others still do.
    with_volume(&f, b"two", |a, v| v.remove_key(a, 0)).expect("remove");
    assert!(!qemu_can_open(&f, "one"));
    assert!(qemu_can_open(&f, "two"));
    assert!(qemu_can_open(&f, "three"));
    let st = FileStorage::open(&f, OpenFlags::default()).expect("open");
    let area = LuksArea::whole(&st).expect("area");
    assert!(matches!(
        LuksVolume::unlock(&area, &Passphrase::new(b"one")),
        Err(LuksError::NoKeySlotMatches)
    ));
    drop(st);
    // The erased key material is gone from the file: slot 0's area no longer holds it.
    let img = open_ours(&f, b"three", true);
    assert_eq!(read_all(&img), plain);
}

#[test]
fn the_last_active_slot_is_never_removed_and_full_headers_refuse_more_keys() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("last.luks");
    qemu_create(&f, "only", "", "64K");
    let before = std::fs::read(&f).expect("read");
    let err = with_volume(&f, b"only", |a, v| v.remove_key(a, 0)).expect_err("refused");
    assert!(matches!(err, LuksError::LastKeySlot(0)), "{err}");
    assert!(chain(&err).contains("last active"));
    assert_eq!(std::fs::read(&f).expect("read"), before);
    let err = with_volume(&f, b"only", |a, v| v.remove_key(a, 3)).expect_err("inactive");
    assert!(matches!(err, LuksError::SlotNotActive(3)));

    with_volume(&f, b"only", |a, v| {
        for i in 1..8 {
            let slot = v
                .add_key(
                    a,
                    &Passphrase::new(format!("k{i}").as_bytes()),
                    Iterations::Fixed(1000),
                )
                .expect("add");
            assert_eq!(slot, i);
        }
        assert!(matches!(
            v.add_key(a, &Passphrase::new(b"k9"), Iterations::Fixed(1000)),
            Err(LuksError::NoFreeKeySlot)
        ));
    });
    assert!(qemu_can_open(&f, "k7"));
    assert!(qemu_can_open(&f, "only"));
}
