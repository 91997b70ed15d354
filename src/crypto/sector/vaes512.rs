//! Fused VAES-512 kernel: XTS, CBC and ECB over whole sectors with AVX-512 VAES.
//!
//! The kernel is written once, generic over [`Lanes`]: four AES blocks (64 contiguous bytes) in
//! one value. [`Zmm`] maps every operation to one AVX-512 instruction on a zmm register;
//! [`X4`] maps it to the same operation on four xmm registers with AES-NI. The two are lane for
//! lane the same computation, so the kernel's logic (tweak derivation, IV placement, chaining,
//! group remainders) is tested against OpenSSL through `X4` on any AES-NI machine, and the zmm
//! mapping is checked at run time by a known-answer self-test against the portable path before
//! [`available`] lets anyone use it.
//!
//! * XTS: one 512-byte sector = 32 blocks = 8 lane vectors in flight. The sector tweaks are
//!   encrypted four sectors at a time (one vector), ahead of the sectors that use them; the
//!   per-block tweaks are `[T, Tx, Tx^2, Tx^3]` for the first vector and a multiplication by
//!   x^4 in every 128-bit lane (shifts and xors) for each next one. The last round key is
//!   xored with the tweak so that AESENCLAST applies both.
//! * CBC decryption: all 32 blocks of a sector in parallel; each previous-ciphertext vector is
//!   built in registers from the ciphertext vector before it (VALIGNQ; the first takes the IV
//!   into lane 0), and the final xor is folded into AESDECLAST.
//! * CBC encryption (serial within a sector): 4 sectors per vector, one per 128-bit lane, and up
//!   to 4 vectors (16 sector chains) in flight.
//!
//! Round keys come from the module's own key schedule (the `aes` crate does not expose them),
//! decryption keys through InvMixColumns. They are stored replicated in all four lanes (64 bytes
//! per round) so that the AES instructions take them straight from memory and a call has no
//! set-up; all are zeroized on drop. Kernel code has no closures (an out-of-line closure would
//! lose the target features).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::portable::BlockImpl;
use super::soft::{inv_mix_columns, SoftAes};
use super::{
    essiv_key, raw_iv, xts_double, Block, CipherAlg, CipherMode, CipherSpec, IvGen,
    SectorCipherError, BLOCKS_PER_SECTOR,
};

const SECTOR: usize = BLOCKS_PER_SECTOR * 16;
/// Lane vectors per sector.
const VPS: usize = BLOCKS_PER_SECTOR / 4;

/// Four AES blocks, lane i = bytes 16i..16i+16.
///
/// Every method is `unsafe`: the caller runs inside a function that enables the target features
/// of the implementation, and pointers are valid for the bytes they touch.
trait Lanes: Copy {
    unsafe fn load(p: *const u8) -> Self;
    unsafe fn store(self, p: *mut u8);
    /// Lane i from `p[i]` (16 bytes each).
    unsafe fn load4(p: [*const u8; 4]) -> Self;
    unsafe fn store4(self, p: [*mut u8; 4]);
    /// The 16 bytes at `p` in every lane.
    unsafe fn bcast(p: *const u8) -> Self;
    unsafe fn xor(self, o: Self) -> Self;
    unsafe fn enc(self, k: Self) -> Self;
    unsafe fn enclast(self, k: Self) -> Self;
    unsafe fn dec(self, k: Self) -> Self;
    unsafe fn declast(self, k: Self) -> Self;
    /// Lane l (a little-endian XTS tweak) multiplied by x^(k0 + l) in GF(2^128), for
    /// k0 + 3 <= 56: shifts, then one carry-less multiply folds the bits shifted out back in.
    /// Applied to a broadcast tweak T it gives `[T x^k0, .., T x^(k0+3)]` with no dependency
    /// on any other vector (no doubling chain).
    unsafe fn mul_x_lanes(self, k0: u32) -> Self;
    /// Lane i = `t[i]` (little-endian), built in registers.
    unsafe fn from_u128(t: [u128; 4]) -> Self;
    /// `[low.lane3, self.lane0, self.lane1, self.lane2]`.
    unsafe fn lanes_up(self, low: Self) -> Self;
}

#[derive(Clone, Copy)]
struct Zmm(__m512i);

impl Lanes for Zmm {
    #[inline(always)]
    unsafe fn load(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 64 readable bytes at p and AVX-512F.
        Zmm(unsafe { _mm512_loadu_si512(p.cast()) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut u8) {
        // SAFETY: the caller guarantees 64 writable bytes at p and AVX-512F.
        unsafe { _mm512_storeu_si512(p.cast(), self.0) }
    }
    #[inline(always)]
    unsafe fn load4(p: [*const u8; 4]) -> Self {
        // SAFETY: the caller guarantees 16 readable bytes at each p[i] and AVX-512F.
        unsafe {
            let v = _mm512_castsi128_si512(_mm_loadu_si128(p[0].cast()));
            let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(p[1].cast()));
            let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(p[2].cast()));
            Zmm(_mm512_inserti32x4::<3>(v, _mm_loadu_si128(p[3].cast())))
        }
    }
    #[inline(always)]
    unsafe fn store4(self, p: [*mut u8; 4]) {
        // SAFETY: the caller guarantees 16 writable bytes at each p[i] and AVX-512F.
        unsafe {
            _mm_storeu_si128(p[0].cast(), _mm512_castsi512_si128(self.0));
            _mm_storeu_si128(p[1].cast(), _mm512_extracti32x4_epi32::<1>(self.0));
            _mm_storeu_si128(p[2].cast(), _mm512_extracti32x4_epi32::<2>(self.0));
            _mm_storeu_si128(p[3].cast(), _mm512_extracti32x4_epi32::<3>(self.0));
        }
    }
    #[inline(always)]
    unsafe fn bcast(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 16 readable bytes at p and AVX-512F.
        Zmm(unsafe { _mm512_broadcast_i32x4(_mm_loadu_si128(p.cast())) })
    }
    #[inline(always)]
    unsafe fn xor(self, o: Self) -> Self {
        // SAFETY: AVX-512F is enabled by the caller.
        Zmm(unsafe { _mm512_xor_si512(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn enc(self, k: Self) -> Self {
        // SAFETY: VAES and AVX-512F are enabled by the caller.
        Zmm(unsafe { _mm512_aesenc_epi128(self.0, k.0) })
    }
    #[inline(always)]
    unsafe fn enclast(self, k: Self) -> Self {
        // SAFETY: VAES and AVX-512F are enabled by the caller.
        Zmm(unsafe { _mm512_aesenclast_epi128(self.0, k.0) })
    }
    #[inline(always)]
    unsafe fn dec(self, k: Self) -> Self {
        // SAFETY: VAES and AVX-512F are enabled by the caller.
        Zmm(unsafe { _mm512_aesdec_epi128(self.0, k.0) })
    }
    #[inline(always)]
    unsafe fn declast(self, k: Self) -> Self {
        // SAFETY: VAES and AVX-512F are enabled by the caller.
        Zmm(unsafe { _mm512_aesdeclast_epi128(self.0, k.0) })
    }
    #[inline(always)]
    unsafe fn mul_x_lanes(self, k0: u32) -> Self {
        // SAFETY: AVX-512F, AVX-512BW (byte shifts) and VPCLMULQDQ are enabled by the caller.
        unsafe {
            let t = self.0;
            let k = i64::from(k0);
            let counts = _mm512_set_epi64(k + 3, k + 3, k + 2, k + 2, k + 1, k + 1, k, k);
            let shifted = _mm512_sllv_epi64(t, counts);
            // The bits each qword shifts out (a count of 64 gives 0).
            let top = _mm512_srlv_epi64(t, _mm512_sub_epi64(_mm512_set1_epi64(64), counts));
            // Low qword's top bits move into the high qword; the high qword's wrap around.
            let carry = _mm512_bslli_epi128::<8>(top);
            let wrap = _mm512_bsrli_epi128::<8>(top);
            // wrap * (x^7 + x^2 + x + 1): wrap < 2^56, so the product fits the low qword.
            let red = _mm512_clmulepi64_epi128::<0x00>(wrap, _mm512_set1_epi64(0x87));
            Zmm(_mm512_xor_si512(shifted, _mm512_xor_si512(carry, red)))
        }
    }
    #[inline(always)]
    unsafe fn from_u128(t: [u128; 4]) -> Self {
        // SAFETY: AVX-512F is enabled by the caller.
        unsafe { Zmm(_mm512_loadu_si512(t.as_ptr().cast())) }
    }
    #[inline(always)]
    unsafe fn lanes_up(self, low: Self) -> Self {
        // SAFETY: AVX-512F is enabled by the caller.
        // (self:low) >> 6 qwords = [low.q6, low.q7, self.q0 .. self.q5].
        Zmm(unsafe { _mm512_alignr_epi64::<6>(self.0, low.0) })
    }
}

/// The same operations on four xmm registers with AES-NI (the tested twin of [`Zmm`]).
#[derive(Clone, Copy)]
struct X4([__m128i; 4]);

impl X4 {
    #[inline(always)]
    unsafe fn zip(self, o: Self, f: impl Fn(__m128i, __m128i) -> __m128i) -> Self {
        X4([
            f(self.0[0], o.0[0]),
            f(self.0[1], o.0[1]),
            f(self.0[2], o.0[2]),
            f(self.0[3], o.0[3]),
        ])
    }
}

impl Lanes for X4 {
    #[inline(always)]
    unsafe fn load(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 64 readable bytes at p.
        unsafe { Self::load4([p, p.add(16), p.add(32), p.add(48)]) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut u8) {
        // SAFETY: the caller guarantees 64 writable bytes at p.
        unsafe { self.store4([p, p.add(16), p.add(32), p.add(48)]) }
    }
    #[inline(always)]
    unsafe fn load4(p: [*const u8; 4]) -> Self {
        // SAFETY: the caller guarantees 16 readable bytes at each p[i]; SSE2 is baseline.
        unsafe {
            X4([
                _mm_loadu_si128(p[0].cast()),
                _mm_loadu_si128(p[1].cast()),
                _mm_loadu_si128(p[2].cast()),
                _mm_loadu_si128(p[3].cast()),
            ])
        }
    }
    #[inline(always)]
    unsafe fn store4(self, p: [*mut u8; 4]) {
        // SAFETY: the caller guarantees 16 writable bytes at each p[i]; SSE2 is baseline.
        unsafe {
            for (v, q) in self.0.iter().zip(p) {
                _mm_storeu_si128(q.cast(), *v);
            }
        }
    }
    #[inline(always)]
    unsafe fn bcast(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 16 readable bytes at p.
        let v = unsafe { _mm_loadu_si128(p.cast()) };
        X4([v; 4])
    }
    #[inline(always)]
    unsafe fn xor(self, o: Self) -> Self {
        // SAFETY: SSE2 is baseline on x86-64.
        unsafe { self.zip(o, |a, b| _mm_xor_si128(a, b)) }
    }
    #[inline(always)]
    unsafe fn enc(self, k: Self) -> Self {
        // SAFETY: AES-NI is enabled by the caller.
        unsafe { self.zip(k, |a, b| _mm_aesenc_si128(a, b)) }
    }
    #[inline(always)]
    unsafe fn enclast(self, k: Self) -> Self {
        // SAFETY: AES-NI is enabled by the caller.
        unsafe { self.zip(k, |a, b| _mm_aesenclast_si128(a, b)) }
    }
    #[inline(always)]
    unsafe fn dec(self, k: Self) -> Self {
        // SAFETY: AES-NI is enabled by the caller.
        unsafe { self.zip(k, |a, b| _mm_aesdec_si128(a, b)) }
    }
    #[inline(always)]
    unsafe fn declast(self, k: Self) -> Self {
        // SAFETY: AES-NI is enabled by the caller.
        unsafe { self.zip(k, |a, b| _mm_aesdeclast_si128(a, b)) }
    }
    #[inline(always)]
    unsafe fn mul_x_lanes(self, k0: u32) -> Self {
        // SAFETY: SSE2 is baseline; PCLMULQDQ is enabled by the caller. Same steps as
        // `Zmm::mul_x_lanes`, one lane per register.
        unsafe {
            let mut out = self.0;
            for (l, t) in (0u32..).zip(out.iter_mut()) {
                let k = k0 + l;
                let shifted = _mm_sll_epi64(*t, _mm_cvtsi32_si128(k.cast_signed()));
                let top = _mm_srl_epi64(*t, _mm_cvtsi32_si128((64 - k).cast_signed()));
                let carry = _mm_slli_si128::<8>(top);
                let wrap = _mm_srli_si128::<8>(top);
                let red = _mm_clmulepi64_si128::<0x00>(wrap, _mm_cvtsi32_si128(0x87));
                *t = _mm_xor_si128(shifted, _mm_xor_si128(carry, red));
            }
            X4(out)
        }
    }
    #[inline(always)]
    unsafe fn from_u128(t: [u128; 4]) -> Self {
        // SAFETY: SSE2 is baseline; each load reads the 16 bytes of one u128.
        X4(t.map(|v| unsafe { _mm_loadu_si128(std::ptr::from_ref(&v).cast()) }))
    }
    #[inline(always)]
    unsafe fn lanes_up(self, low: Self) -> Self {
        X4([low.0[3], self.0[0], self.0[1], self.0[2]])
    }
}

/// FIPS-197 round keys (round 0 first), zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct RoundKeys([Block; 15]);

impl RoundKeys {
    /// Encryption keys and the matching keys for the equivalent inverse cipher (AESDEC order).
    fn expand(alg: CipherAlg, key: &[u8]) -> Result<(Self, Self, usize), SectorCipherError> {
        let soft = SoftAes::new(alg, key)?;
        let rounds = soft.rounds;
        let enc = RoundKeys(soft.rk);
        let mut dec = RoundKeys([[0u8; 16]; 15]);
        dec.0[0] = enc.0[rounds];
        for i in 1..rounds {
            dec.0[i] = enc.0[rounds - i];
            inv_mix_columns(&mut dec.0[i]);
        }
        dec.0[rounds] = enc.0[0];
        Ok((enc, dec, rounds))
    }
}

/// Round keys each repeated in all four 128-bit lanes (64 bytes per round), so the kernel reads
/// them straight from memory; zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
struct Wide([[u8; 64]; 15]);

impl Wide {
    fn from(k: &RoundKeys) -> Self {
        let mut w = Wide([[0u8; 64]; 15]);
        for (wide, key) in w.0.iter_mut().zip(k.0.iter()) {
            for lane in wide.chunks_exact_mut(16) {
                lane.copy_from_slice(key);
            }
        }
        w
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// AVX-512 VAES.
    Zmm,
    /// Four xmm registers with AES-NI (tests only).
    #[cfg_attr(not(test), allow(dead_code))]
    X4,
    /// The same, two lane vectors (8 blocks) per step: the AES-NI + PCLMULQDQ path
    /// ([`super::EnginePath::Aesni`]).
    Aesni,
}

/// A keyed fused kernel.
pub(super) struct Engine {
    kind: Kind,
    mode: CipherMode,
    iv: IvGen,
    rounds: usize,
    enc: Wide,
    dec: Wide,
    /// XTS tweak key (encryption); unused otherwise.
    tweak: Wide,
    /// ESSIV AES-256 key; unused otherwise.
    essiv: Wide,
}

fn cpu_has_features() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
        && is_x86_feature_detected!("aes")
}

fn cpu_has_aesni() -> bool {
    is_x86_feature_detected!("aes") && is_x86_feature_detected!("pclmulqdq")
}

/// Whether the AES-NI build of the kernel can run and passed its self-test on this CPU.
pub(super) fn aesni_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_aesni() && self_test(Kind::Aesni))
}

/// Whether the CPU has the features and the kernel passed its self-test on this CPU.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_features() && self_test(Kind::Zmm))
}

/// Known-answer test of the kernel against the portable path: every key size, mode and IV
/// generator, lengths that exercise every group remainder, sectors across 2^32 and 2^64.
fn self_test(kind: Kind) -> bool {
    use super::portable::{Engine as Portable, HwAes};
    let mut key = [0u8; 64];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::try_from((i * 37 + 11) % 251).unwrap_or(0);
    }
    let mut data = vec![0u8; 21 * SECTOR];
    for (i, b) in data.iter_mut().enumerate() {
        *b = u8::try_from((i * 131 + i / 509) % 256).unwrap_or(0);
    }
    for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
        for (mode, iv) in [
            (CipherMode::Xts, IvGen::Plain64),
            (CipherMode::Xts, IvGen::Plain),
            (CipherMode::Cbc, IvGen::Essiv(super::EssivHash::Sha256)),
            (CipherMode::Cbc, IvGen::Plain64),
            (CipherMode::Ecb, IvGen::Null),
        ] {
            let spec = CipherSpec { alg, mode, iv };
            let key = &key[..spec.key_len()];
            let (Ok(fused), Ok(reference)) = (
                Engine::with_kind(spec, key, kind),
                Portable::<HwAes>::new(spec, key),
            ) else {
                return false;
            };
            for (n, first) in [(1usize, u64::MAX), (5, (1 << 32) - 2), (21, 7)] {
                let pt = &data[..n * SECTOR];
                let mut want = pt.to_vec();
                reference.encrypt(None, &mut want, first);
                let mut got = pt.to_vec();
                fused.encrypt(None, &mut got, first);
                let mut to = vec![0u8; pt.len()];
                fused.encrypt(Some(pt), &mut to, first);
                if got != want || to != want {
                    log::error!("vaes512 kernel self-test failed ({spec:?} encrypt); not used");
                    return false;
                }
                fused.decrypt(&mut got, first);
                if got != pt {
                    log::error!("vaes512 kernel self-test failed ({spec:?} decrypt); not used");
                    return false;
                }
            }
        }
    }
    true
}

impl Engine {
    /// Requires [`available`]; `spec` validated and `key.len() == spec.key_len()`.
    pub(super) fn new(spec: CipherSpec, key: &[u8]) -> Result<Self, SectorCipherError> {
        Self::with_kind(spec, key, Kind::Zmm)
    }

    /// Requires [`aesni_available`]; same preconditions as [`Engine::new`].
    pub(super) fn new_aesni(spec: CipherSpec, key: &[u8]) -> Result<Self, SectorCipherError> {
        Self::with_kind(spec, key, Kind::Aesni)
    }

    /// The kernel on four xmm lanes (AES-NI), a whole sector per step as on zmm: for testing
    /// the zmm build's control flow on CPUs without VAES.
    #[cfg(test)]
    pub(super) fn new_x4(spec: CipherSpec, key: &[u8]) -> Option<Self> {
        if cpu_has_aesni() {
            Self::with_kind(spec, key, Kind::X4).ok()
        } else {
            None
        }
    }

    /// Whether this is the AES-NI build ([`super::EnginePath::Aesni`]).
    pub(super) fn is_aesni(&self) -> bool {
        self.kind == Kind::Aesni
    }

    fn with_kind(spec: CipherSpec, key: &[u8], kind: Kind) -> Result<Self, SectorCipherError> {
        let ok = match kind {
            Kind::Zmm => cpu_has_features(),
            Kind::X4 | Kind::Aesni => cpu_has_aesni(),
        };
        if !ok {
            return Err(SectorCipherError::PathUnavailable {
                path: super::EnginePath::Vaes512,
            });
        }
        let n = spec.alg.aes_key_len();
        let (data_key, tweak_key) = match spec.mode {
            CipherMode::Xts => key.split_at(n),
            CipherMode::Cbc | CipherMode::Ecb => (key, &key[..0]),
        };
        let (enc, dec, rounds) = RoundKeys::expand(spec.alg, data_key)?;
        let tweak = if tweak_key.is_empty() {
            RoundKeys([[0u8; 16]; 15])
        } else {
            RoundKeys::expand(spec.alg, tweak_key)?.0
        };
        let essiv = match spec.iv {
            IvGen::Essiv(hash) => {
                RoundKeys::expand(CipherAlg::Aes256, &essiv_key(hash, key)[..])?.0
            }
            IvGen::Plain | IvGen::Plain64 | IvGen::Null => RoundKeys([[0u8; 16]; 15]),
        };
        Ok(Engine {
            kind,
            mode: spec.mode,
            iv: spec.iv,
            rounds,
            enc: Wide::from(&enc),
            dec: Wide::from(&dec),
            tweak: Wide::from(&tweak),
            essiv: Wide::from(&essiv),
        })
    }

    /// `dst = E(src)`, in place when `src` is `None`; whole sectors, equal lengths.
    pub(super) fn encrypt(&self, src: Option<&[u8]>, dst: &mut [u8], first_sector: u64) {
        let n = dst.len() / SECTOR;
        let len = n * SECTOR;
        let d = dst.as_mut_ptr();
        let s = match src {
            Some(src) if src.len() >= len => src.as_ptr(),
            Some(_) => return,
            None => d.cast_const(),
        };
        // SAFETY: the engine exists only if the CPU has the kind's features (checked in
        // with_kind); s and d are valid for len bytes (s is either a distinct slice at least as
        // long, or d itself, and the kernel reads each block before it writes it).
        unsafe { self.run(true, s, d, n, first_sector) }
    }

    /// Decrypts whole sectors in place.
    pub(super) fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        let n = buf.len() / SECTOR;
        let d = buf.as_mut_ptr();
        // SAFETY: as in `encrypt`, with s == d.
        unsafe { self.run(false, d.cast_const(), d, n, first_sector) }
    }

    /// # Safety
    /// The CPU has the features of `self.kind`; `s` and `d` are valid for `n * 512` bytes and
    /// either equal or non-overlapping.
    unsafe fn run(&self, enc: bool, s: *const u8, d: *mut u8, n: usize, first: u64) {
        let job = Job {
            eng: self,
            enc,
            s,
            d,
            n,
            first,
        };
        match self.kind {
            // SAFETY: forwarded from the caller.
            Kind::Zmm => unsafe { run_zmm(&job) },
            // SAFETY: forwarded from the caller.
            Kind::X4 => unsafe { run_x4(&job) },
            // SAFETY: forwarded from the caller.
            Kind::Aesni => unsafe { run_aesni(&job) },
        }
    }
}

struct Job<'a> {
    eng: &'a Engine,
    enc: bool,
    s: *const u8,
    d: *mut u8,
    n: usize,
    first: u64,
}

#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes")]
unsafe fn run_zmm(job: &Job<'_>) {
    // SAFETY: forwarded from the caller; the features are enabled here.
    unsafe { dispatch::<Zmm, VPS>(job) }
}

#[target_feature(enable = "aes,pclmulqdq")]
unsafe fn run_x4(job: &Job<'_>) {
    // SAFETY: forwarded from the caller; the features are enabled here.
    // Same step width as the zmm build (a whole sector), so the twin runs the same control flow;
    // it spills registers, which only matters for speed.
    unsafe { dispatch::<X4, VPS>(job) }
}

#[target_feature(enable = "aes,pclmulqdq")]
unsafe fn run_aesni(job: &Job<'_>) {
    // SAFETY: forwarded from the caller; the features are enabled here.
    unsafe { dispatch::<X4, 2>(job) }
}

#[inline(always)]
unsafe fn dispatch<V: Lanes, const S: usize>(job: &Job<'_>) {
    // SAFETY: (whole body) forwarded from the caller.
    unsafe {
        match job.eng.rounds {
            10 => dispatch_rounds::<V, 10, S>(job),
            12 => dispatch_rounds::<V, 12, S>(job),
            _ => dispatch_rounds::<V, 14, S>(job),
        }
    }
}

#[inline(always)]
unsafe fn dispatch_rounds<V: Lanes, const R: usize, const S: usize>(job: &Job<'_>) {
    let e = job.eng;
    // SAFETY: (whole body) forwarded from the caller.
    unsafe {
        let keys = Keys::new(e, job.enc);
        match (e.mode, job.enc) {
            (CipherMode::Xts, true) => xts::<V, R, true, S>(&keys, job),
            (CipherMode::Xts, false) => xts::<V, R, false, S>(&keys, job),
            (CipherMode::Cbc, true) => cbc_encrypt::<V, R, S>(&keys, job),
            (CipherMode::Cbc, false) => cbc_decrypt::<V, R, S>(&keys, job),
            (CipherMode::Ecb, true) => ecb::<V, R, true, S>(&keys, job),
            (CipherMode::Ecb, false) => ecb::<V, R, false, S>(&keys, job),
        }
    }
}

/// The round keys one call needs.
struct Keys<'a> {
    /// Encryption or decryption keys of the data cipher, as the call's direction needs.
    data: &'a Wide,
    /// XTS tweak encryption keys.
    tweak: Option<&'a Wide>,
    /// ESSIV encryption keys.
    essiv: Option<&'a Wide>,
}

impl<'a> Keys<'a> {
    fn new(e: &'a Engine, enc: bool) -> Self {
        Keys {
            data: if enc { &e.enc } else { &e.dec },
            tweak: (e.mode == CipherMode::Xts).then_some(&e.tweak),
            essiv: matches!(e.iv, IvGen::Essiv(_)).then_some(&e.essiv),
        }
    }
}

// Kernel code avoids closures: a closure defined in these `#[inline(always)]` functions is not
// compiled with the caller's target features if the compiler keeps it out of line.

/// Round key `r` in every lane (a load, usually folded into the AES instruction).
#[inline(always)]
unsafe fn rk<V: Lanes>(k: &Wide, r: usize) -> V {
    // SAFETY: 64 readable bytes; features enabled by the caller.
    unsafe { V::load(k.0[r].as_ptr()) }
}

/// Encrypts one vector with `rounds` rounds (IVs and tweaks: not the hot loop).
#[inline(always)]
unsafe fn encrypt1<V: Lanes>(x: V, k: &Wide, rounds: usize) -> V {
    // SAFETY: features enabled by the caller.
    unsafe {
        let mut x = x.xor(rk(k, 0));
        for r in 1..rounds {
            x = x.enc(rk(k, r));
        }
        x.enclast(rk(k, rounds))
    }
}

/// IVs of sectors `first .. first + 4` (XTS: the encrypted tweaks), lane i = sector first + i.
#[inline(always)]
unsafe fn ivs4<V: Lanes>(e: &Engine, keys: &Keys<'_>, first: u64) -> [Block; 4] {
    let mut out = [[0u8; 16]; 4];
    let mut s = first;
    for iv in out.iter_mut() {
        *iv = raw_iv(e.iv, s);
        s = s.wrapping_add(1);
    }
    // SAFETY: `out` is 64 bytes; features enabled by the caller.
    unsafe {
        if keys.essiv.is_some() || keys.tweak.is_some() {
            let mut v = V::load(out.as_ptr().cast());
            if let Some(k) = keys.essiv {
                v = encrypt1::<V>(v, k, 14);
            }
            if let Some(k) = keys.tweak {
                v = encrypt1::<V>(v, k, e.rounds);
            }
            v.store(out.as_mut_ptr().cast());
        }
    }
    out
}

/// `S` lane vectors (out of the sector's 8) are processed together: on zmm all 8 (one sector,
/// 32 blocks in flight). Narrower steps are for narrower lane types (an AES-NI build with `S = 2`
/// measured only 0-15 % faster than the portable path on a Cascade Lake core, so none ships).
#[inline(always)]
unsafe fn xts<V: Lanes, const R: usize, const ENC: bool, const S: usize>(
    keys: &Keys<'_>,
    job: &Job<'_>,
) {
    let k = keys.data;
    // The sector tweaks are encrypted one group of four sectors ahead of their use.
    // SAFETY: features enabled by the caller.
    let mut tweaks = unsafe { ivs4::<V>(job.eng, keys, job.first) };
    let mut next = tweaks;
    for i in 0..job.n {
        // SAFETY: (whole loop body) sector i lies within the n sectors the caller vouched for;
        // every vector access is 64 bytes at offset 64 * v < 512 of it; each step loads its
        // vectors before storing them; features enabled.
        unsafe {
            if i % 4 == 0 {
                if i > 0 {
                    tweaks = next;
                }
                if i + 4 < job.n {
                    next = ivs4::<V>(job.eng, keys, job.first.wrapping_add((i + 4) as u64));
                }
            }
            // Block j of the sector is whitened with T x^j. A whole-sector step (zmm, and
            // its xmm twin) derives every vector's tweaks straight from the broadcast T
            // (shifts + one carry-less multiply each, no dependency between vectors). The
            // narrow AES-NI step instead doubles T in general-purpose registers: those units
            // are idle while the vector units run AES, which measured 3-12 % faster on
            // 128-bit lanes than either vector derivation (docs/benchmarks.md).
            let t = V::bcast(tweaks[i % 4].as_ptr());
            let mut ts = u128::from_le_bytes(tweaks[i % 4]);
            let src = job.s.add(i * SECTOR);
            let dst = job.d.add(i * SECTOR);
            for h in 0..VPS / S {
                let mut tw = [t; S];
                for (v, twv) in (0u32..).zip(tw.iter_mut()) {
                    *twv = if S == VPS {
                        t.mul_x_lanes(4 * v)
                    } else {
                        let mut q = [0u128; 4];
                        for qq in q.iter_mut() {
                            *qq = ts;
                            ts = xts_double(ts);
                        }
                        V::from_u128(q)
                    };
                }
                let off = 64 * S * h;
                let mut x = tw;
                for (v, xv) in x.iter_mut().enumerate() {
                    *xv = V::load(src.add(off + 64 * v)).xor(tw[v]).xor(rk::<V>(k, 0));
                }
                for r in 1..R {
                    let key = rk::<V>(k, r);
                    for xv in x.iter_mut() {
                        *xv = if ENC { xv.enc(key) } else { xv.dec(key) };
                    }
                }
                for v in 0..S {
                    let last = rk::<V>(k, R).xor(tw[v]);
                    let y = if ENC {
                        x[v].enclast(last)
                    } else {
                        x[v].declast(last)
                    };
                    y.store(dst.add(off + 64 * v));
                }
            }
        }
    }
    tweaks.zeroize();
    next.zeroize();
}

#[inline(always)]
unsafe fn cbc_decrypt<V: Lanes, const R: usize, const S: usize>(keys: &Keys<'_>, job: &Job<'_>) {
    let k = keys.data;
    let mut ivs = [[0u8; 16]; 4];
    for i in 0..job.n {
        // SAFETY: (whole loop body) sector i lies within the n sectors the caller vouched for;
        // every vector access is 64 bytes at offset 64 * v < 512 of it; the previous-block
        // vectors come from registers (the IV, or the last vector loaded by the step before),
        // so in-place stores never clobber what is still needed; features enabled.
        unsafe {
            if i % 4 == 0 {
                ivs = ivs4::<V>(job.eng, keys, job.first.wrapping_add(i as u64));
            }
            let src = job.s.add(i * SECTOR);
            let dst = job.d.add(i * SECTOR);
            let mut carry = V::bcast(ivs[i % 4].as_ptr());
            for h in 0..VPS / S {
                let off = 64 * S * h;
                let mut c = [carry; S];
                for (v, cv) in c.iter_mut().enumerate() {
                    *cv = V::load(src.add(off + 64 * v));
                }
                let mut prev = [carry; S];
                for v in 0..S {
                    prev[v] = c[v].lanes_up(if v == 0 { carry } else { c[v - 1] });
                }
                carry = c[S - 1];
                let mut x = c;
                for xv in x.iter_mut() {
                    *xv = xv.xor(rk::<V>(k, 0));
                }
                for r in 1..R {
                    let key = rk::<V>(k, r);
                    for xv in x.iter_mut() {
                        *xv = xv.dec(key);
                    }
                }
                for v in 0..S {
                    x[v].declast(rk::<V>(k, R).xor(prev[v]))
                        .store(dst.add(off + 64 * v));
                }
            }
        }
    }
}

/// Sector chains encrypted together: 4 lanes x up to 4 vectors (up to `S` vectors).
#[inline(always)]
unsafe fn cbc_encrypt<V: Lanes, const R: usize, const S: usize>(keys: &Keys<'_>, job: &Job<'_>) {
    let group = 4 * S.min(4);
    let mut i = 0;
    while i < job.n {
        let m = (job.n - i).min(group);
        // SAFETY: sectors i .. i + m are within the caller's n sectors; features enabled.
        unsafe {
            match m.div_ceil(4) {
                1 => cbc_encrypt_group::<V, R, 1>(keys, job, i, m),
                2 => cbc_encrypt_group::<V, R, 2>(keys, job, i, m),
                3 => cbc_encrypt_group::<V, R, 3>(keys, job, i, m),
                _ => cbc_encrypt_group::<V, R, 4>(keys, job, i, m),
            }
        }
        i += m;
    }
}

/// CBC-encrypts sectors `i .. i + m` (`m <= 4 * NV`): lane l of vector v is sector
/// `i + 4v + l`; lanes past `m` run on a scratch sector.
#[inline(always)]
unsafe fn cbc_encrypt_group<V: Lanes, const R: usize, const NV: usize>(
    keys: &Keys<'_>,
    job: &Job<'_>,
    i: usize,
    m: usize,
) {
    let k = keys.data;
    let mut scratch = [0u8; SECTOR];
    let sp = scratch.as_mut_ptr();
    // SAFETY: (whole body) lanes below m point into sectors i .. i + m of the caller's buffers,
    // the others into `scratch`; every access is 16 bytes at offset 16 j < 512; features enabled.
    unsafe {
        let mut src = [[sp.cast_const(); 4]; NV];
        let mut dst = [[sp; 4]; NV];
        for v in 0..NV {
            for l in 0..4 {
                let s = 4 * v + l;
                if s < m {
                    src[v][l] = job.s.add((i + s) * SECTOR);
                    dst[v][l] = job.d.add((i + s) * SECTOR);
                }
            }
        }
        let mut chain = [rk::<V>(k, 0); NV];
        for (v, c) in chain.iter_mut().enumerate() {
            let ivs = ivs4::<V>(job.eng, keys, job.first.wrapping_add((i + 4 * v) as u64));
            *c = V::load(ivs.as_ptr().cast());
        }
        for j in 0..BLOCKS_PER_SECTOR {
            let off = 16 * j;
            let mut x = chain;
            for (v, xv) in x.iter_mut().enumerate() {
                let [p0, p1, p2, p3] = src[v];
                let p = V::load4([p0.add(off), p1.add(off), p2.add(off), p3.add(off)]);
                *xv = p.xor(chain[v]).xor(rk::<V>(k, 0));
            }
            for r in 1..R {
                let key = rk::<V>(k, r);
                for xv in x.iter_mut() {
                    *xv = xv.enc(key);
                }
            }
            for v in 0..NV {
                chain[v] = x[v].enclast(rk::<V>(k, R));
                let [q0, q1, q2, q3] = dst[v];
                chain[v].store4([q0.add(off), q1.add(off), q2.add(off), q3.add(off)]);
            }
        }
    }
    // `scratch` holds only the ciphertext of the unused lanes: nothing to wipe.
}

#[inline(always)]
unsafe fn ecb<V: Lanes, const R: usize, const ENC: bool, const S: usize>(
    keys: &Keys<'_>,
    job: &Job<'_>,
) {
    let k = keys.data;
    for i in 0..job.n {
        for h in 0..VPS / S {
            // SAFETY: sector i is within the caller's n sectors; 64-byte accesses at offsets
            // below 512; each step loads before it stores.
            unsafe {
                let src = job.s.add(i * SECTOR + 64 * S * h);
                let dst = job.d.add(i * SECTOR + 64 * S * h);
                let mut x = [rk::<V>(k, 0); S];
                for (v, xv) in x.iter_mut().enumerate() {
                    *xv = V::load(src.add(64 * v)).xor(rk::<V>(k, 0));
                }
                for r in 1..R {
                    let key = rk::<V>(k, r);
                    for xv in x.iter_mut() {
                        *xv = if ENC { xv.enc(key) } else { xv.dec(key) };
                    }
                }
                for (v, xv) in x.iter().enumerate() {
                    let y = if ENC {
                        xv.enclast(rk::<V>(k, R))
                    } else {
                        xv.declast(rk::<V>(k, R))
                    };
                    y.store(dst.add(64 * v));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x4_kernel_passes_the_self_test() {
        if !cpu_has_aesni() {
            println!("note: no AES-NI + PCLMULQDQ, fused kernel logic not tested");
            return;
        }
        assert!(self_test(Kind::X4));
        assert!(self_test(Kind::Aesni));
        assert!(aesni_available());
    }

    #[test]
    fn zmm_kernel_passes_the_self_test_where_supported() {
        if !cpu_has_features() {
            println!("note: this CPU lacks AVX-512 VAES; zmm kernel not run");
            return;
        }
        assert!(self_test(Kind::Zmm));
        assert!(available());
    }
}
