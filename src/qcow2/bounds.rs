//! Bounds of the metadata offsets an image gives us, checked once at open.
//!
//! Writes go wherever the L1 and refcount tables point: an entry far past the end of the file
//! would make the first allocation or L2 update write at an absurd offset (a sparse file of
//! petabytes). A read-write open refuses such tables instead, with the file untouched.
//!
//! [`MetaRanges`] is the overlap check: the metadata ranges found at open, against which every
//! in-place data write is checked (a hit is confirmed against the current tables, since
//! metadata freed since open may have become data).

use std::collections::BTreeMap;

use super::alloc::RT_OFFSET_MASK;
use super::header::Header;
use super::metadata::OFFSET_MASK;
use super::{Error, Result};

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

/// Host ranges of the metadata found at open (header, L1, refcount table and blocks, L2
/// tables, snapshot table, LUKS header): guest data must never be written over them.
#[derive(Debug, Default)]
pub(super) struct MetaRanges(BTreeMap<u64, u64>);

impl MetaRanges {
    /// Collects the ranges of the active metadata. Tables allocated later come from the
    /// refcounts, so only an image whose refcounts are already wrong could overlap them.
    /// `rt` is the refcount table's (offset, clusters), which moves when it grows.
    pub(super) fn build(
        h: &Header,
        cluster_size: u64,
        l1: &[u64],
        refcount_table: &[u64],
        rt: (u64, u64),
    ) -> Self {
        let cs = cluster_size;
        let mut v: Vec<(u64, u64)> = vec![
            (0, cs),
            (h.l1_table_offset, u64::from(h.l1_size).saturating_mul(8)),
            (rt.0, rt.1.saturating_mul(cs)),
        ];
        if h.nb_snapshots > 0 {
            v.push((h.snapshots_offset, cs));
        }
        if let Some(fde) = h.fde {
            v.push(fde);
        }
        v.extend(
            refcount_table
                .iter()
                .map(|e| e & RT_OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| (o, cs)),
        );
        v.extend(
            l1.iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| (o, cs)),
        );
        let mut v: Vec<(u64, u64)> = v
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(s, len)| (s, s.saturating_add(len)))
            .collect();
        v.sort_unstable();
        let mut map = BTreeMap::new();
        let mut cur: Option<(u64, u64)> = None;
        for (s, e) in v {
            cur = match cur {
                Some((cs_, ce)) if s <= ce => Some((cs_, ce.max(e))),
                Some((cs_, ce)) => {
                    map.insert(cs_, ce);
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((s, e)) = cur {
            map.insert(s, e);
        }
        Self(map)
    }

    /// Whether `start..start+len` overlaps any metadata range.
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
