//! A self-contained, constant-time software AES (no AES instructions, no lookup tables).
//!
//! Four blocks (64 bytes) are processed at a time. SubBytes is computed on bit planes: each of
//! eight `u64` words holds one bit of all 64 state bytes, and the S-box is evaluated as inversion
//! in GF(2^8) (x^254 by an addition chain of bitsliced multiplications and squarings) followed by
//! the affine map, so there are neither table lookups nor data-dependent branches. ShiftRows,
//! MixColumns and AddRoundKey work on bytes with branch-free arithmetic.
//!
//! It is the block cipher of [`super::EnginePath::Soft`]: slow (tens of MB/s), but independent of
//! the CPU's AES support, so the software code path can be tested on any machine.

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{portable::BlockImpl, Block, CipherAlg, SectorCipherError};

/// Bytes processed together: four AES blocks, one bit plane per `u64`.
const LANES: usize = 64;

type Planes = [u64; 8];

/// Swaps bit (8j + k) with bit (8k + j): transposes the 8x8 bit matrix of a word.
#[inline(always)]
fn transpose8(mut x: u64) -> u64 {
    let t = (x ^ (x >> 7)) & 0x00AA_00AA_00AA_00AA;
    x ^= t ^ (t << 7);
    let t = (x ^ (x >> 14)) & 0x0000_CCCC_0000_CCCC;
    x ^= t ^ (t << 14);
    let t = (x ^ (x >> 28)) & 0x0000_0000_F0F0_F0F0;
    x ^= t ^ (t << 28);
    x
}

/// Plane k bit n = bit k of byte n.
fn to_planes(bytes: &[u8; LANES]) -> Planes {
    let mut p = [0u64; 8];
    for (g, chunk) in bytes.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let t = transpose8(u64::from_le_bytes(w));
        for (k, plane) in p.iter_mut().enumerate() {
            *plane |= ((t >> (8 * k)) & 0xff) << (8 * g);
        }
    }
    p
}

fn from_planes(p: &Planes, bytes: &mut [u8; LANES]) {
    for (g, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        let mut t = 0u64;
        for (k, plane) in p.iter().enumerate() {
            t |= ((plane >> (8 * g)) & 0xff) << (8 * k);
        }
        chunk.copy_from_slice(&transpose8(t).to_le_bytes());
    }
}

/// Reduces a bitsliced polynomial of degree <= 14 modulo x^8 + x^4 + x^3 + x + 1.
#[inline(always)]
fn reduce(mut p: [u64; 15]) -> Planes {
    for k in (8..15).rev() {
        let v = p[k];
        p[k - 8] ^= v;
        p[k - 7] ^= v;
        p[k - 5] ^= v;
        p[k - 4] ^= v;
    }
    let mut out = [0u64; 8];
    out.copy_from_slice(&p[..8]);
    out
}

#[inline(always)]
fn gf_mul(a: &Planes, b: &Planes) -> Planes {
    let mut p = [0u64; 15];
    for (i, ai) in a.iter().enumerate() {
        for (j, bj) in b.iter().enumerate() {
            p[i + j] ^= ai & bj;
        }
    }
    reduce(p)
}

#[inline(always)]
fn gf_sq(a: &Planes) -> Planes {
    let mut p = [0u64; 15];
    for (i, ai) in a.iter().enumerate() {
        p[2 * i] = *ai;
    }
    reduce(p)
}

/// x^254, the multiplicative inverse (0 maps to 0).
fn gf_inv(x: &Planes) -> Planes {
    let x2 = gf_sq(x);
    let x3 = gf_mul(&x2, x);
    let x6 = gf_sq(&x3);
    let x7 = gf_mul(&x6, x);
    let x12 = gf_sq(&x6);
    let x15 = gf_mul(&x12, &x3);
    let x30 = gf_sq(&x15);
    let x60 = gf_sq(&x30);
    let x120 = gf_sq(&x60);
    let x127 = gf_mul(&x120, &x7);
    gf_sq(&x127)
}

/// All-ones plane where bit `i` of `c` is set.
#[inline(always)]
fn const_plane(c: u8, i: usize) -> u64 {
    0u64.wrapping_sub(u64::from((c >> i) & 1))
}

fn sub_bytes(state: &mut [u8; LANES]) {
    let b = gf_inv(&to_planes(state));
    let mut s = [0u64; 8];
    for (i, si) in s.iter_mut().enumerate() {
        *si = b[i]
            ^ b[(i + 4) % 8]
            ^ b[(i + 5) % 8]
            ^ b[(i + 6) % 8]
            ^ b[(i + 7) % 8]
            ^ const_plane(0x63, i);
    }
    from_planes(&s, state);
}

fn inv_sub_bytes(state: &mut [u8; LANES]) {
    let s = to_planes(state);
    let mut b = [0u64; 8];
    for (i, bi) in b.iter_mut().enumerate() {
        *bi = s[(i + 2) % 8] ^ s[(i + 5) % 8] ^ s[(i + 7) % 8] ^ const_plane(0x05, i);
    }
    from_planes(&gf_inv(&b), state);
}

/// State byte index of row `r`, column `c` (column-major, as the block's bytes).
#[inline(always)]
fn idx(c: usize, r: usize) -> usize {
    4 * c + r
}

fn shift_rows(state: &mut [u8; LANES]) {
    for block in state.chunks_exact_mut(16) {
        let old: [u8; 16] = [
            block[0], block[1], block[2], block[3], block[4], block[5], block[6], block[7],
            block[8], block[9], block[10], block[11], block[12], block[13], block[14], block[15],
        ];
        for c in 0..4 {
            for r in 1..4 {
                block[idx(c, r)] = old[idx((c + r) % 4, r)];
            }
        }
    }
}

fn inv_shift_rows(state: &mut [u8; LANES]) {
    for block in state.chunks_exact_mut(16) {
        let old: [u8; 16] = [
            block[0], block[1], block[2], block[3], block[4], block[5], block[6], block[7],
            block[8], block[9], block[10], block[11], block[12], block[13], block[14], block[15],
        ];
        for c in 0..4 {
            for r in 1..4 {
                block[idx((c + r) % 4, r)] = old[idx(c, r)];
            }
        }
    }
}

/// Multiplication by x of eight bytes at once.
#[inline(always)]
fn xtime8(x: u64) -> u64 {
    ((x & 0x7f7f_7f7f_7f7f_7f7f) << 1) ^ (((x >> 7) & 0x0101_0101_0101_0101) * 0x1b)
}

/// Rotates each 32-bit column of `x` so that row r receives row r + k/8.
#[inline(always)]
fn rot_cols(x: u64, k: u32) -> u64 {
    let lo = (x >> k) & ((0x0000_0000_ffff_ffff >> k) * 0x1_0000_0001);
    let hi = (x << (32 - k)) & (((0xffff_ffff_u64 << (32 - k)) & 0xffff_ffff) * 0x1_0000_0001);
    lo | hi
}

fn mix_words(state: &mut [u8; LANES], inverse: bool) {
    for chunk in state.chunks_exact_mut(8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let mut x = u64::from_le_bytes(w);
        if inverse {
            x ^= xtime8(xtime8(x ^ rot_cols(x, 16)));
        }
        let r1 = rot_cols(x, 8);
        let r2 = rot_cols(x, 16);
        let r3 = rot_cols(x, 24);
        let y = xtime8(x ^ r1) ^ r1 ^ r2 ^ r3;
        chunk.copy_from_slice(&y.to_le_bytes());
    }
}

fn add_round_key(state: &mut [u8; LANES], rk: &Block) {
    for block in state.chunks_exact_mut(16) {
        for (s, k) in block.iter_mut().zip(rk) {
            *s ^= k;
        }
    }
}

/// A keyed software AES; round keys are zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(super) struct SoftAes {
    /// FIPS-197 round keys, round 0 first (also used by the VAES kernel).
    pub(super) rk: [Block; 15],
    /// 10, 12 or 14.
    pub(super) rounds: usize,
}

/// InvMixColumns of one block (turns an encryption round key into one for the equivalent
/// inverse cipher, as AESIMC does).
pub(super) fn inv_mix_columns(block: &mut Block) {
    let mut s = [0u8; LANES];
    s[..16].copy_from_slice(block);
    // mix_words(inverse) is InvMixColumns = MixColumns after the xtime^2 pre-step.
    mix_words(&mut s, true);
    block.copy_from_slice(&s[..16]);
    s.zeroize();
}

impl SoftAes {
    fn expand(key: &[u8]) -> Option<Self> {
        let nk = key.len() / 4;
        let rounds = match key.len() {
            16 => 10,
            24 => 12,
            32 => 14,
            _ => return None,
        };
        let total = 4 * (rounds + 1);
        let mut w = [[0u8; 4]; 60];
        for (i, word) in key.chunks_exact(4).enumerate() {
            w[i].copy_from_slice(word);
        }
        let mut rcon = 1u8;
        let mut scratch = [0u8; LANES];
        for i in nk..total {
            let mut t = w[i - 1];
            if i % nk == 0 || (nk > 6 && i % nk == 4) {
                if i % nk == 0 {
                    t.rotate_left(1);
                }
                scratch[..4].copy_from_slice(&t);
                sub_bytes(&mut scratch);
                t.copy_from_slice(&scratch[..4]);
                if i % nk == 0 {
                    t[0] ^= rcon;
                    rcon = (rcon << 1) ^ (0x1b & 0u8.wrapping_sub(rcon >> 7));
                }
            }
            for k in 0..4 {
                w[i][k] = w[i - nk][k] ^ t[k];
            }
        }
        let mut rk = [[0u8; 16]; 15];
        for (r, block) in rk.iter_mut().enumerate().take(rounds + 1) {
            for c in 0..4 {
                block[4 * c..4 * c + 4].copy_from_slice(&w[4 * r + c]);
            }
        }
        w.zeroize();
        scratch.zeroize();
        Some(SoftAes { rk, rounds })
    }

    fn encrypt_state(&self, s: &mut [u8; LANES]) {
        add_round_key(s, &self.rk[0]);
        for r in 1..self.rounds {
            sub_bytes(s);
            shift_rows(s);
            mix_words(s, false);
            add_round_key(s, &self.rk[r]);
        }
        sub_bytes(s);
        shift_rows(s);
        add_round_key(s, &self.rk[self.rounds]);
    }

    fn decrypt_state(&self, s: &mut [u8; LANES]) {
        add_round_key(s, &self.rk[self.rounds]);
        for r in (1..self.rounds).rev() {
            inv_shift_rows(s);
            inv_sub_bytes(s);
            add_round_key(s, &self.rk[r]);
            mix_words(s, true);
        }
        inv_shift_rows(s);
        inv_sub_bytes(s);
        add_round_key(s, &self.rk[0]);
    }

    fn each_batch(blocks: &mut [Block], f: impl Fn(&mut [u8; LANES])) {
        let mut state = [0u8; LANES];
        for batch in blocks.chunks_mut(LANES / 16) {
            for (dst, b) in state.chunks_exact_mut(16).zip(batch.iter()) {
                dst.copy_from_slice(b);
            }
            f(&mut state);
            for (b, src) in batch.iter_mut().zip(state.chunks_exact(16)) {
                b.copy_from_slice(src);
            }
        }
        state.zeroize();
    }
}

impl BlockImpl for SoftAes {
    fn new(alg: CipherAlg, key: &[u8]) -> Result<Self, SectorCipherError> {
        match Self::expand(key) {
            Some(aes) if key.len() == alg.aes_key_len() => Ok(aes),
            _ => Err(SectorCipherError::KeyLength {
                len: key.len(),
                expected: alg.aes_key_len(),
            }),
        }
    }

    fn encrypt_blocks(&self, blocks: &mut [Block]) {
        Self::each_batch(blocks, |s| self.encrypt_state(s));
    }

    fn decrypt_blocks(&self, blocks: &mut [Block]) {
        Self::each_batch(blocks, |s| self.decrypt_state(s));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;
    use crate::crypto::sector::tests::hex;

    #[test]
    fn sbox_known_values() {
        let mut s = [0u8; LANES];
        for (i, b) in s.iter_mut().enumerate() {
            *b = i as u8;
        }
        s[2] = 0x53;
        s[3] = 0xff;
        let orig = s;
        sub_bytes(&mut s);
        assert_eq!(&s[..4], &[0x63, 0x7c, 0xed, 0x16]);
        inv_sub_bytes(&mut s);
        assert_eq!(s, orig);
    }

    #[test]
    fn fips197_appendix_c_vectors() {
        let pt = hex("00112233445566778899aabbccddeeff");
        let cases = [
            (
                "000102030405060708090a0b0c0d0e0f",
                "69c4e0d86a7b0430d8cdb78070b4c55a",
            ),
            (
                "000102030405060708090a0b0c0d0e0f1011121314151617",
                "dda97ca4864cdfe06eaf70a0ec0d7191",
            ),
            (
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                "8ea2b7ca516745bfeafc49904b496089",
            ),
        ];
        for (key, ct) in cases {
            let key = hex(key);
            let alg = CipherAlg::from_aes_key_len(key.len()).unwrap();
            let aes = SoftAes::new(alg, &key).unwrap();
            let mut blocks = [[0u8; 16]; 7];
            for b in blocks.iter_mut() {
                b.copy_from_slice(&pt);
            }
            aes.encrypt_blocks(&mut blocks);
            for b in &blocks {
                assert_eq!(&b[..], &hex(ct)[..]);
            }
            aes.decrypt_blocks(&mut blocks);
            for b in &blocks {
                assert_eq!(&b[..], &pt[..]);
            }
        }
    }
}
