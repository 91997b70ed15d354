//! Sector cipher throughput, single thread: every engine path of `crypto::sector` side by side
//! with the `xts-mode` crate and OpenSSL driven per 512-byte sector (one EVP context, re-initialised
//! with each sector's IV, as dm-crypt-style callers do).
//!
//! Run: `cargo bench --bench sector_cipher` (optionally `-- --reps N --ms M`).
//! Prints MB/s (10^6 bytes per second) per core: the median of N repetitions of at least M ms.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::large_enum_variant,
    clippy::cast_sign_loss
)]

use std::hint::black_box;
use std::time::Duration;

use aes::cipher::{Array, KeyInit};
use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;
use vhost_user_qcow2::crypto::sector::{
    CipherAlg, CipherMode, CipherSpec, EnginePath, EssivHash, IvGen, SectorCipher,
};

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Enc,
    Dec,
}

struct Config {
    name: &'static str,
    spec: CipherSpec,
}

const SECTOR: usize = 512;

/// CPU time of this thread: time spent waiting for a core shared with other processes does not
/// count, so the figures are per core even on a busy machine.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f(buf, first_sector)` repeatedly for at least `min` of CPU time; returns MB/s.
fn measure(buf: &mut [u8], min: Duration, mut f: impl FnMut(&mut [u8], u64)) -> f64 {
    let sectors = (buf.len() / SECTOR) as u64;
    // Warm up.
    f(buf, 0);
    let start = thread_cpu_time();
    let mut iters = 0u64;
    loop {
        f(black_box(&mut *buf), iters.wrapping_mul(sectors));
        iters += 1;
        if iters.is_multiple_of(8) && thread_cpu_time() - start >= min {
            break;
        }
    }
    let secs = (thread_cpu_time() - start).as_secs_f64();
    (iters as f64 * buf.len() as f64) / secs / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn openssl_cipher(spec: CipherSpec) -> Option<&'static CipherRef> {
    Some(match (spec.mode, spec.alg) {
        (CipherMode::Xts, CipherAlg::Aes128) => Cipher::aes_128_xts(),
        (CipherMode::Xts, CipherAlg::Aes256) => Cipher::aes_256_xts(),
        (CipherMode::Cbc, CipherAlg::Aes128) => Cipher::aes_128_cbc(),
        (CipherMode::Cbc, CipherAlg::Aes256) => Cipher::aes_256_cbc(),
        _ => return None,
    })
}

/// OpenSSL, one sector at a time: the context keeps the key and is re-initialised with each
/// sector's IV (ESSIV IVs come from a second, ECB context).
struct OpensslPerSector {
    ctx: CipherCtx,
    /// OpenSSL writes out of place (its in-place call wants block-size slack): one sector.
    out: Vec<u8>,
    essiv: Option<CipherCtx>,
    iv: IvGen,
    op: Op,
}

impl OpensslPerSector {
    fn new(spec: CipherSpec, key: &[u8], op: Op) -> Option<Self> {
        let cipher = openssl_cipher(spec)?;
        let mut ctx = CipherCtx::new().unwrap();
        match op {
            Op::Enc => ctx.encrypt_init(Some(cipher), Some(key), None).unwrap(),
            Op::Dec => ctx.decrypt_init(Some(cipher), Some(key), None).unwrap(),
        }
        ctx.set_padding(false);
        let essiv = match spec.iv {
            IvGen::Essiv(EssivHash::Sha256) => {
                let k = openssl::sha::sha256(key);
                let mut e = CipherCtx::new().unwrap();
                e.encrypt_init(Some(Cipher::aes_256_ecb()), Some(&k), None)
                    .unwrap();
                e.set_padding(false);
                Some(e)
            }
            _ => None,
        };
        Some(OpensslPerSector {
            ctx,
            out: vec![0u8; SECTOR + 32],
            essiv,
            iv: spec.iv,
            op,
        })
    }

    fn run(&mut self, buf: &mut [u8], first: u64) {
        for (i, sec) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let sector = first.wrapping_add(i as u64);
            let mut iv = [0u8; 16];
            match self.iv {
                IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
                _ => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            }
            if let Some(e) = &mut self.essiv {
                let mut out = [0u8; 32];
                e.cipher_update(&iv, Some(&mut out)).unwrap();
                iv.copy_from_slice(&out[..16]);
            }
            match self.op {
                Op::Enc => self.ctx.encrypt_init(None, None, Some(&iv)).unwrap(),
                Op::Dec => self.ctx.decrypt_init(None, None, Some(&iv)).unwrap(),
            }
            let n = self.ctx.cipher_update(sec, Some(&mut self.out)).unwrap();
            assert_eq!(n, SECTOR);
            sec.copy_from_slice(&self.out[..SECTOR]);
        }
    }
}

enum XtsMode {
    A128(xts_mode::Xts128<aes::Aes128>),
    A256(xts_mode::Xts128<aes::Aes256>),
}

impl XtsMode {
    fn new(spec: CipherSpec, key: &[u8]) -> Option<Self> {
        if spec.mode != CipherMode::Xts || spec.iv != IvGen::Plain64 {
            return None;
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        Some(match spec.alg {
            CipherAlg::Aes128 => XtsMode::A128(xts_mode::Xts128::new(
                aes::Aes128::new(&Array::try_from(k1).unwrap()),
                aes::Aes128::new(&Array::try_from(k2).unwrap()),
            )),
            CipherAlg::Aes256 => XtsMode::A256(xts_mode::Xts128::new(
                aes::Aes256::new(&Array::try_from(k1).unwrap()),
                aes::Aes256::new(&Array::try_from(k2).unwrap()),
            )),
            CipherAlg::Aes192 => return None,
        })
    }

    fn run(&self, op: Op, buf: &mut [u8], first: u64) {
        let t = xts_mode::get_tweak_default;
        let s = u128::from(first);
        match (self, op) {
            (XtsMode::A128(x), Op::Enc) => x.encrypt_area(buf, SECTOR, s, t),
            (XtsMode::A128(x), Op::Dec) => x.decrypt_area(buf, SECTOR, s, t),
            (XtsMode::A256(x), Op::Enc) => x.encrypt_area(buf, SECTOR, s, t),
            (XtsMode::A256(x), Op::Dec) => x.decrypt_area(buf, SECTOR, s, t),
        }
    }
}

fn main() {
    let mut reps = 7usize;
    let mut ms = 60u64;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--reps" => {
                reps = args[i + 1].parse().unwrap();
                i += 1;
            }
            "--ms" => {
                ms = args[i + 1].parse().unwrap();
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    let min = Duration::from_millis(ms);
    let configs = [
        Config {
            name: "AES-256-XTS",
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                iv: IvGen::Plain64,
            },
        },
        Config {
            name: "AES-128-XTS",
            spec: CipherSpec {
                alg: CipherAlg::Aes128,
                mode: CipherMode::Xts,
                iv: IvGen::Plain64,
            },
        },
        Config {
            name: "AES-256-ECB",
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Ecb,
                iv: IvGen::Null,
            },
        },
        Config {
            name: "AES-256-CBC-ESSIV",
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Cbc,
                iv: IvGen::Essiv(EssivHash::Sha256),
            },
        },
    ];
    let paths: Vec<EnginePath> = [EnginePath::Vaes512, EnginePath::Portable, EnginePath::Soft]
        .into_iter()
        .filter(|p| {
            let ok = p.is_available();
            if !ok {
                println!("note: path {p} not available on this CPU, skipped");
            }
            ok
        })
        .collect();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    #[cfg(target_arch = "x86_64")]
    let features = format!(
        "aes={} vaes={} vpclmulqdq={} avx512f={}",
        is_x86_feature_detected!("aes"),
        is_x86_feature_detected!("vaes"),
        is_x86_feature_detected!("vpclmulqdq"),
        is_x86_feature_detected!("avx512f"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let features = String::new();
    println!("cpu: {model}; {features}");
    println!(
        "sector_cipher: MB/s per core (10^6 B per CPU-second of one thread), median of {reps} runs of >= {ms} ms CPU"
    );
    let mut header = format!("{:<18} {:<4} {:>7}", "cipher", "op", "request");
    for p in &paths {
        header += &format!(" {:>9}", p.name());
    }
    header += &format!(" {:>9} {:>9} {:>9}", "xts-mode", "openssl", "best/ossl");
    println!("{header}");
    for cfg in &configs {
        let key: Vec<u8> = (0..cfg.spec.key_len()).map(|i| (i * 7 + 3) as u8).collect();
        for op in [Op::Enc, Op::Dec] {
            for req in [4096usize, 128 * 1024] {
                let mut buf: Vec<u8> = (0..req).map(|i| (i * 13) as u8).collect();
                let mut line = format!(
                    "{:<18} {:<4} {:>6}K",
                    cfg.name,
                    if op == Op::Enc { "enc" } else { "dec" },
                    req / 1024
                );
                let mut best = 0f64;
                for &p in &paths {
                    let c = SectorCipher::with_path(cfg.spec, &key, p).unwrap();
                    // The software AES is ~100x slower: fewer, shorter runs.
                    let (r, m) = if p == EnginePath::Soft {
                        (3, min / 2)
                    } else {
                        (reps, min)
                    };
                    let v = median(
                        (0..r)
                            .map(|_| {
                                measure(&mut buf, m, |b, s| match op {
                                    Op::Enc => c.encrypt_sectors(b, s).unwrap(),
                                    Op::Dec => c.decrypt_sectors(b, s).unwrap(),
                                })
                            })
                            .collect(),
                    );
                    best = best.max(v);
                    line += &format!(" {v:>9.0}");
                }
                match XtsMode::new(cfg.spec, &key) {
                    Some(x) => {
                        let v = median(
                            (0..reps)
                                .map(|_| measure(&mut buf, min, |b, s| x.run(op, b, s)))
                                .collect(),
                        );
                        line += &format!(" {v:>9.0}");
                    }
                    None => line += &format!(" {:>9}", "-"),
                }
                match OpensslPerSector::new(cfg.spec, &key, op) {
                    Some(mut o) => {
                        let v = median(
                            (0..reps)
                                .map(|_| measure(&mut buf, min, |b, s| o.run(b, s)))
                                .collect(),
                        );
                        line += &format!(" {v:>9.0} {:>8.2}x", best / v);
                    }
                    None => line += &format!(" {:>9} {:>9}", "-", "-"),
                }
                println!("{line}");
            }
        }
    }
    large_sector_rows(&configs, reps, min);
}

/// LUKS2 with 4096-byte encryption sectors (`sector_size: 4096`; IVs still count 512-byte
/// units): `luks2::DiskCipher` (whitening / chaining around the engine's ECB, auto path) beside
/// the same cipher with 512-byte sectors and OpenSSL driven per 4096-byte sector.
fn large_sector_rows(configs: &[Config], reps: usize, min: Duration) {
    use vhost_user_qcow2::crypto::luks::luks2::DiskCipher;
    const UNIT: usize = 4096;
    println!();
    println!("4096-byte encryption sectors (LUKS2 sector_size 4096), MB/s per core:");
    println!(
        "{:<18} {:<4} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "cipher", "op", "request", "unit4096", "unit512", "openssl4k", "4k/ossl"
    );
    for cfg in configs.iter().filter(|c| c.spec.mode != CipherMode::Ecb) {
        let key: Vec<u8> = (0..cfg.spec.key_len()).map(|i| (i * 7 + 3) as u8).collect();
        let big = DiskCipher::new(cfg.spec, &key, UNIT).unwrap();
        let small = DiskCipher::new(cfg.spec, &key, SECTOR).unwrap();
        for op in [Op::Enc, Op::Dec] {
            for req in [4096usize, 128 * 1024] {
                let mut buf: Vec<u8> = (0..req).map(|i| (i * 13) as u8).collect();
                let mut run = |c: &DiskCipher| {
                    median(
                        (0..reps)
                            .map(|_| {
                                measure(&mut buf, min, |b, s| match op {
                                    Op::Enc => c.encrypt(b, s).unwrap(),
                                    Op::Dec => c.decrypt(b, s).unwrap(),
                                })
                            })
                            .collect(),
                    )
                };
                let v4k = run(&big);
                let v512 = run(&small);
                let cipher = openssl_cipher(cfg.spec).unwrap();
                let mut ctx = CipherCtx::new().unwrap();
                match op {
                    Op::Enc => ctx.encrypt_init(Some(cipher), Some(&key), None).unwrap(),
                    Op::Dec => ctx.decrypt_init(Some(cipher), Some(&key), None).unwrap(),
                }
                ctx.set_padding(false);
                let mut essiv = match cfg.spec.iv {
                    IvGen::Essiv(EssivHash::Sha256) => {
                        let k = openssl::sha::sha256(&key);
                        let mut e = CipherCtx::new().unwrap();
                        e.encrypt_init(Some(Cipher::aes_256_ecb()), Some(&k), None)
                            .unwrap();
                        e.set_padding(false);
                        Some(e)
                    }
                    _ => None,
                };
                let mut out = vec![0u8; UNIT + 32];
                let vo = median(
                    (0..reps)
                        .map(|_| {
                            measure(&mut buf, min, |b, first| {
                                for (i, u) in b.chunks_exact_mut(UNIT).enumerate() {
                                    let s = first.wrapping_add((i * UNIT / SECTOR) as u64);
                                    let mut iv = u128::from(s).to_le_bytes();
                                    if let Some(e) = &mut essiv {
                                        let mut o = [0u8; 32];
                                        e.cipher_update(&iv, Some(&mut o)).unwrap();
                                        iv.copy_from_slice(&o[..16]);
                                    }
                                    match op {
                                        Op::Enc => ctx.encrypt_init(None, None, Some(&iv)).unwrap(),
                                        Op::Dec => ctx.decrypt_init(None, None, Some(&iv)).unwrap(),
                                    }
                                    let n = ctx.cipher_update(u, Some(&mut out)).unwrap();
                                    u.copy_from_slice(&out[..n]);
                                }
                            })
                        })
                        .collect(),
                );
                println!(
                    "{:<18} {:<4} {:>6}K {v4k:>9.0} {v512:>9.0} {vo:>9.0} {:>8.2}x",
                    cfg.name,
                    if op == Op::Enc { "enc" } else { "dec" },
                    req / 1024,
                    v4k / vo
                );
            }
        }
    }
}
