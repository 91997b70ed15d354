//! The backend-request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ), used for
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG after a live resize.
//!
//! `vhost` 0.18 turns the SET_BACKEND_REQ_FD socket into a `Backend` that cannot send
//! CONFIG_CHANGE_MSG and does not give the socket back. So before the crate reads a message we
//! peek at its header; for SET_BACKEND_REQ_FD we peek again with room for the file descriptor,
//! which makes the kernel install a duplicate of it for us (`MSG_PEEK` with `SCM_RIGHTS`). The
//! crate then consumes the message as usual; we write our messages on the duplicate.

use std::io::{self, Read, Write};
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// FrontendReq::SET_BACKEND_REQ_FD.
const SET_BACKEND_REQ_FD: u32 = 21;
/// BackendReq::CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: version 1.
const VERSION: u32 = 0x1;
/// Header flags: the sender wants a reply.
const NEED_REPLY: u32 = 0x8;
/// Header flags: this is a reply.
const REPLY: u32 = 0x4;

/// Peeks at the next message on `sock`; if it is SET_BACKEND_REQ_FD, returns a duplicate of
/// the socket it carries. Blocks until a header is there; `Ok(None)` for any other message
/// (or a closed connection, which the message loop then reports).
pub fn peek_backend_fd(sock: RawFd) -> io::Result<Option<UnixStream>> {
    let mut hdr = [0u8; 12];
    // SAFETY: recv into a 12-byte local buffer; MSG_PEEK leaves the data queued.
    let n = unsafe { libc::recv(sock, hdr.as_mut_ptr().cast(), hdr.len(), libc::MSG_PEEK) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if usize::try_from(n).ok() != Some(hdr.len()) {
        return Ok(None);
    }
    let code = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if code != SET_BACKEND_REQ_FD {
        return Ok(None);
    }
    // Peek again, with room for one descriptor.
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    // u64-aligned control buffer large enough for one SCM_RIGHTS fd.
    let mut cbuf = [0u64; 8];
    let mut msg: libc::msghdr = {
        // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control" value.
        unsafe { MaybeUninit::zeroed().assume_init() }
    };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>();
    // SAFETY: msg points at live local buffers (iov, cbuf) for the duration of the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer recvmsg filled, within
    // msg_controllen; CMSG_DATA of an SCM_RIGHTS message holds at least one int.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        let mut found = None;
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd: RawFd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                if found.is_none() {
                    found = Some(OwnedFd::from_raw_fd(fd));
                } else {
                    drop(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok(found.map(UnixStream::from))
    }
}

/// Our end of the backend-request channel.
pub struct BackendChannel {
    sock: UnixStream,
}

impl BackendChannel {
    /// Wraps the duplicate found by [`peek_backend_fd`].
    pub fn new(sock: UnixStream) -> Self {
        Self { sock }
    }

    /// Sends CONFIG_CHANGE_MSG; with `need_reply` (REPLY_ACK negotiated) waits for the
    /// frontend's answer, which it sends after it re-read the config space.
    pub fn config_changed(&mut self, need_reply: bool) -> io::Result<()> {
        let flags = VERSION | if need_reply { NEED_REPLY } else { 0 };
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        // size 0: no payload.
        self.sock.write_all(&hdr)?;
        if !need_reply {
            return Ok(());
        }
        self.sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reply = [0u8; 20];
        self.sock.read_exact(&mut reply)?;
        let code = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
        let rflags = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
        let value = u64::from_le_bytes([
            reply[12], reply[13], reply[14], reply[15], reply[16], reply[17], reply[18], reply[19],
        ]);
        if code != CONFIG_CHANGE_MSG || rflags & REPLY == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected reply on the backend channel",
            ));
        }
        if value != 0 {
            return Err(io::Error::other(format!(
                "the frontend answered CONFIG_CHANGE_MSG with {value}"
            )));
        }
        Ok(())
    }
}

impl AsRawFd for BackendChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}
