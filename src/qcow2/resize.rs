//! Growing a qcow2 image offline (`resize`, as `qemu-img resize` grows): the header's virtual
//! size and L1 size.
//!
//! The L1 table keeps its place: growth is allowed as far as the clusters already allocated to
//! it reach (with 64 KiB clusters one L1 cluster covers 4 TiB, so in practice always); the new
//! entries must read as zero there. Size and L1 size sit in the header's first 40 bytes and are
//! written with one 16-byte write, so a crash leaves the old or the new header, both
//! consistent. Works the same for encrypted images (the LUKS payload has no size of its own).

use super::header::Header;
use super::Error;
use crate::storage::Storage;

/// Offset of `size` (u64 BE) in the header; `crypt_method` (u32) follows, then `l1_size`.
const SIZE_OFFSET: u64 = 24;

/// Grows the image in `storage` to `new_size` bytes (a multiple of 512). Refuses to shrink,
/// dirty or corrupt images, and growth that would need a larger L1 table.
pub fn grow(storage: &dyn Storage, new_size: u64) -> Result<(), Error> {
    let h = Header::read(storage)?;
    if new_size < h.size {
        return Err(Error::Unsupported("shrinking a qcow2 image"));
    }
    if !new_size.is_multiple_of(512) {
        return Err(Error::InvalidHeader {
            what: "new size is not a multiple of 512",
        });
    }
    if h.is_dirty() || h.is_corrupt() {
        return Err(Error::Unsupported(
            "resizing a dirty or corrupt image (run check --repair first)",
        ));
    }
    if new_size == h.size {
        return Ok(());
    }
    let cluster = h.cluster_size();
    let per_l1 = cluster.checked_mul(h.l2_entries()).ok_or(Error::TooLarge)?;
    let need = new_size.div_ceil(per_l1);
    let need32 = u32::try_from(need).map_err(|_| Error::TooLarge)?;
    let have = u64::from(h.l1_size);
    let allocated = (have * 8).div_ceil(cluster) * cluster / 8;
    if need > allocated.max(have) {
        return Err(Error::Unsupported(
            "growing this far needs a larger L1 table, which resize cannot move yet",
        ));
    }
    if need > have {
        // The entries we are about to expose must be unused (zero).
        let start = h
            .l1_table_offset
            .checked_add(have * 8)
            .ok_or(Error::TooLarge)?;
        let len = usize::try_from((need - have) * 8).map_err(|_| Error::TooLarge)?;
        let mut buf = vec![0u8; len];
        storage.read_at(&mut buf, start)?;
        if buf.iter().any(|&b| b != 0) {
            return Err(Error::InvalidHeader {
                what: "L1 table slack is not zero",
            });
        }
    }
    let mut field = [0u8; 16];
    storage.read_at(&mut field, SIZE_OFFSET)?;
    field[0..8].copy_from_slice(&new_size.to_be_bytes());
    field[12..16].copy_from_slice(&need32.max(h.l1_size).to_be_bytes());
    storage.write_at(&field, SIZE_OFFSET)?;
    storage.sync()?;
    Ok(())
}
