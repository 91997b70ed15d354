//! Consistency check and repair, counting as `qemu-img check` does (block/qcow2-refcount.c
//! `qcow2_check_refcounts`): every reference from the header, L1/L2 tables (active and
//! snapshots), snapshot table, refcount structures, encryption header and bitmaps is counted and
//! compared with the stored refcounts. More stored than referenced is a leak; less is a corruption.

use std::collections::BTreeMap;

use serde::Serialize;

use super::alloc::{Refcounts, RT_OFFSET_MASK};
use super::codec;
use super::engine::read_l1;
use super::header::{Header, OFF_REFCOUNT_TABLE};
use super::metadata::{Mapping, COPIED, OFFSET_MASK};
use super::snapshot::{l1_valid, read_bitmaps, read_snapshots, TableRef, MAX_BITMAP_BYTES};
use super::types::Geometry;
use super::{Error, Result};
use crate::storage::Storage;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    Leaks,
    All,
}

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
struct Refs {
    counts: BTreeMap<u64, u32>,
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

struct Walker<'a> {
    progress: Option<Progress<'a>>,
    st: &'a dyn Storage,
    h: &'a Header,
    geo: Geometry,
    file_len: u64,
}

impl Walker<'_> {
    fn read_table(&self, off: u64) -> Result<Vec<u64>> {
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
    fn count(&self, res: &mut CheckResult, refcount_structs: bool) -> Result<Refs> {
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

fn load_rc(st: &dyn Storage, h: &Header, read_only: bool) -> Result<Refcounts> {
    Refcounts::load(
        st,
        h.refcount_order,
        h.cluster_bits,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        read_only,
    )
}

/// Checks (and optionally repairs) the image in `st`.
pub fn check(st: &dyn Storage, repair: Option<Repair>) -> Result<CheckResult> {
    check_with_progress(st, repair, None)
}

/// As [`check`], reporting progress through the active L1 table.
pub fn check_with_progress(
    st: &dyn Storage,
    repair: Option<Repair>,
    progress: Option<Progress<'_>>,
) -> Result<CheckResult> {
    let h = Header::read(st)?;
    let first = check_once(st, &h, repair, progress)?;
    if first.leaks_fixed == 0 && first.corruptions_fixed == 0 {
        return Ok(first);
    }
    let h = Header::read(st)?;
    let mut again = check_once(st, &h, None, None)?;
    again.leaks_fixed = first.leaks_fixed;
    again.corruptions_fixed = first.corruptions_fixed;
    Ok(again)
}

fn check_once(
    st: &dyn Storage,
    h: &Header,
    repair: Option<Repair>,
    progress: Option<Progress<'_>>,
) -> Result<CheckResult> {
    let geo = Geometry::new(h);
    let file_len = st.len()?;
    let w = Walker {
        progress,
        st,
        h,
        geo,
        file_len,
    };
    let mut res = CheckResult {
        total_clusters: geo.size.div_ceil(geo.cluster_size),
        ..Default::default()
    };
    let refs = w.count(&mut res, true)?;
    let mut rc = load_rc(st, h, repair.is_none())?;
    let mut highest = 0u64;
    let mut needs_rebuild = false;
    let mut leaked = Vec::new();
    // Every cluster that has a refcount block (within the file), then every referenced cluster
    // that has none: never a walk over every cluster of a sparse file.
    let file_clusters = file_len.div_ceil(geo.cluster_size);
    let epb = rc.entries_per_block();
    let table = rc.table().to_vec();
    let block_present = |c: u64| {
        usize::try_from(c / epb)
            .ok()
            .and_then(|b| table.get(b))
            .is_some_and(|&e| e & RT_OFFSET_MASK != 0)
    };
    let mut visit = |c: u64, computed: u32| {
        let stored = match rc.get(st, c) {
            Ok(v) => v,
            Err(_) => {
                res.check_errors += 1;
                return;
            }
        };
        if stored > 0 || computed > 0 {
            highest = highest.max(c);
        }
        let computed = u64::from(computed);
        if stored > computed {
            if repair.is_some() {
                leaked.push((c, computed));
            } else {
                res.leaks += 1;
            }
        } else if stored < computed {
            if repair == Some(Repair::All) {
                needs_rebuild = true;
            } else {
                res.corruptions += 1;
            }
        }
    };
    for (b, &e) in (0u64..).zip(&table) {
        if e & RT_OFFSET_MASK == 0 {
            continue;
        }
        let start = b.saturating_mul(epb);
        for c in start..start.saturating_add(epb).min(file_clusters) {
            visit(c, refs.counts.get(&c).copied().unwrap_or(0));
        }
    }
    for (&c, &v) in &refs.counts {
        if !block_present(c) || c >= file_clusters {
            visit(c, v);
        }
    }
    res.image_end_offset = (highest + 1) * geo.cluster_size;
    if needs_rebuild {
        rebuild_refcounts(st, h)?;
        res.corruptions_fixed += 1;
    } else {
        for (c, v) in leaked {
            rc.set(st, c, v)?;
            res.leaks_fixed += 1;
        }
        if res.leaks_fixed > 0 {
            st.sync()?;
        }
    }
    // OFLAG_COPIED of the active tree.
    let h2;
    let h = if needs_rebuild {
        h2 = Header::read(st)?;
        &h2
    } else {
        h
    };
    let mut rc = load_rc(st, h, repair != Some(Repair::All))?;
    check_copied(st, h, &geo, &mut rc, &mut res, repair == Some(Repair::All))?;
    Ok(res)
}

fn check_copied(
    st: &dyn Storage,
    h: &Header,
    geo: &Geometry,
    rc: &mut Refcounts,
    res: &mut CheckResult,
    fix: bool,
) -> Result<()> {
    let cs = geo.cluster_size;
    let file_len = st.len()?;
    let mut l1 = read_l1(st, h.l1_table_offset, h.l1_size)?;
    let w = Walker {
        progress: None,
        st,
        h,
        geo: *geo,
        file_len,
    };
    for (i, e) in l1.iter_mut().enumerate() {
        let l2 = *e & OFFSET_MASK;
        if l2 == 0 || !l2.is_multiple_of(cs) || l2 >= file_len {
            continue;
        }
        let r = rc.get(st, l2 >> geo.cluster_bits)?;
        if (r == 1) != (*e & COPIED != 0) {
            if fix {
                *e = if r == 1 { *e | COPIED } else { *e & !COPIED };
                st.write_at(&e.to_be_bytes(), h.l1_table_offset + (i as u64) * 8)?;
                res.corruptions_fixed += 1;
            } else {
                res.corruptions += 1;
            }
        }
        let mut t = w.read_table(l2)?;
        let mut dirty = false;
        for entry in t.iter_mut().step_by(geo.entry_words()) {
            let host = match Mapping::decode(*entry, geo) {
                Ok(Mapping::Data { host, .. }) => host,
                Ok(Mapping::Zero { host }) if host != 0 => host,
                _ => continue,
            };
            // Clusters of an external data file always count as refcount 1.
            let r = if geo.data_file {
                1
            } else {
                rc.get(st, host >> geo.cluster_bits)?
            };
            if (r == 1) != (*entry & COPIED != 0) {
                if fix {
                    *entry = if r == 1 {
                        *entry | COPIED
                    } else {
                        *entry & !COPIED
                    };
                    dirty = true;
                    res.corruptions_fixed += 1;
                } else {
                    res.corruptions += 1;
                }
            }
        }
        if dirty {
            codec::write(st, l2, &t)?;
        }
    }
    if fix {
        st.sync()?;
    }
    Ok(())
}

/// Replaces the refcount structure with one computed from the references (dirty images,
/// `check --repair all`). The new blocks and table go past the end of the file; the header is
/// switched over only once they are durable.
pub fn rebuild_refcounts(st: &dyn Storage, h: &Header) -> Result<()> {
    let geo = Geometry::new(h);
    let cs = geo.cluster_size;
    let file_len = st.len()?;
    let w = Walker {
        progress: None,
        st,
        h,
        geo,
        file_len,
    };
    let mut res = CheckResult::default();
    let refs = w.count(&mut res, false)?;
    if res.corruptions > 0 {
        // Rewriting refcounts over corrupt metadata would hand referenced clusters out again.
        log::error!(
            "refcount rebuild refused: {} corruptions found; run check",
            res.corruptions
        );
        return Err(Error::Corrupt);
    }
    let mut counts = refs.counts;
    let max = if h.refcount_order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << h.refcount_order)) - 1
    };
    if let Some((&c, _)) = counts.iter().find(|(_, &v)| u64::from(v) > max) {
        return Err(Error::RefcountOverflow {
            offset: c << geo.cluster_bits,
        });
    }
    let epb_bits = geo.cluster_bits + 3 - h.refcount_order;
    let after_refs = counts.keys().next_back().map_or(0, |&c| c + 1);
    let first = (file_len.div_ceil(cs)).max(after_refs);
    // Fixed point: blocks covering all references plus themselves and the table.
    let mut nb = 0u64;
    let mut tc = 1u64;
    let blocks_of_data: std::collections::BTreeSet<u64> = counts
        .iter()
        .filter(|(_, &v)| v > 0)
        .map(|(&c, _)| c >> epb_bits)
        .collect();
    let (blocks, table_entries) = loop {
        let end = first + nb + tc;
        let mut blocks = blocks_of_data.clone();
        for c in first..end {
            blocks.insert(c >> epb_bits);
        }
        let max_b = blocks.iter().next_back().copied().unwrap_or(0);
        let entries = max_b + 1;
        let ntc = (entries * 8).div_ceil(cs);
        if ntc * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge);
        }
        let nnb = blocks.len() as u64;
        if nnb == nb && ntc == tc {
            break (blocks, entries);
        }
        nb = nnb;
        tc = ntc;
    };
    if tc * cs > super::header::MAX_REFTABLE_BYTES {
        return Err(Error::TooLarge);
    }
    let end = first + nb + tc;
    for c in first..end {
        counts.insert(c, 1);
    }
    let mut table = vec![0u64; usize::try_from(tc * cs / 8).map_err(|_| Error::TooLarge)?];
    let epb = 1u64 << epb_bits;
    for (k, &b) in blocks.iter().enumerate() {
        let off = (first + k as u64) * cs;
        let mut blk = vec![0u8; geo.cluster_usize()];
        for (&c, &v) in counts.range(b * epb..(b + 1) * epb) {
            if v > 0 {
                Refcounts::set_entry(
                    h.refcount_order,
                    &mut blk,
                    usize::try_from(c - b * epb).map_err(|_| Error::TooLarge)?,
                    u64::from(v),
                );
            }
        }
        st.write_at(&blk, off)?;
        table[usize::try_from(b).map_err(|_| Error::TooLarge)?] = off;
    }
    let _ = table_entries;
    let t_off = (first + nb) * cs;
    codec::write(st, t_off, &table)?;
    st.sync()?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&t_off.to_be_bytes());
    hdr[8..].copy_from_slice(
        &u32::try_from(tc)
            .map_err(|_| Error::TooLarge)?
            .to_be_bytes(),
    );
    st.write_at(&hdr, OFF_REFCOUNT_TABLE)?;
    st.sync()?;
    Ok(())
}
