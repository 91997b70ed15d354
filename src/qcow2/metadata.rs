//! Mapping metadata: the L1 table, a cache of L2 tables and the refcounts, kept together behind
//! one lock (in [`super::Qcow2`]). Lookups answer a [`Mapping`] for one guest cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::alloc::Refcounts;
use super::types::Geometry;
use super::Error;
use crate::storage::Storage;

/// L1/L2 entry bit 63: refcount is exactly 1, the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0: reads as zeroes.
pub const ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where the data of one guest cluster lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated: reads from the backing file, or as zeroes without one.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster (or 0).
    Zero { host: u64 },
    /// A standard data cluster; `copied` means refcount 1 (writable in place).
    Data { host: u64, copied: bool },
    /// Compressed data at `offset`, at most `len` bytes.
    Compressed { offset: u64, len: u64 },
}

impl Mapping {
    /// Decodes a standard (64-bit) L2 entry.
    pub fn decode(entry: u64, geo: &Geometry) -> Result<Self, Error> {
        if entry & COMPRESSED != 0 {
            let shift = 62 - (geo.cluster_bits - 8);
            let offset = entry & ((1u64 << shift) - 1);
            let sectors = ((entry & !(COPIED | COMPRESSED)) >> shift) + 1;
            let len = sectors * 512 - (offset & 511);
            return Ok(Mapping::Compressed { offset, len });
        }
        let host = entry & OFFSET_MASK;
        // With extended L2, bit 0 is reserved: zeroes are per subcluster, in the bitmap.
        if entry & ZERO != 0 && !geo.extended {
            return Ok(Mapping::Zero { host });
        }
        if host == 0 {
            // Offset 0 is valid in an external data file, where COPIED tells it apart.
            if geo.data_file && entry & COPIED != 0 {
                return Ok(Mapping::Data { host, copied: true });
            }
            return Ok(Mapping::Unallocated);
        }
        if host & (geo.cluster_size - 1) != 0 {
            return Err(Error::BadOffset {
                what: "data cluster not aligned",
                offset: host,
            });
        }
        Ok(Mapping::Data {
            host,
            copied: entry & COPIED != 0,
        })
    }

    /// Decodes subcluster `j` of an extended L2 entry (`entry`, `bitmap`).
    pub fn decode_sub(entry: u64, bitmap: u64, j: u32, geo: &Geometry) -> Result<Self, Error> {
        let cluster = Self::decode(entry, geo)?;
        if let Mapping::Compressed { .. } = cluster {
            return Ok(cluster);
        }
        let alloc = bitmap & (1u64 << j) != 0;
        let zero = bitmap & (1u64 << (32 + j)) != 0;
        let host = entry & OFFSET_MASK;
        match (alloc, zero) {
            (true, true) => Err(Error::BadOffset {
                what: "subcluster both allocated and zero",
                offset: host,
            }),
            (true, false) if host == 0 && !(geo.data_file && entry & COPIED != 0) => {
                Err(Error::BadOffset {
                    what: "allocated subcluster without a host cluster",
                    offset: 0,
                })
            }
            (true, false) => Ok(cluster),
            (false, true) => Ok(Mapping::Zero { host: 0 }),
            (false, false) => Ok(Mapping::Unallocated),
        }
    }

    /// The host range a cluster mapping holds a reference on, if any.
    pub fn host_range(&self, cluster_size: u64) -> Option<(u64, u64)> {
        match *self {
            Mapping::Unallocated => None,
            Mapping::Zero { host: 0 } => None,
            Mapping::Zero { host } | Mapping::Data { host, .. } => Some((host, cluster_size)),
            Mapping::Compressed { offset, len } => Some((offset & !511, len + (offset & 511))),
        }
    }
}

struct CachedL2 {
    table: Vec<u64>,
    /// The cache epoch of the last use.
    last_use: AtomicU64,
}

/// A bounded cache of L2 tables, keyed by host offset, evicting the least recently used at the
/// granularity of an epoch (bumped by every insertion). A lookup only reads the shared epoch and
/// writes its entry's stamp when it changed, so hot lookups from many threads do not contend on
/// one cache line. Entries are write-through (never dirty), so eviction only drops them.
pub struct L2Cache {
    map: HashMap<u64, CachedL2>,
    cap: usize,
    epoch: AtomicU64,
}

impl L2Cache {
    /// A cache of at most `cap` tables.
    pub fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap: cap.max(4),
            epoch: AtomicU64::new(0),
        }
    }

    /// A cached table (marks it used; callable under the read lock).
    pub fn get(&self, off: u64) -> Option<&[u64]> {
        let e = self.map.get(&off)?;
        let now = self.epoch.load(Ordering::Relaxed);
        if e.last_use.load(Ordering::Relaxed) != now {
            e.last_use.store(now, Ordering::Relaxed);
        }
        Some(&e.table)
    }

    /// Mutable access to a cached table.
    pub fn get_mut(&mut self, off: u64) -> Option<&mut Vec<u64>> {
        self.map.get_mut(&off).map(|e| &mut e.table)
    }

    /// Inserts a table, evicting the least recently used one when full.
    pub fn insert(&mut self, off: u64, table: Vec<u64>) {
        let now = {
            let ep = self.epoch.get_mut();
            *ep += 1;
            *ep
        };
        if self.map.len() >= self.cap && !self.map.contains_key(&off) {
            let victim = self
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_use.load(Ordering::Relaxed))
                .map(|(&k, _)| k);
            if let Some(k) = victim {
                self.map.remove(&k);
            }
        }
        self.map.insert(
            off,
            CachedL2 {
                table,
                last_use: AtomicU64::new(now),
            },
        );
    }

    /// Drops a table.
    pub fn remove(&mut self, off: u64) {
        self.map.remove(&off);
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// A host range whose reference was dropped, and the free sequence number current when it was.
#[derive(Debug, Clone, Copy)]
pub struct PendingFree {
    pub offset: u64,
    pub len: u64,
    pub seq: u64,
}

/// Everything behind the metadata lock.
pub struct Meta {
    pub l1: Vec<u64>,
    pub l2: L2Cache,
    pub rc: Refcounts,
    /// Host ranges whose references were dropped but whose refcounts are decremented only after
    /// the next barrier (so that a reference is never durable to a cluster with refcount 0).
    pub pending_frees: Vec<PendingFree>,
    /// Bumped by each flush before its barrier: frees queued with a smaller or equal number had
    /// their pointer writes issued before that barrier.
    pub free_seq: u64,
    /// Whether the first-write header update (autoclear bits) was done.
    pub written: bool,
    /// Reserved data clusters (refcount 1, not yet referenced), taken from the end.
    pub pool: Vec<u64>,
    /// Bumped by every refcount increment a pointer may come to depend on (pool refill, new
    /// L2 table); `rc_synced` is the value the last completed barrier covered.
    pub rc_gen: u64,
    pub rc_synced: u64,
    /// Guest clusters with a transaction in flight (planned, not committed or rolled back).
    pub busy: std::collections::HashSet<u64>,
    /// L1 indices whose L2 table is being allocated or copied.
    pub busy_l1: std::collections::HashSet<usize>,
    /// Where metadata lives (guest data must not be written there).
    pub(super) overlap: super::bounds::Overlap,
}

/// Result of a lookup under the read lock.
pub enum Lookup<T = Mapping> {
    Found(T),
    /// The L2 table at this offset must be loaded first.
    Miss(u64),
}

impl Meta {
    /// L2 table offset for an L1 index (0 if none), validated.
    pub fn l2_offset(&self, l1_index: usize, geo: &Geometry) -> Result<u64, Error> {
        let e = self.l1.get(l1_index).copied().unwrap_or(0);
        let off = e & OFFSET_MASK;
        if off & (geo.cluster_size - 1) != 0 {
            return Err(Error::BadOffset {
                what: "L2 table not aligned",
                offset: off,
            });
        }
        Ok(off)
    }

    /// The raw L2 entry (and bitmap, 0 without extended L2) of guest cluster `gc`, without
    /// loading anything. An absent L2 table reads as (0, 0).
    pub fn lookup_entry(&self, gc: u64, geo: &Geometry) -> Result<Lookup<(u64, u64)>, Error> {
        let (l1i, l2i) = geo.split(gc)?;
        let l2 = self.l2_offset(l1i, geo)?;
        if l2 == 0 {
            return Ok(Lookup::Found((0, 0)));
        }
        match self.l2.get(l2) {
            Some(t) => {
                let w = l2i * geo.entry_words();
                let bitmap = if geo.extended { t[w + 1] } else { 0 };
                Ok(Lookup::Found((t[w], bitmap)))
            }
            None => Ok(Lookup::Miss(l2)),
        }
    }

    /// The mapping of the allocation unit (subcluster or cluster) holding guest `offset`.
    pub fn lookup(&self, offset: u64, geo: &Geometry) -> Result<Lookup, Error> {
        match self.lookup_entry(geo.guest_cluster(offset), geo)? {
            Lookup::Miss(off) => Ok(Lookup::Miss(off)),
            Lookup::Found((e, b)) => Ok(Lookup::Found(unit_mapping(e, b, offset, geo)?)),
        }
    }

    /// Loads the L2 table at `off` into the cache.
    pub fn load_l2(
        &mut self,
        storage: &dyn Storage,
        off: u64,
        geo: &Geometry,
    ) -> Result<(), Error> {
        if self.l2.get(off).is_some() {
            return Ok(());
        }
        if off >= storage.len()? {
            return Err(Error::BadOffset {
                what: "L2 table past the end of the file",
                offset: off,
            });
        }
        let t = super::codec::read(storage, off, geo.cluster_size / 8)?;
        self.l2.insert(off, t);
        Ok(())
    }

    /// The raw entry of guest cluster `gc`, loading its L2 table if needed (write lock held).
    pub fn entry_load(
        &mut self,
        storage: &dyn Storage,
        gc: u64,
        geo: &Geometry,
    ) -> Result<(u64, u64), Error> {
        match self.lookup_entry(gc, geo)? {
            Lookup::Found(e) => Ok(e),
            Lookup::Miss(off) => {
                self.load_l2(storage, off, geo)?;
                match self.lookup_entry(gc, geo)? {
                    Lookup::Found(e) => Ok(e),
                    Lookup::Miss(off) => Err(Error::BadOffset {
                        what: "L2 table",
                        offset: off,
                    }),
                }
            }
        }
    }

    /// The unit mapping of guest `offset`, loading its L2 table if needed (write lock held).
    pub fn lookup_load(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        geo: &Geometry,
    ) -> Result<Mapping, Error> {
        let (e, b) = self.entry_load(storage, geo.guest_cluster(offset), geo)?;
        unit_mapping(e, b, offset, geo)
    }
}

/// The mapping of the unit holding `offset`, from its cluster's raw entry.
pub fn unit_mapping(
    entry: u64,
    bitmap: u64,
    offset: u64,
    geo: &Geometry,
) -> Result<Mapping, Error> {
    if geo.extended {
        let j =
            u32::try_from(geo.in_cluster(offset) >> geo.unit_bits).map_err(|_| Error::TooLarge)?;
        Mapping::decode_sub(entry, bitmap, j, geo)
    } else {
        Mapping::decode(entry, geo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_cache_is_bounded_and_keeps_recently_used_tables() {
        let mut c = L2Cache::new(4);
        for off in 1..=5u64 {
            c.insert(off * 512, vec![off]);
        }
        // Inserting the 5th evicted one of the first four.
        assert_eq!(c.map.len(), 4);
        let x = (1..=4u64)
            .map(|o| o * 512)
            .find(|k| c.map.contains_key(k))
            .expect("a survivor");
        for off in 6..=30u64 {
            assert!(c.get(x).is_some(), "a table used before every insert stays");
            c.insert(off * 512, vec![off]);
            assert_eq!(c.map.len(), 4);
            assert_eq!(c.get(off * 512), Some(&[off][..]));
        }
    }
}
