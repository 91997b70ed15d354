//! The write path. Overwrites of clusters that are allocated with refcount 1 resolve their
//! runs under the read lock and write without it; everything else is a transaction
//! ([`super::txn`]): plan under the write lock, data work without it, commit under it.

use std::cell::RefCell;
use std::io::IoSlice;

use super::engine::to_usize;
use super::iov::{copy_from, IovRef};
use super::metadata::{Lookup, Mapping, Meta, COPIED};
use super::txn::EntryUpdate;
use super::types::{GuestOffset, HostOffset};
use super::{ClusterCrypt, Error, Qcow2, Result};
use crate::crypto::secret::SecretBuf;

/// Subcluster bitmap of a fully allocated cluster.
pub(super) const ALL_ALLOCATED: u64 = 0x0000_0000_ffff_ffff;

thread_local! {
    /// The per-thread bounce buffer that ciphertext is built in (locked, zeroed on drop).
    static BOUNCE: RefCell<SecretBuf> = const { RefCell::new(SecretBuf::new()) };
}

/// What a transaction does to one cluster of the request.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Write in place; no metadata changes.
    InPlace { host: u64 },
    /// Extended L2, in place, and some touched subclusters become allocated.
    InPlaceSub { host: u64, entry: u64, bitmap: u64 },
    /// A new cluster `new` replaces the mapping (`entry`, `bitmap`).
    Alloc { new: u64, entry: u64, bitmap: u64 },
}

/// One cluster's part of a planned write.
#[derive(Debug, Clone, Copy)]
struct Step {
    pos: u64,
    n: u64,
    l1i: usize,
    l2i: usize,
    op: Op,
}

/// What planning found.
enum Plan {
    Ready(Vec<Step>),
    /// A cluster of the request is busy in another transaction.
    Busy,
    /// The L2 table of this L1 index must be made writable first.
    NeedL2(usize),
}

impl Qcow2 {
    /// Writes `bufs` in turn at guest `offset`. The buffers are never modified.
    pub fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly);
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        {
            let _gate = self.gate_r();
            let runs = {
                let m = self.meta_r();
                if m.written && !m.overlap.stale(&m.rc) {
                    self.in_place_runs(&m, offset, len)?
                } else {
                    None
                }
            };
            match runs {
                Some(runs) => {
                    let mut cur = IovRef::new(bufs);
                    for (host, guest, n) in runs {
                        let s = cur.take(to_usize(n)?);
                        self.write_data(HostOffset(host), GuestOffset(guest), &s)?;
                    }
                }
                None => self.write_txn(offset, bufs)?,
            }
        }
        self.free_if_many()
    }

    /// If every unit of the range is allocated with refcount 1 (and clear of metadata), the
    /// host runs to write: (host, guest, len).
    fn in_place_runs(
        &self,
        m: &Meta,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64, u64)>>> {
        let end = offset + len;
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let n = self.unit_left(pos, end);
            let l1i = self.l1_index(self.geo.guest_cluster(pos))?;
            if !Self::l2_writable(m, l1i) {
                return Ok(None);
            }
            match m.lookup(pos, &self.geo)? {
                Lookup::Found(Mapping::Data { host, copied: true }) => {
                    let h = host + self.geo.in_cluster(pos);
                    match runs.last_mut() {
                        Some(r) if r.0 + r.2 == h => r.2 += n,
                        _ => runs.push((h, pos, n)),
                    }
                }
                _ => return Ok(None),
            }
            pos += n;
        }
        for &(host, _, n) in &runs {
            self.check_overlap(m, host, n)?;
        }
        Ok(Some(runs))
    }

    /// A write that changes metadata, as a transaction.
    fn write_txn(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.first_write()?;
        let end = offset + bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        let steps = loop {
            let seen = self.done_count();
            let plan = {
                let mut m = self.meta_w();
                self.plan_write(&mut m, offset, end)?
            };
            match plan {
                Plan::Ready(steps) => break steps,
                Plan::Busy => self.wait_done(seen),
                Plan::NeedL2(l1i) => self.prepare_l2(l1i)?,
            }
        };
        let gen = self.meta_r().rc_gen;
        let done = self.write_steps(&steps, bufs, gen);
        self.finish_write(&steps, done)
    }

    /// Plans a write under one acquisition of the write lock: nothing in memory changes but
    /// the reserved clusters and the busy marks.
    fn plan_write(&self, m: &mut Meta, offset: u64, end: u64) -> Result<Plan> {
        if m.overlap.stale(&m.rc) {
            m.overlap.rebuild_live(self.geo.cluster_size, &m.l1, &m.rc);
        }
        let cs = self.geo.cluster_size;
        let first = self.geo.guest_cluster(offset);
        let last = self.geo.guest_cluster(end - 1);
        if (first..=last).any(|gc| m.busy.contains(&gc)) {
            return Ok(Plan::Busy);
        }
        let mut steps = Vec::new();
        let mut pos = offset;
        let r = (|| {
            while pos < end {
                let inc = self.geo.in_cluster(pos);
                let n = (cs - inc).min(end - pos);
                let gc = self.geo.guest_cluster(pos);
                let (l1i, l2i) = self.geo.split(gc)?;
                if !Self::l2_writable(m, l1i) {
                    return Ok(Some(l1i));
                }
                let (entry, bitmap) = m.entry_load(self.storage.as_ref(), gc, &self.geo)?;
                let op = match Mapping::decode(entry, &self.geo)? {
                    Mapping::Data { host, copied: true } => {
                        self.check_overlap(m, host, cs)?;
                        if self.geo.extended && self.sub_bitmap(bitmap, inc, n) != bitmap {
                            Op::InPlaceSub {
                                host,
                                entry,
                                bitmap,
                            }
                        } else {
                            Op::InPlace { host }
                        }
                    }
                    _ => {
                        let new = if self.geo.data_file {
                            pos - inc
                        } else {
                            self.take_cluster(m)?
                        };
                        Op::Alloc { new, entry, bitmap }
                    }
                };
                steps.push(Step {
                    pos,
                    n,
                    l1i,
                    l2i,
                    op,
                });
                pos += n;
            }
            Ok(None)
        })();
        let need = match r {
            Ok(need) => need,
            Err(e) => {
                self.unreserve(m, &steps);
                return Err(e);
            }
        };
        if let Some(l1i) = need {
            self.unreserve(m, &steps);
            return Ok(Plan::NeedL2(l1i));
        }
        for s in &steps {
            if !matches!(s.op, Op::InPlace { .. }) {
                m.busy.insert(self.geo.guest_cluster(s.pos));
            }
        }
        Ok(Plan::Ready(steps))
    }

    /// Returns the clusters a plan reserved to the pool.
    fn unreserve(&self, m: &mut Meta, steps: &[Step]) {
        if self.geo.data_file {
            return;
        }
        for s in steps.iter().rev() {
            if let Op::Alloc { new, .. } = s.op {
                m.pool.push(new);
            }
        }
    }

    /// The data work of a planned write (no lock held): the entry updates to commit.
    fn write_steps(
        &self,
        steps: &[Step],
        bufs: &[IoSlice<'_>],
        gen: u64,
    ) -> Result<Vec<EntryUpdate>> {
        let cs = self.geo.cluster_size;
        let mut cur = IovRef::new(bufs);
        let mut ups = Vec::new();
        let mut need_sync = false;
        for s in steps {
            let src = cur.take(to_usize(s.n)?);
            let inc = self.geo.in_cluster(s.pos);
            let gc_off = s.pos - inc;
            match s.op {
                Op::InPlace { host } => {
                    self.write_data(HostOffset(host + inc), GuestOffset(s.pos), &src)?;
                }
                Op::InPlaceSub {
                    host,
                    entry,
                    bitmap,
                } => {
                    let nb = self.write_subclusters_in_place(host, entry, bitmap, s.pos, &src)?;
                    ups.push(EntryUpdate {
                        l1i: s.l1i,
                        l2i: s.l2i,
                        entry,
                        bitmap: nb,
                        drops: None,
                        reserved: None,
                    });
                }
                Op::Alloc { new, entry, bitmap } => {
                    let cmap = Mapping::decode(entry, &self.geo)?;
                    // The new cluster replaces content (of its own, or copied in): it must be
                    // durable before an L2 entry points at it, or a crash could expose
                    // neither the old content nor the new.
                    // Encrypted, even a fresh cluster: its unwritten sectors would decrypt to
                    // garbage rather than read as the zeroes they replace.
                    need_sync |= self.crypt.is_some()
                        || match cmap {
                            Mapping::Zero { .. } => false,
                            Mapping::Unallocated => self.backing.is_some(),
                            Mapping::Data { .. } | Mapping::Compressed { .. } => true,
                        };
                    let new_bitmap = if s.n == cs {
                        self.write_data(HostOffset(new), GuestOffset(gc_off), &src)?;
                        ALL_ALLOCATED
                    } else {
                        let mut buf = vec![0u8; self.geo.cluster_usize()];
                        let nb = if self.geo.extended {
                            self.fill_subclusters(entry, bitmap, gc_off, inc, s.n, &mut buf)?
                        } else {
                            self.content(cmap, gc_off, &mut buf)?;
                            0
                        };
                        let i = to_usize(inc)?;
                        copy_from(&src, &mut buf[i..i + to_usize(s.n)?]);
                        let whole = [IoSlice::new(&buf)];
                        self.write_data(HostOffset(new), GuestOffset(gc_off), &whole)?;
                        nb
                    };
                    let drops = if self.geo.data_file {
                        None
                    } else {
                        cmap.host_range(cs)
                    };
                    ups.push(EntryUpdate {
                        l1i: s.l1i,
                        l2i: s.l2i,
                        entry: new | COPIED,
                        bitmap: new_bitmap,
                        drops,
                        reserved: (!self.geo.data_file).then_some(new),
                    });
                }
            }
        }
        // Reserved clusters whose refcounts no barrier has covered yet.
        need_sync |= self.meta_r().rc_synced < gen && !ups.is_empty();
        if need_sync {
            self.storage.sync()?;
            let mut m = self.meta_w();
            m.rc_synced = m.rc_synced.max(gen);
        }
        Ok(ups)
    }

    /// Commits (or rolls back) a planned write and releases its busy clusters.
    fn finish_write(&self, steps: &[Step], done: Result<Vec<EntryUpdate>>) -> Result<()> {
        let mut m = self.meta_w();
        let r = match done {
            Ok(ups) => self.commit_entries(&mut m, &ups).map_err(|f| {
                // Entries known not to be on disk give their clusters back; the clusters of
                // uncertain ones stay allocated (a leak at worst).
                for &k in &f.unapplied {
                    if let Some(c) = ups.get(k).and_then(|u| u.reserved) {
                        m.pool.push(c);
                    }
                }
                f.error
            }),
            Err(e) => {
                self.unreserve(&mut m, steps);
                Err(e)
            }
        };
        for s in steps {
            m.busy.remove(&self.geo.guest_cluster(s.pos));
        }
        drop(m);
        self.notify_done();
        r
    }

    /// The bitmap after writing `inc..inc+n` of a cluster in place: touched subclusters become
    /// allocated and stop reading as zeroes.
    fn sub_bitmap(&self, bitmap: u64, inc: u64, n: u64) -> u64 {
        let sc = self.geo.unit_size();
        let mut nb = bitmap;
        for j in inc / sc..=(inc + n - 1) / sc {
            nb |= 1 << j;
            nb &= !(1 << (32 + j));
        }
        nb
    }

    /// Extended L2, new cluster: fills `buf` with the old content of every subcluster that is
    /// allocated or partially written (`inc..inc+n`), and returns the new bitmap.
    fn fill_subclusters(
        &self,
        entry: u64,
        bitmap: u64,
        gc_off: u64,
        inc: u64,
        n: u64,
        buf: &mut [u8],
    ) -> Result<u64> {
        let cmap = Mapping::decode(entry, &self.geo)?;
        if let Mapping::Compressed { .. } = cmap {
            self.content(cmap, gc_off, buf)?;
            return Ok(ALL_ALLOCATED);
        }
        let sc = self.geo.unit_size();
        let (j0, j1) = (inc / sc, (inc + n - 1) / sc);
        let alloc = bitmap & ALL_ALLOCATED;
        for j in 0..32u64 {
            let (s, e) = (j * sc, (j + 1) * sc);
            let touched = (j0..=j1).contains(&j);
            let full = touched && inc <= s && inc + n >= e;
            if (touched && !full) || alloc & (1 << j) != 0 {
                let jj = u32::try_from(j).map_err(|_| Error::TooLarge)?;
                let m = Mapping::decode_sub(entry, bitmap, jj, &self.geo)?;
                self.content(m, gc_off + s, &mut buf[to_usize(s)?..to_usize(e)?])?;
            }
        }
        Ok(self.sub_bitmap(bitmap, inc, n))
    }

    /// Extended L2, cluster writable in place: writes the touched subclusters (filling partial
    /// ones that were not allocated) and returns the new bitmap.
    fn write_subclusters_in_place(
        &self,
        host: u64,
        entry: u64,
        bitmap: u64,
        pos: u64,
        src: &[IoSlice<'_>],
    ) -> Result<u64> {
        let sc = self.geo.unit_size();
        let n: u64 = src.iter().map(|s| s.len() as u64).sum();
        let end = pos + n;
        let gc_off = pos - self.geo.in_cluster(pos);
        let mut cur = IovRef::new(src);
        let mut p = pos;
        while p < end {
            let k = self.unit_left(p, end);
            let piece = cur.take(to_usize(k)?);
            let j = self.geo.in_cluster(p) / sc;
            let sub_start = gc_off + j * sc;
            if bitmap & (1 << j) != 0 || k == sc {
                self.write_data(HostOffset(host + (p - gc_off)), GuestOffset(p), &piece)?;
            } else {
                let jj = u32::try_from(j).map_err(|_| Error::TooLarge)?;
                let m = Mapping::decode_sub(entry, bitmap, jj, &self.geo)?;
                let mut buf = vec![0u8; to_usize(sc)?];
                self.content(m, sub_start, &mut buf)?;
                let i = to_usize(p - sub_start)?;
                copy_from(&piece, &mut buf[i..i + to_usize(k)?]);
                let whole = [IoSlice::new(&buf)];
                self.write_data(HostOffset(host + j * sc), GuestOffset(sub_start), &whole)?;
            }
            p += k;
        }
        Ok(self.sub_bitmap(bitmap, self.geo.in_cluster(pos), n))
    }

    /// Writes guest data to a host range; with encryption, the ciphertext is built straight
    /// from the caller's buffers in the per-thread bounce buffer (never in the caller's).
    pub(super) fn write_data(
        &self,
        host: HostOffset,
        guest: GuestOffset,
        src: &[IoSlice<'_>],
    ) -> Result<()> {
        let Some(crypt) = &self.crypt else {
            self.data_st().writev_at(src, host.0)?;
            return Ok(());
        };
        let n: usize = src.iter().map(|s| s.len()).sum();
        let chunk_max = self.geo.cluster_usize();
        BOUNCE.with(|cell| -> Result<()> {
            let mut fresh = SecretBuf::new();
            let mut guard = cell.try_borrow_mut().ok();
            let b = guard
                .as_deref_mut()
                .unwrap_or(&mut fresh)
                .get_mut(chunk_max);
            let mut cur = IovRef::new(src);
            let mut done = 0usize;
            while done < n {
                let k = (n - done).min(chunk_max);
                let at = done as u64;
                encrypt_iov(
                    crypt.as_ref(),
                    &cur.take(k),
                    &mut b[..k],
                    host.plus(at),
                    guest.plus(at),
                )?;
                self.storage.write_at(&b[..k], host.0 + at)?;
                done += k;
            }
            Ok(())
        })
    }
}

/// Encrypts `src` (a multiple of 512 bytes in all) into `dst`: straight from each buffer for
/// the whole sectors it holds, through a 512-byte block for sectors split across buffers.
fn encrypt_iov(
    crypt: &dyn ClusterCrypt,
    src: &[IoSlice<'_>],
    dst: &mut [u8],
    host: HostOffset,
    guest: GuestOffset,
) -> Result<()> {
    const SECTOR: usize = 512;
    let mut pos = 0usize;
    let mut part = [0u8; SECTOR];
    let mut fill = 0usize;
    for s in src {
        let mut i = 0usize;
        while i < s.len() {
            if fill == 0 && s.len() - i >= SECTOR {
                let k = (s.len() - i) / SECTOR * SECTOR;
                let at = pos as u64;
                crypt.encrypt_to(
                    &s[i..i + k],
                    &mut dst[pos..pos + k],
                    host.plus(at),
                    guest.plus(at),
                )?;
                pos += k;
                i += k;
                continue;
            }
            let k = (SECTOR - fill).min(s.len() - i);
            part[fill..fill + k].copy_from_slice(&s[i..i + k]);
            fill += k;
            i += k;
            if fill == SECTOR {
                let at = pos as u64;
                crypt.encrypt_to(
                    &part,
                    &mut dst[pos..pos + SECTOR],
                    host.plus(at),
                    guest.plus(at),
                )?;
                pos += SECTOR;
                fill = 0;
            }
        }
    }
    if fill != 0 {
        // Not a whole number of sectors: the layer above guarantees it never is.
        return Err(Error::OutOfRange {
            offset: guest.0,
            len: dst.len() as u64,
        });
    }
    Ok(())
}
