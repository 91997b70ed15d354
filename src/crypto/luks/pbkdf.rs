//! PBKDF2-HMAC with the hashes LUKS1 headers name, and iteration-count calibration as QEMU's
//! `qcrypto_pbkdf2_count_iters` (crypto/pbkdf.c) does it.

use sha2::Digest;
use thiserror::Error;
use zeroize::Zeroize;

/// Errors of the key-derivation helpers.
#[derive(Debug, Error)]
pub enum PbkdfError {
    #[error("PBKDF2 iteration count is zero")]
    ZeroIterations,
    #[error("cannot read the thread CPU clock")]
    Clock(#[source] std::io::Error),
    #[error("PBKDF2 iteration count does not fit the header (rate {rate}/s, {iter_time_ms} ms)")]
    TooManyIterations { rate: u64, iter_time_ms: u64 },
}

/// The hash algorithms a LUKS1 header may name (`hash_spec`) that we support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LuksHash {
    Sha1,
    Sha256,
    Sha512,
}

impl LuksHash {
    /// Parses a header `hash_spec` string ("sha1", "sha256", "sha512").
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha1" => Some(Self::Sha1),
            "sha256" => Some(Self::Sha256),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    /// The name written into headers.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// PBKDF2-HMAC-`self` of `password` and `salt` with `iterations` rounds, filling `out`.
    pub fn pbkdf2(
        self,
        password: &[u8],
        salt: &[u8],
        iterations: u32,
        out: &mut [u8],
    ) -> Result<(), PbkdfError> {
        if iterations == 0 {
            return Err(PbkdfError::ZeroIterations);
        }
        match self {
            Self::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            Self::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            Self::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
        }
        Ok(())
    }

    /// Writes hash(be32(index) ‖ data) into `out` (at most one digest; `out` may be shorter,
    /// then the digest is truncated). This is the diffusion step of the AF splitter.
    pub(crate) fn hash_indexed(self, index: u32, data: &[u8], out: &mut [u8]) {
        fn run<D: Digest>(index: u32, data: &[u8], out: &mut [u8]) {
            let mut h = D::new();
            h.update(index.to_be_bytes());
            h.update(data);
            let mut d = h.finalize();
            let n = out.len().min(d.len());
            out[..n].copy_from_slice(&d[..n]);
            d.as_mut_slice().zeroize();
        }
        match self {
            Self::Sha1 => run::<sha1::Sha1>(index, data, out),
            Self::Sha256 => run::<sha2::Sha256>(index, data, out),
            Self::Sha512 => run::<sha2::Sha512>(index, data, out),
        }
    }
}

/// CPU time consumed by the calling thread, in milliseconds (QEMU uses getrusage(RUSAGE_THREAD)
/// user time; the thread CPU clock is the same measure with finer resolution).
fn thread_cpu_ms() -> Result<u64, PbkdfError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Err(PbkdfError::Clock(std::io::Error::last_os_error()));
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nsecs = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs.saturating_mul(1000).saturating_add(nsecs / 1_000_000))
}

/// Measures how many PBKDF2 iterations per second this thread runs for the given input shape,
/// as QEMU's `qcrypto_pbkdf2_count_iters`: start at 2^15 iterations and repeat, scaling the
/// count, until one run takes more than 500 ms of CPU time.
pub fn count_iters_per_sec(
    hash: LuksHash,
    key: &[u8],
    salt: &[u8],
    out_len: usize,
) -> Result<u64, PbkdfError> {
    let mut out = vec![0u8; out_len];
    let mut iterations: u64 = 1 << 15;
    let delta_ms = loop {
        let start = thread_cpu_ms()?;
        let it = u32::try_from(iterations).unwrap_or(u32::MAX);
        hash.pbkdf2(key, salt, it, &mut out)?;
        let end = thread_cpu_ms()?;
        let delta = end.saturating_sub(start);
        if delta > 500 || it == u32::MAX {
            break delta.max(1);
        } else if delta < 100 {
            iterations = iterations.saturating_mul(10);
        } else {
            iterations = iterations.saturating_mul(1000) / delta;
        }
    };
    out.zeroize();
    Ok(iterations.saturating_mul(1000) / delta_ms)
}

/// Scales a measured rate (iterations per second) to `iter_time_ms`, divides by `divisor`
/// (8 for the master-key digest, as QEMU and cryptsetup do), and applies the `min` floor.
pub fn scale_iterations(
    rate: u64,
    iter_time_ms: u64,
    divisor: u64,
    min: u32,
) -> Result<u32, PbkdfError> {
    let too_many = PbkdfError::TooManyIterations { rate, iter_time_ms };
    let scaled = rate.checked_mul(iter_time_ms).ok_or(too_many)? / 1000 / divisor.max(1);
    let it =
        u32::try_from(scaled).map_err(|_| PbkdfError::TooManyIterations { rate, iter_time_ms })?;
    Ok(it.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn pbkdf2_matches_rfc6070_and_rfc7914_vectors() {
        let mut out = [0u8; 20];
        LuksHash::Sha1
            .pbkdf2(b"password", b"salt", 2, &mut out)
            .expect("pbkdf2");
        assert_eq!(hex(&out), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
        let mut out = [0u8; 64];
        LuksHash::Sha256
            .pbkdf2(b"passwd", b"salt", 1, &mut out)
            .expect("pbkdf2");
        assert_eq!(
            hex(&out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc\
             49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
        );
    }

    #[test]
    fn zero_iterations_are_refused() {
        let mut out = [0u8; 20];
        assert!(matches!(
            LuksHash::Sha512.pbkdf2(b"p", b"s", 0, &mut out),
            Err(PbkdfError::ZeroIterations)
        ));
    }

    #[test]
    fn scaling_applies_divisor_floor_and_range() {
        assert_eq!(
            scale_iterations(100_000, 2000, 1, 1000).expect("s"),
            200_000
        );
        assert_eq!(scale_iterations(100_000, 2000, 8, 1000).expect("s"), 25_000);
        assert_eq!(scale_iterations(100_000, 10, 8, 1000).expect("s"), 1000);
        assert!(scale_iterations(u64::MAX / 2, 2000, 1, 1000).is_err());
        assert!(scale_iterations(10_000_000_000, 1000, 1, 1000).is_err());
    }

    #[test]
    fn names_round_trip() {
        for h in [LuksHash::Sha1, LuksHash::Sha256, LuksHash::Sha512] {
            assert_eq!(LuksHash::from_name(h.name()), Some(h));
        }
        assert_eq!(LuksHash::from_name("md5"), None);
        assert_eq!(LuksHash::from_name("SHA256"), None);
    }
}
