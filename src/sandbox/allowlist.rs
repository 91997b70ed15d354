//! The system calls each kind of thread may make: the one place to extend.
//!
//! Found with `strace -f` on the daemon under the integration and guest tests (see
//! `docs/sandbox.md`). Each list names what the thread does; a new feature adds its calls to
//! the list of the thread that makes them (and to nothing else).

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// The kinds of threads of `serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: opens nothing after startup, accepts frontends one at a time, creates
    /// the other threads and flushes the image after a disconnect. Its filter is the union of
    /// all lists, since the threads it creates start under it.
    Main,
    /// The vhost-user protocol thread: messages, fds passed with them, guest memory mappings.
    Protocol,
    /// A queue worker: epoll on kick/exit eventfds, image I/O, call eventfds.
    Worker,
    /// The signal thread: waits for SIGTERM/SIGINT, flushes, removes the socket, exits.
    Signal,
    /// A control-socket thread (accepts commands; reserved for the control socket).
    Control,
}

/// Every kind, for tests and docs.
pub const ALL_KINDS: [ThreadKind; 5] = [
    ThreadKind::Main,
    ThreadKind::Protocol,
    ThreadKind::Worker,
    ThreadKind::Signal,
    ThreadKind::Control,
];

/// What every Rust thread needs: memory, locks, logging to stderr, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    // Debug builds check an fd with fcntl(F_GETFD) before closing it (std's OwnedFd::drop).
    libc::SYS_fcntl,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    // Key material and plaintext buffers are mlocked (crypto::secret).
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigreturn,
];

/// Image I/O (storage.rs): positioned reads and writes, flush, discard, size.
const IMAGE_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
];

/// Event loops: waiting on epoll or poll, reading kick / exit eventfds.
const EVENTS: &[i64] = &[
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
];

/// Creating event loops and eventfds (the queue workers get theirs from the main thread).
const EVENT_SETUP: &[i64] = &[libc::SYS_epoll_create1, libc::SYS_eventfd2];

/// The vhost-user protocol: messages with fds, memory tables, rings, the in-flight memfd, the
/// backend request channel (CONFIG_CHANGE_MSG and its reply, with a timeout).
const PROTOCOL: &[i64] = &[
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_memfd_create,
];

/// Creating and joining threads.
const THREADS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
];

/// Installing a thread's own filter (prctl(PR_SET_NO_NEW_PRIVS) + seccomp): only under the main
/// thread's filter, which the other threads start with.
/// The io_uring engine (`serve --aio io_uring`, storage/uring): one ring per worker thread.
const URING: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

const NARROW: &[i64] = &[libc::SYS_prctl, libc::SYS_seccomp];

/// The accept loop.
const ACCEPT: &[i64] = &[libc::SYS_accept4, libc::SYS_accept, libc::SYS_unlink];

/// Waiting for SIGTERM / SIGINT.
const SIGNALS: &[i64] = &[libc::SYS_rt_sigtimedwait, libc::SYS_unlink];

/// Telling systemd `STOPPING=1` (cli/systemd.rs): one datagram on a fresh AF_UNIX socket
/// (`socket` is allowed for AF_UNIX only, see [`argument_rules`]).
const NOTIFY: &[i64] = &[libc::SYS_socket, libc::SYS_sendto];

/// The control socket: accept, read a command with a timeout, answer; a resize tells the
/// frontend through the backend request channel.
const CONTROL: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
];

fn lists(kind: ThreadKind) -> Vec<&'static [i64]> {
    match kind {
        ThreadKind::Main => vec![
            COMMON,
            IMAGE_IO,
            EVENTS,
            EVENT_SETUP,
            PROTOCOL,
            THREADS,
            NARROW,
            ACCEPT,
            SIGNALS,
            NOTIFY,
            CONTROL,
            URING,
        ],
        ThreadKind::Protocol => vec![COMMON, IMAGE_IO, EVENTS, EVENT_SETUP, PROTOCOL],
        // With --direct a worker serves a batch on short-lived threads (THREADS); with
        // --aio io_uring it owns a ring (URING).
        ThreadKind::Worker => vec![COMMON, IMAGE_IO, EVENTS, THREADS, URING],
        ThreadKind::Signal => vec![COMMON, IMAGE_IO, SIGNALS, NOTIFY],
        ThreadKind::Control => vec![COMMON, IMAGE_IO, EVENTS, EVENT_SETUP, CONTROL],
    }
}

impl ThreadKind {
    /// The system calls this kind may make, sorted, without duplicates.
    pub fn syscalls(self) -> &'static [i64] {
        use std::sync::OnceLock;
        static CACHE: [OnceLock<Vec<i64>>; 5] = [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ];
        let i = ALL_KINDS.iter().position(|&k| k == self).unwrap_or(0);
        CACHE[i].get_or_init(|| {
            let mut v: Vec<i64> = lists(self).concat();
            v.sort_unstable();
            v.dedup();
            v
        })
    }
}

/// Calls allowed only with some arguments (replacing their plain entry where the thread's list
/// has them): no executable mappings (mmap / mprotect without PROT_EXEC), Unix sockets only.
pub(crate) fn argument_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
    let one = |arg: u8, op: SeccompCmpOp, value: u64| -> Result<Vec<SeccompRule>, _> {
        Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            op,
            value,
        )?])?])
    };
    let prot_exec = u64::try_from(libc::PROT_EXEC).unwrap_or(4);
    let af_unix = u64::try_from(libc::AF_UNIX).unwrap_or(1);
    Ok(vec![
        (
            libc::SYS_mmap,
            one(2, SeccompCmpOp::MaskedEq(prot_exec), 0)?,
        ),
        (
            libc::SYS_mprotect,
            one(2, SeccompCmpOp::MaskedEq(prot_exec), 0)?,
        ),
        (libc::SYS_socket, one(0, SeccompCmpOp::Eq, af_unix)?),
    ])
}
