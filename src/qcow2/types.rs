//! Geometry of an open image: cluster size and how guest offsets split into table indices.

use super::header::Header;
use super::Error;

/// Immutable geometry derived from a validated header.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// Entries per L2 table (log2).
    pub l2_bits: u32,
    /// Guest-visible size in bytes.
    pub size: u64,
    pub version: u32,
    pub compression_type: u8,
}

impl Geometry {
    /// From a validated header.
    pub fn new(h: &Header) -> Self {
        let l2_entries = h.l2_entries();
        Self {
            cluster_bits: h.cluster_bits,
            cluster_size: h.cluster_size(),
            l2_bits: l2_entries.trailing_zeros(),
            size: h.size,
            version: h.version,
            compression_type: h.compression_type,
        }
    }

    /// Guest cluster index of a guest offset.
    pub fn guest_cluster(&self, guest_offset: u64) -> u64 {
        guest_offset >> self.cluster_bits
    }

    /// Offset within its cluster.
    pub fn in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size - 1)
    }

    /// (L1 index, L2 index) of a guest cluster.
    pub fn split(&self, gc: u64) -> Result<(usize, usize), Error> {
        let l1 = usize::try_from(gc >> self.l2_bits).map_err(|_| Error::TooLarge)?;
        let l2 = usize::try_from(gc & ((1u64 << self.l2_bits) - 1)).map_err(|_| Error::TooLarge)?;
        Ok((l1, l2))
    }

    /// Size in bytes of a cluster-sized buffer.
    pub fn cluster_usize(&self) -> usize {
        // cluster_bits <= 21 was validated.
        1usize << self.cluster_bits
    }
}
