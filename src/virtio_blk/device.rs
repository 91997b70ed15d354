//! The virtio-blk device model: offered features, configuration space, request limits and the
//! write-cache state, shared by every queue and every connection of one export.
//!
//! The vhost-user layer asks this module what to offer and hands it descriptor chains; it never
//! looks inside a request. The capacity can change while the device runs (live resize): it
//! lives in an atomic, and every batch of requests is checked against the value current when
//! the batch started.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryBackend;

use super::config::{BlkConfig, WRITEBACK_OFFSET};
use super::exec::{handle_chain_counted, Device};
use super::request::{Limits, Scratch, MAX_DWZ_SEGMENTS};
use super::stats::QueueStats;
use super::{ID_BYTES, SECTOR_SHIFT};
use crate::image::{BlockImage, ImageError};

/// Largest queue we accept (QEMU's and the Linux driver's maximum).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest number of queues (one worker thread each).
pub const MAX_QUEUES: u16 = 64;
/// Per-segment limit for discard and write-zeroes (QEMU's BDRV_REQUEST_MAX_SECTORS).
const MAX_DWZ_SECTORS: u32 = 0x3f_ffff;

/// How the device is presented.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Number of request queues (1..=64).
    pub num_queues: u16,
    /// Maximum queue size (a power of two, 2..=1024).
    pub queue_size: u16,
    /// Logical block size: 512 or 4096.
    pub logical_block_size: u32,
    /// GET_ID answer (truncated to 20 bytes).
    pub serial: String,
}

/// Errors building a device or changing its configuration.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("num-queues must be between 1 and {MAX_QUEUES}, not {0}")]
    NumQueues(u16),
    #[error("queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    #[error("logical-block-size must be 512 or 4096, not {0}")]
    BlockSize(u32),
    #[error("the image size {0} is not a multiple of the logical block size")]
    UnalignedCapacity(u64),
    #[error("only the writeback byte is writable (offset {offset}, {len} bytes)")]
    ReadOnlyConfig { offset: u32, len: usize },
    #[error("flush before switching to write-through failed")]
    Flush(#[source] ImageError),
}

/// One virtio-blk device: the image and everything the guest negotiates about it.
pub struct BlkDevice {
    image: Arc<dyn BlockImage>,
    features: u64,
    writeback: AtomicBool,
    capacity_bytes: AtomicU64,
    /// Limits with a placeholder capacity; [`BlkDevice::limits`] fills in the current one.
    limits: Limits,
    config: BlkConfig,
    serial: [u8; ID_BYTES],
    num_queues: u16,
    queue_size: u16,
    stats: Vec<QueueStats>,
}

impl BlkDevice {
    /// A device serving `image` with the given options.
    pub fn new(image: Arc<dyn BlockImage>, opts: &BlkOptions) -> Result<Self, DeviceError> {
        if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
            return Err(DeviceError::NumQueues(opts.num_queues));
        }
        if !opts.queue_size.is_power_of_two()
            || opts.queue_size < 2
            || opts.queue_size > MAX_QUEUE_SIZE
        {
            return Err(DeviceError::QueueSize(opts.queue_size));
        }
        if opts.logical_block_size != 512 && opts.logical_block_size != 4096 {
            return Err(DeviceError::BlockSize(opts.logical_block_size));
        }
        let capacity = image.capacity();
        if !capacity.is_multiple_of(u64::from(opts.logical_block_size)) {
            return Err(DeviceError::UnalignedCapacity(capacity));
        }
        let read_only = image.read_only();
        let seg_max = u32::from(opts.queue_size) - 2;
        let discard_alignment = (image.discard_granularity() >> SECTOR_SHIFT).max(1);

        let mut features = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let max_dwz_seg = u32::try_from(MAX_DWZ_SEGMENTS).unwrap_or(1);
        let config = BlkConfig {
            capacity: 0,
            size_max: 0,
            seg_max,
            geometry: (0, 0, 0),
            blk_size: opts.logical_block_size,
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: 1,
            num_queues: opts.num_queues,
            max_discard_sectors: MAX_DWZ_SECTORS,
            max_discard_seg: max_dwz_seg,
            discard_sector_alignment: discard_alignment,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS,
            max_write_zeroes_seg: max_dwz_seg,
            write_zeroes_may_unmap: 1,
        };
        let limits = Limits {
            capacity_sectors: 0,
            block_size: opts.logical_block_size,
            seg_max,
            discard: !read_only,
            write_zeroes: !read_only,
            max_discard_sectors: MAX_DWZ_SECTORS,
            max_discard_seg: max_dwz_seg,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS,
            max_write_zeroes_seg: max_dwz_seg,
        };
        let mut serial = [0u8; ID_BYTES];
        let s = opts.serial.as_bytes();
        let n = s.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&s[..n]);

        Ok(Self {
            image,
            features,
            writeback: AtomicBool::new(true),
            capacity_bytes: AtomicU64::new(capacity),
            limits,
            config,
            serial,
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            stats: (0..opts.num_queues)
                .map(|_| QueueStats::default())
                .collect(),
        })
    }

    /// The image behind the device.
    pub fn image(&self) -> &Arc<dyn BlockImage> {
        &self.image
    }

    /// The virtio device features offered (transport features included, vhost-user's not).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Number of request queues.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Largest queue size accepted.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Current capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity_bytes.load(Ordering::Acquire)
    }

    /// Takes the image's capacity as the device's (after the image was resized). Requests of
    /// batches started afterwards are checked against it.
    pub fn refresh_capacity(&self) -> Result<u64, DeviceError> {
        let capacity = self.image.capacity();
        if !capacity.is_multiple_of(u64::from(self.limits.block_size)) {
            return Err(DeviceError::UnalignedCapacity(capacity));
        }
        self.capacity_bytes.store(capacity, Ordering::Release);
        Ok(capacity)
    }

    /// Whether the guest's write cache is write-back.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Request limits with the current capacity.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.capacity() >> SECTOR_SHIFT,
            ..self.limits
        }
    }

    /// The configuration space as it is now (capacity and writeback included).
    pub fn config(&self) -> BlkConfig {
        BlkConfig {
            capacity: self.capacity() >> SECTOR_SHIFT,
            writeback: u8::from(self.writeback()),
            ..self.config
        }
    }

    /// Exactly `len` bytes of the configuration space from `offset`, or `None` if outside it.
    pub fn read_config(&self, offset: u32, len: u32) -> Option<Vec<u8>> {
        self.config().read(offset, len)
    }

    /// A driver write to the configuration space: only the writeback byte, and only with
    /// CONFIG_WCE negotiated (`acked_features`).
    pub fn write_config(
        &self,
        offset: u32,
        buf: &[u8],
        acked_features: u64,
    ) -> Result<(), DeviceError> {
        let wce = acked_features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        match (usize::try_from(offset), buf) {
            (Ok(WRITEBACK_OFFSET), [v]) if wce => {
                let writeback = *v != 0;
                if !writeback {
                    // Switching to write-through: what was cached so far must be durable too.
                    self.image.flush().map_err(DeviceError::Flush)?;
                }
                self.writeback.store(writeback, Ordering::Relaxed);
                log::info!(
                    "guest set the cache to {}",
                    if writeback {
                        "write-back"
                    } else {
                        "write-through"
                    }
                );
                Ok(())
            }
            _ => Err(DeviceError::ReadOnlyConfig {
                offset,
                len: buf.len(),
            }),
        }
    }

    /// Scratch space for one queue's worker.
    pub fn new_scratch(&self) -> Scratch {
        Scratch::with_capacity(self.limits.seg_max)
    }

    /// Per-queue counters (empty slice index = no such queue).
    pub fn stats(&self) -> &[QueueStats] {
        &self.stats
    }

    /// Serves one descriptor chain of queue `queue` against `limits` (from [`Self::limits`],
    /// taken once per batch); returns the used length to publish.
    pub fn handle<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        descs: impl Iterator<Item = Descriptor>,
        limits: &Limits,
        scratch: &mut Scratch,
        queue: usize,
    ) -> u32 {
        let dev = Device {
            limits,
            serial: &self.serial,
            writethrough: !self.writeback(),
        };
        handle_chain_counted(
            mem,
            descs,
            scratch,
            &*self.image,
            &dev,
            queue,
            self.stats.get(queue),
        )
    }
}
