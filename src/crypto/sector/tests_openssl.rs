//! Every engine path against OpenSSL: random keys and data, sector numbers 0, 1, 2^32-1, 2^63,
//! 2^64-1, every request length from 1 to 256 sectors, in-place and out-of-place encryption and
//! decryption. OpenSSL is driven one sector at a time with the sector's IV, as dm-crypt does.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use openssl::symm::{Cipher, Crypter, Mode};
use rand::Rng;

use super::tests::{paths, random_bytes, spec, SPECIAL_SECTORS};
use super::*;

fn openssl_cipher(spec: CipherSpec) -> Option<Cipher> {
    Some(match (spec.mode, spec.alg) {
        (CipherMode::Xts, CipherAlg::Aes128) => Cipher::aes_128_xts(),
        (CipherMode::Xts, CipherAlg::Aes256) => Cipher::aes_256_xts(),
        // OpenSSL has no AES-192-XTS; the unit tests cover it against `xts-mode`.
        (CipherMode::Xts, CipherAlg::Aes192) => return None,
        (CipherMode::Cbc, CipherAlg::Aes128) => Cipher::aes_128_cbc(),
        (CipherMode::Cbc, CipherAlg::Aes192) => Cipher::aes_192_cbc(),
        (CipherMode::Cbc, CipherAlg::Aes256) => Cipher::aes_256_cbc(),
        (CipherMode::Ecb, CipherAlg::Aes128) => Cipher::aes_128_ecb(),
        (CipherMode::Ecb, CipherAlg::Aes192) => Cipher::aes_192_ecb(),
        (CipherMode::Ecb, CipherAlg::Aes256) => Cipher::aes_256_ecb(),
    })
}

fn openssl_crypt(cipher: Cipher, mode: Mode, key: &[u8], iv: Option<&[u8]>, data: &mut [u8]) {
    let mut c = Crypter::new(cipher, mode, key, iv).unwrap();
    c.pad(false);
    let mut out = vec![0u8; data.len() + 32];
    let mut n = c.update(data, &mut out).unwrap();
    n += c.finalize(&mut out[n..]).unwrap();
    assert_eq!(n, data.len());
    data.copy_from_slice(&out[..n]);
}

fn openssl_iv(spec: CipherSpec, key: &[u8], sector: u64) -> Option<[u8; 16]> {
    let mut iv = [0u8; 16];
    match spec.iv {
        IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
        IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        IvGen::Essiv(EssivHash::Sha256) => {
            iv[..8].copy_from_slice(&sector.to_le_bytes());
            let k = openssl::sha::sha256(key);
            openssl_crypt(Cipher::aes_256_ecb(), Mode::Encrypt, &k, None, &mut iv);
        }
        IvGen::Null => return None,
    }
    Some(iv)
}

/// OpenSSL encryption or decryption of whole sectors, one EVP context per sector.
fn openssl_sectors(spec: CipherSpec, key: &[u8], data: &mut [u8], first: u64, mode: Mode) {
    let cipher = openssl_cipher(spec).unwrap();
    for (i, sec) in data.chunks_exact_mut(512).enumerate() {
        let iv = openssl_iv(spec, key, first.wrapping_add(i as u64));
        openssl_crypt(cipher, mode, key, iv.as_ref().map(|v| &v[..]), sec);
    }
}

fn openssl_specs() -> Vec<CipherSpec> {
    super::tests::all_specs()
        .into_iter()
        .filter(|s| openssl_cipher(*s).is_some())
        .collect()
}

fn check_request(c: &SectorCipher, key: &[u8], pt: &[u8], first: u64, want: &[u8]) {
    let spec = c.spec();
    let path = c.path();
    let n = pt.len() / 512;
    let mut got = pt.to_vec();
    c.encrypt_sectors(&mut got, first).unwrap();
    assert!(got == want, "encrypt {spec:?} {path} first={first} n={n}");
    let mut to = vec![0xa5u8; pt.len()];
    c.encrypt_sectors_to(pt, &mut to, first).unwrap();
    assert!(to == want, "encrypt_to {spec:?} {path} first={first} n={n}");
    c.decrypt_sectors(&mut got, first).unwrap();
    assert!(got == pt, "decrypt {spec:?} {path} first={first} n={n}");
    let _ = key;
}

/// A cipher on `path`, or (None) the fused kernel on xmm lanes.
fn make(path: Option<EnginePath>, spec: CipherSpec, key: &[u8]) -> Option<SectorCipher> {
    match path {
        Some(p) => Some(SectorCipher::with_path(spec, key, p).unwrap()),
        #[cfg(target_arch = "x86_64")]
        None => SectorCipher::vaes_kernel_on_xmm(spec, key),
        #[cfg(not(target_arch = "x86_64"))]
        None => None,
    }
}

fn all_paths() -> Vec<Option<EnginePath>> {
    let mut v: Vec<_> = paths().into_iter().map(Some).collect();
    v.push(None);
    v
}

#[test]
fn every_path_and_spec_matches_openssl_at_edge_sectors() {
    let mut rng = rand::rng();
    for path in all_paths() {
        let max = if path == Some(EnginePath::Soft) {
            3
        } else {
            70
        };
        for spec in openssl_specs() {
            let key = random_bytes(spec.key_len());
            let Some(c) = make(path, spec, &key) else {
                println!("note: fused kernel on xmm lanes needs AES-NI; not tested");
                continue;
            };
            for &first in &SPECIAL_SECTORS {
                let n = rng.random_range(1..=max);
                let pt = random_bytes(n * 512);
                let mut want = pt.clone();
                openssl_sectors(spec, &key, &mut want, first, Mode::Encrypt);
                let mut back = want.clone();
                openssl_sectors(spec, &key, &mut back, first, Mode::Decrypt);
                assert!(back == pt);
                check_request(&c, &key, &pt, first, &want);
            }
        }
    }
}

/// Every request length 1..=256 sectors; the first sector cycles through the edge sectors.
fn all_lengths(path: Option<EnginePath>, lengths: &[usize], spec_count: usize) {
    let specs = [
        spec(CipherAlg::Aes256, CipherMode::Xts, IvGen::Plain64),
        spec(CipherAlg::Aes128, CipherMode::Xts, IvGen::Plain),
        spec(
            CipherAlg::Aes256,
            CipherMode::Cbc,
            IvGen::Essiv(EssivHash::Sha256),
        ),
        spec(CipherAlg::Aes128, CipherMode::Cbc, IvGen::Plain64),
        spec(CipherAlg::Aes192, CipherMode::Ecb, IvGen::Null),
    ];
    let max = lengths.iter().copied().max().unwrap_or(0);
    for spec in specs.into_iter().take(spec_count) {
        let key = random_bytes(spec.key_len());
        let Some(c) = make(path, spec, &key) else {
            println!("note: fused kernel on xmm lanes needs AES-NI; not tested");
            return;
        };
        let pt = random_bytes(max * 512);
        let oracles: Vec<Vec<u8>> = SPECIAL_SECTORS
            .iter()
            .map(|&first| {
                let mut ct = pt.clone();
                openssl_sectors(spec, &key, &mut ct, first, Mode::Encrypt);
                ct
            })
            .collect();
        for &n in lengths {
            let which = n % SPECIAL_SECTORS.len();
            let len = n * 512;
            check_request(
                &c,
                &key,
                &pt[..len],
                SPECIAL_SECTORS[which],
                &oracles[which][..len],
            );
        }
    }
}

#[test]
fn portable_every_request_length_matches_openssl() {
    all_lengths(
        Some(EnginePath::Portable),
        &(1..=256).collect::<Vec<_>>(),
        5,
    );
}

#[test]
fn vaes512_every_request_length_matches_openssl() {
    if !EnginePath::Vaes512.is_available() {
        println!("note: this CPU lacks AVX-512 VAES/VPCLMULQDQ; vaes512 path not tested");
        return;
    }
    all_lengths(Some(EnginePath::Vaes512), &(1..=256).collect::<Vec<_>>(), 5);
}

#[test]
fn aesni_every_request_length_matches_openssl() {
    if !EnginePath::Aesni.is_available() {
        println!("note: this CPU lacks AES-NI + PCLMULQDQ; aesni path not tested");
        return;
    }
    all_lengths(Some(EnginePath::Aesni), &(1..=256).collect::<Vec<_>>(), 5);
}

#[test]
fn fused_kernel_on_xmm_lanes_every_request_length_matches_openssl() {
    // The VAES-512 kernel's code with each zmm operation done on four xmm registers (AES-NI):
    // its logic is tested here even where the CPU has no VAES.
    all_lengths(None, &(1..=256).collect::<Vec<_>>(), 5);
}

#[test]
fn soft_request_lengths_match_openssl() {
    // The software AES is slow in debug builds: XTS and CBC-ESSIV only, every length up to 9
    // sectors (every remainder of the 8-sector chunks), then the chunk and CBC-lane edges. The
    // mode code is shared with the portable path, which is tested at every length.
    let mut lengths: Vec<usize> = (1..=9).collect();
    lengths.extend([16, 17, 64, 65]);
    all_lengths(Some(EnginePath::Soft), &lengths, 3);
}

/// The complete length sweep for the soft path: too slow for a debug build (the software AES runs
/// at well under 1 MB/s there). `cargo test --release --lib soft_every_request_length -- --ignored`
#[test]
#[ignore]
fn soft_every_request_length_matches_openssl() {
    all_lengths(Some(EnginePath::Soft), &(1..=256).collect::<Vec<_>>(), 5);
}

#[test]
fn env_variable_forces_the_path() {
    // Runs in a child process so that the variable does not leak into other tests.
    if let Ok(want) = std::env::var("VUQ_TEST_EXPECT_PATH") {
        let c = SectorCipher::new(
            spec(CipherAlg::Aes128, CipherMode::Ecb, IvGen::Null),
            &[3; 16],
        )
        .unwrap();
        assert_eq!(c.path().name(), want);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for p in paths() {
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "crypto::sector::tests_openssl::env_variable_forces_the_path",
                "--quiet",
            ])
            .env(PATH_ENV_VAR, p.name())
            .env("VUQ_TEST_EXPECT_PATH", p.name())
            .output()
            .unwrap();
        assert!(out.status.success(), "{PATH_ENV_VAR}={p}: {out:?}");
    }
    let out = std::process::Command::new(&exe)
        .args([
            "--exact",
            "crypto::sector::tests_openssl::env_variable_forces_the_path",
            "--quiet",
        ])
        .env(PATH_ENV_VAR, "bogus")
        .env("VUQ_TEST_EXPECT_PATH", "portable")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a bogus path name must be an error");
}
