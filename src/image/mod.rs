//! The image layer: one [`BlockImage`] trait that the virtio-blk layer sees, and the formats
//! behind it (raw here; qcow2 and LUKS plug in beside it).
//!
//! Offsets and lengths are in bytes of the guest-visible disk. Callers (virtio_blk) have already
//! checked that every range lies within [`BlockImage::capacity`]; implementations check again and
//! answer [`ImageError::OutOfRange`] rather than trusting them.

use std::io::{IoSlice, IoSliceMut};
use std::path::Path;

use thiserror::Error;

use crate::storage::{self, FileStorage, OpenFlags, Storage, StorageError};

pub mod luks;
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
    #[error("LUKS")]
    Luks(#[from] crate::crypto::luks::LuksError),
    #[error("sector cipher")]
    Cipher(#[from] crate::crypto::sector::SectorCipherError),
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

/// Options for [`open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Use O_DIRECT on the image file.
    pub direct: bool,
}

/// Opens an image file as a [`BlockImage`].
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockImage>> {
    let storage = FileStorage::open(
        path,
        OpenFlags {
            read_only: opts.read_only,
            direct: opts.direct,
        },
    )?;
    Ok(Box::new(raw::RawImage::new(
        Box::new(storage) as Box<dyn Storage>,
        opts.read_only,
    )?))
}

#[doc(hidden)]
pub use storage::MemStorage;
