//! Unit tests of LUKS2: the large-sector cipher against OpenSSL, and header round trips on
//! in-memory storage (cryptsetup interop is in tests/luks2.rs).

use openssl::symm::{Cipher, Crypter, Mode};

use super::binhdr;
use super::create::{format, Luks2CreateParams, DEFAULT_DATA_OFFSET};
use super::kdf::KdfChoice;
use super::unit::DiskCipher;
use super::volume::{CopyUsed, Luks2Header, Luks2Volume};
use super::Luks2Error;
use crate::crypto::luks::create::parse_cipher;
use crate::crypto::luks::pbkdf::LuksHash;
use crate::crypto::secret::Passphrase;
use crate::crypto::sector::{CipherMode, CipherSpec, IvGen};
use crate::storage::{MemStorage, Storage};

fn openssl_unit(spec: CipherSpec, key: &[u8], unit: &mut [u8], iv_sector: u64, mode: Mode) {
    let (cipher, iv) = match (spec.mode, key.len()) {
        (CipherMode::Xts, 32) => (Cipher::aes_128_xts(), u128::from(iv_sector).to_le_bytes()),
        (CipherMode::Xts, 64) => (Cipher::aes_256_xts(), u128::from(iv_sector).to_le_bytes()),
        (CipherMode::Cbc, 32) => {
            let mut iv = u128::from(iv_sector).to_le_bytes();
            if matches!(spec.iv, IvGen::Essiv(_)) {
                let k = openssl::sha::sha256(key);
                let mut c =
                    Crypter::new(Cipher::aes_256_ecb(), Mode::Encrypt, &k, None).expect("ecb");
                c.pad(false);
                let mut out = [0u8; 32];
                let n = c.update(&iv, &mut out).expect("update");
                assert_eq!(n, 16);
                iv.copy_from_slice(&out[..16]);
            }
            (Cipher::aes_256_cbc(), iv)
        }
        other => panic!("no oracle for {other:?}"),
    };
    let mut c = Crypter::new(cipher, mode, key, Some(&iv)).expect("crypter");
    c.pad(false);
    let mut out = vec![0u8; unit.len() + 32];
    let n = c.update(unit, &mut out).expect("update");
    let m = c.finalize(&mut out[n..]).expect("final");
    unit.copy_from_slice(&out[..n + m]);
}

#[test]
fn large_sectors_match_openssl_with_iv_counting_512_byte_units() {
    for (name, key_len) in [
        ("aes-256-xts-plain64", 64),
        ("aes-128-xts-plain64", 32),
        ("aes-256-cbc-essiv:sha256", 32),
        ("aes-256-cbc-plain64", 32),
    ] {
        let spec = parse_cipher(name).expect("spec");
        let key: Vec<u8> = (0..key_len)
            .map(|i: u8| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        for unit in [1024usize, 4096] {
            let c = DiskCipher::new(spec, &key, unit).expect("cipher");
            // 19 units: more than one 8-unit chunk and a partial chunk.
            let plain: Vec<u8> = (0..unit * 19)
                .map(|i| u8::try_from(i % 251).expect("byte"))
                .collect();
            let first_iv = 0xffff_fff0u64;
            let mut ours = plain.clone();
            c.encrypt(&mut ours, first_iv).expect("encrypt");
            let mut oracle = plain.clone();
            for (k, u) in oracle.chunks_mut(unit).enumerate() {
                let iv = first_iv + (k * unit / 512) as u64;
                openssl_unit(spec, &key, u, iv, Mode::Encrypt);
            }
            assert!(ours == oracle, "{name} unit {unit} encrypt");
            let mut to = vec![0u8; plain.len()];
            c.encrypt_to(&plain, &mut to, first_iv).expect("encrypt_to");
            assert!(to == oracle, "{name} unit {unit} encrypt_to");
            c.decrypt(&mut ours, first_iv).expect("decrypt");
            assert!(ours == plain, "{name} unit {unit} decrypt");
            assert!(c.encrypt(&mut ours[..unit / 2], 0).is_err());
        }
    }
}

fn fast() -> KdfChoice {
    KdfChoice::Argon2Fixed {
        id: true,
        time: 1,
        memory_kib: 64,
        cpus: 1,
    }
}

fn mem_volume(sector_size: u32) -> (MemStorage, Luks2Volume) {
    let st = MemStorage::new(vec![
        0u8;
        usize::try_from(DEFAULT_DATA_OFFSET).expect("fits")
            + (1 << 20)
    ]);
    let params = Luks2CreateParams {
        kdf: fast(),
        sector_size,
        ..Default::default()
    };
    let vol = format(&st, &params, &Passphrase::new(b"first")).expect("format");
    (st, vol)
}

#[test]
fn created_volume_unlocks_and_keyslots_add_and_remove() {
    let (st, mut vol) = mem_volume(4096);
    let key = vol.volume_key().expose().to_vec();
    let again = Luks2Volume::unlock(&st, &Passphrase::new(b"first")).expect("unlock");
    assert_eq!(again.volume_key().expose(), &key[..]);
    assert_eq!(again.header().meta.segment.sector_size, 4096);
    assert!(matches!(
        Luks2Volume::unlock(&st, &Passphrase::new(b"wrong")),
        Err(Luks2Error::NoKeySlotMatches)
    ));
    let pb = KdfChoice::Pbkdf2Fixed {
        hash: LuksHash::Sha256,
        iterations: 1000,
    };
    let id = vol
        .add_key(&st, &Passphrase::new(b"second"), pb)
        .expect("add");
    assert_eq!(id, 1);
    let h = Luks2Header::read(&st).expect("read");
    assert_eq!(h.bin.seqid, 2);
    assert_eq!(
        h.meta.keyslots[&1].area_offset,
        h.meta.keyslots[&0].area_offset + 258048
    );
    let v2 = Luks2Volume::unlock(&st, &Passphrase::new(b"second")).expect("unlock 2");
    assert_eq!(v2.unlocked_slot(), Some(1));
    assert_eq!(v2.volume_key().expose(), &key[..]);
    vol.remove_key(&st, 0).expect("remove 0");
    assert!(Luks2Volume::unlock(&st, &Passphrase::new(b"first")).is_err());
    assert!(matches!(
        vol.remove_key(&st, 1),
        Err(Luks2Error::LastKeySlot(1))
    ));
    // The freed area is reused first.
    let id = vol
        .add_key(&st, &Passphrase::new(b"third"), pb)
        .expect("add");
    assert_eq!(id, 0);
    Luks2Volume::unlock(&st, &Passphrase::new(b"third")).expect("unlock 3");
}

#[test]
fn a_write_interrupted_after_the_primary_copy_leaves_the_new_header_in_use() {
    let (st, mut vol) = mem_volume(512);
    let pb = KdfChoice::Pbkdf2Fixed {
        hash: LuksHash::Sha1,
        iterations: 1000,
    };
    vol.add_key_primary_only(&st, &Passphrase::new(b"new"), pb)
        .expect("add");
    let h = Luks2Header::read(&st).expect("read");
    assert_eq!(h.used, CopyUsed::Primary);
    assert_eq!(h.meta.keyslots.len(), 2);
    Luks2Volume::unlock(&st, &Passphrase::new(b"new")).expect("new passphrase");
}

#[test]
fn one_bad_checksum_falls_back_to_the_other_copy_and_two_are_refused() {
    let (st, vol) = mem_volume(512);
    let before = vol.header().bin.seqid;
    // Flip a byte of the primary JSON area's padding.
    let mut b = [0u8; 1];
    st.read_at(&mut b, 16000).expect("read");
    st.write_at(&[b[0] ^ 1], 16000).expect("write");
    let h = Luks2Header::read(&st).expect("secondary");
    assert_eq!(h.used, CopyUsed::Secondary);
    assert_eq!(h.bin.seqid, before);
    assert!(h
        .other_problem
        .as_deref()
        .unwrap_or("")
        .contains("checksum"));
    st.write_at(&[1], 0x4000 + 16000).expect("write");
    let e = Luks2Header::read(&st).expect_err("both bad");
    assert!(matches!(e, Luks2Error::NoValidCopy { .. }), "{e}");
}

#[test]
fn json_area_must_hold_the_text_and_a_nul() {
    let v = serde_json::json!({"a": "x".repeat(20000)});
    assert!(matches!(
        binhdr::json_area(&v, 0x4000),
        Err(Luks2Error::JsonTooBig { .. })
    ));
    let area = binhdr::json_area(&serde_json::json!({"a": 1}), 0x4000).expect("fits");
    assert_eq!(area.len(), 0x4000 - 4096);
    assert_eq!(&area[..7], b"{\"a\":1}");
}
