//! LUKS2 against the real cryptsetup: images cryptsetup makes (KDFs, sector sizes, ciphers,
//! layouts, keyslots added and killed, tokens) unlock here to the volume key
//! `luksDump --dump-volume-key` prints, data we write decrypts with OpenSSL and the reverse;
//! keyslots and headers we write open in cryptsetup and pass `cryptsetup repair` unchanged;
//! malformed headers are refused and left untouched. KDF costs are kept tiny.

#![allow(clippy::cast_possible_truncation)]

mod common;
mod luks_common;

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::{Blkio, Blkioq, ReqFlags};
use common::{spawn_serve, BIN};
use openssl::symm::{Cipher, Crypter, Mode};
use serde_json::Value;
use vhost_user_qcow2::crypto::luks::luks2::binhdr::{self, BinHeader};
use vhost_user_qcow2::crypto::luks::luks2::{KdfChoice, Luks2Header, Luks2Volume};
use vhost_user_qcow2::crypto::luks::pbkdf::LuksHash;
use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::image::luks::LuksImage;
use vhost_user_qcow2::image::BlockImage;
use vhost_user_qcow2::storage::{FileStorage, OpenFlags, Storage};

use luks_common::{chain, pattern, run};

const PW: &str = "luks2-test-pass";

fn fast_kdf_args() -> Vec<&'static str> {
    vec![
        "--pbkdf-memory",
        "32",
        "--pbkdf-force-iterations",
        "4",
        "--pbkdf-parallel",
        "1",
    ]
}

fn keyfile(dir: &Path, name: &str, pw: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pw).expect("key file");
    p
}

/// `cryptsetup luksFormat --type luks2` of a fresh `size`-byte file with extra options.
fn cs_format(dir: &Path, name: &str, size: u64, extra: &[&str]) -> PathBuf {
    let img = dir.join(name);
    let f = std::fs::File::create(&img).expect("create");
    f.set_len(size).expect("size");
    let key = keyfile(dir, "pw", PW);
    run(Command::new("cryptsetup")
        .args([
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--key-file",
        ])
        .arg(&key)
        .args(extra)
        .arg(&img));
    img
}

/// The volume key cryptsetup reads with `pw`.
fn cs_volume_key(img: &Path, pw: &str) -> Vec<u8> {
    let dir = img.parent().expect("dir");
    let key = keyfile(dir, "dumpkey", pw);
    let out = run(Command::new("cryptsetup")
        .args([
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
        ])
        .arg(&key)
        .arg(img));
    let start = out.find("MK dump:").expect("MK dump") + "MK dump:".len();
    out[start..]
        .split_whitespace()
        .take_while(|w| w.len() == 2)
        .map(|w| u8::from_str_radix(w, 16).expect("hex"))
        .collect()
}

/// Whether cryptsetup opens `img` with `pw` (`open --test-passphrase`).
fn cs_opens(img: &Path, pw: &str) -> bool {
    let dir = img.parent().expect("dir");
    let key = keyfile(dir, "testkey", pw);
    Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(img)
        .output()
        .expect("cryptsetup")
        .status
        .success()
}

/// `cryptsetup luksDump` succeeds, and `cryptsetup repair` succeeds and changes nothing.
fn cs_accepts_unchanged(img: &Path) {
    run(Command::new("cryptsetup").arg("luksDump").arg(img));
    let before = std::fs::read(img).expect("read");
    run(Command::new("cryptsetup")
        .args(["repair", "--batch-mode"])
        .arg(img));
    let after = std::fs::read(img).expect("read");
    assert!(
        before == after,
        "cryptsetup repair changed {}",
        img.display()
    );
}

fn storage(img: &Path, read_only: bool) -> FileStorage {
    FileStorage::open(
        img,
        OpenFlags {
            read_only,
            direct: false,
        },
    )
    .expect("open")
}

fn open_image(img: &Path, pw: &str) -> LuksImage {
    LuksImage::open(
        Box::new(storage(img, false)),
        false,
        &Passphrase::new(pw.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("open {}: {}", img.display(), chain(&e)))
}

fn header(img: &Path) -> Luks2Header {
    Luks2Header::read(&storage(img, true)).expect("header")
}

/// OpenSSL en/decryption of one encryption sector (`unit.len()` bytes) with IV sector `iv`.
fn openssl_unit(encryption: &str, key: &[u8], unit: &mut [u8], iv: u64, mode: Mode) {
    let mut ivb = u128::from(iv).to_le_bytes();
    let cipher = match (encryption, key.len()) {
        ("aes-xts-plain64", 64) => Cipher::aes_256_xts(),
        ("aes-xts-plain64", 32) => Cipher::aes_128_xts(),
        ("aes-cbc-essiv:sha256", 32) => {
            let k = openssl::sha::sha256(key);
            let mut c = Crypter::new(Cipher::aes_256_ecb(), Mode::Encrypt, &k, None).expect("e");
            c.pad(false);
            let mut out = [0u8; 32];
            c.update(&ivb, &mut out).expect("iv");
            ivb.copy_from_slice(&out[..16]);
            Cipher::aes_256_cbc()
        }
        ("aes-cbc-essiv:sha256", 16) => {
            let k = openssl::sha::sha256(key);
            let mut c = Crypter::new(Cipher::aes_256_ecb(), Mode::Encrypt, &k, None).expect("e");
            c.pad(false);
            let mut out = [0u8; 32];
            c.update(&ivb, &mut out).expect("iv");
            ivb.copy_from_slice(&out[..16]);
            Cipher::aes_128_cbc()
        }
        other => panic!("no OpenSSL oracle for {other:?}"),
    };
    let mut c = Crypter::new(cipher, mode, key, Some(&ivb)).expect("crypter");
    c.pad(false);
    let mut out = vec![0u8; unit.len() + 32];
    let n = c.update(unit, &mut out).expect("update");
    let m = c.finalize(&mut out[n..]).expect("final");
    unit.copy_from_slice(&out[..n + m]);
}

/// Applies OpenSSL to `data` (guest bytes at guest offset `at`) unit by unit.
fn openssl_crypt(h: &Luks2Header, key: &[u8], data: &mut [u8], at: u64, mode: Mode) {
    let seg = &h.meta.segment;
    let unit = seg.sector_size as usize;
    for (i, u) in data.chunks_mut(unit).enumerate() {
        let iv = seg.iv_tweak + (at + (i * unit) as u64) / 512;
        openssl_unit(&seg.encryption, key, u, iv, mode);
    }
}

/// The volume key equals cryptsetup's; data written here decrypts with OpenSSL, data OpenSSL
/// encrypts reads back here; capacity is the file after the segment offset.
fn check_interop(img: &Path) {
    let vk = cs_volume_key(img, PW);
    let st = storage(img, false);
    let vol = Luks2Volume::unlock(&st, &Passphrase::new(PW.as_bytes()))
        .unwrap_or_else(|e| panic!("unlock {}: {}", img.display(), chain(&e)));
    assert_eq!(vol.volume_key().expose(), &vk[..], "{}", img.display());
    let h = vol.header().clone();
    let seg = h.meta.segment.clone();
    let file_len = std::fs::metadata(img).expect("meta").len();
    let image = open_image(img, PW);
    assert_eq!(image.capacity(), file_len - seg.offset);
    assert_eq!(image.min_block_size(), seg.sector_size);
    // Ours → OpenSSL.
    let at = 3 * 4096u64;
    let data = pattern(64 * 1024, 7);
    image.write(at, &[IoSlice::new(&data)]).expect("write");
    image.flush().expect("flush");
    let mut raw = vec![0u8; data.len()];
    st.read_at(&mut raw, seg.offset + at).expect("raw");
    assert_ne!(raw, data, "plaintext reached the file");
    openssl_crypt(&h, &vk, &mut raw, at, Mode::Decrypt);
    assert!(
        raw == data,
        "OpenSSL does not decrypt our data: {}",
        img.display()
    );
    // OpenSSL → ours, split across buffers at odd places.
    let at2 = 40 * 4096u64;
    let want = pattern(32 * 1024, 9);
    let mut enc = want.clone();
    openssl_crypt(&h, &vk, &mut enc, at2, Mode::Encrypt);
    st.write_at(&enc, seg.offset + at2).expect("raw write");
    let mut a = vec![0u8; 1536];
    let mut b = vec![0u8; want.len() - 1536];
    image
        .read(at2, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
        .expect("read");
    a.extend_from_slice(&b);
    assert!(a == want, "our read of OpenSSL data: {}", img.display());
    // Misaligned requests are refused with 4096-byte sectors.
    if seg.sector_size > 512 {
        let mut s = vec![0u8; 512];
        assert!(image.read(512, &mut [IoSliceMut::new(&mut s)]).is_err());
        assert!(image.write(4096, &[IoSlice::new(&s)]).is_err());
    }
}

#[test]
fn cryptsetup_images_open_with_cryptsetups_volume_key_and_data_matches_openssl() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut k = fast_kdf_args();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "argon2id-4096-xts512",
            vec!["--pbkdf", "argon2id", "--sector-size", "4096"],
        ),
        (
            "argon2i-512-xts256",
            vec![
                "--pbkdf",
                "argon2i",
                "--sector-size",
                "512",
                "--key-size",
                "256",
            ],
        ),
        (
            "pbkdf2-512-essiv",
            vec![
                "--pbkdf",
                "pbkdf2",
                "--hash",
                "sha512",
                "--cipher",
                "aes-cbc-essiv:sha256",
                "--key-size",
                "256",
                "--sector-size",
                "512",
            ],
        ),
        (
            "pbkdf2-4096-essiv128",
            vec![
                "--pbkdf",
                "pbkdf2",
                "--cipher",
                "aes-cbc-essiv:sha256",
                "--key-size",
                "128",
                "--sector-size",
                "4096",
            ],
        ),
        (
            "offset-metadata-keyslots",
            vec![
                "--pbkdf",
                "argon2id",
                "--offset",
                "8192",
                "--luks2-metadata-size",
                "64k",
                "--luks2-keyslots-size",
                "1m",
                "--sector-size",
                "512",
            ],
        ),
    ];
    for (name, extra) in cases {
        let mut args = extra.clone();
        if args.contains(&"pbkdf2") {
            args.extend(["--pbkdf-force-iterations", "1000"]);
        } else {
            args.extend(k.iter().copied());
        }
        let img = cs_format(d, &format!("{name}.img"), 24 << 20, &args);
        check_interop(&img);
    }
    k.clear();
    // The layout options land where cryptsetup put them.
    let h = header(&d.join("offset-metadata-keyslots.img"));
    assert_eq!(h.bin.hdr_size, 64 * 1024);
    assert_eq!(h.meta.config.keyslots_size, 1 << 20);
    assert_eq!(h.meta.segment.offset, 8192 * 512);
}

#[test]
fn keyslots_added_killed_and_tokens_imported_by_cryptsetup_and_by_us_interoperate() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut args = vec!["--pbkdf", "argon2id", "--sector-size", "4096"];
    args.extend(fast_kdf_args());
    let img = cs_format(d, "slots.img", 20 << 20, &args);
    // cryptsetup adds slot 1 (pbkdf2) and kills slot 0; a token names slot 1.
    let old = keyfile(d, "old", PW);
    let second = keyfile(d, "second", "second-pass");
    run(Command::new("cryptsetup")
        .args([
            "luksAddKey",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(&old)
        .arg(&img)
        .arg(&second));
    let token = r#"{"type":"vuq-test","keyslots":["1"],"note":"a/b \u00e9","nested":{"z":[3,2,1],"a":true}}"#;
    let tok = keyfile(d, "token.json", token);
    run(Command::new("cryptsetup")
        .args(["token", "import", "--json-file"])
        .arg(&tok)
        .arg(&img));
    run(Command::new("cryptsetup")
        .args(["luksKillSlot", "--batch-mode", "--key-file"])
        .arg(&second)
        .arg(&img)
        .arg("0"));
    let st = storage(&img, false);
    assert!(matches!(
        Luks2Volume::unlock(&st, &Passphrase::new(PW.as_bytes())),
        Err(vhost_user_qcow2::crypto::luks::luks2::Luks2Error::NoKeySlotMatches)
    ));
    let mut vol = Luks2Volume::unlock(&st, &Passphrase::new(b"second-pass")).expect("slot 1");
    assert_eq!(vol.unlocked_slot(), Some(1));
    let token_before = header(&img).meta.root["tokens"]["0"].clone();
    let raw_token = tokens_text(&st);
    assert!(raw_token.contains("vuq-test"), "{raw_token}");
    // We add two keyslots (argon2id, pbkdf2) and remove one; cryptsetup opens what remains.
    let a2 = KdfChoice::Argon2Fixed {
        id: true,
        time: 4,
        memory_kib: 32,
        cpus: 1,
    };
    let id = vol
        .add_key(&st, &Passphrase::new(b"ours-argon"), a2)
        .expect("add");
    assert_eq!(id, 0);
    let pb = KdfChoice::Pbkdf2Fixed {
        hash: LuksHash::Sha256,
        iterations: 1000,
    };
    let id2 = vol
        .add_key(&st, &Passphrase::new(b"ours-pbkdf2"), pb)
        .expect("add");
    assert_eq!(id2, 2);
    assert!(cs_opens(&img, "ours-argon"));
    assert!(cs_opens(&img, "ours-pbkdf2"));
    assert!(cs_opens(&img, "second-pass"));
    assert!(!cs_opens(&img, PW));
    vol.remove_key(&st, 2).expect("remove");
    assert!(!cs_opens(&img, "ours-pbkdf2"));
    assert!(cs_opens(&img, "ours-argon"));
    // The token is kept byte for byte in the JSON area.
    let h = header(&img);
    assert_eq!(h.meta.root["tokens"]["0"], token_before);
    assert_eq!(tokens_text(&st), raw_token, "token text changed");
    assert_eq!(cs_volume_key(&img, "ours-argon"), vol.volume_key().expose());
    cs_accepts_unchanged(&img);
    // Removing the last slot bound to the data is refused.
    vol.remove_key(&st, 1).expect("remove 1");
    let e = vol.remove_key(&st, 0).expect_err("last");
    assert!(e.to_string().contains("last"), "{e}");
    assert!(cs_opens(&img, "ours-argon"));
}

#[test]
fn a_kill_between_the_two_header_writes_leaves_a_header_cryptsetup_opens() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut args = vec!["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
    args.push("--sector-size");
    args.push("512");
    let img = cs_format(dir.path(), "crash.img", 20 << 20, &args);
    let st = storage(&img, false);
    let mut vol = Luks2Volume::unlock(&st, &Passphrase::new(PW.as_bytes())).expect("unlock");
    let seq = vol.header().bin.seqid;
    let pb = KdfChoice::Pbkdf2Fixed {
        hash: LuksHash::Sha256,
        iterations: 1000,
    };
    vol.add_key_primary_only(&st, &Passphrase::new(b"half"), pb)
        .expect("add");
    // Primary has seqid + 1, secondary the old one: both cryptsetup and we take the primary.
    let h = header(&img);
    assert_eq!(h.bin.seqid, seq + 1);
    assert!(cs_opens(&img, "half"));
    assert!(cs_opens(&img, PW));
    Luks2Volume::unlock(&st, &Passphrase::new(b"half")).expect("ours");
}

/// The `"tokens":{...}` text of the primary JSON area, as written on disk.
fn tokens_text(st: &FileStorage) -> String {
    let mut area = vec![0u8; 12288];
    st.read_at(&mut area, 4096).expect("area");
    let text = String::from_utf8_lossy(&area).into_owned();
    let a = text.find("\"tokens\":").expect("tokens");
    let b = text.find(",\"segments\":").expect("segments");
    text[a..b].to_owned()
}

/// Rewrites both header copies of `img` with `f` applied to the JSON (valid checksums).
fn tamper(img: &Path, f: impl Fn(&mut Value)) {
    let st = storage(img, false);
    let c = binhdr::read_copy(&st, 0, false).expect("primary");
    let mut json = c.json.clone();
    f(&mut json);
    let area = binhdr::json_area(&json, c.bin.hdr_size).expect("area");
    let mut bin: BinHeader = c.bin.clone();
    bin.seqid += 1;
    binhdr::write_copy(&st, &bin, false, &area).expect("w1");
    binhdr::write_copy(&st, &bin, true, &area).expect("w2");
}

#[test]
fn malformed_headers_are_refused_clearly_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut args = vec!["--pbkdf", "argon2id", "--sector-size", "512"];
    args.extend(fast_kdf_args());
    let base = cs_format(d, "base.img", 17 << 20, &args);
    let base_bytes = std::fs::read(&base).expect("read");
    type Edit = Box<dyn Fn(&Path)>;
    let json = |f: fn(&mut Value)| -> Edit { Box::new(move |p: &Path| tamper(p, f)) };
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "requirements",
            json(|v| {
                v["config"]["requirements"] =
                    serde_json::json!({"mandatory": ["online-reencrypt-v2"]})
            }),
            "requirements",
        ),
        (
            "integrity",
            json(|v| {
                v["segments"]["0"]["integrity"] = serde_json::json!({"type": "hmac(sha256)",
                    "journal_encryption": "none", "journal_integrity": "none"})
            }),
            "integrity",
        ),
        (
            "two-segments",
            json(|v| {
                let mut s = v["segments"]["0"].clone();
                s["offset"] = "33554432".into();
                v["segments"]["0"]["size"] = "1048576".into();
                v["segments"]["1"] = s;
                v["digests"]["0"]["segments"] = serde_json::json!(["0", "1"]);
            }),
            "2 segments",
        ),
        (
            "keyslot-type",
            json(|v| v["keyslots"]["0"]["type"] = "luks3".into()),
            "luks3",
        ),
        (
            "digest-type",
            json(|v| v["digests"]["0"]["type"] = "blake3".into()),
            "blake3",
        ),
        (
            "kdf-type",
            json(|v| v["keyslots"]["0"]["kdf"]["type"] = "scrypt".into()),
            "scrypt",
        ),
        (
            "wrong-type-key-size",
            json(|v| v["keyslots"]["0"]["key_size"] = "64".into()),
            "key_size",
        ),
        (
            "wrong-type-offset",
            json(|v| v["segments"]["0"]["offset"] = 16777216.into()),
            "offset",
        ),
        (
            "area-overlaps-segment",
            json(|v| v["segments"]["0"]["offset"] = "65536".into()),
            "overlaps",
        ),
        (
            "argon2-memory",
            json(|v| v["keyslots"]["0"]["kdf"]["memory"] = (8u64 << 20).into()),
            "exceeds the limit",
        ),
        (
            "argon2-time",
            json(|v| v["keyslots"]["0"]["kdf"]["time"] = 4_000_000_000u64.into()),
            "exceeds the limit",
        ),
        (
            "pbkdf2-iterations",
            json(|v| {
                v["keyslots"]["0"]["kdf"] = serde_json::json!({"type": "pbkdf2", "hash": "sha256",
                    "iterations": 4_000_000_000u64, "salt": v["keyslots"]["0"]["kdf"]["salt"].clone()})
            }),
            "exceed the limit",
        ),
        (
            "digest-iterations",
            json(|v| v["digests"]["0"]["iterations"] = 4_000_000_000u64.into()),
            "exceed the limit",
        ),
        (
            "argon2-lanes",
            json(|v| v["keyslots"]["0"]["kdf"]["cpus"] = 100_000.into()),
            "lanes",
        ),
        (
            "json-too-big",
            Box::new(|p: &Path| {
                // JSON text filling the whole area: no terminating NUL (valid checksums).
                let st = storage(p, false);
                let c = binhdr::read_copy(&st, 0, false).expect("primary");
                let mut area = serde_json::to_vec(&c.json).expect("json");
                area.resize((c.bin.hdr_size - 4096) as usize, b' ');
                for (off, sec) in [(0, false), (c.bin.hdr_size, true)] {
                    st.write_at(&area, off + 4096).expect("area");
                    st.write_at(&binhdr::encode(&c.bin, off, sec, &area), off)
                        .expect("hdr");
                }
            }),
            "no terminating NUL",
        ),
        (
            "both-checksums",
            Box::new(|p: &Path| {
                let st = storage(p, false);
                st.write_at(b"X", 5000).expect("w");
                st.write_at(b"X", 0x4000 + 5000).expect("w");
            }),
            "no valid LUKS2 header copy",
        ),
        (
            "header-size",
            Box::new(|p: &Path| {
                let st = storage(p, false);
                st.write_at(&(8u64 << 20).to_be_bytes(), 8).expect("w");
                st.write_at(&(8u64 << 20).to_be_bytes(), 0x4000 + 8)
                    .expect("w");
            }),
            "out of range",
        ),
    ];
    for (name, edit, want) in cases {
        let img = d.join(format!("{name}.img"));
        std::fs::write(&img, &base_bytes).expect("copy");
        edit(&img);
        let before = std::fs::read(&img).expect("read");
        let t = std::time::Instant::now();
        let e = LuksImage::open(
            Box::new(storage(&img, false)),
            false,
            &Passphrase::new(PW.as_bytes()),
        )
        .err()
        .unwrap_or_else(|| panic!("{name}: opened"));
        let msg = chain(&e);
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(t.elapsed().as_secs() < 5, "{name}: took {:?}", t.elapsed());
        assert!(
            std::fs::read(&img).expect("read") == before,
            "{name}: file changed"
        );
    }
}

#[test]
fn a_bad_primary_checksum_makes_us_use_the_secondary_as_cryptsetup_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut args = vec!["--pbkdf", "argon2id", "--sector-size", "512"];
    args.extend(fast_kdf_args());
    let img = cs_format(dir.path(), "p.img", 17 << 20, &args);
    let st = storage(&img, false);
    st.write_at(b"garbage", 4096 + 9000).expect("w");
    let before = std::fs::read(&img).expect("read");
    let vol = Luks2Volume::unlock(&st, &Passphrase::new(PW.as_bytes())).expect("secondary");
    assert_eq!(
        vol.header().used,
        vhost_user_qcow2::crypto::luks::luks2::volume::CopyUsed::Secondary
    );
    assert!(std::fs::read(&img).expect("read") == before, "file changed");
    assert_eq!(vol.volume_key().expose(), &cs_volume_key(&img, PW)[..]);
}

fn bin(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run")
}

fn bin_ok(args: &[&str]) -> String {
    let o = bin(args);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn cli_create_keyslot_and_info_on_luks2_interoperate_with_cryptsetup() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let pw = keyfile(d, "pw1", "first-pass");
    let pw2 = keyfile(d, "pw2", "second-pass");
    let img = d.join("ours.img");
    let p = |x: &Path| x.to_str().expect("utf8").to_owned();
    let out = bin_ok(&[
        "create",
        "-f",
        "raw",
        "--encrypt",
        "luks2",
        "--pbkdf",
        "argon2id",
        "--pbkdf-force-iterations",
        "4",
        "--pbkdf-memory",
        "64",
        "--pbkdf-parallel",
        "1",
        "--sector-size",
        "4096",
        "--key-secret-file",
        &p(&pw),
        &p(&img),
        "4M",
    ]);
    assert!(out.contains("fmt=luks2"), "{out}");
    assert!(cs_opens(&img, "first-pass"));
    let ours = open_image(&img, "first-pass");
    assert_eq!(ours.capacity(), 4 << 20);
    assert_eq!(ours.min_block_size(), 4096);
    let st = storage(&img, true);
    let vol = Luks2Volume::unlock(&st, &Passphrase::new(b"first-pass")).expect("unlock");
    assert_eq!(cs_volume_key(&img, "first-pass"), vol.volume_key().expose());
    drop(ours);
    cs_accepts_unchanged(&img);
    // keyslot add (pbkdf2) and remove (slot 0) through the CLI.
    let out = bin_ok(&[
        "keyslot",
        "add",
        &p(&img),
        "--key-secret-file",
        &p(&pw),
        "--new-key-secret-file",
        &p(&pw2),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ]);
    assert!(out.contains("added keyslot 1"), "{out}");
    assert!(cs_opens(&img, "second-pass"));
    let out = bin_ok(&[
        "keyslot",
        "remove",
        &p(&img),
        "--key-secret-file",
        &p(&pw2),
        "--slot",
        "0",
    ]);
    assert!(out.contains("removed keyslot 0"), "{out}");
    assert!(!cs_opens(&img, "first-pass"));
    assert!(cs_opens(&img, "second-pass"));
    cs_accepts_unchanged(&img);
    // Removing the last one is refused, file unchanged.
    let before = std::fs::read(&img).expect("read");
    let o = bin(&["keyslot", "remove", &p(&img), "--key-secret-file", &p(&pw2)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("last"), "{o:?}");
    assert!(std::fs::read(&img).expect("read") == before);
    // info and keyslot list.
    let info: Value =
        serde_json::from_str(&bin_ok(&["info", "--output", "json", &p(&img)])).expect("json");
    assert_eq!(info["virtual-size"], 4 << 20);
    assert_eq!(info["format-specific"]["type"], "luks2");
    assert_eq!(info["format-specific"]["data"]["sector-size"], 4096);
    assert_eq!(info["format-specific"]["data"]["seqid"], 3);
    let list: Value =
        serde_json::from_str(&bin_ok(&["keyslot", "list", &p(&img), "--output", "json"]))
            .expect("json");
    assert_eq!(list["keyslots"][0]["slot"], 1);
    assert_eq!(list["keyslots"][0]["kdf"], "pbkdf2");
    let human = bin_ok(&["keyslot", "list", &p(&img)]);
    assert!(
        human.contains("format: LUKS2") && human.contains("keyslot 1: pbkdf2"),
        "{human}"
    );
    // A KDF over the operator's memory cap is refused before any work.
    let mut args = vec!["--pbkdf", "argon2id", "--sector-size", "512"];
    args.extend(fast_kdf_args());
    let cs = cs_format(d, "cs.img", 17 << 20, &args);
    let o = bin(&[
        "keyslot",
        "add",
        &p(&cs),
        "--key-secret-file",
        &p(&d.join("pw")),
        "--new-key-secret-file",
        &p(&pw2),
        "--kdf-max-memory",
        "16",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("exceeds the limit of 16 KiB"), "{err}");
    // LUKS2 inside qcow2 is refused (QEMU has none).
    let o = bin(&[
        "create",
        "-f",
        "qcow2",
        "--encrypt",
        "luks2",
        "--key-secret-file",
        &p(&pw),
        &p(&d.join("q.qcow2")),
        "1M",
    ]);
    assert!(!o.status.success());
}

fn complete(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::uninit()];
    let n = q.do_io(&mut c, 1, None, None).expect("do_io");
    assert_eq!(n, 1);
    // SAFETY: do_io initialised the first `n` completions.
    unsafe { c[0].assume_init_read() }.ret
}

#[test]
fn daemon_serves_cryptsetup_luks2_4096_sectors_with_4k_blocks_and_openssl_agrees() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut args = vec!["--pbkdf", "argon2id", "--sector-size", "4096"];
    args.extend(fast_kdf_args());
    let img = cs_format(d, "served.img", 20 << 20, &args);
    let vk = cs_volume_key(&img, PW);
    let h = header(&img);
    let key = d.join("pw");
    let sock = d.join("l2.sock");
    let child = spawn_serve(
        &sock,
        &img,
        &[
            "--key-secret-file",
            key.to_str().expect("p"),
            "--num-queues",
            "1",
        ],
    );
    // Killed on drop, also when an assertion fails.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let t = std::time::Instant::now();
    let mut b = loop {
        let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
        b.set_str("path", sock.to_str().expect("p")).expect("path");
        if sock.exists() && b.connect().is_ok() {
            break b;
        }
        assert!(
            t.elapsed().as_secs() < 30,
            "no daemon: {}",
            std::fs::read_to_string(d.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    b.set_i32("num-queues", 1).expect("nq");
    let mut out = b.start().expect("start");
    assert_eq!(
        b.get_u64("capacity").expect("capacity"),
        (20 << 20) - (16 << 20)
    );
    assert_eq!(b.get_i32("request-alignment").expect("alignment"), 4096);
    let region = b.alloc_mem_region(1 << 20).expect("region");
    b.map_mem_region(&region).expect("map");
    // SAFETY: the region is a live mapping of region.len bytes owned by `b`; each request is
    // waited for before the buffer is touched again.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    let q = &mut out.queues[0];
    let data = pattern(128 * 1024, 3);
    buf[..data.len()].copy_from_slice(&data);
    q.write(8192, buf.as_ptr(), data.len(), 0, ReqFlags::empty());
    assert_eq!(complete(q), 0);
    q.flush(0, ReqFlags::empty());
    assert_eq!(complete(q), 0);
    // OpenSSL decrypts what the daemon wrote.
    let st = storage(&img, true);
    let mut raw = vec![0u8; data.len()];
    st.read_at(&mut raw, h.meta.segment.offset + 8192)
        .expect("raw");
    openssl_crypt(&h, &vk, &mut raw, 8192, Mode::Decrypt);
    assert!(raw == data, "OpenSSL disagrees with the daemon");
    // The daemon reads what OpenSSL wrote.
    let want = pattern(64 * 1024, 5);
    let mut enc = want.clone();
    openssl_crypt(&h, &vk, &mut enc, 1 << 20, Mode::Encrypt);
    storage(&img, false)
        .write_at(&enc, h.meta.segment.offset + (1 << 20))
        .expect("write");
    q.read(1 << 20, buf.as_mut_ptr(), want.len(), 0, ReqFlags::empty());
    assert_eq!(complete(q), 0);
    assert!(buf[..want.len()] == want[..], "daemon read of OpenSSL data");
    // A request not aligned to 4096 gets an error status and the daemon keeps serving.
    q.read(512, buf.as_mut_ptr(), 512, 0, ReqFlags::empty());
    assert_ne!(complete(q), 0);
    q.read(8192, buf.as_mut_ptr(), 4096, 0, ReqFlags::empty());
    assert_eq!(complete(q), 0);
    assert!(buf[..4096] == data[..4096]);
    drop(out);
    drop(b);
    drop(child);
}
