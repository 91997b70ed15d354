//! Batched XTS / CBC / ECB over any block cipher that encrypts many blocks per call.
//!
//! Used with the `aes` crate ([`HwAes`], the portable path) and with the module's own software
//! AES ([`super::soft::SoftAes`], the soft path). Work is done in chunks of sectors so that the
//! block cipher always gets many independent blocks: XTS and ECB and CBC decryption hand a whole
//! chunk to one call; CBC encryption, serial inside a sector, interleaves the chains of up to
//! [`CBC_LANES`] sectors and encrypts one block of each per call.

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use zeroize::Zeroize;

use super::{
    essiv_key, raw_iv, xor_block, xts_double, Block, CipherAlg, CipherMode, CipherSpec, IvGen,
    SectorCipherError, BLOCKS_PER_SECTOR,
};

/// A block cipher that processes slices of blocks, as fast as it can in parallel.
pub(super) trait BlockImpl: Sized + Send + Sync {
    /// A keyed instance; `key.len()` is `alg.aes_key_len()`.
    fn new(alg: CipherAlg, key: &[u8]) -> Result<Self, SectorCipherError>;
    fn encrypt_blocks(&self, blocks: &mut [Block]);
    fn decrypt_blocks(&self, blocks: &mut [Block]);
}

/// The `aes` crate (AES-NI / VAES / ARMv8 / fixslice, chosen by the crate at run time).
/// The crate zeroizes its key schedules on drop (feature `zeroize`).
pub(super) enum HwAes {
    A128(aes::Aes128),
    A192(aes::Aes192),
    A256(aes::Aes256),
}

impl BlockImpl for HwAes {
    fn new(alg: CipherAlg, key: &[u8]) -> Result<Self, SectorCipherError> {
        let err = |_| SectorCipherError::KeyLength {
            len: key.len(),
            expected: alg.aes_key_len(),
        };
        Ok(match alg {
            CipherAlg::Aes128 => HwAes::A128(aes::Aes128::new_from_slice(key).map_err(err)?),
            CipherAlg::Aes192 => HwAes::A192(aes::Aes192::new_from_slice(key).map_err(err)?),
            CipherAlg::Aes256 => HwAes::A256(aes::Aes256::new_from_slice(key).map_err(err)?),
        })
    }

    #[inline]
    fn encrypt_blocks(&self, blocks: &mut [Block]) {
        let blocks = Array::cast_slice_from_core_mut(blocks);
        match self {
            HwAes::A128(c) => c.encrypt_blocks(blocks),
            HwAes::A192(c) => c.encrypt_blocks(blocks),
            HwAes::A256(c) => c.encrypt_blocks(blocks),
        }
    }

    #[inline]
    fn decrypt_blocks(&self, blocks: &mut [Block]) {
        let blocks = Array::cast_slice_from_core_mut(blocks);
        match self {
            HwAes::A128(c) => c.decrypt_blocks(blocks),
            HwAes::A192(c) => c.decrypt_blocks(blocks),
            HwAes::A256(c) => c.decrypt_blocks(blocks),
        }
    }
}

/// `blocks[j] = src[j] ^ T x^j` (in place when `src` is `None`) for one sector with first
/// tweak `t`.
#[inline(always)]
fn whiten_sector(mut t: u128, src: Option<&[Block]>, blocks: &mut [Block]) {
    match src {
        Some(src) => {
            for (b, s) in blocks.iter_mut().zip(src) {
                *b = xor_block(*s, t.to_le_bytes());
                t = xts_double(t);
            }
        }
        None => {
            for b in blocks.iter_mut() {
                *b = xor_block(*b, t.to_le_bytes());
                t = xts_double(t);
            }
        }
    }
}

/// Sectors per chunk for XTS, ECB and CBC decryption (4 KiB, 256 blocks: a multiple of every
/// parallel width of the `aes` crate).
const CHUNK_SECTORS: usize = 8;
const CHUNK_BLOCKS: usize = CHUNK_SECTORS * BLOCKS_PER_SECTOR;
/// Sector chains interleaved by CBC encryption (64 = the `aes` crate's VAES-512 width; a multiple
/// of its AES-NI width 8).
pub(super) const CBC_LANES: usize = 64;

/// A keyed sector cipher over block cipher `C`.
pub(super) struct Engine<C> {
    mode: CipherMode,
    iv: IvGen,
    data: C,
    /// XTS tweak cipher (second half of the key).
    tweak: Option<C>,
    /// ESSIV IV cipher (AES-256 keyed by the key's hash).
    essiv: Option<C>,
}

impl<C: BlockImpl> Engine<C> {
    /// `spec` is validated and `key.len() == spec.key_len()`.
    pub(super) fn new(spec: CipherSpec, key: &[u8]) -> Result<Self, SectorCipherError> {
        let n = spec.alg.aes_key_len();
        let (data, tweak) = match spec.mode {
            CipherMode::Xts => {
                let (k1, k2) = key.split_at(n);
                (C::new(spec.alg, k1)?, Some(C::new(spec.alg, k2)?))
            }
            CipherMode::Cbc | CipherMode::Ecb => (C::new(spec.alg, key)?, None),
        };
        let essiv = match spec.iv {
            IvGen::Essiv(hash) => Some(C::new(CipherAlg::Aes256, &essiv_key(hash, key)[..])?),
            IvGen::Plain | IvGen::Plain64 | IvGen::Null => None,
        };
        Ok(Engine {
            mode: spec.mode,
            iv: spec.iv,
            data,
            tweak,
            essiv,
        })
    }

    /// The IVs (XTS: tweaks before encryption with the tweak key) of `out.len()` sectors.
    fn ivs(&self, first_sector: u64, out: &mut [Block]) {
        let mut s = first_sector;
        for iv in out.iter_mut() {
            *iv = raw_iv(self.iv, s);
            s = s.wrapping_add(1);
        }
        if let Some(essiv) = &self.essiv {
            essiv.encrypt_blocks(out);
        }
    }

    /// `dst = E(src)`, or in place when `src` is `None`. Lengths are whole sectors and equal.
    pub(super) fn encrypt(&self, src: Option<&[u8]>, dst: &mut [u8], first_sector: u64) {
        let (dst, _) = dst.as_chunks_mut::<16>();
        let src = src.map(|s| s.as_chunks::<16>().0);
        match self.mode {
            CipherMode::Xts => self.xts(true, src, dst, first_sector),
            CipherMode::Cbc => self.cbc_encrypt(src, dst, first_sector),
            CipherMode::Ecb => {
                if let Some(src) = src {
                    dst.copy_from_slice(src);
                }
                self.data.encrypt_blocks(dst);
            }
        }
    }

    /// Decrypts whole sectors in place.
    pub(super) fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        let (buf, _) = buf.as_chunks_mut::<16>();
        match self.mode {
            CipherMode::Xts => self.xts(false, None, buf, first_sector),
            CipherMode::Cbc => self.cbc_decrypt(buf, first_sector),
            CipherMode::Ecb => self.data.decrypt_blocks(buf),
        }
    }

    fn xts(&self, enc: bool, src: Option<&[Block]>, dst: &mut [Block], first_sector: u64) {
        let Some(tweak_cipher) = &self.tweak else {
            return;
        };
        let mut ivs = [[0u8; 16]; CHUNK_SECTORS];
        let mut sector = first_sector;
        for (ci, chunk) in dst.chunks_mut(CHUNK_BLOCKS).enumerate() {
            let n = chunk.len() / BLOCKS_PER_SECTOR;
            let ivs = &mut ivs[..n];
            self.ivs(sector, ivs);
            tweak_cipher.encrypt_blocks(ivs);
            // Whiten with each block's tweak, en/decrypt the whole chunk in one call, whiten
            // again with the tweaks derived a second time (cheaper than storing and wiping them;
            // measured faster than whitening inside the `aes` backend closure per 8 blocks).
            let src = src.map(|s| &s[ci * CHUNK_BLOCKS..][..chunk.len()]);
            for (si, (iv, blocks)) in ivs
                .iter()
                .zip(chunk.chunks_exact_mut(BLOCKS_PER_SECTOR))
                .enumerate()
            {
                let src = src.map(|s| &s[si * BLOCKS_PER_SECTOR..][..BLOCKS_PER_SECTOR]);
                whiten_sector(u128::from_le_bytes(*iv), src, blocks);
            }
            if enc {
                self.data.encrypt_blocks(chunk);
            } else {
                self.data.decrypt_blocks(chunk);
            }
            for (iv, blocks) in ivs.iter().zip(chunk.chunks_exact_mut(BLOCKS_PER_SECTOR)) {
                whiten_sector(u128::from_le_bytes(*iv), None, blocks);
            }
            sector = sector.wrapping_add(CHUNK_SECTORS as u64);
        }
        ivs.zeroize();
    }

    fn cbc_encrypt(&self, src: Option<&[Block]>, dst: &mut [Block], first_sector: u64) {
        const CHUNK: usize = CBC_LANES * BLOCKS_PER_SECTOR;
        let mut chain = [[0u8; 16]; CBC_LANES];
        let mut sector = first_sector;
        for (ci, chunk) in dst.chunks_mut(CHUNK).enumerate() {
            let n = chunk.len() / BLOCKS_PER_SECTOR;
            let chain = &mut chain[..n];
            self.ivs(sector, chain);
            let src = src.map(|s| &s[ci * CHUNK..][..chunk.len()]);
            for j in 0..BLOCKS_PER_SECTOR {
                for (lane, c) in chain.iter_mut().enumerate() {
                    let k = lane * BLOCKS_PER_SECTOR + j;
                    let p = match src {
                        Some(s) => s[k],
                        None => chunk[k],
                    };
                    *c = xor_block(*c, p);
                }
                self.data.encrypt_blocks(chain);
                for (lane, c) in chain.iter().enumerate() {
                    chunk[lane * BLOCKS_PER_SECTOR + j] = *c;
                }
            }
            sector = sector.wrapping_add(CBC_LANES as u64);
        }
        // `chain` ends holding ciphertext blocks: nothing to wipe.
    }

    fn cbc_decrypt(&self, buf: &mut [Block], first_sector: u64) {
        let mut saved = [[0u8; 16]; CHUNK_BLOCKS];
        let mut ivs = [[0u8; 16]; CHUNK_SECTORS];
        let mut sector = first_sector;
        for chunk in buf.chunks_mut(CHUNK_BLOCKS) {
            let n = chunk.len() / BLOCKS_PER_SECTOR;
            let ivs = &mut ivs[..n];
            self.ivs(sector, ivs);
            let saved = &mut saved[..chunk.len()];
            saved.copy_from_slice(chunk);
            self.data.decrypt_blocks(chunk);
            for ((sec, prev), iv) in chunk
                .chunks_exact_mut(BLOCKS_PER_SECTOR)
                .zip(saved.chunks_exact(BLOCKS_PER_SECTOR))
                .zip(ivs.iter())
            {
                sec[0] = xor_block(sec[0], *iv);
                for (b, p) in sec[1..].iter_mut().zip(prev) {
                    *b = xor_block(*b, *p);
                }
            }
            sector = sector.wrapping_add(CHUNK_SECTORS as u64);
        }
        ivs.zeroize();
    }
}
