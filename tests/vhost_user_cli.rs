//! Command-line behaviour of `serve`: errors, signals, sockets.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;

use common::{spawn_serve, wait_timeout, Daemon, BIN};

#[test]
fn print_capabilities_is_json_for_a_block_backend() {
    let out = Command::new(BIN)
        .args(["serve", "--print-capabilities"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["type"], "block");
    assert!(v["features"]
        .as_array()
        .expect("features")
        .contains(&"read-only".into()));
}

#[test]
fn missing_image_exits_1_and_leaves_no_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(dir.path().join("missing.img"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("missing.img"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn unwritable_socket_path_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let sock = dir.path().join("no-such-dir").join("s.sock");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}

#[test]
fn socket_in_use_exits_1_and_the_first_daemon_keeps_its_socket() {
    let d = Daemon::start(1 << 20, &[]);
    // Another image: the same one would be refused earlier, by its lock.
    let other = d.dir.path().join("other.img");
    std::fs::write(&other, vec![0u8; 1 << 20]).expect("other image");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&d.sock)
        .arg("--image")
        .arg(&other)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert!(d.sock.exists());
    UnixStream::connect(&d.sock).expect("first daemon still listening");
}

#[test]
fn a_non_socket_at_the_socket_path_is_never_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&image)
        .arg("--image")
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        std::fs::metadata(&image).expect("still there").len(),
        1 << 20
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let sock = dir.path().join("s.sock");
    drop(UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists());
    let mut child = spawn_serve(&sock, &image, &[]);
    let t = std::time::Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed().as_secs() < 20, "daemon did not take over");
        assert!(child.try_wait().expect("wait").is_none(), "daemon exited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn sigterm_and_sigint_exit_0_and_remove_the_socket() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut d = Daemon::start(1 << 20, &[]);
        d.signal(sig);
        let status = d.wait_exit(20);
        assert_eq!(status.code(), Some(0), "signal {sig}");
        assert!(!d.sock.exists(), "socket left behind after signal {sig}");
    }
}

#[test]
fn inherited_listening_fd_is_served() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let sock = dir.path().join("s.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let fd = listener.as_raw_fd();
    // Let the child inherit the fd: clear FD_CLOEXEC.
    // SAFETY: fcntl on a descriptor we own.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let mut child = Command::new(BIN)
        .args(["serve", "--fd", &fd.to_string(), "--once", "--image"])
        .arg(&image)
        .spawn()
        .expect("spawn");
    drop(listener);
    // A frontend connects and leaves: with --once the daemon exits 0 and the path is not ours.
    let s = UnixStream::connect(&sock).expect("connect");
    drop(s);
    let status = wait_timeout(&mut child, 20).expect("exit after --once");
    assert_eq!(status.code(), Some(0));
    assert!(
        sock.exists(),
        "the daemon must not remove a socket it did not create"
    );

    let out = Command::new(BIN)
        .args(["serve", "--fd", "0", "--image"])
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn direct_on_a_qcow2_image_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let img = dir.path().join("d.qcow2");
    let st = Command::new(BIN)
        .args(["create", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .expect("create");
    assert!(st.success());
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(&img)
        .arg("--direct")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("raw images only"), "{err}");
    assert!(!sock.exists());
}
