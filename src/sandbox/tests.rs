//! The filters in a forked child: allowed calls run, a forbidden one kills the process.

use super::allowlist::ALL_KINDS;
use super::*;

/// Forks; the child installs `prog` and runs `f`, then exits 0. Returns the child's wait status.
fn in_child(prog: &BpfProgram, f: fn()) -> libc::c_int {
    // SAFETY: the child only calls async-signal-safe functions (prctl, seccomp, the raw
    // system calls of `f`, _exit) on memory that was fully built before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        if seccompiler::apply_filter(prog).is_err() {
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(3) };
        }
        f();
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &raw mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    status
}

fn forbidden_socket() {
    // SAFETY: socket(2) with constant arguments; the result is deliberately leaked.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn allowed_calls() {
    // SAFETY: raw system calls with valid arguments (a pointer to a local byte).
    unsafe {
        libc::syscall(libc::SYS_getpid);
        let b = 0u8;
        libc::write(-1, (&raw const b).cast(), 1);
    }
}

fn exec_mapping() {
    // SAFETY: an anonymous mapping, never touched; the kernel checks the arguments.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
    }
}

fn killed_by_sigsys(status: libc::c_int) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

#[test]
fn forbidden_call_kills_every_thread_kind() {
    for kind in ALL_KINDS {
        let prog = compile(kind, Mode::Kill).expect("compile");
        let st = in_child(&prog, forbidden_socket);
        assert!(killed_by_sigsys(st), "{kind:?}: status {st:#x}");
    }
}

#[test]
fn allowed_calls_run_under_every_filter() {
    for kind in ALL_KINDS {
        let prog = compile(kind, Mode::Kill).expect("compile");
        let st = in_child(&prog, allowed_calls);
        assert!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "{kind:?}: status {st:#x}"
        );
    }
}

#[test]
fn executable_mappings_are_forbidden() {
    let prog = compile(ThreadKind::Worker, Mode::Kill).expect("compile");
    assert!(killed_by_sigsys(in_child(&prog, exec_mapping)));
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    let prog = compile(ThreadKind::Worker, Mode::Log).expect("compile");
    let st = in_child(&prog, forbidden_socket);
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "status {st:#x}"
    );
}

#[test]
fn main_filter_covers_every_thread_it_creates() {
    // Threads start under the main thread's filter: anything they need, it must allow.
    let main = ThreadKind::Main.syscalls();
    for kind in ALL_KINDS {
        for nr in kind.syscalls() {
            assert!(
                main.contains(nr),
                "{kind:?} needs {nr}, main does not allow it"
            );
        }
    }
}

#[test]
fn mode_names_parse() {
    assert_eq!(Mode::from_name("off"), Some(Mode::Off));
    assert_eq!(Mode::from_name("log"), Some(Mode::Log));
    assert_eq!(Mode::from_name("kill"), Some(Mode::Kill));
    assert_eq!(Mode::from_name("on"), None);
}

fn unix_socket() {
    // SAFETY: socket(2) with constant arguments; a failure would show as a negative fd.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        // SAFETY: _exit ends the child without running the parent's destructors.
        unsafe { libc::_exit(4) };
    }
}

#[test]
fn signal_thread_may_open_a_unix_socket_only() {
    // systemd's STOPPING=1 goes out on a fresh AF_UNIX datagram socket.
    let prog = compile(ThreadKind::Signal, Mode::Kill).expect("compile");
    let st = in_child(&prog, unix_socket);
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "status {st:#x}"
    );
    assert!(killed_by_sigsys(in_child(&prog, forbidden_socket)));
    let worker = compile(ThreadKind::Worker, Mode::Kill).expect("compile");
    assert!(killed_by_sigsys(in_child(&worker, unix_socket)));
}
