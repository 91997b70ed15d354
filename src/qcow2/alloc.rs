//! Refcounts and cluster allocation (docs/interop/qcow2.rst "Cluster Refcounts").
//!
//! Two-level structure: the refcount table (in the header's clusters) points at refcount blocks
//! holding `1 << refcount_order`-bit entries. Every order 0..=6 is supported: orders below 3 pack
//! several entries per byte, least-significant bits first (as QEMU's `get_refcount_ro0..2`);
//! orders 3..=6 are big-endian integers.
//!
//! Writes are write-through: every change is written to the file before the caller goes on, in an
//! order that only ever leaks clusters on a crash (a new refcount block is durable before the
//! table points at it; a new table is durable before the header points at it).

use std::collections::HashMap;

use super::header::{MAX_HOST_OFFSET, MAX_REFTABLE_BYTES, OFF_REFCOUNT_TABLE};
use super::Error;
use crate::storage::Storage;

/// Mask of the refcount-block offset in a refcount-table entry (bits 9..=63; low bits reserved).
pub const RT_OFFSET_MASK: u64 = !0x1ff;

/// Refcount state of an image. Used only under the metadata write lock.
pub struct Refcounts {
    order: u32,
    cluster_bits: u32,
    /// log2 of the entries per refcount block.
    epb_bits: u32,
    /// The table in memory; entries past `disk_entries` exist only while the table grows.
    table: Vec<u64>,
    table_offset: u64,
    disk_entries: usize,
    blocks: HashMap<u64, Vec<u8>>,
    /// First cluster index that may be free.
    hint: u64,
    read_only: bool,
    /// Bumped whenever the table moves or a block is added (the overlap check's live set
    /// follows it).
    layout_gen: u64,
    /// End of the highest cluster allocated so far (at least the file's length at load).
    high_water: u64,
}

impl Refcounts {
    /// Loads the refcount table described by the header fields.
    pub fn load(
        storage: &dyn Storage,
        order: u32,
        cluster_bits: u32,
        table_offset: u64,
        table_clusters: u32,
        read_only: bool,
    ) -> Result<Self, Error> {
        let bytes = u64::from(table_clusters) << cluster_bits;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(Error::InvalidHeader {
                what: "refcount table larger than 8 MiB",
            });
        }
        let table = super::codec::read(storage, table_offset, bytes / 8)?;
        Ok(Self {
            order,
            cluster_bits,
            epb_bits: cluster_bits + 3 - order,
            disk_entries: table.len(),
            table,
            table_offset,
            blocks: HashMap::new(),
            hint: 0,
            read_only,
            layout_gen: 0,
            high_water: storage.len()?.div_ceil(1 << cluster_bits) << cluster_bits,
        })
    }

    /// Largest refcount value.
    pub fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// Refcount-table entries (block offsets).
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Table offset and clusters.
    pub fn table_location(&self) -> (u64, u64) {
        let bytes = (self.disk_entries as u64) * 8;
        (self.table_offset, bytes >> self.cluster_bits)
    }

    /// Changes whenever the refcount table moves or gains a block.
    pub fn layout_gen(&self) -> u64 {
        self.layout_gen
    }

    /// Host offsets below this are inside the image: the file's length at open (rounded up to
    /// a cluster) or the end of the highest cluster allocated since.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Entries per refcount block.
    pub fn entries_per_block(&self) -> u64 {
        1 << self.epb_bits
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn block_offset(&self, bi: u64) -> Result<Option<u64>, Error> {
        let Ok(i) = usize::try_from(bi) else {
            return Ok(None);
        };
        let Some(&e) = self.table.get(i) else {
            return Ok(None);
        };
        let off = e & RT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) || off >= MAX_HOST_OFFSET {
            return Err(Error::BadOffset {
                what: "refcount block",
                offset: off,
            });
        }
        Ok(Some(off))
    }

    fn load_block(&mut self, storage: &dyn Storage, off: u64) -> Result<&mut Vec<u8>, Error> {
        if !self.blocks.contains_key(&off) {
            let mut b = vec![0u8; usize::try_from(self.cs()).map_err(|_| Error::TooLarge)?];
            storage.read_at(&mut b, off)?;
            self.blocks.insert(off, b);
        }
        self.blocks.get_mut(&off).ok_or(Error::BadOffset {
            what: "refcount block",
            offset: off,
        })
    }

    /// Reads entry `idx` of a block.
    pub fn entry(order: u32, b: &[u8], idx: usize) -> u64 {
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let per = 8 / bits;
                let byte = b[idx / per];
                let shift = (idx % per) * bits;
                u64::from((byte >> shift) & ((1u8 << bits) - 1))
            }
            3 => u64::from(b[idx]),
            4 => u64::from(u16::from_be_bytes([b[idx * 2], b[idx * 2 + 1]])),
            5 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(&b[idx * 4..idx * 4 + 4]);
                u64::from(u32::from_be_bytes(a))
            }
            _ => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[idx * 8..idx * 8 + 8]);
                u64::from_be_bytes(a)
            }
        }
    }

    /// Sets entry `idx` of a block (value already range-checked); returns the byte range touched.
    pub fn set_entry(order: u32, b: &mut [u8], idx: usize, v: u64) -> (usize, usize) {
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let per = 8 / bits;
                let shift = (idx % per) * bits;
                let mask = ((1u8 << bits) - 1) << shift;
                let byte = &mut b[idx / per];
                let low = u8::try_from(v & 0xff).unwrap_or(0);
                *byte = (*byte & !mask) | ((low << shift) & mask);
                (idx / per, idx / per + 1)
            }
            3 => {
                b[idx] = u8::try_from(v).unwrap_or(u8::MAX);
                (idx, idx + 1)
            }
            4 => {
                let s = idx * 2;
                b[s..s + 2].copy_from_slice(&u16::try_from(v).unwrap_or(u16::MAX).to_be_bytes());
                (s, s + 2)
            }
            5 => {
                let s = idx * 4;
                b[s..s + 4].copy_from_slice(&u32::try_from(v).unwrap_or(u32::MAX).to_be_bytes());
                (s, s + 4)
            }
            _ => {
                let s = idx * 8;
                b[s..s + 8].copy_from_slice(&v.to_be_bytes());
                (s, s + 8)
            }
        }
    }

    /// The refcount of cluster index `c` (0 where no block covers it).
    pub fn get(&mut self, storage: &dyn Storage, c: u64) -> Result<u64, Error> {
        let Some(off) = self.block_offset(c >> self.epb_bits)? else {
            return Ok(0);
        };
        let idx =
            usize::try_from(c & (self.entries_per_block() - 1)).map_err(|_| Error::TooLarge)?;
        let order = self.order;
        let b = self.load_block(storage, off)?;
        Ok(Self::entry(order, b, idx))
    }

    /// Sets the refcount of cluster index `c`, creating its refcount block if needed.
    pub fn set(&mut self, storage: &dyn Storage, c: u64, v: u64) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if v > self.max_value() {
            return Err(Error::RefcountOverflow {
                offset: c << self.cluster_bits,
            });
        }
        let off = self.ensure_block(storage, c >> self.epb_bits)?;
        let idx =
            usize::try_from(c & (self.entries_per_block() - 1)).map_err(|_| Error::TooLarge)?;
        let order = self.order;
        let b = self.load_block(storage, off)?;
        let (s, e) = Self::set_entry(order, b, idx, v);
        let bytes = b[s..e].to_vec();
        self.write_block_bytes(storage, off, s, &bytes)
    }

    /// Writes part of a cached block; on failure drops the cached block, so that memory never
    /// says what the disk may not (it is read again on next use).
    fn write_block_bytes(
        &mut self,
        storage: &dyn Storage,
        off: u64,
        at: usize,
        bytes: &[u8],
    ) -> Result<(), Error> {
        if let Err(e) = storage.write_at(bytes, off + at as u64) {
            self.blocks.remove(&off);
            return Err(e.into());
        }
        Ok(())
    }

    /// Adds `delta` (±1) to the refcount of cluster index `c`; returns the new value.
    pub fn update(&mut self, storage: &dyn Storage, c: u64, inc: bool) -> Result<u64, Error> {
        let v = self.get(storage, c)?;
        let nv = if inc {
            v.checked_add(1)
                .filter(|&n| n <= self.max_value())
                .ok_or(Error::RefcountOverflow {
                    offset: c << self.cluster_bits,
                })?
        } else {
            v.checked_sub(1).ok_or(Error::BadOffset {
                what: "freeing a cluster with refcount 0",
                offset: c << self.cluster_bits,
            })?
        };
        self.set(storage, c, nv)?;
        if nv == 0 && c < self.hint {
            self.hint = c;
        }
        Ok(nv)
    }

    fn ensure_block(&mut self, storage: &dyn Storage, bi: u64) -> Result<u64, Error> {
        if let Some(off) = self.block_offset(bi)? {
            return Ok(off);
        }
        let bi_usize = usize::try_from(bi).map_err(|_| Error::TooLarge)?;
        if bi_usize >= self.table.len() {
            self.grow(storage, bi_usize)?;
            // Growing may itself have created this block (to count the new table).
            if let Some(off) = self.block_offset(bi)? {
                return Ok(off);
            }
        }
        let c = self.find_free(storage, 1)?;
        let off = c << self.cluster_bits;
        let mut blk = vec![0u8; usize::try_from(self.cs()).map_err(|_| Error::TooLarge)?];
        let self_cover = c >> self.epb_bits == bi;
        if self_cover {
            let idx =
                usize::try_from(c & (self.entries_per_block() - 1)).map_err(|_| Error::TooLarge)?;
            Self::set_entry(self.order, &mut blk, idx, 1);
        }
        storage.write_at(&blk, off)?;
        self.blocks.insert(off, blk);
        self.table[bi_usize] = off;
        self.layout_gen += 1;
        let mut counted = false;
        let r = (|| {
            if !self_cover {
                self.update(storage, c, true)?;
                counted = true;
            }
            // The block (and its own refcount) must be durable before the table points at it.
            storage.sync()?;
            if bi_usize < self.disk_entries {
                storage.write_at(&off.to_be_bytes(), self.table_offset + bi * 8)?;
            }
            Ok(off)
        })();
        if r.is_err() {
            // Memory follows the disk: the table does not point at the block, whose own count
            // is given back.
            self.table[bi_usize] = 0;
            self.blocks.remove(&off);
            if counted {
                if let Err(e) = self.update(storage, c, false) {
                    log::warn!("cannot give back a refcount block's cluster: {e}");
                }
            }
        }
        r
    }

    /// Grows the refcount table so that it has an entry `min_index`.
    fn grow(&mut self, storage: &dyn Storage, min_index: usize) -> Result<(), Error> {
        let per_cluster = usize::try_from(self.cs() / 8).map_err(|_| Error::TooLarge)?;
        let want = (min_index + 1)
            .max(self.table.len().saturating_mul(2))
            .div_ceil(per_cluster)
            * per_cluster;
        if (want as u64) * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge);
        }
        let old_len = self.table.len();
        self.table.resize(want, 0);
        let r = self.grow_to(storage, want, per_cluster);
        if r.is_err() {
            self.table.truncate(old_len.max(self.disk_entries));
        }
        r
    }

    fn grow_to(
        &mut self,
        storage: &dyn Storage,
        want: usize,
        per_cluster: usize,
    ) -> Result<(), Error> {
        let nclusters = (want / per_cluster) as u64;
        let c = self.find_free(storage, nclusters)?;
        let new_off = c << self.cluster_bits;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(
            &u32::try_from(nclusters)
                .map_err(|_| Error::TooLarge)?
                .to_be_bytes(),
        );
        let mut counted = 0;
        let r = (|| {
            for i in 0..nclusters {
                self.update(storage, c + i, true)?;
                counted += 1;
            }
            super::codec::write(storage, new_off, &self.table)?;
            storage.sync()?;
            storage.write_at(&hdr, OFF_REFCOUNT_TABLE)?;
            storage.sync()?;
            Ok::<(), Error>(())
        })();
        if let Err(e) = r {
            // Switched after all if the header says so (a failed sync after the write);
            // otherwise the new table's clusters are given back (no leak).
            let mut now = [0u8; 8];
            let switched = counted == nclusters
                && storage.read_at(&mut now, OFF_REFCOUNT_TABLE).is_ok()
                && now == hdr[..8];
            if !switched {
                for i in 0..counted {
                    if let Err(e2) = self.update(storage, c + i, false) {
                        log::warn!("cannot give back a refcount-table cluster: {e2}");
                    }
                }
                return Err(e);
            }
        }
        let (old_off, old_clusters) = self.table_location();
        self.table_offset = new_off;
        self.disk_entries = want;
        self.layout_gen += 1;
        for i in 0..old_clusters {
            self.update(storage, (old_off >> self.cluster_bits) + i, false)?;
        }
        Ok(())
    }

    /// Finds `n` consecutive clusters with refcount 0 (not yet referenced) from the hint on, and
    /// moves the hint past them. Nothing is written.
    pub fn find_free(&mut self, storage: &dyn Storage, n: u64) -> Result<u64, Error> {
        // A free run always exists at the end of the file; scanning much further means the
        // refcounts are garbage (a hostile image could otherwise make this loop for hours).
        let file_clusters = storage.len()?.div_ceil(self.cs());
        let max_c = (MAX_HOST_OFFSET >> self.cluster_bits)
            .min(file_clusters.saturating_add(n).saturating_add(1 << 20));
        let mut start = self.hint;
        let mut run = 0u64;
        let mut c = self.hint;
        while run < n {
            if c >= max_c {
                return Err(Error::BadOffset {
                    what: "no free cluster after the end of the file (refcounts corrupt?)",
                    offset: c << self.cluster_bits,
                });
            }
            if self.block_offset(c >> self.epb_bits)?.is_none() {
                // A whole uncovered block is free.
                let block_end = ((c >> self.epb_bits) + 1) << self.epb_bits;
                if run == 0 {
                    start = c;
                }
                let take = (block_end - c).min(n - run);
                run += take;
                c += take;
                continue;
            }
            if self.get(storage, c)? == 0 {
                if run == 0 {
                    start = c;
                }
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        self.hint = start + n;
        self.high_water = self.high_water.max((start + n) << self.cluster_bits);
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1) and returns the host offset of the first.
    pub fn alloc(&mut self, storage: &dyn Storage, n: u64) -> Result<u64, Error> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let c = self.find_free(storage, n)?;
        let mut done = 0;
        if let Err(e) = self.alloc_at(storage, c, n, &mut done) {
            // Give back what was counted (a leak otherwise); memory follows the disk.
            for x in c..c + done {
                if let Err(e2) = self.set(storage, x, 0) {
                    log::warn!("cannot give back cluster {x}: {e2}");
                }
            }
            return Err(e);
        }
        Ok(c << self.cluster_bits)
    }

    /// Sets the refcounts of `c..c+n` to 1, one write per block; `done` counts the clusters
    /// whose count reached the file.
    fn alloc_at(
        &mut self,
        storage: &dyn Storage,
        c: u64,
        n: u64,
        done: &mut u64,
    ) -> Result<(), Error> {
        // Batch the entry writes per block.
        let mut i = 0;
        while i < n {
            let cl = c + i;
            let bi = cl >> self.epb_bits;
            let off = self.ensure_block(storage, bi)?;
            let block_end = (bi + 1) << self.epb_bits;
            let upto = (c + n).min(block_end);
            let order = self.order;
            let mask = self.entries_per_block() - 1;
            let b = self.load_block(storage, off)?;
            let mut lo = usize::MAX;
            let mut hi = 0;
            for x in cl..upto {
                let idx = usize::try_from(x & mask).map_err(|_| Error::TooLarge)?;
                if Self::entry(order, b, idx) != 0 {
                    // Entries set above in this block never reached the file.
                    self.blocks.remove(&off);
                    return Err(Error::BadOffset {
                        what: "allocating a cluster in use",
                        offset: x,
                    });
                }
                let (s, e) = Self::set_entry(order, b, idx, 1);
                lo = lo.min(s);
                hi = hi.max(e);
            }
            let bytes = b[lo..hi].to_vec();
            self.write_block_bytes(storage, off, lo, &bytes)?;
            i = upto - c;
            *done = i;
        }
        Ok(())
    }

    /// Decrements the refcount of every cluster overlapping `offset..offset+len`; appends the
    /// offsets of clusters that became free to `freed`.
    pub fn free(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: u64,
        freed: &mut Vec<u64>,
    ) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for c in first..=last {
            if self.update(storage, c, false)? == 0 {
                freed.push(c << self.cluster_bits);
            }
        }
        Ok(())
    }

    /// Drops cached blocks (after an external rewrite of the structure).
    pub fn reset_hint(&mut self) {
        self.hint = 0;
    }
}
