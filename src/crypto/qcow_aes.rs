//! Legacy qcow/qcow2 AES encryption (crypt_method 1), as QEMU's crypto/block-qcow.c.
//!
//! AES-128-CBC with the plain64 IV generator; the key is the first 16 bytes of the passphrase
//! (up to its first NUL, QEMU treats it as a C string), zero-padded. The IV sector is the
//! **guest** offset / 512. There is no key derivation and no key check: any passphrase "opens"
//! the image and a wrong one reads garbage. It is weak; we serve such images for compatibility
//! and never create them unless asked to explicitly.

use crate::crypto::secret::{Passphrase, SecretBytes};
use crate::crypto::sector::{
    CipherAlg, CipherMode, CipherSpec, IvGen, SectorCipher, SectorCipherError,
};

/// The warning to log when such an image is opened.
pub const WEAKNESS_WARNING: &str = "legacy qcow2 AES encryption (crypt_method 1) is weak: the \
     key is the passphrase itself, with no key derivation and no check; convert the image to \
     LUKS (crypt_method 2)";

/// The cipher spec of legacy qcow AES.
pub const SPEC: CipherSpec = CipherSpec {
    alg: CipherAlg::Aes128,
    mode: CipherMode::Cbc,
    iv: IvGen::Plain64,
};

/// The key QEMU derives from a passphrase: its first 16 bytes (before any NUL), zero-padded.
pub fn derive_key(pass: &Passphrase) -> SecretBytes {
    let p = pass.as_bytes();
    let end = p.iter().position(|&b| b == 0).unwrap_or(p.len()).min(16);
    let mut key = SecretBytes::zeroed(16);
    key.expose_mut()[..end].copy_from_slice(&p[..end]);
    key
}

/// A legacy qcow AES cipher.
pub struct QcowAes {
    cipher: SectorCipher,
}

impl std::fmt::Debug for QcowAes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QcowAes { .. }")
    }
}

impl QcowAes {
    /// A cipher keyed from `pass`.
    pub fn new(pass: &Passphrase) -> Result<Self, SectorCipherError> {
        let key = derive_key(pass);
        Ok(Self {
            cipher: SectorCipher::new(SPEC, key.expose())?,
        })
    }

    /// The sector cipher (IV sector = guest offset / 512).
    pub fn cipher(&self) -> &SectorCipher {
        &self.cipher
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_the_first_16_passphrase_bytes_zero_padded() {
        let k = derive_key(&Passphrase::new(b"pw"));
        assert_eq!(k.expose(), b"pw\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let k = derive_key(&Passphrase::new(b"0123456789abcdefXYZ"));
        assert_eq!(k.expose(), b"0123456789abcdef");
        let k = derive_key(&Passphrase::new(b"ab\0cd"));
        assert_eq!(k.expose(), b"ab\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    }
}
