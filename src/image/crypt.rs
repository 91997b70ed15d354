//! The qcow2 data-cluster encryption hooks ([`ClusterCrypt`]) for LUKS (crypt_method 2) and
//! legacy AES (crypt_method 1), and opening / creating encrypted qcow2 images.
//!
//! The IV sector is the only difference between the two: LUKS inside qcow2 uses the **host**
//! file offset / 512 (QEMU's `crypt_physical_offset = true`), legacy AES the **guest** offset
//! / 512. The choice lives here; qcow2 passes both offsets.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use super::luks::LuksImage;
use super::{ImageError, Result};
use crate::crypto::luks::{CreateParams, LuksArea, LuksVolume};
use crate::crypto::qcow_aes::QcowAes;
use crate::crypto::secret::Passphrase;
use crate::crypto::sector::SectorCipher;
use crate::crypto::SECTOR_SIZE;
use crate::qcow2::{ClusterCrypt, CryptError, Qcow2Probe};
use crate::storage::{OpenFlags, Storage};

const SECTOR: u64 = SECTOR_SIZE as u64;

/// A misaligned request reached a cluster cipher (a qcow2-layer bug, reported, not a panic).
#[derive(Debug, Error)]
#[error("encryption offset {offset:#x} is not a multiple of 512")]
pub struct Misaligned {
    offset: u64,
}

fn sector_of(offset: u64) -> std::result::Result<u64, CryptError> {
    if offset.is_multiple_of(SECTOR) {
        Ok(offset / SECTOR)
    } else {
        Err(CryptError::new(Misaligned { offset }))
    }
}

/// LUKS inside qcow2: the payload cipher keyed with the master key, IV = host offset / 512.
pub struct LuksClusterCrypt {
    cipher: SectorCipher,
}

impl LuksClusterCrypt {
    /// Wraps the master-key cipher of an unlocked LUKS volume.
    pub fn new(cipher: SectorCipher) -> Self {
        Self { cipher }
    }
}

impl ClusterCrypt for LuksClusterCrypt {
    fn decrypt(
        &self,
        buf: &mut [u8],
        host_offset: u64,
        _guest: u64,
    ) -> std::result::Result<(), CryptError> {
        let s = sector_of(host_offset)?;
        self.cipher.decrypt_sectors(buf, s).map_err(CryptError::new)
    }

    fn encrypt_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        host_offset: u64,
        _guest: u64,
    ) -> std::result::Result<(), CryptError> {
        let s = sector_of(host_offset)?;
        self.cipher
            .encrypt_sectors_to(src, dst, s)
            .map_err(CryptError::new)
    }
}

/// Legacy qcow2 AES: AES-128-CBC keyed with the passphrase, IV = guest offset / 512.
pub struct QcowAesClusterCrypt {
    aes: QcowAes,
}

impl QcowAesClusterCrypt {
    /// Wraps a legacy AES cipher.
    pub fn new(aes: QcowAes) -> Self {
        Self { aes }
    }
}

impl ClusterCrypt for QcowAesClusterCrypt {
    fn decrypt(
        &self,
        buf: &mut [u8],
        _host: u64,
        guest_offset: u64,
    ) -> std::result::Result<(), CryptError> {
        let s = sector_of(guest_offset)?;
        self.aes
            .cipher()
            .decrypt_sectors(buf, s)
            .map_err(CryptError::new)
    }

    fn encrypt_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        _host: u64,
        guest_offset: u64,
    ) -> std::result::Result<(), CryptError> {
        let s = sector_of(guest_offset)?;
        self.aes
            .cipher()
            .encrypt_sectors_to(src, dst, s)
            .map_err(CryptError::new)
    }
}

/// Whether `storage` starts with the LUKS magic (LUKS1 or LUKS2; both open as raw LUKS).
pub fn is_luks(storage: &dyn Storage) -> Result<bool> {
    if storage.len()? < 6 {
        return Ok(false);
    }
    let mut m = [0u8; 6];
    storage.read_at(&mut m, 0)?;
    Ok(m == crate::crypto::luks::header::MAGIC)
}

/// Opens a raw LUKS1 file; without a secret, says a key is needed.
pub fn open_raw_luks(
    storage: Box<dyn Storage>,
    read_only: bool,
    secret: Option<&Passphrase>,
) -> Result<LuksImage> {
    let pass = secret.ok_or(ImageError::NeedKey("LUKS"))?;
    LuksImage::open(storage, read_only, pass)
}

/// The LUKS area of a qcow2 image: the region its FDE header extension names, which must lie
/// within the file. None for images without the extension.
pub fn qcow2_luks_area<'a>(
    storage: &'a dyn Storage,
    probe: &Qcow2Probe,
) -> Result<Option<LuksArea<'a>>> {
    match probe.fde_header {
        Some((base, len)) => Ok(Some(LuksArea::region(storage, base, len)?)),
        None => Ok(None),
    }
}

/// Builds the cluster cipher a qcow2 image needs: unlocks LUKS (crypt_method 2) from the FDE
/// region, or keys legacy AES (crypt_method 1, with a warning). None for plain images, and when
/// no secret is given (qcow2 then refuses to open an encrypted image, saying a key is needed).
pub fn qcow2_crypt(
    storage: &dyn Storage,
    probe: &Qcow2Probe,
    secret: Option<&Passphrase>,
) -> Result<Option<Arc<dyn ClusterCrypt>>> {
    let Some(pass) = secret else {
        return Ok(None);
    };
    match probe.crypt_method {
        2 => {
            let area = qcow2_luks_area(storage, probe)?.ok_or(ImageError::NeedKey("LUKS"))?;
            let vol = LuksVolume::unlock(&area, pass)?;
            Ok(Some(Arc::new(LuksClusterCrypt::new(vol.cipher()?))))
        }
        1 => {
            log::warn!("{}", crate::crypto::qcow_aes::WEAKNESS_WARNING);
            Ok(Some(Arc::new(QcowAesClusterCrypt::new(QcowAes::new(
                pass,
            )?))))
        }
        _ => Ok(None),
    }
}

/// Creates a qcow2 image encrypted with LUKS (crypt_method 2) at `path`: reserves the FDE region
/// QEMU reserves (header + 8 key-material areas, 2 068 480 bytes for aes-256-xts), formats it,
/// and returns the unlocked volume's cipher for immediate use.
pub fn create_qcow2_luks(
    path: &Path,
    opts: &crate::qcow2::create::CreateOptions,
    params: &CreateParams,
    pass: &Passphrase,
) -> Result<()> {
    let area_len = crate::crypto::luks::create::area_len(&params.spec)?;
    let mut o = opts.clone();
    o.luks_header_len = Some(area_len);
    let created = crate::qcow2::create::create_on(crate::rbd::create_new(path)?, &o)?;
    let (base, len) = created.luks_region.ok_or(ImageError::Unsupported)?;
    let storage = crate::rbd::open_storage(
        path,
        OpenFlags {
            read_only: false,
            direct: false,
        },
    )?;
    let area = LuksArea {
        storage: &*storage,
        base,
        len,
    };
    crate::crypto::luks::create::format(&area, params, pass)?;
    storage.sync()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::luks::create::parse_cipher;

    #[test]
    fn luks_uses_the_host_offset_and_aes_the_guest_offset() {
        let spec = parse_cipher("aes-128-xts-plain64").expect("spec");
        let key = [7u8; 32];
        let luks = LuksClusterCrypt::new(SectorCipher::new(spec, &key).expect("cipher"));
        let reference = SectorCipher::new(spec, &key).expect("cipher");
        let src = vec![0x42u8; 1024];
        let mut got = vec![0u8; 1024];
        luks.encrypt_to(&src, &mut got, 0x10000, 0x200)
            .expect("enc");
        let mut want = src.clone();
        reference
            .encrypt_sectors(&mut want, 0x10000 / 512)
            .expect("ref");
        assert_eq!(got, want);
        luks.decrypt(&mut got, 0x10000, 0x999_000).expect("dec");
        assert_eq!(got, src);

        let aes = QcowAesClusterCrypt::new(QcowAes::new(&Passphrase::new(b"pw")).expect("aes"));
        let reference = SectorCipher::new(
            crate::crypto::qcow_aes::SPEC,
            b"pw\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        )
        .expect("cipher");
        aes.encrypt_to(&src, &mut got, 0x777_000, 0x400)
            .expect("enc");
        let mut want = src.clone();
        reference.encrypt_sectors(&mut want, 2).expect("ref");
        assert_eq!(got, want);
    }

    #[test]
    fn misaligned_offsets_are_errors_not_panics() {
        let spec = parse_cipher("aes-256-xts-plain64").expect("spec");
        let luks = LuksClusterCrypt::new(SectorCipher::new(spec, &[1u8; 64]).expect("cipher"));
        let mut buf = vec![0u8; 512];
        assert!(luks.decrypt(&mut buf, 100, 0).is_err());
        let mut short = vec![0u8; 100];
        assert!(luks.decrypt(&mut short, 512, 0).is_err());
    }
}
