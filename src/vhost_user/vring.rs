//! One virtqueue: its configuration as the frontend sets it, and the worker thread that serves
//! it while it runs.
//!
//! A ring starts when its kick fd arrives (SET_VRING_KICK) and stops on GET_VRING_BASE; while
//! it runs its worker owns the `virtio_queue::Queue`. SET_VRING_ENABLE pauses and resumes it.
//! The worker completes each chain on its own (`complete`), so an engine that finishes
//! requests out of order fits the same path; the in-flight region records every fetch and
//! every completion.

use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::inflight::InflightQueue;
use super::memory::GuestMemory;
use crate::virtio_blk::device::BlkDevice;
use crate::virtio_blk::request::Scratch;

/// The call fd, replaceable while the ring runs (QEMU swaps it when it masks interrupts).
pub type CallFd = Arc<RwLock<Option<EventFd>>>;

/// A ring's configuration between messages.
pub struct Vring {
    /// Size set by SET_VRING_NUM.
    pub num: u16,
    /// Descriptor table, avail ring, used ring (guest physical addresses).
    pub addrs: Option<(u64, u64, u64)>,
    /// Where to resume fetching (SET_VRING_BASE, or where the last run stopped).
    pub base: u16,
    /// The frontend's kick eventfd.
    pub kick: Option<EventFd>,
    /// The frontend's call eventfd.
    pub call: CallFd,
    /// SET_VRING_ENABLE state.
    pub enabled: Arc<AtomicBool>,
    /// The running worker, if started.
    pub worker: Option<Worker>,
}

impl Default for Vring {
    fn default() -> Self {
        Self {
            num: 0,
            addrs: None,
            base: 0,
            kick: None,
            call: Arc::new(RwLock::new(None)),
            enabled: Arc::new(AtomicBool::new(false)),
            worker: None,
        }
    }
}

/// A running worker.
pub struct Worker {
    wake: EventFd,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u16>,
}

impl Worker {
    /// Tells the worker to look at its flags again (enable changed).
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake a queue worker: {e}");
        }
    }

    /// Stops the worker after the chain in progress; returns the next avail index.
    pub fn stop(self) -> Option<u16> {
        self.stop.store(true, Ordering::Release);
        self.wake();
        self.handle.join().ok()
    }
}

/// Everything a worker needs.
pub struct WorkerSetup {
    pub index: u16,
    pub queue: Queue,
    pub mem: GuestMemory,
    pub dev: Arc<BlkDevice>,
    pub kick: EventFd,
    pub call: CallFd,
    pub enabled: Arc<AtomicBool>,
    pub inflight: Option<InflightQueue>,
    pub resubmit: Vec<u16>,
}

/// `serve --poll-us`: how long a worker polls its ring after a batch (µs; 0: never).
static POLL_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Requests of one batch served concurrently (1: one after the other).
static IO_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Sets, for every worker started from now on, the polling time after a batch (kicks stay
/// suppressed while polling) and how many requests of a batch run concurrently (`serve` uses 8
/// with `--direct`, where each request waits for the device, as QEMU's aio=threads pool does).
pub fn set_tuning(poll_us: u64, io_threads: usize) {
    POLL_US.store(poll_us, Ordering::Relaxed);
    IO_THREADS.store(io_threads.max(1), Ordering::Relaxed);
}

/// Starts a worker thread for a configured ring.
pub fn spawn(setup: WorkerSetup) -> io::Result<Worker> {
    let wake = EventFd::new(EFD_NONBLOCK)?;
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = WorkerCtx {
        wake: wake.try_clone()?,
        stop: stop.clone(),
        scratch: setup.dev.new_scratch(),
        setup,
    };
    let handle = std::thread::Builder::new()
        .name(format!("vq{}", ctx.setup.index))
        .spawn(move || {
            crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Worker);
            ctx.run()
        })?;
    Ok(Worker { wake, stop, handle })
}

struct WorkerCtx {
    setup: WorkerSetup,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    scratch: Scratch,
}

/// Walks the chain starting at `head` in the descriptor table (for resubmitting an in-flight
/// head, which the avail ring may no longer hold); follows one level of indirection and stops
/// after as many descriptors as the table has.
struct HeadChain<'a> {
    mem: &'a GuestMemoryMmap<()>,
    table: GuestAddress,
    size: u16,
    next: Option<u16>,
    ttl: u16,
    indirect: bool,
}

impl Iterator for HeadChain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            let idx = self.next?;
            if self.ttl == 0 || idx >= self.size {
                return None;
            }
            self.ttl -= 1;
            let addr = self.table.checked_add(u64::from(idx) * 16)?;
            let d: Descriptor = self.mem.read_obj(addr).ok()?;
            if d.refers_to_indirect_table() && !self.indirect {
                let n = u16::try_from(d.len() / 16).ok()?;
                self.table = d.addr();
                self.size = n;
                self.ttl = n;
                self.next = Some(0);
                self.indirect = true;
                continue;
            }
            self.next = d.has_next().then(|| d.next());
            return Some(d);
        }
    }
}

impl WorkerCtx {
    fn run(mut self) -> u16 {
        log::info!(
            "queue {} started at avail {}",
            self.setup.index,
            self.setup.queue.next_avail()
        );
        let mut fds = [
            libc::pollfd {
                fd: self.setup.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut signalled_once = false;
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if self.setup.enabled.load(Ordering::Acquire) {
                self.resubmit();
                self.drain();
                if !signalled_once {
                    // A previous instance may have published completions and died before
                    // signalling them; with EVENT_IDX the guest would then never hear of them.
                    // One interrupt on (re)start makes it look at the used ring; a spurious one
                    // is harmless.
                    self.signal();
                    signalled_once = true;
                }
            }
            fds[0].revents = 0;
            fds[1].revents = 0;
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("queue {}: poll: {e}", self.setup.index);
                    break;
                }
            }
            // Read (reset) only the eventfds that fired: the frontend's kick fd may be blocking.
            if fds[0].revents & libc::POLLIN != 0 {
                let _ = self.setup.kick.read();
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let _ = self.wake.read();
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                log::error!("queue {}: kick fd failed", self.setup.index);
                break;
            }
        }
        let next = self.setup.queue.next_avail();
        log::info!("queue {} stopped at avail {next}", self.setup.index);
        next
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Acquire) && self.setup.enabled.load(Ordering::Acquire)
    }

    /// Serves the heads a previous instance left in flight, oldest first.
    fn resubmit(&mut self) {
        if self.setup.resubmit.is_empty() {
            return;
        }
        let heads = std::mem::take(&mut self.setup.resubmit);
        log::info!(
            "queue {}: resubmitting {} in-flight request(s)",
            self.setup.index,
            heads.len()
        );
        let mem = self.setup.mem.memory();
        let limits = self.setup.dev.limits();
        let table = GuestAddress(self.setup.queue.desc_table());
        let size = self.setup.queue.size();
        let index = usize::from(self.setup.index);
        for head in heads {
            let chain = HeadChain {
                mem: &mem,
                table,
                size,
                next: Some(head),
                ttl: size,
                indirect: false,
            };
            let used = self
                .setup
                .dev
                .handle(&*mem, chain, &limits, &mut self.scratch, index);
            self.complete(&mem, head, used);
        }
        self.notify(&mem);
    }

    /// Serves the avail ring until it is empty (with notifications suppressed meanwhile).
    fn drain(&mut self) {
        let mut idle_rounds = 0;
        loop {
            let mem = self.setup.mem.memory();
            if let Err(e) = self.setup.queue.disable_notification(&*mem) {
                log::error!(
                    "queue {}: cannot disable notifications: {e}",
                    self.setup.index
                );
            }
            let completed = self.batch(&mem);
            if !self.running() {
                break;
            }
            idle_rounds = if completed == 0 { idle_rounds + 1 } else { 0 };
            // --poll-us: look for work a while, kicks still suppressed, before sleeping.
            if self.poll_ring(&mem) {
                idle_rounds = 0;
                continue;
            }
            match self.setup.queue.enable_notification(&*mem) {
                Ok(true) if idle_rounds < 2 => continue,
                Ok(_) => break,
                Err(e) => {
                    log::error!(
                        "queue {}: cannot enable notifications: {e}",
                        self.setup.index
                    );
                    break;
                }
            }
        }
    }

    /// Polls the ring for up to `--poll-us`, serving what arrives; true if anything did.
    fn poll_ring(&mut self, mem: &GuestMemoryMmap<()>) -> bool {
        let us = POLL_US.load(Ordering::Relaxed);
        if us == 0 {
            return false;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_micros(us);
        while self.running() && std::time::Instant::now() < deadline {
            if self.batch(mem) > 0 {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Pops every available chain and serves them on up to `threads` threads (this one
    /// included), then publishes them (out of order is fine: IN_ORDER is not offered).
    fn batch_concurrently(&mut self, mem: &GuestMemoryMmap<()>, threads: usize) -> u32 {
        let mut chains = Vec::new();
        while self.running() {
            let Some(chain) = self.setup.queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            if let Some(t) = self.setup.inflight.as_mut() {
                t.fetched(head);
            }
            chains.push(chain);
        }
        let n = chains.len();
        let limits = self.setup.dev.limits();
        let index = usize::from(self.setup.index);
        let dev = &self.setup.dev;
        let todo = std::sync::Mutex::new(chains.into_iter());
        let done = std::sync::Mutex::new(Vec::with_capacity(n));
        let serve = |scratch: &mut Scratch| loop {
            let next = todo.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let used = dev.handle(mem, chain, &limits, scratch, index);
            done.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((head, used));
        };
        let scratch = &mut self.scratch;
        std::thread::scope(|s| {
            for _ in 1..threads.min(n) {
                s.spawn(|| serve(&mut dev.new_scratch()));
            }
            serve(scratch);
        });
        let done = done.into_inner().unwrap_or_else(PoisonError::into_inner);
        for &(head, used) in &done {
            self.complete(mem, head, used);
        }
        let completed = u32::try_from(done.len()).unwrap_or(u32::MAX);
        if completed > 0 {
            self.notify(mem);
        }
        completed
    }

    fn batch(&mut self, mem: &GuestMemoryMmap<()>) -> u32 {
        let threads = IO_THREADS.load(Ordering::Relaxed);
        if threads > 1 {
            return self.batch_concurrently(mem, threads);
        }
        let limits = self.setup.dev.limits();
        let index = usize::from(self.setup.index);
        let mut completed = 0u32;
        while self.running() {
            let Some(chain) = self.setup.queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            if let Some(t) = self.setup.inflight.as_mut() {
                t.fetched(head);
            }
            let used = self
                .setup
                .dev
                .handle(mem, chain, &limits, &mut self.scratch, index);
            self.complete(mem, head, used);
            completed += 1;
        }
        if completed > 0 {
            self.notify(mem);
        }
        completed
    }

    /// Publishes one finished chain.
    fn complete(&mut self, mem: &GuestMemoryMmap<()>, head: u16, len: u32) {
        if let Some(t) = self.setup.inflight.as_ref() {
            t.completing(head);
        }
        if let Err(e) = self.setup.queue.add_used(mem, head, len) {
            log::error!(
                "queue {}: cannot publish head {head}: {e}",
                self.setup.index
            );
            return;
        }
        if let Some(t) = self.setup.inflight.as_ref() {
            t.completed(head, self.setup.queue.next_used());
        }
    }

    fn notify(&mut self, mem: &GuestMemoryMmap<()>) {
        if self.setup.queue.needs_notification(mem).unwrap_or(true) {
            self.signal();
        }
    }

    /// Interrupts the guest (writes the call eventfd, if there is one).
    fn signal(&self) {
        let call = self
            .setup
            .call
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(fd) = call.as_ref() {
            if let Err(e) = fd.write(1) {
                log::error!("queue {}: cannot signal the guest: {e}", self.setup.index);
            }
        }
    }
}

/// Builds the `Queue` for a ring about to start: size, addresses, event index, and where to
/// resume (`next_avail`, and the used index as the guest memory holds it).
pub fn build_queue(
    mem: &GuestMemoryMmap<()>,
    num: u16,
    (desc, avail, used): (u64, u64, u64),
    event_idx: bool,
) -> io::Result<(Queue, u16)> {
    let mut q = Queue::new(num).map_err(|e| io::Error::other(e.to_string()))?;
    q.try_set_desc_table_address(GuestAddress(desc))
        .and_then(|()| q.try_set_avail_ring_address(GuestAddress(avail)))
        .and_then(|()| q.try_set_used_ring_address(GuestAddress(used)))
        .map_err(|e| io::Error::other(e.to_string()))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "ring addresses are not in guest memory",
        ));
    }
    let used_idx = q
        .used_idx(mem, Ordering::Acquire)
        .map_err(|e| io::Error::other(e.to_string()))?;
    q.set_next_used(used_idx.0);
    Ok((q, Wrapping(used_idx.0).0))
}
