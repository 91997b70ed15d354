//! [`Qcow2`]: an open image with its read, write, discard and write-zeroes paths.
//!
//! Locking: all metadata (L1, L2 cache, refcounts) sits behind one `RwLock`. Reads take it for
//! reading only to look up mappings (the L2 cache is shared), and do data I/O without it.
//! Overwrites of clusters that are already allocated with refcount 1 hold the read lock across
//! the data write (so a concurrent discard cannot free the cluster underneath). Everything that
//! changes metadata (allocation, copy-on-write, L2 loads, discard) takes the write lock.
//! Every read and write request also holds the in-flight gate for reading from its lookup to the
//! end of its data I/O; dropping refcounts to 0 (flush, or too many pending frees) takes it for
//! writing, so a freed cluster is never reused or punched under a request that still maps it.
//!
//! Crash ordering of an allocating write: data clusters come from a reserve pool whose refcount
//! increments are made durable (fdatasync) when the pool is refilled. The request writes its data
//! and any new L2 table (with its refcount) first; then one fdatasync if it allocated an L2 table
//! or placed pre-existing content in a new cluster (copy-on-write: the unwritten rest of a partial
//! write, filled from the old cluster, a compressed or shared/snapshot cluster or the backing
//! file); then the L2 entries and last the L1 entries. A write covering whole new clusters with no
//! old content is not synced before its L2 entry: until the next flush a crash may leave that
//! (not yet flushed) range reading as the new cluster's previous content (zeroes, as freed
//! clusters are punched). References dropped by COW, discard or write-zeroes are decremented only
//! after the next barrier (flush). A crash at any point therefore leaves at worst leaked clusters,
//! and never loses data that was in the cluster before the write.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::alloc::Refcounts;
use super::header::{Header, INCOMPAT_DIRTY, OFF_AUTOCLEAR, OFF_INCOMPAT};
use super::iov::{copy_from, fill_zero, total, IovMut, IovRef};
use super::metadata::{L2Cache, Lookup, Mapping, Meta, COPIED, OFFSET_MASK, ZERO};
use super::types::Geometry;
use super::{compressed, BackingRead, ClusterCrypt, Error, Result};
use crate::crypto::secret::SecretBuf;
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
    storage: Box<dyn Storage>,
    header: Header,
    geo: Geometry,
    read_only: bool,
    meta: RwLock<Meta>,
    /// In-flight gate: every read and write request holds it for reading from its mapping
    /// lookup to the end of its data I/O; [`Qcow2::apply_frees`] (the only place where
    /// refcounts drop to 0 so that clusters are punched or reused) holds it for writing, so it
    /// waits for the requests that may still use the old mappings. Taken before `meta`.
    inflight: RwLock<()>,
    /// Metadata host ranges found at open: in-place data writes must not touch them.
    overlap: super::bounds::MetaRanges,
    /// Set when a data write would have overwritten metadata: the image is read-only from then.
    corrupt: AtomicBool,
    backing: Option<Box<dyn BackingRead>>,
    crypt: Option<Arc<dyn ClusterCrypt>>,
    /// External data file (guest data lives there at host offset = guest offset).
    data: Option<Box<dyn Storage>>,
}

/// Subcluster bitmap of a cluster whose subclusters all read as zeroes.
const ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Subcluster bitmap of a fully allocated cluster.
const ALL_ALLOCATED: u64 = 0x0000_0000_ffff_ffff;

thread_local! {
    static BOUNCE: RefCell<(SecretBuf, SecretBuf)> =
        const { RefCell::new((SecretBuf::new(), SecretBuf::new())) };
}

/// Size of the data-cluster reserve pool: at most this many clusters / bytes.
const POOL_CLUSTERS: u64 = 64;
const POOL_BYTES: u64 = 4 << 20;

/// Limit of pending frees before a write forces a barrier.
const MAX_PENDING_FREES: usize = 4096;

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::TooLarge)
}

/// Pointer writes deferred until after the barrier: file offset → entry value.
#[derive(Default)]
struct PtrWrites {
    l2: BTreeMap<u64, u64>,
    l1: BTreeMap<u64, u64>,
    /// Whether anything that the pointers depend on was written since the last barrier.
    need_sync: bool,
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
        let rc = Refcounts::load(
            storage.as_ref(),
            header.refcount_order,
            header.cluster_bits,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            opts.read_only,
        )?;
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
            pool: (0, 0),
            written: false,
        };
        let mut img = Self {
            storage,
            header,
            geo,
            read_only: opts.read_only,
            meta: RwLock::new(meta),
            inflight: RwLock::new(()),
            overlap: super::bounds::MetaRanges::default(),
            corrupt: AtomicBool::new(false),
            backing,
            crypt,
            data,
        };
        if img.header.is_dirty() && !img.read_only {
            log::info!("image was not closed cleanly: rebuilding refcounts");
            super::check::rebuild_refcounts(img.storage.as_ref(), &img.header)?;
            let h = img.header.incompatible & !INCOMPAT_DIRTY;
            img.storage.write_at(&h.to_be_bytes(), OFF_INCOMPAT)?;
            img.storage.sync()?;
            img.header = Header::read(img.storage.as_ref())?;
            let rc = Refcounts::load(
                img.storage.as_ref(),
                img.header.refcount_order,
                img.header.cluster_bits,
                img.header.refcount_table_offset,
                img.header.refcount_table_clusters,
                false,
            )?;
            img.meta_w().rc = rc;
        }
        if !img.read_only && img.data.is_none() {
            let m = img.meta_r();
            let r = super::bounds::MetaRanges::build(
                &img.header,
                img.geo.cluster_size,
                &m.l1,
                m.rc.table(),
                m.rc.table_location(),
            );
            drop(m);
            img.overlap = r;
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

    fn meta_r(&self) -> RwLockReadGuard<'_, Meta> {
        // A poisoned lock means a panic mid-update elsewhere; metadata on disk stays ordered.
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    fn meta_w(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A request's hold on the in-flight gate. Never taken twice by one thread, and nothing
    /// that holds it may reach [`Qcow2::apply_frees`].
    fn gate_r(&self) -> RwLockReadGuard<'_, ()> {
        self.inflight.read().unwrap_or_else(|e| e.into_inner())
    }

    fn gate_w(&self) -> RwLockWriteGuard<'_, ()> {
        self.inflight.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len }),
        }
    }

    /// Where guest data lives: the external data file, or the image file.
    fn data_st(&self) -> &dyn Storage {
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
    fn unit_left(&self, pos: u64, end: u64) -> u64 {
        let u = self.geo.unit_size();
        (u - (pos & (u - 1))).min(end - pos)
    }

    // ---------------------------------------------------------------- reads

    /// Reads `bufs` in turn from guest `offset`.
    pub fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        let _gate = self.gate_r();
        let end = offset + len;
        let cs = self.geo.cluster_size;
        let mut cur = IovMut::new(bufs);
        let mut pos = offset;
        let mut next: Option<Mapping> = None;
        while pos < end {
            let m = match next.take() {
                Some(m) => m,
                None => self.mapping(pos)?,
            };
            if let Mapping::Compressed {
                offset: co,
                len: cl,
            } = m
            {
                // The whole rest of the cluster, whatever the subcluster size.
                let n = (cs - self.geo.in_cluster(pos)).min(end - pos);
                let mut slices = cur.take(to_usize(n)?);
                let mut buf = vec![0u8; self.geo.cluster_usize()];
                self.read_compressed(co, cl, &mut buf)?;
                let mut p = to_usize(self.geo.in_cluster(pos))?;
                for s in slices.iter_mut() {
                    let k = s.len();
                    s.copy_from_slice(&buf[p..p + k]);
                    p += k;
                }
                pos += n;
                continue;
            }
            // Extend the run over following units that continue it.
            let mut run = self.unit_left(pos, end);
            while pos + run < end {
                let p2 = pos + run;
                let m2 = self.mapping(p2)?;
                let cont = match (m, m2) {
                    (Mapping::Data { host: h1, .. }, Mapping::Data { host: h2, .. }) => {
                        h2 + self.geo.in_cluster(p2) == h1 + self.geo.in_cluster(pos) + run
                    }
                    (Mapping::Unallocated, Mapping::Unallocated) => true,
                    (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                    _ => false,
                };
                if !cont {
                    next = Some(m2);
                    break;
                }
                run += self.unit_left(p2, end);
            }
            let mut slices = cur.take(to_usize(run)?);
            match m {
                Mapping::Data { host, .. } => {
                    self.read_data(host + self.geo.in_cluster(pos), pos, &mut slices)?
                }
                Mapping::Zero { .. } => fill_zero(&mut slices),
                Mapping::Unallocated => self.read_backing(pos, &mut slices)?,
                Mapping::Compressed { .. } => {}
            }
            pos += run;
        }
        Ok(())
    }

    fn read_data(&self, host: u64, guest: u64, slices: &mut [IoSliceMut<'_>]) -> Result<()> {
        let Some(crypt) = &self.crypt else {
            self.data_st().readv_at(slices, host)?;
            return Ok(());
        };
        if slices.iter().all(|s| s.len() % 512 == 0) {
            self.storage.readv_at(slices, host)?;
            let mut p = 0u64;
            for s in slices.iter_mut() {
                crypt.decrypt(s, host + p, guest + p)?;
                p += s.len() as u64;
            }
            return Ok(());
        }
        // Unaligned iovecs: bounce through a buffer, one cluster at a time.
        let n = total(slices);
        let mut buf = vec![0u8; n.min(self.geo.cluster_usize())];
        let mut done = 0usize;
        let mut si = 0usize;
        let mut so = 0usize;
        while done < n {
            let chunk = (n - done).min(buf.len());
            let b = &mut buf[..chunk];
            self.storage.read_at(b, host + done as u64)?;
            crypt.decrypt(b, host + done as u64, guest + done as u64)?;
            let mut bp = 0;
            while bp < chunk {
                let s = &mut slices[si];
                let k = (s.len() - so).min(chunk - bp);
                s[so..so + k].copy_from_slice(&b[bp..bp + k]);
                bp += k;
                so += k;
                if so == s.len() {
                    si += 1;
                    so = 0;
                }
            }
            done += chunk;
        }
        Ok(())
    }

    fn read_backing(&self, pos: u64, slices: &mut [IoSliceMut<'_>]) -> Result<()> {
        let Some(b) = &self.backing else {
            fill_zero(slices);
            return Ok(());
        };
        let bsize = b.size();
        let n = total(slices) as u64;
        if pos >= bsize {
            fill_zero(slices);
            return Ok(());
        }
        if pos + n <= bsize {
            return b.read(pos, slices);
        }
        // Split at the end of the backing image.
        let inside = to_usize(bsize - pos)?;
        let mut cur = IovMut::new(slices);
        {
            let mut a = cur.take(inside);
            b.read(pos, &mut a)?;
        }
        let mut rest = cur.take(to_usize(n)? - inside);
        fill_zero(&mut rest);
        Ok(())
    }

    fn read_compressed(&self, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let file_len = self.storage.len()?;
        if offset >= file_len || len > 2 * self.geo.cluster_size + 512 {
            return Err(Error::Compressed { offset });
        }
        let mut inp = vec![0u8; to_usize(len)?];
        self.storage.read_at(&mut inp, offset)?;
        compressed::decompress(self.geo.compression_type, &inp, out, offset)
    }

    /// Fills `buf` with the current content of the guest range at `guest` (within one unit of
    /// mapping `m`, or one cluster).
    fn content(&self, m: Mapping, guest: u64, buf: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Unallocated => {
                let mut s = [IoSliceMut::new(buf)];
                self.read_backing(guest, &mut s)
            }
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => {
                let h = host + self.geo.in_cluster(guest);
                self.data_st().read_at(buf, h)?;
                if let Some(c) = &self.crypt {
                    c.decrypt(buf, h, guest)?;
                }
                Ok(())
            }
            Mapping::Compressed { offset, len } => {
                let mut c = vec![0u8; self.geo.cluster_usize()];
                self.read_compressed(offset, len, &mut c)?;
                let i = to_usize(self.geo.in_cluster(guest))?;
                buf.copy_from_slice(&c[i..i + buf.len()]);
                Ok(())
            }
        }
    }

    // --------------------------------------------------------------- writes

    /// Writes `bufs` in turn at guest `offset`. The buffers are never modified.
    pub fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly);
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        {
            let _gate = self.gate_r();
            let m = self.meta_r();
            if m.written {
                if let Some(runs) = self.in_place_runs(&m, offset, len)? {
                    for &(host, _, n) in &runs {
                        self.check_overlap(&m, host, n)?;
                    }
                    let mut cur = IovRef::new(bufs);
                    for (host, guest, n) in runs {
                        let s = cur.take(to_usize(n)?);
                        self.write_data(host, guest, &s)?;
                    }
                    return Ok(());
                }
            }
        }
        {
            let _gate = self.gate_r();
            self.write_slow(offset, bufs)?;
        }
        self.free_if_many()
    }

    /// Applies the pending frees once there are too many (outside any request's gate).
    fn free_if_many(&self) -> Result<()> {
        if self.meta_r().pending_frees.len() <= MAX_PENDING_FREES {
            return Ok(());
        }
        let gate = self.gate_w();
        let mut m = self.meta_w();
        self.apply_frees(&gate, &mut m)
    }

    /// If every cluster of the range is allocated with refcount 1, the host runs to write.
    fn in_place_runs(
        &self,
        m: &Meta,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64, u64)>>> {
        let end = offset + len;
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let n = self.unit_left(pos, end);
            let gc = self.geo.guest_cluster(pos);
            let l1_copied =
                m.l1.get(self.geo.split(gc)?.0)
                    .is_some_and(|e| e & COPIED != 0);
            match m.lookup(pos, &self.geo)? {
                Lookup::Found(Mapping::Data { host, copied: true }) if l1_copied => {
                    let h = host + self.geo.in_cluster(pos);
                    match runs.last_mut() {
                        Some(r) if r.0 + r.2 == h => r.2 += n,
                        _ => runs.push((h, pos, n)),
                    }
                }
                _ => return Ok(None),
            }
            pos += n;
        }
        Ok(Some(runs))
    }

    /// Refuses an in-place data write over metadata (a malformed L2 entry with COPIED set pointing
    /// at the header, L1, refcount structures, an L2 table or the LUKS header), and marks the
    /// image corrupt: read-only from then on.
    fn check_overlap(&self, m: &Meta, host: u64, len: u64) -> Result<()> {
        if self.data.is_some() || !self.overlap.overlaps(host, len) {
            return Ok(());
        }
        // Metadata at open may have been freed and reused for data since: confirm with the
        // current tables (rare path).
        let now = super::bounds::MetaRanges::build(
            &self.header,
            self.geo.cluster_size,
            &m.l1,
            m.rc.table(),
            m.rc.table_location(),
        );
        if !now.overlaps(host, len) {
            return Ok(());
        }
        self.corrupt.store(true, Ordering::Relaxed);
        log::error!(
            "a data write to host {host:#x}+{len} would overwrite image metadata: \
             the image is corrupt, now read-only"
        );
        Err(Error::BadOffset {
            what: "data cluster overlapping metadata",
            offset: host,
        })
    }

    /// Writes guest data to a host range, encrypting into a bounce buffer when needed.
    fn write_data(&self, host: u64, guest: u64, src: &[IoSlice<'_>]) -> Result<()> {
        let Some(crypt) = &self.crypt else {
            self.data_st().writev_at(src, host)?;
            return Ok(());
        };
        let n: usize = src.iter().map(|s| s.len()).sum();
        let chunk_max = self.geo.cluster_usize();
        BOUNCE.with(|cell| -> Result<()> {
            let mut fresh = (SecretBuf::new(), SecretBuf::new());
            let mut guard = cell.try_borrow_mut().ok();
            let (a, b) = match guard.as_deref_mut() {
                Some(x) => (&mut x.0, &mut x.1),
                None => (&mut fresh.0, &mut fresh.1),
            };
            let (a, b) = (a.get_mut(chunk_max), b.get_mut(chunk_max));
            let mut cur = IovRef::new(src);
            let mut done = 0usize;
            while done < n {
                let k = (n - done).min(chunk_max);
                let s = cur.take(k);
                copy_from(&s, &mut a[..k]);
                crypt.encrypt_to(
                    &a[..k],
                    &mut b[..k],
                    host + done as u64,
                    guest + done as u64,
                )?;
                self.storage.write_at(&b[..k], host + done as u64)?;
                done += k;
            }
            Ok(())
        })
    }

    fn first_write(&self, m: &mut Meta) -> Result<()> {
        if m.written {
            return Ok(());
        }
        if self.header.version >= 3 && self.header.autoclear != 0 {
            // We maintain nothing behind autoclear bits: not bit 0 (bitmaps, which become
            // inconsistent as soon as we write), not bit 1 (raw external data: our zero clusters
            // do not zero the data file), not unknown ones. Clear them all.
            self.storage.write_at(&0u64.to_be_bytes(), OFF_AUTOCLEAR)?;
            self.storage.sync()?;
        }
        m.written = true;
        Ok(())
    }

    /// Returns a writable (refcount 1) L2 table for `l1i`, allocating or copying it.
    fn l2_writable(&self, m: &mut Meta, l1i: usize, pw: &mut PtrWrites) -> Result<u64> {
        let st = self.storage.as_ref();
        let e = *m.l1.get(l1i).ok_or(Error::TooLarge)?;
        let old = e & OFFSET_MASK;
        if old != 0 && e & COPIED != 0 {
            self.ensure_l2_cached(m, old, pw)?;
            return Ok(old);
        }
        let table = if old == 0 {
            // One or two words per entry (extended L2: entry + subcluster bitmap).
            vec![0u64; self.geo.entry_words() << self.geo.l2_bits]
        } else {
            m.load_l2(st, old, &self.geo)?;
            m.l2.get(old).map(<[u64]>::to_vec).ok_or(Error::BadOffset {
                what: "L2 table",
                offset: old,
            })?
        };
        let new = m.rc.alloc(st, 1)?;
        // Refcounts that call a metadata cluster free must not make it an L2 table.
        self.check_overlap(m, new, self.geo.cluster_size)?;
        let mut raw = Vec::with_capacity(table.len() * 8);
        for v in &table {
            raw.extend_from_slice(&v.to_be_bytes());
        }
        st.write_at(&raw, new)?;
        m.l2.insert(new, table);
        m.l1[l1i] = new | COPIED;
        pw.l1
            .insert(self.header.l1_table_offset + (l1i as u64) * 8, new | COPIED);
        pw.need_sync = true;
        if old != 0 {
            m.pending_frees.push((old, self.geo.cluster_size));
        }
        Ok(new)
    }

    /// Makes sure the L2 table at `l2` is cached; if it was evicted during this request, reloads
    /// it and replays the request's pending (not yet written) entries into it.
    fn ensure_l2_cached(&self, m: &mut Meta, l2: u64, pw: &PtrWrites) -> Result<()> {
        if m.l2.get_mut(l2).is_some() {
            return Ok(());
        }
        m.load_l2(self.storage.as_ref(), l2, &self.geo)?;
        let t = m.l2.get_mut(l2).ok_or(Error::BadOffset {
            what: "L2 table",
            offset: l2,
        })?;
        for (&off, &v) in pw.l2.range(l2..l2 + self.geo.cluster_size) {
            t[to_usize((off - l2) / 8)?] = v;
        }
        Ok(())
    }

    /// Sets L2 entry `l2i` (and its bitmap with extended L2) of the writable, cached table at
    /// `l2`, and queues the write.
    fn set_l2(
        &self,
        m: &mut Meta,
        l2: u64,
        l2i: usize,
        entry: u64,
        bitmap: u64,
        pw: &mut PtrWrites,
    ) -> Result<()> {
        self.ensure_l2_cached(m, l2, pw)?;
        let t = m.l2.get_mut(l2).ok_or(Error::BadOffset {
            what: "L2 table",
            offset: l2,
        })?;
        let w = l2i * self.geo.entry_words();
        t[w] = entry;
        let at = l2 + (w as u64) * 8;
        pw.l2.insert(at, entry);
        if self.geo.extended {
            t[w + 1] = bitmap;
            pw.l2.insert(at + 8, bitmap);
        }
        Ok(())
    }

    /// The barrier, then the pointer writes (L2 entries before L1 entries).
    fn commit(&self, _m: &mut Meta, pw: PtrWrites) -> Result<()> {
        if pw.l2.is_empty() && pw.l1.is_empty() {
            return Ok(());
        }
        if pw.need_sync {
            self.storage.sync()?;
        }
        for map in [&pw.l2, &pw.l1] {
            let mut run: Vec<u8> = Vec::new();
            let mut run_start = 0u64;
            for (&off, &v) in map {
                if !run.is_empty() && run_start + run.len() as u64 != off {
                    self.storage.write_at(&run, run_start)?;
                    run.clear();
                }
                if run.is_empty() {
                    run_start = off;
                }
                run.extend_from_slice(&v.to_be_bytes());
            }
            if !run.is_empty() {
                self.storage.write_at(&run, run_start)?;
            }
        }
        Ok(())
    }

    /// Drops the references queued since the last barrier. `_gate` (the in-flight gate held for
    /// writing) proves that no request still uses a mapping that pointed at these clusters.
    fn apply_frees(&self, _gate: &RwLockWriteGuard<'_, ()>, m: &mut Meta) -> Result<()> {
        if m.pending_frees.is_empty() {
            return Ok(());
        }
        self.storage.sync()?;
        let frees = std::mem::take(&mut m.pending_frees);
        let mut freed = Vec::new();
        for (off, len) in frees {
            if let Err(e) = m.rc.free(self.storage.as_ref(), off, len, &mut freed) {
                log::warn!("cannot free cluster at {off:#x}: {e}");
            }
        }
        // Give the space of clusters nobody references back to the file system (as QEMU does
        // with discard=unmap); every reuse rewrites a cluster in full.
        freed.sort_unstable();
        let cs = self.geo.cluster_size;
        let mut i = 0;
        while i < freed.len() {
            let start = freed[i];
            let mut end = start + cs;
            i += 1;
            while i < freed.len() && freed[i] == end {
                end += cs;
                i += 1;
            }
            if let Err(e) = self.storage.punch_hole(start, end - start) {
                log::debug!("cannot punch a hole at {start:#x}: {e}");
            }
        }
        Ok(())
    }

    /// A data cluster from the reserve pool. The pool's refcounts are made durable when it is
    /// refilled (one sync per pool, not per write), so pointing an L2 entry at a pool cluster
    /// needs no barrier. A crash leaks the unused rest of the pool at worst.
    fn alloc_data_cluster(&self, m: &mut Meta) -> Result<u64> {
        let cs = self.geo.cluster_size;
        if m.pool.0 >= m.pool.1 {
            let n = (POOL_BYTES / cs).clamp(1, POOL_CLUSTERS);
            let first = m.rc.alloc(self.storage.as_ref(), n)?;
            self.storage.sync()?;
            m.pool = (first, first + n * cs);
        }
        let c = m.pool.0;
        m.pool.0 += cs;
        // Refcounts that call a metadata cluster free must not make it a data cluster.
        self.check_overlap(m, c, cs)?;
        Ok(c)
    }

    /// Returns the unused pool clusters (on close).
    fn release_pool(&self, m: &mut Meta) -> Result<()> {
        let (a, b) = m.pool;
        m.pool = (0, 0);
        if a < b {
            m.rc.free(self.storage.as_ref(), a, b - a, &mut Vec::new())?;
        }
        Ok(())
    }

    fn write_slow(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let mut guard = self.meta_w();
        let m = &mut *guard;
        self.first_write(m)?;
        let st = self.storage.as_ref();
        let cs = self.geo.cluster_size;
        let end = offset + bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        let mut cur = IovRef::new(bufs);
        let mut pw = PtrWrites::default();
        let mut pos = offset;
        while pos < end {
            let inc = self.geo.in_cluster(pos);
            let n = (cs - inc).min(end - pos);
            let gc = self.geo.guest_cluster(pos);
            let gc_off = pos - inc;
            let (entry, bitmap) = m.entry_load(st, gc, &self.geo)?;
            let cmap = Mapping::decode(entry, &self.geo)?;
            let (l1i, l2i) = self.geo.split(gc)?;
            let l1_copied = m.l1.get(l1i).is_some_and(|e| e & COPIED != 0);
            let src = cur.take(to_usize(n)?);
            if let (Mapping::Data { host, copied: true }, true) = (cmap, l1_copied) {
                self.check_overlap(m, host, cs)?;
                if self.geo.extended {
                    let l2 = m.l2_offset(l1i, &self.geo)?;
                    let nb = self.write_subclusters_in_place(host, entry, bitmap, pos, &src)?;
                    if nb != bitmap {
                        self.set_l2(m, l2, l2i, entry, nb, &mut pw)?;
                    }
                } else {
                    self.write_data(host + inc, pos, &src)?;
                }
                pos += n;
                continue;
            }
            let l2 = self.l2_writable(m, l1i, &mut pw)?;
            let new = if self.geo.data_file {
                gc_off
            } else {
                self.alloc_data_cluster(m)?
            };
            let mut new_bitmap = 0;
            if n == cs && self.crypt.is_none() {
                self.data_st().writev_at(&src, new)?;
                new_bitmap = ALL_ALLOCATED;
            } else {
                let mut buf = vec![0u8; self.geo.cluster_usize()];
                if self.geo.extended {
                    new_bitmap = self.fill_subclusters(entry, bitmap, gc_off, inc, n, &mut buf)?;
                } else if n < cs {
                    self.content(cmap, gc_off, &mut buf)?;
                }
                // Copy-on-write: the new cluster carries old content that must be durable before
                // an L2 entry points at it.
                let old_content = match cmap {
                    Mapping::Zero { .. } => false,
                    Mapping::Unallocated => self.backing.is_some(),
                    Mapping::Data { .. } | Mapping::Compressed { .. } => true,
                };
                if old_content && n < cs {
                    pw.need_sync = true;
                }
                let i = to_usize(inc)?;
                copy_from(&src, &mut buf[i..i + to_usize(n)?]);
                match &self.crypt {
                    None => self.data_st().write_at(&buf, new)?,
                    Some(c) => {
                        let mut enc = vec![0u8; buf.len()];
                        c.encrypt_to(&buf, &mut enc, new, gc_off)?;
                        self.data_st().write_at(&enc, new)?;
                    }
                }
            }
            self.set_l2(m, l2, l2i, new | COPIED, new_bitmap, &mut pw)?;
            if !self.geo.data_file {
                if let Some(r) = cmap.host_range(cs) {
                    m.pending_frees.push(r);
                }
            }
            pos += n;
        }
        self.commit(m, pw)
    }

    /// Extended L2, new cluster: fills `buf` with the old content of every subcluster that is
    /// allocated or partially written (`inc..inc+n`), and returns the new bitmap.
    fn fill_subclusters(
        &self,
        entry: u64,
        bitmap: u64,
        gc_off: u64,
        inc: u64,
        n: u64,
        buf: &mut [u8],
    ) -> Result<u64> {
        let cmap = Mapping::decode(entry, &self.geo)?;
        if let Mapping::Compressed { .. } = cmap {
            self.content(cmap, gc_off, buf)?;
            return Ok(ALL_ALLOCATED);
        }
        let sc = self.geo.unit_size();
        let (j0, j1) = (inc / sc, (inc + n - 1) / sc);
        let mut alloc = bitmap & ALL_ALLOCATED;
        let mut zero = bitmap >> 32;
        for j in 0..32u64 {
            let (s, e) = (j * sc, (j + 1) * sc);
            let touched = (j0..=j1).contains(&j);
            let full = touched && inc <= s && inc + n >= e;
            let allocated = alloc & (1 << j) != 0;
            if (touched && !full) || allocated {
                let jj = u32::try_from(j).map_err(|_| Error::TooLarge)?;
                let m = Mapping::decode_sub(entry, bitmap, jj, &self.geo)?;
                self.content(m, gc_off + s, &mut buf[to_usize(s)?..to_usize(e)?])?;
            }
            if touched {
                alloc |= 1 << j;
                zero &= !(1 << j);
            }
        }
        Ok((zero << 32) | alloc)
    }

    /// Extended L2, cluster writable in place: writes the touched subclusters (filling partial
    /// ones that were not allocated) and returns the new bitmap.
    fn write_subclusters_in_place(
        &self,
        host: u64,
        entry: u64,
        bitmap: u64,
        pos: u64,
        src: &[IoSlice<'_>],
    ) -> Result<u64> {
        let sc = self.geo.unit_size();
        let n: u64 = src.iter().map(|s| s.len() as u64).sum();
        let end = pos + n;
        let gc_off = pos - self.geo.in_cluster(pos);
        let mut cur = IovRef::new(src);
        let mut nb = bitmap;
        let mut p = pos;
        while p < end {
            let k = self.unit_left(p, end);
            let piece = cur.take(to_usize(k)?);
            let j = self.geo.in_cluster(p) / sc;
            let sub_start = gc_off + j * sc;
            let allocated = bitmap & (1 << j) != 0;
            if allocated || k == sc {
                self.write_data(host + (p - gc_off), p, &piece)?;
            } else {
                let jj = u32::try_from(j).map_err(|_| Error::TooLarge)?;
                let m = Mapping::decode_sub(entry, bitmap, jj, &self.geo)?;
                let mut buf = vec![0u8; to_usize(sc)?];
                self.content(m, sub_start, &mut buf)?;
                let i = to_usize(p - sub_start)?;
                copy_from(&piece, &mut buf[i..i + to_usize(k)?]);
                let whole = [IoSlice::new(&buf)];
                self.write_data(host + j * sc, sub_start, &whole)?;
            }
            nb |= 1 << j;
            nb &= !(1 << (32 + j));
            p += k;
        }
        Ok(nb)
    }

    /// Makes every completed write durable; then releases clusters dropped since the last flush.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Everything completed so far is in the page cache: sync it without blocking I/O.
        if let Some(d) = &self.data {
            d.sync()?;
        }
        self.storage.sync()?;
        {
            let m = self.meta_r();
            if m.pending_frees.is_empty() && m.pool.0 >= m.pool.1 {
                return Ok(());
            }
        }
        // Return the unused reserve (so that a flushed image has no leaks, even if the process
        // then exits without closing it) and release clusters dropped since the last flush.
        let gate = self.gate_w();
        let mut m = self.meta_w();
        self.release_pool(&mut m)?;
        self.apply_frees(&gate, &mut m)?;
        self.storage.sync()?;
        Ok(())
    }

    // ------------------------------------------------------ discard / zeroes

    /// Discards whole clusters inside the range (partial clusters are left alone, as QEMU does).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        // As QEMU: without the zero flag, discarding would expose stale backing data.
        if self.geo.version < 3 && self.backing.is_some() {
            return Ok(());
        }
        let (a, b) = self.aligned_part(offset, len);
        if a < b {
            self.zero_clusters(a, b, false)?;
        }
        Ok(())
    }

    /// Makes the range read as zeroes: whole clusters by metadata, partial ones by writing zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        let end = offset + len;
        let (a, b) = self.aligned_part(offset, len);
        if a >= b {
            return self.write_zero_bytes(offset, end);
        }
        self.write_zero_bytes(offset, a)?;
        if !self.zero_clusters(a, b, true)? {
            self.write_zero_bytes(a, b)?;
        }
        self.write_zero_bytes(b, end)
    }

    /// Cluster-aligned interior of a range; the tail counts as whole at the end of the disk.
    fn aligned_part(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.geo.cluster_size;
        let end = offset + len;
        let a = offset.div_ceil(cs) * cs;
        let b = if end == self.geo.size {
            end
        } else {
            end / cs * cs
        };
        (a, b.max(a))
    }

    fn write_zero_bytes(&self, mut a: u64, b: u64) -> Result<()> {
        static ZEROES: [u8; 65536] = [0; 65536];
        while a < b {
            let n = (b - a).min(ZEROES.len() as u64);
            self.write(a, &[IoSlice::new(&ZEROES[..to_usize(n)?])])?;
            a += n;
        }
        Ok(())
    }

    /// Sets whole clusters of `a..b` to read as zeroes (`zeroes`) or discards them. Returns
    /// false when the image cannot express it (v2 with a backing file) and nothing was done.
    fn zero_clusters(&self, a: u64, b: u64, zeroes: bool) -> Result<bool> {
        let v3 = self.geo.version >= 3;
        let has_backing = self.backing.is_some();
        if zeroes && !v3 && has_backing {
            return Ok(false);
        }
        let mut guard = self.meta_w();
        let m = &mut *guard;
        self.first_write(m)?;
        let st = self.storage.as_ref();
        let cs = self.geo.cluster_size;
        let mut pw = PtrWrites::default();
        let mut pos = a;
        while pos < b {
            let gc = self.geo.guest_cluster(pos);
            let (l1i, l2i) = self.geo.split(gc)?;
            let (entry, bitmap) = m.entry_load(st, gc, &self.geo)?;
            let map = Mapping::decode(entry, &self.geo)?;
            pos += cs;
            let (new, new_bitmap, skip) = if self.geo.extended {
                let unallocated = map == Mapping::Unallocated;
                let skip = unallocated
                    && (bitmap == ALL_ZEROES || (bitmap & ALL_ALLOCATED == 0 && !has_backing));
                (0, ALL_ZEROES, skip)
            } else {
                let skip = match map {
                    Mapping::Zero { host: 0 } => true,
                    Mapping::Unallocated => !(v3 && has_backing),
                    _ => false,
                };
                (if v3 { ZERO } else { 0 }, 0, skip)
            };
            if skip {
                continue;
            }
            let l2 = self.l2_writable(m, l1i, &mut pw)?;
            self.set_l2(m, l2, l2i, new, new_bitmap, &mut pw)?;
            if !self.geo.data_file {
                if let Some(r) = map.host_range(cs) {
                    m.pending_frees.push(r);
                }
            }
        }
        self.commit(m, pw)?;
        drop(guard);
        self.free_if_many()?;
        Ok(true)
    }

    /// Preallocates every cluster (metadata; `full` also zero-fills the data) — for create.
    pub fn preallocate(&self, full: bool) -> Result<()> {
        let mut guard = self.meta_w();
        let m = &mut *guard;
        self.first_write(m)?;
        let st = self.storage.as_ref();
        let cs = self.geo.cluster_size;
        let nclusters = self.geo.size.div_ceil(cs);
        let per_l2 = 1u64 << self.geo.l2_bits;
        let mut gc = 0;
        let mut end_of_data = 0u64;
        while gc < nclusters {
            let (l1i, _) = self.geo.split(gc)?;
            let mut pw = PtrWrites::default();
            let l2 = self.l2_writable(m, l1i, &mut pw)?;
            let n = (nclusters - gc).min(per_l2 - (gc & (per_l2 - 1)));
            let host = if self.geo.data_file {
                gc * cs
            } else {
                m.rc.alloc(st, n)?
            };
            if full {
                self.data_st().write_zeroes(host, n * cs)?;
            }
            if !self.geo.data_file {
                end_of_data = end_of_data.max(host + n * cs);
            }
            for i in 0..n {
                let (_, l2i) = self.geo.split(gc + i)?;
                self.set_l2(m, l2, l2i, (host + i * cs) | COPIED, ALL_ALLOCATED, &mut pw)?;
            }
            pw.need_sync = true;
            self.commit(m, pw)?;
            gc += n;
        }
        if st.len()? < end_of_data {
            st.set_len(end_of_data)?;
        }
        st.sync()?;
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

/// Reads an L1 table (already bounded by the header checks).
pub fn read_l1(storage: &dyn Storage, offset: u64, entries: u32) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; to_usize(u64::from(entries) * 8)?];
    storage.read_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect())
}
