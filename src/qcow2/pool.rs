//! Reserved data clusters, deferred frees and the flush barrier.
//!
//! Allocating writes take data clusters from a reserve pool, refilled under the metadata lock
//! a few MiB at a time; a refill is made durable by the next barrier (the first transaction
//! that commits into it syncs first). References dropped by copy-on-write, discard or
//! write-zeroes are decremented only after a barrier made the pointer changes durable, and
//! only once every request that may still map the old clusters has finished (the in-flight
//! gate): a reference on disk never points at a cluster with refcount 0, and a freed cluster
//! is never reused or punched under a running request.

use super::metadata::{Meta, PendingFree};
use super::{Qcow2, Result};

/// Size of the data-cluster reserve pool: at most this many clusters / bytes.
const POOL_CLUSTERS: u64 = 64;
const POOL_BYTES: u64 = 4 << 20;

/// Limit of pending frees before a write forces a barrier.
const MAX_PENDING_FREES: usize = 4096;

impl Qcow2 {
    /// A data cluster from the reserve pool (refilled when empty), checked against metadata.
    pub(super) fn take_cluster(&self, m: &mut Meta) -> Result<u64> {
        let cs = self.geo.cluster_size;
        if m.pool.is_empty() {
            let n = (POOL_BYTES / cs).clamp(1, POOL_CLUSTERS);
            let first = m.rc.alloc(self.storage.as_ref(), n)?;
            m.rc_gen += 1;
            m.pool.extend((0..n).rev().map(|i| first + i * cs));
        }
        let c = m.pool.pop().ok_or(super::Error::TooLarge)?;
        // On a hit the image turns read-only; the cluster is left as it is.
        self.check_overlap(m, c, cs)?;
        Ok(c)
    }

    /// Makes every completed write durable; then releases clusters dropped before it and the
    /// unused reserve (so that a flushed image has no leaks, even if the process then exits
    /// without closing it). No lock is held across the fdatasyncs or the hole punching.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let (seq, gen) = {
            let mut m = self.meta_w();
            let seq = m.free_seq;
            m.free_seq += 1;
            (seq, m.rc_gen)
        };
        if let Some(d) = &self.data {
            d.sync()?;
        }
        self.storage.sync()?;
        {
            let mut m = self.meta_w();
            m.rc_synced = m.rc_synced.max(gen);
        }
        self.release(seq)
    }

    /// Applies the pending frees once there are too many (outside any request's gate).
    pub(super) fn free_if_many(&self) -> Result<()> {
        if self.meta_r().pending_frees.len() <= MAX_PENDING_FREES {
            return Ok(());
        }
        self.flush()
    }

    /// Drops the references queued with sequence number `upto` or less (their pointer
    /// changes are durable) and the unused reserve.
    fn release(&self, upto: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let st = self.storage.as_ref();
        let (frees, pool) = {
            let mut m = self.meta_w();
            let all = std::mem::take(&mut m.pending_frees);
            let (now, later): (Vec<_>, Vec<_>) = all.into_iter().partition(|f| f.seq <= upto);
            m.pending_frees = later;
            // Clusters reserved by a planned transaction are not in the pool any more.
            (now, std::mem::take(&mut m.pool))
        };
        if frees.is_empty() && pool.is_empty() {
            return Ok(());
        }
        // Requests that looked their mappings up before these references were dropped finish.
        self.gate_barrier();
        // Clusters whose count reaches 0 are punched first, while still counted (so that no
        // allocation can take them meanwhile): as QEMU's discard=unmap; every reuse rewrites a
        // cluster in full.
        let mut punch = Vec::new();
        {
            let mut m = self.meta_w();
            for f in &frees {
                let first = f.offset >> self.geo.cluster_bits;
                let last = (f.offset + f.len - 1) >> self.geo.cluster_bits;
                for c in first..=last {
                    if m.rc.get(st, c).ok() == Some(1) {
                        punch.push(c << self.geo.cluster_bits);
                    }
                }
            }
        }
        punch.sort_unstable();
        punch.dedup();
        let mut i = 0;
        while i < punch.len() {
            let start = punch[i];
            let mut end = start + cs;
            i += 1;
            while i < punch.len() && punch[i] == end {
                end += cs;
                i += 1;
            }
            if let Err(e) = st.punch_hole(start, end - start) {
                log::debug!("cannot punch a hole at {start:#x}: {e}");
            }
        }
        {
            let mut m = self.meta_w();
            let mut freed = Vec::new();
            let ranges = frees
                .iter()
                .map(|f| (f.offset, f.len))
                .chain(pool.iter().map(|&c| (c, cs)));
            for (off, len) in ranges {
                // Cluster by cluster: one that cannot be decremented now (its refcount block
                // could not be written) stays queued for the next flush, not leaked.
                let first = off >> self.geo.cluster_bits;
                let last = (off + len - 1) >> self.geo.cluster_bits;
                for c in first..=last {
                    let at = c << self.geo.cluster_bits;
                    match m.rc.free(st, at, cs, &mut freed) {
                        Ok(()) => {}
                        Err(e @ super::Error::Storage(_)) => {
                            log::warn!("cannot free cluster at {at:#x} yet: {e}");
                            m.pending_frees.push(PendingFree {
                                offset: at,
                                len: cs,
                                seq: 0,
                            });
                        }
                        Err(e) => log::warn!("cannot free cluster at {at:#x}: {e}"),
                    }
                }
            }
        }
        st.sync()?;
        Ok(())
    }
}
