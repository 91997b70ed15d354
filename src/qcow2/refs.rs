//! Counting references, as `qemu-img check` does (block/qcow2-refcount.c
//! `qcow2_check_refcounts`): every reference from the header, L1/L2 tables (active and
//! snapshots), snapshot table, refcount structures, encryption header and bitmaps. Shared by
//! the check and the refcount rebuild; time and memory follow the file's size.

use std::collections::BTreeMap;

use serde::Serialize;

use super::alloc::RT_OFFSET_MASK;
use super::codec;
use super::header::Header;
use super::metadata::{Mapping, OFFSET_MASK};
use super::snapshot::{l1_valid, read_bitmaps, read_snapshots, TableRef, MAX_BITMAP_BYTES};
use super::types::Geometry;
use super::{Error, Result};
use crate::storage::Storage;

/// Counts as `qemu-img check --output json` names them.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct CheckResult {
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub check_errors: u64,
    pub leaks: u64,
    pub corruptions: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
}

/// Most distinct clusters a check or rebuild counts references of (sparse map in memory).
pub const MAX_COUNTED_CLUSTERS: usize = 1 << 26;

/// Computed reference counts of the clusters that are referenced (sparse: a huge sparse file
/// costs nothing).
pub(super) struct Refs {
    pub(super) counts: BTreeMap<u64, u32>,
    cluster_bits: u32,
    file_len: u64,
    /// More than [`MAX_COUNTED_CLUSTERS`] distinct clusters were referenced.
    too_many: bool,
}

impl Refs {
    /// Counts `n` references to every cluster of `offset..offset+len`.
    fn add(&mut self, res: &mut CheckResult, offset: u64, len: u64, n: u64) {
        if len == 0 || n == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let Some(last) = offset.checked_add(len - 1).map(|e| e >> self.cluster_bits) else {
            res.corruptions += n;
            return;
        };
        // As QEMU (qcow2_inc_refcounts_imrt): a reference ending a cluster or more past the end
        // of the file is a corruption and is not counted (the last cluster may be partial).
        if offset.saturating_add(len) >= self.file_len.saturating_add(1 << self.cluster_bits) {
            res.corruptions += n;
            return;
        }
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        for c in first..=last {
            if self.counts.len() >= MAX_COUNTED_CLUSTERS && !self.counts.contains_key(&c) {
                self.too_many = true;
                return;
            }
            let v = self.counts.entry(c).or_insert(0);
            *v = v.saturating_add(n32);
        }
    }
}

/// Allocation and fragmentation counts of the active tree, as QEMU's check_refcounts_l2.
fn count_alloc(res: &mut CheckResult, next_contiguous: &mut u64, host: u64, cs: u64) {
    res.allocated_clusters += 1;
    if *next_contiguous != 0 && host != *next_contiguous {
        res.fragmented_clusters += 1;
    }
    *next_contiguous = host + cs;
}

/// Progress callback: (done, total) L1 entries of the active table.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// How many L1 entries (active, in total) point at each L2 table.
type L2Uses = BTreeMap<u64, (u64, u64)>;

/// Bytes of snapshot L1 tables and bitmap tables one walk may read: each lies in the file, so
/// a sane image needs at most its own size. Past it the image is refused (a hostile table set
/// could otherwise make a rebuild at open read terabytes).
fn table_budget(file_len: u64) -> u64 {
    file_len.saturating_add(64 << 20)
}

fn spend(budget: &mut u64, bytes: u64) -> Result<()> {
    *budget = budget.checked_sub(bytes).ok_or_else(|| {
        log::error!("snapshot and bitmap tables add up to more than the file: refusing");
        Error::TooLarge
    })?;
    Ok(())
}

pub(super) struct Walker<'a> {
    pub(super) progress: Option<Progress<'a>>,
    pub(super) st: &'a dyn Storage,
    pub(super) h: &'a Header,
    pub(super) geo: Geometry,
    pub(super) file_len: u64,
}

impl Walker<'_> {
    pub(super) fn read_table(&self, off: u64) -> Result<Vec<u64>> {
        codec::read(self.st, off, self.geo.cluster_size / 8)
    }

    /// Counts the references of an L1 table and records which L2 tables it uses.
    fn collect_l1(
        &self,
        refs: &mut Refs,
        res: &mut CheckResult,
        l1: TableRef,
        active: bool,
        uses: &mut L2Uses,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        refs.add(res, l1.offset, l1.entries * 8, 1);
        let table = codec::read(self.st, l1.offset, l1.entries)?;
        let total = table.len() as u64;
        for (i, e) in (0u64..).zip(table) {
            if let (true, Some(p)) = (active, self.progress) {
                p(i, total);
            }
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            refs.add(res, l2, cs, 1);
            if !l2.is_multiple_of(cs) || l2 >= self.file_len {
                res.corruptions += 1;
                continue;
            }
            let u = uses.entry(l2).or_default();
            u.0 += u64::from(active);
            u.1 += 1;
        }
        Ok(())
    }

    /// Walks one L2 table once, counting its references `all` times and its allocation
    /// statistics `active` times (as QEMU's check_refcounts_l2, which judges contiguity within
    /// one table, would on each walk).
    fn walk_l2(
        &self,
        refs: &mut Refs,
        res: &mut CheckResult,
        l2: u64,
        (active, all): (u64, u64),
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let mut next_contiguous = 0u64;
        let mut stats = CheckResult::default();
        for entry in self
            .read_table(l2)?
            .into_iter()
            .step_by(self.geo.entry_words())
        {
            let m = match Mapping::decode(entry, &self.geo) {
                Ok(m) => m,
                Err(_) => {
                    res.corruptions += all;
                    continue;
                }
            };
            match m {
                Mapping::Compressed { .. } => {
                    stats.allocated_clusters += 1;
                    stats.compressed_clusters += 1;
                    stats.fragmented_clusters += 1;
                }
                Mapping::Data { host, .. } => {
                    count_alloc(&mut stats, &mut next_contiguous, host, cs);
                }
                Mapping::Zero { host } if host != 0 => {
                    count_alloc(&mut stats, &mut next_contiguous, host, cs);
                }
                _ => {}
            }
            // Data clusters in an external data file have no refcounts.
            if self.geo.data_file {
                continue;
            }
            if let Some((off, len)) = m.host_range(cs) {
                refs.add(res, off, len, all);
            }
        }
        res.allocated_clusters += stats.allocated_clusters * active;
        res.compressed_clusters += stats.compressed_clusters * active;
        res.fragmented_clusters += stats.fragmented_clusters * active;
        Ok(())
    }

    fn walk_snapshots(
        &self,
        refs: &mut Refs,
        res: &mut CheckResult,
        uses: &mut L2Uses,
        budget: &mut u64,
    ) -> Result<()> {
        if self.h.nb_snapshots == 0 {
            return Ok(());
        }
        let snaps = read_snapshots(self.st, self.h, self.file_len)?;
        for t in snaps.l1_tables {
            if !l1_valid(&t, self.geo.cluster_size, self.file_len) {
                res.corruptions += 1;
                continue;
            }
            spend(budget, t.entries * 8)?;
            self.collect_l1(refs, res, t, false, uses)?;
        }
        if snaps.truncated {
            res.corruptions += 1;
        }
        refs.add(res, self.h.snapshots_offset, snaps.table_bytes, 1);
        Ok(())
    }

    fn walk_bitmaps(&self, refs: &mut Refs, res: &mut CheckResult, budget: &mut u64) -> Result<()> {
        let Some((dir_off, dir_len, tables)) = read_bitmaps(self.st, self.h, self.file_len)? else {
            return Ok(());
        };
        refs.add(res, dir_off, dir_len, 1);
        for t in tables {
            refs.add(res, t.offset, t.entries * 8, 1);
            if !t.valid(1, MAX_BITMAP_BYTES, self.file_len) {
                continue;
            }
            spend(budget, t.entries * 8)?;
            for e in codec::read(self.st, t.offset, t.entries)? {
                let e = e & OFFSET_MASK;
                if e != 0 {
                    refs.add(res, e, self.geo.cluster_size, 1);
                }
            }
        }
        Ok(())
    }

    /// Counts every reference; with `refcount_structs` false, leaves out the refcount table and
    /// blocks (for a rebuild that replaces them). Each L2 table is read once, however many L1
    /// entries (active or in snapshots) point at it: time and memory follow the file's size.
    pub(super) fn count(&self, res: &mut CheckResult, refcount_structs: bool) -> Result<Refs> {
        let cs = self.geo.cluster_size;
        let mut refs = Refs {
            counts: BTreeMap::new(),
            cluster_bits: self.geo.cluster_bits,
            file_len: self.file_len,
            too_many: false,
        };
        let mut budget = table_budget(self.file_len);
        refs.add(res, 0, cs, 1);
        let mut uses = L2Uses::new();
        let active = TableRef {
            offset: self.h.l1_table_offset,
            entries: u64::from(self.h.l1_size),
        };
        self.collect_l1(&mut refs, res, active, true, &mut uses)?;
        self.walk_snapshots(&mut refs, res, &mut uses, &mut budget)?;
        for (&l2, &u) in &uses {
            self.walk_l2(&mut refs, res, l2, u)?;
            if refs.too_many {
                break;
            }
        }
        if let Some((off, len)) = self.h.fde {
            refs.add(res, off, len, 1);
        }
        self.walk_bitmaps(&mut refs, res, &mut budget)?;
        if refcount_structs {
            let rt_bytes = u64::from(self.h.refcount_table_clusters) * cs;
            refs.add(res, self.h.refcount_table_offset, rt_bytes, 1);
            let rt = codec::read(self.st, self.h.refcount_table_offset, rt_bytes / 8)?;
            for e in rt {
                let off = e & RT_OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                if !off.is_multiple_of(cs) || off >= self.file_len {
                    res.corruptions += 1;
                    continue;
                }
                refs.add(res, off, cs, 1);
            }
        }
        if refs.too_many {
            log::error!(
                "more than {MAX_COUNTED_CLUSTERS} clusters are referenced: too many to count"
            );
            return Err(Error::TooLarge);
        }
        Ok(refs)
    }
}
