//! The `VhostUserBackend` implementation: features, config space, and the per-queue workers.
//!
//! We implement the `&self` trait [`VhostUserBackend`] (not `VhostUserBackendMut` behind a lock,
//! which would serialise every queue): each queue has its own worker thread
//! (`queues_per_thread` = one bit each) and its own scratch space; the only shared state is the
//! image (`Send + Sync`, locks inside it as it needs) and a few atomics.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::image::BlockImage;
use crate::virtio_blk::config::{BlkConfig, WRITEBACK_OFFSET};
use crate::virtio_blk::exec::{handle_chain, Device};
use crate::virtio_blk::request::{Limits, Scratch, MAX_DWZ_SEGMENTS};
use crate::virtio_blk::{ID_BYTES, SECTOR_SHIFT};

/// Guest memory as the backend sees it. No dirty bitmap: we do not offer `VHOST_F_LOG_ALL`, so
/// QEMU blocks migration of the device rather than losing writes (see docs/architecture.md).
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Largest queue we accept (QEMU's and the Linux driver's maximum).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest number of queues (one worker thread each; `queues_per_thread` masks are u64).
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

/// Errors building a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("num-queues must be between 1 and {MAX_QUEUES}, not {0}")]
    NumQueues(u16),
    #[error("queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    #[error("logical-block-size must be 512 or 4096, not {0}")]
    BlockSize(u32),
    #[error("the image size {0} is not a multiple of the logical block size")]
    UnalignedCapacity(u64),
}

/// The vhost-user-blk backend for one connection.
pub struct BlkBackend {
    image: Arc<dyn BlockImage>,
    mem: RwLock<GuestMemory>,
    features: u64,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    config: BlkConfig,
    limits: Limits,
    serial: [u8; ID_BYTES],
    num_queues: u16,
    queue_size: u16,
    /// One per queue; each is only ever locked by that queue's worker thread.
    scratch: Vec<Mutex<Scratch>>,
}

impl BlkBackend {
    /// A backend serving `image` with the given options, using `mem` for guest memory (the
    /// same `GuestMemoryAtomic` handed to `VhostUserDaemon::new`).
    pub fn new(
        image: Arc<dyn BlockImage>,
        opts: &BlkOptions,
        mem: GuestMemory,
    ) -> Result<Self, BackendError> {
        if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
            return Err(BackendError::NumQueues(opts.num_queues));
        }
        if !opts.queue_size.is_power_of_two()
            || opts.queue_size < 2
            || opts.queue_size > MAX_QUEUE_SIZE
        {
            return Err(BackendError::QueueSize(opts.queue_size));
        }
        if opts.logical_block_size != 512 && opts.logical_block_size != 4096 {
            return Err(BackendError::BlockSize(opts.logical_block_size));
        }
        let capacity = image.capacity();
        if !capacity.is_multiple_of(u64::from(opts.logical_block_size)) {
            return Err(BackendError::UnalignedCapacity(capacity));
        }
        let read_only = image.read_only();
        let seg_max = u32::from(opts.queue_size) - 2;
        let discard_alignment = (image.discard_granularity() >> SECTOR_SHIFT).max(1);

        let mut features = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
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

        let capacity_sectors = capacity >> SECTOR_SHIFT;
        let max_dwz_seg = u32::try_from(MAX_DWZ_SEGMENTS).unwrap_or(1);
        let config = BlkConfig {
            capacity: capacity_sectors,
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
            capacity_sectors,
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
            mem: RwLock::new(mem),
            features,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            config,
            limits,
            serial,
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            scratch: (0..opts.num_queues)
                .map(|_| Mutex::new(Scratch::with_capacity(seg_max)))
                .collect(),
        })
    }

    /// The device configuration (with the current writeback setting).
    pub fn config(&self) -> BlkConfig {
        BlkConfig {
            writeback: u8::from(self.writeback.load(Ordering::Relaxed)),
            ..self.config
        }
    }

    /// The virtio features offered.
    pub fn offered_features(&self) -> u64 {
        self.features
    }

    /// Serves every available chain of one queue; signals the guest once per batch. Returns
    /// how many chains were completed.
    fn process_queue(&self, vring: &VringRwLock<GuestMemory>, queue: usize) -> io::Result<u32> {
        let mem = self
            .mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .memory();
        let mut scratch = self
            .scratch
            .get(queue)
            .ok_or_else(|| io::Error::other("queue index out of range"))?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let dev = Device {
            limits: &self.limits,
            serial: &self.serial,
            writethrough: !self.writeback.load(Ordering::Relaxed),
        };
        let mut completed = 0u32;
        loop {
            // Hold the vring lock only to pop and to publish, never across I/O.
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let used = handle_chain(&*mem, chain, &mut scratch, &*self.image, &dev, queue);
            if let Err(e) = vring.add_used(head, used) {
                log::error!("queue {queue}: cannot publish a used element: {e}");
                break;
            }
            completed += 1;
        }
        if completed > 0 {
            let notify = vring.needs_notification().unwrap_or(true);
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    log::error!("queue {queue}: cannot signal the guest: {e}");
                }
            }
        }
        Ok(completed)
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemory>;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Protocol);
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Protocol);
        // Not INFLIGHT_SHMFD (vhost-user-backend cannot serve it), not IN_ORDER or
        // NOTIFICATION_DATA (not implemented), not LOG_SHMFD (no dirty logging).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // An empty answer tells the frontend the request was bad.
        self.config().read(offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        log::debug!("SET_CONFIG offset {offset} len {}", buf.len());
        let wce = self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE);
        match (usize::try_from(offset), buf) {
            (Ok(WRITEBACK_OFFSET), [v]) if wce != 0 => {
                let writeback = *v != 0;
                if !writeback {
                    // Switching to write-through: what was cached so far must be durable too.
                    self.image.flush().map_err(io::Error::other)?;
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
            _ => {
                log::warn!(
                    "refused SET_CONFIG of {} bytes at offset {offset} (CONFIG_WCE acked: {})",
                    buf.len(),
                    wce != 0
                );
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only the writeback byte is writable",
                ))
            }
        }
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Protocol);
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = mem;
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The queue is already marked not ready, so its worker pops nothing new; taking its
        // scratch lock waits until the batch in progress has completed and been published, so
        // the avail index the frontend is about to read has no request still in flight.
        if let Some(s) = usize::try_from(queue_index)
            .ok()
            .and_then(|q| self.scratch.get(q))
        {
            drop(s.lock().unwrap_or_else(PoisonError::into_inner));
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| log::error!("cannot create a worker exit event: {e}"))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Worker);
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected event set {evset:?} on queue {thread_id}"
            )));
        }
        // One queue per thread: the thread index is the queue index and the event index within
        // the thread's vrings is 0.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("unknown device event {device_event}")))?;
        if self.event_idx.load(Ordering::Relaxed) {
            // With EVENT_IDX the guest only kicks when it sees our avail_event move: suppress
            // kicks while draining, re-enable, and drain again if more arrived meanwhile.
            let mut idle_rounds = 0;
            loop {
                if let Err(e) = vring.disable_notification() {
                    log::error!("queue {thread_id}: cannot disable notifications: {e}");
                }
                let completed = self.process_queue(vring, thread_id)?;
                // A stopped queue (GET_VRING_BASE) pops nothing while its avail index may still
                // be ahead: do not spin on it. Two rounds without progress mean the same.
                if !vring.get_ref().get_queue().ready() {
                    break;
                }
                idle_rounds = if completed == 0 { idle_rounds + 1 } else { 0 };
                match vring.enable_notification() {
                    Ok(true) if idle_rounds < 2 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        log::error!("queue {thread_id}: cannot enable notifications: {e}");
                        break;
                    }
                }
            }
        } else {
            self.process_queue(vring, thread_id)?;
        }
        Ok(())
    }
}
