//! `serve`: export an image over a vhost-user-blk socket.
//!
//! Follows the "backend program conventions" of QEMU's docs/interop/vhost-user.rst:
//! `--socket-path PATH` or `--fd N` (an inherited listening socket), `--print-capabilities`
//! (JSON on stdout), `--blk-file` (alias of `--image`) and `--read-only`.

use std::fs;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use thiserror::Error;

use crate::image::{self, BlockImage, ImageError, OpenOptions};
use crate::vhost_user::{self, DaemonError};
use crate::virtio_blk::device::{BlkDevice, BlkOptions, DeviceError};

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen on this Unix socket path (created; a stale socket file is replaced).
    /// Without it, `--fd` or a socket passed by systemd (LISTEN_FDS) is used.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Use this inherited, already listening Unix socket file descriptor.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// The disk image to serve.
    #[arg(
        long,
        alias = "blk-file",
        value_name = "FILE",
        required_unless_present = "print_capabilities"
    )]
    pub image: Option<PathBuf>,
    /// Image format: raw, qcow2 or luks (default: detect from the magic; a detected raw image
    /// then refuses guest writes that would make it detect as qcow2 or LUKS, as QEMU does).
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// Whether a qcow2 image may open its backing files (as QEMU does by default).
    #[arg(long, value_name = "allow|deny", default_value = "allow", value_parser = ["allow", "deny"])]
    pub backing: String,
    /// Export read-only (VIRTIO_BLK_F_RO; writes fail with IOERR).
    #[arg(long)]
    pub read_only: bool,
    /// Number of request queues (one worker thread each). QEMU's num-queues must not exceed it.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub num_queues: u16,
    /// Maximum queue size (power of two, at most 1024); seg_max is this minus 2.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// Logical block size reported to the guest.
    #[arg(long, value_name = "BYTES", default_value_t = 512,
          value_parser = parse_block_size)]
    pub logical_block_size: u32,
    /// Serial number returned by GET_ID (at most 20 bytes are used).
    #[arg(long, value_name = "ID", default_value = "")]
    pub serial: String,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// I/O engine for the image file: `threads` (preadv/pwritev on the queue's worker thread)
    /// or `io_uring` (as QEMU's aio=).
    #[arg(long, value_name = "threads|io_uring", default_value = "threads",
          value_parser = ["threads", "io_uring"])]
    pub aio: String,
    /// After serving a batch, poll the available ring up to N microseconds (kicks suppressed)
    /// before sleeping on the kick eventfd; 0 disables polling.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub poll_us: u64,
    /// Exit after the first frontend disconnects instead of waiting for the next one.
    #[arg(long)]
    pub once: bool,
    /// Print the backend capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Serve a control socket (mode 0600, JSON lines: `query`, `resize`) at PATH; see
    /// `vhost-user-qcow2 control`.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Passphrase of an encrypted image (LUKS raw or in qcow2, legacy qcow2 AES). Without
    /// either option an encrypted image asks on the terminal, if there is one.
    #[command(flatten)]
    pub key: super::keyslot::KeyArgs,
    /// Data file consent and locking.
    #[command(flatten)]
    pub access: super::access::AccessArgs,
    /// Socket mode and group.
    #[command(flatten)]
    pub socket: super::socket::SocketArgs,
    /// System-call filter on every thread (docs/sandbox.md): `kill` the process on a call
    /// outside the thread's allowlist, `log` it (kernel audit log) and allow it, or `off`.
    /// Default `kill`; `off` for rbd: images (librbd runs threads and system calls of its own).
    #[arg(long, value_name = "MODE", value_parser = ["off", "log", "kill"])]
    pub seccomp: Option<String>,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("must be 512 or 4096".to_owned()),
    }
}

/// Errors of `serve`.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot open image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("socket activation: {0}")]
    SocketActivation(&'static str),
    #[error("passphrase")]
    Secret(#[from] crate::crypto::secret::SecretError),
    #[error("image format {0:?} is not supported")]
    Format(String),
    #[error("socket {0} is already in use by a running server")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--fd {fd} is not a listening Unix socket")]
    BadFd {
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("invalid options")]
    Options(#[source] DeviceError),
    #[error("seccomp")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

/// `{"type":"block","features":[...]}` as vhost-user.rst asks.
pub fn capabilities() -> serde_json::Value {
    serde_json::json!({ "type": "block", "features": ["read-only", "blk-file"] })
}

/// Whether opening failed only for want of a key.
fn needs_key(e: &ImageError) -> bool {
    matches!(
        e,
        ImageError::NeedKey(_) | ImageError::Qcow2(crate::qcow2::Error::NeedKey(_))
    )
}

/// Runs `serve`.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    if args.print_capabilities {
        println!("{}", capabilities());
        return Ok(());
    }
    let image_path = args.image.as_ref().ok_or(ServeError::Missing("--image"))?;
    let format = match args.format.as_deref() {
        None => None,
        Some(f) => {
            Some(image::Format::from_name(f).ok_or_else(|| ServeError::Format(f.to_owned()))?)
        }
    };
    let backing = if args.backing == "deny" {
        image::BackingPolicy::Deny
    } else {
        image::BackingPolicy::Allow
    };
    let opts = BlkOptions {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        logical_block_size: args.logical_block_size,
        serial: args.serial.clone(),
    };
    crate::vhost_user::vring::set_tuning(args.poll_us, if args.direct { 8 } else { 1 });

    let rbd = args
        .image
        .as_ref()
        .and_then(|p| p.to_str())
        .is_some_and(crate::rbd::is_rbd);
    let seccomp = match args.seccomp.as_deref() {
        Some(m) => crate::sandbox::Mode::from_name(m).unwrap_or(crate::sandbox::Mode::Kill),
        // librbd's messenger threads open sockets and make calls no allowlist can foresee.
        None if rbd => {
            log::info!("rbd: image: the system-call filter is off (give --seccomp to force it)");
            crate::sandbox::Mode::Off
        }
        None => crate::sandbox::Mode::Kill,
    };
    crate::sandbox::configure(seccomp)?;

    // Block SIGTERM/SIGINT before any thread exists so every thread inherits the mask and only
    // the signal thread receives them.
    let sigset = block_signals().map_err(ServeError::Signals)?;

    // --aio: the engine of every image file opened from here on (backing files too).
    crate::storage::set_default_aio(crate::storage::Aio::from_name(&args.aio).unwrap_or_default());

    // Open the image first: a missing image must not leave a socket behind.
    let open_opts = OpenOptions {
        read_only: args.read_only,
        direct: args.direct,
        format,
        backing,
        data_file: args.access.data_file.clone(),
        locking: args.access.share.locking(),
    };
    args.key.apply_kdf_limits();
    let given = args.key.key_secret_file.is_some() || args.key.key_fd.is_some();
    let secret = if given {
        forbid_core_dumps();
        Some(args.key.source().read("Passphrase: ", false)?)
    } else {
        None
    };
    let opened = match image::open_with_secret(image_path, &open_opts, secret.as_ref()) {
        // Encrypted and no key given: ask on the terminal when there is one.
        Err(e) if !given && needs_key(&e) && std::io::IsTerminal::is_terminal(&io::stdin()) => {
            forbid_core_dumps();
            let pass = args.key.source().read("Passphrase: ", false)?;
            image::open_with_secret(image_path, &open_opts, Some(&pass))
        }
        r => r,
    };
    let image: Arc<dyn BlockImage> = Arc::from(opened.map_err(|source| ServeError::Open {
        path: image_path.clone(),
        source,
    })?);
    drop(secret);
    // LUKS2 with 4096-byte encryption sectors needs 4096-byte logical blocks.
    let opts = BlkOptions {
        logical_block_size: opts.logical_block_size.max(image.min_block_size()),
        ..opts
    };
    // Validate the options against the image before creating the socket.
    let dev = Arc::new(BlkDevice::new(image.clone(), &opts).map_err(ServeError::Options)?);

    let systemd_fd = super::systemd::listen_fd().map_err(ServeError::SocketActivation)?;
    let (listener, guard) = match (&args.socket_path, args.fd.or(systemd_fd)) {
        (Some(path), _) => {
            let l = super::socket::listen(path, &args.socket)?;
            (l, SocketGuard(Some(path.clone())))
        }
        (None, Some(fd)) => (inherited_listener(fd)?, SocketGuard(None)),
        (None, None) => {
            return Err(ServeError::Missing(
                "--socket-path or --fd (or a socket passed by systemd)",
            ))
        }
    };
    let socket_name = guard.0.as_ref().map_or_else(
        || format!("fd {}", args.fd.or(systemd_fd).unwrap_or(-1)),
        |p| p.display().to_string(),
    );
    // Every log line from here on names the image and the socket.
    super::set_log_context(format!("{} on {socket_name}", image_path.display()));
    log::info!(
        "serving {} bytes{}",
        image.capacity(),
        if image.read_only() { ", read-only" } else { "" },
    );

    spawn_signal_thread(sigset, image.clone(), guard.0.clone()).map_err(ServeError::Signals)?;
    super::systemd::notify("READY=1");
    let export = Arc::new(vhost_user::Export::new(dev));
    export.set_names(&image_path.display().to_string(), &socket_name);
    if let Some(path) = &args.control_socket {
        vhost_user::control::spawn(path, export.clone()).map_err(|source| ServeError::Listen {
            path: path.clone(),
            source,
        })?;
        log::info!("control socket on {}", path.display());
    }
    crate::sandbox::enter(crate::sandbox::ThreadKind::Main)?;
    let r = vhost_user::serve(listener, export, args.once);
    drop(guard);
    Ok(r?)
}

/// Removes the socket file we created when dropped.
struct SocketGuard(Option<PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Takes over an inherited listening Unix socket.
fn inherited_listener(fd: i32) -> Result<UnixListener, ServeError> {
    let bad = |source| ServeError::BadFd { fd, source };
    let getopt = |opt: libc::c_int| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, a local c_int; an invalid or
        // non-socket fd makes it fail with EBADF/ENOTSOCK without side effects.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw mut v).cast::<libc::c_void>(),
                &raw mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if fd < 0 {
        return Err(bad(io::Error::from_raw_os_error(libc::EBADF)));
    }
    if getopt(libc::SO_DOMAIN).map_err(bad)? != libc::AF_UNIX {
        return Err(bad(io::Error::other("not a Unix domain socket")));
    }
    if getopt(libc::SO_ACCEPTCONN).map_err(bad)? == 0 {
        return Err(bad(io::Error::other("socket is not listening")));
    }
    // SAFETY: `fd` is an open, listening AF_UNIX socket (checked above) that the caller handed
    // to us on the command line; we become its only owner.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

fn termination_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; SIGTERM/SIGINT are valid signals.
    let r = unsafe {
        libc::sigemptyset(&raw mut set)
            | libc::sigaddset(&raw mut set, libc::SIGTERM)
            | libc::sigaddset(&raw mut set, libc::SIGINT)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

/// Blocks SIGTERM and SIGINT in the calling thread (and threads it spawns later).
fn block_signals() -> io::Result<libc::sigset_t> {
    let set = termination_set()?;
    // SAFETY: `set` is initialised; pthread_sigmask only changes this thread's signal mask.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(set)
}

/// Keys will live in this process: no core dumps of it, and no ptrace by unprivileged users.
fn forbid_core_dumps() {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if r != 0 {
        log::warn!(
            "cannot make the process non-dumpable: {}",
            io::Error::last_os_error()
        );
    }
}

/// On SIGTERM/SIGINT: flush the image, remove the socket, exit 0 (1 if the flush failed).
fn spawn_signal_thread(
    set: libc::sigset_t,
    image: Arc<dyn BlockImage>,
    socket: Option<PathBuf>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Signal);
            let mut sig: libc::c_int = 0;
            loop {
                // SAFETY: `set` is an initialised sigset with the signals blocked in every thread;
                // sigwait writes the received signal number into the local `sig`.
                let r = unsafe { libc::sigwait(&raw const set, &raw mut sig) };
                if r == 0 {
                    break;
                }
            }
            log::info!("signal {sig} received: flushing and exiting");
            super::systemd::notify("STOPPING=1");
            let code = match image.flush() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vhost-user-qcow2: flush failed: {}", super::error_chain(&e));
                    1
                }
            };
            if let Some(p) = socket {
                let _ = fs::remove_file(p);
            }
            std::process::exit(code);
        })?;
    Ok(())
}
