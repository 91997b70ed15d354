//! Malformed LUKS headers and wrong passphrases: a clear error, and the file byte-for-byte
//! unchanged (compared in full before and after, opened read-write).

mod luks_common;

use std::path::Path;

use luks_common::*;
use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::image::luks::LuksImage;
use vhost_user_qcow2::storage::{FileStorage, OpenFlags};

fn try_open(path: &Path, pw: &[u8]) -> Result<LuksImage, String> {
    let st = FileStorage::open(path, OpenFlags::default()).map_err(|e| chain(&e))?;
    LuksImage::open(Box::new(st), false, &Passphrase::new(pw)).map_err(|e| chain(&e))
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut d = std::fs::read(path).expect("read");
    d[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, d).expect("write");
}

const SLOT0: usize = 208;
const SLOT_LEN: usize = 48;

#[test]
fn malformed_headers_give_clear_errors_and_leave_the_file_untouched() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.luks");
    qemu_create(&good, "pw", "", "256K");
    qemu_io(&good, "pw", &["write -P 0x42 0 256k"]);
    // Sanity: the pristine file opens.
    assert!(try_open(&good, b"pw").is_ok());

    type Corruptor = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Corruptor, &str)> = vec![
        ("bad magic", Box::new(|p| patch(p, 0, b"LUKZ")), "bad magic"),
        (
            "version 2 (a LUKS1 header claiming LUKS2: no valid LUKS2 copy)",
            Box::new(|p| patch(p, 6, &2u16.to_be_bytes())),
            "no valid LUKS2 header copy",
        ),
        (
            "stripes 3999",
            Box::new(|p| patch(p, SLOT0 + 44, &3999u32.to_be_bytes())),
            "stripes 3999 != 4000",
        ),
        (
            "keyslot overlapping payload",
            Box::new(|p| patch(p, SLOT0 + 7 * SLOT_LEN + 40, &3800u32.to_be_bytes())),
            "keyslot 7 overlaps the encrypted payload",
        ),
        (
            "keyslots overlapping each other",
            Box::new(|p| patch(p, SLOT0 + 2 * SLOT_LEN + 40, &600u32.to_be_bytes())),
            "keyslots 1 and 2 overlap",
        ),
        (
            "key length not matching the cipher",
            Box::new(|p| patch(p, 108, &40u32.to_be_bytes())),
            "master key length 40 does not match cipher aes-xts-plain64",
        ),
        (
            "slot iterations 0",
            Box::new(|p| patch(p, SLOT0 + 4, &0u32.to_be_bytes())),
            "keyslot 0 iteration count is zero",
        ),
        (
            "master-key iterations 0",
            Box::new(|p| patch(p, 164, &0u32.to_be_bytes())),
            "master key iteration count is zero",
        ),
        (
            "cipher mode not NUL terminated",
            Box::new(|p| patch(p, 40, &[b'x'; 32])),
            "cipher mode is not NUL terminated",
        ),
        (
            "unsupported cipher",
            Box::new(|p| patch(p, 8, b"twofish\0")),
            "cipher \"twofish\" is not supported",
        ),
        (
            "unsupported mode",
            Box::new(|p| patch(p, 40, b"xts-benbi\0")),
            "benbi",
        ),
        (
            "unsupported hash",
            Box::new(|p| patch(p, 72, b"md5\0\0\0\0")),
            "hash algorithm \"md5\" is not supported",
        ),
        (
            "truncated key material",
            Box::new(|p| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .expect("open");
                f.set_len(4096 + 100_000).expect("truncate");
            }),
            "keyslot 0 key material (4096+256000) lies outside the 104096-byte LUKS area",
        ),
        (
            "file shorter than the header",
            Box::new(|p| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .expect("open");
                f.set_len(100).expect("truncate");
            }),
            "the LUKS area is 100 bytes, 592 needed",
        ),
    ];
    for (i, (what, corrupt, want)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("bad{i}.luks"));
        std::fs::copy(&good, &f).expect("copy");
        corrupt(&f);
        let before = std::fs::read(&f).expect("read");
        let err = try_open(&f, b"pw")
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"));
        assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
        assert_eq!(
            std::fs::read(&f).expect("read"),
            before,
            "{what}: file changed"
        );
        // QEMU refuses it too (except what only we check: the supported-cipher list).
        if !what.starts_with("unsupported mode") {
            assert!(!qemu_can_open(&f, "pw"), "{what}: qemu opened it");
        }
    }
}

#[test]
fn wrong_passphrase_says_no_key_slot_matches_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("w.luks");
    qemu_create(&f, "right", "", "128K");
    let before = std::fs::read(&f).expect("read");
    let err = try_open(&f, b"wrong").err().expect("must fail");
    assert!(err.contains("no key slot matches"), "{err}");
    assert_eq!(std::fs::read(&f).expect("read"), before);
    assert!(try_open(&f, b"right").is_ok());
    assert_eq!(std::fs::read(&f).expect("read"), before);
}
