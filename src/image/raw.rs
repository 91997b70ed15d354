//! Raw images: guest offset = file offset.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{check_range, iov_len, BlockImage, ImageError, Result};
use crate::storage::Storage;

/// A raw image file.
pub struct RawImage {
    storage: Box<dyn Storage>,
    /// Changes only on live resize.
    capacity: AtomicU64,
    read_only: bool,
}

impl RawImage {
    /// Serves `storage` as a disk; its size is rounded down to whole 512-byte sectors.
    pub fn new(storage: Box<dyn Storage>, read_only: bool) -> Result<Self> {
        let capacity = storage.len()? & !511;
        Ok(Self {
            storage,
            capacity: AtomicU64::new(capacity),
            read_only,
        })
    }
}

impl BlockImage for RawImage {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        check_range(offset, iov_len(bufs), self.capacity())?;
        Ok(self.storage.readv_at(bufs, offset)?)
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, iov_len(bufs), self.capacity())?;
        Ok(self.storage.writev_at(bufs, offset)?)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.storage.sync()?)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity())?;
        Ok(self.storage.punch_hole(offset, len)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity())?;
        if unmap {
            Ok(self.storage.punch_hole(offset, len)?)
        } else {
            Ok(self.storage.write_zeroes(offset, len)?)
        }
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if !new_size.is_multiple_of(512) {
            return Err(ImageError::OutOfRange {
                offset: new_size,
                len: 0,
                capacity: self.capacity(),
            });
        }
        let old = self.capacity();
        if new_size < old {
            // Shrink: requests past the new end fail from now on, then the file is cut.
            self.capacity.store(new_size, Ordering::Release);
            self.storage.set_len(new_size)?;
        } else {
            self.storage.set_len(new_size)?;
            self.capacity.store(new_size, Ordering::Release);
        }
        self.storage.sync()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn write_past_capacity_is_out_of_range() {
        let img = RawImage::new(Box::new(MemStorage::new(vec![0; 4096])), false).expect("raw");
        let e = img.write(4096 - 511, &[IoSlice::new(&[1u8; 512])]);
        assert!(matches!(e, Err(ImageError::OutOfRange { .. })));
    }

    #[test]
    fn read_only_refuses_writes() {
        let img = RawImage::new(Box::new(MemStorage::new(vec![0; 4096])), true).expect("raw");
        assert!(matches!(
            img.write(0, &[IoSlice::new(&[1u8; 512])]),
            Err(ImageError::ReadOnly)
        ));
    }

    #[test]
    fn round_trip() {
        let img = RawImage::new(Box::new(MemStorage::new(vec![0; 8192])), false).expect("raw");
        img.write(512, &[IoSlice::new(&[5u8; 1024])])
            .expect("write");
        img.write_zeroes(1024, 512, false).expect("zero");
        let mut out = vec![0u8; 2048];
        img.read(0, &mut [IoSliceMut::new(&mut out)]).expect("read");
        assert_eq!(&out[..512], &[0u8; 512][..]);
        assert_eq!(&out[512..1024], &[5u8; 512][..]);
        assert_eq!(&out[1024..1536], &[0u8; 512][..]);
    }
}
