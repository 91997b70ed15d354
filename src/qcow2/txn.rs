//! Metadata transactions: the pieces a request that changes metadata is made of.
//!
//! A transaction plans under the metadata write lock (looks up its clusters, reserves new
//! ones from the pool, marks its guest clusters busy), drops the lock for the data work
//! (copy-on-write reads, encryption, data writes, fdatasync), and takes it again to commit
//! its L2 entry updates ([`Qcow2::commit_entries`]) or to roll back (reserved clusters go back
//! to the pool). Nothing in memory changes before the commit, and the commit writes each run
//! of entries to the file before it updates the cached table, so memory never runs ahead of
//! the disk; a failed entry write drops the cached table, which is then read again from the
//! file. Busy clusters keep two transactions from planning on the same cluster; others run in
//! parallel.
//!
//! A new or copied L2 table is its own small transaction ([`Qcow2::prepare_l2`]), committed
//! (table written, synced, L1 entry written) before a request plans on it.

use super::codec;
use super::engine::to_usize;
use super::metadata::{Meta, PendingFree, COPIED, OFFSET_MASK};
use super::{Error, Qcow2, Result};

/// A commit that failed: the error, and the updates known not to be on disk (the others are
/// on disk, or uncertain).
#[derive(Debug)]
pub(super) struct CommitFailed {
    pub error: Error,
    pub unapplied: Vec<usize>,
}

/// One L2 entry change.
#[derive(Debug, Clone, Copy)]
pub(super) struct EntryUpdate {
    pub l1i: usize,
    pub l2i: usize,
    pub entry: u64,
    /// Subcluster bitmap (extended L2 only).
    pub bitmap: u64,
    /// The host range whose reference this change drops (freed after the next barrier).
    pub drops: Option<(u64, u64)>,
    /// The pool cluster this change points at, given back if the change never reaches the file.
    pub reserved: Option<u64>,
}

impl Qcow2 {
    /// Transactions finished so far (read before looking at busy marks, then passed to
    /// [`Qcow2::wait_done`]).
    pub(super) fn done_count(&self) -> u64 {
        *self.done.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a transaction finished after `seen` was read.
    pub(super) fn wait_done(&self, seen: u64) {
        let mut g = self.done.0.lock().unwrap_or_else(|e| e.into_inner());
        while *g == seen {
            g = self.done.1.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Announces that busy marks were released.
    pub(super) fn notify_done(&self) {
        *self.done.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.done.1.notify_all();
    }

    /// Makes the L2 table of L1 index `l1i` writable (refcount 1, COPIED in L1): allocates a
    /// new table, or copies one shared with a snapshot. The table is written and synced with
    /// the lock dropped, then the L1 entry is written and memory follows. A table that becomes
    /// writable has the same entries as before, so lookups meanwhile see the same mappings.
    pub(super) fn prepare_l2(&self, l1i: usize) -> Result<()> {
        let st = self.storage.as_ref();
        let cs = self.geo.cluster_size;
        let (old, new, table) = loop {
            let seen = self.done_count();
            let mut m = self.meta_w();
            if m.busy_l1.contains(&l1i) {
                drop(m);
                self.wait_done(seen);
                continue;
            }
            let e = *m.l1.get(l1i).ok_or(Error::TooLarge)?;
            let old = e & OFFSET_MASK;
            if old != 0 && e & COPIED != 0 {
                return Ok(());
            }
            let table = if old == 0 {
                vec![0u64; self.geo.cluster_usize() / 8]
            } else {
                m.load_l2(st, old, &self.geo)?;
                m.l2.get(old).map(<[u64]>::to_vec).ok_or(Error::BadOffset {
                    what: "L2 table",
                    offset: old,
                })?
            };
            let new = m.rc.alloc(st, 1)?;
            self.check_overlap(&m, new, cs)?;
            m.busy_l1.insert(l1i);
            break (old, new, table);
        };
        let l1_at = self.header.l1_table_offset + (l1i as u64) * 8;
        let entry = new | COPIED;
        let written = codec::write(st, new, &table).and_then(|()| Ok(st.sync()?));
        let mut m = self.meta_w();
        let r = written.and_then(|()| Ok(st.write_at(&entry.to_be_bytes(), l1_at)?));
        // After a failed L1 write the entry on disk is uncertain: memory follows what the
        // file now says, or the image turns read-only if even that cannot be read.
        let on_disk = match &r {
            Ok(()) => Some(entry),
            Err(_) => {
                let mut b = [0u8; 8];
                match st.read_at(&mut b, l1_at) {
                    Ok(()) => Some(u64::from_be_bytes(b)),
                    Err(_) => None,
                }
            }
        };
        match on_disk {
            Some(e) if e == entry => {
                m.l1[l1i] = entry;
                m.l2.insert(new, table);
                m.overlap.add_live(new, cs);
                if old != 0 {
                    let seq = m.free_seq;
                    m.pending_frees.push(PendingFree {
                        offset: old,
                        len: cs,
                        seq,
                    });
                }
            }
            Some(_) => {
                if let Err(e) = m.rc.free(st, new, cs, &mut Vec::new()) {
                    log::warn!("cannot free the unused L2 table at {new:#x}: {e}");
                }
            }
            None => {
                self.corrupt
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                log::error!("L1 entry {l1i} unknown after a failed write: image now read-only");
            }
        }
        m.busy_l1.remove(&l1i);
        drop(m);
        self.notify_done();
        r
    }

    /// Whether the L2 table of `l1i` is writable in place.
    pub(super) fn l2_writable(m: &Meta, l1i: usize) -> bool {
        m.l1.get(l1i)
            .is_some_and(|&e| e & COPIED != 0 && e & OFFSET_MASK != 0)
    }

    /// Writes `ups` (in guest order; their L2 tables writable, their clusters busy for the
    /// caller) to the file, run by run, and applies each run in memory once it is written,
    /// queueing the references it drops. After a failed write the run is read back: entries
    /// that reached the file are applied, those that did not are reported unapplied (as is
    /// every later run); if the file cannot say, the run's entries are uncertain. Either way
    /// the cached table is dropped (read again from the file on next use).
    pub(super) fn commit_entries(
        &self,
        m: &mut Meta,
        ups: &[EntryUpdate],
    ) -> std::result::Result<(), CommitFailed> {
        let words = self.geo.entry_words();
        let mut k = 0;
        while k < ups.len() {
            let first = ups[k];
            let mut end = k + 1;
            while end < ups.len()
                && ups[end].l1i == first.l1i
                && ups[end].l2i == ups[end - 1].l2i + 1
            {
                end += 1;
            }
            let run = &ups[k..end];
            let l2 = match m.l1.get(first.l1i) {
                Some(&e) if e & COPIED != 0 && e & OFFSET_MASK != 0 => e & OFFSET_MASK,
                _ => {
                    return Err(CommitFailed {
                        error: Error::BadOffset {
                            what: "L2 table not writable at commit",
                            offset: 0,
                        },
                        unapplied: (k..ups.len()).collect(),
                    })
                }
            };
            let mut vals = Vec::with_capacity(run.len() * words);
            for u in run {
                vals.push(u.entry);
                if words == 2 {
                    vals.push(u.bitmap);
                }
            }
            let at = l2 + (first.l2i * words) as u64 * 8;
            if let Err(error) = codec::write(self.storage.as_ref(), at, &vals) {
                let mut unapplied: Vec<usize> = (end..ups.len()).collect();
                if let Ok(disk) = codec::read(self.storage.as_ref(), at, vals.len() as u64) {
                    for (i, u) in run.iter().enumerate() {
                        let w = i * words..(i + 1) * words;
                        if disk[w.clone()] == vals[w.clone()] {
                            self.apply_entries(m, l2, std::slice::from_ref(u), &vals[w]);
                        } else {
                            unapplied.push(k + i);
                        }
                    }
                }
                m.l2.remove(l2);
                return Err(CommitFailed { error, unapplied });
            }
            self.apply_entries(m, l2, run, &vals);
            k = end;
        }
        Ok(())
    }

    /// Applies entry updates that are on disk: queues the references they drop and updates
    /// the cached table (if cached).
    fn apply_entries(&self, m: &mut Meta, l2: u64, run: &[EntryUpdate], vals: &[u64]) {
        let seq = m.free_seq;
        for u in run {
            if let Some((offset, len)) = u.drops {
                m.pending_frees.push(PendingFree { offset, len, seq });
            }
        }
        if let (Some(t), Some(first)) = (m.l2.get_mut(l2), run.first()) {
            let w = first.l2i * self.geo.entry_words();
            t[w..w + vals.len()].copy_from_slice(vals);
        }
    }

    /// L1 index of guest cluster `gc`.
    pub(super) fn l1_index(&self, gc: u64) -> Result<usize> {
        to_usize(gc >> self.geo.l2_bits)
    }
}
