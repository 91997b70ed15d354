//! LUKS2, bit-compatible with cryptsetup's `luksFormat --type luks2` (the "LUKS2 On-Disk Format
//! Specification" and cryptsetup's `lib/luks2/`). QEMU has no LUKS2.
//!
//! * [`binhdr`]: the two binary headers, their checksums, reading and writing one copy.
//! * [`meta`]: the JSON metadata, validated, with the parts we support read into types.
//! * [`kdf`]: PBKDF2 and Argon2 key derivation with resource limits, and calibration.
//! * [`mod@unit`]: data encryption with sector sizes up to 4096 bytes.
//! * [`volume`]: choosing the header copy, unlocking, adding and removing keyslots.
//! * [`create`]: formatting a raw LUKS2 file with cryptsetup's default layout.
//!
//! Supported: luks2 keyslots (pbkdf2, argon2i, argon2id; AF hash sha1/sha256/sha512), one
//! pbkdf2 digest, one crypt segment (aes xts/cbc/ecb with plain, plain64 or essiv:sha256 IVs,
//! sector size 512–4096, fixed or dynamic size, any iv_tweak). Refused with a clear error:
//! mandatory requirements (reencryption, OPAL, ...), integrity segments, several segments or
//! digests, other keyslot, KDF or digest types, a detached header.

pub mod base64;
pub mod binhdr;
pub mod create;
pub mod kdf;
pub mod meta;
pub mod unit;
pub mod volume;

#[cfg(test)]
mod tests;

use thiserror::Error;

pub use create::Luks2CreateParams;
pub use kdf::KdfChoice;
pub use unit::DiskCipher;
pub use volume::{Luks2Header, Luks2Volume};

use crate::crypto::luks::PbkdfError;
use crate::crypto::secret::SecretError;
use crate::crypto::sector::SectorCipherError;
use crate::storage::StorageError;

/// Errors of LUKS2 handling.
#[derive(Debug, Error)]
pub enum Luks2Error {
    #[error("{copy} LUKS2 header copy is unusable: {reason}")]
    BadCopy { copy: &'static str, reason: String },
    #[error("no valid LUKS2 header copy (primary: {primary}; secondary: {secondary})")]
    NoValidCopy { primary: String, secondary: String },
    #[error("invalid LUKS2 metadata: {0}")]
    Meta(String),
    #[error("unsupported LUKS2 feature: {0}")]
    Unsupported(String),
    #[error("keyslot {slot}: {what}")]
    KdfLimit { slot: u32, what: String },
    #[error("argon2: {0}")]
    Argon2(String),
    #[error("the LUKS2 metadata and data need {need} bytes, the file has {have}")]
    Truncated { need: u64, have: u64 },
    #[error("the JSON metadata ({len} bytes) does not fit the {area}-byte JSON area")]
    JsonTooBig { len: usize, area: usize },
    #[error("JSON: {0}")]
    Json(String),
    #[error("no keyslot matches the passphrase")]
    NoKeySlotMatches,
    #[error("all 32 keyslots are in use")]
    NoFreeKeySlot,
    #[error("no free gap of {need} bytes left in the keyslots area")]
    NoKeyslotSpace { need: u64 },
    #[error("keyslot {0} does not exist")]
    SlotNotActive(u32),
    #[error("keyslot {0} is the last one that unlocks the data; removing it would lose the data")]
    LastKeySlot(u32),
    #[error("a LUKS2 field overflows")]
    Overflow,
    #[error("cipher")]
    Cipher(#[from] SectorCipherError),
    #[error("key derivation")]
    Pbkdf(#[from] PbkdfError),
    #[error("secret")]
    Secret(#[from] SecretError),
    #[error("LUKS2 I/O")]
    Storage(#[from] StorageError),
    #[error("LUKS (keyslot material)")]
    Luks(#[from] Box<crate::crypto::luks::LuksError>),
}

impl From<crate::crypto::luks::LuksError> for Luks2Error {
    fn from(e: crate::crypto::luks::LuksError) -> Self {
        Luks2Error::Luks(Box::new(e))
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Luks2Error>;

/// The version field of a LUKS header (1 or 2) if `storage` starts with the LUKS magic.
pub fn luks_version(
    storage: &dyn crate::storage::Storage,
) -> std::result::Result<Option<u16>, StorageError> {
    if storage.len()? < 8 {
        return Ok(None);
    }
    let mut m = [0u8; 8];
    storage.read_at(&mut m, 0)?;
    if m[..6] != binhdr::MAGIC_1ST {
        return Ok(None);
    }
    Ok(Some(u16::from_be_bytes([m[6], m[7]])))
}
