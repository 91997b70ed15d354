//! The LUKS anti-forensic information splitter (AF split / merge), as cryptsetup's
//! `lib/luks1/af.c` and QEMU's `crypto/afsplit.c`.
//!
//! A key of `n` bytes is stored as `stripes` blocks of `n` bytes: the first `stripes − 1` are
//! random, the last is the key XORed with d, where d is folded over the random blocks as
//! d = H(d ⊕ sᵢ). H hashes each digest-sized chunk j of the block as hash(be32(j) ‖ chunk), the
//! last chunk possibly short (then the digest is truncated). Destroying any one stripe destroys
//! the key.

use zeroize::Zeroize;

use super::pbkdf::LuksHash;
use crate::crypto::secret::SecretError;

/// Diffuses `block` in place: each digest-sized chunk j becomes hash(be32(j) ‖ chunk).
fn diffuse(hash: LuksHash, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (j, chunk) in block.chunks_mut(dl).enumerate() {
        // At most 64 bytes × u32::MAX chunks: a key is at most 64 bytes, so j is tiny.
        let j = u32::try_from(j).unwrap_or(u32::MAX);
        let mut tmp = [0u8; 64];
        let n = chunk.len();
        tmp[..n].copy_from_slice(chunk);
        hash.hash_indexed(j, &tmp[..n], chunk);
        tmp.zeroize();
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Length of the split material for a key of `key_len` bytes, or None on overflow.
pub fn split_len(key_len: usize, stripes: u32) -> Option<usize> {
    key_len.checked_mul(usize::try_from(stripes).ok()?)
}

/// Merges `split` (exactly `key.len() × stripes` bytes) into `key`.
///
/// # Panics
/// Never for well-formed arguments; a length mismatch is a caller bug and is checked by the
/// callers before (they compute `split` from the header with [`split_len`]).
pub fn merge(hash: LuksHash, stripes: u32, split: &[u8], key: &mut [u8]) {
    let n = key.len();
    debug_assert_eq!(Some(split.len()), split_len(n, stripes));
    let mut d = vec![0u8; n];
    let blocks = split.chunks_exact(n.max(1));
    let last = usize::try_from(stripes.saturating_sub(1)).unwrap_or(usize::MAX);
    for (i, s) in blocks.enumerate() {
        if i == last {
            key.copy_from_slice(s);
            xor_into(key, &d);
            break;
        }
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    d.zeroize();
}

/// Splits `key` into `out` (exactly `key.len() × stripes` bytes) with random stripes from the OS.
pub fn split(hash: LuksHash, stripes: u32, key: &[u8], out: &mut [u8]) -> Result<(), SecretError> {
    let n = key.len();
    debug_assert_eq!(Some(out.len()), split_len(n, stripes));
    let mut d = vec![0u8; n];
    let last = stripes.saturating_sub(1);
    let mut res = Ok(());
    for (i, s) in out.chunks_exact_mut(n.max(1)).enumerate() {
        if u32::try_from(i).ok() == Some(last) {
            s.copy_from_slice(key);
            xor_into(s, &d);
            break;
        }
        if let Err(e) = getrandom::fill(s) {
            res = Err(SecretError::Random(e));
            break;
        }
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    d.zeroize();
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back_for_every_hash_and_key_size() {
        for hash in [LuksHash::Sha1, LuksHash::Sha256, LuksHash::Sha512] {
            for n in [16usize, 24, 32, 48, 64] {
                let key: Vec<u8> = (0..n)
                    .map(|i| u8::try_from((i * 7 + 3) % 256).expect("small"))
                    .collect();
                let mut material = vec![0u8; split_len(n, 4000).expect("len")];
                split(hash, 4000, &key, &mut material).expect("split");
                let mut back = vec![0u8; n];
                merge(hash, 4000, &material, &mut back);
                assert_eq!(back, key, "{hash:?} {n}");
                // Flipping one bit of one early stripe destroys the key.
                material[5 * n + 1] ^= 1;
                merge(hash, 4000, &material, &mut back);
                assert_ne!(back, key, "{hash:?} {n}");
            }
        }
    }

    #[test]
    fn merge_matches_a_hand_computed_two_stripe_case() {
        // stripes = 2, n = 20 (one sha1 chunk): key = s1 ⊕ sha1(be32(0) ‖ s0).
        use sha2::Digest;
        let s0 = [0x11u8; 20];
        let s1 = [0x22u8; 20];
        let mut h = sha1::Sha1::new();
        h.update([0u8, 0, 0, 0]);
        h.update(s0);
        let d = h.finalize();
        let want: Vec<u8> = s1.iter().zip(d.iter()).map(|(a, b)| a ^ b).collect();
        let mut material = s0.to_vec();
        material.extend_from_slice(&s1);
        let mut key = [0u8; 20];
        merge(LuksHash::Sha1, 2, &material, &mut key);
        assert_eq!(key.to_vec(), want);
    }

    #[test]
    fn diffusion_truncates_the_last_short_chunk() {
        // 48-byte key with sha256: chunks of 32 and 16 bytes, the second hashed with index 1.
        use sha2::Digest;
        let mut block = [0x5au8; 48];
        diffuse(LuksHash::Sha256, &mut block);
        let mut h = sha2::Sha256::new();
        h.update([0u8, 0, 0, 1]);
        h.update([0x5au8; 16]);
        let d1 = h.finalize();
        assert_eq!(&block[32..], &d1[..16]);
    }
}
