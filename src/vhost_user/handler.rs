//! Our vhost-user request handler: the `vhost` crate parses and answers messages, this decides.
//!
//! One [`Connection`] per frontend connection; the device model ([`BlkDevice`]) outlives it so a
//! reconnecting frontend finds the same capacity and cache mode. Messages are handled one at a
//! time on the connection's thread, under one lock; queue workers never take that lock.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandler,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::backend_channel::BackendChannel;
use super::inflight::{InflightQueue, InflightRegion};
use super::memory::{MemoryTable, MAX_MEM_SLOTS};
use super::vring::{build_queue, spawn, Vring, WorkerSetup};
use crate::virtio_blk::device::BlkDevice;

/// Protocol features we offer.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    // Not IN_ORDER or NOTIFICATION_DATA (not implemented).
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
}

fn handler_err(e: impl std::error::Error + Send + Sync + 'static) -> VuError {
    VuError::ReqHandlerError(io::Error::other(e))
}

/// What the frontend negotiated and set up on one connection.
#[derive(Default)]
struct State {
    acked_features: u64,
    acked_protocol: u64,
    memory: MemoryTable,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightRegion>>,
}

/// Snapshot of the negotiated state, for `query`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Negotiated {
    /// Virtio features acked.
    pub features: u64,
    /// Protocol features acked.
    pub protocol_features: u64,
    /// Queues running.
    pub running_queues: usize,
}

/// One frontend connection.
pub struct Connection {
    dev: Arc<BlkDevice>,
    state: Mutex<State>,
    /// Our end of the backend-request channel, once the frontend set one up.
    backend: Mutex<Option<BackendChannel>>,
}

impl Connection {
    /// A connection serving `dev`.
    pub fn new(dev: Arc<BlkDevice>) -> Self {
        let vrings = (0..dev.num_queues()).map(|_| Vring::default()).collect();
        Self {
            dev,
            state: Mutex::new(State {
                vrings,
                ..State::default()
            }),
            backend: Mutex::new(None),
        }
    }

    /// Keeps our duplicate of the frontend's backend-request socket.
    pub fn set_backend_channel(&self, chan: BackendChannel) {
        *self.backend.lock().unwrap_or_else(PoisonError::into_inner) = Some(chan);
    }

    /// Tells the frontend the config space changed (CONFIG_CHANGE_MSG). `Ok(false)` if the
    /// frontend gave us no backend channel.
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let (backend_req, reply_ack) = {
            let s = self.state();
            (
                Self::protocol_acked(&s, VhostUserProtocolFeatures::BACKEND_REQ),
                Self::protocol_acked(&s, VhostUserProtocolFeatures::REPLY_ACK),
            )
        };
        let mut chan = self.backend.lock().unwrap_or_else(PoisonError::into_inner);
        match chan.as_mut() {
            Some(c) if backend_req => {
                c.config_changed(reply_ack)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was negotiated so far.
    pub fn negotiated(&self) -> Negotiated {
        let s = self.state();
        Negotiated {
            features: s.acked_features,
            protocol_features: s.acked_protocol,
            running_queues: s.vrings.iter().filter(|v| v.worker.is_some()).count(),
        }
    }

    /// Stops every running queue (the frontend went away); returns how many were running.
    pub fn stop_all(&self) -> usize {
        let mut s = self.state();
        let mut n = 0;
        for v in &mut s.vrings {
            if let Some(w) = v.worker.take() {
                if let Some(next) = w.stop() {
                    v.base = next;
                }
                n += 1;
            }
        }
        n
    }

    fn protocol_acked(s: &State, f: VhostUserProtocolFeatures) -> bool {
        s.acked_protocol & f.bits() != 0
    }

    fn vring(s: &mut State, index: u32) -> VuResult<&mut Vring> {
        usize::try_from(index)
            .ok()
            .and_then(|i| s.vrings.get_mut(i))
            .ok_or(VuError::InvalidParam)
    }

    /// Starts ring `index` if it has everything it needs and is not running.
    fn try_start(&self, s: &mut State, index: u8) -> VuResult<()> {
        let event_idx = s.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let protocol = s.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let mem = s.memory.memory().clone();
        let region = s.inflight.clone();
        let dev = self.dev.clone();
        let v = Self::vring(s, u32::from(index))?;
        if v.worker.is_some() {
            return Ok(());
        }
        let (Some(addrs), Some(kick)) = (v.addrs, v.kick.as_ref()) else {
            return Ok(());
        };
        let guard = mem.memory();
        let (mut queue, used_idx) =
            build_queue(&guard, v.num, addrs, event_idx).map_err(VuError::ReqHandlerError)?;
        let mut next_avail = v.base;
        let mut resubmit = Vec::new();
        let mut inflight = region.and_then(|r| InflightQueue::new(r, u16::from(index)));
        if let Some(t) = inflight.as_mut() {
            let r = t.recover(used_idx, v.num);
            if r.next_avail != v.base {
                log::info!(
                    "queue {index}: resuming at avail {} (frontend said {}), {} in flight",
                    r.next_avail,
                    v.base,
                    r.resubmit.len()
                );
            }
            next_avail = r.next_avail;
            resubmit = r.resubmit;
        }
        queue.set_next_avail(next_avail);
        if !protocol {
            // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
            v.enabled.store(true, Ordering::Release);
        }
        let worker = spawn(WorkerSetup {
            index: u16::from(index),
            queue,
            mem: mem.clone(),
            dev,
            kick: kick.try_clone().map_err(VuError::ReqHandlerError)?,
            call: v.call.clone(),
            enabled: v.enabled.clone(),
            inflight,
            resubmit,
        })
        .map_err(VuError::ReqHandlerError)?;
        v.worker = Some(worker);
        Ok(())
    }
}

fn eventfd(file: Option<File>) -> Option<EventFd> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the File owned its descriptor; EventFd takes over that sole ownership.
    file.map(|f| unsafe { EventFd::from_raw_fd(f.into_raw_fd()) })
}

impl VhostUserBackendReqHandler for Connection {
    fn set_owner(&self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&self) -> VuResult<()> {
        // Deprecated; we read it as "disable all rings".
        self.stop_all();
        Ok(())
    }

    fn reset_device(&self) -> VuResult<()> {
        self.stop_all();
        let mut s = self.state();
        for v in &mut s.vrings {
            *v = Vring::default();
        }
        s.acked_features = 0;
        Ok(())
    }

    fn get_features(&self) -> VuResult<u64> {
        Ok(self.dev.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&self, features: u64) -> VuResult<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            return Err(VuError::InvalidParam);
        }
        self.state().acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening == Some(true) {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        self.state().memory.set(ctx, files).map_err(handler_err)?;
        Ok(None)
    }

    fn set_vring_num(&self, index: u32, num: u32) -> VuResult<()> {
        let max = self.dev.queue_size();
        let num = u16::try_from(num).map_err(|_| VuError::InvalidParam)?;
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        Self::vring(&mut self.state(), index)?.num = num;
        Ok(())
    }

    fn set_vring_addr(
        &self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let mut s = self.state();
        let t = |va| s.memory.va_to_gpa(va).map_err(handler_err);
        let addrs = (t(descriptor)?, t(available)?, t(used)?);
        Self::vring(&mut s, index)?.addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        Self::vring(&mut self.state(), index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&self, index: u32) -> VuResult<VhostUserVringState> {
        let mut s = self.state();
        let v = Self::vring(&mut s, index)?;
        if let Some(w) = v.worker.take() {
            match w.stop() {
                Some(next) => v.base = next,
                None => log::error!("queue {index}: worker panicked"),
            }
        }
        v.kick = None;
        *v.call.write().unwrap_or_else(PoisonError::into_inner) = None;
        v.enabled.store(false, Ordering::Release);
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut s = self.state();
        let v = Self::vring(&mut s, u32::from(index))?;
        if let Some(w) = v.worker.take() {
            // A new kick fd for a running ring: restart it on the new fd.
            if let Some(next) = w.stop() {
                v.base = next;
            }
        }
        v.kick = eventfd(fd);
        if v.kick.is_none() {
            log::warn!("queue {index}: polling mode (no kick fd) is not supported");
            return Ok(());
        }
        self.try_start(&mut s, index)
    }

    fn set_vring_call(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut s = self.state();
        let v = Self::vring(&mut s, u32::from(index))?;
        *v.call.write().unwrap_or_else(PoisonError::into_inner) = eventfd(fd);
        Ok(())
    }

    fn set_vring_err(&self, index: u8, _fd: Option<File>) -> VuResult<()> {
        // We never signal ring errors; the fd is closed.
        Self::vring(&mut self.state(), u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&self, features: u64) -> VuResult<()> {
        // REPLY_ACK is added by the vhost crate whatever we offer.
        let offered = protocol_features().bits() | VhostUserProtocolFeatures::REPLY_ACK.bits();
        if features & !offered != 0 {
            return Err(VuError::InvalidParam);
        }
        self.state().acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&self) -> VuResult<u64> {
        Ok(u64::from(self.dev.num_queues()))
    }

    fn set_vring_enable(&self, index: u32, enable: bool) -> VuResult<()> {
        let mut s = self.state();
        let v = Self::vring(&mut s, index)?;
        v.enabled.store(enable, Ordering::Release);
        if let Some(w) = v.worker.as_ref() {
            w.wake();
        }
        Ok(())
    }

    fn get_config(
        &self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // An empty answer tells the frontend the request was bad.
        Ok(self.dev.read_config(offset, size).unwrap_or_default())
    }

    fn set_config(&self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        let acked = self.state().acked_features;
        self.dev.write_config(offset, buf, acked).map_err(|e| {
            log::warn!("refused SET_CONFIG: {e}");
            handler_err(e)
        })
    }

    fn set_backend_req_fd(&self, _backend: Backend) {}

    fn set_gpu_socket(&self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&self, inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let mut s = self.state();
        if !Self::protocol_acked(&s, VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            return Err(VuError::InvalidOperation("INFLIGHT_SHMFD not negotiated"));
        }
        let region = InflightRegion::create(
            inflight.num_queues,
            inflight.queue_size,
            self.dev.num_queues(),
        )
        .map_err(handler_err)?;
        let file = region
            .file()
            .try_clone()
            .map_err(VuError::ReqHandlerError)?;
        let reply = VhostUserInflight {
            mmap_size: u64::try_from(region.len()).map_err(|_| VuError::InvalidParam)?,
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        log::debug!(
            "GET_INFLIGHT_FD: {} queues of {}, {} bytes",
            inflight.num_queues,
            inflight.queue_size,
            region.len()
        );
        s.inflight = Some(Arc::new(region));
        Ok((reply, file))
    }

    fn set_inflight_fd(&self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let mut s = self.state();
        let region = InflightRegion::open(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
            self.dev.num_queues(),
        )
        .map_err(handler_err)?;
        log::debug!(
            "SET_INFLIGHT_FD: {} queues of {}",
            inflight.num_queues,
            inflight.queue_size
        );
        s.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening == Some(true) {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        self.state().memory.add(region, fd).map_err(handler_err)?;
        Ok(None)
    }

    fn remove_mem_region(&self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.state().memory.remove(region).map_err(handler_err)
    }

    fn set_device_state_fd(
        &self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        // virtio-blk has no internal state to transfer beyond what the frontend migrates; we do
        // not offer DEVICE_STATE, so the frontend gets a clean error answer.
        Err(VuError::InvalidOperation("no device state to transfer"))
    }

    fn check_device_state(&self) -> VuResult<()> {
        Err(VuError::InvalidOperation("no device state to transfer"))
    }

    fn get_shmem_config(&self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("LOG_SHMFD not offered"))
    }
}
