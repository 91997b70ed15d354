//! Encryption sectors larger than 512 bytes (LUKS2 `sector_size` 1024–4096), built on the
//! sector-crypto engine's ECB path.
//!
//! dm-crypt with a large sector size encrypts each sector as one unit: XTS over all its
//! blocks with one tweak (T·x^j for j up to 255), CBC chained across the whole sector. The IV
//! still counts 512-byte units (dm-crypt without `iv_large_sectors`, which cryptsetup never sets
//! for LUKS2): the sector at byte `o` of the segment has IV sector `iv_tweak + o / 512`.
//!
//! The engine's ECB mode does the AES work in bulk (AES-NI / VAES where present); this module
//! adds the XTS whitening and the CBC chaining around it. [`DiskCipher`] hides the difference:
//! 512-byte sectors go straight to the engine's XTS / CBC.

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use zeroize::Zeroize;

use crate::crypto::sector::{
    CipherAlg, CipherMode, CipherSpec, EssivHash, IvGen, SectorCipher, SectorCipherError,
};
use crate::crypto::SECTOR_SIZE;

/// Largest supported encryption sector.
pub const MAX_UNIT: usize = 4096;

fn ecb(alg: CipherAlg, key: &[u8]) -> Result<SectorCipher, SectorCipherError> {
    SectorCipher::new(
        CipherSpec {
            alg,
            mode: CipherMode::Ecb,
            iv: IvGen::Null,
        },
        key,
    )
}

/// ECB over any whole number of blocks: the engine takes multiples of 512 bytes, so a short
/// tail is padded in a stack buffer.
fn ecb_blocks(c: &SectorCipher, blocks: &mut [u8], encrypt: bool) -> Result<(), SectorCipherError> {
    let whole = blocks.len() / SECTOR_SIZE * SECTOR_SIZE;
    let (head, tail) = blocks.split_at_mut(whole);
    if !head.is_empty() {
        if encrypt {
            c.encrypt_sectors(head, 0)?;
        } else {
            c.decrypt_sectors(head, 0)?;
        }
    }
    if !tail.is_empty() {
        let mut t = [0u8; SECTOR_SIZE];
        t[..tail.len()].copy_from_slice(tail);
        if encrypt {
            c.encrypt_sectors(&mut t, 0)?;
        } else {
            c.decrypt_sectors(&mut t, 0)?;
        }
        tail.copy_from_slice(&t[..tail.len()]);
        t.zeroize();
    }
    Ok(())
}

fn xts_double(t: u128) -> u128 {
    (t << 1) ^ (0x87 * (t >> 127))
}

fn xor16(dst: &mut [u8], v: u128) {
    let x = u128::from_le_bytes(dst[..16].try_into().unwrap_or([0; 16])) ^ v;
    dst[..16].copy_from_slice(&x.to_le_bytes());
}

/// One AES key for CBC encryption, which is serial within a sector: block by block with the
/// `aes` crate (AES-NI where present) rather than through 512-byte engine calls.
enum SerialAes {
    A128(aes::Aes128),
    A192(aes::Aes192),
    A256(aes::Aes256),
}

impl SerialAes {
    fn new(alg: CipherAlg, key: &[u8]) -> Result<Self, SectorCipherError> {
        let err = |_| SectorCipherError::KeyLength {
            len: key.len(),
            expected: alg.aes_key_len(),
        };
        Ok(match alg {
            CipherAlg::Aes128 => Self::A128(aes::Aes128::new_from_slice(key).map_err(err)?),
            CipherAlg::Aes192 => Self::A192(aes::Aes192::new_from_slice(key).map_err(err)?),
            CipherAlg::Aes256 => Self::A256(aes::Aes256::new_from_slice(key).map_err(err)?),
        })
    }

    /// CBC-encrypts `unit` (whole blocks) in place, chaining from `iv`.
    fn cbc_encrypt(&self, unit: &mut [u8], iv: &[u8]) {
        let (blocks, _) = unit.as_chunks_mut::<16>();
        let blocks = Array::cast_slice_from_core_mut(blocks);
        let mut prev = [0u8; 16];
        prev.copy_from_slice(&iv[..16]);
        for b in blocks.iter_mut() {
            for (x, p) in b.iter_mut().zip(prev.iter()) {
                *x ^= p;
            }
            match self {
                Self::A128(c) => c.encrypt_block(b),
                Self::A192(c) => c.encrypt_block(b),
                Self::A256(c) => c.encrypt_block(b),
            }
            prev.copy_from_slice(b);
        }
    }
}

/// XTS, CBC or ECB over sectors of `unit` bytes (1024, 2048 or 4096).
struct LargeUnit {
    spec: CipherSpec,
    unit: usize,
    data: SectorCipher,
    /// XTS tweak key or the ESSIV key (both used through ECB).
    iv_cipher: Option<SectorCipher>,
    /// The data key for serial CBC encryption.
    cbc: Option<SerialAes>,
}

impl LargeUnit {
    fn new(spec: CipherSpec, key: &[u8], unit: usize) -> Result<Self, SectorCipherError> {
        // Validates the spec and key length the same way the 512-byte engine does.
        SectorCipher::new(spec, key)?;
        let n = spec.alg.aes_key_len();
        let (data, tweak) = match spec.mode {
            CipherMode::Xts => {
                let (k1, k2) = key.split_at(n);
                (ecb(spec.alg, k1)?, Some(ecb(spec.alg, k2)?))
            }
            CipherMode::Cbc | CipherMode::Ecb => (ecb(spec.alg, key)?, None),
        };
        let iv_cipher = match (spec.mode, spec.iv) {
            (CipherMode::Xts, _) => tweak,
            (_, IvGen::Essiv(EssivHash::Sha256)) => {
                use sha2::Digest;
                let mut h = sha2::Sha256::digest(key);
                let c = ecb(CipherAlg::Aes256, &h)?;
                h.as_mut_slice().zeroize();
                Some(c)
            }
            _ => None,
        };
        let cbc = match spec.mode {
            CipherMode::Cbc => Some(SerialAes::new(spec.alg, key)?),
            CipherMode::Xts | CipherMode::Ecb => None,
        };
        Ok(Self {
            spec,
            unit,
            data,
            iv_cipher,
            cbc,
        })
    }

    /// The IVs of the units starting at IV sectors `first`, `first + step`, ... (encrypted
    /// with the tweak or ESSIV key where the mode asks), into `out` (16 bytes each).
    fn ivs(&self, first: u64, out: &mut [u8]) -> Result<(), SectorCipherError> {
        let step = (self.unit / SECTOR_SIZE) as u64;
        let mut s = first;
        for iv in out.chunks_exact_mut(16) {
            let v = match self.spec.iv {
                IvGen::Plain => u128::from(s & 0xffff_ffff),
                IvGen::Plain64 | IvGen::Essiv(_) => u128::from(s),
                IvGen::Null => 0,
            };
            iv.copy_from_slice(&v.to_le_bytes());
            s = s.wrapping_add(step);
        }
        match &self.iv_cipher {
            Some(c) => ecb_blocks(c, out, true),
            None => Ok(()),
        }
    }

    fn crypt(&self, buf: &mut [u8], first_iv: u64, encrypt: bool) -> Result<(), SectorCipherError> {
        let step = (self.unit / SECTOR_SIZE) as u64;
        // Work in chunks of 8 units so that the IVs of a chunk are one engine call.
        const UNITS: usize = 8;
        let mut iv_buf = [0u8; 16 * UNITS];
        let mut iv = first_iv;
        for chunk in buf.chunks_mut(self.unit * UNITS) {
            let n = chunk.len() / self.unit;
            let ivs = &mut iv_buf[..16 * n];
            self.ivs(iv, ivs)?;
            match self.spec.mode {
                CipherMode::Xts => {
                    self.xts_whiten(chunk, ivs);
                    ecb_blocks(&self.data, chunk, encrypt)?;
                    self.xts_whiten(chunk, ivs);
                }
                CipherMode::Ecb => ecb_blocks(&self.data, chunk, encrypt)?,
                CipherMode::Cbc if encrypt => self.cbc_encrypt(chunk, ivs)?,
                CipherMode::Cbc => self.cbc_decrypt(chunk, ivs)?,
            }
            iv = iv.wrapping_add(step * UNITS as u64);
        }
        iv_buf.zeroize();
        Ok(())
    }

    fn xts_whiten(&self, chunk: &mut [u8], tweaks: &[u8]) {
        for (unit, t) in chunk
            .chunks_exact_mut(self.unit)
            .zip(tweaks.chunks_exact(16))
        {
            let mut t = u128::from_le_bytes(t.try_into().unwrap_or([0; 16]));
            for b in unit.chunks_exact_mut(16) {
                xor16(b, t);
                t = xts_double(t);
            }
        }
    }

    fn cbc_encrypt(&self, chunk: &mut [u8], ivs: &[u8]) -> Result<(), SectorCipherError> {
        let Some(c) = &self.cbc else {
            return Err(SectorCipherError::InvalidSpec { spec: self.spec });
        };
        for (unit, iv) in chunk.chunks_exact_mut(self.unit).zip(ivs.chunks_exact(16)) {
            c.cbc_encrypt(unit, iv);
        }
        Ok(())
    }

    fn cbc_decrypt(&self, chunk: &mut [u8], ivs: &[u8]) -> Result<(), SectorCipherError> {
        // Decrypt each unit in bulk, then XOR every block with the ciphertext block before it
        // (kept in `ct`; ciphertext is not secret).
        let mut ct = [0u8; MAX_UNIT];
        for (unit, iv) in chunk.chunks_exact_mut(self.unit).zip(ivs.chunks_exact(16)) {
            ct[..unit.len()].copy_from_slice(unit);
            ecb_blocks(&self.data, unit, false)?;
            for (j, b) in unit.chunks_exact_mut(16).enumerate() {
                let prev = if j == 0 {
                    iv
                } else {
                    &ct[(j - 1) * 16..j * 16]
                };
                for (x, p) in b.iter_mut().zip(prev) {
                    *x ^= p;
                }
            }
        }
        Ok(())
    }
}

enum Inner {
    Sector(SectorCipher),
    Large(Box<LargeUnit>),
}

/// A data cipher with its encryption sector size (512 to 4096 bytes).
pub struct DiskCipher {
    inner: Inner,
    unit: usize,
}

impl std::fmt::Debug for DiskCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCipher")
            .field("spec", &self.spec())
            .field("unit", &self.unit)
            .finish_non_exhaustive()
    }
}

impl DiskCipher {
    /// A cipher for `spec` keyed with `key`, over sectors of `unit` bytes (512, 1024, 2048 or
    /// 4096).
    pub fn new(spec: CipherSpec, key: &[u8], unit: usize) -> Result<Self, SectorCipherError> {
        let inner = match unit {
            SECTOR_SIZE => Inner::Sector(SectorCipher::new(spec, key)?),
            1024 | 2048 | 4096 => Inner::Large(Box::new(LargeUnit::new(spec, key, unit)?)),
            _ => return Err(SectorCipherError::UnalignedLength { len: unit }),
        };
        Ok(Self { inner, unit })
    }

    /// Wraps a 512-byte-sector cipher.
    pub fn from_sector(c: SectorCipher) -> Self {
        Self {
            inner: Inner::Sector(c),
            unit: SECTOR_SIZE,
        }
    }

    /// The encryption sector size in bytes.
    pub fn unit(&self) -> usize {
        self.unit
    }

    /// The cipher spec.
    pub fn spec(&self) -> CipherSpec {
        match &self.inner {
            Inner::Sector(c) => c.spec(),
            Inner::Large(l) => l.spec,
        }
    }

    fn check(&self, len: usize) -> Result<(), SectorCipherError> {
        if len.is_multiple_of(self.unit) {
            Ok(())
        } else {
            Err(SectorCipherError::UnalignedLength { len })
        }
    }

    /// Encrypts whole units in place; `buf[0..unit]` has IV sector `first_iv` (512-byte
    /// units), the next unit `first_iv + unit / 512`, and so on.
    pub fn encrypt(&self, buf: &mut [u8], first_iv: u64) -> Result<(), SectorCipherError> {
        self.check(buf.len())?;
        match &self.inner {
            Inner::Sector(c) => c.encrypt_sectors(buf, first_iv),
            Inner::Large(l) => l.crypt(buf, first_iv, true),
        }
    }

    /// Decrypts whole units in place (same layout as [`DiskCipher::encrypt`]).
    pub fn decrypt(&self, buf: &mut [u8], first_iv: u64) -> Result<(), SectorCipherError> {
        self.check(buf.len())?;
        match &self.inner {
            Inner::Sector(c) => c.decrypt_sectors(buf, first_iv),
            Inner::Large(l) => l.crypt(buf, first_iv, false),
        }
    }

    /// `dst = E(src)`; `src` untouched.
    pub fn encrypt_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        first_iv: u64,
    ) -> Result<(), SectorCipherError> {
        self.check(src.len())?;
        match &self.inner {
            Inner::Sector(c) => c.encrypt_sectors_to(src, dst, first_iv),
            Inner::Large(l) => {
                if src.len() != dst.len() {
                    return Err(SectorCipherError::LengthMismatch {
                        src: src.len(),
                        dst: dst.len(),
                    });
                }
                dst.copy_from_slice(src);
                l.crypt(dst, first_iv, true)
            }
        }
    }
}
