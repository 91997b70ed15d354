//! Internal snapshots as QEMU writes them (block/qcow2-snapshot.c), on an image no one else
//! has open: list, create, apply (goto) and delete.
//!
//! - The snapshot table: variable-length entries (40 fixed bytes, extra data — QEMU writes 24
//!   bytes: 64-bit VM state size, disk size, icount — then id and name), each padded to 8 bytes,
//!   rewritten whole into newly allocated clusters; the header's `nb_snapshots` and
//!   `snapshots_offset` are switched in one 12-byte write after a sync; the old table is freed.
//! - Create: every cluster the active L1 reaches (L2 tables, data clusters, the host clusters of
//!   compressed data) gains a reference, and COPIED flags drop where refcounts leave 1; the L1 is
//!   copied as it was (QEMU keeps its flags in the copy); then the table.
//! - Apply: the snapshot's clusters gain a reference, its L1 overwrites the active one, the old
//!   active L1's clusters lose one, and COPIED flags are recomputed (QEMU's order).
//! - Delete: the table without the entry first, then the snapshot's clusters lose a reference
//!   and its L1 is freed; COPIED flags of the active tables recomputed.
//!
//! A crash in between leaves at worst leaked clusters (refcounts too high), never a cluster
//! in use with a refcount too low. Refused: a dirty image (repair it first), an external data
//! file (QEMU refuses snapshots there), a snapshot whose disk size or L1 size differs from the
//! image's (QEMU would resize; not supported here).

use super::alloc::Refcounts;
use super::codec::{self, be16, be32, be64};
use super::header::{Header, INCOMPAT_DATA_FILE, MAX_L1_BYTES, MAX_SNAPSHOTS};
use super::metadata::{COMPRESSED, COPIED, OFFSET_MASK};
use super::{Error, Result};
use crate::storage::Storage;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Virtual disk size when taken (extra data; None in old entries without it).
    pub disk_size: Option<u64>,
    /// Instruction count (extra data), u64::MAX when not recorded.
    pub icount: Option<u64>,
    /// Extra data bytes past the 24 QEMU knows, kept as they are.
    pub unknown_extra: Vec<u8>,
}

/// Largest snapshot table read (QEMU's limit: 64 MiB).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data per entry (QEMU's limit: 1 KiB).
const MAX_EXTRA: u32 = 1024;

fn bad(what: &'static str, offset: u64) -> Error {
    Error::BadTable {
        what: "snapshot table",
        offset,
        reason: what,
    }
}

/// Reads the snapshot table.
pub fn read_table(st: &dyn Storage, h: &Header) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(bad("has too many entries", h.snapshots_offset));
    }
    let mut out = Vec::new();
    let mut pos = h.snapshots_offset;
    let end_limit = h
        .snapshots_offset
        .checked_add(MAX_TABLE_BYTES)
        .ok_or(Error::TooLarge)?;
    for _ in 0..h.nb_snapshots {
        let mut fixed = [0u8; 40];
        st.read_at(&mut fixed, pos)?;
        let id_len = usize::from(be16(&fixed, 12));
        let name_len = usize::from(be16(&fixed, 14));
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(bad("has an entry with too much extra data", pos));
        }
        let extra_len = usize::try_from(extra_len).map_err(|_| Error::TooLarge)?;
        let mut var = vec![0u8; extra_len + id_len + name_len];
        st.read_at(&mut var, pos + 40)?;
        let extra = &var[..extra_len];
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let l1_size = be32(&fixed, 8);
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad("has an L1 table that is too large", pos));
        }
        out.push(Snapshot {
            l1_offset: be64(&fixed, 0),
            l1_size,
            id: text(&var[extra_len..extra_len + id_len]),
            name: text(&var[extra_len + id_len..]),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size: if extra_len >= 8 {
                be64(extra, 0)
            } else {
                u64::from(be32(&fixed, 32))
            },
            disk_size: (extra_len >= 16).then(|| be64(extra, 8)),
            icount: (extra_len >= 24).then(|| be64(extra, 16)),
            unknown_extra: extra.get(24..).unwrap_or(&[]).to_vec(),
        });
        let len = u64::try_from(40 + var.len()).map_err(|_| Error::TooLarge)?;
        pos = pos
            .checked_add(len.next_multiple_of(8))
            .ok_or(Error::TooLarge)?;
        if pos > end_limit {
            return Err(bad("is larger than 64 MiB", h.snapshots_offset));
        }
    }
    Ok(out)
}

fn encode_table(snaps: &[Snapshot]) -> Result<Vec<u8>> {
    let mut b = Vec::new();
    for s in snaps {
        let id_len = u16::try_from(s.id.len()).map_err(|_| Error::TooLarge)?;
        let name_len = u16::try_from(s.name.len()).map_err(|_| Error::TooLarge)?;
        let mut extra = Vec::new();
        extra.extend_from_slice(&s.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        extra.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        extra.extend_from_slice(&s.unknown_extra);
        let start = b.len();
        b.extend_from_slice(&s.l1_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&id_len.to_be_bytes());
        b.extend_from_slice(&name_len.to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(
            &u32::try_from(s.vm_state_size)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        b.extend_from_slice(
            &u32::try_from(extra.len())
                .map_err(|_| Error::TooLarge)?
                .to_be_bytes(),
        );
        b.extend_from_slice(&extra);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        let len = b.len() - start;
        b.resize(start + len.next_multiple_of(8), 0);
    }
    Ok(b)
}

/// The open state every operation works on.
struct Img<'a> {
    st: &'a dyn Storage,
    h: Header,
    rc: Refcounts,
    cs: u64,
    l2_entries: u64,
    extended: bool,
}

impl<'a> Img<'a> {
    fn open(st: &'a dyn Storage) -> Result<Self> {
        let h = Header::read(st)?;
        if h.is_dirty() {
            return Err(Error::Unsupported(
                "the image is dirty: repair it first (check -r all)",
            ));
        }
        if h.is_corrupt() {
            return Err(Error::Corrupt);
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported("snapshots with an external data file"));
        }
        let rc = Refcounts::load(
            st,
            h.refcount_order,
            h.cluster_bits,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            false,
        )?;
        Ok(Self {
            st,
            cs: h.cluster_size(),
            l2_entries: h.l2_entries(),
            extended: h.extended_l2(),
            h,
            rc,
        })
    }

    fn read_l1(&self, off: u64, n: u32) -> Result<Vec<u64>> {
        codec::read(self.st, off, u64::from(n))
    }

    fn write_l1(&self, off: u64, l1: &[u64]) -> Result<()> {
        codec::write(self.st, off, l1)
    }

    fn cluster(&self, off: u64) -> Result<u64> {
        if !off.is_multiple_of(self.cs) {
            return Err(Error::BadOffset {
                what: "unaligned cluster",
                offset: off,
            });
        }
        Ok(off / self.cs)
    }

    /// Adds `addend` (+1, -1 or 0) to the refcount of `c`; returns the new refcount.
    fn adjust(&mut self, c: u64, addend: i32) -> Result<u64> {
        match addend {
            0 => self.rc.get(self.st, c),
            a => self.rc.update(self.st, c, a > 0),
        }
    }

    /// QEMU's `qcow2_update_snapshot_refcount`: every cluster `l1` reaches gets `addend`, and the
    /// COPIED flags of the L2 entries (written back) and of `l1` (in memory) follow the new
    /// refcounts. Returns whether `l1` changed.
    fn update_refcounts(&mut self, l1: &mut [u64], addend: i32) -> Result<bool> {
        let step = if self.extended { 2 } else { 1 };
        let cs_usize = usize::try_from(self.cs).map_err(|_| Error::TooLarge)?;
        let mut l1_modified = false;
        for e in l1.iter_mut() {
            let l2_off = *e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let l2c = self.cluster(l2_off)?;
            let mut table = vec![0u8; cs_usize];
            self.st.read_at(&mut table, l2_off)?;
            let mut modified = false;
            for j in 0..usize::try_from(self.l2_entries).map_err(|_| Error::TooLarge)? {
                let at = j * 8 * step;
                let old = be64(&table, at);
                let mut entry = old & !COPIED;
                let host = entry & OFFSET_MASK;
                let refcount = if entry & COMPRESSED != 0 {
                    if addend != 0 {
                        let m = super::Mapping::decode(old, &super::types::Geometry::new(&self.h))?;
                        if let Some((start, len)) = m.host_range(self.cs) {
                            let (first, last) = (start / self.cs, (start + len - 1) / self.cs);
                            for c in first..=last {
                                self.adjust(c, addend)?;
                            }
                        }
                    }
                    // Compressed clusters are never written in place.
                    2
                } else if host != 0 {
                    // Normal and preallocated-zero clusters (any host offset) hold a reference.
                    let c = self.cluster(host)?;
                    self.adjust(c, addend)?
                } else {
                    0
                };
                if refcount == 1 {
                    entry |= COPIED;
                }
                if entry != old {
                    table[at..at + 8].copy_from_slice(&entry.to_be_bytes());
                    modified = true;
                }
            }
            if modified {
                self.st.write_at(&table, l2_off)?;
            }
            let r = self.adjust(l2c, addend)?;
            let ne = if r == 1 { l2_off | COPIED } else { l2_off };
            if ne != *e {
                *e = ne;
                l1_modified = true;
            }
        }
        self.st.sync()?;
        Ok(l1_modified)
    }

    /// Writes `snaps` as the new table and switches the header to it; frees the old table.
    fn write_table(&mut self, snaps: &[Snapshot]) -> Result<()> {
        let n = u32::try_from(snaps.len()).map_err(|_| Error::TooLarge)?;
        if n > MAX_SNAPSHOTS {
            return Err(Error::Unsupported("too many snapshots"));
        }
        let old = (self.h.snapshots_offset, self.table_len()?);
        let bytes = encode_table(snaps)?;
        let new_off = if bytes.is_empty() {
            0
        } else {
            let clusters = u64::try_from(bytes.len())
                .map_err(|_| Error::TooLarge)?
                .div_ceil(self.cs);
            let off = self.rc.alloc(self.st, clusters)?;
            self.st.write_at(&bytes, off)?;
            off
        };
        self.st.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&n.to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        self.st.write_at(&hdr, 60)?;
        self.st.sync()?;
        self.h.nb_snapshots = n;
        self.h.snapshots_offset = new_off;
        if old.1 > 0 {
            let mut freed = Vec::new();
            self.rc.free(self.st, old.0, old.1, &mut freed)?;
        }
        self.st.sync()?;
        Ok(())
    }

    fn table_len(&self) -> Result<u64> {
        let snaps = read_table(self.st, &self.h)?;
        u64::try_from(encode_table(&snaps)?.len()).map_err(|_| Error::TooLarge)
    }
}

/// Lists the snapshots.
pub fn list(st: &dyn Storage) -> Result<Vec<Snapshot>> {
    let h = Header::read(st)?;
    read_table(st, &h)
}

/// The first snapshot whose id (if `by_id`) or else name is `key`.
fn find(snaps: &[Snapshot], key: &str, by_id: bool) -> Option<usize> {
    snaps
        .iter()
        .position(|s| by_id && s.id == key)
        .or_else(|| snaps.iter().position(|s| s.name == key))
}

/// Creates snapshot `name` of the current state; `date` is (seconds, nanoseconds).
pub fn create(st: &dyn Storage, name: &str, date: (u32, u32)) -> Result<Snapshot> {
    let mut img = Img::open(st)?;
    if name.len() > usize::from(u16::MAX) {
        return Err(Error::TooLarge);
    }
    let mut snaps = read_table(st, &img.h)?;
    let id = snaps
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let l1 = img.read_l1(img.h.l1_table_offset, img.h.l1_size)?;
    // The copy keeps the flags as they were (as QEMU's does); allocate it first.
    let l1_bytes = u64::from(img.h.l1_size) * 8;
    let copy = if l1_bytes == 0 {
        0
    } else {
        let off = img.rc.alloc(st, l1_bytes.div_ceil(img.cs))?;
        img.write_l1(off, &l1)?;
        off
    };
    let mut active = l1;
    if img.update_refcounts(&mut active, 1)? {
        img.write_l1(img.h.l1_table_offset, &active)?;
        st.sync()?;
    }
    let snap = Snapshot {
        l1_offset: copy,
        l1_size: img.h.l1_size,
        id: id.to_string(),
        name: name.to_string(),
        date_sec: date.0,
        date_nsec: date.1,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: Some(img.h.size),
        icount: Some(0),
        unknown_extra: Vec::new(),
    };
    snaps.push(snap.clone());
    img.write_table(&snaps)?;
    Ok(snap)
}

/// Reverts the disk to snapshot `key` (its id, else its name).
pub fn apply(st: &dyn Storage, key: &str) -> Result<()> {
    let mut img = Img::open(st)?;
    let snaps = read_table(st, &img.h)?;
    let i = find(&snaps, key, true).ok_or(Error::Unsupported("no such snapshot"))?;
    let sn = &snaps[i];
    if sn.disk_size.is_some_and(|d| d != img.h.size) {
        return Err(Error::Unsupported(
            "the snapshot's disk size differs from the image's (resize is not supported)",
        ));
    }
    if sn.l1_size > img.h.l1_size {
        return Err(Error::Unsupported(
            "the snapshot's L1 table is larger than the image's",
        ));
    }
    let mut sn_l1 = img.read_l1(sn.l1_offset, sn.l1_size)?;
    sn_l1.resize(
        usize::try_from(img.h.l1_size).map_err(|_| Error::TooLarge)?,
        0,
    );
    img.update_refcounts(&mut sn_l1.clone(), 1)?;
    let mut old = img.read_l1(img.h.l1_table_offset, img.h.l1_size)?;
    img.write_l1(img.h.l1_table_offset, &sn_l1)?;
    st.sync()?;
    img.update_refcounts(&mut old, -1)?;
    let mut active = sn_l1;
    if img.update_refcounts(&mut active, 0)? {
        img.write_l1(img.h.l1_table_offset, &active)?;
        st.sync()?;
    }
    Ok(())
}

/// Deletes snapshot `name` (by name, as qemu-img's -d).
pub fn delete(st: &dyn Storage, name: &str) -> Result<()> {
    let mut img = Img::open(st)?;
    let mut snaps = read_table(st, &img.h)?;
    let i = find(&snaps, name, false).ok_or(Error::Unsupported("snapshot not found"))?;
    let sn = snaps.remove(i);
    img.write_table(&snaps)?;
    let mut l1 = img.read_l1(sn.l1_offset, sn.l1_size)?;
    img.update_refcounts(&mut l1, -1)?;
    if sn.l1_size > 0 {
        let mut freed = Vec::new();
        img.rc
            .free(st, sn.l1_offset, u64::from(sn.l1_size) * 8, &mut freed)?;
    }
    let mut active = img.read_l1(img.h.l1_table_offset, img.h.l1_size)?;
    if img.update_refcounts(&mut active, 0)? {
        img.write_l1(img.h.l1_table_offset, &active)?;
    }
    st.sync()?;
    Ok(())
}
