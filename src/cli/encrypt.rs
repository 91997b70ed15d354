//! Encryption options shared by the commands that create or open images:
//! `--encrypt luks --cipher aes-256-xts-plain64 --hash sha256 --iter-time MS` for `create`, and
//! the passphrase sources (`--key-secret-file F`, `--key-fd N`, else a terminal prompt).

use clap::{Args, ValueEnum};
use thiserror::Error;

use super::keyslot::KeyArgs;
use crate::crypto::luks::create::{parse_cipher, DEFAULT_ITER_TIME_MS};
use crate::crypto::luks::{CreateParams, Iterations, LuksHash};
use crate::crypto::secret::{Passphrase, SecretError};

/// Errors in encryption options.
#[derive(Debug, Error)]
pub enum EncryptArgsError {
    #[error(
        "cipher {0:?} is not supported (aes-128|192|256 with xts-plain64, xts-plain, cbc-plain, \
         cbc-plain64, cbc-essiv:sha256, or ecb)"
    )]
    Cipher(String),
    #[error("hash {0:?} is not supported (sha1, sha256, sha512)")]
    Hash(String),
    #[error("--iter-time must be at least 1 ms")]
    IterTime,
    #[error("passphrase")]
    Secret(#[from] SecretError),
}

/// Encryption formats `create` can write.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum EncryptFormat {
    /// LUKS1 (inside qcow2: crypt_method 2; or a raw LUKS file).
    Luks,
}

/// `create` options for an encrypted image.
#[derive(Debug, Args, Clone)]
pub struct EncryptArgs {
    /// Encrypt the new image.
    #[arg(long, value_enum)]
    pub encrypt: Option<EncryptFormat>,
    /// Cipher, as `aes-<bits>-<mode>[-<ivgen>]`.
    #[arg(long, default_value = "aes-256-xts-plain64", requires = "encrypt")]
    pub cipher: String,
    /// PBKDF2 / anti-forensic hash.
    #[arg(long, default_value = "sha256", requires = "encrypt")]
    pub hash: String,
    /// PBKDF2 time per keyslot unlock in milliseconds (QEMU's iter-time).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_ITER_TIME_MS, requires = "encrypt")]
    pub iter_time: u64,
    #[command(flatten)]
    pub key: KeyArgs,
}

impl Default for EncryptArgs {
    /// No encryption (with the option defaults clap would fill in).
    fn default() -> Self {
        Self {
            encrypt: None,
            cipher: "aes-256-xts-plain64".to_string(),
            hash: "sha256".to_string(),
            iter_time: DEFAULT_ITER_TIME_MS,
            key: KeyArgs::default(),
        }
    }
}

impl EncryptArgs {
    /// The LUKS parameters asked for, or None without `--encrypt`.
    pub fn luks_params(&self) -> Result<Option<CreateParams>, EncryptArgsError> {
        if self.encrypt.is_none() {
            return Ok(None);
        }
        let spec = parse_cipher(&self.cipher)
            .ok_or_else(|| EncryptArgsError::Cipher(self.cipher.clone()))?;
        let hash = LuksHash::from_name(&self.hash)
            .ok_or_else(|| EncryptArgsError::Hash(self.hash.clone()))?;
        if self.iter_time == 0 {
            return Err(EncryptArgsError::IterTime);
        }
        Ok(Some(CreateParams {
            spec,
            hash,
            iterations: Iterations::TimeMs(self.iter_time),
        }))
    }

    /// The passphrase for a new image (asked twice on a terminal).
    pub fn new_passphrase(&self) -> Result<Passphrase, EncryptArgsError> {
        Ok(self
            .key
            .source()
            .read("Passphrase for the new image: ", true)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        e: EncryptArgs,
    }

    #[test]
    fn defaults_are_qemus_and_bad_names_are_refused() {
        let c = Cli::try_parse_from(["x", "--encrypt", "luks"]).expect("parse");
        let p = c.e.luks_params().expect("ok").expect("some");
        assert_eq!(p.spec, CreateParams::default().spec);
        assert_eq!(p.hash, LuksHash::Sha256);
        assert_eq!(p.iterations, Iterations::TimeMs(2000));
        let c = Cli::try_parse_from(["x"]).expect("parse");
        assert!(c.e.luks_params().expect("ok").is_none());
        let c = Cli::try_parse_from(["x", "--encrypt", "luks", "--cipher", "aes-256-ctr"])
            .expect("parse");
        assert!(matches!(
            c.e.luks_params(),
            Err(EncryptArgsError::Cipher(_))
        ));
        let c = Cli::try_parse_from(["x", "--encrypt", "luks", "--hash", "md5"]).expect("parse");
        assert!(matches!(c.e.luks_params(), Err(EncryptArgsError::Hash(_))));
        assert!(Cli::try_parse_from(["x", "--cipher", "aes-128-cbc-plain"]).is_err());
    }
}
