//! The virtio-blk configuration space (`struct virtio_blk_config`, virtio 1.2 §5.2.4).
//!
//! Serialised little-endian as the spec lays it out. Frontends read a *prefix*: QEMU 10 asks for
//! 57 bytes (up to `write_zeroes_may_unmap`), cloud-hypervisor for 60; GET_CONFIG must answer
//! exactly the bytes asked for ([`BlkConfig::read`]).

/// Size of the whole structure we serialise (through the zoned fields, all zero).
pub const CONFIG_LEN: usize = 96;
/// Offset of the `writeback` byte, the one field a driver may write (with CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;

/// Device configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum size of one segment (only meaningful with VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Maximum number of segments in a request.
    pub seg_max: u32,
    /// Legacy geometry: cylinders, heads, sectors.
    pub geometry: (u16, u8, u8),
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// 1 = write-back cache (driver must flush), 0 = write-through.
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Maximum discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Maximum sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// The configuration space as bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[16..18].copy_from_slice(&self.geometry.0.to_le_bytes());
        b[18] = self.geometry.1;
        b[19] = self.geometry.2;
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[WRITEBACK_OFFSET] = self.writeback;
        // b[33]: unused0
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        // 57..60 unused1; 60..72 secure erase; 72..96 zoned: not offered, zero.
        b
    }

    /// Exactly `len` bytes from `offset`, or `None` if that is outside the structure.
    pub fn read(&self, offset: u32, len: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        let bytes = self.to_bytes();
        bytes.get(start..end).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlkConfig {
        BlkConfig {
            capacity: 0x0102_0304_0506_0708,
            seg_max: 126,
            blk_size: 4096,
            writeback: 1,
            num_queues: 2,
            max_discard_sectors: 0x3f_ffff,
            max_discard_seg: 16,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0x3f_ffff,
            max_write_zeroes_seg: 16,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    #[test]
    fn fields_sit_at_spec_offsets() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[12..16], &126u32.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(b[32], 1);
        assert_eq!(&b[34..36], &2u16.to_le_bytes());
        assert_eq!(&b[40..44], &16u32.to_le_bytes());
        assert_eq!(&b[44..48], &8u32.to_le_bytes());
        assert_eq!(b[56], 1);
    }

    #[test]
    fn read_answers_exactly_the_prefix_asked_for() {
        let c = sample();
        assert_eq!(c.read(0, 57).map(|v| v.len()), Some(57));
        assert_eq!(c.read(0, 60).map(|v| v.len()), Some(60));
        assert_eq!(c.read(32, 1), Some(vec![1]));
        assert_eq!(c.read(0, 97), None);
        assert_eq!(c.read(u32::MAX, 2), None);
    }
}
