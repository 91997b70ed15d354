//! Ceph RBD storage: images that live in a RADOS pool, named as QEMU names them
//! (`rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH]`).
//!
//! [`RbdStorage`] implements [`Storage`], so every format above it (raw, raw LUKS, qcow2,
//! qcow2 + LUKS) works unchanged on an RBD image. librbd is loaded at run time ([`ffi`]); data I/O
//! goes through `rbd_aio_*` with the caller's iovecs handed to librbd as they are.
//!
//! Ownership: a read-write open takes RBD's exclusive lock explicitly (`rbd_lock_acquire`),
//! which librbd then refuses to hand to other clients, and refuses to open while another live
//! client owns it (see [`lock`]).

use std::io;
use std::path::Path;

use thiserror::Error;

use crate::storage::{FileStorage, OpenFlags, Storage, StorageError};

pub mod ffi;
pub mod lock;
pub mod name;
mod storage;

pub use name::{is_rbd, NameError, RbdName};
pub use storage::{RbdStorage, DEFAULT_CONNECT_TIMEOUT_SECS};

/// Errors of the RBD backend.
#[derive(Debug, Error)]
pub enum RbdError {
    #[error("librbd is not available ({0}): install librbd1 to use rbd: images")]
    Library(String),
    #[error("bad rbd: image name")]
    Name(#[from] NameError),
    #[error("cannot read Ceph config {path}")]
    Conf {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid Ceph option {key}")]
    Option {
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the Ceph cluster (config {conf}, as {client}, waited at most {timeout_secs} s)")]
    Connect {
        conf: String,
        client: String,
        timeout_secs: String,
        #[source]
        source: io::Error,
    },
    #[error("pool {pool} does not exist")]
    NoPool { pool: String },
    #[error("cannot open pool {pool}")]
    Pool {
        pool: String,
        #[source]
        source: io::Error,
    },
    #[error("image {image} does not exist")]
    NoImage { image: String },
    #[error("cannot open image {image}")]
    Image {
        image: String,
        #[source]
        source: io::Error,
    },
    #[error("image {image} already exists")]
    Exists { image: String },
    #[error("cannot create image {image}")]
    Create {
        image: String,
        #[source]
        source: io::Error,
    },
    #[error("image {image} is being written by {owner}: refusing to open it read-write (stop that client first, or open read-only)")]
    Locked { image: String, owner: String },
    #[error("cannot take the exclusive lock of image {image}")]
    Lock {
        image: String,
        #[source]
        source: io::Error,
    },
}

/// `-r` (a negative errno from librados/librbd) as an [`io::Error`].
pub(crate) fn errno<T: TryInto<i32>>(r: T) -> io::Error {
    let code = r
        .try_into()
        .ok()
        .and_then(i32::checked_neg)
        .unwrap_or(libc::EIO);
    io::Error::from_raw_os_error(code)
}

/// Opens the storage an image name designates: an RBD image for an `rbd:` name, else a file.
/// An `rbd:` name opens read-write with the exclusive lock unless `flags.read_only`
/// (`flags.direct` has no meaning for RBD and is ignored there).
pub fn open_storage(path: &Path, flags: OpenFlags) -> Result<Box<dyn Storage>, StorageError> {
    match path.to_str() {
        Some(s) if is_rbd(s) => Ok(Box::new(
            RbdStorage::open_name(s, flags.read_only).map_err(|e| into_storage(s, e))?,
        )),
        _ => Ok(Box::new(FileStorage::open(path, flags)?)),
    }
}

/// Creates a new RBD image of `size` bytes (for `rbd:` names; `Ok(None)` for any other path).
pub fn create_storage(path: &Path, size: u64) -> Result<Option<RbdStorage>, StorageError> {
    match path.to_str() {
        Some(s) if is_rbd(s) => Ok(Some(
            RbdStorage::create_name(s, size).map_err(|e| into_storage(s, e))?,
        )),
        _ => Ok(None),
    }
}

/// An [`RbdError`] as the storage layer's open error (the RBD error stays the source).
pub fn into_storage(name: &str, e: RbdError) -> StorageError {
    let path = match RbdName::parse(name) {
        Ok(n) => format!("rbd:{}", n.spec()),
        Err(_) => "rbd: image".to_owned(),
    };
    StorageError::Open {
        path,
        source: io::Error::other(e),
    }
}

/// The size of the storage an image name designates: an RBD image's size, else the file's
/// length (`None` when the file cannot be read).
pub fn storage_len(path: &Path) -> Option<u64> {
    match path.to_str() {
        Some(s) if is_rbd(s) => RbdStorage::open_name(s, true).ok()?.len().ok(),
        _ => std::fs::metadata(path).ok().map(|m| m.len()),
    }
}

/// Creates an empty store for a new image: an RBD image of size 0 for an `rbd:` name (the
/// image layer then sizes it), else a new file (which must not exist).
pub fn create_new(path: &Path) -> Result<Box<dyn Storage>, StorageError> {
    match create_storage(path, 0)? {
        Some(rbd) => Ok(Box::new(rbd)),
        None => Ok(Box::new(FileStorage::create(path)?)),
    }
}
