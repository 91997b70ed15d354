//! In-memory storage for the fuzz targets.
//!
//! A fuzzed image may point anywhere in a 2^56-byte file; a real file is sparse there, a vector
//! is not. [`CappedMem`] refuses to grow past [`MAX_BYTES`] (as a file system refuses with
//! EFBIG) and otherwise behaves as [`MemStorage`]; [`SparseTail`] is a read-only store whose
//! bytes past the input read as zeroes up to a declared length.

use std::io::{self, IoSlice, IoSliceMut};

use crate::storage::{MemStorage, Result, Storage, StorageError};

/// Largest store a fuzz target may grow to.
pub(crate) const MAX_BYTES: u64 = 64 << 20;

fn too_big(offset: u64, len: usize) -> StorageError {
    StorageError::Write {
        offset,
        len,
        source: io::Error::from_raw_os_error(libc::EFBIG),
    }
}

fn end_within_cap(offset: u64, len: usize) -> bool {
    u64::try_from(len)
        .ok()
        .and_then(|l| offset.checked_add(l))
        .is_some_and(|end| end <= MAX_BYTES)
}

/// A [`MemStorage`] that cannot grow past [`MAX_BYTES`].
#[derive(Default)]
pub(crate) struct CappedMem(MemStorage);

impl CappedMem {
    pub(crate) fn new(data: Vec<u8>) -> Self {
        Self(MemStorage::new(data))
    }
}

impl Storage for CappedMem {
    fn len(&self) -> Result<u64> {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !end_within_cap(offset, buf.len()) {
            return Err(too_big(offset, buf.len()));
        }
        self.0.write_at(buf, offset)
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.0.readv_at(bufs, offset)
    }
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let len = bufs
            .iter()
            .map(|b| b.len())
            .fold(0usize, usize::saturating_add);
        if !end_within_cap(offset, len) {
            return Err(too_big(offset, len));
        }
        self.0.writev_at(bufs, offset)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        if len > MAX_BYTES {
            return Err(StorageError::Size(io::Error::from_raw_os_error(
                libc::EFBIG,
            )));
        }
        self.0.set_len(len)
    }
    fn sync(&self) -> Result<()> {
        self.0.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        // MemStorage never grows on write_zeroes.
        self.0.write_zeroes(offset, len)
    }
}

/// Read-only bytes followed by zeroes up to `len`.
pub(crate) struct SparseTail {
    data: Vec<u8>,
    len: u64,
}

impl SparseTail {
    pub(crate) fn new(data: Vec<u8>, len: u64) -> Self {
        Self { data, len }
    }
}

fn read_only() -> StorageError {
    StorageError::Flush(io::Error::from_raw_os_error(libc::EROFS))
}

impl Storage for SparseTail {
    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        buf.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return Ok(());
        };
        if let Some(src) = self.data.get(start..) {
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Err(read_only())
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let mut pos = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, pos)?;
            pos = pos.saturating_add(u64::try_from(b.len()).unwrap_or(u64::MAX));
        }
        Ok(())
    }
    fn writev_at(&self, _: &[IoSlice<'_>], _: u64) -> Result<()> {
        Err(read_only())
    }
    fn set_len(&self, _: u64) -> Result<()> {
        Err(read_only())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn punch_hole(&self, _: u64, _: u64) -> Result<()> {
        Err(read_only())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
        Err(read_only())
    }
}
