//! Secret bytes: master keys, derived keys and passphrases.
//!
//! [`SecretBytes`] is a fixed-size heap buffer that is zeroized when dropped, locked into RAM
//! (`mlock`) where the process is allowed to, and whose `Debug` prints only its length. It never
//! reallocates, so no copy of the secret is left behind in freed memory.
//!
//! Passphrases come from a file (`--key-secret-file F`), an inherited file descriptor
//! (`--key-fd N`) or an interactive prompt on the controlling terminal with echo off; never from
//! the command line, where every user of the machine could read them in `/proc/*/cmdline`.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use thiserror::Error;
use zeroize::Zeroize;

/// Longest passphrase accepted from any source (cryptsetup's default key-file limit is 8 MiB;
/// nobody types more than this).
pub const MAX_PASSPHRASE_LEN: usize = 64 * 1024;

/// Errors while obtaining a secret.
#[derive(Debug, Error)]
pub enum SecretError {
    #[error("cannot read the passphrase from {what}")]
    Read {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the passphrase from {what} is longer than {max} bytes")]
    TooLong { what: String, max: usize },
    #[error("the passphrase from {what} is empty")]
    Empty { what: String },
    #[error("no terminal to prompt for a passphrase on (use --key-secret-file or --key-fd)")]
    NoTty,
    #[error("the passphrases do not match")]
    Mismatch,
    // getrandom::Error implements std::error::Error only with its "std" feature: show it inline.
    #[error("cannot get random bytes from the OS: {0}")]
    Random(getrandom::Error),
}

/// A fixed-length secret byte string: zeroized on drop, mlocked where possible, never printed.
pub struct SecretBytes {
    buf: Box<[u8]>,
    locked: bool,
}

impl SecretBytes {
    /// A zero-filled secret of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len].into_boxed_slice();
        let locked = mlock(&buf);
        Self { buf, locked }
    }

    /// Copies `data` into a new secret. The caller is responsible for wiping its own copy.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut s = Self::zeroed(data.len());
        s.buf.copy_from_slice(data);
        s
    }

    /// `len` bytes from the OS random number generator.
    pub fn random(len: usize) -> Result<Self, SecretError> {
        let mut s = Self::zeroed(len);
        getrandom::fill(&mut s.buf).map_err(SecretError::Random)?;
        Ok(s)
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.buf
    }

    /// The secret bytes, writable.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the secret has no bytes.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Compares with another byte string in time independent of where they differ.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        ct_eq(&self.buf, other)
    }
}

/// Constant-time equality of two byte strings (the lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::from_slice(&self.buf)
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.buf.zeroize();
        if self.locked {
            munlock(&self.buf);
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.buf.len())
    }
}

fn mlock(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return false;
    }
    // SAFETY: mlock only reads the address range, which is a live allocation of buf.len() bytes;
    // failure (EPERM, ENOMEM over RLIMIT_MEMLOCK) is reported by the return value and harmless.
    let ok = unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) == 0 };
    if !ok {
        warn_mlock_once(buf.len());
    }
    ok
}

/// Locking is best effort: say once that secrets may reach swap, not once per buffer.
fn warn_mlock_once(len: usize) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        log::warn!(
            "cannot lock {len} bytes of key material into RAM ({}); raise RLIMIT_MEMLOCK \
             (ulimit -l) or keys and plaintext may be written to swap",
            io::Error::last_os_error()
        );
    }
}

/// A value kept in its own heap allocation that is locked into RAM (best effort) and
/// overwritten with zeroes after the value is dropped: for cipher key schedules (round keys),
/// whose own `Drop` zeroizes the fields but cannot keep them out of swap.
///
/// Build the value, then move it in with [`Locked::new`]; the temporary the value was built in
/// is the caller's to keep short-lived.
pub struct Locked<T> {
    value: Box<std::mem::ManuallyDrop<T>>,
    locked: bool,
}

impl<T> Locked<T> {
    /// Moves `value` into a locked allocation.
    pub fn new(value: T) -> Self {
        let value = Box::new(std::mem::ManuallyDrop::new(value));
        let locked = mlock(Self::bytes(&value));
        Self { value, locked }
    }

    /// Whether the allocation is locked into RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    fn bytes(value: &std::mem::ManuallyDrop<T>) -> &[u8] {
        let ptr: *const std::mem::ManuallyDrop<T> = value;
        // SAFETY: the range is exactly the live allocation of the value; it is only passed to
        // mlock/munlock as an address range, never read as bytes.
        unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), std::mem::size_of::<T>()) }
    }
}

impl<T> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> std::ops::DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let ptr: *mut std::mem::ManuallyDrop<T> = &mut *self.value;
        // SAFETY: the value is dropped exactly once, here; the box then frees the memory
        // without dropping again (ManuallyDrop).
        unsafe { std::mem::ManuallyDrop::drop(&mut *ptr) };
        let bytes = ptr.cast::<u8>();
        for i in 0..std::mem::size_of::<T>() {
            // SAFETY: `i` is within the allocation of the (now dropped) value, which is still
            // owned by the box; volatile writes of zero are not optimised away.
            unsafe { bytes.add(i).write_volatile(0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        if self.locked {
            munlock(Self::bytes(&self.value));
        }
    }
}

impl<T> fmt::Debug for Locked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Locked([REDACTED; {}])", std::mem::size_of::<T>())
    }
}

/// A growable scratch buffer for plaintext (per-thread bounce buffers): locked into RAM (best
/// effort), and zeroed before its memory is freed or given back when it grows.
#[derive(Default)]
pub struct SecretBuf {
    buf: Vec<u8>,
    locked: bool,
}

impl SecretBuf {
    /// An empty buffer (no allocation; usable in `thread_local!` const initialisers).
    pub const fn new() -> Self {
        Self {
            buf: Vec::new(),
            locked: false,
        }
    }

    /// The first `len` bytes, growing the buffer (never shrinking it) if needed. Growing wipes
    /// and unlocks the old allocation before freeing it; the contents are not carried over.
    pub fn get_mut(&mut self, len: usize) -> &mut [u8] {
        if self.buf.len() < len {
            self.release();
            self.buf = vec![0u8; len];
            self.locked = mlock(&self.buf);
        }
        &mut self.buf[..len]
    }

    /// Whether the allocation is locked into RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    fn release(&mut self) {
        self.buf.as_mut_slice().zeroize();
        if self.locked {
            munlock(&self.buf);
            self.locked = false;
        }
        self.buf = Vec::new();
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBuf([REDACTED; {}])", self.buf.len())
    }
}

fn munlock(buf: &[u8]) {
    // SAFETY: as for mlock; the range was locked by this object and is still allocated.
    unsafe {
        libc::munlock(buf.as_ptr().cast(), buf.len());
    }
}

/// Where a passphrase comes from (never the command line itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A file read byte for byte (`--key-secret-file F`).
    File(std::path::PathBuf),
    /// An inherited file descriptor read to its end (`--key-fd N`).
    Fd(i32),
    /// The controlling terminal, echo off.
    Prompt,
}

impl KeySource {
    /// From the two CLI options; neither means a prompt.
    pub fn from_options(file: Option<&Path>, fd: Option<i32>) -> Self {
        match (file, fd) {
            (Some(f), _) => Self::File(f.to_path_buf()),
            (None, Some(fd)) => Self::Fd(fd),
            (None, None) => Self::Prompt,
        }
    }

    /// Reads the passphrase; `prompt` is shown on a terminal, `confirm` asks twice there.
    pub fn read(&self, prompt: &str, confirm: bool) -> Result<Passphrase, SecretError> {
        match self {
            Self::File(p) => Passphrase::from_file(p),
            Self::Fd(fd) => Passphrase::from_fd(*fd),
            Self::Prompt => Passphrase::prompt(prompt, confirm),
        }
    }
}

/// A passphrase (arbitrary bytes, as QEMU and cryptsetup treat them).
#[derive(Clone)]
pub struct Passphrase(SecretBytes);

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase([REDACTED])")
    }
}

impl Passphrase {
    /// Wraps bytes as a passphrase (copied; wipe your own copy).
    pub fn new(bytes: &[u8]) -> Self {
        Self(SecretBytes::from_slice(bytes))
    }

    /// The passphrase bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.expose()
    }

    /// Reads the whole file, byte for byte, as QEMU's `secret,file=F` and cryptsetup's
    /// `--key-file F` do (a trailing newline is part of the passphrase).
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let what = path.display().to_string();
        let f = File::open(path).map_err(|source| SecretError::Read {
            what: what.clone(),
            source,
        })?;
        read_capped(f, &what)
    }

    /// Reads an inherited file descriptor (a pipe or file) to its end.
    pub fn from_fd(fd: i32) -> Result<Self, SecretError> {
        let what = format!("file descriptor {fd}");
        // Re-opening through /proc duplicates the descriptor without taking ownership of it,
        // so no unsafe code and no double close.
        let f = File::open(format!("/proc/self/fd/{fd}")).map_err(|source| SecretError::Read {
            what: what.clone(),
            source,
        })?;
        read_capped(f, &what)
    }

    /// Prompts on the controlling terminal with echo off; with `confirm`, asks twice.
    /// The line's trailing newline is not part of the passphrase.
    pub fn prompt(prompt: &str, confirm: bool) -> Result<Self, SecretError> {
        let first = prompt_once(prompt)?;
        if confirm {
            let second = prompt_once("Verify passphrase: ")?;
            if !ct_eq(first.as_bytes(), second.as_bytes()) {
                return Err(SecretError::Mismatch);
            }
        }
        Ok(first)
    }
}

fn read_capped<R: Read>(r: R, what: &str) -> Result<Passphrase, SecretError> {
    let cap = u64::try_from(MAX_PASSPHRASE_LEN).unwrap_or(u64::MAX);
    let mut buf = Vec::with_capacity(MAX_PASSPHRASE_LEN + 1);
    let res = r.take(cap + 1).read_to_end(&mut buf);
    let out = match res {
        Err(source) => Err(SecretError::Read {
            what: what.to_string(),
            source,
        }),
        Ok(_) if buf.len() > MAX_PASSPHRASE_LEN => Err(SecretError::TooLong {
            what: what.to_string(),
            max: MAX_PASSPHRASE_LEN,
        }),
        Ok(0) => Err(SecretError::Empty {
            what: what.to_string(),
        }),
        Ok(_) => Ok(Passphrase::new(&buf)),
    };
    // The capacity was reserved up front, so the Vec never reallocated: this wipes every copy.
    buf.zeroize();
    out
}

/// Restores the terminal's attributes when dropped.
struct EchoGuard {
    fd: i32,
    saved: libc::termios,
}

impl Drop for EchoGuard {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the termios struct we own; fd is the open /dev/tty.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

fn prompt_once(prompt: &str) -> Result<Passphrase, SecretError> {
    use std::os::unix::io::AsRawFd;
    let what = "the terminal".to_string();
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| SecretError::NoTty)?;
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain old data; all-zero is a valid value that tcgetattr overwrites.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open terminal; tcgetattr writes only into `saved`.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(SecretError::NoTty);
    }
    let mut quiet = saved;
    quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
    quiet.c_lflag |= libc::ICANON;
    let guard = EchoGuard { fd, saved };
    // SAFETY: fd is an open terminal; tcsetattr reads only `quiet`.
    if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) } != 0 {
        return Err(SecretError::NoTty);
    }
    tty.write_all(prompt.as_bytes())
        .and_then(|()| tty.flush())
        .map_err(|source| SecretError::Read {
            what: what.clone(),
            source,
        })?;
    let mut line = Vec::with_capacity(MAX_PASSPHRASE_LEN + 1);
    let mut byte = [0u8; 1];
    let res = loop {
        match tty.read(&mut byte) {
            Ok(0) => break Ok(()),
            Ok(_) if byte[0] == b'\n' => break Ok(()),
            Ok(_) if line.len() >= MAX_PASSPHRASE_LEN => {
                break Err(SecretError::TooLong {
                    what: what.clone(),
                    max: MAX_PASSPHRASE_LEN,
                })
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                break Err(SecretError::Read {
                    what: what.clone(),
                    source,
                })
            }
        }
    };
    byte.zeroize();
    drop(guard);
    // The user's Enter was not echoed: move to a new line ourselves.
    let _ = tty.write_all(b"\n");
    let out = match res {
        Ok(()) if line.is_empty() => Err(SecretError::Empty { what }),
        Ok(()) => Ok(Passphrase::new(&line)),
        Err(e) => Err(e),
    };
    line.zeroize();
    out
}

#[cfg(test)]
mod locked_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn locked_value_is_dropped_once_and_locked_as_root() {
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct Schedule([u8; 240]);
        impl Drop for Schedule {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::SeqCst);
            }
        }
        let l = Locked::new(Schedule([7; 240]));
        assert_eq!(l.0[239], 7);
        if root() {
            assert!(l.is_locked(), "root (CAP_IPC_LOCK) could not mlock");
        }
        assert!(!format!("{l:?}").contains('7'));
        drop(l);
        assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn secret_buf_grows_and_hands_out_exact_lengths() {
        let mut b = SecretBuf::new();
        assert_eq!(b.get_mut(4096).len(), 4096);
        b.get_mut(4096).fill(0xaa);
        assert_eq!(b.get_mut(100).len(), 100);
        assert_eq!(b.get_mut(100)[99], 0xaa, "no reallocation when shrinking");
        assert_eq!(b.get_mut(8192).len(), 8192);
        if root() {
            assert!(b.is_locked());
        }
        assert_eq!(format!("{b:?}"), "SecretBuf([REDACTED; 8192])");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_secret_bytes() {
        let s = SecretBytes::from_slice(b"hunter2-hunter2");
        let p = Passphrase::new(b"hunter2-hunter2");
        let shown = format!("{s:?} {p:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("104"), "{shown}"); // b'h' as a number
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn passphrase_file_is_taken_byte_for_byte() {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        f.write_all(b"pw with newline\n").expect("write");
        let p = Passphrase::from_file(f.path()).expect("read");
        assert_eq!(p.as_bytes(), b"pw with newline\n");
    }

    #[test]
    fn empty_and_oversized_passphrase_files_are_refused() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        assert!(matches!(
            Passphrase::from_file(f.path()),
            Err(SecretError::Empty { .. })
        ));
        let mut g = tempfile::NamedTempFile::new().expect("tmp");
        g.write_all(&vec![b'a'; MAX_PASSPHRASE_LEN + 1])
            .expect("write");
        assert!(matches!(
            Passphrase::from_file(g.path()),
            Err(SecretError::TooLong { .. })
        ));
    }

    #[test]
    fn passphrase_from_fd_reads_a_pipe() {
        let mut fds = [0i32; 2];
        // SAFETY: pipe writes two descriptors into the array we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fds[1] is the write end just created and owned by nobody else.
        let mut w = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fds[1]) };
        w.write_all(b"from-a-pipe").expect("write");
        drop(w);
        let p = Passphrase::from_fd(fds[0]).expect("read fd");
        assert_eq!(p.as_bytes(), b"from-a-pipe");
        // SAFETY: fds[0] is the read end we created; nothing else closes it.
        unsafe { libc::close(fds[0]) };
    }

    #[test]
    fn ct_eq_compares_contents_and_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
