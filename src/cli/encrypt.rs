//! Encryption options shared by the commands that create or open images:
//! `--encrypt luks|luks2 --cipher aes-256-xts-plain64 --hash sha256 --iter-time MS` for
//! `create` (LUKS2 adds `--pbkdf`, `--pbkdf-memory`, `--pbkdf-parallel`,
//! `--pbkdf-force-iterations` and `--sector-size`, spelled as cryptsetup spells them), and the
//! passphrase sources (`--key-secret-file F`, `--key-fd N`, else a terminal prompt).

use clap::{Args, ValueEnum};
use thiserror::Error;

use super::keyslot::KeyArgs;
use crate::crypto::luks::create::{parse_cipher, DEFAULT_ITER_TIME_MS};
use crate::crypto::luks::luks2::kdf::DEFAULT_CREATE_MEMORY_KIB;
use crate::crypto::luks::luks2::{KdfChoice, Luks2CreateParams};
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
    #[error("--sector-size must be 512, 1024, 2048 or 4096")]
    SectorSize,
    #[error("--pbkdf-parallel must be 1 to 64 and --pbkdf-memory at least 8 KiB per lane")]
    Argon2Costs,
    #[error("passphrase")]
    Secret(#[from] SecretError),
}

/// Encryption formats `create` can write.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum EncryptFormat {
    /// LUKS1 (inside qcow2: crypt_method 2; or a raw LUKS file).
    Luks,
    /// LUKS2 as cryptsetup writes it (raw files only: QEMU has no LUKS2).
    Luks2,
}

/// Key-derivation function of a new LUKS2 keyslot.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum PbkdfArg {
    #[default]
    Argon2id,
    Argon2i,
    Pbkdf2,
}

/// KDF options of a new LUKS2 keyslot (cryptsetup's names).
#[derive(Debug, Args, Clone, Default)]
pub struct Luks2KdfArgs {
    /// LUKS2 keyslot KDF.
    #[arg(long, value_enum, default_value_t)]
    pub pbkdf: PbkdfArg,
    /// LUKS2 Argon2 memory cost in KiB (the calibration's maximum; default 1 GiB).
    #[arg(long, value_name = "KIB")]
    pub pbkdf_memory: Option<u32>,
    /// LUKS2 Argon2 lanes (default min(4, CPUs)).
    #[arg(long, value_name = "N")]
    pub pbkdf_parallel: Option<u32>,
    /// Skip calibration: this Argon2 time cost or PBKDF2 iteration count.
    #[arg(long, value_name = "N")]
    pub pbkdf_force_iterations: Option<u32>,
}

impl Luks2KdfArgs {
    /// The KDF choice for a keyslot calibrated to `iter_time_ms`, PBKDF2 with `hash`.
    pub fn choice(&self, iter_time_ms: u64, hash: LuksHash) -> Result<KdfChoice, EncryptArgsError> {
        if iter_time_ms == 0 {
            return Err(EncryptArgsError::IterTime);
        }
        let cpus = match self.pbkdf_parallel {
            Some(n) => n,
            None => match KdfChoice::default_argon2id() {
                KdfChoice::Argon2Calibrated { cpus, .. } => cpus,
                _ => 1,
            },
        };
        let memory_kib = self.pbkdf_memory.unwrap_or(DEFAULT_CREATE_MEMORY_KIB);
        let argon = self.pbkdf != PbkdfArg::Pbkdf2;
        if argon && (cpus == 0 || cpus > 64 || u64::from(memory_kib) < 8 * u64::from(cpus)) {
            return Err(EncryptArgsError::Argon2Costs);
        }
        let id = self.pbkdf == PbkdfArg::Argon2id;
        Ok(match (self.pbkdf, self.pbkdf_force_iterations) {
            (PbkdfArg::Pbkdf2, Some(iterations)) => KdfChoice::Pbkdf2Fixed { hash, iterations },
            (PbkdfArg::Pbkdf2, None) => KdfChoice::Pbkdf2Calibrated {
                hash,
                time_ms: iter_time_ms,
            },
            (_, Some(time)) => KdfChoice::Argon2Fixed {
                id,
                time: time.max(1),
                memory_kib,
                cpus,
            },
            (_, None) => KdfChoice::Argon2Calibrated {
                id,
                time_ms: iter_time_ms,
                max_memory_kib: memory_kib,
                cpus,
            },
        })
    }
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
    /// LUKS2 encryption sector size in bytes: 512 (default) or 4096 (then the daemon
    /// advertises 4096-byte logical blocks).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 512,
        requires = "encrypt"
    )]
    pub sector_size: u32,
    #[command(flatten)]
    pub kdf: Luks2KdfArgs,
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
            sector_size: 512,
            kdf: Luks2KdfArgs::default(),
            key: KeyArgs::default(),
        }
    }
}

impl EncryptArgs {
    /// The LUKS parameters asked for, or None without `--encrypt`.
    pub fn luks_params(&self) -> Result<Option<CreateParams>, EncryptArgsError> {
        if self.encrypt != Some(EncryptFormat::Luks) {
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

    /// The LUKS2 parameters asked for, or None without `--encrypt luks2`.
    pub fn luks2_params(&self) -> Result<Option<Luks2CreateParams>, EncryptArgsError> {
        if self.encrypt != Some(EncryptFormat::Luks2) {
            return Ok(None);
        }
        let spec = parse_cipher(&self.cipher)
            .ok_or_else(|| EncryptArgsError::Cipher(self.cipher.clone()))?;
        let hash = LuksHash::from_name(&self.hash)
            .ok_or_else(|| EncryptArgsError::Hash(self.hash.clone()))?;
        if !matches!(self.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(EncryptArgsError::SectorSize);
        }
        Ok(Some(Luks2CreateParams {
            spec,
            sector_size: self.sector_size,
            kdf: self.kdf.choice(self.iter_time, hash)?,
            hash,
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
