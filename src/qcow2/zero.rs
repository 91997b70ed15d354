//! Discard and write-zeroes: whole clusters change by metadata (a transaction with no data
//! work, committed in the same lock acquisition), partial ones by writing zeroes.

use std::io::IoSlice;

use super::engine::to_usize;
use super::metadata::{Mapping, ZERO};
use super::txn::EntryUpdate;
use super::write::ALL_ALLOCATED;
use super::{Error, Qcow2, Result};

/// Subcluster bitmap of a cluster whose subclusters all read as zeroes.
const ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;

impl Qcow2 {
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

    /// Sets whole clusters of `a..b` to read as zeroes (`zeroes`) or discards them, one L2
    /// table's span per transaction. Returns false when the image cannot express it (v2 with
    /// a backing file) and nothing was done.
    fn zero_clusters(&self, a: u64, b: u64, zeroes: bool) -> Result<bool> {
        let v3 = self.geo.version >= 3;
        if zeroes && !v3 && self.backing.is_some() {
            return Ok(false);
        }
        self.first_write()?;
        let span = self.geo.cluster_size << self.geo.l2_bits;
        let mut pos = a;
        while pos < b {
            let end = ((pos / span + 1) * span).min(b);
            self.zero_span(pos, end)?;
            pos = end;
        }
        self.free_if_many()?;
        Ok(true)
    }

    /// [`Qcow2::zero_clusters`] within one L2 table's span.
    fn zero_span(&self, a: u64, b: u64) -> Result<()> {
        let v3 = self.geo.version >= 3;
        let has_backing = self.backing.is_some();
        let cs = self.geo.cluster_size;
        let st = self.storage.as_ref();
        loop {
            let seen = self.done_count();
            let mut m = self.meta_w();
            let (first, last) = (self.geo.guest_cluster(a), self.geo.guest_cluster(b - 1));
            if (first..=last).any(|gc| m.busy.contains(&gc)) {
                drop(m);
                self.wait_done(seen);
                continue;
            }
            let mut ups = Vec::new();
            let mut need_l2 = None;
            for gc in first..=last {
                let (l1i, l2i) = self.geo.split(gc)?;
                let (entry, bitmap) = m.entry_load(st, gc, &self.geo)?;
                let map = Mapping::decode(entry, &self.geo)?;
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
                if !Self::l2_writable(&m, l1i) {
                    need_l2 = Some(l1i);
                    break;
                }
                let drops = if self.geo.data_file {
                    None
                } else {
                    map.host_range(cs)
                };
                ups.push(EntryUpdate {
                    l1i,
                    l2i,
                    entry: new,
                    bitmap: new_bitmap,
                    drops,
                    reserved: None,
                });
            }
            if let Some(l1i) = need_l2 {
                drop(m);
                self.prepare_l2(l1i)?;
                continue;
            }
            return self.commit_entries(&mut m, &ups).map_err(|f| f.error);
        }
    }
}
