//! [`Qcow2`]: an open image, its locks and the helpers every path shares. The paths live in
//! their own files: `read.rs`, `write.rs`, `zero.rs` (discard, write-zeroes), `txn.rs`
//! (metadata transactions), `pool.rs` (reserved clusters, frees, flush), `prealloc.rs`.
//!
//! Locking: all metadata (L1, L2 cache, refcounts) sits behind one `RwLock`, held only to look
//! up or change metadata, never across data I/O, encryption or fdatasync. A request resolves
//! all its mappings under one acquisition. A request that changes metadata runs as a
//! transaction (`txn.rs`): it plans under the write lock (reserving clusters and marking
//! its guest clusters busy), drops the lock for the data work, and commits (or rolls back)
//! under the lock again, so memory always equals disk. Busy clusters serialise the
//! transactions that touch the same cluster; others run in parallel.
//!
//! Every read and write request also holds the in-flight gate for reading from its lookup to
//! the end of its data I/O; dropping refcounts to 0 (flush, or too many pending frees) first
//! takes it for writing, so a freed cluster is never reused or punched under a request that
//! still maps it.
//!
//! Crash ordering of an allocating write: data clusters come from a reserve pool whose
//! refcount increments must be durable before an L2 entry points at them (a barrier is owed
//! after each refill). The request writes its data; then one fdatasync if it placed
//! pre-existing content in a new cluster (copy-on-write), or if a refill or a new L2 table is
//! not yet covered by a barrier; then its L2 entries. A new L2 table is written and synced
//! before the L1 entry points at it. A write covering whole new clusters with no old content
//! is not synced before its L2 entry: until the next flush a crash may leave that (not yet
//! flushed) range reading as the new cluster's previous content (zeroes, as freed clusters are
//! punched). References dropped by COW, discard or write-zeroes are decremented only after the
//! next barrier (flush). A crash at any point therefore leaves at worst leaked clusters, and
//! never loses data that was in the cluster before the write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::alloc::Refcounts;
use super::bounds::Overlap;
use super::header::{Header, INCOMPAT_DIRTY, OFF_AUTOCLEAR, OFF_INCOMPAT};
use super::metadata::{L2Cache, Lookup, Mapping, Meta};
use super::types::Geometry;
use super::{BackingRead, ClusterCrypt, Error, Result};
use crate::storage::Storage;

/// How to open a [`Qcow2`].
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    pub read_only: bool,
    /// Upper bound of the L2 cache in bytes.
    pub l2_cache_bytes: u64,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Self {
            read_only: false,
            l2_cache_bytes: 32 << 20,
        }
    }
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub(super) storage: Box<dyn Storage>,
    pub(super) header: Header,
    pub(super) geo: Geometry,
    pub(super) read_only: bool,
    pub(super) meta: RwLock<Meta>,
    /// In-flight gate: every read and write request holds it for reading from its mapping
    /// lookup to the end of its data I/O; releasing frees takes it for writing (and drops it at
    /// once), so it waits for the requests that may still use the old mappings. Taken before
    /// `meta`.
    pub(super) inflight: RwLock<()>,
    /// Transactions that finished (busy clusters released), with a condition to wait on.
    pub(super) done: (Mutex<u64>, Condvar),
    /// Serialises the first write's header update.
    pub(super) first: Mutex<()>,
    /// Set when a data write would have overwritten metadata: the image is read-only from then.
    pub(super) corrupt: AtomicBool,
    pub(super) backing: Option<Box<dyn BackingRead>>,
    pub(super) crypt: Option<Arc<dyn ClusterCrypt>>,
    /// External data file (guest data lives there at host offset = guest offset).
    pub(super) data: Option<Box<dyn Storage>>,
}

pub(super) fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::TooLarge)
}

impl Qcow2 {
    /// Opens an image. `backing` must be given when the header names a backing file; `crypt`
    /// when it is encrypted.
    pub fn open(
        storage: Box<dyn Storage>,
        opts: &Qcow2Options,
        backing: Option<Box<dyn BackingRead>>,
        crypt: Option<Arc<dyn ClusterCrypt>>,
    ) -> Result<Self> {
        Self::open_with_data_file(storage, None, opts, backing, crypt)
    }

    /// As [`Qcow2::open`], with the external data file the header names (incompatible bit 2).
    pub fn open_with_data_file(
        storage: Box<dyn Storage>,
        data: Option<Box<dyn Storage>>,
        opts: &Qcow2Options,
        backing: Option<Box<dyn BackingRead>>,
        crypt: Option<Arc<dyn ClusterCrypt>>,
    ) -> Result<Self> {
        let header = Header::read(storage.as_ref())?;
        if header.crypt_method != 0 && crypt.is_none() {
            return Err(Error::NeedKey(header.crypt_method));
        }
        if header.is_corrupt() && !opts.read_only {
            return Err(Error::Corrupt);
        }
        if header.data_file.is_some() && data.is_none() {
            return Err(Error::Unsupported(
                "the image has an external data file but none was opened",
            ));
        }
        if header.data_file.is_some() && header.crypt_method != 0 {
            return Err(Error::Unsupported("encryption with an external data file"));
        }
        if header.backing_file.is_some() && backing.is_none() {
            return Err(Error::Unsupported(
                "the image has a backing file but none was opened",
            ));
        }
        let geo = Geometry::new(&header);
        let l1 = read_l1(storage.as_ref(), header.l1_table_offset, header.l1_size)?;
        let rc = load_refcounts(storage.as_ref(), &header, opts.read_only)?;
        if !opts.read_only {
            let len = storage.len()?;
            super::bounds::check_table_offsets(len, geo.cluster_size, &l1, rc.table())?;
        }
        let cap = to_usize((opts.l2_cache_bytes / geo.cluster_size).max(16))?;
        let meta = Meta {
            l1,
            l2: L2Cache::new(cap),
            rc,
            pending_frees: Vec::new(),
            free_seq: 0,
            pool: Vec::new(),
            rc_gen: 0,
            rc_synced: 0,
            busy: Default::default(),
            busy_l1: Default::default(),
            written: false,
            overlap: Overlap::default(),
        };
        let mut img = Self {
            storage,
            header,
            geo,
            read_only: opts.read_only,
            meta: RwLock::new(meta),
            inflight: RwLock::new(()),
            done: (Mutex::new(0), Condvar::new()),
            first: Mutex::new(()),
            corrupt: AtomicBool::new(false),
            backing,
            crypt,
            data,
        };
        if img.header.is_dirty() && !img.read_only {
            log::info!("image was not closed cleanly: rebuilding refcounts");
            super::repair::rebuild_refcounts(img.storage.as_ref(), &img.header)?;
            let h = img.header.incompatible & !INCOMPAT_DIRTY;
            img.storage.write_at(&h.to_be_bytes(), OFF_INCOMPAT)?;
            img.storage.sync()?;
            img.header = Header::read(img.storage.as_ref())?;
            let rc = load_refcounts(img.storage.as_ref(), &img.header, false)?;
            img.meta_w().rc = rc;
        }
        if !img.read_only && img.data.is_none() {
            let mut m = img.meta_w();
            let o = Overlap::build(
                img.storage.as_ref(),
                &img.header,
                img.geo.cluster_size,
                &m.l1,
                &m.rc,
            )?;
            m.overlap = o;
        }
        Ok(img)
    }

    /// The parsed header as opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Guest-visible size.
    pub fn size(&self) -> u64 {
        self.geo.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size
    }

    /// Whether writes are refused (opened read-only, or found corrupt by a write).
    pub fn read_only(&self) -> bool {
        self.read_only || self.corrupt.load(Ordering::Relaxed)
    }

    /// The underlying storage.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    pub(super) fn meta_r(&self) -> RwLockReadGuard<'_, Meta> {
        // A poisoned lock means a panic mid-update elsewhere; metadata on disk stays ordered.
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn meta_w(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A request's hold on the in-flight gate. Never taken twice by one thread, and nothing
    /// that holds it may wait for the gate's write side.
    pub(super) fn gate_r(&self) -> RwLockReadGuard<'_, ()> {
        self.inflight.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no request that started before this call is still running.
    pub(super) fn gate_barrier(&self) {
        drop(self.inflight.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len }),
        }
    }

    /// Where guest data lives: the external data file, or the image file.
    pub(super) fn data_st(&self) -> &dyn Storage {
        self.data.as_deref().unwrap_or(self.storage.as_ref())
    }

    /// The mapping of the allocation unit (subcluster or cluster) containing `offset`.
    pub fn mapping(&self, offset: u64) -> Result<Mapping> {
        {
            let m = self.meta_r();
            if let Lookup::Found(map) = m.lookup(offset, &self.geo)? {
                return Ok(map);
            }
        }
        let mut m = self.meta_w();
        m.lookup_load(self.storage.as_ref(), offset, &self.geo)
    }

    /// Bytes from `pos` to the end of its unit (subcluster or cluster), capped at `end`.
    pub(super) fn unit_left(&self, pos: u64, end: u64) -> u64 {
        let u = self.geo.unit_size();
        (u - (pos & (u - 1))).min(end - pos)
    }

    /// Refuses a write of guest data (or of a new table) that would land on metadata (a
    /// malformed L2 entry with COPIED set pointing at a table, or refcounts that call a table
    /// free) or past the end of the image (an L2 entry pointing anywhere up to 2^56 would
    /// otherwise make a sparse file of petabytes), and marks the image corrupt: read-only from
    /// then on. The end of the image is the file's length at open rounded up to a cluster, or
    /// the end of the highest cluster allocated since.
    pub(super) fn check_overlap(&self, m: &Meta, host: u64, len: u64) -> Result<()> {
        if self.data.is_some() {
            return Ok(());
        }
        let what = if host.checked_add(len).is_none_or(|e| e > m.rc.high_water()) {
            "data cluster past the end of the image"
        } else if m
            .overlap
            .hits(host, len, self.geo.cluster_size, &m.l1, &m.rc)
        {
            "data cluster overlapping metadata"
        } else {
            return Ok(());
        };
        self.corrupt.store(true, Ordering::Relaxed);
        log::error!(
            "a write to host {host:#x}+{len} is refused ({what}): \
             the image is corrupt, now read-only"
        );
        Err(Error::BadOffset { what, offset: host })
    }

    /// The first write of an open clears the autoclear bits (outside the metadata lock).
    pub(super) fn first_write(&self) -> Result<()> {
        if self.meta_r().written {
            return Ok(());
        }
        let _one = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if self.meta_r().written {
            return Ok(());
        }
        if self.header.version >= 3 && self.header.autoclear != 0 {
            // We maintain nothing behind autoclear bits: not bit 0 (bitmaps, which become
            // inconsistent as soon as we write), not bit 1 (raw external data: our zero clusters
            // do not zero the data file), not unknown ones. Clear them all.
            self.storage.write_at(&0u64.to_be_bytes(), OFF_AUTOCLEAR)?;
            self.storage.sync()?;
        }
        self.meta_w().written = true;
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::warn!("flush on close failed: {e}");
        }
    }
}

fn load_refcounts(st: &dyn Storage, h: &Header, read_only: bool) -> Result<Refcounts> {
    Refcounts::load(
        st,
        h.refcount_order,
        h.cluster_bits,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        read_only,
    )
}

/// Reads an L1 table (already bounded by the header checks).
pub fn read_l1(storage: &dyn Storage, offset: u64, entries: u32) -> Result<Vec<u64>> {
    super::codec::read(storage, offset, u64::from(entries))
}
