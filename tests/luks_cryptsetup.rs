//! Raw LUKS1 files made by `cryptsetup luksFormat --type luks1`: the master key we unlock equals
//! the one `cryptsetup luksDump --dump-master-key` prints; what we write, QEMU reads (where QEMU
//! supports the cipher); keys we add, cryptsetup accepts.
//!
//! cryptsetup cannot open devices here (no device-mapper), so its own view of the payload is
//! not available; QEMU's is.

mod luks_common;

use std::path::Path;
use std::process::Command;

use luks_common::*;
use vhost_user_qcow2::crypto::luks::{Iterations, LuksArea, LuksVolume};
use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::image::BlockImage;
use vhost_user_qcow2::storage::{FileStorage, OpenFlags};

fn key_file(dir: &Path, name: &str, pw: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pw).expect("key file");
    p
}

fn luks_format(f: &Path, kf: &Path, cipher: &str, key_bits: u32, hash: &str) {
    let fh = std::fs::File::create(f).expect("create");
    fh.set_len(4 << 20).expect("size");
    drop(fh);
    run(Command::new("cryptsetup")
        .args(["luksFormat", "--type", "luks1", "--batch-mode", "-q"])
        .args(["--pbkdf-force-iterations", "1000"])
        .args(["--cipher", cipher, "--hash", hash])
        .arg(format!("--key-size={key_bits}"))
        .arg("--key-file")
        .arg(kf)
        .arg(f));
}

/// The master key cryptsetup unlocks with `kf`, as bytes.
fn cryptsetup_master_key(f: &Path, kf: &Path) -> Vec<u8> {
    let out = run(Command::new("cryptsetup")
        .args(["luksDump", "--dump-master-key", "-q", "--key-file"])
        .arg(kf)
        .arg(f));
    let dump = out.split("MK dump:").nth(1).expect("MK dump in output");
    dump.split_whitespace()
        .map_while(|w| u8::from_str_radix(w, 16).ok().filter(|_| w.len() == 2))
        .collect()
}

fn our_master_key(f: &Path, pw: &[u8]) -> Vec<u8> {
    let st = FileStorage::open(
        f,
        OpenFlags {
            read_only: true,
            direct: false,
        },
    )
    .expect("open");
    let area = LuksArea::whole(&st).expect("area");
    let vol = LuksVolume::unlock(&area, &Passphrase::new(pw)).expect("unlock");
    vol.master_key().expose().to_vec()
}

#[test]
fn cryptsetup_luks1_master_keys_and_payload_match() {
    let dir = tempfile::tempdir().expect("tmp");
    let kf = key_file(dir.path(), "pw", b"cs-pass");
    // (cipher, key bits, hash, QEMU can read it)
    let cases = [
        ("aes-xts-plain64", 512, "sha256", true),
        ("aes-xts-plain64", 256, "sha1", true),
        ("aes-xts-plain", 256, "sha512", true),
        ("aes-cbc-essiv:sha256", 256, "sha256", true),
        ("aes-cbc-essiv:sha256", 128, "sha512", true),
        ("aes-cbc-plain", 128, "sha1", true),
        ("aes-cbc-plain64", 192, "sha256", false),
        ("aes-ecb", 256, "sha256", false),
    ];
    for (i, (cipher, bits, hash, qemu_ok)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("c{i}.img"));
        luks_format(&f, &kf, cipher, *bits, hash);
        let theirs = cryptsetup_master_key(&f, &kf);
        assert_eq!(theirs.len() * 8, usize::try_from(*bits).expect("bits"));
        assert_eq!(
            our_master_key(&f, b"cs-pass"),
            theirs,
            "{cipher} {bits} {hash}"
        );

        let img = open_ours(&f, b"cs-pass", false);
        // cryptsetup aligns the payload to 1 MiB boundaries (2 MiB for 512-bit keys).
        assert_eq!(img.payload_offset() % (1 << 20), 0);
        assert_eq!(img.capacity(), (4 << 20) - img.payload_offset());
        let data = pattern(256 * 1024, u8::try_from(i).expect("small"));
        write(&img, 64 * 1024, &data);
        img.flush().expect("flush");
        drop(img);
        let img = open_ours(&f, b"cs-pass", true);
        assert_eq!(&read_all(&img)[64 * 1024..320 * 1024], &data[..]);
        drop(img);
        if *qemu_ok {
            let q = qemu_plaintext(&f, "cs-pass");
            assert_eq!(&q[64 * 1024..320 * 1024], &data[..], "{cipher} {bits}");
        }
    }
}

#[test]
fn keys_we_add_to_a_cryptsetup_file_unlock_in_cryptsetup() {
    let dir = tempfile::tempdir().expect("tmp");
    let kf = key_file(dir.path(), "pw", b"first");
    let kf2 = key_file(dir.path(), "pw2", b"second");
    let f = dir.path().join("c.img");
    luks_format(&f, &kf, "aes-xts-plain64", 512, "sha256");
    let st = FileStorage::open(&f, OpenFlags::default()).expect("open");
    let area = LuksArea::whole(&st).expect("area");
    let mut vol = LuksVolume::unlock(&area, &Passphrase::new(b"first")).expect("unlock");
    let slot = vol
        .add_key(&area, &Passphrase::new(b"second"), Iterations::Fixed(1000))
        .expect("add");
    assert_eq!(slot, 1);
    drop(st);
    assert_eq!(
        cryptsetup_master_key(&f, &kf2),
        cryptsetup_master_key(&f, &kf)
    );
    // And a key cryptsetup adds unlocks here.
    let kf3 = key_file(dir.path(), "pw3", b"third");
    run(Command::new("cryptsetup")
        .args([
            "luksAddKey",
            "--batch-mode",
            "-q",
            "--pbkdf-force-iterations",
            "1000",
        ])
        .arg("--key-file")
        .arg(&kf)
        .arg(&f)
        .arg(&kf3));
    assert_eq!(our_master_key(&f, b"third"), cryptsetup_master_key(&f, &kf));
}
