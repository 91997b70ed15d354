//! Reading the header, unlocking the volume key, adding and removing keyslots.
//!
//! Unlocking a luks2 keyslot (cryptsetup `luks2_keyslot_get_key`): derive `area.key_size`
//! bytes with the keyslot's KDF; read key_size × 4000 bytes (rounded up to 512) of key material
//! at `area.offset` and decrypt them with `area.encryption`, 512-byte sectors, IVs from 0;
//! merge the AF stripes with `af.hash`; accept the key if PBKDF2 of it with the digest's hash,
//! salt and iterations equals the stored digest.
//!
//! Writing a header (keyslot add / remove) writes the primary copy with seqid + 1, syncs, then
//! the secondary with the same seqid, and syncs. Killed between the two, the primary is valid
//! with the higher seqid and wins (cryptsetup makes the same choice); killed while writing a
//! copy, that copy's checksum fails and the other copy, still complete, is used.

use serde_json::Value;

use super::binhdr::{self, BinHeader};
use super::kdf::{self, KdfChoice};
use super::meta::{Keyslot, Meta, STRIPES};
use super::unit::DiskCipher;
use super::{Luks2Error, Result};
use crate::crypto::luks::af;
use crate::crypto::luks::keyslot::crypt_material;
use crate::crypto::secret::{ct_eq, Passphrase, SecretBytes, SecretError};
use crate::crypto::sector::SectorCipher;
use crate::storage::Storage;

/// Which copy a header was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyUsed {
    Primary,
    Secondary,
}

/// A LUKS2 header: the copy in use, its typed metadata, and the other copy's state.
#[derive(Clone, Debug)]
pub struct Luks2Header {
    /// Binary header of the copy in use.
    pub bin: BinHeader,
    pub meta: Meta,
    pub used: CopyUsed,
    /// Salt of the primary and secondary copies (each copy keeps its own).
    salts: [[u8; 64]; 2],
    /// Why the other copy is not used, if it is unusable (None: valid, older or equal).
    pub other_problem: Option<String>,
}

fn checked_copy(storage: &dyn Storage, offset: u64, secondary: bool) -> Result<binhdr::Copy> {
    let c = binhdr::read_copy(storage, offset, secondary)?;
    super::meta::validate(&c.json, c.bin.hdr_size).map_err(|e| Luks2Error::BadCopy {
        copy: if secondary { "secondary" } else { "primary" },
        reason: e.to_string(),
    })?;
    Ok(c)
}

impl Luks2Header {
    /// Reads both copies and keeps the valid one with the higher seqid (cryptsetup's rule),
    /// then refuses what is not supported. Reads only.
    pub fn read(storage: &dyn Storage) -> Result<Self> {
        let primary = checked_copy(storage, 0, false);
        let secondary = match &primary {
            Ok(p) => checked_copy(storage, p.bin.hdr_size, true),
            Err(_) => {
                // No trustworthy size: try every offset the format allows, as cryptsetup does.
                let mut last = Err(Luks2Error::BadCopy {
                    copy: "secondary",
                    reason: "not found".into(),
                });
                for off in binhdr::HDR_SIZES {
                    last = checked_copy(storage, off, true);
                    if last.is_ok() {
                        break;
                    }
                }
                last
            }
        };
        let (copy, used, other_problem) = match (primary, secondary) {
            (Ok(p), Ok(s)) => {
                if s.bin.seqid > p.bin.seqid {
                    (s, CopyUsed::Secondary, None)
                } else {
                    (p, CopyUsed::Primary, None)
                }
            }
            (Ok(p), Err(e)) => (p, CopyUsed::Primary, Some(e.to_string())),
            (Err(e), Ok(s)) => (s, CopyUsed::Secondary, Some(e.to_string())),
            (Err(p), Err(s)) => {
                return Err(Luks2Error::NoValidCopy {
                    primary: p.to_string(),
                    secondary: s.to_string(),
                })
            }
        };
        let meta = Meta::parse(copy.json, copy.bin.hdr_size)?;
        let file_len = storage.len()?;
        let need = meta.config.keyslots_end().max(meta.segment.offset);
        if file_len < need {
            return Err(Luks2Error::Truncated {
                need,
                have: file_len,
            });
        }
        if let Some(size) = meta.segment.size {
            let end = meta
                .segment
                .offset
                .checked_add(size)
                .ok_or(Luks2Error::Overflow)?;
            if end > file_len {
                return Err(Luks2Error::Truncated {
                    need: end,
                    have: file_len,
                });
            }
        }
        let mut other_salt = [0u8; 64];
        let other_at = match used {
            CopyUsed::Primary => copy.bin.hdr_size,
            CopyUsed::Secondary => 0,
        };
        // The other copy's salt, when its binary header is there to read; else a fresh one.
        let mut raw = [0u8; binhdr::BIN_LEN];
        if storage.read_at(&mut raw, other_at).is_ok() && other_problem.is_none() {
            other_salt.copy_from_slice(&raw[104..168]);
        } else {
            getrandom::fill(&mut other_salt).map_err(SecretError::Random)?;
        }
        let salts = match used {
            CopyUsed::Primary => [copy.bin.salt, other_salt],
            CopyUsed::Secondary => [other_salt, copy.bin.salt],
        };
        Ok(Self {
            bin: copy.bin,
            meta,
            used,
            salts,
            other_problem,
        })
    }

    /// A header for a new volume (used by `create`).
    pub(super) fn new(bin: BinHeader, meta: Meta, salts: [[u8; 64]; 2]) -> Self {
        Self {
            bin,
            meta,
            used: CopyUsed::Primary,
            salts,
            other_problem: None,
        }
    }

    /// UUID text.
    pub fn uuid(&self) -> String {
        binhdr::cstr_lossy(&self.bin.uuid)
    }

    /// Label text.
    pub fn label(&self) -> String {
        binhdr::cstr_lossy(&self.bin.label)
    }

    /// Subsystem text.
    pub fn subsystem(&self) -> String {
        binhdr::cstr_lossy(&self.bin.subsystem)
    }

    /// Writes `root` (after validating it as a header we can read back) as the new metadata:
    /// both copies, seqid + 1, primary first. With `primary_only`, stops after the primary
    /// copy (a crash-test hook).
    fn commit(&mut self, storage: &dyn Storage, root: Value, primary_only: bool) -> Result<()> {
        let meta = Meta::parse(root, self.bin.hdr_size)?;
        let area = binhdr::json_area(&meta.root, self.bin.hdr_size)?;
        let mut bin = self.bin.clone();
        bin.seqid = bin.seqid.checked_add(1).ok_or(Luks2Error::Overflow)?;
        bin.salt = self.salts[0];
        binhdr::write_copy(storage, &bin, false, &area)?;
        if !primary_only {
            bin.salt = self.salts[1];
            binhdr::write_copy(storage, &bin, true, &area)?;
        }
        bin.salt = self.salts[0];
        self.bin = bin;
        self.meta = meta;
        self.used = CopyUsed::Primary;
        self.other_problem = None;
        Ok(())
    }

    /// Writes both copies of this header as it is, with seqid + 1 (create; repair).
    pub fn write(&mut self, storage: &dyn Storage) -> Result<()> {
        let root = self.meta.root.clone();
        self.commit(storage, root, false)
    }
}

/// Reads a keyslot's material, decrypts and merges it with the key derived from `pass`.
fn open_keyslot(storage: &dyn Storage, ks: &Keyslot, pass: &[u8]) -> Result<SecretBytes> {
    let mut slot_key = SecretBytes::zeroed(ks.area_key_size);
    kdf::derive(&ks.kdf, pass, slot_key.expose_mut())?;
    let mut material = SecretBytes::zeroed(ks.material_len()?);
    storage.read_at(material.expose_mut(), ks.area_offset)?;
    let cipher = SectorCipher::new(ks.area_spec, slot_key.expose())?;
    crypt_material(&cipher, material.expose_mut(), false)?;
    let mut key = SecretBytes::zeroed(ks.key_size);
    let split = ks.key_size * STRIPES as usize;
    af::merge(
        ks.af_hash,
        STRIPES,
        &material.expose()[..split],
        key.expose_mut(),
    );
    Ok(key)
}

/// An unlocked LUKS2 volume.
pub struct Luks2Volume {
    header: Luks2Header,
    volume_key: SecretBytes,
    unlocked_slot: Option<u32>,
}

impl std::fmt::Debug for Luks2Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Luks2Volume")
            .field("header", &self.header)
            .field("unlocked_slot", &self.unlocked_slot)
            .finish_non_exhaustive()
    }
}

/// Keyslot priority: 0 ignore, 1 normal (default), 2 high.
fn priority(root: &Value, id: u32) -> u64 {
    root["keyslots"][id.to_string()]
        .get("priority")
        .and_then(Value::as_u64)
        .unwrap_or(1)
}

impl Luks2Volume {
    /// Reads the header and unlocks the volume key with `pass`: every keyslot's KDF is checked
    /// against the limits first, then the keyslots bound to the segment's digest are tried,
    /// high priority first, "ignore" priority skipped. Reads only.
    pub fn unlock(storage: &dyn Storage, pass: &Passphrase) -> Result<Self> {
        let header = Luks2Header::read(storage)?;
        Self::unlock_header(storage, header, pass)
    }

    /// Unlocks with an already read header.
    pub fn unlock_header(
        storage: &dyn Storage,
        header: Luks2Header,
        pass: &Passphrase,
    ) -> Result<Self> {
        let meta = &header.meta;
        for ks in meta.keyslots.values() {
            kdf::check_limits(ks.id, &ks.kdf)?;
        }
        if meta.digest.iterations > kdf::MAX_PBKDF2_ITERATIONS {
            return Err(Luks2Error::Unsupported(format!(
                "digest {}: {} PBKDF2 iterations exceed the limit of {}",
                meta.digest.id,
                meta.digest.iterations,
                kdf::MAX_PBKDF2_ITERATIONS
            )));
        }
        let mut order: Vec<&Keyslot> = meta
            .keyslots
            .values()
            .filter(|k| meta.digest.keyslots.contains(&k.id) && priority(&meta.root, k.id) > 0)
            .collect();
        order.sort_by_key(|k| std::cmp::Reverse(priority(&meta.root, k.id)));
        for ks in order {
            let key = open_keyslot(storage, ks, pass.as_bytes())?;
            if verify_key(meta, key.expose())? {
                let id = ks.id;
                return Ok(Self {
                    header,
                    volume_key: key,
                    unlocked_slot: Some(id),
                });
            }
        }
        Err(Luks2Error::NoKeySlotMatches)
    }

    pub(super) fn from_parts(header: Luks2Header, volume_key: SecretBytes) -> Self {
        Self {
            header,
            volume_key,
            unlocked_slot: None,
        }
    }

    /// The header as last read or written.
    pub fn header(&self) -> &Luks2Header {
        &self.header
    }

    /// The keyslot the passphrase opened.
    pub fn unlocked_slot(&self) -> Option<u32> {
        self.unlocked_slot
    }

    /// The volume key.
    pub fn volume_key(&self) -> &SecretBytes {
        &self.volume_key
    }

    /// The data cipher: the segment's cipher and sector size, keyed with the volume key.
    pub fn cipher(&self) -> Result<DiskCipher> {
        let s = &self.header.meta.segment;
        let unit = usize::try_from(s.sector_size).map_err(|_| Luks2Error::Overflow)?;
        Ok(DiskCipher::new(s.spec, self.volume_key.expose(), unit)?)
    }

    /// Adds a keyslot holding the volume key under `pass` in the first free keyslot id and the
    /// first free gap of the keyslots area: key material first (synced), then both header
    /// copies. Returns the keyslot id.
    pub fn add_key(
        &mut self,
        storage: &dyn Storage,
        pass: &Passphrase,
        choice: KdfChoice,
    ) -> Result<u32> {
        self.add_key_with(storage, pass, choice, false)
    }

    /// [`Luks2Volume::add_key`] that stops after writing the primary header copy, as a crash
    /// between the two copies would (for crash-safety tests).
    #[doc(hidden)]
    pub fn add_key_primary_only(
        &mut self,
        storage: &dyn Storage,
        pass: &Passphrase,
        choice: KdfChoice,
    ) -> Result<u32> {
        self.add_key_with(storage, pass, choice, true)
    }

    fn add_key_with(
        &mut self,
        storage: &dyn Storage,
        pass: &Passphrase,
        choice: KdfChoice,
        primary_only: bool,
    ) -> Result<u32> {
        let meta = &self.header.meta;
        let id = meta.free_keyslot().ok_or(Luks2Error::NoFreeKeySlot)?;
        let template = self
            .unlocked_slot
            .and_then(|s| meta.keyslots.get(&s))
            .or_else(|| meta.keyslots.values().next())
            .ok_or(Luks2Error::NoKeySlotMatches)?
            .clone();
        let key_size = meta.key_size;
        let area_size = u64::try_from(key_size * STRIPES as usize)
            .map_err(|_| Luks2Error::Overflow)?
            .next_multiple_of(4096);
        let area_offset = meta
            .find_area_gap(area_size)
            .ok_or(Luks2Error::NoKeyslotSpace { need: area_size })?;
        let new_kdf = kdf::new_kdf(choice, template.area_key_size)?;
        kdf::check_limits(id, &new_kdf)?;
        let ks = Keyslot {
            id,
            key_size,
            kdf: new_kdf,
            af_hash: template.af_hash,
            area_offset,
            area_size,
            area_spec: template.area_spec,
            area_key_size: template.area_key_size,
            area_encryption: template.area_encryption.clone(),
        };
        // Key material.
        let mut slot_key = SecretBytes::zeroed(ks.area_key_size);
        kdf::derive(&ks.kdf, pass.as_bytes(), slot_key.expose_mut())?;
        let mut material = SecretBytes::zeroed(ks.material_len()?);
        let split = key_size * STRIPES as usize;
        af::split(
            ks.af_hash,
            STRIPES,
            self.volume_key.expose(),
            &mut material.expose_mut()[..split],
        )?;
        let cipher = SectorCipher::new(ks.area_spec, slot_key.expose())?;
        crypt_material(&cipher, material.expose_mut(), true)?;
        storage.write_at(material.expose(), ks.area_offset)?;
        storage.sync()?;
        // Metadata.
        let mut root = meta.root.clone();
        let entry = serde_json::json!({
            "type": "luks2",
            "key_size": key_size,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": ks.af_hash.name()},
            "area": {
                "type": "raw",
                "offset": ks.area_offset.to_string(),
                "size": ks.area_size.to_string(),
                "encryption": ks.area_encryption,
                "key_size": ks.area_key_size,
            },
            "kdf": ks.kdf.to_json(),
        });
        let dkey = meta.digest.id.to_string();
        let keyslots = root["keyslots"]
            .as_object_mut()
            .ok_or_else(|| Luks2Error::Meta("keyslots is not an object".into()))?;
        keyslots.insert(id.to_string(), entry);
        root["digests"][dkey.as_str()]["keyslots"]
            .as_array_mut()
            .ok_or_else(|| Luks2Error::Meta("digest keyslots is not an array".into()))?
            .push(Value::String(id.to_string()));
        self.header.commit(storage, root, primary_only)?;
        Ok(id)
    }

    /// Removes keyslot `id`: overwrites its key material with random bytes (synced), then
    /// writes both header copies without it (and without references to it in digests and
    /// tokens), as cryptsetup's luksKillSlot does. Refuses the last keyslot that can unlock
    /// the data.
    pub fn remove_key(&mut self, storage: &dyn Storage, id: u32) -> Result<()> {
        let meta = &self.header.meta;
        let ks = meta
            .keyslots
            .get(&id)
            .ok_or(Luks2Error::SlotNotActive(id))?
            .clone();
        let bound = meta
            .digest
            .keyslots
            .iter()
            .filter(|&&k| k != id && meta.keyslots.contains_key(&k))
            .count();
        if meta.digest.keyslots.contains(&id) && bound == 0 {
            return Err(Luks2Error::LastKeySlot(id));
        }
        let mut garbage =
            vec![0u8; usize::try_from(ks.area_size).map_err(|_| Luks2Error::Overflow)?];
        getrandom::fill(&mut garbage).map_err(SecretError::Random)?;
        storage.write_at(&garbage, ks.area_offset)?;
        storage.sync()?;
        let mut root = meta.root.clone();
        let key = id.to_string();
        if let Some(k) = root["keyslots"].as_object_mut() {
            k.shift_remove(&key);
        }
        for section in ["digests", "tokens"] {
            if let Some(objs) = root[section].as_object_mut() {
                for o in objs.values_mut() {
                    if let Some(a) = o.get_mut("keyslots").and_then(Value::as_array_mut) {
                        a.retain(|v| v.as_str() != Some(key.as_str()));
                    }
                }
            }
        }
        self.header.commit(storage, root, false)?;
        if self.unlocked_slot == Some(id) {
            self.unlocked_slot = None;
        }
        Ok(())
    }
}

/// Whether `key` matches the volume-key digest.
pub fn verify_key(meta: &Meta, key: &[u8]) -> Result<bool> {
    let d = &meta.digest;
    let mut out = SecretBytes::zeroed(d.digest.len());
    d.hash
        .pbkdf2(key, &d.salt, d.iterations, out.expose_mut())?;
    Ok(ct_eq(out.expose(), &d.digest))
}
