//! [`Qcow2`]: an open image with its read, write, discard and write-zeroes paths.
//!
//! Locking: all metadata (L1, L2 cache, refcounts) sits behind one `RwLock`. Reads take it for
//! reading only to look up mappings (the L2 cache is shared), and do data I/O without it.
//! Overwrites of clusters that are already allocated with refcount 1 hold the read lock across
//! the data write (so a concurrent discard cannot free the cluster underneath). Everything that
//! changes metadata (allocation, copy-on-write, L2 loads, discard) takes the write lock.
//!
//! Crash ordering of an allocating write: refcount increments, new L2 tables and the data are
//! written first; then one fdatasync; then the L2 entries and last the L1 entries. References
//! dropped by COW, discard or write-zeroes are decremented only after the next barrier (flush).
//! A crash at any point therefore leaves at worst leaked clusters.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::alloc::Refcounts;
use super::header::{Header, AUTOCLEAR_BITMAPS, INCOMPAT_DIRTY, OFF_AUTOCLEAR, OFF_INCOMPAT};
use super::metadata::{L2Cache, Lookup, Mapping, Meta, COPIED, OFFSET_MASK, ZERO};
use super::types::Geometry;
use super::{compressed, BackingRead, ClusterCrypt, Error, Result};
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
    backing: Option<Box<dyn BackingRead>>,
    crypt: Option<Arc<dyn ClusterCrypt>>,
}

thread_local! {
    static BOUNCE: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Limit of pending frees before a write forces a barrier.
const MAX_PENDING_FREES: usize = 4096;

/// A cursor over the caller's read buffers, handing out sub-slices in order.
struct IovMut<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    idx: usize,
    off: usize,
}

impl<'a, 'b> IovMut<'a, 'b> {
    fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        Self {
            bufs,
            idx: 0,
            off: 0,
        }
    }

    /// The next `len` bytes as slices.
    fn take(&mut self, len: usize) -> Vec<IoSliceMut<'_>> {
        let (start_idx, start_off) = (self.idx, self.off);
        let mut left = len;
        while left > 0 && self.idx < self.bufs.len() {
            let n = (self.bufs[self.idx].len() - self.off).min(left);
            left -= n;
            self.off += n;
            if self.off == self.bufs[self.idx].len() {
                self.idx += 1;
                self.off = 0;
            }
        }
        let mut out = Vec::new();
        let mut left = len;
        let mut off = start_off;
        for b in self.bufs[start_idx..].iter_mut() {
            if left == 0 {
                break;
            }
            let n = (b.len() - off).min(left);
            if n > 0 {
                out.push(IoSliceMut::new(&mut b[off..off + n]));
            }
            left -= n;
            off = 0;
        }
        out
    }
}

/// A cursor over the caller's write buffers.
struct IovRef<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    idx: usize,
    off: usize,
}

impl<'a, 'b> IovRef<'a, 'b> {
    fn new(bufs: &'a [IoSlice<'b>]) -> Self {
        Self {
            bufs,
            idx: 0,
            off: 0,
        }
    }

    fn take(&mut self, len: usize) -> Vec<IoSlice<'a>> {
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 && self.idx < self.bufs.len() {
            let b: &'a [u8] = &self.bufs[self.idx];
            let n = (b.len() - self.off).min(left);
            if n > 0 {
                out.push(IoSlice::new(&b[self.off..self.off + n]));
            }
            left -= n;
            self.off += n;
            if self.off == b.len() {
                self.idx += 1;
                self.off = 0;
            }
        }
        out
    }
}

fn copy_from(slices: &[IoSlice<'_>], dst: &mut [u8]) {
    let mut p = 0;
    for s in slices {
        dst[p..p + s.len()].copy_from_slice(s);
        p += s.len();
    }
}

fn fill_zero(slices: &mut [IoSliceMut<'_>]) {
    for s in slices.iter_mut() {
        s.fill(0);
    }
}

fn total(slices: &[IoSliceMut<'_>]) -> usize {
    slices.iter().map(|s| s.len()).sum()
}

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
        let header = Header::read(storage.as_ref())?;
        if header.crypt_method != 0 && crypt.is_none() {
            return Err(Error::NeedKey(header.crypt_method));
        }
        if header.is_corrupt() && !opts.read_only {
            return Err(Error::Corrupt);
        }
        if header.extended_l2() {
            return Err(Error::Unsupported("extended L2 entries (subclusters)"));
        }
        if header.data_file.is_some() {
            return Err(Error::Unsupported("external data file"));
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
        let cap = to_usize((opts.l2_cache_bytes / geo.cluster_size).max(16))?;
        let meta = Meta {
            l1,
            l2: L2Cache::new(cap),
            rc,
            pending_frees: Vec::new(),
            written: false,
        };
        let mut img = Self {
            storage,
            header,
            geo,
            read_only: opts.read_only,
            meta: RwLock::new(meta),
            backing,
            crypt,
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

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
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

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len }),
        }
    }

    /// The mapping of the guest cluster containing `offset`.
    pub fn mapping(&self, offset: u64) -> Result<Mapping> {
        let gc = self.geo.guest_cluster(offset);
        {
            let m = self.meta_r();
            if let Lookup::Found(map) = m.lookup(gc, &self.geo)? {
                return Ok(map);
            }
        }
        let mut m = self.meta_w();
        m.lookup_load(self.storage.as_ref(), gc, &self.geo)
    }

    // ---------------------------------------------------------------- reads

    /// Reads `bufs` in turn from guest `offset`.
    pub fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
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
            let first = (cs - self.geo.in_cluster(pos)).min(end - pos);
            // Extend the run over following clusters that continue it.
            let mut run = first;
            while pos + run < end {
                let p2 = pos + run;
                let m2 = self.mapping(p2)?;
                let cont = match (m, m2) {
                    (Mapping::Data { host: h1, .. }, Mapping::Data { host: h2, .. }) => {
                        h2 == h1 + (p2 - (pos - self.geo.in_cluster(pos)))
                    }
                    (Mapping::Unallocated, Mapping::Unallocated) => true,
                    (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                    _ => false,
                };
                if !cont {
                    next = Some(m2);
                    break;
                }
                run += (end - p2).min(cs);
            }
            let run_usize = to_usize(run)?;
            let mut slices = cur.take(run_usize);
            match m {
                Mapping::Data { host, .. } => {
                    self.read_data(host + self.geo.in_cluster(pos), pos, &mut slices)?
                }
                Mapping::Zero { .. } => fill_zero(&mut slices),
                Mapping::Unallocated => self.read_backing(pos, &mut slices)?,
                Mapping::Compressed {
                    offset: co,
                    len: cl,
                } => {
                    let mut buf = vec![0u8; self.geo.cluster_usize()];
                    self.read_compressed(co, cl, &mut buf)?;
                    let mut p = to_usize(self.geo.in_cluster(pos))?;
                    for s in slices.iter_mut() {
                        let n = s.len();
                        s.copy_from_slice(&buf[p..p + n]);
                        p += n;
                    }
                }
            }
            pos += run;
        }
        Ok(())
    }

    fn read_data(&self, host: u64, guest: u64, slices: &mut [IoSliceMut<'_>]) -> Result<()> {
        let Some(crypt) = &self.crypt else {
            self.storage.readv_at(slices, host)?;
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

    /// Fills `buf` (one cluster) with the current content of guest cluster `gc_off`.
    fn cluster_content(&self, m: Mapping, gc_off: u64, buf: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Unallocated => {
                let mut s = [IoSliceMut::new(buf)];
                self.read_backing(gc_off, &mut s)
            }
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => {
                self.storage.read_at(buf, host)?;
                if let Some(c) = &self.crypt {
                    c.decrypt(buf, host, gc_off)?;
                }
                Ok(())
            }
            Mapping::Compressed { offset, len } => self.read_compressed(offset, len, buf),
        }
    }

    // --------------------------------------------------------------- writes

    /// Writes `bufs` in turn at guest `offset`. The buffers are never modified.
    pub fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        {
            let m = self.meta_r();
            if m.written {
                if let Some(runs) = self.in_place_runs(&m, offset, len)? {
                    let mut cur = IovRef::new(bufs);
                    for (host, guest, n) in runs {
                        let s = cur.take(to_usize(n)?);
                        self.write_data(host, guest, &s)?;
                    }
                    return Ok(());
                }
            }
        }
        self.write_slow(offset, bufs)
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
            let n = (self.geo.cluster_size - self.geo.in_cluster(pos)).min(end - pos);
            let gc = self.geo.guest_cluster(pos);
            let l1_copied =
                m.l1.get(self.geo.split(gc)?.0)
                    .is_some_and(|e| e & COPIED != 0);
            match m.lookup(gc, &self.geo)? {
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

    /// Writes guest data to a host range, encrypting into a bounce buffer when needed.
    fn write_data(&self, host: u64, guest: u64, src: &[IoSlice<'_>]) -> Result<()> {
        let Some(crypt) = &self.crypt else {
            self.storage.writev_at(src, host)?;
            return Ok(());
        };
        let n: usize = src.iter().map(|s| s.len()).sum();
        let chunk_max = self.geo.cluster_usize();
        BOUNCE.with(|cell| -> Result<()> {
            let mut fresh = (Vec::new(), Vec::new());
            let mut guard = cell.try_borrow_mut().ok();
            let (a, b) = match guard.as_deref_mut() {
                Some(x) => (&mut x.0, &mut x.1),
                None => (&mut fresh.0, &mut fresh.1),
            };
            a.resize(chunk_max, 0);
            b.resize(chunk_max, 0);
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
            // We do not maintain bitmaps or anything else behind autoclear bits.
            // Clear them all: bit 0 (bitmaps) included, as we do not update bitmaps.
            let keep = self.header.autoclear & !(AUTOCLEAR_BITMAPS | !0);
            self.storage.write_at(&keep.to_be_bytes(), OFF_AUTOCLEAR)?;
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
            m.load_l2(st, old, &self.geo)?;
            return Ok(old);
        }
        let table = if old == 0 {
            vec![0u64; 1 << self.geo.l2_bits]
        } else {
            m.load_l2(st, old, &self.geo)?;
            m.l2.get(old).map(<[u64]>::to_vec).ok_or(Error::BadOffset {
                what: "L2 table",
                offset: old,
            })?
        };
        let new = m.rc.alloc(st, 1)?;
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

    /// Sets L2 entry `l2i` of the (writable, cached) table at `l2` and queues its write.
    fn set_l2(&self, m: &mut Meta, l2: u64, l2i: usize, v: u64, pw: &mut PtrWrites) -> Result<()> {
        let t = m.l2.get_mut(l2).ok_or(Error::BadOffset {
            what: "L2 table",
            offset: l2,
        })?;
        t[l2i] = v;
        pw.l2.insert(l2 + (l2i as u64) * 8, v);
        Ok(())
    }

    /// The barrier, then the pointer writes (L2 entries before L1 entries).
    fn commit(&self, m: &mut Meta, pw: PtrWrites) -> Result<()> {
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
        if m.pending_frees.len() > MAX_PENDING_FREES {
            self.apply_frees(m)?;
        }
        Ok(())
    }

    fn apply_frees(&self, m: &mut Meta) -> Result<()> {
        if m.pending_frees.is_empty() {
            return Ok(());
        }
        self.storage.sync()?;
        let frees = std::mem::take(&mut m.pending_frees);
        for (off, len) in frees {
            if let Err(e) = m.rc.free(self.storage.as_ref(), off, len) {
                log::warn!("cannot free cluster at {off:#x}: {e}");
            }
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
        let mut buf: Vec<u8> = Vec::new();
        while pos < end {
            let inc = self.geo.in_cluster(pos);
            let n = (cs - inc).min(end - pos);
            let gc = self.geo.guest_cluster(pos);
            let gc_off = pos - inc;
            let map = m.lookup_load(st, gc, &self.geo)?;
            let l1 = self.geo.split(gc)?.0;
            let l1_copied = m.l1.get(l1).is_some_and(|e| e & COPIED != 0);
            let src = cur.take(to_usize(n)?);
            if let (Mapping::Data { host, copied: true }, true) = (map, l1_copied) {
                self.write_data(host + inc, pos, &src)?;
                pos += n;
                continue;
            }
            let (l1i, l2i) = self.geo.split(gc)?;
            let l2 = self.l2_writable(m, l1i, &mut pw)?;
            let new = m.rc.alloc(st, 1)?;
            pw.need_sync = true;
            if n == cs && self.crypt.is_none() {
                st.writev_at(&src, new)?;
            } else {
                buf.resize(self.geo.cluster_usize(), 0);
                if n < cs {
                    self.cluster_content(map, gc_off, &mut buf)?;
                }
                let i = to_usize(inc)?;
                copy_from(&src, &mut buf[i..i + to_usize(n)?]);
                match &self.crypt {
                    None => st.write_at(&buf, new)?,
                    Some(c) => {
                        let mut enc = vec![0u8; buf.len()];
                        c.encrypt_to(&buf, &mut enc, new, gc_off)?;
                        st.write_at(&enc, new)?;
                    }
                }
            }
            self.set_l2(m, l2, l2i, new | COPIED, &mut pw)?;
            if let Some(r) = map.host_range(cs) {
                m.pending_frees.push(r);
            }
            pos += n;
        }
        self.commit(m, pw)
    }

    /// Makes every completed write durable; then releases clusters dropped since the last flush.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta_w();
        self.storage.sync()?;
        if !m.pending_frees.is_empty() {
            self.apply_frees(&mut m)?;
            self.storage.sync()?;
        }
        Ok(())
    }

    // ------------------------------------------------------ discard / zeroes

    /// Discards whole clusters inside the range (partial clusters are left alone, as QEMU does).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
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
        if self.read_only {
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
            let map = m.lookup_load(st, gc, &self.geo)?;
            pos += cs;
            let new = if v3 { ZERO } else { 0 };
            let skip = match map {
                Mapping::Zero { host: 0 } => true,
                Mapping::Unallocated => !(v3 && has_backing),
                _ => false,
            };
            if skip {
                continue;
            }
            let l2 = self.l2_writable(m, l1i, &mut pw)?;
            self.set_l2(m, l2, l2i, new, &mut pw)?;
            if let Some(r) = map.host_range(cs) {
                m.pending_frees.push(r);
            }
        }
        self.commit(m, pw)?;
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
            let host = m.rc.alloc(st, n)?;
            if full {
                st.write_zeroes(host, n * cs)?;
            }
            end_of_data = end_of_data.max(host + n * cs);
            for i in 0..n {
                let (_, l2i) = self.geo.split(gc + i)?;
                self.set_l2(m, l2, l2i, (host + i * cs) | COPIED, &mut pw)?;
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
