//! Shared helpers for the integration tests: a real daemon process on a socket in a temp dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");

/// A running `vhost-user-qcow2 serve`, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub image: PathBuf,
}

/// Creates a raw image of `size` bytes filled with a recognisable pattern per 512-byte sector.
pub fn make_image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.img");
    let mut data = vec![0u8; usize::try_from(size).expect("fits")];
    for (i, s) in data.chunks_mut(512).enumerate() {
        s.fill(u8::try_from(i % 251).expect("fits"));
    }
    std::fs::write(&path, &data).expect("write image");
    path
}

impl Daemon {
    /// Starts a daemon on a fresh image of `size` bytes with extra `serve` arguments.
    pub fn start(size: u64, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = make_image(dir.path(), size);
        let sock = dir.path().join("vhost.sock");
        let child = spawn_serve(&sock, &image, extra);
        let d = Daemon {
            child,
            dir,
            sock,
            image,
        };
        d.wait_for_socket();
        d
    }

    /// Waits until the daemon accepts connections. The daemon renames its socket into place only
    /// once it listens, so waiting for the file is enough; no probe connection is made (a
    /// `--once` daemon would take it for its frontend).
    pub fn wait_for_socket(&self) {
        let t = Instant::now();
        while !self.sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "daemon did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill() with the pid of our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits for the daemon to exit (at most `secs` seconds).
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        wait_timeout(&mut self.child, secs).expect("daemon did not exit in time")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve`; its log goes to `daemon.log` next to the socket.
pub fn spawn_serve(sock: &Path, image: &Path, extra: &[&str]) -> Child {
    let log = sock.with_file_name("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(sock)
        .arg("--image")
        .arg(image)
        .args(extra)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn daemon")
}

pub fn wait_timeout(child: &mut Child, secs: u64) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if t.elapsed() > Duration::from_secs(secs) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
