//! Positioned file I/O: the bottom layer.
//!
//! Everything above this module addresses bytes of a backing store by absolute offset. Reads that
//! run past the end of the file return zeroes for the missing part (a qcow2 file may legitimately
//! end inside its last allocated cluster), writes extend the file.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use thiserror::Error;

mod direct;
mod uring;

use direct::Direct;
pub use direct::{AlignedBuf, DirectAlign};
pub use uring::{with_thread_engine, UringEngine, UringOp};

/// The I/O engine of [`FileStorage`] (QEMU's `aio=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aio {
    /// `preadv`/`pwritev` on the calling (worker) thread.
    #[default]
    Threads,
    /// io_uring, one ring per worker thread ([`UringEngine`]).
    IoUring,
}

impl Aio {
    /// Parses `threads` or `io_uring`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "threads" => Some(Aio::Threads),
            "io_uring" => Some(Aio::IoUring),
            _ => None,
        }
    }
}

static DEFAULT_AIO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the engine of every [`FileStorage`] opened from now on (`serve --aio`, set once at
/// start-up before any image is opened).
pub fn set_default_aio(aio: Aio) {
    DEFAULT_AIO.store(aio == Aio::IoUring, std::sync::atomic::Ordering::Relaxed);
}

fn default_aio() -> Aio {
    if DEFAULT_AIO.load(std::sync::atomic::Ordering::Relaxed) {
        Aio::IoUring
    } else {
        Aio::Threads
    }
}

/// Errors of the storage layer.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("read of {len} bytes at offset {offset} failed")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("write of {len} bytes at offset {offset} failed")]
    Write {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("flush failed")]
    Flush(#[source] io::Error),
    #[error("cannot size the file")]
    Size(#[source] io::Error),
    #[error("cannot deallocate {len} bytes at offset {offset}")]
    Discard {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("offset {offset} + length {len} overflows")]
    Overflow { offset: u64, len: u64 },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, StorageError>;

/// Positioned I/O on a backing store. Implementations are shared between worker threads.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Fills `buf` from `offset`; the part past the end of the store reads as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`, extending the store if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Scatter read: fills every buffer in turn from `offset`; past the end reads as zeroes.
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()>;
    /// Gather write of every buffer in turn from `offset`.
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()>;
    /// Truncates or extends the store.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes everything written so far durable (data and the metadata needed to read it).
    fn sync(&self) -> Result<()>;
    /// Deallocates a range; it reads as zeroes afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes a range read as zeroes, keeping it allocated where the store can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
}

/// A [`Storage`] over a regular file (or block device).
///
/// Opened with O_DIRECT ([`OpenFlags::direct`], [`FileStorage::set_direct`]) it still accepts any
/// offset, length and buffer: aligned requests go to the kernel zero-copy, the rest through
/// aligned bounce buffers with read-modify-write serialized per block (see `storage/direct.rs`).
pub struct FileStorage {
    file: File,
    path: String,
    direct: Option<Direct>,
    aio: Aio,
}

/// How to open a [`FileStorage`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenFlags {
    /// Open read-only.
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
}

impl FileStorage {
    /// Opens an existing file.
    pub fn open(path: &Path, flags: OpenFlags) -> Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!flags.read_only);
        if flags.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|source| StorageError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let direct = flags.direct.then(|| Direct::new(&file));
        Ok(Self {
            file,
            path: path.display().to_string(),
            direct,
            aio: default_aio(),
        })
    }

    /// Turns O_DIRECT on or off on the open file (`fcntl(F_SETFL)`), e.g. after probing a
    /// format through the page cache.
    pub fn set_direct(&mut self, on: bool) -> Result<()> {
        let fd = self.file.as_raw_fd();
        let err = |source| StorageError::Open {
            path: self.path.clone(),
            source,
        };
        // SAFETY: F_GETFL takes no argument and only reads the fd's flags.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let fl = if on {
            fl | libc::O_DIRECT
        } else {
            fl & !libc::O_DIRECT
        };
        // SAFETY: F_SETFL takes an int of flags; the fd is owned by self.file.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, fl) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        self.direct = on.then(|| Direct::new(&self.file));
        Ok(())
    }

    /// Chooses the I/O engine for this file.
    pub fn set_aio(&mut self, aio: Aio) {
        self.aio = aio;
    }

    /// The I/O engine in use.
    pub fn aio(&self) -> Aio {
        self.aio
    }

    /// One vectored read through the engine; the byte count may be short.
    fn io_readv(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        match self.aio {
            Aio::Threads => preadv(&self.file, bufs, offset),
            Aio::IoUring => with_thread_engine(|e| {
                let mut ops = [UringOp::Readv { bufs, offset }];
                e.run(self.file.as_raw_fd(), &mut ops).remove(0)
            })?,
        }
    }

    /// One vectored write through the engine; the byte count may be short.
    fn io_writev(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        match self.aio {
            Aio::Threads => pwritev(&self.file, bufs, offset),
            Aio::IoUring => with_thread_engine(|e| {
                let mut ops = [UringOp::Writev { bufs, offset }];
                e.run(self.file.as_raw_fd(), &mut ops).remove(0)
            })?,
        }
    }

    /// The O_DIRECT alignment rules, when the file is open with O_DIRECT.
    pub fn direct_align(&self) -> Option<DirectAlign> {
        self.direct.as_ref().map(|d| d.align)
    }

    /// Creates a new file (fails if it exists).
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| StorageError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.display().to_string(),
            direct: None,
            aio: default_aio(),
        })
    }

    /// Wraps an already opened file (opened without O_DIRECT).
    pub fn from_file(file: File, path: String) -> Self {
        Self {
            file,
            path,
            direct: None,
            aio: default_aio(),
        }
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let l =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn end_of(offset: u64, len: usize) -> Result<u64> {
    let l = u64::try_from(len).map_err(|_| StorageError::Overflow {
        offset,
        len: u64::MAX,
    })?;
    offset
        .checked_add(l)
        .ok_or(StorageError::Overflow { offset, len: l })
}

fn total_len<T: std::ops::Deref<Target = [u8]>>(bufs: &[T]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

impl Storage for FileStorage {
    fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(StorageError::Size)
            .and_then(|l| {
                if l == 0 {
                    // Block devices report 0 in metadata; ask the kernel for the device size.
                    use std::io::Seek;
                    let mut f = &self.file;
                    f.seek(io::SeekFrom::End(0)).map_err(StorageError::Size)
                } else {
                    Ok(l)
                }
            })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut bufs = [IoSliceMut::new(buf)];
        self.readv_at(&mut bufs, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        end_of(offset, buf.len())?;
        if self.direct.is_some() {
            return self.writev_at(&[IoSlice::new(buf)], offset);
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| StorageError::Write {
                offset,
                len: buf.len(),
                source,
            })
    }

    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total = total_len(bufs);
        end_of(offset, total)?;
        let err = |pos: u64| {
            move |source| StorageError::Read {
                offset: pos,
                len: total,
                source,
            }
        };
        if let Some(d) = &self.direct {
            let segs = bufs.iter().map(|b| (b.as_ptr().addr(), b.len()));
            let first = if total > 0 && d.align.allows(offset, segs) {
                match self.io_readv(bufs, offset) {
                    Ok(n) => n,
                    // The kernel's rules are stricter than it said: bounce the whole request.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => 0,
                    Err(e) => return Err(err(offset)(e)),
                }
            } else {
                0
            };
            if first == total {
                return Ok(());
            }
            let pos = end_of(offset, first)?;
            return d
                .read_bounced(&self.file, bufs, first, pos)
                .map_err(err(pos));
        }
        // Fast path: one preadv for the whole request, the caller's iovec array left untouched.
        let first = if total == 0 {
            0
        } else {
            self.io_readv(bufs, offset).map_err(err(offset))?
        };
        if first == total {
            return Ok(());
        }
        // Slow path (short read, end of file, more than IOV_MAX buffers): finish buffer by
        // buffer, without allocating and without advancing the caller's iovecs (callers such as
        // the decryption layer walk the same buffers again afterwards).
        let mut skip = first;
        let mut pos = end_of(offset, first)?;
        let mut eof = false;
        for b in bufs.iter_mut() {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            let mut rest: &mut [u8] = &mut b[skip..];
            skip = 0;
            while !rest.is_empty() {
                if eof {
                    rest.fill(0);
                    break;
                }
                let n = pread(&self.file, rest, pos).map_err(err(pos))?;
                if n == 0 {
                    eof = true;
                    continue;
                }
                pos = end_of(pos, n)?;
                rest = &mut rest[n..];
            }
        }
        Ok(())
    }

    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let total = total_len(bufs);
        end_of(offset, total)?;
        let err = |pos: u64| {
            move |source| StorageError::Write {
                offset: pos,
                len: total,
                source,
            }
        };
        if let Some(d) = &self.direct {
            let _range = d.lock_write(offset, total as u64).map_err(err(offset))?;
            let segs = bufs.iter().map(|b| (b.as_ptr().addr(), b.len()));
            let first = if total > 0 && d.align.allows(offset, segs) {
                match self.io_writev(bufs, offset) {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => 0,
                    Err(e) => return Err(err(offset)(e)),
                }
            } else {
                0
            };
            if first == total {
                return Ok(());
            }
            let pos = end_of(offset, first)?;
            return d
                .write_bounced(&self.file, bufs, first, pos)
                .map_err(err(pos));
        }
        let first = if total == 0 {
            0
        } else {
            self.io_writev(bufs, offset).map_err(err(offset))?
        };
        if first == total {
            return Ok(());
        }
        // Slow path (short write, more than IOV_MAX buffers): the rest buffer by buffer.
        let mut skip = first;
        let mut pos = end_of(offset, first)?;
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            let rest = &b[skip..];
            skip = 0;
            self.file.write_all_at(rest, pos).map_err(err(pos))?;
            pos = end_of(pos, rest.len())?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(StorageError::Size)
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(StorageError::Flush)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        offset
            .checked_add(len)
            .ok_or(StorageError::Overflow { offset, len })?;
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zeroes(offset, len),
            Err(source) => Err(StorageError::Discard {
                offset,
                len,
                source,
            }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or(StorageError::Overflow { offset, len })?;
        if self
            .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
            .is_ok()
        {
            return Ok(());
        }
        // Fallback: write zeroes in bounded chunks.
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; usize::try_from(CHUNK.min(len)).unwrap_or(0)];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(CHUNK);
            let n = usize::try_from(n).map_err(|_| StorageError::Overflow { offset, len })?;
            self.write_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

fn pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    loop {
        match file.read_at(buf, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn preadv(file: &File, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let cnt = libc::c_int::try_from(bufs.len().min(1024)).unwrap_or(1024);
    loop {
        // SAFETY: IoSliceMut is ABI-compatible with struct iovec; each entry describes memory
        // that is valid for writes for the lifetime of `bufs`, and `cnt` does not exceed its length.
        let r = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                bufs.as_mut_ptr().cast::<libc::iovec>(),
                cnt,
                off,
            )
        };
        if r >= 0 {
            return usize::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EIO));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn pwritev(file: &File, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let cnt = libc::c_int::try_from(bufs.len().min(1024)).unwrap_or(1024);
    loop {
        // SAFETY: IoSlice is ABI-compatible with struct iovec; each entry describes memory valid
        // for reads for the lifetime of `bufs`, and `cnt` does not exceed its length.
        let r = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                cnt,
                off,
            )
        };
        if r >= 0 {
            return usize::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EIO));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// An in-memory [`Storage`] for tests.
#[derive(Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
}

impl MemStorage {
    /// A store holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data: Mutex::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another test thread panicked; the bytes are still valid.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(offset: u64, len: usize) -> Result<(usize, usize)> {
        let end = end_of(offset, len)?;
        let s = usize::try_from(offset).map_err(|_| StorageError::Overflow { offset, len: 0 })?;
        let e = usize::try_from(end).map_err(|_| StorageError::Overflow { offset, len: 0 })?;
        Ok((s, e))
    }
}

impl Storage for MemStorage {
    fn len(&self) -> Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let (s, e) = Self::range(offset, buf.len())?;
        let d = self.lock();
        buf.fill(0);
        if s < d.len() {
            let avail = e.min(d.len());
            buf[..avail - s].copy_from_slice(&d[s..avail]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let (s, e) = Self::range(offset, buf.len())?;
        let mut d = self.lock();
        if d.len() < e {
            d.resize(e, 0);
        }
        d[s..e].copy_from_slice(buf);
        Ok(())
    }

    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let mut pos = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, pos)?;
            pos = end_of(pos, b.len())?;
        }
        Ok(())
    }

    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let mut pos = offset;
        for b in bufs {
            self.write_at(b, pos)?;
            pos = end_of(pos, b.len())?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let l = usize::try_from(len).map_err(|_| StorageError::Overflow { offset: 0, len })?;
        self.lock().resize(l, 0);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let l = usize::try_from(len).map_err(|_| StorageError::Overflow { offset, len })?;
        let (s, e) = Self::range(offset, l)?;
        let mut d = self.lock();
        let e = e.min(d.len());
        if s < e {
            d[s..e].fill(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_read_past_eof_is_zero_filled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, [7u8; 10]).expect("write");
        let s = FileStorage::open(&p, OpenFlags::default()).expect("open");
        let mut a = [1u8; 6];
        let mut b = [1u8; 8];
        s.readv_at(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)], 4)
            .expect("read");
        assert_eq!(a, [7u8; 6]);
        assert_eq!(b, [0u8; 8]);
    }

    #[test]
    fn file_writev_then_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).expect("create");
        s.writev_at(
            &[
                IoSlice::new(b"abc"),
                IoSlice::new(b""),
                IoSlice::new(b"def"),
            ],
            5,
        )
        .expect("write");
        assert_eq!(s.len().expect("len"), 11);
        let mut buf = [9u8; 11];
        s.read_at(&mut buf, 0).expect("read");
        assert_eq!(&buf, b"\0\0\0\0\0abcdef");
        s.write_zeroes(6, 2).expect("zero");
        s.read_at(&mut buf, 0).expect("read");
        assert_eq!(&buf, b"\0\0\0\0\0a\0\0def");
    }

    #[test]
    fn readv_past_eof_leaves_the_callers_iovecs_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, [7u8; 700]).expect("write");
        let s = FileStorage::open(&p, OpenFlags::default()).expect("open");
        let mut a = [1u8; 512];
        let mut b = [1u8; 512];
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        s.readv_at(&mut bufs, 0).expect("read");
        assert_eq!(bufs[0].len(), 512);
        assert_eq!(bufs[1].len(), 512);
        assert_eq!(&bufs[1][..188], &[7u8; 188][..]);
        assert_eq!(&bufs[1][188..], &[0u8; 324][..]);
    }

    #[test]
    fn more_buffers_than_iov_max_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).expect("create");
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<IoSlice<'_>> = data.chunks(2).map(IoSlice::new).collect();
        s.writev_at(&chunks, 3).expect("write");
        let mut out = vec![0u8; 3000];
        let mut bufs: Vec<IoSliceMut<'_>> = out.chunks_mut(2).map(IoSliceMut::new).collect();
        s.readv_at(&mut bufs, 3).expect("read");
        drop(bufs);
        assert_eq!(out, data);
    }

    /// A file on disk (/tmp, not tmpfs) opened with O_DIRECT and a forced 4 KiB alignment, so
    /// that every sub-4K request takes the bounce path even where the disk accepts 512.
    fn direct_file(len: usize) -> (tempfile::TempDir, FileStorage) {
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0xEEu8; len]).expect("write");
        let mut s = FileStorage::open(
            &p,
            OpenFlags {
                read_only: false,
                direct: true,
            },
        )
        .expect("open O_DIRECT");
        if let Some(d) = s.direct.as_mut() {
            d.align = DirectAlign {
                mem: 4096,
                offset: 4096,
            };
        }
        (dir, s)
    }

    #[test]
    fn direct_io_at_any_offset_length_and_address_matches_the_page_cache_model() {
        use rand::{Rng, SeedableRng};
        let (_dir, s) = direct_file(100_000);
        assert!(s.direct_align().is_some());
        let model = MemStorage::new(vec![0xEEu8; 100_000]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Aligned buffers from here make some requests zero-copy, the rest bounce.
        let mut aligned = AlignedBuf::new(64 * 1024, 4096).expect("alloc");
        for i in 0..300 {
            let len = if i % 3 == 0 {
                4096 * rng.random_range(1..8)
            } else {
                rng.random_range(1..20_000)
            };
            let off = if i % 3 == 0 {
                4096 * rng.random_range(0..30u64)
            } else {
                rng.random_range(0..110_000u64)
            };
            let a = aligned.as_mut_slice();
            rng.fill(&mut a[..len]);
            // Split into two segments, sometimes at an unaligned point.
            let cut = if i % 2 == 0 {
                len / 4096 * 4096 / 2
            } else {
                len / 3
            };
            let (x, y) = a[..len].split_at(cut);
            s.writev_at(&[IoSlice::new(x), IoSlice::new(y)], off)
                .expect("direct write");
            model.write_at(&a[..len], off).expect("model write");
            let roff = rng.random_range(0..120_000u64);
            let rlen = rng.random_range(1..30_000);
            let mut got = vec![0u8; rlen];
            let mut want = vec![0u8; rlen];
            s.read_at(&mut got, roff).expect("direct read");
            model.read_at(&mut want, roff).expect("model read");
            assert!(
                got == want,
                "read {rlen} at {roff} after write {len} at {off}"
            );
        }
        let n = usize::try_from(model.len().expect("len")).expect("len");
        let mut all = vec![0u8; n];
        s.read_at(&mut all, 0).expect("read all");
        assert!(all == model.contents());
    }

    #[test]
    fn io_uring_engine_round_trips_buffered_and_direct() {
        for direct in [false, true] {
            let (_dir, mut s) = direct_file(100_000);
            if !direct {
                s.set_direct(false).expect("O_DIRECT off");
            }
            s.set_aio(Aio::IoUring);
            let model = MemStorage::new(vec![0xEEu8; 100_000]);
            for (i, (off, len)) in [
                (0u64, 4096usize),
                (4096, 65536),
                (1000, 3000),
                (99_000, 9000),
            ]
            .into_iter()
            .enumerate()
            {
                let data = vec![u8::try_from(i + 1).expect("byte"); len];
                s.write_at(&data, off).expect("write");
                model.write_at(&data, off).expect("model");
            }
            let mut got = vec![0u8; 120_000];
            let mut want = vec![0u8; 120_000];
            s.read_at(&mut got, 0).expect("read");
            model.read_at(&mut want, 0).expect("model read");
            assert!(got == want, "direct={direct}");
        }
    }

    #[test]
    fn concurrent_sub_block_writes_to_one_block_lose_nothing() {
        // Two threads write interleaved 16-byte slots of the same 4 KiB blocks: each write is a
        // read-modify-write, and without serialization one would undo the other's slots.
        let (_dir, s) = direct_file(8192);
        let s = std::sync::Arc::new(s);
        let threads: Vec<_> = (0..2u8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for round in 0..40u8 {
                        for slot in (usize::from(t)..512).step_by(2) {
                            s.write_at(&[round ^ t; 16], (slot * 16) as u64)
                                .expect("write");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        let mut all = vec![0u8; 8192];
        s.read_at(&mut all, 0).expect("read");
        for (slot, b) in all.chunks(16).enumerate() {
            let t = u8::try_from(slot % 2).expect("0 or 1");
            assert_eq!(b, &[39 ^ t; 16][..], "slot {slot}");
        }
    }

    #[test]
    fn overflowing_offset_is_an_error() {
        let s = MemStorage::default();
        assert!(matches!(
            s.write_at(b"xx", u64::MAX),
            Err(StorageError::Overflow { .. })
        ));
    }
}
