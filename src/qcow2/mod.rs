//! qcow2 images (QEMU docs/interop/qcow2.rst), read and write.
//!
//! - [`header`]: the header and its extensions, validated against the file.
//! - [`types`]: geometry (guest offset → L1/L2 index).
//! - [`metadata`]: L1, L2 cache and refcounts behind one lock; lookups return a [`Mapping`].
//! - [`alloc`]: refcounts of every order and cluster allocation.
//! - [`engine`]: [`Qcow2`], the read/write/discard paths.
//! - [`compressed`], [`check`], [`create`].
//!
//! Nothing here knows about virtio; the image layer adapts [`Qcow2`] to `BlockImage`.

use std::io::IoSliceMut;

use thiserror::Error;

use crate::storage::{Storage, StorageError};

pub mod alloc;
mod bounds;
pub mod check;
pub mod compressed;
pub mod create;
pub mod engine;
pub mod header;
mod iov;
pub mod metadata;
pub mod resize;
pub mod snapshot_ops;
pub mod stream;
pub mod types;

#[cfg(test)]
mod harden_tests;
#[cfg(test)]
mod tests;

pub use engine::{Qcow2, Qcow2Options};
pub use header::Header;
pub use metadata::Mapping;

/// Errors of the qcow2 layer.
#[derive(Debug, Error)]
pub enum Error {
    #[error("storage")]
    Storage(#[from] StorageError),
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    #[error("image header is truncated (file is {len} bytes)")]
    Truncated { len: u64 },
    #[error("cluster_bits {0} out of range 9..=21")]
    ClusterBits(u32),
    #[error("invalid header: {what}")]
    InvalidHeader { what: &'static str },
    #[error("{what} at offset {offset:#x} is {reason}")]
    BadTable {
        what: &'static str,
        offset: u64,
        reason: &'static str,
    },
    #[error("unknown incompatible feature bits {bits:#x}: refusing to open")]
    UnknownIncompatible { bits: u64 },
    #[error("unsupported compression type {0}")]
    CompressionType(u8),
    #[error("unsupported encryption method {0}")]
    CryptMethod(u32),
    #[error("image is encrypted ({}): a key is needed", crypt_name(*.0))]
    NeedKey(u32),
    #[error("backing file name of {0} bytes exceeds 1023")]
    BackingNameTooLong(u32),
    #[error("header extensions do not fit in the header cluster")]
    HeaderFull,
    #[error("image is marked corrupt: it can only be opened read-only")]
    Corrupt,
    #[error("feature not supported: {0}")]
    Unsupported(&'static str),
    #[error("invalid metadata: {what} at {offset:#x}")]
    BadOffset { what: &'static str, offset: u64 },
    #[error("compressed cluster at {offset:#x} is invalid")]
    Compressed { offset: u64 },
    #[error("refcount overflow for the cluster at {offset:#x}")]
    RefcountOverflow { offset: u64 },
    #[error("size or offset too large")]
    TooLarge,
    #[error("the image is read-only")]
    ReadOnly,
    #[error("range {offset}+{len} is outside the disk")]
    OutOfRange { offset: u64, len: u64 },
    #[error("backing file")]
    Backing(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cluster encryption")]
    Crypt(#[from] CryptError),
}

fn crypt_name(m: u32) -> &'static str {
    match m {
        1 => "legacy AES",
        2 => "LUKS",
        _ => "unknown method",
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// An error of a [`ClusterCrypt`] implementation.
#[derive(Debug, Error)]
#[error("cluster encryption failed")]
pub struct CryptError {
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl CryptError {
    /// Wraps the implementation's error.
    pub fn new(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            source: source.into(),
        }
    }
}

/// Data-cluster encryption, implemented by the LUKS / legacy-AES layer.
pub trait ClusterCrypt: Send + Sync {
    /// Decrypt in place data just read from the file. `host_offset` is the file offset of `buf[0]`,
    /// `guest_offset` the guest offset of `buf[0]`; both multiples of 512, `buf.len()` a multiple of 512.
    fn decrypt(
        &self,
        buf: &mut [u8],
        host_offset: u64,
        guest_offset: u64,
    ) -> std::result::Result<(), CryptError>;
    /// dst = encrypt(src) for writing at host_offset/guest_offset. src is never modified.
    fn encrypt_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        host_offset: u64,
        guest_offset: u64,
    ) -> std::result::Result<(), CryptError>;
}

/// Reads of a backing file (plaintext guest data of the backing image).
pub trait BackingRead: Send + Sync {
    /// Guest-visible size of the backing image; reads past it are zero-filled by the caller.
    fn size(&self) -> u64;
    /// Reads `bufs` in turn from `offset` (within `size()`).
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()>;
}

/// What the LUKS layer needs before opening an image: the header facts on encryption.
#[derive(Debug, Clone)]
pub struct Qcow2Probe {
    pub crypt_method: u32,
    /// The full-disk-encryption header region (offset, length), for crypt_method 2.
    pub fde_header: Option<(u64, u64)>,
    pub cluster_size: u64,
    pub size: u64,
    pub header: Header,
}

/// Reads and validates the header only; lets the caller read the FDE region (plain
/// `storage.read_at`) and unlock the key before [`Qcow2::open`].
pub fn probe(storage: &dyn Storage) -> Result<Qcow2Probe> {
    let header = Header::read(storage)?;
    Ok(Qcow2Probe {
        crypt_method: header.crypt_method,
        fde_header: header.fde,
        cluster_size: header.cluster_size(),
        size: header.size,
        header,
    })
}

/// Whether `storage` starts with the qcow2 magic.
pub fn is_qcow2(storage: &dyn Storage) -> Result<bool> {
    let mut m = [0u8; 4];
    if storage.len()? < 4 {
        return Ok(false);
    }
    storage.read_at(&mut m, 0)?;
    Ok(u32::from_be_bytes(m) == header::MAGIC)
}
