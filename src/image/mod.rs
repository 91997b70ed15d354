//! The image layer: one [`BlockImage`] trait that the virtio-blk layer sees, and the formats
//! behind it (raw here; qcow2 and LUKS plug in beside it).
//!
//! Offsets and lengths are in bytes of the guest-visible disk. Callers (virtio_blk) have already
//! checked that every range lies within [`BlockImage::capacity`]; implementations check again and
//! answer [`ImageError::OutOfRange`] rather than trusting them.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::lock::{ImageLock, LockSet, Perms};
use crate::storage::{self, FileStorage, OpenFlags, Storage, StorageError};

pub mod crypt;
mod locked;
pub mod luks;
#[cfg(test)]
mod open_tests;
pub mod qcow2;
pub mod raw;

/// Errors of the image layer.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error("range {offset}+{len} is outside the disk of {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the image is read-only")]
    ReadOnly,
    #[error("operation not supported by this image")]
    Unsupported,
    #[error("storage")]
    Storage(#[from] StorageError),
    #[error("qcow2")]
    Qcow2(#[from] crate::qcow2::Error),
    #[error("{path}: has backing file {backing} but backing files are denied")]
    BackingDenied { path: String, backing: String },
    #[error("{path}: backing chain {reason}")]
    BackingChain { path: String, reason: &'static str },
    #[error("{path}: unsupported backing format {format}")]
    BackingFormat { path: String, format: String },
    #[error("LUKS")]
    Luks(#[from] crate::crypto::luks::LuksError),
    #[error("sector cipher")]
    Cipher(#[from] crate::crypto::sector::SectorCipherError),
    #[error("image is encrypted ({0}): a key is needed")]
    NeedKey(&'static str),
    #[error("--direct (O_DIRECT) is supported for raw images only, not {format}")]
    DirectUnsupported { format: &'static str },
    #[error("{path}: names external data file {data_file} but backing and data files are denied")]
    DataFileDenied { path: String, data_file: String },
    #[error(
        "{path}: names external data file {data_file}; it is opened only when the operator names \
         it (--data-file PATH)"
    )]
    DataFileConsent { path: String, data_file: String },
    #[error("{path}: a data file was given but the image has no external data file")]
    DataFileUnexpected { path: String },
    #[error(
        "write to sector 0 refused: it would make this probed raw image look like {format} \
         (serve it with --format raw to allow)"
    )]
    ProbedFormatChange { format: &'static str },
    #[error("--force-share is for read-only use only")]
    ForceShareWritable,
    #[error("image locking")]
    Lock(#[from] crate::lock::LockError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ImageError>;

/// A guest-visible disk. Shared by all queue workers, so every method takes `&self`.
pub trait BlockImage: Send + Sync {
    /// Size of the disk in bytes (a multiple of 512).
    fn capacity(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Reads `bufs` in turn from `offset`.
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()>;
    /// Writes `bufs` in turn at `offset`. Must never modify the caller's buffers.
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()>;
    /// Makes every completed write durable, data and metadata.
    fn flush(&self) -> Result<()>;
    /// Deallocates a range (it may read back as zeroes or as before: advisory).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes a range read as zeroes; `unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Smallest unit discard works in, in bytes.
    fn discard_granularity(&self) -> u32 {
        512
    }
    /// Changes the disk size to `new_size` bytes (a multiple of 512) while it is served (live
    /// resize; the caller decides whether shrinking is allowed). Formats that cannot resize
    /// keep the default.
    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(ImageError::Unsupported)
    }
    /// Smallest logical block size the image can serve (LUKS2 with 4096-byte encryption
    /// sectors: 4096); the daemon advertises at least this.
    fn min_block_size(&self) -> u32 {
        512
    }
}

/// Checks that `offset..offset+len` lies within `capacity`.
pub fn check_range(offset: u64, len: u64, capacity: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(ImageError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

/// Total byte length of a list of buffers.
pub fn iov_len<T: std::ops::Deref<Target = [u8]>>(bufs: &[T]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    /// A raw LUKS1 file (qemu-img's `luks` format).
    Luks,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Luks => "luks",
        }
    }

    /// From a qemu-img format name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "luks" => Some(Format::Luks),
            _ => None,
        }
    }
}

/// Whether backing files may be opened (QEMU opens them; a hostile image can name any file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    #[default]
    Allow,
    Deny,
}

/// Image locking as QEMU's `locking=` option (see [`crate::lock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// No locks (the library default; tests and in-process tools).
    #[default]
    Off,
    /// QEMU's locks: a writer refuses other writers; a reader refuses writers.
    On,
    /// qemu-img's `-U`/`--force-share`: read-only, shares everything.
    ForceShare,
    /// Ready to lock as [`Locking::On`] but holding nothing until
    /// [`crate::lock::LockSet::activate`] (a migration destination; see [`crate::lock`]).
    Inactive,
}

/// Options for [`open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Use O_DIRECT on the image file.
    pub direct: bool,
    /// The format; detected from the magic when `None`.
    pub format: Option<Format>,
    /// Whether backing files are opened.
    pub backing: BackingPolicy,
    /// The external data file of a qcow2 image, named by the operator (QEMU's `data-file`).
    /// The name in the image header is never opened by itself: it could name any host file.
    pub data_file: Option<PathBuf>,
    /// Whether and how every file opened is locked.
    pub locking: Locking,
}

/// Deepest backing chain accepted.
pub const MAX_BACKING_DEPTH: usize = 16;

/// Detects the format of an open file: qcow2 magic, LUKS magic, else raw.
pub fn detect_format(storage: &dyn Storage) -> Result<Format> {
    Ok(if crate::qcow2::is_qcow2(storage)? {
        Format::Qcow2
    } else if crypt::is_luks(storage)? {
        Format::Luks
    } else {
        Format::Raw
    })
}

/// Opens an image file as a [`BlockImage`], with its backing chain.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockImage>> {
    open_with_secret(path, opts, None)
}

/// Opens an image file, unlocking LUKS (raw or in qcow2) or legacy qcow2 AES with `secret`.
/// The same secret is offered to encrypted backing files.
pub fn open_with_secret(
    path: &Path,
    opts: &OpenOptions,
    secret: Option<&crate::crypto::secret::Passphrase>,
) -> Result<Box<dyn BlockImage>> {
    let (image, locks) = open_locked(path, opts, secret)?;
    if locks.is_empty() {
        return Ok(image);
    }
    Ok(Box::new(locked::LockedImage::new(image, locks)))
}

/// As [`open_with_secret`], handing back the locks of every file opened (image, backing chain,
/// data file) separately, for a caller that changes them later (migration hand-over). The
/// locks must outlive the image; with [`Locking::Off`] the set is empty.
pub fn open_locked(
    path: &Path,
    opts: &OpenOptions,
    secret: Option<&crate::crypto::secret::Passphrase>,
) -> Result<(Box<dyn BlockImage>, LockSet)> {
    if opts.locking == Locking::ForceShare && !opts.read_only {
        return Err(ImageError::ForceShareWritable);
    }
    let mut ctx = OpenCtx::default();
    let image = open_chain(path, opts, secret, &mut ctx)?;
    Ok((image, ctx.locks))
}

/// What one [`open_locked`] call gathers while it walks an image and its backing chain.
#[derive(Default)]
pub struct OpenCtx {
    /// Canonical paths of the images opened so far (loop detection).
    chain: Vec<PathBuf>,
    /// Locks of every file opened.
    locks: LockSet,
}

/// Opens one file of an image (read-write unless `read_only`) and takes QEMU's locks on it as
/// `locking` says: [`Perms::WRITE`] for a writer, [`Perms::READ`] for a reader,
/// [`Perms::FORCE_SHARE`] with [`Locking::ForceShare`]. For tools that work on the file
/// directly (`check --repair`, `keyslot`); hold the lock as long as the storage.
pub fn open_file_locked(
    path: &Path,
    read_only: bool,
    locking: Locking,
) -> Result<(FileStorage, Option<ImageLock>)> {
    if locking == Locking::ForceShare && !read_only {
        return Err(ImageError::ForceShareWritable);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| StorageError::Open {
            path: path.display().to_string(),
            source,
        })?;
    let perms = match (locking, read_only) {
        (Locking::Off, _) => None,
        (Locking::ForceShare, _) => Some(Perms::FORCE_SHARE),
        (Locking::On | Locking::Inactive, true) => Some(Perms::READ),
        (Locking::On | Locking::Inactive, false) => Some(Perms::WRITE),
    };
    let lock = match perms {
        None => None,
        Some(p) if locking == Locking::Inactive => {
            Some(ImageLock::acquire_inactive(&file, path, p)?)
        }
        Some(p) => Some(ImageLock::acquire(&file, path, p)?),
    };
    Ok((
        FileStorage::from_file(file, path.display().to_string()),
        lock,
    ))
}

/// [`open_file_locked`], keeping the lock in `ctx`.
fn open_file(
    path: &Path,
    read_only: bool,
    locking: Locking,
    ctx: &mut OpenCtx,
) -> Result<FileStorage> {
    let (storage, lock) = open_file_locked(path, read_only, locking)?;
    if let Some(l) = lock {
        ctx.locks.push(l);
    }
    Ok(storage)
}

/// Resolves a backing file name as QEMU does: absolute, or relative to the overlay's directory.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() || crate::rbd::is_rbd(name) {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new("")).join(p)
    }
}

fn open_chain(
    path: &Path,
    opts: &OpenOptions,
    secret: Option<&crate::crypto::secret::Passphrase>,
    ctx: &mut OpenCtx,
) -> Result<Box<dyn BlockImage>> {
    let chain = &mut ctx.chain;
    let shown = path.display().to_string();
    if chain.len() > MAX_BACKING_DEPTH {
        return Err(ImageError::BackingChain {
            path: shown,
            reason: "is deeper than 16",
        });
    }
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if chain.contains(&canon) {
        return Err(ImageError::BackingChain {
            path: shown,
            reason: "has a loop",
        });
    }
    chain.push(canon);
    // Probe through the page cache: O_DIRECT refuses the small unaligned header reads.
    // A file (locked as QEMU locks files), or an RBD image for an `rbd:` name (src/rbd: RBD's
    // exclusive lock instead).
    let storage: Box<dyn Storage> = match path.to_str() {
        Some(s) if crate::rbd::is_rbd(s) => crate::rbd::open_storage(
            path,
            OpenFlags {
                read_only: opts.read_only,
                direct: false,
            },
        )?,
        _ => Box::new(open_file(path, opts.read_only, opts.locking, ctx)?),
    };
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(&*storage)?,
    };
    if opts.direct && format != Format::Raw {
        // Metadata and crypto paths do small, unaligned I/O that O_DIRECT refuses.
        return Err(ImageError::DirectUnsupported {
            format: format.name(),
        });
    }
    match format {
        Format::Raw => {
            let storage = if opts.direct {
                drop(storage); // an RBD image's lock is held by one handle at a time
                crate::rbd::open_storage(
                    path,
                    OpenFlags {
                        read_only: opts.read_only,
                        direct: true,
                    },
                )?
            } else {
                storage
            };
            let raw = raw::RawImage::new(storage, opts.read_only)?;
            // As QEMU's raw driver with `bs->probed`: the guest may not make a probed raw image
            // probe as something else on the next open.
            Ok(Box::new(if opts.format.is_none() {
                raw.guard_probe()
            } else {
                raw
            }))
        }
        Format::Luks => Ok(Box::new(crypt::open_raw_luks(
            storage,
            opts.read_only,
            secret,
        )?)),
        Format::Qcow2 => {
            let probe = crate::qcow2::probe(&*storage)?;
            let crypt = crypt::qcow2_crypt(&*storage, &probe, secret)?;
            let backing = open_backing(path, &probe.header, opts, secret, ctx)?;
            let data = open_data_file(path, &probe.header, opts, ctx)?;
            let q = crate::qcow2::Qcow2::open_with_data_file(
                storage,
                data,
                &crate::qcow2::Qcow2Options {
                    read_only: opts.read_only,
                    ..Default::default()
                },
                backing,
                crypt,
            )?;
            Ok(Box::new(qcow2::Qcow2Image::new(q)))
        }
    }
}

/// Opens the external data file of a qcow2 image: only the file the operator named
/// ([`OpenOptions::data_file`]), never the name in the header by itself, and never under
/// [`BackingPolicy::Deny`] unless the operator named it.
fn open_data_file(
    path: &Path,
    header: &crate::qcow2::Header,
    opts: &OpenOptions,
    ctx: &mut OpenCtx,
) -> Result<Option<Box<dyn Storage>>> {
    let shown = || path.display().to_string();
    let named = header.data_file.clone().unwrap_or_default();
    let has = header.incompatible & crate::qcow2::header::INCOMPAT_DATA_FILE != 0
        || header.data_file.is_some();
    match (&opts.data_file, has) {
        (None, false) => Ok(None),
        (Some(_), false) => Err(ImageError::DataFileUnexpected { path: shown() }),
        (None, true) if opts.backing == BackingPolicy::Deny => Err(ImageError::DataFileDenied {
            path: shown(),
            data_file: named,
        }),
        (None, true) => Err(ImageError::DataFileConsent {
            path: shown(),
            data_file: named,
        }),
        (Some(given), true) => Ok(Some(Box::new(open_file(
            given,
            opts.read_only,
            opts.locking,
            ctx,
        )?))),
    }
}

/// Opens the backing file a qcow2 header names (read-only), if any.
pub fn open_backing(
    path: &Path,
    header: &crate::qcow2::Header,
    opts: &OpenOptions,
    secret: Option<&crate::crypto::secret::Passphrase>,
    ctx: &mut OpenCtx,
) -> Result<Option<Box<dyn crate::qcow2::BackingRead>>> {
    let Some(name) = &header.backing_file else {
        return Ok(None);
    };
    if opts.backing == BackingPolicy::Deny {
        return Err(ImageError::BackingDenied {
            path: path.display().to_string(),
            backing: name.clone(),
        });
    }
    let format = match header.backing_format.as_deref() {
        None => None,
        Some(f) => Some(
            Format::from_name(f).ok_or_else(|| ImageError::BackingFormat {
                path: path.display().to_string(),
                format: f.to_string(),
            })?,
        ),
    };
    let bopts = OpenOptions {
        read_only: true,
        direct: opts.direct,
        format,
        backing: opts.backing,
        // The data file option belongs to the top image only.
        data_file: None,
        locking: opts.locking,
    };
    let b = open_chain(&resolve_backing(path, name), &bopts, secret, ctx)?;
    Ok(Some(Box::new(qcow2::BackingImage(b))))
}

#[doc(hidden)]
pub use storage::MemStorage;
