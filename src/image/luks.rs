//! Raw LUKS images: LUKS1 (`qemu-img create -f luks`, `cryptsetup luksFormat --type luks1`)
//! and LUKS2 (`cryptsetup luksFormat`, the default type). The guest disk is the payload, from
//! the payload (segment) offset to the end of the file or the segment's fixed size; the IV
//! sector of guest offset o is iv_tweak + o / 512 (LUKS1: iv_tweak 0), in 512-byte units even
//! when LUKS2's encryption sector is 4096 bytes (dm-crypt without `iv_large_sectors`).
//!
//! With encryption sectors larger than 512 bytes, requests must be aligned to them: the daemon
//! advertises that size as the logical block size ([`BlockImage::min_block_size`]) and a
//! misaligned request is refused (no read-modify-write of a shared sector, which two queues
//! could race on).
//!
//! Reads land in the caller's buffers and are decrypted there, in place; a sector that
//! straddles two buffers is gathered into a 512-byte stack buffer, decrypted and scattered
//! back. Writes are encrypted into a per-thread reusable bounce buffer (at most
//! [`BOUNCE_MAX`] bytes; longer requests go in chunks), never touching the caller's buffers.
//! Unaligned requests (not whole 512-byte sectors) take a read-modify-write slow path.

use std::cell::RefCell;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;

use zeroize::Zeroize;

use super::{check_range, iov_len, BlockImage, ImageError, Result};
use crate::crypto::luks::luks2::{self, DiskCipher, Luks2Header, Luks2Volume};
use crate::crypto::luks::{self, CreateParams, LuksArea, LuksError, LuksHeader, LuksVolume};
use crate::crypto::secret::Passphrase;
use crate::crypto::secret::SecretBuf;
use crate::crypto::SECTOR_SIZE;
use crate::storage::Storage;

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

/// Decrypts, in place, `bufs` holding whole encryption sectors, the first with IV sector
/// `first_iv`. Runs of whole sectors inside one buffer go to the cipher in one call; sectors
/// that straddle buffers are gathered into a stack buffer, decrypted and scattered back.
pub(crate) fn decrypt_iovecs(
    cipher: &DiskCipher,
    bufs: &mut [IoSliceMut<'_>],
    first_iv: u64,
) -> Result<()> {
    let unit = cipher.unit();
    let unit64 = unit as u64;
    let step = unit64 / SECTOR;
    let total = iov_len(bufs);
    let mut units_left = total / unit64;
    let mut iv = first_iv;
    let mut cur = Cursor { idx: 0, off: 0 };
    while units_left > 0 {
        cur.skip_empty(bufs);
        let Some(b) = bufs.get_mut(cur.idx) else {
            break;
        };
        let avail = (b.len() - cur.off) / unit;
        let avail = avail.min(usize::try_from(units_left).unwrap_or(usize::MAX));
        if avail > 0 {
            let bytes = avail * unit;
            cipher.decrypt(&mut b[cur.off..cur.off + bytes], iv)?;
            cur.off += bytes;
            let n = u64::try_from(avail).unwrap_or(u64::MAX);
            iv = iv.wrapping_add(n.wrapping_mul(step));
            units_left -= n;
        } else {
            let mut tmp = [0u8; luks2::unit::MAX_UNIT];
            let tmp = &mut tmp[..unit];
            let start = cur;
            gather(bufs, &mut cur, tmp);
            cipher.decrypt(tmp, iv)?;
            let mut back = start;
            scatter(bufs, &mut back, tmp);
            tmp.zeroize();
            iv = iv.wrapping_add(step);
            units_left -= 1;
        }
    }
    Ok(())
}

/// Encrypts whole encryption sectors of `bufs` from `cur` into `dst` (a multiple of the
/// cipher's sector size long), the first with IV sector `iv`.
pub(crate) fn encrypt_from_iovecs(
    cipher: &DiskCipher,
    bufs: &[IoSlice<'_>],
    cur: &mut Cursor,
    dst: &mut [u8],
    iv: u64,
) -> Result<()> {
    cur.skip_empty(bufs);
    if let Some(b) = bufs.get(cur.idx) {
        if b.len() - cur.off >= dst.len() {
            // Contiguous in one buffer: encrypt straight from the caller's memory.
            cipher.encrypt_to(&b[cur.off..cur.off + dst.len()], dst, iv)?;
            cur.off += dst.len();
            return Ok(());
        }
    }
    gather(bufs, cur, dst);
    cipher.encrypt(dst, iv)?;
    Ok(())
}

/// The header of a raw LUKS image, by version.
#[derive(Clone, Debug)]
pub enum LuksHeaders {
    V1(Box<LuksHeader>),
    V2(Box<Luks2Header>),
}

/// A raw LUKS1 or LUKS2 image.
pub struct LuksImage {
    storage: Box<dyn Storage>,
    cipher: DiskCipher,
    header: LuksHeaders,
    payload: u64,
    /// IV sector of guest offset 0 (LUKS2 iv_tweak).
    iv_base: u64,
    /// Changes only on live resize.
    capacity: std::sync::atomic::AtomicU64,
    read_only: bool,
}

impl LuksImage {
    /// Unlocks and opens a raw LUKS1 or LUKS2 image. A wrong passphrase or a malformed header
    /// is an error and nothing is written.
    pub fn open(storage: Box<dyn Storage>, read_only: bool, pass: &Passphrase) -> Result<Self> {
        if luks2::luks_version(storage.as_ref())? == Some(2) {
            let vol = Luks2Volume::unlock(storage.as_ref(), pass).map_err(LuksError::from)?;
            return Self::from_luks2(storage, read_only, &vol);
        }
        let area = LuksArea::whole(storage.as_ref())?;
        let vol = LuksVolume::unlock(&area, pass)?;
        Self::from_volume(storage, read_only, &vol)
    }

    fn from_volume(storage: Box<dyn Storage>, read_only: bool, vol: &LuksVolume) -> Result<Self> {
        let header = vol.header().clone();
        let payload = header.payload_offset_bytes();
        let capacity = storage.len()?.saturating_sub(payload) & !(SECTOR - 1);
        Ok(Self {
            cipher: DiskCipher::from_sector(vol.cipher()?),
            storage,
            header: LuksHeaders::V1(Box::new(header)),
            payload,
            iv_base: 0,
            capacity: std::sync::atomic::AtomicU64::new(capacity),
            read_only,
        })
    }

    fn from_luks2(storage: Box<dyn Storage>, read_only: bool, vol: &Luks2Volume) -> Result<Self> {
        let header = vol.header().clone();
        let seg = &header.meta.segment;
        let unit = u64::from(seg.sector_size);
        let avail = match seg.size {
            Some(size) => size,
            None => storage.len()?.saturating_sub(seg.offset),
        };
        Ok(Self {
            cipher: vol.cipher().map_err(LuksError::from)?,
            storage,
            payload: seg.offset,
            iv_base: seg.iv_tweak,
            capacity: std::sync::atomic::AtomicU64::new(avail / unit * unit),
            header: LuksHeaders::V2(Box::new(header)),
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
        let storage = crate::rbd::create_new(path)?; // a file, or an rbd: image
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
            let area = LuksArea::whole(&*storage)?;
            luks::create::format(&area, params, pass)?
        };
        storage.sync()?;
        Self::from_volume(storage, false, &vol)
    }

    /// Creates a raw LUKS2 file of `size` guest bytes at `path` with cryptsetup's default layout
    /// (data at 16 MiB) and opens it.
    pub fn create_luks2(
        path: &Path,
        size: u64,
        params: &luks2::Luks2CreateParams,
        pass: &Passphrase,
    ) -> Result<Self> {
        let storage = crate::rbd::create_new(path)?; // a file, or an rbd: image
        let total = size
            .checked_next_multiple_of(SECTOR)
            .and_then(|s| s.checked_add(luks2::create::DEFAULT_DATA_OFFSET))
            .ok_or(ImageError::OutOfRange {
                offset: luks2::create::DEFAULT_DATA_OFFSET,
                len: size,
                capacity: u64::MAX,
            })?;
        storage.set_len(total)?;
        let vol = luks2::create::format(storage.as_ref(), params, pass).map_err(LuksError::from)?;
        storage.sync()?;
        Self::from_luks2(storage, false, &vol)
    }

    /// The LUKS1 header (None for LUKS2).
    pub fn header(&self) -> Option<&LuksHeader> {
        match &self.header {
            LuksHeaders::V1(h) => Some(h),
            LuksHeaders::V2(_) => None,
        }
    }

    /// The header, by version.
    pub fn headers(&self) -> &LuksHeaders {
        &self.header
    }

    /// The data cipher.
    pub fn cipher(&self) -> &DiskCipher {
        &self.cipher
    }

    /// IV sector of the payload byte at `offset`.
    fn iv(&self, offset: u64) -> u64 {
        self.iv_base.wrapping_add(offset / SECTOR)
    }

    /// Refuses a request not aligned to an encryption sector larger than 512 bytes (there is no
    /// read-modify-write for those).
    fn check_unit(&self, offset: u64, len: u64) -> Result<()> {
        let unit = self.cipher.unit() as u64;
        if unit > SECTOR && (!offset.is_multiple_of(unit) || !len.is_multiple_of(unit)) {
            return Err(LuksError::Unaligned { offset, len, unit }.into());
        }
        Ok(())
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
                self.cipher.decrypt(b, self.iv(start))?;
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
                self.cipher.decrypt(b, self.iv(start))?;
                gather(bufs, &mut inp, &mut b[lead..lead + want]);
                self.cipher.encrypt(b, self.iv(start))?;
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
        self.capacity.load(std::sync::atomic::Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn min_block_size(&self) -> u32 {
        u32::try_from(self.cipher.unit()).unwrap_or(u32::MAX)
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len(bufs);
        check_range(offset, len, self.capacity())?;
        self.check_unit(offset, len)?;
        if !Self::aligned(offset, len) {
            return self.read_unaligned(offset, bufs);
        }
        self.storage.readv_at(bufs, self.payload + offset)?;
        decrypt_iovecs(&self.cipher, bufs, self.iv(offset))
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let len = iov_len(bufs);
        check_range(offset, len, self.capacity())?;
        self.check_unit(offset, len)?;
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
                encrypt_from_iovecs(&self.cipher, bufs, &mut cur, b, self.iv(pos))?;
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
        check_range(offset, len, self.capacity())?;
        self.check_unit(offset, len)
    }

    /// Writes encrypted zeroes (a hole would not read back as zeroes through the cipher).
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity())?;
        self.check_unit(offset, len)?;
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(BOUNCE_MAX as u64);
            let chunk_us = usize::try_from(chunk).unwrap_or(BOUNCE_MAX);
            let pos = offset + done;
            if Self::aligned(pos, chunk) {
                with_bounce(chunk_us, |b| -> Result<()> {
                    b.fill(0);
                    self.cipher.encrypt(b, self.iv(pos))?;
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

    fn resize(&self, new_size: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let old = self.capacity();
        if let LuksHeaders::V2(h) = &self.header {
            // A fixed-size LUKS2 segment would need its metadata rewritten: not supported.
            if h.meta.segment.size.is_some() {
                return Err(ImageError::Unsupported);
            }
        }
        self.check_unit(new_size, 0)?;
        let file_len = self
            .payload
            .checked_add(new_size)
            .filter(|_| new_size.is_multiple_of(SECTOR))
            .ok_or(ImageError::OutOfRange {
                offset: new_size,
                len: 0,
                capacity: old,
            })?;
        // As QEMU's luks driver: the payload grows or shrinks; new sectors read as whatever
        // decrypting zeroes gives.
        if new_size < old {
            self.capacity.store(new_size, Ordering::Release);
            self.storage.set_len(file_len)?;
        } else {
            self.storage.set_len(file_len)?;
            self.capacity.store(new_size, Ordering::Release);
        }
        self.storage.sync()?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "luks_tests.rs"]
mod tests;
