//! Bounds of the metadata offsets an image gives us, checked once at open.
//!
//! Writes go wherever the L1 and refcount tables point: an entry far past the end of the file
//! would make the first allocation or L2 update write at an absurd offset (a sparse file of
//! petabytes). A read-write open refuses such tables instead, with the file untouched.

use super::alloc::RT_OFFSET_MASK;
use super::metadata::OFFSET_MASK;
use super::{Error, Result};

/// Refuses refcount blocks and L2 tables that start a cluster or more past the end of the file.
pub(super) fn check_table_offsets(
    file_len: u64,
    cluster_size: u64,
    l1: &[u64],
    refcount_table: &[u64],
) -> Result<()> {
    let limit = file_len.saturating_add(cluster_size);
    let tables = [
        ("refcount block", refcount_table, RT_OFFSET_MASK),
        ("L2 table", l1, OFFSET_MASK),
    ];
    for (what, table, mask) in tables {
        for &e in table {
            let off = e & mask;
            if off != 0 && off >= limit {
                log::error!("{what} at {off:#x} is beyond the end of the file ({file_len:#x})");
                return Err(Error::BadTable {
                    what,
                    offset: off,
                    reason: "beyond the end of the file",
                });
            }
        }
    }
    Ok(())
}
