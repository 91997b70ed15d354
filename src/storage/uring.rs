//! The io_uring engine (`--aio io_uring`): positioned vectored I/O submitted in batches.
//!
//! [`UringEngine::run`] takes a whole batch of reads and writes (for instance every data
//! request popped from a ring after one kick), queues them all, enters the kernel once to submit
//! them and wait, and returns one result per operation: one `io_uring_enter` for the batch
//! instead of one `preadv`/`pwritev` per request. Batches larger than the ring are done in
//! ring-sized steps.
//!
//! An engine belongs to one thread (the queue worker); [`with_thread_engine`] gives each thread
//! its own, created on first use, which is what [`super::FileStorage`] uses for its single
//! requests today.
//!
//! Syscalls: `io_uring_setup` (once per thread), `io_uring_enter` (per batch), `mmap`/`munmap`
//! of the rings; no `io_uring_register`.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::io::RawFd;

use io_uring::{opcode, types, IoUring};

/// Submission queue entries per engine (the most one `run` step submits).
pub const RING_ENTRIES: u32 = 128;

/// One operation of a batch. The buffers are borrowed for the duration of [`UringEngine::run`],
/// which waits for every operation it submitted before it returns.
pub enum UringOp<'a, 'b> {
    /// Vectored read at a file offset.
    Readv {
        /// Destination buffers (filled in order).
        bufs: &'a mut [IoSliceMut<'b>],
        /// File offset.
        offset: u64,
    },
    /// Vectored write at a file offset.
    Writev {
        /// Source buffers (written in order).
        bufs: &'a [IoSlice<'b>],
        /// File offset.
        offset: u64,
    },
}

/// An io_uring instance owned by one thread.
pub struct UringEngine {
    ring: IoUring,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine").finish_non_exhaustive()
    }
}

impl UringEngine {
    /// A ring of `RING_ENTRIES` (128) entries.
    pub fn new() -> io::Result<Self> {
        Ok(UringEngine {
            ring: IoUring::new(RING_ENTRIES)?,
        })
    }

    /// Runs every operation of `ops` on `fd`: one submission and one wait per ring-sized step.
    /// `results[i]` is the byte count (possibly short) or the error of `ops[i]`.
    pub fn run(&mut self, fd: RawFd, ops: &mut [UringOp<'_, '_>]) -> Vec<io::Result<usize>> {
        let mut results: Vec<io::Result<usize>> = Vec::with_capacity(ops.len());
        for step in ops.chunks_mut(RING_ENTRIES as usize) {
            let base = results.len();
            results.extend(
                step.iter()
                    .map(|_| Err(io::Error::from_raw_os_error(libc::EIO))),
            );
            let submitted = self.submit_step(fd, step, base);
            let mut pending = submitted;
            // Every submitted entry must complete before its buffers are released.
            while pending > 0 {
                match self.ring.submit_and_wait(pending) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        // Cannot wait: the kernel may still use the buffers. There is no safe
                        // way on; stop the process rather than hand them back.
                        log::error!("io_uring wait failed with {pending} in flight: {e}");
                        std::process::abort();
                    }
                }
                for cqe in self.ring.completion() {
                    let Ok(i) = usize::try_from(cqe.user_data()) else {
                        continue;
                    };
                    let r = cqe.result();
                    if let Some(slot) = results.get_mut(i) {
                        *slot = if r < 0 {
                            Err(io::Error::from_raw_os_error(-r))
                        } else {
                            usize::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EIO))
                        };
                    }
                    pending -= 1;
                }
            }
            for slot in &mut results[base + submitted..] {
                *slot = Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
        }
        results
    }

    /// Queues the operations of one step (at most the ring size); returns how many were queued.
    /// They are submitted by the caller's `submit_and_wait`.
    fn submit_step(&mut self, fd: RawFd, step: &mut [UringOp<'_, '_>], base: usize) -> usize {
        let mut queued = 0;
        let mut sq = self.ring.submission();
        for (i, op) in step.iter_mut().enumerate() {
            let entry = match op {
                UringOp::Readv { bufs, offset } => {
                    let n = u32::try_from(bufs.len().min(1024)).unwrap_or(1024);
                    opcode::Readv::new(types::Fd(fd), bufs.as_mut_ptr().cast::<libc::iovec>(), n)
                        .offset(*offset)
                        .build()
                }
                UringOp::Writev { bufs, offset } => {
                    let n = u32::try_from(bufs.len().min(1024)).unwrap_or(1024);
                    opcode::Writev::new(types::Fd(fd), bufs.as_ptr().cast::<libc::iovec>(), n)
                        .offset(*offset)
                        .build()
                }
            };
            let entry = entry.user_data((base + i) as u64);
            // SAFETY: the iovec arrays and the memory they describe are borrowed from `ops` for
            // the whole of `run`, which does not return before every queued entry completed;
            // IoSlice/IoSliceMut are ABI-compatible with struct iovec.
            if unsafe { sq.push(&entry) }.is_err() {
                break;
            }
            queued += 1;
        }
        sq.sync();
        queued
    }
}

thread_local! {
    static ENGINE: RefCell<Option<UringEngine>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's engine, creating it on first use.
pub fn with_thread_engine<T>(f: impl FnOnce(&mut UringEngine) -> T) -> io::Result<T> {
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(UringEngine::new()?);
        }
        match slot.as_mut() {
            Some(engine) => Ok(f(engine)),
            None => Err(io::Error::from_raw_os_error(libc::ENODEV)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn one_batch_of_mixed_reads_and_writes_runs_in_order_of_results() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 1 << 20]).expect("write");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .expect("open");
        let mut e = UringEngine::new().expect("io_uring_setup");
        // 300 writes (more than one ring's worth) of distinct blocks, two segments each.
        let data: Vec<Vec<u8>> = (0..300u32)
            .map(|i| vec![u8::try_from(i % 251).expect("byte"); 2048])
            .collect();
        let iovs: Vec<[IoSlice<'_>; 2]> = data
            .iter()
            .map(|d| [IoSlice::new(&d[..1000]), IoSlice::new(&d[1000..])])
            .collect();
        let mut ops: Vec<UringOp<'_, '_>> = iovs
            .iter()
            .zip(0u64..)
            .map(|(b, i)| UringOp::Writev {
                bufs: b,
                offset: i * 2048,
            })
            .collect();
        let r = e.run(f.as_raw_fd(), &mut ops);
        assert!(r.iter().all(|x| matches!(x, Ok(2048))), "{r:?}");
        let mut back = vec![0u8; 300 * 2048];
        f.read_exact_at(&mut back, 0).expect("read");
        for (i, c) in back.chunks(2048).enumerate() {
            assert!(c == &data[i][..], "block {i}");
        }
        // Reads, one of them past the end of the file (short).
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let mut ba = [IoSliceMut::new(&mut a)];
        let mut bb = [IoSliceMut::new(&mut b)];
        let mut ops = [
            UringOp::Readv {
                bufs: &mut ba,
                offset: 2048,
            },
            UringOp::Readv {
                bufs: &mut bb,
                offset: (1 << 20) - 100,
            },
        ];
        let r = e.run(f.as_raw_fd(), &mut ops);
        assert!(matches!(r[0], Ok(4096)), "{:?}", r[0]);
        assert!(matches!(r[1], Ok(100)), "{:?}", r[1]);
        assert_eq!(&a[..2048], &data[1][..]);
        assert_eq!(&a[2048..], &data[2][..]);
        // An invalid fd is an error result, not a panic.
        let mut c = vec![0u8; 16];
        let mut bc = [IoSliceMut::new(&mut c)];
        let r = e.run(
            -1,
            &mut [UringOp::Readv {
                bufs: &mut bc,
                offset: 0,
            }],
        );
        assert!(r[0].is_err());
    }
}
