//! The qcow2 format as a [`BlockImage`]: a thin adapter over [`crate::qcow2::Qcow2`].

use std::io::{IoSlice, IoSliceMut};

use super::{check_range, iov_len, BlockImage, ImageError, Result};
use crate::qcow2::{self, BackingRead, Qcow2};

/// A qcow2 image.
pub struct Qcow2Image {
    inner: Qcow2,
}

impl Qcow2Image {
    /// Wraps an open [`Qcow2`].
    pub fn new(inner: Qcow2) -> Self {
        Self { inner }
    }

    /// The engine underneath.
    pub fn inner(&self) -> &Qcow2 {
        &self.inner
    }
}

fn map_err(e: qcow2::Error) -> ImageError {
    match e {
        qcow2::Error::ReadOnly => ImageError::ReadOnly,
        e => ImageError::Qcow2(e),
    }
}

impl BlockImage for Qcow2Image {
    fn capacity(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        check_range(offset, iov_len(bufs), self.capacity())?;
        self.inner.read(offset, bufs).map_err(map_err)
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only() {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, iov_len(bufs), self.capacity())?;
        self.inner.write(offset, bufs).map_err(map_err)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush().map_err(map_err)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only() {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity())?;
        self.inner.discard(offset, len).map_err(map_err)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        if self.read_only() {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity())?;
        self.inner.write_zeroes(offset, len).map_err(map_err)
    }

    fn discard_granularity(&self) -> u32 {
        u32::try_from(self.inner.cluster_size()).unwrap_or(u32::MAX)
    }
}

/// Any opened image serving as the backing file of a qcow2 image.
pub struct BackingImage(pub Box<dyn BlockImage>);

impl BackingRead for BackingImage {
    fn size(&self) -> u64 {
        self.0.capacity()
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> qcow2::Result<()> {
        self.0
            .read(offset, bufs)
            .map_err(|e| qcow2::Error::Backing(Box::new(e)))
    }
}
