//! Raw LUKS1 images (`qemu-img create -f luks`, `cryptsetup luksFormat --type luks1`): the
//! guest disk is the payload, from the header's payload offset to the end of the file; the IV
//! sector of guest offset o is o / 512 (i.e. (file offset − payload) / 512).
//!
//! Reads land in the caller's buffers and are decrypted there, in place; a sector that
//! straddles two buffers is gathered into a 512-byte stack buffer, decrypted and scattered
//! back. Writes are encrypted into a per-thread reusable bounce buffer (at most
//! [`BOUNCE_MAX`] bytes; longer requests go in chunks), never touching the caller's buffers.
//! Unaligned requests (not whole 512-byte sectors) take a read-modify-write slow path.

use std::cell::RefCell;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;

use super::{check_range, iov_len, BlockImage, ImageError, Result};
use crate::crypto::luks::{self, CreateParams, LuksArea, LuksHeader, LuksVolume};
use crate::crypto::secret::Passphrase;
use crate::crypto::secret::SecretBuf;
use crate::crypto::sector::SectorCipher;
use crate::crypto::SECTOR_SIZE;
use crate::storage::{FileStorage, Storage};

/// Largest bounce buffer a worker keeps (and largest chunk written at once).
pub const BOUNCE_MAX: usize = 1 << 20;

const SECTOR: u64 = SECTOR_SIZE as u64;

thread_local! {
    static BOUNCE: RefCell<SecretBuf> = const { RefCell::new(SecretBuf::new()) };
}

/// Runs `f` with this thread's bounce buffer, at least `len` (≤ BOUNCE_MAX) bytes long.
pub(crate) fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with_borrow_mut(|b| f(b.get_mut(len)))
}

/// A position inside a list of buffers.
#[derive(Clone, Copy)]
pub(crate) struct Cursor {
    idx: usize,
    off: usize,
}

impl Cursor {
    fn skip_empty<T: std::ops::Deref<Target = [u8]>>(&mut self, bufs: &[T]) {
        while self.idx < bufs.len() && self.off >= bufs[self.idx].len() {
            self.idx += 1;
            self.off = 0;
        }
    }
}

/// Copies `out.len()` bytes from `bufs` at `cur` into `out`, advancing `cur`.
fn gather<T: std::ops::Deref<Target = [u8]>>(bufs: &[T], cur: &mut Cursor, out: &mut [u8]) {
    let mut done = 0;
    while done < out.len() {
        cur.skip_empty(bufs);
        let Some(b) = bufs.get(cur.idx) else { break };
        let n = (b.len() - cur.off).min(out.len() - done);
        out[done..done + n].copy_from_slice(&b[cur.off..cur.off + n]);
        done += n;
        cur.off += n;
    }
}

/// Copies `data` into `bufs` at `cur`, advancing `cur`.
fn scatter(bufs: &mut [IoSliceMut<'_>], cur: &mut Cursor, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        cur.skip_empty(bufs);
        let Some(b) = bufs.get_mut(cur.idx) else {
            break;
        };
        let n = (b.len() - cur.off).min(data.len() - done);
        b[cur.off..cur.off + n].copy_from_slice(&data[done..done + n]);
        done += n;
        cur.off += n;
    }
}

/// Decrypts, in place, `bufs` holding whole sectors from `first_sector` on. Runs of whole
/// sectors inside one buffer go to the cipher in one call; sectors that straddle buffers are
/// gathered into a stack buffer, decrypted and scattered back.
pub(crate) fn decrypt_iovecs(
    cipher: &SectorCipher,
    bufs: &mut [IoSliceMut<'_>],
    first_sector: u64,
) -> Result<()> {
    let total = iov_len(bufs);
    let mut sectors_left = total / SECTOR;
    let mut sector = first_sector;
    let mut cur = Cursor { idx: 0, off: 0 };
    while sectors_left > 0 {
        cur.skip_empty(bufs);
        let Some(b) = bufs.get_mut(cur.idx) else {
            break;
        };
        let avail = (b.len() - cur.off) / SECTOR_SIZE;
        let avail = avail.min(usize::try_from(sectors_left).unwrap_or(usize::MAX));
        if avail > 0 {
            let bytes = avail * SECTOR_SIZE;
            cipher.decrypt_sectors(&mut b[cur.off..cur.off + bytes], sector)?;
            cur.off += bytes;
            let n = u64::try_from(avail).unwrap_or(u64::MAX);
            sector = sector.wrapping_add(n);
            sectors_left -= n;
        } else {
            let mut tmp = [0u8; SECTOR_SIZE];
            let start = cur;
            gather(bufs, &mut cur, &mut tmp);
            cipher.decrypt_sectors(&mut tmp, sector)?;
            let mut back = start;
            scatter(bufs, &mut back, &tmp);
            sector = sector.wrapping_add(1);
            sectors_left -= 1;
        }
    }
    Ok(())
}

/// Encrypts whole sectors of `bufs` from `cur` into `dst` (a multiple of 512 bytes long).
pub(crate) fn encrypt_from_iovecs(
    cipher: &SectorCipher,
    bufs: &[IoSlice<'_>],
    cur: &mut Cursor,
    dst: &mut [u8],
    sector: u64,
) -> Result<()> {
    cur.skip_empty(bufs);
    if let Some(b) = bufs.get(cur.idx) {
        if b.len() - cur.off >= dst.len() {
            // Contiguous in one buffer: encrypt straight from the caller's memory.
            cipher.encrypt_sectors_to(&b[cur.off..cur.off + dst.len()], dst, sector)?;
            cur.off += dst.len();
            return Ok(());
        }
    }
    gather(bufs, cur, dst);
    cipher.encrypt_sectors(dst, sector)?;
    Ok(())
}

/// A raw LUKS1 image.
pub struct LuksImage {
    storage: Box<dyn Storage>,
    cipher: SectorCipher,
    header: LuksHeader,
    payload: u64,
    capacity: u64,
    read_only: bool,
}

impl LuksImage {
    /// Unlocks and opens a raw LUKS1 image. A wrong passphrase or a malformed header is an
    /// error and nothing is written.
    pub fn open(storage: Box<dyn Storage>, read_only: bool, pass: &Passphrase) -> Result<Self> {
        let area = LuksArea::whole(storage.as_ref())?;
        let vol = LuksVolume::unlock(&area, pass)?;
        Self::from_volume(storage, read_only, &vol)
    }

    fn from_volume(storage: Box<dyn Storage>, read_only: bool, vol: &LuksVolume) -> Result<Self> {
        let header = vol.header().clone();
        let payload = header.payload_offset_bytes();
        let capacity = storage.len()?.saturating_sub(payload) & !(SECTOR - 1);
        Ok(Self {
            cipher: vol.cipher()?,
            storage,
            header,
            payload,
            capacity,
            read_only,
        })
    }

    /// Creates a raw LUKS1 image of `size` guest bytes (rounded up to 512) at `path`, laid out
    /// as QEMU lays it out, and opens it.
    pub fn create(
        path: &Path,
        size: u64,
        params: &CreateParams,
        pass: &Passphrase,
    ) -> Result<Self> {
        let storage = FileStorage::create(path)?;
        let area_len = luks::create::area_len(&params.spec)?;
        let size = size
            .checked_next_multiple_of(SECTOR)
            .and_then(|s| s.checked_add(area_len))
            .ok_or(ImageError::OutOfRange {
                offset: area_len,
                len: size,
                capacity: u64::MAX,
            })?;
        storage.set_len(size)?;
        let vol = {
            let area = LuksArea::whole(&storage)?;
            luks::create::format(&area, params, pass)?
        };
        storage.sync()?;
        Self::from_volume(Box::new(storage), false, &vol)
    }

    /// The LUKS header.
    pub fn header(&self) -> &LuksHeader {
        &self.header
    }

    /// Payload offset in bytes.
    pub fn payload_offset(&self) -> u64 {
        self.payload
    }

    fn aligned(offset: u64, len: u64) -> bool {
        offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR)
    }

    /// Slow path: reads covering whole sectors into the bounce buffer, decrypts, copies out.
    fn read_unaligned(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len(bufs);
        let mut done = 0u64;
        let mut out = Cursor { idx: 0, off: 0 };
        while done < len {
            let Span {
                start,
                lead,
                want,
                span,
            } = Span::next(offset + done, len - done);
            with_bounce(span, |b| -> Result<()> {
                self.storage.read_at(b, self.payload + start)?;
                self.cipher.decrypt_sectors(b, start / SECTOR)?;
                scatter(bufs, &mut out, &b[lead..lead + want]);
                Ok(())
            })?;
            done += want as u64;
        }
        Ok(())
    }

    /// Slow path: read-modify-write of the covering sectors through the bounce buffer.
    fn write_unaligned(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let len = iov_len(bufs);
        let mut done = 0u64;
        let mut inp = Cursor { idx: 0, off: 0 };
        while done < len {
            let Span {
                start,
                lead,
                want,
                span,
            } = Span::next(offset + done, len - done);
            with_bounce(span, |b| -> Result<()> {
                self.storage.read_at(b, self.payload + start)?;
                self.cipher.decrypt_sectors(b, start / SECTOR)?;
                gather(bufs, &mut inp, &mut b[lead..lead + want]);
                self.cipher.encrypt_sectors(b, start / SECTOR)?;
                self.storage.write_at(b, self.payload + start)?;
                Ok(())
            })?;
            done += want as u64;
        }
        Ok(())
    }
}

/// The next piece of an unaligned request, as the slow paths process it through the bounce
/// buffer: the whole sectors from `start` (sector-aligned, payload-relative) covering at most
/// [`BOUNCE_MAX`] bytes; the request's bytes sit at `lead..lead + want` inside those `span` bytes.
struct Span {
    start: u64,
    lead: usize,
    want: usize,
    span: usize,
}

impl Span {
    /// The piece starting at `pos` with `remaining` request bytes still to go.
    fn next(pos: u64, remaining: u64) -> Self {
        let start = pos / SECTOR * SECTOR;
        // Both below BOUNCE_MAX: lead < 512, want ≤ BOUNCE_MAX − lead.
        let lead = usize::try_from(pos - start).unwrap_or(0);
        let want = usize::try_from(remaining.min((BOUNCE_MAX - lead) as u64)).unwrap_or(0);
        let span = (lead + want).next_multiple_of(SECTOR_SIZE);
        Self {
            start,
            lead,
            want,
            span,
        }
    }
}

impl BlockImage for LuksImage {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len(bufs);
        check_range(offset, len, self.capacity)?;
        if !Self::aligned(offset, len) {
            return self.read_unaligned(offset, bufs);
        }
        self.storage.readv_at(bufs, self.payload + offset)?;
        decrypt_iovecs(&self.cipher, bufs, offset / SECTOR)
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let len = iov_len(bufs);
        check_range(offset, len, self.capacity)?;
        if !Self::aligned(offset, len) {
            return self.write_unaligned(offset, bufs);
        }
        let mut cur = Cursor { idx: 0, off: 0 };
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(BOUNCE_MAX as u64);
            let chunk_us = usize::try_from(chunk).unwrap_or(BOUNCE_MAX);
            let pos = offset + done;
            with_bounce(chunk_us, |b| -> Result<()> {
                encrypt_from_iovecs(&self.cipher, bufs, &mut cur, b, pos / SECTOR)?;
                self.storage.write_at(b, self.payload + pos)?;
                Ok(())
            })?;
            done += chunk;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.storage.sync()?)
    }

    /// Advisory, so a no-op: punching a hole would make the range read back as the decryption
    /// of zeroes (neither zeroes nor the old data) and would show which sectors are unused.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity)
    }

    /// Writes encrypted zeroes (a hole would not read back as zeroes through the cipher).
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity)?;
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(BOUNCE_MAX as u64);
            let chunk_us = usize::try_from(chunk).unwrap_or(BOUNCE_MAX);
            let pos = offset + done;
            if Self::aligned(pos, chunk) {
                with_bounce(chunk_us, |b| -> Result<()> {
                    b.fill(0);
                    self.cipher.encrypt_sectors(b, pos / SECTOR)?;
                    self.storage.write_at(b, self.payload + pos)?;
                    Ok(())
                })?;
            } else {
                let z = vec![0u8; chunk_us];
                self.write_unaligned(pos, &[IoSlice::new(&z)])?;
            }
            done += chunk;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "luks_tests.rs"]
mod tests;
