//! The listening socket of `serve`: created with the operator's mode (0600 by default) and group,
//! never visible with other permissions, and never stolen from a live server.
//!
//! Creation: a private directory (mode 0700) is made next to the socket path; the socket is bound
//! inside it (reached as `/proc/self/fd/N/…`, so long paths still fit `sun_path`), chmod/chown'ed,
//! put in the listening state, and only then renamed into place. Whatever the umask, no other user
//! can reach the socket before it has its final mode, and the path never shows a socket that is
//! not yet listening.
//!
//! Liveness of an existing socket at the path is asked of the kernel (`NETLINK_SOCK_DIAG`: is a
//! listening AF_UNIX socket bound to this inode?) instead of connecting to it: a connection would
//! be taken by the live server as its frontend, and a server started with `--once` would then
//! exit when the probe hangs up.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use clap::Args;

use super::serve::ServeError;

/// Who may connect to the socket.
#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// Mode of the socket file, in octal. Anyone who can connect controls the disk: widen it only
    /// together with `--socket-group`.
    #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group of the socket file (a name or a numeric id); give the group write permission with
    /// `--socket-mode 0660`.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode"))?;
    if m > 0o777 {
        return Err(format!(
            "{s:?}: only permission bits (at most 0777) are allowed"
        ));
    }
    Ok(m)
}

/// Resolves a group name or number.
fn group_id(g: &str) -> io::Result<libc::gid_t> {
    if let Ok(n) = g.parse::<libc::gid_t>() {
        return Ok(n);
    }
    let name = CString::new(g).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: `group` is plain data, filled in by getgrnam_r.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are to live locals/buffers of the stated sizes; getgrnam_r writes
    // strings only into `buf` and sets `result` to `&group` or null.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &raw mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut result,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    if result.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group {g:?}"),
        ));
    }
    Ok(group.gr_gid)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A private directory next to the socket path, removed (with what is left in it) on drop.
struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl PrivateDir {
    fn new(target: &Path) -> io::Result<Self> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map_or_else(|| "socket".into(), |n| n.to_string_lossy().into_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!(".{name}.{}.{nanos:x}.tmp", std::process::id()));
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: mkdir reads the NUL-terminated path only.
        cvt(unsafe { libc::mkdir(c.as_ptr(), 0o700) })?;
        // SAFETY: open reads the NUL-terminated path only; the result is checked.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        });
        let fd = match fd {
            // SAFETY: open returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(e) => {
                let _ = fs::remove_dir(&path);
                return Err(e);
            }
        };
        Ok(Self { path, fd })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Binds and listens on `path` with the mode and group of `args`, replacing a stale socket file
/// but never a live socket or a non-socket.
pub fn listen(path: &Path, args: &SocketArgs) -> Result<UnixListener, ServeError> {
    let listen_err = |source| ServeError::Listen {
        path: path.to_owned(),
        source,
    };
    let gid = args
        .socket_group
        .as_deref()
        .map(group_id)
        .transpose()
        .map_err(listen_err)?;
    // Refuse early (before creating anything) if the path is taken.
    check_existing(path)?;
    let dir = PrivateDir::new(path).map_err(listen_err)?;
    let inner = dir.path.join("s");
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}/s", dir.fd.as_raw_fd()));
    let listener = std::os::unix::net::UnixListener::bind(&via_fd)
        .or_else(|_| std::os::unix::net::UnixListener::bind(&inner))
        .map_err(listen_err)?;
    fs::set_permissions(&inner, fs::Permissions::from_mode(args.socket_mode))
        .map_err(listen_err)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&inner, None, Some(gid)).map_err(listen_err)?;
    }
    // UnixListener::bind already listens; the socket becomes visible only now.
    loop {
        match rename_noreplace(&inner, path) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                check_existing(path)?;
                // Stale: remove it and try again (a live server racing us wins EEXIST again).
                fs::remove_file(path).map_err(listen_err)?;
                log::info!("removed stale socket {}", path.display());
            }
            Err(e) => return Err(listen_err(e)),
        }
    }
    Ok(listener)
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let f = CString::new(from.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let t = CString::new(to.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: renameat2 reads two NUL-terminated paths only.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })
    .map(|_| ())
}

/// Errors if `path` is a non-socket or a socket a server listens on; Ok if free or stale.
fn check_existing(path: &Path) -> Result<(), ServeError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Listen {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_owned()));
    }
    match is_listening(meta.ino(), meta.dev()) {
        Ok(false) => Ok(()),
        Ok(true) => Err(ServeError::SocketInUse(path.to_owned())),
        Err(source) => {
            log::warn!("cannot tell whether {} is in use: {source}", path.display());
            Err(ServeError::SocketInUse(path.to_owned()))
        }
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const UDIAG_SHOW_VFS: u32 = 0x2;
const UNIX_DIAG_VFS: u16 = 1;

/// The kernel's internal dev_t (MAJOR << 20 | MINOR), which sock_diag reports, from `st_dev`.
fn kernel_dev(st_dev: u64) -> u64 {
    let major = u64::from(libc::major(st_dev));
    let minor = u64::from(libc::minor(st_dev));
    (major << 20) | minor
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Whether a listening AF_UNIX socket is bound to the file with inode `ino` on device `dev`.
pub fn is_listening(ino: u64, dev: u64) -> io::Result<bool> {
    // SAFETY: socket() takes integers only; the result is checked and then owned.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    })?;
    // SAFETY: a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16 bytes) + unix_diag_req (24 bytes).
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = u16::try_from(libc::NLM_F_REQUEST | libc::NLM_F_DUMP).unwrap_or(0x301);
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(u8::try_from(libc::AF_UNIX).unwrap_or(1));
    req.push(0); // protocol
    req.extend_from_slice(&0u16.to_ne_bytes()); // pad
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // ino
    req.extend_from_slice(&UDIAG_SHOW_VFS.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // cookie: none
                                       // SAFETY: send reads `req.len()` bytes of `req`, a live buffer.
    let n = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let want_dev = kernel_dev(dev);
    let mut buf = vec![0u8; 32768];
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, a live buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n == 0 {
            return Ok(false);
        }
        let mut off = 0;
        while off + 16 <= n {
            let bad = || io::Error::new(io::ErrorKind::InvalidData, "short netlink message");
            let len = usize::try_from(u32_at(&buf, off).ok_or_else(bad)?).map_err(|_| bad())?;
            let ty = u16_at(&buf, off + 4).ok_or_else(bad)?;
            if len < 16 || off + len > n {
                return Err(bad());
            }
            match ty {
                NLMSG_DONE => return Ok(false),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(
                        buf.get(off + 16..off + 20)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(bad)?,
                    );
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => {
                    // unix_diag_msg is 16 bytes, then rtattrs.
                    let msg = &buf[off + 16..off + len];
                    let mut a = 16;
                    while a + 4 <= msg.len() {
                        let alen = usize::from(u16_at(msg, a).ok_or_else(bad)?);
                        let aty = u16_at(msg, a + 2).ok_or_else(bad)?;
                        if alen < 4 {
                            break;
                        }
                        if aty == UNIX_DIAG_VFS && alen >= 12 {
                            let vino = u32_at(msg, a + 4).ok_or_else(bad)?;
                            let vdev = u32_at(msg, a + 8).ok_or_else(bad)?;
                            // The kernel reports the inode number truncated to 32 bits.
                            if u64::from(vino) == ino & 0xffff_ffff && u64::from(vdev) == want_dev {
                                return Ok(true);
                            }
                        }
                        a += (alen + 3) & !3;
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_mode_parses_octal_and_refuses_special_bits() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert!(parse_mode("4755").is_err());
        assert!(parse_mode("0689").is_err());
    }

    #[test]
    fn sock_diag_sees_a_listener_and_not_a_closed_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        let l = UnixListener::bind(&p).expect("bind");
        let m = fs::metadata(&p).expect("stat");
        assert!(is_listening(m.ino(), m.dev()).expect("sock_diag"));
        drop(l);
        assert!(!is_listening(m.ino(), m.dev()).expect("sock_diag"));
    }
}
