//! Seccomp-BPF filters (rust-vmm's `seccompiler`, as cloud-hypervisor and Firecracker use it):
//! one allowlist per kind of thread, in [`allowlist`].
//!
//! A filter is installed by the thread itself, with [`enter`], as the first thing it does; it
//! lasts for the thread's life and is inherited by threads it creates. The main thread creates
//! the vhost-user protocol thread and the queue workers (through `vhost-user-backend`), so its
//! filter is the union of every list: those threads start under it and narrow it to their own
//! list on their first call into our code. Threads created before the main thread installs
//! its filter (the signal thread) start unfiltered and install theirs at once.
//!
//! [`configure`] sets the mode once per process (`serve --seccomp`); until then [`enter`] does
//! nothing, so the library used from tests or tools is never filtered.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};
use thiserror::Error;

pub mod allowlist;

pub use allowlist::ThreadKind;

/// What a filter does with a system call that is not on the thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No filter.
    Off,
    /// Allow it and have the kernel log it (audit / `dmesg`: `type=1326`). For finding what a
    /// list lacks.
    Log,
    /// Kill the whole process with SIGSYS (SECCOMP_RET_KILL_PROCESS).
    Kill,
}

impl Mode {
    /// Parses `off`, `log` or `kill`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "log" => Some(Self::Log),
            "kill" => Some(Self::Kill),
            _ => None,
        }
    }

    fn mismatch_action(self) -> SeccompAction {
        match self {
            Self::Log => SeccompAction::Log,
            Self::Off | Self::Kill => SeccompAction::KillProcess,
        }
    }
}

/// Errors of filter compilation or installation.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("cannot build the seccomp filter for the {kind:?} thread")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the seccomp filter for the {kind:?} thread")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("the seccomp mode is already set to another value")]
    AlreadyConfigured,
}

static MODE: OnceLock<Mode> = OnceLock::new();

thread_local! {
    /// The filter this thread installed itself, if any.
    static INSTALLED: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Sets the process-wide mode; [`enter`] does nothing before this is called. Setting the same
/// mode again is harmless; changing it is refused (threads may already run under the first).
pub fn configure(mode: Mode) -> Result<(), SandboxError> {
    match MODE.set(mode) {
        Ok(()) => {
            if mode != Mode::Off {
                fix_malloc_arenas();
            }
            Ok(())
        }
        Err(_) if MODE.get() == Some(&mode) => Ok(()),
        Err(_) => Err(SandboxError::AlreadyConfigured),
    }
}

/// glibc's malloc reads files when a thread first needs an arena of its own (the online CPUs,
/// /sys/devices/system/cpu/online) and when it later trims that arena's heap
/// (/proc/sys/vm/overcommit_memory); under a filter that refuses `openat` that read kills the
/// thread. With one arena, every thread allocates from the main heap and malloc never opens a
/// file. The hot path does not allocate (buffers are per worker and reused), so the shared
/// arena costs nothing measurable there.
fn fix_malloc_arenas() {
    // SAFETY: mallopt only sets a malloc tunable; M_ARENA_MAX takes any positive int.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The configured mode ([`Mode::Off`] if none was set).
pub fn mode() -> Mode {
    MODE.get().copied().unwrap_or(Mode::Off)
}

/// Compiles the filter of `kind` for `mode` (not [`Mode::Off`]).
pub fn compile(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, SandboxError> {
    let build = |source| SandboxError::Build { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in kind.syscalls() {
        rules.insert(nr, Vec::new());
    }
    for (nr, rule) in
        allowlist::argument_rules().map_err(|e| build(seccompiler::Error::Backend(e)))?
    {
        if let Some(r) = rules.get_mut(&nr) {
            *r = rule;
        }
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| build(seccompiler::Error::Backend(e)))?;
    let filter = SeccompFilter::new(rules, mode.mismatch_action(), SeccompAction::Allow, arch)
        .map_err(|e| build(seccompiler::Error::Backend(e)))?;
    filter
        .try_into()
        .map_err(|e| build(seccompiler::Error::Backend(e)))
}

/// Installs the filter of `kind` on the calling thread, once: a thread that already installed
/// one keeps it (so a call from a thread of another kind is harmless). Does nothing if the
/// mode is off or unset.
pub fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    let mode = mode();
    if mode == Mode::Off || INSTALLED.with(Cell::get).is_some() {
        return Ok(());
    }
    let prog = compile(kind, mode)?;
    seccompiler::apply_filter(&prog).map_err(|source| SandboxError::Install { kind, source })?;
    INSTALLED.with(|c| c.set(Some(kind)));
    log::debug!(
        "seccomp ({mode:?}): {kind:?} thread filter installed, {} system calls",
        kind.syscalls().len()
    );
    Ok(())
}

/// As [`enter`], for thread starts that cannot return an error: a filter that cannot be
/// installed is fatal (running unfiltered when the operator asked for a filter is not an
/// option).
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        log::error!("{e}: {}", e.source_chain());
        std::process::exit(1);
    }
}

impl SandboxError {
    fn source_chain(&self) -> String {
        let mut s = String::new();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            if !s.is_empty() {
                s.push_str(": ");
            }
            s.push_str(&e.to_string());
            cur = std::error::Error::source(e);
        }
        s
    }
}

#[cfg(test)]
mod tests;
