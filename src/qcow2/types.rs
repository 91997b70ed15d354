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
    /// Extended L2 entries (128 bits, 32 subclusters).
    pub extended: bool,
    /// log2 of the allocation unit: the subcluster (extended L2) or the cluster.
    pub unit_bits: u32,
    /// An external data file holds the guest data (guest offset = host offset).
    pub data_file: bool,
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
            extended: h.extended_l2(),
            unit_bits: if h.extended_l2() {
                h.cluster_bits - 5
            } else {
                h.cluster_bits
            },
            data_file: h.incompatible & super::header::INCOMPAT_DATA_FILE != 0,
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

    /// Size of the allocation unit (subcluster or cluster).
    pub fn unit_size(&self) -> u64 {
        1 << self.unit_bits
    }

    /// 64-bit words per L2 entry.
    pub fn entry_words(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }

    /// Size in bytes of a cluster-sized buffer.
    pub fn cluster_usize(&self) -> usize {
        // cluster_bits <= 21 was validated.
        1usize << self.cluster_bits
    }
}

/// A byte offset in the guest's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image (or external data) file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

impl GuestOffset {
    /// `self + n` (callers stay within the checked request range).
    pub fn plus(self, n: u64) -> Self {
        Self(self.0 + n)
    }
}

impl HostOffset {
    /// `self + n` (callers stay within one mapped cluster run).
    pub fn plus(self, n: u64) -> Self {
        Self(self.0 + n)
    }
}
