//! The 592-byte LUKS1 partition header (big-endian), parsed and checked as QEMU's
//! `qcrypto_block_luks_check_header` / `_parse_header` (crypto/block-luks.c) do.
//!
//! Layout (byte offsets): 0 magic `LUKS\xBA\xBE`, 6 version (u16), 8 cipher_name (32 bytes),
//! 40 cipher_mode (32), 72 hash_spec (32), 104 payload_offset (u32, sectors), 108 key_bytes,
//! 112 mk_digest (20), 132 mk_salt (32), 164 mk_iterations, 168 uuid (40), then from 208 eight
//! keyslots of 48 bytes: active (u32: 0x00AC71F3 enabled, 0x0000DEAD disabled), iterations,
//! salt (32), key_offset (u32, sectors), stripes.
//!
//! The string fields are kept as raw arrays so a header we rewrite (keyslot add/remove) keeps
//! every byte we did not mean to change, as QEMU's does.

use thiserror::Error;

use super::pbkdf::LuksHash;

/// Size of the on-disk header in bytes.
pub const HEADER_LEN: usize = 592;
/// The magic bytes.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The only version this module reads (QEMU has no LUKS2 either).
pub const VERSION: u16 = 1;
/// Keyslots in a LUKS1 header.
pub const NUM_KEY_SLOTS: usize = 8;
/// Anti-forensic stripes per keyslot; QEMU refuses any other count.
pub const STRIPES: u32 = 4000;
/// Salt length.
pub const SALT_LEN: usize = 32;
/// Master-key digest length.
pub const DIGEST_LEN: usize = 20;
/// UUID field length.
pub const UUID_LEN: usize = 40;
/// Sector size for every offset in the header.
pub const SECTOR: u64 = 512;
/// Key material starts at or after this byte offset (the header area, 8 sectors).
pub const KEY_SLOT_OFFSET: u64 = 4096;
/// `KEY_SLOT_OFFSET` in sectors; key-material areas are rounded up to a multiple of it.
pub const HEADER_SECTORS: u64 = KEY_SLOT_OFFSET / SECTOR;
/// Keyslot state word: enabled.
pub const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// Keyslot state word: disabled.
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Minimum keyslot PBKDF2 iterations when creating.
pub const MIN_SLOT_ITERS: u32 = 1000;
/// Minimum master-key digest PBKDF2 iterations when creating.
pub const MIN_MASTER_KEY_ITERS: u32 = 1000;

/// A header that cannot be used, with the reason QEMU would give.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a LUKS volume (bad magic)")]
    BadMagic,
    #[error("LUKS version {0} is not supported")]
    UnsupportedVersion(u16),
    #[error("LUKS header {field} is not NUL terminated")]
    NotNulTerminated { field: &'static str },
    #[error("LUKS header {field} is not valid text")]
    NotText { field: &'static str },
    #[error("LUKS payload (sector {0}) overlaps the header")]
    PayloadOverlapsHeader(u32),
    #[error("LUKS master key iteration count is zero")]
    ZeroMasterKeyIterations,
    #[error("keyslot {slot} is corrupted (stripes {stripes} != 4000)")]
    BadStripes { slot: usize, stripes: u32 },
    #[error("keyslot {slot} state 0x{state:08x} is corrupted")]
    BadSlotState { slot: usize, state: u32 },
    #[error("keyslot {slot} iteration count is zero")]
    ZeroSlotIterations { slot: usize },
    #[error("keyslot {slot} overlaps the LUKS header")]
    SlotOverlapsHeader { slot: usize },
    #[error("keyslot {slot} overlaps the encrypted payload")]
    SlotOverlapsPayload { slot: usize },
    #[error("keyslots {a} and {b} overlap")]
    SlotsOverlap { a: usize, b: usize },
    #[error("cipher {0:?} is not supported (only aes)")]
    UnsupportedCipher(String),
    #[error("master key length {key_bytes} does not match cipher {cipher}-{mode}")]
    KeyLengthMismatch {
        key_bytes: u32,
        cipher: String,
        mode: String,
    },
    #[error("hash algorithm {0:?} is not supported (sha1, sha256, sha512)")]
    UnsupportedHash(String),
    #[error(
        "keyslot {slot} key material ({offset}+{len}) lies outside the {limit}-byte LUKS area"
    )]
    KeyMaterialTruncated {
        slot: usize,
        offset: u64,
        len: u64,
        limit: u64,
    },
    #[error("a field of the LUKS header overflows")]
    Overflow,
}

/// One keyslot.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Raw state word (validated to be [`SLOT_ENABLED`] or [`SLOT_DISABLED`]).
    pub state: u32,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors from the start of the LUKS area.
    pub key_offset: u32,
    pub stripes: u32,
}

impl KeySlot {
    /// Whether the slot holds a key.
    pub fn is_active(&self) -> bool {
        self.state == SLOT_ENABLED
    }
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySlot")
            .field("active", &self.is_active())
            .field("iterations", &self.iterations)
            .field("key_offset", &self.key_offset)
            .field("stripes", &self.stripes)
            .finish_non_exhaustive()
    }
}

/// A parsed LUKS1 header. Field values are exactly as on disk (not yet validated unless it came
/// from [`LuksHeader::parse`]).
#[derive(Clone, PartialEq, Eq)]
pub struct LuksHeader {
    pub magic: [u8; 6],
    pub version: u16,
    pub cipher_name: [u8; 32],
    pub cipher_mode: [u8; 32],
    pub hash_spec: [u8; 32],
    /// Start of the payload in 512-byte sectors (unused inside qcow2).
    pub payload_offset: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: [u8; UUID_LEN],
    pub slots: [KeySlot; NUM_KEY_SLOTS],
}

impl std::fmt::Debug for LuksHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksHeader")
            .field("cipher_name", &cstr_lossy(&self.cipher_name))
            .field("cipher_mode", &cstr_lossy(&self.cipher_mode))
            .field("hash_spec", &cstr_lossy(&self.hash_spec))
            .field("payload_offset", &self.payload_offset)
            .field("key_bytes", &self.key_bytes)
            .field("mk_iterations", &self.mk_iterations)
            .field("uuid", &cstr_lossy(&self.uuid))
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

fn cstr_lossy(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn cstr<'a>(b: &'a [u8], field: &'static str) -> Result<&'a str, HeaderError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(HeaderError::NotNulTerminated { field })?;
    std::str::from_utf8(&b[..end]).map_err(|_| HeaderError::NotText { field })
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// Writes `s` NUL-padded into a 32-byte field; None if it does not fit with its NUL.
pub fn str_field(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() >= 32 {
        return None;
    }
    let mut f = [0u8; 32];
    f[..b.len()].copy_from_slice(b);
    Some(f)
}

/// Sectors of key material a slot with `stripes` stripes occupies: ceil(key_bytes × stripes /
/// 512), rounded up to a multiple of 8 sectors (cryptsetup's and QEMU's layout).
pub fn split_key_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let bytes = u64::from(key_bytes) * u64::from(stripes); // < 2^64: both are u32
    bytes.div_ceil(SECTOR).div_ceil(HEADER_SECTORS) * HEADER_SECTORS
}

/// Checks whether the AES key size fits the mode (XTS takes two keys).
fn key_len_fits(cipher_mode: &str, key_bytes: u32) -> bool {
    let per_key = if cipher_mode == "xts" || cipher_mode.starts_with("xts-") {
        if !key_bytes.is_multiple_of(2) {
            return false;
        }
        key_bytes / 2
    } else {
        key_bytes
    };
    matches!(per_key, 16 | 24 | 32)
}

impl LuksHeader {
    /// Decodes the 592 bytes without checking anything.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let slots = std::array::from_fn(|i| {
            let o = 208 + i * 48;
            KeySlot {
                state: be32(b, o),
                iterations: be32(b, o + 4),
                salt: arr(b, o + 8),
                key_offset: be32(b, o + 40),
                stripes: be32(b, o + 44),
            }
        });
        Self {
            magic: arr(b, 0),
            version: u16::from_be_bytes([b[6], b[7]]),
            cipher_name: arr(b, 8),
            cipher_mode: arr(b, 40),
            hash_spec: arr(b, 72),
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: arr(b, 112),
            mk_salt: arr(b, 132),
            mk_iterations: be32(b, 164),
            uuid: arr(b, 168),
            slots,
        }
    }

    /// Decodes and validates (see [`LuksHeader::validate`]).
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
        let h = Self::decode(b);
        h.validate()?;
        Ok(h)
    }

    /// Encodes the header into its 592 on-disk bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..6].copy_from_slice(&self.magic);
        b[6..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..40].copy_from_slice(&self.cipher_name);
        b[40..72].copy_from_slice(&self.cipher_mode);
        b[72..104].copy_from_slice(&self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            b[o..o + 4].copy_from_slice(&s.state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// The cipher name ("aes").
    pub fn cipher_name(&self) -> Result<&str, HeaderError> {
        cstr(&self.cipher_name, "cipher name")
    }

    /// The cipher mode string ("xts-plain64", "cbc-essiv:sha256", ...).
    pub fn cipher_mode(&self) -> Result<&str, HeaderError> {
        cstr(&self.cipher_mode, "cipher mode")
    }

    /// The hash spec string ("sha256").
    pub fn hash_spec(&self) -> Result<&str, HeaderError> {
        cstr(&self.hash_spec, "hash spec")
    }

    /// The hash algorithm for PBKDF2 and AF.
    pub fn hash(&self) -> Result<LuksHash, HeaderError> {
        let s = self.hash_spec()?;
        LuksHash::from_name(s).ok_or_else(|| HeaderError::UnsupportedHash(s.to_string()))
    }

    /// The UUID as text.
    pub fn uuid(&self) -> String {
        cstr_lossy(&self.uuid)
    }

    /// Payload start in bytes.
    pub fn payload_offset_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR
    }

    /// Byte range (offset, length) of a slot's key material within the LUKS area.
    pub fn key_material_range(&self, slot: usize) -> (u64, u64) {
        let s = &self.slots[slot];
        (
            u64::from(s.key_offset) * SECTOR,
            u64::from(self.key_bytes) * u64::from(s.stripes),
        )
    }

    /// The checks QEMU makes before using a header, in QEMU's order, plus the cipher-name,
    /// key-length and hash checks of its header parsing. Inside qcow2 the payload offset is
    /// unused but QEMU still fills it in and checks the slots against it; so do we.
    pub fn validate(&self) -> Result<(), HeaderError> {
        if self.magic != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if self.version != VERSION {
            return Err(HeaderError::UnsupportedVersion(self.version));
        }
        let name = self.cipher_name()?;
        let mode = self.cipher_mode()?;
        self.hash_spec()?;
        if u64::from(self.payload_offset) < HEADER_SECTORS {
            return Err(HeaderError::PayloadOverlapsHeader(self.payload_offset));
        }
        if self.mk_iterations == 0 {
            return Err(HeaderError::ZeroMasterKeyIterations);
        }
        for (i, s) in self.slots.iter().enumerate() {
            if s.stripes != STRIPES {
                return Err(HeaderError::BadStripes {
                    slot: i,
                    stripes: s.stripes,
                });
            }
            if s.state != SLOT_ENABLED && s.state != SLOT_DISABLED {
                return Err(HeaderError::BadSlotState {
                    slot: i,
                    state: s.state,
                });
            }
            if s.is_active() && s.iterations == 0 {
                return Err(HeaderError::ZeroSlotIterations { slot: i });
            }
            let start = u64::from(s.key_offset);
            let len = split_key_sectors(self.key_bytes, s.stripes);
            if start < HEADER_SECTORS {
                return Err(HeaderError::SlotOverlapsHeader { slot: i });
            }
            let end = start.checked_add(len).ok_or(HeaderError::Overflow)?;
            if end > u64::from(self.payload_offset) {
                return Err(HeaderError::SlotOverlapsPayload { slot: i });
            }
            for (j, t) in self.slots.iter().enumerate().skip(i + 1) {
                let start2 = u64::from(t.key_offset);
                let len2 = split_key_sectors(self.key_bytes, t.stripes);
                let end2 = start2.checked_add(len2).ok_or(HeaderError::Overflow)?;
                if start < end2 && start2 < end {
                    return Err(HeaderError::SlotsOverlap { a: i, b: j });
                }
            }
        }
        if name != "aes" {
            return Err(HeaderError::UnsupportedCipher(name.to_string()));
        }
        if !key_len_fits(mode, self.key_bytes) {
            return Err(HeaderError::KeyLengthMismatch {
                key_bytes: self.key_bytes,
                cipher: name.to_string(),
                mode: mode.to_string(),
            });
        }
        self.hash()?;
        Ok(())
    }

    /// Checks that every slot's key material lies within the first `area_len` bytes of the LUKS
    /// area (the file for raw LUKS, the FDE region for qcow2). Storage reads past the end would
    /// silently return zeroes, so this is checked before any key material is read.
    pub fn check_key_material_within(&self, area_len: u64) -> Result<(), HeaderError> {
        for i in 0..NUM_KEY_SLOTS {
            if !self.slots[i].is_active() {
                continue;
            }
            let (offset, len) = self.key_material_range(i);
            match offset.checked_add(len) {
                Some(end) if end <= area_len => {}
                _ => {
                    return Err(HeaderError::KeyMaterialTruncated {
                        slot: i,
                        offset,
                        len,
                        limit: area_len,
                    })
                }
            }
        }
        Ok(())
    }

    /// Number of enabled keyslots.
    pub fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_active()).count()
    }
}

#[cfg(test)]
#[path = "header_tests.rs"]
mod tests;
