//! Keyslot key derivation: PBKDF2 (sha1/sha256/sha512) and Argon2i / Argon2id (version 0x13,
//! as cryptsetup's libargon2 backend), with resource limits an image cannot exceed, and
//! calibration for new keyslots.
//!
//! Limits: Argon2 memory is capped at [`max_memory_kib`] (4 GiB unless the operator sets
//! another cap with [`set_max_memory_kib`]), Argon2 time × memory at [`MAX_ARGON2_WORK_KIB`]
//! (32 GiB-passes, about ten seconds of one core here), lanes at [`MAX_CPUS`] and PBKDF2
//! iterations at [`MAX_PBKDF2_ITERATIONS`]. A keyslot over any limit is refused before any
//! work starts, with an error that names the keyslot and the limit. Argon2's memory comes from
//! a fallible allocation, so an allocation failure is an error too, never an abort.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::meta::{Kdf, SALT_LEN};
use super::{Luks2Error, Result};
use crate::crypto::luks::pbkdf::{self, LuksHash};
use crate::crypto::secret::{SecretBytes, SecretError};

/// Default cap on Argon2 memory: 4 GiB (in KiB).
pub const DEFAULT_MAX_MEMORY_KIB: u64 = 4 * 1024 * 1024;
/// Cap on Argon2 time × memory (KiB × passes): 32 GiB-passes.
pub const MAX_ARGON2_WORK_KIB: u64 = 32 * 1024 * 1024;
/// Cap on Argon2 lanes (cryptsetup creates at most 4).
pub const MAX_CPUS: u32 = 64;
/// Cap on PBKDF2 iterations (2^25, ten-odd seconds of SHA-256 here).
pub const MAX_PBKDF2_ITERATIONS: u32 = 1 << 25;
/// cryptsetup's minimum Argon2 time cost.
pub const MIN_ARGON2_TIME: u32 = 4;
/// cryptsetup's default Argon2 memory cost for new keyslots: 1 GiB (in KiB).
pub const DEFAULT_CREATE_MEMORY_KIB: u32 = 1024 * 1024;

static MAX_MEMORY_KIB: AtomicU64 = AtomicU64::new(DEFAULT_MAX_MEMORY_KIB);

/// Sets the process-wide cap on Argon2 memory (KiB) for keyslots read from images.
pub fn set_max_memory_kib(kib: u64) {
    MAX_MEMORY_KIB.store(kib, Ordering::Relaxed);
}

/// The current cap on Argon2 memory (KiB).
pub fn max_memory_kib() -> u64 {
    MAX_MEMORY_KIB.load(Ordering::Relaxed)
}

/// Checks `kdf` of keyslot `slot` against the limits.
pub fn check_limits(slot: u32, kdf: &Kdf) -> Result<()> {
    let refuse = |what: String| Err(Luks2Error::KdfLimit { slot, what });
    match *kdf {
        Kdf::Pbkdf2 { iterations, .. } => {
            if iterations == 0 {
                return refuse("PBKDF2 iteration count is zero".into());
            }
            if iterations > MAX_PBKDF2_ITERATIONS {
                return refuse(format!(
                    "{iterations} PBKDF2 iterations exceed the limit of {MAX_PBKDF2_ITERATIONS}"
                ));
            }
        }
        Kdf::Argon2 {
            time,
            memory_kib,
            cpus,
            ..
        } => {
            let max = max_memory_kib();
            if u64::from(memory_kib) > max {
                return refuse(format!(
                    "Argon2 memory {memory_kib} KiB exceeds the limit of {max} KiB \
                     (raise it with --kdf-max-memory)"
                ));
            }
            if cpus == 0 || cpus > MAX_CPUS {
                return refuse(format!("Argon2 lanes {cpus} (1..={MAX_CPUS})"));
            }
            if time == 0 {
                return refuse("Argon2 time cost is zero".into());
            }
            if u64::from(memory_kib) < 8 * u64::from(cpus) {
                return refuse(format!(
                    "Argon2 memory {memory_kib} KiB is below 8 KiB per lane"
                ));
            }
            let work = u64::from(time) * u64::from(memory_kib);
            if work > MAX_ARGON2_WORK_KIB {
                return refuse(format!(
                    "Argon2 time {time} × memory {memory_kib} KiB exceeds the limit of \
                     {MAX_ARGON2_WORK_KIB} KiB-passes"
                ));
            }
        }
    }
    Ok(())
}

/// Derives `out.len()` bytes from `pass` with `kdf` (limits must have been checked).
pub fn derive(kdf: &Kdf, pass: &[u8], out: &mut [u8]) -> Result<()> {
    match kdf {
        Kdf::Pbkdf2 {
            hash,
            iterations,
            salt,
        } => Ok(hash.pbkdf2(pass, salt, *iterations, out)?),
        Kdf::Argon2 {
            id,
            time,
            memory_kib,
            cpus,
            salt,
        } => {
            let params = argon2::Params::new(*memory_kib, *time, *cpus, Some(out.len()))
                .map_err(|e| Luks2Error::Argon2(e.to_string()))?;
            let alg = if *id {
                argon2::Algorithm::Argon2id
            } else {
                argon2::Algorithm::Argon2i
            };
            argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                .hash_password_into(pass, salt, out)
                .map_err(|e| Luks2Error::Argon2(e.to_string()))
        }
    }
}

/// How the KDF of a new keyslot is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KdfChoice {
    /// Argon2id (or Argon2i) calibrated to `time_ms` of wall-clock time here with at most
    /// `max_memory_kib` of memory and `cpus` lanes, as cryptsetup's benchmark does: memory
    /// first (up to the maximum), then time cost (at least 4).
    Argon2Calibrated {
        id: bool,
        time_ms: u64,
        max_memory_kib: u32,
        cpus: u32,
    },
    /// Fixed Argon2 costs (like cryptsetup's --pbkdf-force-iterations with --pbkdf-memory).
    Argon2Fixed {
        id: bool,
        time: u32,
        memory_kib: u32,
        cpus: u32,
    },
    /// PBKDF2 calibrated to `time_ms` of CPU time.
    Pbkdf2Calibrated { hash: LuksHash, time_ms: u64 },
    /// PBKDF2 with a fixed iteration count.
    Pbkdf2Fixed { hash: LuksHash, iterations: u32 },
}

impl KdfChoice {
    /// cryptsetup's default: argon2id, 2000 ms, 1 GiB, min(4, CPUs) lanes.
    pub fn default_argon2id() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(4))
            .unwrap_or(1)
            .clamp(1, 4);
        KdfChoice::Argon2Calibrated {
            id: true,
            time_ms: 2000,
            max_memory_kib: DEFAULT_CREATE_MEMORY_KIB,
            cpus,
        }
    }
}

fn random_salt() -> Result<[u8; SALT_LEN]> {
    let mut s = [0u8; SALT_LEN];
    getrandom::fill(&mut s).map_err(SecretError::Random)?;
    Ok(s)
}

/// Milliseconds one Argon2 run with these costs takes here.
fn time_argon2(id: bool, time: u32, memory_kib: u32, cpus: u32, key_len: usize) -> Result<u64> {
    let kdf = Kdf::Argon2 {
        id,
        time,
        memory_kib,
        cpus,
        salt: [0x5a; SALT_LEN],
    };
    let mut out = SecretBytes::zeroed(key_len);
    let start = Instant::now();
    derive(&kdf, b"calibration passphrase", out.expose_mut())?;
    Ok(u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1))
}

/// A fresh KDF (new salt) for a keyslot that derives `key_len` bytes.
pub fn new_kdf(choice: KdfChoice, key_len: usize) -> Result<Kdf> {
    let salt = random_salt()?;
    Ok(match choice {
        KdfChoice::Argon2Fixed {
            id,
            time,
            memory_kib,
            cpus,
        } => Kdf::Argon2 {
            id,
            time,
            memory_kib,
            cpus,
            salt,
        },
        KdfChoice::Argon2Calibrated {
            id,
            time_ms,
            max_memory_kib,
            cpus,
        } => {
            let cpus = cpus.clamp(1, MAX_CPUS);
            // What we write must open here: never above the opening cap.
            let max_mem = max_memory_kib
                .max(8 * cpus)
                .min(u32::try_from(self::max_memory_kib()).unwrap_or(u32::MAX));
            // Measure a small run (t=1, at most 64 MiB) and scale: Argon2's cost is linear in
            // time × memory.
            let probe_mem = max_mem.min(64 * 1024);
            let probe_ms = time_argon2(id, 1, probe_mem, cpus, key_len)?;
            let per_pass_at_max =
                probe_ms.saturating_mul(u64::from(max_mem)) / u64::from(probe_mem);
            let (time, memory_kib) =
                if per_pass_at_max.saturating_mul(u64::from(MIN_ARGON2_TIME)) > time_ms {
                    // Too slow even at the minimum time: shrink memory (cryptsetup does too).
                    let m = u64::from(probe_mem).saturating_mul(time_ms)
                        / probe_ms.saturating_mul(u64::from(MIN_ARGON2_TIME)).max(1);
                    let m = u32::try_from(m)
                        .unwrap_or(max_mem)
                        .clamp(32.max(8 * cpus), max_mem);
                    (MIN_ARGON2_TIME, m)
                } else {
                    let t = time_ms / per_pass_at_max.max(1);
                    let t = u32::try_from(t).unwrap_or(u32::MAX);
                    (t.max(MIN_ARGON2_TIME), max_mem)
                };
            let mut kdf = Kdf::Argon2 {
                id,
                time,
                memory_kib,
                cpus,
                salt,
            };
            // What we write, we must be able to open under the default limits.
            if let Kdf::Argon2 {
                time, memory_kib, ..
            } = &mut kdf
            {
                let cap =
                    u32::try_from(MAX_ARGON2_WORK_KIB / u64::from(*memory_kib)).unwrap_or(u32::MAX);
                *time = (*time).min(cap).max(1);
            }
            kdf
        }
        KdfChoice::Pbkdf2Fixed { hash, iterations } => Kdf::Pbkdf2 {
            hash,
            iterations: iterations.max(1),
            salt,
        },
        KdfChoice::Pbkdf2Calibrated { hash, time_ms } => {
            let rate = pbkdf::count_iters_per_sec(hash, b"calibration", &salt, key_len)?;
            let it = pbkdf::scale_iterations(rate, time_ms, 1, 1000)?;
            Kdf::Pbkdf2 {
                hash,
                iterations: it.min(MAX_PBKDF2_ITERATIONS),
                salt,
            }
        }
    })
}
