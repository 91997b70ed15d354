//! Keyslots: unlocking the master key with a passphrase, adding and removing passphrases.
//!
//! Unlocking one slot (QEMU's `qcrypto_block_luks_load_key`): derive a slot key with PBKDF2
//! from the passphrase and the slot salt; read `key_bytes × stripes` bytes of key material at
//! the slot's offset and decrypt them with the payload cipher, mode and IV generator, IV
//! sectors counting from 0; merge the AF stripes; accept the result if PBKDF2 of it with the
//! header's master-key salt and iterations equals the stored 20-byte digest.

use zeroize::Zeroize;

use super::header::{
    LuksHeader, HEADER_LEN, MIN_SLOT_ITERS, NUM_KEY_SLOTS, SALT_LEN, SLOT_DISABLED, SLOT_ENABLED,
};
use super::pbkdf::{self, LuksHash};
use super::{af, header_cipher_spec, HeaderError, Iterations, LuksArea, LuksError, Result};
use crate::crypto::secret::{ct_eq, Passphrase, SecretBytes};
use crate::crypto::sector::{CipherSpec, SectorCipher};
use crate::crypto::SECTOR_SIZE;

/// An unlocked LUKS volume: its header and master key.
pub struct LuksVolume {
    header: LuksHeader,
    spec: CipherSpec,
    hash: LuksHash,
    master_key: SecretBytes,
    unlocked_slot: Option<usize>,
}

impl std::fmt::Debug for LuksVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksVolume")
            .field("header", &self.header)
            .field("spec", &self.spec)
            .field("unlocked_slot", &self.unlocked_slot)
            .finish_non_exhaustive()
    }
}

/// Runs the sector cipher over key material whose length may not be a whole number of sectors
/// (e.g. 24-byte keys: 96 000 bytes). Every supported mode is prefix-preserving at 16-byte
/// granularity within a sector, so the tail is processed as the start of a zero-padded sector.
pub(crate) fn crypt_material(cipher: &SectorCipher, buf: &mut [u8], encrypt: bool) -> Result<()> {
    let whole = buf.len() / SECTOR_SIZE * SECTOR_SIZE;
    let (head, tail) = buf.split_at_mut(whole);
    if !head.is_empty() {
        if encrypt {
            cipher.encrypt_sectors(head, 0)?;
        } else {
            cipher.decrypt_sectors(head, 0)?;
        }
    }
    if !tail.is_empty() {
        let sector = u64::try_from(whole / SECTOR_SIZE).map_err(|_| HeaderError::Overflow)?;
        let mut t = SecretBytes::zeroed(SECTOR_SIZE);
        t.expose_mut()[..tail.len()].copy_from_slice(tail);
        if encrypt {
            cipher.encrypt_sectors(t.expose_mut(), sector)?;
        } else {
            cipher.decrypt_sectors(t.expose_mut(), sector)?;
        }
        tail.copy_from_slice(&t.expose()[..tail.len()]);
    }
    Ok(())
}

/// Whether `key` is the master key `header` describes (PBKDF2 digest check).
pub fn verify_master_key(header: &LuksHeader, hash: LuksHash, key: &[u8]) -> Result<bool> {
    let mut digest = [0u8; super::header::DIGEST_LEN];
    hash.pbkdf2(key, &header.mk_salt, header.mk_iterations, &mut digest)?;
    let ok = ct_eq(&digest, &header.mk_digest);
    digest.zeroize();
    Ok(ok)
}

fn key_len(header: &LuksHeader) -> Result<usize> {
    Ok(usize::try_from(header.key_bytes).map_err(|_| HeaderError::Overflow)?)
}

fn material_len(header: &LuksHeader, slot: usize) -> Result<usize> {
    let (_, len) = header.key_material_range(slot);
    Ok(usize::try_from(len).map_err(|_| HeaderError::Overflow)?)
}

/// Reads, validates and returns the header of a LUKS area, refusing headers whose key material
/// would lie outside the area. Reads only; never writes.
pub fn read_header(area: &LuksArea<'_>) -> Result<LuksHeader> {
    let have = area.len;
    if have < HEADER_LEN as u64 {
        return Err(LuksError::AreaTooSmall {
            need: HEADER_LEN as u64,
            have,
        });
    }
    let mut raw = [0u8; HEADER_LEN];
    area.read(0, &mut raw)?;
    let header = LuksHeader::parse(&raw)?;
    header_cipher_spec(&header)?;
    header.check_key_material_within(area.len)?;
    Ok(header)
}

/// Tries one slot; Some(master key) if the passphrase opens it.
fn try_slot(
    area: &LuksArea<'_>,
    header: &LuksHeader,
    spec: CipherSpec,
    hash: LuksHash,
    slot: usize,
    pass: &Passphrase,
) -> Result<Option<SecretBytes>> {
    let s = &header.slots[slot];
    if !s.is_active() {
        return Ok(None);
    }
    let n = key_len(header)?;
    let mut slot_key = SecretBytes::zeroed(n);
    hash.pbkdf2(
        pass.as_bytes(),
        &s.salt,
        s.iterations,
        slot_key.expose_mut(),
    )?;
    let (offset, _) = header.key_material_range(slot);
    let mut material = SecretBytes::zeroed(material_len(header, slot)?);
    area.read(offset, material.expose_mut())?;
    let cipher = SectorCipher::new(spec, slot_key.expose())?;
    crypt_material(&cipher, material.expose_mut(), false)?;
    let mut candidate = SecretBytes::zeroed(n);
    af::merge(hash, s.stripes, material.expose(), candidate.expose_mut());
    if verify_master_key(header, hash, candidate.expose())? {
        Ok(Some(candidate))
    } else {
        Ok(None)
    }
}

impl LuksVolume {
    /// Reads the header of `area` and unlocks the master key with `pass`, trying every active
    /// slot in order. Reads only; a wrong passphrase gives [`LuksError::NoKeySlotMatches`].
    pub fn unlock(area: &LuksArea<'_>, pass: &Passphrase) -> Result<Self> {
        let header = read_header(area)?;
        let spec = header_cipher_spec(&header)?;
        let hash = header.hash()?;
        for slot in 0..NUM_KEY_SLOTS {
            if let Some(master_key) = try_slot(area, &header, spec, hash, slot, pass)? {
                return Ok(Self {
                    header,
                    spec,
                    hash,
                    master_key,
                    unlocked_slot: Some(slot),
                });
            }
        }
        Err(LuksError::NoKeySlotMatches)
    }

    /// A volume from its parts (after formatting), checking the key against the digest.
    pub(crate) fn from_parts(header: LuksHeader, master_key: SecretBytes) -> Result<Self> {
        let spec = header_cipher_spec(&header)?;
        let hash = header.hash()?;
        Ok(Self {
            header,
            spec,
            hash,
            master_key,
            unlocked_slot: None,
        })
    }

    /// The header as last read or written.
    pub fn header(&self) -> &LuksHeader {
        &self.header
    }

    /// The payload cipher spec.
    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    /// The PBKDF2/AF hash.
    pub fn hash(&self) -> LuksHash {
        self.hash
    }

    /// The slot the passphrase opened (None right after formatting).
    pub fn unlocked_slot(&self) -> Option<usize> {
        self.unlocked_slot
    }

    /// The master key.
    pub fn master_key(&self) -> &SecretBytes {
        &self.master_key
    }

    /// A payload cipher keyed with the master key.
    pub fn cipher(&self) -> Result<SectorCipher> {
        Ok(SectorCipher::new(self.spec, self.master_key.expose())?)
    }

    /// Stores the master key under `pass` in the first free slot (QEMU's
    /// `qcrypto_block_luks_store_key`): key material first, then the header that enables it.
    /// Returns the slot index.
    pub fn add_key(
        &mut self,
        area: &LuksArea<'_>,
        pass: &Passphrase,
        iterations: Iterations,
    ) -> Result<usize> {
        let slot = self
            .header
            .slots
            .iter()
            .position(|s| !s.is_active())
            .ok_or(LuksError::NoFreeKeySlot)?;
        self.store_key(area, slot, pass, iterations)?;
        Ok(slot)
    }

    /// Stores the master key under `pass` in slot `slot` (which must be free).
    pub(crate) fn store_key(
        &mut self,
        area: &LuksArea<'_>,
        slot: usize,
        pass: &Passphrase,
        iterations: Iterations,
    ) -> Result<()> {
        let n = key_len(&self.header)?;
        let mut header = self.header.clone();
        {
            let s = &mut header.slots[slot];
            getrandom::fill(&mut s.salt).map_err(crate::crypto::secret::SecretError::Random)?;
            s.iterations = match iterations {
                Iterations::Fixed(it) => it.max(1),
                Iterations::TimeMs(ms) => {
                    let rate = pbkdf::count_iters_per_sec(self.hash, pass.as_bytes(), &s.salt, n)?;
                    pbkdf::scale_iterations(rate, ms, 1, MIN_SLOT_ITERS)?
                }
            };
        }
        let (offset, len) = header.key_material_range(slot);
        let end = offset.checked_add(len).ok_or(HeaderError::Overflow)?;
        if end > area.len {
            return Err(LuksError::AreaTooSmall {
                need: end,
                have: area.len,
            });
        }
        let s = &header.slots[slot];
        let mut slot_key = SecretBytes::zeroed(n);
        self.hash.pbkdf2(
            pass.as_bytes(),
            &s.salt,
            s.iterations,
            slot_key.expose_mut(),
        )?;
        let mut material = SecretBytes::zeroed(material_len(&header, slot)?);
        af::split(
            self.hash,
            s.stripes,
            self.master_key.expose(),
            material.expose_mut(),
        )?;
        let cipher = SectorCipher::new(self.spec, slot_key.expose())?;
        crypt_material(&cipher, material.expose_mut(), true)?;
        area.write(offset, material.expose())?;
        header.slots[slot].state = SLOT_ENABLED;
        area.write(0, &header.encode())?;
        area.storage.sync()?;
        self.header = header;
        Ok(())
    }

    /// Disables slot `slot` and overwrites its key material with random bytes (QEMU's
    /// `qcrypto_block_luks_erase_key`): header first, then the material. Refuses to remove the
    /// last active slot.
    pub fn remove_key(&mut self, area: &LuksArea<'_>, slot: usize) -> Result<()> {
        if slot >= NUM_KEY_SLOTS {
            return Err(LuksError::BadSlotIndex(slot));
        }
        if !self.header.slots[slot].is_active() {
            return Err(LuksError::SlotNotActive(slot));
        }
        if self.header.active_slots() <= 1 {
            return Err(LuksError::LastKeySlot(slot));
        }
        let mut header = self.header.clone();
        {
            let s = &mut header.slots[slot];
            s.state = SLOT_DISABLED;
            s.iterations = 0;
            s.salt = [0u8; SALT_LEN];
        }
        let (offset, _) = header.key_material_range(slot);
        let mut garbage = vec![0u8; material_len(&header, slot)?];
        getrandom::fill(&mut garbage).map_err(crate::crypto::secret::SecretError::Random)?;
        area.write(0, &header.encode())?;
        self.header = header;
        area.write(offset, &garbage)?;
        area.storage.sync()?;
        if self.unlocked_slot == Some(slot) {
            self.unlocked_slot = None;
        }
        Ok(())
    }
}
