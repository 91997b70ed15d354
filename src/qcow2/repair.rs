//! The refcount rebuild (dirty images at open, `check --repair all`): a new refcount structure
//! computed from the references, written past the end of the file and switched to only once
//! it is durable.

use super::alloc::Refcounts;
use super::codec;
use super::header::{Header, OFF_REFCOUNT_TABLE};
use super::refs::{CheckResult, Walker};
use super::types::Geometry;
use super::{Error, Result};
use crate::storage::Storage;

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
