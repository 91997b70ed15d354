//! An image together with the locks of the files it opened (see [`crate::lock`]).

use std::io::{IoSlice, IoSliceMut};

use super::{BlockImage, Result};
use crate::lock::LockSet;

/// Forwards to the image; the locks are released after the image is closed (fields drop in
/// declaration order).
pub(super) struct LockedImage {
    image: Box<dyn BlockImage>,
    _locks: LockSet,
}

impl LockedImage {
    pub(super) fn new(image: Box<dyn BlockImage>, locks: LockSet) -> Self {
        Self {
            image,
            _locks: locks,
        }
    }
}

impl BlockImage for LockedImage {
    fn capacity(&self) -> u64 {
        self.image.capacity()
    }
    fn read_only(&self) -> bool {
        self.image.read_only()
    }
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.image.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.image.write(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        self.image.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.image.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.image.write_zeroes(offset, len, unmap)
    }
    fn discard_granularity(&self) -> u32 {
        self.image.discard_granularity()
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        self.image.resize(new_size)
    }
    fn min_block_size(&self) -> u32 {
        self.image.min_block_size()
    }
}
