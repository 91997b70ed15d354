//! Unit tests of the sector cipher: IEEE 1619 vectors, the `xts-mode` crate and a block-at-a-time
//! reference as oracles, LUKS name parsing, argument checks.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use rand::{Rng, RngCore};

use super::*;

pub(super) fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2));
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

pub(super) const SPECIAL_SECTORS: [u64; 5] = [0, 1, (1 << 32) - 1, 1 << 63, u64::MAX];

pub(super) fn spec(alg: CipherAlg, mode: CipherMode, iv: IvGen) -> CipherSpec {
    CipherSpec { alg, mode, iv }
}

pub(super) fn all_specs() -> Vec<CipherSpec> {
    let mut v = Vec::new();
    for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
        for iv in [
            IvGen::Plain,
            IvGen::Plain64,
            IvGen::Essiv(EssivHash::Sha256),
        ] {
            v.push(spec(alg, CipherMode::Xts, iv));
            v.push(spec(alg, CipherMode::Cbc, iv));
        }
        v.push(spec(alg, CipherMode::Ecb, IvGen::Null));
    }
    v
}

/// Paths this CPU can run (forced explicitly).
pub(super) fn paths() -> Vec<EnginePath> {
    let mut v = vec![EnginePath::Portable];
    for p in [EnginePath::Soft, EnginePath::Vaes512, EnginePath::Aesni] {
        if p.is_available() {
            v.push(p);
        } else {
            println!("note: engine path {p} not available here, not tested");
        }
    }
    v
}

pub(super) fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn aes_encrypt_block(alg: CipherAlg, key: &[u8], block: &mut [u8; 16]) {
    let b = &mut Array::cast_slice_from_core_mut(std::slice::from_mut(block))[0];
    match alg {
        CipherAlg::Aes128 => aes::Aes128::new_from_slice(key).unwrap().encrypt_block(b),
        CipherAlg::Aes192 => aes::Aes192::new_from_slice(key).unwrap().encrypt_block(b),
        CipherAlg::Aes256 => aes::Aes256::new_from_slice(key).unwrap().encrypt_block(b),
    }
}

/// The IV of one sector computed from first principles.
fn reference_iv(spec: CipherSpec, key: &[u8], sector: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    match spec.iv {
        IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
        IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        IvGen::Essiv(EssivHash::Sha256) => {
            use sha2::Digest;
            iv[..8].copy_from_slice(&sector.to_le_bytes());
            let k = sha2::Sha256::digest(key);
            aes_encrypt_block(CipherAlg::Aes256, &k, &mut iv);
        }
        IvGen::Null => {}
    }
    iv
}

/// Block-at-a-time reference encryption of whole sectors (XTS through the `xts-mode` crate).
fn reference_encrypt(spec: CipherSpec, key: &[u8], buf: &mut [u8], first: u64) {
    let n = spec.alg.aes_key_len();
    for (i, sec) in buf.chunks_exact_mut(512).enumerate() {
        let sector = first.wrapping_add(i as u64);
        let iv = reference_iv(spec, key, sector);
        match spec.mode {
            CipherMode::Xts => {
                let tweak = Array::from(iv);
                let (k1, k2) = key.split_at(n);
                match spec.alg {
                    CipherAlg::Aes128 => xts_mode::Xts128::new(
                        aes::Aes128::new_from_slice(k1).unwrap(),
                        aes::Aes128::new_from_slice(k2).unwrap(),
                    )
                    .encrypt_sector(sec, tweak),
                    CipherAlg::Aes192 => xts_mode::Xts128::new(
                        aes::Aes192::new_from_slice(k1).unwrap(),
                        aes::Aes192::new_from_slice(k2).unwrap(),
                    )
                    .encrypt_sector(sec, tweak),
                    CipherAlg::Aes256 => xts_mode::Xts128::new(
                        aes::Aes256::new_from_slice(k1).unwrap(),
                        aes::Aes256::new_from_slice(k2).unwrap(),
                    )
                    .encrypt_sector(sec, tweak),
                }
            }
            CipherMode::Cbc => {
                let mut prev = iv;
                for b in sec.chunks_exact_mut(16) {
                    let mut x = [0u8; 16];
                    for k in 0..16 {
                        x[k] = b[k] ^ prev[k];
                    }
                    aes_encrypt_block(spec.alg, key, &mut x);
                    b.copy_from_slice(&x);
                    prev = x;
                }
            }
            CipherMode::Ecb => {
                for b in sec.chunks_exact_mut(16) {
                    let mut x: [u8; 16] = b.try_into().unwrap();
                    aes_encrypt_block(spec.alg, key, &mut x);
                    b.copy_from_slice(&x);
                }
            }
        }
    }
}

/// Encrypts one 512-byte sector whose first bytes are `pt` and returns the first `pt.len()`
/// ciphertext bytes (XTS blocks depend only on the tweak and their index).
fn xts_prefix(path: EnginePath, key: &[u8], sector: u64, pt: &[u8]) -> Vec<u8> {
    let alg = CipherAlg::from_aes_key_len(key.len() / 2).unwrap();
    let c = SectorCipher::with_path(spec(alg, CipherMode::Xts, IvGen::Plain64), key, path).unwrap();
    let mut buf = vec![0u8; 512];
    buf[..pt.len()].copy_from_slice(pt);
    c.encrypt_sectors(&mut buf, sector).unwrap();
    let ct = buf[..pt.len()].to_vec();
    c.decrypt_sectors(&mut buf, sector).unwrap();
    assert_eq!(&buf[..pt.len()], pt);
    ct
}

#[test]
fn ieee1619_xts_aes128_vectors() {
    let v4_ct = "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f4341332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18deb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568";
    let v4_pt: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
    let cases: [(String, u64, Vec<u8>, Vec<u8>); 4] = [
        (
            "00".repeat(32),
            0,
            vec![0; 32],
            hex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
        ),
        (
            "11".repeat(16) + &"22".repeat(16),
            0x33_3333_3333,
            vec![0x44; 32],
            hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
        ),
        (
            "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0".to_owned() + &"22".repeat(16),
            0x33_3333_3333,
            vec![0x44; 32],
            hex("af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89"),
        ),
        (
            "2718281828459045235360287471352631415926535897932384626433832795".to_owned(),
            0,
            v4_pt,
            hex(v4_ct),
        ),
    ];
    for path in paths() {
        for (i, (key, sector, pt, ct)) in cases.iter().enumerate() {
            assert_eq!(
                &xts_prefix(path, &hex(key), *sector, pt),
                ct,
                "IEEE 1619 vector {} on {path}",
                i + 1
            );
        }
    }
}

#[test]
fn every_spec_matches_block_at_a_time_reference() {
    let mut rng = rand::rng();
    for path in paths() {
        for spec in all_specs() {
            let key = random_bytes(spec.key_len());
            let c = SectorCipher::with_path(spec, &key, path).unwrap();
            assert_eq!(c.path(), path);
            let max = if path == EnginePath::Soft { 2 } else { 20 };
            for &first in &SPECIAL_SECTORS {
                let sectors = rng.random_range(1..=max);
                let pt = random_bytes(sectors * 512);
                let mut want = pt.clone();
                reference_encrypt(spec, &key, &mut want, first);
                let mut got = pt.clone();
                c.encrypt_sectors(&mut got, first).unwrap();
                assert!(got == want, "{spec:?} {path} first={first} n={sectors}");
                let mut to = vec![0u8; pt.len()];
                c.encrypt_sectors_to(&pt, &mut to, first).unwrap();
                assert!(to == want, "encrypt_to {spec:?} {path} first={first}");
                c.decrypt_sectors(&mut got, first).unwrap();
                assert!(got == pt, "decrypt {spec:?} {path} first={first}");
            }
        }
    }
}

#[test]
fn sector_numbers_wrap_at_2_pow_64() {
    let spec = spec(CipherAlg::Aes256, CipherMode::Xts, IvGen::Plain64);
    let key = random_bytes(64);
    let c = SectorCipher::with_path(spec, &key, EnginePath::Portable).unwrap();
    let pt = random_bytes(3 * 512);
    let mut a = pt.clone();
    c.encrypt_sectors(&mut a, u64::MAX).unwrap();
    let mut b = pt[512..].to_vec();
    c.encrypt_sectors(&mut b, 0).unwrap();
    assert_eq!(&a[512..], &b[..]);
}

#[test]
fn plain_iv_uses_low_32_bits() {
    let spec = spec(CipherAlg::Aes128, CipherMode::Cbc, IvGen::Plain);
    let key = random_bytes(16);
    let c = SectorCipher::new(spec, &key).unwrap();
    let pt = random_bytes(512);
    let mut a = pt.clone();
    c.encrypt_sectors(&mut a, 5).unwrap();
    let mut b = pt.clone();
    c.encrypt_sectors(&mut b, (7 << 32) | 5).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_lengths_are_rejected() {
    let spec = spec(CipherAlg::Aes256, CipherMode::Xts, IvGen::Plain64);
    let c = SectorCipher::new(spec, &[7u8; 64]).unwrap();
    let mut buf = vec![0u8; 513];
    assert!(matches!(
        c.encrypt_sectors(&mut buf, 0),
        Err(SectorCipherError::UnalignedLength { len: 513 })
    ));
    assert!(buf.iter().all(|&b| b == 0));
    assert!(c.decrypt_sectors(&mut buf[..100], 0).is_err());
    let mut dst = vec![0u8; 1024];
    assert!(matches!(
        c.encrypt_sectors_to(&buf[..512], &mut dst, 0),
        Err(SectorCipherError::LengthMismatch {
            src: 512,
            dst: 1024
        })
    ));
    let mut empty = [];
    c.encrypt_sectors(&mut empty, 0).unwrap();
    assert!(matches!(
        SectorCipher::new(spec, &[0u8; 32]),
        Err(SectorCipherError::KeyLength {
            len: 32,
            expected: 64
        })
    ));
    assert!(matches!(
        SectorCipher::new(
            CipherSpec {
                iv: IvGen::Null,
                ..spec
            },
            &[0u8; 64]
        ),
        Err(SectorCipherError::InvalidSpec { .. })
    ));
}

#[test]
fn luks_names_round_trip() {
    let cases = [
        (
            "xts-plain64",
            64,
            CipherAlg::Aes256,
            CipherMode::Xts,
            IvGen::Plain64,
        ),
        (
            "xts-plain64",
            32,
            CipherAlg::Aes128,
            CipherMode::Xts,
            IvGen::Plain64,
        ),
        (
            "xts-plain",
            48,
            CipherAlg::Aes192,
            CipherMode::Xts,
            IvGen::Plain,
        ),
        (
            "cbc-essiv:sha256",
            32,
            CipherAlg::Aes256,
            CipherMode::Cbc,
            IvGen::Essiv(EssivHash::Sha256),
        ),
        (
            "cbc-plain",
            16,
            CipherAlg::Aes128,
            CipherMode::Cbc,
            IvGen::Plain,
        ),
        (
            "cbc-plain64",
            24,
            CipherAlg::Aes192,
            CipherMode::Cbc,
            IvGen::Plain64,
        ),
        ("ecb", 16, CipherAlg::Aes128, CipherMode::Ecb, IvGen::Null),
    ];
    for (mode_name, key_len, alg, mode, iv) in cases {
        let s = CipherSpec::from_luks("aes", mode_name, key_len).unwrap();
        assert_eq!(s, CipherSpec { alg, mode, iv });
        assert_eq!(s.key_len(), key_len);
        assert_eq!(s.luks_names(), ("aes", mode_name.to_owned()));
    }
    assert_eq!(
        CipherSpec::from_luks("aes", "ecb-null", 32).unwrap().iv,
        IvGen::Null
    );
    assert!(matches!(
        CipherSpec::from_luks("twofish", "xts-plain64", 64),
        Err(SectorCipherError::UnsupportedCipher { .. })
    ));
    for bad in [
        "xts",
        "cbc",
        "cbc-null",
        "ecb-plain",
        "xts-benbi",
        "ctr-plain64",
        "cbc-essiv:sha1",
        "",
    ] {
        assert!(
            matches!(
                CipherSpec::from_luks("aes", bad, 32),
                Err(SectorCipherError::UnsupportedMode { .. })
            ),
            "{bad}"
        );
    }
    for (mode_name, len) in [
        ("xts-plain64", 16),
        ("xts-plain64", 33),
        ("cbc-plain64", 64),
        ("ecb", 0),
    ] {
        assert!(matches!(
            CipherSpec::from_luks("aes", mode_name, len),
            Err(SectorCipherError::NoAlgForKeyLength { .. })
        ));
    }
}

#[test]
fn engine_path_names() {
    for p in [
        EnginePath::Auto,
        EnginePath::Vaes512,
        EnginePath::Aesni,
        EnginePath::Portable,
        EnginePath::Soft,
    ] {
        assert_eq!(EnginePath::from_name(p.name()), Some(p));
    }
    assert_eq!(EnginePath::from_name("fast"), None);
    let c = SectorCipher::new(
        spec(CipherAlg::Aes128, CipherMode::Ecb, IvGen::Null),
        &[1u8; 16],
    )
    .unwrap();
    assert_ne!(c.path(), EnginePath::Auto);
    let dbg = format!("{c:?}");
    assert!(dbg.contains("Ecb") && !dbg.contains("[1, 1"), "{dbg}");
}

#[test]
fn forced_unavailable_path_is_an_error() {
    for p in [EnginePath::Vaes512, EnginePath::Aesni, EnginePath::Soft] {
        if !p.is_available() {
            assert!(matches!(
                SectorCipher::with_path(
                    spec(CipherAlg::Aes128, CipherMode::Ecb, IvGen::Null),
                    &[1u8; 16],
                    p
                ),
                Err(SectorCipherError::PathUnavailable { .. })
            ));
        }
    }
}

#[test]
fn cipher_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SectorCipher>();
}
