//! Storage wrappers that misbehave on purpose, for the fault-injection and power-loss tests
//! (issue 14).
//!
//! - [`FaultStorage`] counts operations and fails the N-th one (EIO, ENOSPC, or a short write
//!   that lands a prefix and then reports ENOSPC), once; every other operation goes through to
//!   the storage underneath (a `MemStorage` or a `FileStorage`).
//! - [`PowerLossStorage`] keeps the page-cache view in memory and logs every change together
//!   with the syncs. [`PowerLossLog::images_at`] then gives, for a cut after any number of
//!   operations, the images a power loss could leave: everything before the last completed
//!   sync, plus any subset of the writes made since (kept or dropped independently, also torn at
//!   512-byte granularity), applied in program order, the orders the page cache could have
//!   written them back in.
#![allow(dead_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost_user_qcow2::storage::{MemStorage, Result, Storage, StorageError};

/// The error [`FaultStorage`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Any operation fails with EIO.
    Eio,
    /// A write-type operation (write, set_len, write_zeroes, punch_hole) fails with ENOSPC.
    Enospc,
    /// A write lands only its first half (rounded down to 512 bytes) and then fails with ENOSPC,
    /// as `write_all_at` reports a short pwrite followed by a full disk.
    ShortWrite,
}

impl Fault {
    /// Whether an operation of this class is counted (and may fail) under this fault.
    fn counts(self, op: OpClass) -> bool {
        match self {
            Fault::Eio => true,
            Fault::Enospc => op != OpClass::Read && op != OpClass::Sync,
            Fault::ShortWrite => op == OpClass::Write,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpClass {
    Read,
    Write,
    Sync,
    OtherWrite,
}

struct FaultState {
    fault: Fault,
    /// Operations of the counted classes seen since [`FaultStorage::arm`].
    count: AtomicU64,
    /// Index of the operation to fail; `u64::MAX` = none.
    fail_at: AtomicU64,
    fired: AtomicBool,
}

/// Fails the N-th counted operation once (see [`Fault`]). Clones share the counter.
#[derive(Clone)]
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    state: Arc<FaultState>,
}

impl FaultStorage {
    /// Wraps `inner`; nothing fails until [`FaultStorage::arm`].
    pub fn new(inner: Arc<dyn Storage>, fault: Fault) -> Self {
        Self {
            inner,
            state: Arc::new(FaultState {
                fault,
                count: AtomicU64::new(0),
                fail_at: AtomicU64::new(u64::MAX),
                fired: AtomicBool::new(false),
            }),
        }
    }

    /// Restarts the count and fails the `n`-th counted operation from now (0-based).
    pub fn arm(&self, n: u64) {
        self.state.count.store(0, Ordering::SeqCst);
        self.state.fired.store(false, Ordering::SeqCst);
        self.state.fail_at.store(n, Ordering::SeqCst);
    }

    /// Counted operations since [`FaultStorage::arm`].
    pub fn count(&self) -> u64 {
        self.state.count.load(Ordering::SeqCst)
    }

    /// Whether the fault has been injected.
    pub fn fired(&self) -> bool {
        self.state.fired.load(Ordering::SeqCst)
    }

    /// Counts an operation; returns the fault to inject now, if any.
    fn tick(&self, op: OpClass) -> Option<Fault> {
        if !self.state.fault.counts(op) {
            return None;
        }
        let i = self.state.count.fetch_add(1, Ordering::SeqCst);
        if i == self.state.fail_at.load(Ordering::SeqCst) {
            self.state.fired.store(true, Ordering::SeqCst);
            Some(self.state.fault)
        } else {
            None
        }
    }
}

fn errno(f: Fault) -> io::Error {
    io::Error::from_raw_os_error(match f {
        Fault::Eio => libc::EIO,
        Fault::Enospc | Fault::ShortWrite => libc::ENOSPC,
    })
}

fn write_err(f: Fault, offset: u64, len: usize) -> StorageError {
    StorageError::Write {
        offset,
        len,
        source: errno(f),
    }
}

impl Storage for FaultStorage {
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.tick(OpClass::Read).is_some() {
            return Err(StorageError::Read {
                offset,
                len: buf.len(),
                source: errno(Fault::Eio),
            });
        }
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self.tick(OpClass::Write) {
            None => self.inner.write_at(buf, offset),
            Some(Fault::ShortWrite) => {
                let keep = buf.len() / 2 / 512 * 512;
                self.inner.write_at(&buf[..keep], offset)?;
                Err(write_err(Fault::ShortWrite, offset, buf.len()))
            }
            Some(f) => Err(write_err(f, offset, buf.len())),
        }
    }

    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        if self.tick(OpClass::Read).is_some() {
            return Err(StorageError::Read {
                offset,
                len: bufs.iter().map(|b| b.len()).sum(),
                source: errno(Fault::Eio),
            });
        }
        self.inner.readv_at(bufs, offset)
    }

    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        match self.tick(OpClass::Write) {
            None => self.inner.writev_at(bufs, offset),
            Some(Fault::ShortWrite) => {
                let flat: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                let keep = total / 2 / 512 * 512;
                self.inner.write_at(&flat[..keep], offset)?;
                Err(write_err(Fault::ShortWrite, offset, total))
            }
            Some(f) => Err(write_err(f, offset, total)),
        }
    }

    fn set_len(&self, len: u64) -> Result<()> {
        match self.tick(OpClass::OtherWrite) {
            None => self.inner.set_len(len),
            Some(f) => Err(StorageError::Size(errno(f))),
        }
    }

    fn sync(&self) -> Result<()> {
        match self.tick(OpClass::Sync) {
            None => self.inner.sync(),
            Some(f) => Err(StorageError::Flush(errno(f))),
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        match self.tick(OpClass::OtherWrite) {
            None => self.inner.punch_hole(offset, len),
            Some(f) => Err(StorageError::Discard {
                offset,
                len,
                source: errno(f),
            }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        match self.tick(OpClass::OtherWrite) {
            None => self.inner.write_zeroes(offset, len),
            Some(f) => Err(StorageError::Discard {
                offset,
                len,
                source: errno(f),
            }),
        }
    }
}

/// One logged change of a [`PowerLossStorage`].
#[derive(Clone, Debug)]
pub enum Event {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// write_zeroes or punch_hole: the range reads as zeroes.
    Zero {
        offset: u64,
        len: u64,
    },
    SetLen(u64),
    /// A completed sync (fdatasync): everything before it is durable.
    Sync,
}

/// The page-cache view of a file plus the log of how it got there (see the module comment).
/// Clones share the view and the log.
#[derive(Clone)]
pub struct PowerLossStorage {
    cache: Arc<MemStorage>,
    log: Arc<Mutex<Vec<Event>>>,
}

impl PowerLossStorage {
    /// A file whose durable content is `data`.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            cache: Arc::new(MemStorage::new(data)),
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn push(&self, e: Event) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }

    /// Number of events logged so far (the cut points are 0..=this).
    pub fn events(&self) -> usize {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The log so far.
    pub fn log(&self) -> Vec<Event> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Storage for PowerLossStorage {
    fn len(&self) -> Result<u64> {
        self.cache.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.cache.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.cache.write_at(buf, offset)?;
        self.push(Event::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.cache.readv_at(bufs, offset)
    }

    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let flat: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.write_at(&flat, offset)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.cache.set_len(len)?;
        self.push(Event::SetLen(len));
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.push(Event::Sync);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.cache.write_zeroes(offset, len)?;
        self.push(Event::Zero { offset, len });
        Ok(())
    }
}

fn apply(img: &mut Vec<u8>, e: &Event) {
    match e {
        Event::Write { offset, data } => {
            let s = usize::try_from(*offset).expect("offset");
            if img.len() < s + data.len() {
                img.resize(s + data.len(), 0);
            }
            img[s..s + data.len()].copy_from_slice(data);
        }
        Event::Zero { offset, len } => {
            let s = usize::try_from(*offset).expect("offset");
            let e = (s + usize::try_from(*len).expect("len")).min(img.len());
            if s < e {
                img[s..e].fill(0);
            }
        }
        Event::SetLen(l) => img.resize(usize::try_from(*l).expect("len"), 0),
        Event::Sync => {}
    }
}

/// Splits a write at 512-byte file-offset boundaries (the unit a disk writes atomically).
fn torn(e: &Event) -> Vec<Event> {
    match e {
        Event::Write { offset, data } => {
            let mut out = Vec::new();
            let mut pos = 0usize;
            while pos < data.len() {
                let off = *offset + pos as u64;
                let n = (512 - usize::try_from(off % 512).expect("mod")).min(data.len() - pos);
                out.push(Event::Write {
                    offset: off,
                    data: data[pos..pos + n].to_vec(),
                });
                pos += n;
            }
            out
        }
        other => vec![other.clone()],
    }
}

/// How the images for one cut point were chosen (for failure messages).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub what: String,
    pub image: Vec<u8>,
    /// Equal keys mean equal images (the all-dropped image of one sync epoch), so a caller may
    /// check such an image once.
    pub key: Option<usize>,
}

/// A finished [`PowerLossStorage`] log over its initial content.
pub struct PowerLossLog {
    initial: Vec<u8>,
    log: Vec<Event>,
}

impl PowerLossLog {
    pub fn new(initial: Vec<u8>, log: Vec<Event>) -> Self {
        Self { initial, log }
    }

    /// Number of logged events (cut points are `0..=len()`).
    pub fn len(&self) -> usize {
        self.log.len()
    }

    /// Walks every cut point `0..=len()` in order, calling `f(cut, candidates)` with the images a
    /// power loss just before event `cut` could leave: all unsynced changes dropped, all kept,
    /// `subsets` random subsets of whole changes and `subsets` random subsets of 512-byte pieces
    /// (seeded by `seed` and the cut). A cut with nothing unsynced has exactly one image.
    pub fn for_each_cut(
        &self,
        subsets: usize,
        seed: u64,
        mut f: impl FnMut(usize, Vec<Candidate>),
    ) {
        let mut durable = self.initial.clone();
        let mut pending: Vec<&Event> = Vec::new();
        let mut epoch = 0usize;
        for cut in 0..=self.log.len() {
            let mut cands = vec![Candidate {
                what: "all unsynced dropped".into(),
                image: durable.clone(),
                key: Some(epoch),
            }];
            if !pending.is_empty() {
                let mut all = durable.clone();
                for e in &pending {
                    apply(&mut all, e);
                }
                cands.push(Candidate {
                    what: format!("all {} unsynced kept", pending.len()),
                    image: all,
                    key: None,
                });
                let mut rng = StdRng::seed_from_u64(seed ^ (cut as u64).wrapping_mul(0x9e37_79b9));
                for i in 0..subsets {
                    let mut img = durable.clone();
                    let mut kept = Vec::new();
                    for (j, e) in pending.iter().enumerate() {
                        if rng.random_bool(0.5) {
                            apply(&mut img, e);
                            kept.push(j);
                        }
                    }
                    cands.push(Candidate {
                        what: format!("subset {i}: kept {kept:?} of {}", pending.len()),
                        image: img,
                        key: None,
                    });
                }
                for i in 0..subsets {
                    let mut img = durable.clone();
                    let mut pieces = 0usize;
                    for e in &pending {
                        for p in torn(e) {
                            if rng.random_bool(0.5) {
                                apply(&mut img, &p);
                                pieces += 1;
                            }
                        }
                    }
                    cands.push(Candidate {
                        what: format!("torn {i}: {pieces} 512-byte pieces kept"),
                        image: img,
                        key: None,
                    });
                }
            }
            f(cut, cands);
            if let Some(e) = self.log.get(cut) {
                if matches!(e, Event::Sync) {
                    epoch += 1;
                    for p in pending.drain(..) {
                        apply(&mut durable, p);
                    }
                } else {
                    pending.push(e);
                }
            }
        }
    }
}
