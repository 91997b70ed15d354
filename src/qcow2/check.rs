//! Consistency check and repair, counting as `qemu-img check` does (block/qcow2-refcount.c
//! `qcow2_check_refcounts`): every reference from the header, L1/L2 tables (active and
//! snapshots), snapshot table, refcount structures, encryption header and bitmaps is counted and
//! compared with the stored refcounts. More stored than referenced is a leak; less is a corruption.

use super::alloc::{Refcounts, RT_OFFSET_MASK};
use super::codec;
use super::header::Header;
use super::metadata::{Mapping, COPIED, OFFSET_MASK};
use super::refs::Walker;
pub use super::refs::{CheckResult, Progress, MAX_COUNTED_CLUSTERS};
use super::repair::rebuild_refcounts;
use super::types::Geometry;
use super::Result;
use crate::storage::Storage;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    Leaks,
    All,
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
    let mut l1 = codec::read(st, h.l1_table_offset, u64::from(h.l1_size))?;
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
