//! `keyslot list|add|remove FILE`: LUKS keyslot management, the equivalent of QEMU's
//! `qemu-img amend -o state=active|inactive,...` and cryptsetup's luksAddKey / luksKillSlot.
//!
//! Works on raw LUKS1 and LUKS2 files and on qcow2 images with LUKS encryption (crypt_method
//! 2), whose LUKS header lives in the region the full-disk-encryption header extension names.
//! Passphrases come from `--key-secret-file F`, `--key-fd N` or a prompt on the terminal;
//! never from argv. `remove` refuses to remove the last active slot. On LUKS2 both header
//! copies are rewritten (sequence id + 1, primary first) and new keyslots use
//! `--pbkdf argon2id|argon2i|pbkdf2` (default argon2id, calibrated to `--iter-time`).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use thiserror::Error;

use crate::crypto::luks::{
    self, keyslot::read_header, Iterations, LuksArea, LuksError, LuksHeader, LuksVolume,
};
use crate::crypto::secret::{KeySource, SecretError};
use crate::storage::{OpenFlags, Storage, StorageError};

/// Errors of `keyslot`.
#[derive(Debug, Error)]
pub enum KeyslotError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: StorageError,
    },
    #[error("{path}")]
    Luks {
        path: String,
        #[source]
        source: LuksError,
    },
    #[error("passphrase")]
    Secret(#[from] SecretError),
    #[error("{path}")]
    Qcow2 {
        path: String,
        #[source]
        source: crate::qcow2::Error,
    },
    #[error("{path} is a qcow2 image without LUKS encryption (crypt_method {method})")]
    NotLuks { path: String, method: u32 },
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    #[error("KDF options")]
    KdfOptions(#[source] super::encrypt::EncryptArgsError),
    #[error("cannot open {path} for writing")]
    Locked {
        path: String,
        #[source]
        source: crate::image::ImageError,
    },
}

/// Where the passphrase that unlocks an existing slot comes from.
#[derive(Debug, Args, Clone, Default)]
pub struct KeyArgs {
    /// Read the passphrase from this file (byte for byte, as QEMU's secret,file=F).
    #[arg(long, value_name = "FILE")]
    pub key_secret_file: Option<PathBuf>,
    /// Read the passphrase from this inherited file descriptor, to its end.
    #[arg(long, value_name = "N", conflicts_with = "key_secret_file")]
    pub key_fd: Option<i32>,
    /// Largest Argon2 memory cost (KiB) a LUKS2 keyslot may ask for before it is refused
    /// (default 4 GiB).
    #[arg(long, value_name = "KIB")]
    pub kdf_max_memory: Option<u64>,
}

impl KeyArgs {
    /// Applies `--kdf-max-memory` to the process-wide LUKS2 KDF limits.
    pub fn apply_kdf_limits(&self) {
        if let Some(kib) = self.kdf_max_memory {
            crate::crypto::luks::luks2::kdf::set_max_memory_kib(kib);
        }
    }

    /// The source these options name (a terminal prompt if none).
    pub fn source(&self) -> KeySource {
        KeySource::from_options(self.key_secret_file.as_deref(), self.key_fd)
    }
}

/// Where the new passphrase comes from.
#[derive(Debug, Args, Clone, Default)]
pub struct NewKeyArgs {
    /// Read the new passphrase from this file.
    #[arg(long, value_name = "FILE")]
    pub new_key_secret_file: Option<PathBuf>,
    /// Read the new passphrase from this inherited file descriptor.
    #[arg(long, value_name = "N", conflicts_with = "new_key_secret_file")]
    pub new_key_fd: Option<i32>,
}

/// Output formats of `list`.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// `keyslot` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyslotCommand {
    /// Show the LUKS header and which keyslots are active (needs no passphrase).
    List {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Add a passphrase in the first free keyslot.
    Add {
        file: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        new_key: NewKeyArgs,
        /// KDF time for the new slot in milliseconds (as qemu-img's iter-time).
        #[arg(long, value_name = "MS", default_value_t = luks::create::DEFAULT_ITER_TIME_MS)]
        iter_time: u64,
        #[command(flatten)]
        kdf: super::encrypt::Luks2KdfArgs,
    },
    /// Disable a keyslot and wipe its key material; refuses the last active one.
    Remove {
        file: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        /// The slot to remove (default: the one the passphrase opens).
        #[arg(long, value_name = "N")]
        slot: Option<usize>,
    },
}

/// `keyslot` arguments.
#[derive(Debug, Args)]
pub struct KeyslotArgs {
    #[command(subcommand)]
    pub command: KeyslotCommand,
}

fn open_storage(path: &Path, read_only: bool) -> Result<Box<dyn Storage>, KeyslotError> {
    crate::rbd::open_storage(
        path,
        OpenFlags {
            read_only,
            direct: false,
        },
    )
    .map_err(|source| KeyslotError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// Opens `path` for writing with QEMU's write lock (refused while the image is in use).
/// An `rbd:` image takes RBD's exclusive lock instead (src/rbd).
fn open_storage_locked(
    path: &Path,
) -> Result<(Box<dyn Storage>, Option<crate::lock::ImageLock>), KeyslotError> {
    if path.to_str().is_some_and(crate::rbd::is_rbd) {
        return Ok((open_storage(path, false)?, None));
    }
    let (st, lock) = crate::image::open_file_locked(path, false, crate::image::Locking::On)
        .map_err(|source| KeyslotError::Locked {
            path: path.display().to_string(),
            source,
        })?;
    Ok((Box::new(st), lock))
}

/// The LUKS area of an image file: the FDE region of a qcow2 image, else the whole file.
pub fn luks_area<'a>(storage: &'a dyn Storage, path: &Path) -> Result<LuksArea<'a>, KeyslotError> {
    let shown = || path.display().to_string();
    let q = |source| KeyslotError::Qcow2 {
        path: shown(),
        source,
    };
    if crate::qcow2::is_qcow2(storage).map_err(q)? {
        let probe = crate::qcow2::probe(storage).map_err(q)?;
        return match probe.fde_header {
            Some((base, len)) => LuksArea::region(storage, base, len).map_err(luks_err(path)),
            None => Err(KeyslotError::NotLuks {
                path: shown(),
                method: probe.crypt_method,
            }),
        };
    }
    LuksArea::whole(storage).map_err(luks_err(path))
}

fn luks_err(path: &Path) -> impl Fn(LuksError) -> KeyslotError + '_ {
    move |source| KeyslotError::Luks {
        path: path.display().to_string(),
        source,
    }
}

/// The `format-specific` data `qemu-img info --output=json` shows for a LUKS header (raw LUKS:
/// under `{"type": "luks", "data": …}`; qcow2: as `data.encrypt` with `"format": "luks"`).
pub fn qemu_info_json(h: &LuksHeader) -> serde_json::Value {
    let name = h.cipher_name().unwrap_or("?");
    let mode_spec = h.cipher_mode().unwrap_or("?");
    let (mode, ivgen) = mode_spec.split_once('-').unwrap_or((mode_spec, "plain64"));
    let (ivgen, ivhash) = match ivgen.split_once(':') {
        Some((g, hsh)) => (g, Some(hsh)),
        None => (ivgen, None),
    };
    let per_key = if mode == "xts" {
        h.key_bytes / 2
    } else {
        h.key_bytes
    };
    let slots: Vec<serde_json::Value> = h
        .slots
        .iter()
        .map(|s| {
            let off = u64::from(s.key_offset) * 512;
            if s.is_active() {
                serde_json::json!({"active": true, "iters": s.iterations, "key-offset": off,
                                   "stripes": s.stripes})
            } else {
                serde_json::json!({"active": false, "key-offset": off})
            }
        })
        .collect();
    let mut v = serde_json::json!({
        "cipher-alg": format!("{name}-{}", u64::from(per_key) * 8),
        "cipher-mode": mode,
        "ivgen-alg": ivgen,
        "hash-alg": h.hash_spec().unwrap_or("?"),
        "detached-header": false,
        "payload-offset": h.payload_offset_bytes(),
        "master-key-iters": h.mk_iterations,
        "uuid": h.uuid(),
        "slots": slots,
    });
    if let (Some(hash), Some(obj)) = (ivhash, v.as_object_mut()) {
        obj.insert("ivgen-hash-alg".into(), serde_json::json!(hash));
    }
    v
}

/// A human or JSON description of a header.
pub fn describe(h: &LuksHeader, format: OutputFormat) -> String {
    let cipher = format!(
        "{}-{}",
        h.cipher_name().unwrap_or("?"),
        h.cipher_mode().unwrap_or("?")
    );
    let slots: Vec<serde_json::Value> = h
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "slot": i,
                "active": s.is_active(),
                "iterations": s.iterations,
                "key-offset": u64::from(s.key_offset) * 512,
                "stripes": s.stripes,
            })
        })
        .collect();
    match format {
        OutputFormat::Json => {
            let v = serde_json::json!({
                "format": "luks1",
                "cipher": cipher,
                "key-bits": u64::from(h.key_bytes) * 8,
                "hash": h.hash_spec().unwrap_or("?"),
                "payload-offset": h.payload_offset_bytes(),
                "master-key-iterations": h.mk_iterations,
                "uuid": h.uuid(),
                "slots": slots,
            });
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
        OutputFormat::Human => {
            let mut s = format!(
                "format: LUKS1\ncipher: {cipher} ({} bits)\nhash: {}\npayload offset: {}\n\
                 master key iterations: {}\nuuid: {}\n",
                u64::from(h.key_bytes) * 8,
                h.hash_spec().unwrap_or("?"),
                h.payload_offset_bytes(),
                h.mk_iterations,
                h.uuid()
            );
            for (i, sl) in h.slots.iter().enumerate() {
                if sl.is_active() {
                    s += &format!(
                        "slot {i}: active, {} iterations, key material at {}\n",
                        sl.iterations,
                        u64::from(sl.key_offset) * 512
                    );
                } else {
                    s += &format!("slot {i}: inactive\n");
                }
            }
            s
        }
    }
}

/// The LUKS2 header of a raw file, or None if it is not a raw LUKS2 file.
fn luks2_header(
    st: &dyn Storage,
    path: &Path,
) -> Result<Option<crate::crypto::luks::luks2::Luks2Header>, KeyslotError> {
    let v = crate::crypto::luks::luks2::luks_version(st).map_err(|source| KeyslotError::Open {
        path: path.display().to_string(),
        source,
    })?;
    if v != Some(2) {
        return Ok(None);
    }
    let h = crate::crypto::luks::luks2::Luks2Header::read(st)
        .map_err(|e| luks_err(path)(LuksError::from(e)))?;
    Ok(Some(h))
}

fn l2(path: &Path) -> impl Fn(crate::crypto::luks::luks2::Luks2Error) -> KeyslotError + '_ {
    move |e| luks_err(path)(LuksError::from(e))
}

/// Runs `keyslot` on a raw LUKS2 file.
fn run_luks2(
    command: KeyslotCommand,
    st: &dyn Storage,
    header: crate::crypto::luks::luks2::Luks2Header,
    out: &mut dyn Write,
) -> Result<(), KeyslotError> {
    use crate::crypto::luks::luks2::Luks2Volume;
    match command {
        KeyslotCommand::List { output, .. } => {
            out.write_all(super::luks2_info::describe(&header, output).as_bytes())
                .map_err(KeyslotError::Output)?;
        }
        KeyslotCommand::Add {
            file,
            key,
            new_key,
            iter_time,
            kdf,
        } => {
            key.apply_kdf_limits();
            let choice = kdf
                .choice(iter_time, luks::LuksHash::Sha256)
                .map_err(KeyslotError::KdfOptions)?;
            let pass = key
                .source()
                .read("Passphrase of an existing slot: ", false)?;
            let mut vol = Luks2Volume::unlock_header(st, header, &pass).map_err(l2(&file))?;
            drop(pass);
            let new =
                KeySource::from_options(new_key.new_key_secret_file.as_deref(), new_key.new_key_fd)
                    .read("New passphrase: ", true)?;
            let slot = vol.add_key(st, &new, choice).map_err(l2(&file))?;
            writeln!(out, "added keyslot {slot}").map_err(KeyslotError::Output)?;
        }
        KeyslotCommand::Remove { file, key, slot } => {
            key.apply_kdf_limits();
            let pass = key.source().read("Passphrase: ", false)?;
            let mut vol = Luks2Volume::unlock_header(st, header, &pass).map_err(l2(&file))?;
            let slot = match slot {
                Some(s) => u32::try_from(s).unwrap_or(u32::MAX),
                None => vol.unlocked_slot().unwrap_or(0),
            };
            vol.remove_key(st, slot).map_err(l2(&file))?;
            writeln!(out, "removed keyslot {slot}").map_err(KeyslotError::Output)?;
        }
    }
    Ok(())
}

/// Runs `keyslot`, writing any output to `out`.
pub fn run_to(args: KeyslotArgs, out: &mut dyn Write) -> Result<(), KeyslotError> {
    let (file, write) = match &args.command {
        KeyslotCommand::List { file, .. } => (file.clone(), false),
        KeyslotCommand::Add { file, .. } | KeyslotCommand::Remove { file, .. } => {
            (file.clone(), true)
        }
    };
    {
        // Writes take QEMU's write lock, as for LUKS1 below.
        let (st, lock) = if write {
            open_storage_locked(&file)?
        } else {
            (open_storage(&file, true)?, None)
        };
        if let Some(h) = luks2_header(st.as_ref(), &file)? {
            let r = run_luks2(args.command, st.as_ref(), h, out);
            drop(lock);
            return r;
        }
    }
    match args.command {
        KeyslotCommand::List { file, output } => {
            let st = open_storage(&file, true)?;
            let area = luks_area(&*st, &file)?;
            let h = read_header(&area).map_err(luks_err(&file))?;
            out.write_all(describe(&h, output).as_bytes())
                .map_err(KeyslotError::Output)?;
        }
        KeyslotCommand::Add {
            file,
            key,
            new_key,
            iter_time,
            ..
        } => {
            let (st, _lock) = open_storage_locked(&file)?;
            let area = luks_area(&*st, &file)?;
            let pass = key
                .source()
                .read("Passphrase of an existing slot: ", false)?;
            let mut vol = LuksVolume::unlock(&area, &pass).map_err(luks_err(&file))?;
            drop(pass);
            let new =
                KeySource::from_options(new_key.new_key_secret_file.as_deref(), new_key.new_key_fd)
                    .read("New passphrase: ", true)?;
            let slot = vol
                .add_key(&area, &new, Iterations::TimeMs(iter_time.max(1)))
                .map_err(luks_err(&file))?;
            writeln!(out, "added keyslot {slot}").map_err(KeyslotError::Output)?;
        }
        KeyslotCommand::Remove { file, key, slot } => {
            let (st, _lock) = open_storage_locked(&file)?;
            let area = luks_area(&*st, &file)?;
            let pass = key.source().read("Passphrase: ", false)?;
            let mut vol = LuksVolume::unlock(&area, &pass).map_err(luks_err(&file))?;
            let slot = slot.or(vol.unlocked_slot()).unwrap_or(0);
            vol.remove_key(&area, slot).map_err(luks_err(&file))?;
            writeln!(out, "removed keyslot {slot}").map_err(KeyslotError::Output)?;
        }
    }
    Ok(())
}

/// Runs `keyslot`, printing to stdout.
pub fn run(args: KeyslotArgs) -> Result<(), KeyslotError> {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    run_to(args, &mut lock)
}
