//! Formatting a raw LUKS2 file with cryptsetup's default layout: 16 KiB header copies at 0
//! and 16 KiB, the keyslots area from 32 KiB to the data at 16 MiB (keyslots_size 16 MiB −
//! 32 KiB), keyslot 0's area at 32 KiB, one pbkdf2 digest, one dynamic crypt segment.

use serde_json::json;

use super::base64;
use super::binhdr::{BinHeader, BIN_LEN};
use super::kdf::{self, KdfChoice};
use super::meta::{Meta, SALT_LEN, STRIPES};
use super::volume::{Luks2Header, Luks2Volume};
use super::{Luks2Error, Result};
use crate::crypto::luks::af;
use crate::crypto::luks::keyslot::crypt_material;
use crate::crypto::luks::pbkdf::{self, LuksHash};
use crate::crypto::secret::{Passphrase, SecretBytes, SecretError};
use crate::crypto::sector::{CipherAlg, CipherMode, CipherSpec, IvGen, SectorCipher};
use crate::storage::Storage;

/// cryptsetup's default header size (binary + JSON).
pub const DEFAULT_HDR_SIZE: u64 = 0x4000;
/// cryptsetup's default data offset.
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;
/// cryptsetup's minimum digest iterations.
pub const MIN_DIGEST_ITERATIONS: u32 = 1000;
/// Digest calibration target (cryptsetup's LUKS_MKD_ITERATIONS_MS).
pub const DIGEST_TIME_MS: u64 = 125;

/// What to create.
#[derive(Clone, Copy, Debug)]
pub struct Luks2CreateParams {
    /// Data (and keyslot area) cipher.
    pub spec: CipherSpec,
    /// Encryption sector size: 512 or 4096.
    pub sector_size: u32,
    /// KDF of keyslot 0.
    pub kdf: KdfChoice,
    /// Hash of the digest and of the AF splitter.
    pub hash: LuksHash,
}

impl Default for Luks2CreateParams {
    /// cryptsetup's defaults (aes-xts-plain64 with a 512-bit key, argon2id, sha256), but
    /// 512-byte sectors, which every guest and firmware handles.
    fn default() -> Self {
        Self {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                iv: IvGen::Plain64,
            },
            sector_size: 512,
            kdf: KdfChoice::default_argon2id(),
            hash: LuksHash::Sha256,
        }
    }
}

fn random_uuid() -> Result<String> {
    let mut r = [0u8; 16];
    getrandom::fill(&mut r).map_err(SecretError::Random)?;
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let h: String = r.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn field<const N: usize>(s: &str) -> [u8; N] {
    let mut f = [0u8; N];
    let n = s.len().min(N - 1);
    f[..n].copy_from_slice(&s.as_bytes()[..n]);
    f
}

/// Formats `storage` (at least [`DEFAULT_DATA_OFFSET`] bytes) as LUKS2 with `pass` in keyslot
/// 0. Returns the unlocked volume.
pub fn format(
    storage: &dyn Storage,
    params: &Luks2CreateParams,
    pass: &Passphrase,
) -> Result<Luks2Volume> {
    if !matches!(params.sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(Luks2Error::Unsupported(format!(
            "sector size {}",
            params.sector_size
        )));
    }
    let have = storage.len()?;
    if have < DEFAULT_DATA_OFFSET {
        return Err(Luks2Error::Truncated {
            need: DEFAULT_DATA_OFFSET,
            have,
        });
    }
    let (name, mode) = params.spec.luks_names();
    let encryption = format!("{name}-{mode}");
    let key_size = params.spec.key_len();
    let hdr_size = DEFAULT_HDR_SIZE;
    let keyslots_size = DEFAULT_DATA_OFFSET - 2 * hdr_size;

    // Header areas zeroed, keyslots area random (as cryptsetup's LUKS2_wipe_header_areas).
    storage.write_at(
        &vec![0u8; usize::try_from(2 * hdr_size).map_err(|_| Luks2Error::Overflow)?],
        0,
    )?;
    let mut noise = vec![0u8; 1 << 20];
    let mut at = 2 * hdr_size;
    while at < DEFAULT_DATA_OFFSET {
        let n = usize::try_from((DEFAULT_DATA_OFFSET - at).min(1 << 20))
            .map_err(|_| Luks2Error::Overflow)?;
        getrandom::fill(&mut noise[..n]).map_err(SecretError::Random)?;
        storage.write_at(&noise[..n], at)?;
        at += n as u64;
    }

    let vk = SecretBytes::random(key_size)?;
    // Digest.
    let mut dsalt = [0u8; SALT_LEN];
    getrandom::fill(&mut dsalt).map_err(SecretError::Random)?;
    let diters = match params.kdf {
        KdfChoice::Argon2Fixed { .. } | KdfChoice::Pbkdf2Fixed { .. } => MIN_DIGEST_ITERATIONS,
        _ => {
            let rate = pbkdf::count_iters_per_sec(params.hash, vk.expose(), &dsalt, key_size)?;
            pbkdf::scale_iterations(rate, DIGEST_TIME_MS, 1, MIN_DIGEST_ITERATIONS)?
                .min(kdf::MAX_PBKDF2_ITERATIONS)
        }
    };
    let mut digest = SecretBytes::zeroed(params.hash.digest_len());
    params
        .hash
        .pbkdf2(vk.expose(), &dsalt, diters, digest.expose_mut())?;

    // Keyslot 0.
    let slot_kdf = kdf::new_kdf(params.kdf, key_size)?;
    kdf::check_limits(0, &slot_kdf)?;
    let area_offset = 2 * hdr_size;
    let area_size = u64::try_from(key_size * STRIPES as usize)
        .map_err(|_| Luks2Error::Overflow)?
        .next_multiple_of(4096);
    let mut slot_key = SecretBytes::zeroed(key_size);
    kdf::derive(&slot_kdf, pass.as_bytes(), slot_key.expose_mut())?;
    let material_len = (key_size * STRIPES as usize).next_multiple_of(512);
    let mut material = SecretBytes::zeroed(material_len);
    af::split(
        params.hash,
        STRIPES,
        vk.expose(),
        &mut material.expose_mut()[..key_size * STRIPES as usize],
    )?;
    let cipher = SectorCipher::new(params.spec, slot_key.expose())?;
    crypt_material(&cipher, material.expose_mut(), true)?;
    storage.write_at(material.expose(), area_offset)?;
    storage.sync()?;

    let root = json!({
        "keyslots": {
            "0": {
                "type": "luks2",
                "key_size": key_size,
                "af": {"type": "luks1", "stripes": STRIPES, "hash": params.hash.name()},
                "area": {
                    "type": "raw",
                    "offset": area_offset.to_string(),
                    "size": area_size.to_string(),
                    "encryption": encryption,
                    "key_size": key_size,
                },
                "kdf": slot_kdf.to_json(),
            }
        },
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": DEFAULT_DATA_OFFSET.to_string(),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": encryption,
                "sector_size": params.sector_size,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": ["0"],
                "segments": ["0"],
                "hash": params.hash.name(),
                "iterations": diters,
                "salt": base64::encode(&dsalt),
                "digest": base64::encode(digest.expose()),
            }
        },
        "config": {
            "json_size": (hdr_size - BIN_LEN as u64).to_string(),
            "keyslots_size": keyslots_size.to_string(),
        }
    });
    let meta = Meta::parse(root, hdr_size)?;
    let mut salts = [[0u8; 64]; 2];
    for s in &mut salts {
        getrandom::fill(s).map_err(SecretError::Random)?;
    }
    let bin = BinHeader {
        hdr_size,
        seqid: 0,
        label: [0; 48],
        checksum_alg: field("sha256"),
        salt: salts[0],
        uuid: field(&random_uuid()?),
        subsystem: [0; 48],
    };
    let mut header = Luks2Header::new(bin, meta, salts);
    header.write(storage)?;
    Ok(Luks2Volume::from_parts(header, vk))
}
