//! LUKS1, bit-compatible with QEMU (crypto/block-luks.c) and cryptsetup's `--type luks1`.
//!
//! * [`header`]: the 592-byte header and QEMU's sanity checks.
//! * [`af`]: the anti-forensic splitter.
//! * [`pbkdf`]: PBKDF2 with sha1/sha256/sha512 and iteration calibration.
//! * [`keyslot`]: unlocking, adding and removing keyslots.
//! * [`create`]: formatting a new LUKS area with QEMU's layout.
//!
//! The LUKS *area* is where the header and key material live: the start of a raw LUKS file, or
//! the region the qcow2 full-disk-encryption header extension points at ([`LuksArea`]).
//! Key-material offsets are relative to the start of the area.

pub mod af;
pub mod create;
pub mod header;
pub mod keyslot;
pub mod luks2;
pub mod pbkdf;

use thiserror::Error;

pub use create::{CreateParams, Iterations};
pub use header::{HeaderError, LuksHeader};
pub use keyslot::LuksVolume;
pub use pbkdf::{LuksHash, PbkdfError};

use crate::crypto::secret::SecretError;
use crate::crypto::sector::{CipherMode, CipherSpec, SectorCipherError};
use crate::storage::{Storage, StorageError};

/// Errors of LUKS handling.
#[derive(Debug, Error)]
pub enum LuksError {
    #[error("invalid LUKS header")]
    Header(#[from] HeaderError),
    #[error("LUKS cipher")]
    Cipher(#[from] SectorCipherError),
    #[error("key derivation")]
    Pbkdf(#[from] PbkdfError),
    #[error("secret")]
    Secret(#[from] SecretError),
    #[error("LUKS area I/O")]
    Storage(#[from] StorageError),
    #[error("no key slot matches the passphrase")]
    NoKeySlotMatches,
    #[error("the LUKS area is {have} bytes, {need} needed")]
    AreaTooSmall { need: u64, have: u64 },
    #[error("all 8 key slots are in use")]
    NoFreeKeySlot,
    #[error("key slot {0} does not exist (0..=7)")]
    BadSlotIndex(usize),
    #[error("key slot {0} is not active")]
    SlotNotActive(usize),
    #[error("key slot {0} is the last active one; removing it would lose the data")]
    LastKeySlot(usize),
    #[error("the LUKS region {base}+{len} extends past the end of the file ({file_len} bytes)")]
    RegionPastEnd { base: u64, len: u64, file_len: u64 },
    #[error("LUKS2")]
    Luks2(#[source] Box<luks2::Luks2Error>),
    #[error("request {offset}+{len} is not aligned to the {unit}-byte encryption sector")]
    Unaligned { offset: u64, len: u64, unit: u64 },
    #[error("an access of {len} bytes at {offset} lies outside the {area}-byte LUKS area")]
    OutsideArea { offset: u64, len: u64, area: u64 },
}

impl From<luks2::Luks2Error> for LuksError {
    fn from(e: luks2::Luks2Error) -> Self {
        LuksError::Luks2(Box::new(e))
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, LuksError>;

/// Where a LUKS header and its key material live: `len` bytes of `storage` from `base`.
#[derive(Clone, Copy)]
pub struct LuksArea<'a> {
    pub storage: &'a dyn Storage,
    pub base: u64,
    pub len: u64,
}

impl<'a> LuksArea<'a> {
    /// `len` bytes of `storage` from `base` (e.g. a qcow2 FDE region), which must lie within the
    /// file: storage reads past the end return zeroes, which would pass for key material.
    pub fn region(storage: &'a dyn Storage, base: u64, len: u64) -> Result<Self> {
        let file_len = storage.len()?;
        match base.checked_add(len) {
            Some(end) if end <= file_len => Ok(Self { storage, base, len }),
            _ => Err(LuksError::RegionPastEnd {
                base,
                len,
                file_len,
            }),
        }
    }

    /// The whole of a raw LUKS file: from offset 0 to its current end.
    pub fn whole(storage: &'a dyn Storage) -> Result<Self> {
        Ok(Self {
            storage,
            base: 0,
            len: storage.len()?,
        })
    }

    fn abs(&self, offset: u64, len: usize) -> Result<u64> {
        let len64 = u64::try_from(len).map_err(|_| LuksError::OutsideArea {
            offset,
            len: u64::MAX,
            area: self.len,
        })?;
        let outside = LuksError::OutsideArea {
            offset,
            len: len64,
            area: self.len,
        };
        match offset.checked_add(len64) {
            Some(end) if end <= self.len => self.base.checked_add(offset).ok_or(outside),
            _ => Err(outside),
        }
    }

    /// Reads `buf.len()` bytes at `offset` within the area.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.abs(offset, buf.len())?;
        Ok(self.storage.read_at(buf, at)?)
    }

    /// Writes `buf` at `offset` within the area.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let at = self.abs(offset, buf.len())?;
        Ok(self.storage.write_at(buf, at)?)
    }
}

/// The cipher spec a validated header names.
///
/// QEMU writes ECB as "ecb-plain64" (it always appends an IV generator, and refuses a mode
/// string without '-'); the IV generator means nothing for ECB, so any "ecb-*" is plain ECB.
pub fn header_cipher_spec(h: &LuksHeader) -> Result<CipherSpec> {
    let name = h.cipher_name()?;
    let mode = h.cipher_mode()?;
    let mode = if mode.starts_with("ecb-") {
        "ecb"
    } else {
        mode
    };
    let key_len = usize::try_from(h.key_bytes).map_err(|_| HeaderError::Overflow)?;
    Ok(CipherSpec::from_luks(name, mode, key_len)?)
}

/// The mode string to write into a header for `spec`, openable by QEMU (which needs a '-').
pub fn header_mode_string(spec: &CipherSpec) -> String {
    if spec.mode == CipherMode::Ecb {
        "ecb-plain64".to_string()
    } else {
        spec.luks_names().1
    }
}
