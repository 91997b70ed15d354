//! O_DIRECT support for [`super::FileStorage`]: alignment discovery, aligned bounce buffers and
//! serialized read-modify-write.
//!
//! With O_DIRECT the kernel refuses (EINVAL) a request whose file offset or any iovec length is
//! not a multiple of the file's offset alignment, or whose buffer addresses are not multiples of
//! its memory alignment. The storage layer therefore splits every request in two ways:
//!
//! * aligned requests (the guest's data I/O, in practice: page-aligned buffers, sector-multiple
//!   lengths) go straight to the kernel from the caller's buffers, zero-copy;
//! * anything else (qcow2 metadata, LUKS headers, sub-block guest requests) goes through an
//!   aligned bounce buffer: reads read the covering aligned range and copy the wanted part out,
//!   writes read the partial first and last blocks, patch them and write the covering range.
//!
//! A read-modify-write is only correct if no other write to the same blocks lands between its
//! read and its write, so every write in direct mode (zero-copy or not) holds a [`RangeLock`] on
//! the aligned blocks it covers for its duration; writes to disjoint blocks never wait. Reads take
//! no lock: a read racing a write may see either data, as with any concurrent I/O.
//!
//! Alignment comes from `statx(STATX_DIOALIGN)` (Linux 6.1+), else `BLKSSZGET` on block devices,
//! else a probe as QEMU's `file-posix` does (the smallest read size O_DIRECT accepts), else 4096.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Condvar, Mutex};

/// Largest bounce buffer allocated for one step of a request (bigger requests are done in steps).
const BOUNCE_MAX: usize = 1 << 20;
/// Alignment assumed when the kernel does not say and probing fails.
const FALLBACK_ALIGN: usize = 4096;

/// Alignment rules of one file opened with O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlign {
    /// Required alignment of buffer addresses.
    pub mem: usize,
    /// Required alignment of file offsets and of every iovec length.
    pub offset: usize,
}

impl DirectAlign {
    /// Queries the kernel for `file` (opened with O_DIRECT), or probes.
    pub fn query(file: &File) -> Self {
        if let Some(a) = statx_dio_align(file) {
            return a;
        }
        if let Some(lbs) = block_size(file) {
            return DirectAlign {
                mem: lbs,
                offset: lbs,
            };
        }
        let offset = probe_offset_align(file).unwrap_or(FALLBACK_ALIGN);
        DirectAlign {
            // Probing the memory alignment as well is not worth its syscalls: the offset
            // alignment is always a valid (if conservative) memory alignment.
            mem: offset,
            offset,
        }
    }

    /// Alignment of bounce buffers: both rules and a whole page.
    fn buffer(self) -> usize {
        self.mem.max(self.offset).max(FALLBACK_ALIGN)
    }

    fn offset_u64(self) -> u64 {
        self.offset as u64
    }

    /// Whether a request can go to the kernel as it is.
    pub fn allows<'a>(
        self,
        offset: u64,
        segs: impl IntoIterator<Item = (usize, usize)> + 'a,
    ) -> bool {
        offset.is_multiple_of(self.offset_u64())
            && segs
                .into_iter()
                .all(|(addr, len)| addr.is_multiple_of(self.mem) && len.is_multiple_of(self.offset))
    }

    /// `[offset, offset + len)` widened to whole aligned blocks.
    fn widen(self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let a = self.offset_u64();
        let start = offset - offset % a;
        let end = offset.checked_add(len)?.checked_next_multiple_of(a)?;
        Some((start, end))
    }
}

fn statx_dio_align(file: &File) -> Option<DirectAlign> {
    // SAFETY: an all-zero statx is a valid value of the plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty NUL-terminated string used with AT_EMPTY_PATH on our own fd,
    // and `stx` is a valid, writable statx.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let mem = usize::try_from(stx.stx_dio_mem_align).ok()?;
    let offset = usize::try_from(stx.stx_dio_offset_align).ok()?;
    (mem.is_power_of_two() && offset.is_power_of_two()).then_some(DirectAlign { mem, offset })
}

fn block_size(file: &File) -> Option<usize> {
    use std::os::unix::fs::FileTypeExt;
    if !file.metadata().ok()?.file_type().is_block_device() {
        return None;
    }
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through a valid pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    let size = usize::try_from(size).ok()?;
    (r == 0 && size.is_power_of_two()).then_some(size)
}

/// The smallest read size (512 .. 4096) that O_DIRECT accepts at offset 0 into a page-aligned
/// buffer, as QEMU's `raw_probe_alignment` does. An empty file accepts every size: no answer.
fn probe_offset_align(file: &File) -> Option<usize> {
    let mut buf = AlignedBuf::new(FALLBACK_ALIGN, FALLBACK_ALIGN)?;
    for size in [512, 1024, 2048, 4096] {
        match file.read_at(&mut buf.as_mut_slice()[..size], 0) {
            Ok(0) => return None,
            Ok(_) => return Some(size),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// A heap buffer with a chosen alignment (std's `Vec` cannot promise one).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes aligned to `align` (a power of two); `None` if `len` is 0 or the
    /// allocation fails.
    pub fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len, align).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialized (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Byte ranges with a write in flight; a write waits while its range overlaps another.
#[derive(Default)]
pub struct RangeLock {
    busy: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

/// Holds `[start, end)` of a [`RangeLock`] until dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        // A poisoned lock only means another thread panicked; the list itself stays consistent.
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while busy.iter().any(|&(s, e)| s < end && start < e) {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.lock.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = busy.iter().position(|&r| r == self.range) {
            busy.swap_remove(i);
        }
        drop(busy);
        self.lock.freed.notify_all();
    }
}

/// Direct-I/O state of one open file.
pub struct Direct {
    /// The file's alignment rules.
    pub align: DirectAlign,
    rmw: RangeLock,
}

/// Reads until `buf` is full or the end of the file; returns the bytes read. A short read that
/// leaves the position off `align` is the end of the file (O_DIRECT would refuse to go on).
fn pread_full(file: &File, buf: &mut [u8], offset: u64, align: usize) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let pos = offset + done as u64;
        match file.read_at(&mut buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if !done.is_multiple_of(align) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Calls `f(segment)` for the sub-slices of `bufs` that cover bytes `skip .. skip + len` of the
/// concatenated buffers, in order.
fn for_each_seg<T: std::ops::Deref<Target = [u8]>>(
    bufs: &[T],
    mut skip: usize,
    mut len: usize,
    mut f: impl FnMut(usize, &[u8]),
) {
    let mut at = 0;
    for b in bufs {
        if len == 0 {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(len);
        f(at, &b[skip..skip + n]);
        at += n;
        len -= n;
        skip = 0;
    }
}

impl Direct {
    /// Direct-I/O state for `file`, opened with O_DIRECT.
    pub fn new(file: &File) -> Self {
        Direct {
            align: DirectAlign::query(file),
            rmw: RangeLock::default(),
        }
    }

    fn bounce(&self, len: usize) -> io::Result<AlignedBuf> {
        let len = len.min(BOUNCE_MAX);
        AlignedBuf::new(len.max(self.align.offset), self.align.buffer())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
    }

    /// The covering aligned range of a request: its start in the file, the request's offset
    /// from there, and the covering length.
    fn span(&self, offset: u64, total: usize) -> io::Result<(u64, usize, usize)> {
        let overflow = || io::Error::from_raw_os_error(libc::EOVERFLOW);
        let (start, end) = self
            .align
            .widen(offset, total as u64)
            .ok_or_else(overflow)?;
        let head = usize::try_from(offset - start).map_err(|_| overflow())?;
        let span = usize::try_from(end - start).map_err(|_| overflow())?;
        Ok((start, head, span))
    }

    /// Fills bytes `skip ..` of `bufs` (the rest of a request) from `offset` through a bounce
    /// buffer; past the end of the file reads as zeroes.
    pub fn read_bounced(
        &self,
        file: &File,
        bufs: &mut [IoSliceMut<'_>],
        skip: usize,
        offset: u64,
    ) -> io::Result<()> {
        let total = bufs.iter().map(|b| b.len()).sum::<usize>() - skip;
        let (start, head, span) = self.span(offset, total)?;
        let mut bounce = self.bounce(span)?;
        let step = bounce.as_slice().len();
        let mut eof = false;
        // Chunk-relative positions: byte p of the span is file byte start + p; the request is
        // bytes head .. head + total of it.
        for p in (0..span).step_by(step) {
            let n = (span - p).min(step);
            let chunk = &mut bounce.as_mut_slice()[..n];
            let got = if eof {
                0
            } else {
                pread_full(file, chunk, start + p as u64, self.align.offset)?
            };
            eof |= got < n;
            chunk[got..].fill(0);
            let (ws, we) = (p.max(head), (p + n).min(head + total));
            if ws >= we {
                continue;
            }
            let mut src = &chunk[ws - p..we - p];
            let mut dst_skip = skip + (ws - head);
            for b in bufs.iter_mut() {
                if src.is_empty() {
                    break;
                }
                if dst_skip >= b.len() {
                    dst_skip -= b.len();
                    continue;
                }
                let k = (b.len() - dst_skip).min(src.len());
                b[dst_skip..dst_skip + k].copy_from_slice(&src[..k]);
                src = &src[k..];
                dst_skip = 0;
            }
        }
        Ok(())
    }

    /// Locks the aligned blocks a write of `len` bytes at `offset` touches.
    pub fn lock_write(&self, offset: u64, len: u64) -> io::Result<RangeGuard<'_>> {
        let (start, end) = self
            .align
            .widen(offset, len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        Ok(self.rmw.lock(start, end))
    }

    /// Writes bytes `skip ..` of `bufs` at `offset` by read-modify-write of the covering aligned
    /// blocks. The caller holds [`Direct::lock_write`] for the whole request.
    pub fn write_bounced(
        &self,
        file: &File,
        bufs: &[IoSlice<'_>],
        skip: usize,
        offset: u64,
    ) -> io::Result<()> {
        let total = bufs.iter().map(|b| b.len()).sum::<usize>() - skip;
        let (start, head, span) = self.span(offset, total)?;
        let a = self.align.offset;
        let mut bounce = self.bounce(span)?;
        let step = bounce.as_slice().len();
        for p in (0..span).step_by(step) {
            let n = (span - p).min(step);
            let chunk = &mut bounce.as_mut_slice()[..n];
            let pos = start + p as u64;
            let (ws, we) = (p.max(head), (p + n).min(head + total));
            // Keep the bytes of the first and last block that the request does not cover.
            let partial_head = ws > p;
            if partial_head {
                let got = pread_full(file, &mut chunk[..a], pos, a)?;
                chunk[got..a].fill(0);
            }
            if we < p + n && !(partial_head && n == a) {
                let last = n - a;
                let got = pread_full(file, &mut chunk[last..], pos + last as u64, a)?;
                chunk[last + got..].fill(0);
            }
            let dst = &mut chunk[ws - p..we - p];
            for_each_seg(bufs, skip + (ws - head), dst.len(), |at, seg| {
                dst[at..at + seg.len()].copy_from_slice(seg);
            });
            file.write_all_at(chunk, pos)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_lock_lets_disjoint_ranges_through_and_serializes_overlaps() {
        let l = std::sync::Arc::new(RangeLock::default());
        let g = l.lock(0, 4096);
        let _h = l.lock(4096, 8192);
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            let _g = l2.lock(4000, 4100);
            tx.send(()).expect("send");
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        drop(g);
        drop(_h);
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("overlapping lock granted once the ranges are free");
        t.join().expect("join");
    }

    #[test]
    fn widen_rounds_out_to_blocks() {
        let a = DirectAlign {
            mem: 512,
            offset: 4096,
        };
        assert_eq!(a.widen(5000, 10), Some((4096, 8192)));
        assert_eq!(a.widen(4096, 4096), Some((4096, 8192)));
        assert_eq!(a.widen(u64::MAX - 10, 100), None);
        assert!(a.allows(8192, [(4096, 4096), (8192, 8192)]));
        assert!(!a.allows(8192, [(4096, 512)]));
        assert!(!a.allows(8192, [(4000, 4096)]));
        assert!(!a.allows(512, [(4096, 4096)]));
    }
}
