//! The snapshot table and the bitmap directory (docs/interop/qcow2.rst "Snapshots", "Bitmaps"):
//! only what the engine and the checker need: where each snapshot's L1 table and each
//! bitmap's table are, and how far the table and the directory extend.

use super::codec::{be16, be32, be64};
use super::header::{Header, AUTOCLEAR_BITMAPS, MAX_L1_BYTES};
use super::{Error, Result};
use crate::storage::Storage;

/// Largest bitmap directory or bitmap table we read (QEMU caps both at 64 MiB).
pub const MAX_BITMAP_BYTES: u64 = 64 << 20;

/// A table of `entries` 64-bit words at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRef {
    pub offset: u64,
    pub entries: u64,
}

impl TableRef {
    /// Whether the table is a sane size, cluster-aligned (`align`) and inside the file.
    pub fn valid(&self, align: u64, max_bytes: u64, file_len: u64) -> bool {
        let bytes = self.entries.saturating_mul(8);
        bytes <= max_bytes
            && self.offset.is_multiple_of(align)
            && self.offset.saturating_add(bytes) <= file_len
    }
}

/// The snapshot table as found.
#[derive(Debug, Default)]
pub struct Snapshots {
    /// Each snapshot's L1 table.
    pub l1_tables: Vec<TableRef>,
    /// Bytes the table takes from `snapshots_offset`.
    pub table_bytes: u64,
    /// The table runs past the end of the file (the entries after that point are missing).
    pub truncated: bool,
}

/// Reads the snapshot table: one small read per entry, at most `nb_snapshots` (≤ 65536).
pub fn read_snapshots(st: &dyn Storage, h: &Header, file_len: u64) -> Result<Snapshots> {
    let mut out = Snapshots::default();
    let mut pos = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        if pos.saturating_add(40) > file_len {
            out.truncated = true;
            break;
        }
        let mut fixed = [0u8; 40];
        st.read_at(&mut fixed, pos)?;
        let extra = u64::from(be32(&fixed, 36));
        let len = (40 + extra + u64::from(be16(&fixed, 12)) + u64::from(be16(&fixed, 14)))
            .div_ceil(8)
            * 8;
        out.l1_tables.push(TableRef {
            offset: be64(&fixed, 0),
            entries: u64::from(be32(&fixed, 8)),
        });
        pos = pos.checked_add(len).ok_or(Error::TooLarge)?;
        if pos > file_len {
            out.truncated = true;
            break;
        }
    }
    out.table_bytes = pos - h.snapshots_offset;
    Ok(out)
}

/// Whether a snapshot L1 table can be walked.
pub fn l1_valid(t: &TableRef, cluster_size: u64, file_len: u64) -> bool {
    t.valid(cluster_size, MAX_L1_BYTES, file_len)
}

/// The bitmap directory, if the image has consistent bitmaps: (directory offset, bytes, the
/// table of each bitmap). `None` when there are none or they are not valid (autoclear bit 0
/// clear: QEMU ignores them then).
pub fn read_bitmaps(
    st: &dyn Storage,
    h: &Header,
    file_len: u64,
) -> Result<Option<(u64, u64, Vec<TableRef>)>> {
    let Some(b) = h.bitmaps else {
        return Ok(None);
    };
    if h.autoclear & AUTOCLEAR_BITMAPS == 0
        || b.directory_size > MAX_BITMAP_BYTES
        || b.directory_offset.saturating_add(b.directory_size) > file_len
    {
        return Ok(None);
    }
    let mut dir = vec![0u8; usize::try_from(b.directory_size).map_err(|_| Error::TooLarge)?];
    st.read_at(&mut dir, b.directory_offset)?;
    let mut tables = Vec::new();
    let mut p = 0usize;
    while p + 24 <= dir.len() {
        tables.push(TableRef {
            offset: be64(&dir, p),
            entries: u64::from(be32(&dir, p + 8)),
        });
        let name = usize::from(be16(&dir, p + 14));
        let extra = usize::try_from(be32(&dir, p + 16)).map_err(|_| Error::TooLarge)?;
        p = p
            .checked_add((24 + name + extra).div_ceil(8) * 8)
            .ok_or(Error::TooLarge)?;
    }
    Ok(Some((b.directory_offset, b.directory_size, tables)))
}
