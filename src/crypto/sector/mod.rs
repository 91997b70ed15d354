//! Sector cipher engine: XTS, CBC and ECB over whole requests of 512-byte sectors.
//!
//! One [`SectorCipher`] encrypts or decrypts a buffer of consecutive 512-byte sectors in one call,
//! so that the block cipher always sees many independent blocks at once. Three engine paths exist,
//! chosen at run time (never at build time):
//!
//! * [`EnginePath::Vaes512`]: a fused AVX-512 VAES + VPCLMULQDQ kernel (x86-64 only), used by
//!   [`EnginePath::Auto`] when the CPU has the features.
//! * [`EnginePath::Portable`]: batched modes over the `aes` crate's `encrypt_blocks` /
//!   `decrypt_blocks` (AES-NI or ARMv8 AES where present, the crate's constant-time fixslice
//!   software backend elsewhere). Used by `Auto` on every CPU without the VAES kernel.
//! * [`EnginePath::Soft`]: the same batched modes over this module's own constant-time software AES,
//!   which never touches AES instructions, so the no-hardware code can be tested on any machine.
//!
//! `VUQ_CRYPTO_PATH=auto|vaes512|portable|soft` overrides the choice made by [`SectorCipher::new`].
//!
//! IV rules follow Linux dm-crypt and QEMU: `plain` is the sector number modulo 2^32 as LE32,
//! `plain64` the sector number as LE64, `essiv:sha256` is AES-256 keyed with SHA-256 of the key
//! applied to the LE64 sector number; every IV is zero-padded to 16 bytes. XTS uses the IV as the
//! tweak, CBC as the IV; ECB has none.

mod error;
mod portable;
mod soft;
#[cfg(target_arch = "x86_64")]
mod vaes512;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_openssl;

use std::fmt;

pub use error::SectorCipherError;

use super::secret::Locked;
use super::SECTOR_SIZE;

/// AES key size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl CipherAlg {
    /// Key length of one AES instance in bytes.
    pub fn aes_key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    fn from_aes_key_len(len: usize) -> Option<Self> {
        match len {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }
}

/// Block cipher mode of operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CipherMode {
    /// XEX-based tweaked codebook with ciphertext stealing (IEEE 1619); the key is two AES keys.
    Xts,
    /// Cipher block chaining, restarted at every sector with the sector's IV.
    Cbc,
    /// Electronic codebook (no IV).
    Ecb,
}

/// Hash used by ESSIV to derive the IV key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EssivHash {
    /// SHA-256 (the IV cipher is AES-256).
    Sha256,
}

/// IV generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IvGen {
    /// Sector number modulo 2^32, little endian, zero-padded.
    Plain,
    /// Sector number, 64-bit little endian, zero-padded.
    Plain64,
    /// Sector number (LE64, zero-padded) encrypted with AES keyed by the hash of the key.
    Essiv(EssivHash),
    /// No IV (ECB only).
    Null,
}

/// A complete description of a disk-encryption cipher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CipherSpec {
    /// AES key size (per AES instance; XTS uses two).
    pub alg: CipherAlg,
    /// Mode of operation.
    pub mode: CipherMode,
    /// IV generator.
    pub iv: IvGen,
}

impl CipherSpec {
    /// From LUKS header strings, e.g. `("aes", "xts-plain64")` with master key length 64 gives
    /// AES-256-XTS. Accepted modes: `xts-plain`, `xts-plain64`, `xts-essiv:sha256`, `cbc-plain`,
    /// `cbc-plain64`, `cbc-essiv:sha256`, `ecb` (also spelled `ecb-null`).
    pub fn from_luks(
        cipher_name: &str,
        cipher_mode: &str,
        key_len: usize,
    ) -> Result<Self, SectorCipherError> {
        if cipher_name != "aes" {
            return Err(SectorCipherError::UnsupportedCipher {
                name: cipher_name.to_owned(),
            });
        }
        let unsupported = || SectorCipherError::UnsupportedMode {
            mode: cipher_mode.to_owned(),
        };
        let (mode, iv) = match cipher_mode.split_once('-') {
            Some((m, iv)) => (m, Some(iv)),
            None => (cipher_mode, None),
        };
        let mode = match mode {
            "xts" => CipherMode::Xts,
            "cbc" => CipherMode::Cbc,
            "ecb" => CipherMode::Ecb,
            _ => return Err(unsupported()),
        };
        let iv = match (mode, iv) {
            (CipherMode::Ecb, None | Some("null")) => IvGen::Null,
            (CipherMode::Ecb, Some(_)) | (_, None | Some("null")) => return Err(unsupported()),
            (_, Some("plain")) => IvGen::Plain,
            (_, Some("plain64")) => IvGen::Plain64,
            (_, Some("essiv:sha256")) => IvGen::Essiv(EssivHash::Sha256),
            (_, Some(_)) => return Err(unsupported()),
        };
        let aes_len = match mode {
            CipherMode::Xts if key_len.is_multiple_of(2) => key_len / 2,
            CipherMode::Xts => 0,
            CipherMode::Cbc | CipherMode::Ecb => key_len,
        };
        let alg = CipherAlg::from_aes_key_len(aes_len)
            .ok_or(SectorCipherError::NoAlgForKeyLength { len: key_len })?;
        Ok(CipherSpec { alg, mode, iv })
    }

    /// The inverse of [`CipherSpec::from_luks`], for writing headers: `("aes", "xts-plain64")`.
    pub fn luks_names(&self) -> (&'static str, String) {
        let mode = match self.mode {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
            CipherMode::Ecb => "ecb",
        };
        let name = match self.iv {
            IvGen::Plain => format!("{mode}-plain"),
            IvGen::Plain64 => format!("{mode}-plain64"),
            IvGen::Essiv(EssivHash::Sha256) => format!("{mode}-essiv:sha256"),
            IvGen::Null if self.mode == CipherMode::Ecb => mode.to_owned(),
            IvGen::Null => format!("{mode}-null"),
        };
        ("aes", name)
    }

    /// Master key length in bytes (XTS doubles it).
    pub fn key_len(&self) -> usize {
        match self.mode {
            CipherMode::Xts => 2 * self.alg.aes_key_len(),
            CipherMode::Cbc | CipherMode::Ecb => self.alg.aes_key_len(),
        }
    }

    /// Checks that the mode and IV generator go together (ECB iff no IV).
    fn validate(&self) -> Result<(), SectorCipherError> {
        let ok = match self.mode {
            CipherMode::Ecb => self.iv == IvGen::Null,
            CipherMode::Xts | CipherMode::Cbc => self.iv != IvGen::Null,
        };
        if ok {
            Ok(())
        } else {
            Err(SectorCipherError::InvalidSpec { spec: *self })
        }
    }
}

/// Which implementation runs the cipher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnginePath {
    /// Pick the fastest path this CPU supports (or the one `VUQ_CRYPTO_PATH` names).
    Auto,
    /// Fused AVX-512 VAES + VPCLMULQDQ kernel.
    Vaes512,
    /// Batched modes over the `aes` crate.
    Portable,
    /// Batched modes over this module's constant-time software AES.
    Soft,
}

/// Name of the environment variable that overrides [`EnginePath::Auto`].
pub const PATH_ENV_VAR: &str = "VUQ_CRYPTO_PATH";

impl EnginePath {
    /// Parses `auto`, `vaes512`, `portable` or `soft`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(EnginePath::Auto),
            "vaes512" => Some(EnginePath::Vaes512),
            "portable" => Some(EnginePath::Portable),
            "soft" => Some(EnginePath::Soft),
            _ => None,
        }
    }

    /// The name accepted by [`EnginePath::from_name`].
    pub fn name(self) -> &'static str {
        match self {
            EnginePath::Auto => "auto",
            EnginePath::Vaes512 => "vaes512",
            EnginePath::Portable => "portable",
            EnginePath::Soft => "soft",
        }
    }

    /// Whether this CPU can run the path (`Auto`, `Portable` and `Soft` always can).
    pub fn is_available(self) -> bool {
        match self {
            EnginePath::Vaes512 => vaes512_available(),
            EnginePath::Auto | EnginePath::Portable | EnginePath::Soft => true,
        }
    }
}

impl fmt::Display for EnginePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn vaes512_available() -> bool {
    vaes512::available()
}

#[cfg(not(target_arch = "x86_64"))]
fn vaes512_available() -> bool {
    false
}

// Round keys live in locked, zeroed-after-drop allocations (crate::crypto::secret::Locked).
enum Engine {
    #[cfg(target_arch = "x86_64")]
    Vaes512(Locked<vaes512::Engine>),
    Portable(Locked<portable::Engine<portable::HwAes>>),
    Soft(Locked<portable::Engine<soft::SoftAes>>),
}

/// Encrypts and decrypts runs of 512-byte sectors with one key.
///
/// `Send + Sync`; all key schedules are zeroized when it is dropped. Its `Debug` shows the spec
/// and path only.
pub struct SectorCipher {
    spec: CipherSpec,
    path: EnginePath,
    engine: Engine,
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// A cipher on the fastest path of this CPU, unless `VUQ_CRYPTO_PATH` names another.
    pub fn new(spec: CipherSpec, key: &[u8]) -> Result<Self, SectorCipherError> {
        Self::with_path(spec, key, EnginePath::Auto)
    }

    /// A cipher on the given path; `Auto` honours `VUQ_CRYPTO_PATH`. A forced path the CPU
    /// cannot run is an error, not a silent fallback.
    pub fn with_path(
        spec: CipherSpec,
        key: &[u8],
        path: EnginePath,
    ) -> Result<Self, SectorCipherError> {
        spec.validate()?;
        if key.len() != spec.key_len() {
            return Err(SectorCipherError::KeyLength {
                len: key.len(),
                expected: spec.key_len(),
            });
        }
        let path = match path {
            EnginePath::Auto => match std::env::var(PATH_ENV_VAR) {
                Ok(value) => match EnginePath::from_name(value.trim()) {
                    Some(EnginePath::Auto) => auto_path(),
                    Some(p) => p,
                    None => return Err(SectorCipherError::BadPathVariable { value }),
                },
                Err(_) => auto_path(),
            },
            p => p,
        };
        let engine = match path {
            #[cfg(target_arch = "x86_64")]
            EnginePath::Vaes512 if vaes512::available() => {
                Engine::Vaes512(Locked::new(vaes512::Engine::new(spec, key)?))
            }
            EnginePath::Vaes512 => return Err(SectorCipherError::PathUnavailable { path }),
            EnginePath::Soft => Engine::Soft(Locked::new(portable::Engine::new(spec, key)?)),
            EnginePath::Auto | EnginePath::Portable => {
                Engine::Portable(Locked::new(portable::Engine::new(spec, key)?))
            }
        };
        let path = match engine {
            #[cfg(target_arch = "x86_64")]
            Engine::Vaes512(_) => EnginePath::Vaes512,
            Engine::Portable(_) => EnginePath::Portable,
            Engine::Soft(_) => EnginePath::Soft,
        };
        Ok(SectorCipher { spec, path, engine })
    }

    /// The fused kernel run on four xmm registers with AES-NI instead of one zmm register, so
    /// that its logic is tested on CPUs without VAES. Reports path `Vaes512`.
    #[cfg(all(test, target_arch = "x86_64"))]
    fn vaes_kernel_on_xmm(spec: CipherSpec, key: &[u8]) -> Option<Self> {
        spec.validate().ok()?;
        let engine = vaes512::Engine::new_x4(spec, key)?;
        Some(SectorCipher {
            spec,
            path: EnginePath::Vaes512,
            engine: Engine::Vaes512(Locked::new(engine)),
        })
    }

    /// The cipher spec.
    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    /// The path actually used (never `Auto`).
    pub fn path(&self) -> EnginePath {
        self.path
    }

    /// Encrypts `buf` in place. `buf.len()` must be a multiple of 512; `buf[0..512]` is sector
    /// `first_sector`, the next 512 bytes sector `first_sector + 1` (wrapping at 2^64).
    pub fn encrypt_sectors(
        &self,
        buf: &mut [u8],
        first_sector: u64,
    ) -> Result<(), SectorCipherError> {
        check_len(buf.len())?;
        match &self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::Vaes512(e) => e.encrypt(None, buf, first_sector),
            Engine::Portable(e) => e.encrypt(None, buf, first_sector),
            Engine::Soft(e) => e.encrypt(None, buf, first_sector),
        }
        Ok(())
    }

    /// Decrypts `buf` in place; same layout rules as [`SectorCipher::encrypt_sectors`].
    pub fn decrypt_sectors(
        &self,
        buf: &mut [u8],
        first_sector: u64,
    ) -> Result<(), SectorCipherError> {
        check_len(buf.len())?;
        match &self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::Vaes512(e) => e.decrypt(buf, first_sector),
            Engine::Portable(e) => e.decrypt(buf, first_sector),
            Engine::Soft(e) => e.decrypt(buf, first_sector),
        }
        Ok(())
    }

    /// Out of place: `dst = E(src)`, `src` untouched. Both the same length, a multiple of 512.
    pub fn encrypt_sectors_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        first_sector: u64,
    ) -> Result<(), SectorCipherError> {
        if src.len() != dst.len() {
            return Err(SectorCipherError::LengthMismatch {
                src: src.len(),
                dst: dst.len(),
            });
        }
        check_len(src.len())?;
        match &self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::Vaes512(e) => e.encrypt(Some(src), dst, first_sector),
            Engine::Portable(e) => e.encrypt(Some(src), dst, first_sector),
            Engine::Soft(e) => e.encrypt(Some(src), dst, first_sector),
        }
        Ok(())
    }
}

fn auto_path() -> EnginePath {
    if vaes512_available() {
        EnginePath::Vaes512
    } else {
        EnginePath::Portable
    }
}

fn check_len(len: usize) -> Result<(), SectorCipherError> {
    if len.is_multiple_of(SECTOR_SIZE) {
        Ok(())
    } else {
        Err(SectorCipherError::UnalignedLength { len })
    }
}

/// AES blocks per sector.
const BLOCKS_PER_SECTOR: usize = SECTOR_SIZE / 16;

/// One AES block.
type Block = [u8; 16];

#[inline(always)]
fn xor_block(a: Block, b: Block) -> Block {
    (u128::from_ne_bytes(a) ^ u128::from_ne_bytes(b)).to_ne_bytes()
}

/// Multiplication by x in GF(2^128) with the XTS (little-endian) convention.
#[inline(always)]
fn xts_double(t: u128) -> u128 {
    (t << 1) ^ (0x87 * (t >> 127))
}

/// The unencrypted IV of `sector` for `Plain`/`Plain64`/`Essiv` (ESSIV encrypts it afterwards).
#[inline(always)]
fn raw_iv(iv: IvGen, sector: u64) -> Block {
    let v = match iv {
        IvGen::Plain => u128::from(sector & 0xffff_ffff),
        IvGen::Plain64 | IvGen::Essiv(_) => u128::from(sector),
        IvGen::Null => 0,
    };
    v.to_le_bytes()
}

/// SHA-256 of the key: the ESSIV AES-256 key.
fn essiv_key(hash: EssivHash, key: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
    use sha2::Digest;
    match hash {
        EssivHash::Sha256 => {
            use zeroize::Zeroize;
            let mut digest = sha2::Sha256::digest(key);
            let mut out = zeroize::Zeroizing::new([0u8; 32]);
            out.copy_from_slice(&digest);
            digest.as_mut_slice().zeroize();
            out
        }
    }
}
