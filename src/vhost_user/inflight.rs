//! The shared in-flight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split rings only
//! (QEMU's docs/interop/vhost-user.rst, "Inflight I/O tracking").
//!
//! We allocate it (a memfd) on GET_INFLIGHT_FD; the frontend keeps the fd and hands it back with
//! SET_INFLIGHT_FD after we restart, so what we wrote into it survives a SIGKILL. Per queue:
//!
//! ```text
//! 0  u64 features (0)   8 u16 version (1)   10 u16 desc_num   12 u16 last_batch_head
//! 14 u16 used_idx       16 desc[desc_num]: u8 inflight, 5 pad, u16 next, u64 counter
//! ```
//!
//! - on fetch of head `i`: `desc[i].counter = counter++`, then `desc[i].inflight = 1`;
//! - before publishing head `i` in the used ring: `desc[i].next = last_batch_head`,
//!   `last_batch_head = i`; after bumping the used index: `desc[i].inflight = 0`,
//!   `used_idx = used->idx` (batches of one element: the used ring's index moves once per
//!   completion, so completions may come in any order);
//! - on start: if `used_idx != used->idx` we died between the two steps, so the
//!   `used->idx - used_idx` entries of the last batch list are clear; the entries still marked
//!   are resubmitted in counter order, and fetching from the avail ring resumes at
//!   `used->idx + in-flight count` (each fetched entry is either used or still in flight).
//!
//! The region's contents come from the frontend: every index read from it is bounds-checked,
//! and a region that does not fit the queue is reinitialised rather than trusted.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Bytes of the per-queue header.
const HEADER: usize = 16;
/// Bytes of one descriptor state.
const DESC: usize = 16;
/// Per-queue regions are aligned to this.
const ALIGN: usize = 64;
/// Region version we write.
const VERSION: u16 = 1;

/// Errors of the in-flight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("invalid in-flight geometry: {num_queues} queues of {queue_size}")]
    Geometry { num_queues: u16, queue_size: u16 },
    #[error("in-flight region of {got} bytes is smaller than the {need} needed")]
    TooSmall { got: u64, need: usize },
    #[error("cannot create the in-flight memfd")]
    Create(#[source] std::io::Error),
    #[error("cannot map the in-flight region")]
    Map(#[source] std::io::Error),
}

/// Bytes one queue of `queue_size` descriptors takes.
pub fn queue_region_size(queue_size: u16) -> usize {
    let raw = HEADER + DESC * usize::from(queue_size);
    raw.div_ceil(ALIGN) * ALIGN
}

/// A mapped in-flight region.
pub struct InflightRegion {
    ptr: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
    file: File,
}

// SAFETY: the mapping is plain shared memory; every access goes through raw-pointer volatile
// reads and writes of one queue's part, and each queue's part is used by one worker at a time.
unsafe impl Send for InflightRegion {}
// SAFETY: as above; `&InflightRegion` only hands out per-queue views.
unsafe impl Sync for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, unmapped once, here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn geometry(num_queues: u16, queue_size: u16, max_queues: u16) -> Result<usize, InflightError> {
    let bad = InflightError::Geometry {
        num_queues,
        queue_size,
    };
    if num_queues == 0
        || num_queues > max_queues
        || queue_size == 0
        || queue_size > crate::virtio_blk::device::MAX_QUEUE_SIZE
    {
        return Err(bad);
    }
    queue_region_size(queue_size)
        .checked_mul(usize::from(num_queues))
        .ok_or(bad)
}

impl InflightRegion {
    /// A new zeroed region in a fresh memfd (GET_INFLIGHT_FD).
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<Self, InflightError> {
        let len = geometry(num_queues, queue_size, max_queues)?;
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let raw =
            unsafe { libc::memfd_create(c"vhost-user-qcow2-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(InflightError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        file.set_len(
            u64::try_from(len).map_err(|_| InflightError::TooSmall { got: 0, need: len })?,
        )
        .map_err(InflightError::Create)?;
        Self::map(file, 0, len, num_queues, queue_size)
    }

    /// Maps a region the frontend kept (SET_INFLIGHT_FD).
    pub fn open(
        file: File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<Self, InflightError> {
        let need = geometry(num_queues, queue_size, max_queues)?;
        let got = usize::try_from(mmap_size).map_err(|_| InflightError::TooSmall {
            got: mmap_size,
            need,
        })?;
        if got < need {
            return Err(InflightError::TooSmall {
                got: mmap_size,
                need,
            });
        }
        let offset = libc::off_t::try_from(mmap_offset).map_err(|_| InflightError::Geometry {
            num_queues,
            queue_size,
        })?;
        Self::map_at(file, offset, got, num_queues, queue_size)
    }

    fn map(
        file: File,
        offset: libc::off_t,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        Self::map_at(file, offset, len, num_queues, queue_size)
    }

    fn map_at(
        file: File,
        offset: libc::off_t,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        // SAFETY: a new shared mapping of `len` bytes of `file` at `offset`, checked against
        // MAP_FAILED; nothing else in this process aliases it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Map(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| InflightError::Map(std::io::Error::other("null mapping")))?;
        Ok(Self {
            ptr,
            len,
            num_queues,
            queue_size,
            file,
        })
    }

    /// The memfd (to send with GET_INFLIGHT_FD's reply).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size of the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: geometry forbids it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of queues the region covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }
}

/// One queue's part of the region, used by that queue's worker.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    offset: usize,
    desc_num: u16,
    counter: u64,
}

/// What a restart finds in a queue's region.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Heads to resubmit, in the order they were first fetched.
    pub resubmit: Vec<u16>,
    /// Where fetching from the avail ring resumes.
    pub next_avail: u16,
}

impl InflightQueue {
    /// Queue `index`'s part of `region`, or `None` if the region does not cover it.
    pub fn new(region: Arc<InflightRegion>, index: u16) -> Option<Self> {
        if index >= region.num_queues {
            return None;
        }
        let offset = queue_region_size(region.queue_size).checked_mul(usize::from(index))?;
        let desc_num = region.queue_size;
        Some(Self {
            region,
            offset,
            desc_num,
            counter: 1,
        })
    }

    fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(self.offset + off < self.region.len);
        // SAFETY: `offset + off` lies within this queue's part of the mapping: callers pass
        // header offsets < HEADER or descriptor offsets for an index < desc_num, and
        // geometry() sized the mapping for num_queues such parts.
        unsafe { self.region.ptr.as_ptr().add(self.offset + off) }
    }

    fn read_u16(&self, off: usize) -> u16 {
        // SAFETY: in-bounds (see `at`); unaligned-safe read of shared memory.
        unsafe { std::ptr::read_volatile(self.at(off).cast::<[u8; 2]>()) }.pipe(u16::from_le_bytes)
    }

    fn write_u16(&self, off: usize, v: u16) {
        // SAFETY: in-bounds (see `at`); byte-array write needs no alignment.
        unsafe { std::ptr::write_volatile(self.at(off).cast::<[u8; 2]>(), v.to_le_bytes()) };
    }

    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: in-bounds (see `at`).
        unsafe { std::ptr::read_volatile(self.at(off).cast::<[u8; 8]>()) }.pipe(u64::from_le_bytes)
    }

    fn write_u64(&self, off: usize, v: u64) {
        // SAFETY: in-bounds (see `at`).
        unsafe { std::ptr::write_volatile(self.at(off).cast::<[u8; 8]>(), v.to_le_bytes()) };
    }

    fn read_u8(&self, off: usize) -> u8 {
        // SAFETY: in-bounds (see `at`).
        unsafe { std::ptr::read_volatile(self.at(off)) }
    }

    fn write_u8(&self, off: usize, v: u8) {
        // SAFETY: in-bounds (see `at`).
        unsafe { std::ptr::write_volatile(self.at(off), v) };
    }

    fn desc(i: u16) -> usize {
        HEADER + DESC * usize::from(i)
    }

    fn reinit(&self, used_idx: u16) {
        for i in 0..self.desc_num {
            let d = Self::desc(i);
            self.write_u8(d, 0);
            self.write_u16(d + 6, 0);
            self.write_u64(d + 8, 0);
        }
        self.write_u64(0, 0);
        self.write_u16(10, self.desc_num);
        self.write_u16(12, 0);
        self.write_u16(14, used_idx);
        fence(Ordering::SeqCst);
        self.write_u16(8, VERSION);
    }

    /// Reads what a previous instance left for a ring whose used index is `used_idx` and whose
    /// size is `ring_size`; prepares the region for this run.
    pub fn recover(&mut self, used_idx: u16, ring_size: u16) -> Recovered {
        let version = self.read_u16(8);
        let desc_num = self.read_u16(10);
        if version != VERSION || desc_num != self.desc_num || ring_size > self.desc_num {
            if version != 0 {
                log::warn!(
                    "in-flight region version {version} with {desc_num} descriptors does not \
                     fit a ring of {ring_size}: starting afresh"
                );
            }
            self.reinit(used_idx);
            self.counter = 1;
            return Recovered {
                resubmit: Vec::new(),
                next_avail: used_idx,
            };
        }
        let recorded = self.read_u16(14);
        if recorded != used_idx {
            // Died after bumping the used index, before clearing the batch's entries.
            let batch = used_idx.wrapping_sub(recorded);
            let mut head = self.read_u16(12);
            for _ in 0..batch.min(self.desc_num) {
                if head >= self.desc_num {
                    break;
                }
                self.write_u8(Self::desc(head), 0);
                head = self.read_u16(Self::desc(head) + 6);
            }
            fence(Ordering::SeqCst);
            self.write_u16(14, used_idx);
        }
        let mut pending: Vec<(u64, u16)> = (0..ring_size)
            .filter(|&i| self.read_u8(Self::desc(i)) == 1)
            .map(|i| (self.read_u64(Self::desc(i) + 8), i))
            .collect();
        // Entries past the ring size cannot be ours: clear them.
        for i in ring_size..self.desc_num {
            self.write_u8(Self::desc(i), 0);
        }
        pending.sort_unstable();
        self.counter = pending.last().map_or(1, |&(c, _)| c.saturating_add(1));
        let inuse = u16::try_from(pending.len()).unwrap_or(u16::MAX);
        Recovered {
            next_avail: used_idx.wrapping_add(inuse),
            resubmit: pending.into_iter().map(|(_, i)| i).collect(),
        }
    }

    /// A head was taken from the avail ring.
    pub fn fetched(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let d = Self::desc(head);
        self.write_u64(d + 8, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.write_u8(d, 1);
    }

    /// Before `head` is written to the used ring.
    pub fn completing(&self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.write_u16(Self::desc(head) + 6, self.read_u16(12));
        self.write_u16(12, head);
        fence(Ordering::SeqCst);
    }

    /// After the used index became `used_idx` with `head` in it.
    pub fn completed(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if head < self.desc_num {
            self.write_u8(Self::desc(head), 0);
        }
        fence(Ordering::SeqCst);
        self.write_u16(14, used_idx);
    }
}

/// `x.pipe(f)` = `f(x)`, for reading left to right.
trait Pipe: Sized {
    fn pipe<R>(self, f: impl FnOnce(Self) -> R) -> R {
        f(self)
    }
}
impl<T> Pipe for T {}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(size: u16) -> InflightQueue {
        let region = Arc::new(InflightRegion::create(1, size, 1).expect("memfd"));
        InflightQueue::new(region, 0).expect("queue 0")
    }

    #[test]
    fn fresh_region_is_initialised_and_resumes_at_the_used_index() {
        let mut q = queue(8);
        let r = q.recover(5, 8);
        assert_eq!(
            r,
            Recovered {
                resubmit: vec![],
                next_avail: 5
            }
        );
        assert_eq!(q.read_u16(8), VERSION);
    }

    #[test]
    fn in_flight_heads_come_back_in_fetch_order_and_completed_ones_do_not() {
        let mut q = queue(8);
        q.recover(0, 8);
        for h in [3, 1, 6, 2] {
            q.fetched(h);
        }
        // Complete 1 out of order.
        q.completing(1);
        q.completed(1, 1);
        // A new instance over the same region.
        let region = q.region.clone();
        drop(q);
        let mut again = InflightQueue::new(region, 0).expect("queue 0");
        let r = again.recover(1, 8);
        assert_eq!(r.resubmit, vec![3, 6, 2]);
        assert_eq!(r.next_avail, 4);
    }

    #[test]
    fn death_between_used_index_and_clearing_does_not_resubmit_the_completed_head() {
        let mut q = queue(8);
        q.recover(0, 8);
        q.fetched(4);
        q.fetched(5);
        q.completing(5);
        // The used index became 1, then we died before `completed`.
        let region = q.region.clone();
        drop(q);
        let mut again = InflightQueue::new(region, 0).expect("queue 0");
        let r = again.recover(1, 8);
        assert_eq!(r.resubmit, vec![4]);
        assert_eq!(r.next_avail, 2);
    }

    #[test]
    fn a_region_that_does_not_fit_is_reset() {
        let mut q = queue(8);
        q.recover(0, 8);
        q.fetched(2);
        q.write_u16(10, 200);
        let r = q.recover(7, 8);
        assert_eq!(
            r,
            Recovered {
                resubmit: vec![],
                next_avail: 7
            }
        );
    }

    #[test]
    fn open_refuses_a_region_too_small_for_its_geometry() {
        let region = InflightRegion::create(1, 8, 1).expect("memfd");
        let file = region.file().try_clone().expect("dup");
        assert!(matches!(
            InflightRegion::open(file, 0, 64, 2, 8, 4),
            Err(InflightError::TooSmall { .. })
        ));
    }
}
