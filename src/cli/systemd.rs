//! systemd integration without libsystemd: socket activation (`LISTEN_FDS`/`LISTEN_PID`, as
//! `sd_listen_fds(3)`) and readiness notification (`NOTIFY_SOCKET`, as `sd_notify(3)`).
//!
//! Both are plain protocols: socket activation hands the listening socket over as fd 3 with two
//! environment variables naming the count and the receiving process; notification is one datagram
//! of `KEY=VALUE` lines to the Unix socket `NOTIFY_SOCKET` names (a path, or `@name` for the
//! abstract namespace).

use std::os::unix::net::UnixDatagram;

/// The first passed file descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

/// The listening socket systemd passed to this process, if any: fd 3 when `LISTEN_PID` is our
/// pid and `LISTEN_FDS` is at least 1. More than one passed socket is refused (we serve one disk).
pub fn listen_fd() -> Result<Option<i32>, &'static str> {
    let Some(pid) = std::env::var_os("LISTEN_PID") else {
        return Ok(None);
    };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(None);
    }
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    match n {
        0 => Ok(None),
        1 => Ok(Some(LISTEN_FDS_START)),
        _ => Err("systemd passed more than one socket (LISTEN_FDS > 1); give one per service"),
    }
}

/// Sends `state` (e.g. `READY=1`) to the service manager if `NOTIFY_SOCKET` is set. Failures
/// are logged, never fatal: the daemon works the same without a manager.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let r = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        log::warn!("cannot notify the service manager ({state:?}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sends_one_datagram() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("notify");
        let rx = UnixDatagram::bind(&p).expect("bind");
        // The test binary is single-purpose here; set the variable only for this call's duration.
        std::env::set_var("NOTIFY_SOCKET", &p);
        notify("READY=1\nSTATUS=serving");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
    }
}
