//! Formatting a new LUKS1 area with exactly QEMU's layout (`qcrypto_block_luks_create`):
//! keyslot i's key material at sector 8 + i × S, where S = ceil(key_bytes × 4000 / 512)
//! rounded up to 8 sectors, and the payload right after the 8th slot (sector 4040 for a
//! 64-byte key, 2056 for 32 bytes). Slot 0 holds the passphrase; the others are disabled
//! but keep their offsets and stripe counts, as QEMU writes them.

use super::header::{
    split_key_sectors, str_field, KeySlot, LuksHeader, DIGEST_LEN, HEADER_SECTORS, MAGIC,
    MIN_MASTER_KEY_ITERS, NUM_KEY_SLOTS, SALT_LEN, SECTOR, SLOT_DISABLED, STRIPES, UUID_LEN,
    VERSION,
};
use super::keyslot::LuksVolume;
use super::pbkdf::{self, LuksHash};
use super::{header_mode_string, HeaderError, LuksArea, LuksError, Result};
use crate::crypto::secret::{Passphrase, SecretBytes, SecretError};
use crate::crypto::sector::{CipherAlg, CipherMode, CipherSpec, EssivHash, IvGen};

/// How many PBKDF2 iterations to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iterations {
    /// Calibrated so one keyslot unlock takes this many milliseconds of CPU here (QEMU's
    /// `iter-time`; default 2000). The master-key digest gets an eighth of that; both at least
    /// 1000 iterations.
    TimeMs(u64),
    /// A fixed keyslot count (tests, benchmarks; like cryptsetup's
    /// `--pbkdf-force-iterations`); the digest gets max(n / 8, 1000).
    Fixed(u32),
}

/// QEMU's default `iter-time`.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// What to create.
#[derive(Clone, Copy, Debug)]
pub struct CreateParams {
    pub spec: CipherSpec,
    pub hash: LuksHash,
    pub iterations: Iterations,
}

impl Default for CreateParams {
    /// QEMU's defaults: aes-256-xts-plain64, sha256, 2000 ms.
    fn default() -> Self {
        Self {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                iv: IvGen::Plain64,
            },
            hash: LuksHash::Sha256,
            iterations: Iterations::TimeMs(DEFAULT_ITER_TIME_MS),
        }
    }
}

/// Parses a cipher option as `qemu-img` spells the parts and cryptsetup joins them:
/// `aes-256-xts-plain64`, `aes-128-cbc-essiv:sha256`, `aes-192-ecb`, ...
pub fn parse_cipher(s: &str) -> Option<CipherSpec> {
    let rest = s.strip_prefix("aes-")?;
    let (bits, rest) = rest.split_once('-')?;
    let alg = match bits {
        "128" => CipherAlg::Aes128,
        "192" => CipherAlg::Aes192,
        "256" => CipherAlg::Aes256,
        _ => return None,
    };
    let (mode, iv) = match rest.split_once('-') {
        Some((m, iv)) => (m, Some(iv)),
        None => (rest, None),
    };
    let mode = match mode {
        "xts" => CipherMode::Xts,
        "cbc" => CipherMode::Cbc,
        "ecb" => CipherMode::Ecb,
        _ => return None,
    };
    let iv = match (mode, iv) {
        (CipherMode::Ecb, None) => IvGen::Null,
        (CipherMode::Ecb, Some(_)) => return None,
        (_, None | Some("plain64")) => IvGen::Plain64,
        (_, Some("plain")) => IvGen::Plain,
        (_, Some("essiv:sha256")) => IvGen::Essiv(EssivHash::Sha256),
        _ => return None,
    };
    Some(CipherSpec { alg, mode, iv })
}

/// Offsets QEMU's layout gives a key of `key_bytes`: (slot offsets, payload offset), sectors.
pub fn layout(key_bytes: u32) -> Result<([u32; NUM_KEY_SLOTS], u32)> {
    let per_slot = split_key_sectors(key_bytes, STRIPES);
    let mut offs = [0u32; NUM_KEY_SLOTS];
    for (i, o) in offs.iter_mut().enumerate() {
        let i = u64::try_from(i).map_err(|_| HeaderError::Overflow)?;
        *o = u32::try_from(HEADER_SECTORS + i * per_slot).map_err(|_| HeaderError::Overflow)?;
    }
    let payload = HEADER_SECTORS + 8 * per_slot;
    Ok((
        offs,
        u32::try_from(payload).map_err(|_| HeaderError::Overflow)?,
    ))
}

/// Bytes of header plus the 8 key-material areas for `spec` (= the payload offset; in qcow2,
/// the length of the FDE region).
pub fn area_len(spec: &CipherSpec) -> Result<u64> {
    let key_bytes = u32::try_from(spec.key_len()).map_err(|_| HeaderError::Overflow)?;
    let (_, payload) = layout(key_bytes)?;
    Ok(u64::from(payload) * SECTOR)
}

fn random_uuid() -> Result<[u8; UUID_LEN]> {
    let mut r = [0u8; 16];
    getrandom::fill(&mut r).map_err(SecretError::Random)?;
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let mut out = [0u8; UUID_LEN];
    out[..text.len()].copy_from_slice(text.as_bytes());
    Ok(out)
}

/// Formats `area` (at least [`area_len`] bytes): writes the header and slot 0's key material
/// for a fresh random master key protected by `pass`. Returns the unlocked volume.
pub fn format(area: &LuksArea<'_>, params: &CreateParams, pass: &Passphrase) -> Result<LuksVolume> {
    let spec = params.spec;
    let hash = params.hash;
    let need = area_len(&spec)?;
    if area.len < need {
        return Err(LuksError::AreaTooSmall {
            need,
            have: area.len,
        });
    }
    let key_len = spec.key_len();
    let key_bytes = u32::try_from(key_len).map_err(|_| HeaderError::Overflow)?;
    let master_key = SecretBytes::random(key_len)?;
    let mut mk_salt = [0u8; SALT_LEN];
    getrandom::fill(&mut mk_salt).map_err(SecretError::Random)?;
    let mk_iterations = match params.iterations {
        Iterations::Fixed(n) => (n / 8).max(MIN_MASTER_KEY_ITERS),
        Iterations::TimeMs(ms) => {
            let rate = pbkdf::count_iters_per_sec(hash, master_key.expose(), &mk_salt, DIGEST_LEN)?;
            pbkdf::scale_iterations(rate, ms, 8, MIN_MASTER_KEY_ITERS)?
        }
    };
    let mut mk_digest = [0u8; DIGEST_LEN];
    hash.pbkdf2(master_key.expose(), &mk_salt, mk_iterations, &mut mk_digest)?;
    let (offsets, payload_offset) = layout(key_bytes)?;
    let (name, _) = spec.luks_names();
    let mode = header_mode_string(&spec);
    let too_long = |_| HeaderError::Overflow;
    let header = LuksHeader {
        magic: MAGIC,
        version: VERSION,
        cipher_name: str_field(name).ok_or(()).map_err(too_long)?,
        cipher_mode: str_field(&mode).ok_or(()).map_err(too_long)?,
        hash_spec: str_field(hash.name()).ok_or(()).map_err(too_long)?,
        payload_offset,
        key_bytes,
        mk_digest,
        mk_salt,
        mk_iterations,
        uuid: random_uuid()?,
        slots: std::array::from_fn(|i| KeySlot {
            state: SLOT_DISABLED,
            iterations: 0,
            salt: [0u8; SALT_LEN],
            key_offset: offsets[i],
            stripes: STRIPES,
        }),
    };
    header.validate()?;
    let mut vol = LuksVolume::from_parts(header, master_key)?;
    let iterations = match params.iterations {
        Iterations::Fixed(n) => Iterations::Fixed(n.max(1)),
        t => t,
    };
    vol.store_key(area, 0, pass, iterations)?;
    Ok(vol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu_for_every_key_size() {
        // 64-byte key: slots every 504 sectors from 8, payload 4040 (checked against qemu-img).
        let (o, p) = layout(64).expect("layout");
        assert_eq!(o, [8, 512, 1016, 1520, 2024, 2528, 3032, 3536]);
        assert_eq!(p, 4040);
        assert_eq!(layout(32).expect("layout").1, 8 + 8 * 256);
        assert_eq!(layout(16).expect("layout").1, 8 + 8 * 128);
        // 24 bytes × 4000 = 96 000 bytes = 187.5 sectors → 188 → 192.
        assert_eq!(layout(24).expect("layout").1, 8 + 8 * 192);
    }

    #[test]
    fn cipher_options_parse_as_qemu_names_them() {
        let s = parse_cipher("aes-256-xts-plain64").expect("parse");
        assert_eq!(s, CreateParams::default().spec);
        let s = parse_cipher("aes-128-cbc-essiv:sha256").expect("parse");
        assert_eq!(s.iv, IvGen::Essiv(EssivHash::Sha256));
        assert_eq!(parse_cipher("aes-192-ecb").expect("parse").iv, IvGen::Null);
        assert_eq!(
            parse_cipher("aes-256-cbc").expect("parse").iv,
            IvGen::Plain64
        );
        assert!(parse_cipher("serpent-256-xts-plain64").is_none());
        assert!(parse_cipher("aes-256-ctr-plain64").is_none());
        assert!(parse_cipher("aes-256-xts-benbi").is_none());
    }
}
