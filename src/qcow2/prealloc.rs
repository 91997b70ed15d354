//! Preallocation for `create`: every cluster mapped (metadata), optionally zero-filled (full).

use super::metadata::COPIED;
use super::txn::EntryUpdate;
use super::write::ALL_ALLOCATED;
use super::{Qcow2, Result};

impl Qcow2 {
    /// Preallocates every cluster (metadata; `full` also zero-fills the data) — for create,
    /// before anyone else uses the image.
    pub fn preallocate(&self, full: bool) -> Result<()> {
        self.first_write()?;
        let st = self.storage.as_ref();
        let cs = self.geo.cluster_size;
        let nclusters = self.geo.size.div_ceil(cs);
        let per_l2 = 1u64 << self.geo.l2_bits;
        let mut gc = 0;
        let mut end_of_data = 0u64;
        while gc < nclusters {
            let (l1i, l2i0) = self.geo.split(gc)?;
            self.prepare_l2(l1i)?;
            let n = (nclusters - gc).min(per_l2 - (gc & (per_l2 - 1)));
            let host = if self.geo.data_file {
                gc * cs
            } else {
                let h = self.meta_w().rc.alloc(st, n)?;
                end_of_data = end_of_data.max(h + n * cs);
                h
            };
            if full {
                self.data_st().write_zeroes(host, n * cs)?;
            }
            st.sync()?;
            let ups: Vec<EntryUpdate> = (0..n)
                .zip(l2i0..)
                .map(|(i, l2i)| EntryUpdate {
                    l1i,
                    l2i,
                    entry: (host + i * cs) | COPIED,
                    bitmap: ALL_ALLOCATED,
                    drops: None,
                    reserved: None,
                })
                .collect();
            self.commit_entries(&mut self.meta_w(), &ups)
                .map_err(|f| f.error)?;
            gc += n;
        }
        if st.len()? < end_of_data {
            st.set_len(end_of_data)?;
        }
        st.sync()?;
        Ok(())
    }
}
