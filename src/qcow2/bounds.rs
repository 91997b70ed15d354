//! Bounds of the metadata offsets an image gives us, checked once at open.
//!
//! Writes go wherever the L1 and refcount tables point: an entry far past the end of the file
//! would make the first allocation or L2 update write at an absurd offset (a sparse file of
//! petabytes). A read-write open refuses such tables instead, with the file untouched.
//!
//! [`Overlap`] is the overlap check, consulted before every data write (in place or to a newly
//! allocated cluster) and before a new L2 table is written.

use std::collections::BTreeMap;

use super::alloc::{Refcounts, RT_OFFSET_MASK};
use super::codec;
use super::header::Header;
use super::metadata::OFFSET_MASK;
use super::snapshot::{l1_valid, read_bitmaps, read_snapshots, MAX_BITMAP_BYTES};
use super::{Error, Result};
use crate::storage::Storage;

/// Refuses refcount blocks and L2 tables that start a cluster or more past the end of the file.
pub(super) fn check_table_offsets(
    file_len: u64,
    cluster_size: u64,
    l1: &[u64],
    refcount_table: &[u64],
) -> Result<()> {
    let limit = file_len.saturating_add(cluster_size);
    let tables = [
        ("refcount block", refcount_table, RT_OFFSET_MASK),
        ("L2 table", l1, OFFSET_MASK),
    ];
    for (what, table, mask) in tables {
        for &e in table {
            let off = e & mask;
            if off != 0 && off >= limit {
                log::error!("{what} at {off:#x} is beyond the end of the file ({file_len:#x})");
                return Err(Error::BadTable {
                    what,
                    offset: off,
                    reason: "beyond the end of the file",
                });
            }
        }
    }
    Ok(())
}

/// A set of host byte ranges (merged, sorted).
#[derive(Debug, Default, Clone)]
pub(super) struct MetaRanges(BTreeMap<u64, u64>);

impl MetaRanges {
    fn from_ranges(v: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut r = Self::default();
        for (s, len) in v {
            r.insert(s, len);
        }
        r
    }

    /// Adds `start..start+len`, merging with its neighbours.
    pub(super) fn insert(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut s = start;
        let mut e = start.saturating_add(len);
        // Absorb every range that touches s..e.
        while let Some((&ks, &ke)) = self.0.range(..=e).next_back() {
            if ke < s {
                break;
            }
            s = s.min(ks);
            e = e.max(ke);
            self.0.remove(&ks);
        }
        self.0.insert(s, e);
    }

    /// Whether `start..start+len` overlaps any range.
    pub(super) fn overlaps(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len);
        len > 0
            && self
                .0
                .range(..end)
                .next_back()
                .is_some_and(|(_, &e)| e > start)
    }
}

/// The overlap check: every host range that holds metadata, which guest data must never be
/// written over (QEMU's `qcow2_check_metadata_overlap`, in its "all" mode).
///
/// - `fixed`: what this engine never moves or frees: the header cluster, the active L1 table,
///   the whole snapshot table, every snapshot's L1 table and the L2 tables they use, the bitmap
///   directory, bitmap tables and bitmap data clusters, the LUKS header region.
/// - `live`: what moves: the refcount table and blocks and the active L2 tables. Tables the
///   engine allocates are added as they are made; a hit is confirmed against the current
///   tables (metadata freed since may have become data), and the set is rebuilt whenever the
///   refcount structure changed shape.
#[derive(Debug, Default)]
pub(super) struct Overlap {
    fixed: MetaRanges,
    live: MetaRanges,
    /// [`Refcounts::layout_gen`] that `live` was built at.
    rc_gen: u64,
}

impl Overlap {
    /// Collects every metadata range of an image opened read-write.
    pub(super) fn build(
        st: &dyn Storage,
        h: &Header,
        cluster_size: u64,
        l1: &[u64],
        rc: &Refcounts,
    ) -> Result<Self> {
        let cs = cluster_size;
        let file_len = st.len()?;
        let mut fixed = MetaRanges::from_ranges([
            (0, cs),
            (h.l1_table_offset, u64::from(h.l1_size).saturating_mul(8)),
        ]);
        if let Some(fde) = h.fde {
            fixed.insert(fde.0, fde.1);
        }
        // Each table read here lies in the file: a sane image needs at most its own size.
        let mut budget = file_len.saturating_add(64 << 20);
        let mut spend = |bytes: u64| -> Result<()> {
            budget = budget.checked_sub(bytes).ok_or(Error::TooLarge)?;
            Ok(())
        };
        if h.nb_snapshots > 0 {
            let snaps = read_snapshots(st, h, file_len)?;
            fixed.insert(h.snapshots_offset, snaps.table_bytes);
            for t in snaps.l1_tables {
                if !l1_valid(&t, cs, file_len) {
                    continue;
                }
                spend(t.entries * 8)?;
                fixed.insert(t.offset, t.entries * 8);
                for e in codec::read(st, t.offset, t.entries)? {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        fixed.insert(off, cs);
                    }
                }
            }
        }
        if let Some((dir_off, dir_len, tables)) = read_bitmaps(st, h, file_len)? {
            fixed.insert(dir_off, dir_len);
            for t in tables {
                if !t.valid(1, MAX_BITMAP_BYTES, file_len) {
                    continue;
                }
                spend(t.entries * 8)?;
                fixed.insert(t.offset, t.entries * 8);
                for e in codec::read(st, t.offset, t.entries)? {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        fixed.insert(off, cs);
                    }
                }
            }
        }
        let mut o = Self {
            fixed,
            ..Self::default()
        };
        o.rebuild_live(cs, l1, rc);
        Ok(o)
    }

    fn live_now(cs: u64, l1: &[u64], rc: &Refcounts) -> MetaRanges {
        let (rt_off, rt_clusters) = rc.table_location();
        let blocks = rc
            .table()
            .iter()
            .map(|e| e & RT_OFFSET_MASK)
            .filter(|&o| o != 0);
        let l2s = l1.iter().map(|e| e & OFFSET_MASK).filter(|&o| o != 0);
        MetaRanges::from_ranges(
            std::iter::once((rt_off, rt_clusters.saturating_mul(cs)))
                .chain(blocks.chain(l2s).map(|o| (o, cs))),
        )
    }

    /// Rebuilds the live set from the current tables.
    pub(super) fn rebuild_live(&mut self, cs: u64, l1: &[u64], rc: &Refcounts) {
        self.live = Self::live_now(cs, l1, rc);
        self.rc_gen = rc.layout_gen();
    }

    /// Records a table the engine just allocated.
    pub(super) fn add_live(&mut self, start: u64, len: u64) {
        self.live.insert(start, len);
    }

    /// Whether `host..host+len` holds metadata now.
    pub(super) fn hits(&self, host: u64, len: u64, cs: u64, l1: &[u64], rc: &Refcounts) -> bool {
        if self.fixed.overlaps(host, len) {
            return true;
        }
        if rc.layout_gen() == self.rc_gen && !self.live.overlaps(host, len) {
            return false;
        }
        // A possible hit (or the refcount structure changed shape): confirm with the tables.
        Self::live_now(cs, l1, rc).overlaps(host, len)
    }

    /// Whether [`Overlap::hits`] would rebuild: the slow path refreshes the set first.
    pub(super) fn stale(&self, rc: &Refcounts) -> bool {
        rc.layout_gen() != self.rc_gen
    }
}
