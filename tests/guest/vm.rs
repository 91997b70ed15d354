//! Guest plumbing for the end-to-end tests: building the guest, booting it in QEMU (TCG) on a
//! vhost-user-blk socket, and the child-process and serial-log helpers around that.
//! See docs/testing.md.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Number of virtqueues the device gets; the guest has as many vCPUs.
pub const QUEUES: u32 = 2;

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing behind.
pub struct Reaped {
    name: &'static str,
    child: Option<Child>,
}

impl Reaped {
    pub fn new(name: &'static str, child: Child) -> Self {
        Reaped {
            name,
            child: Some(child),
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own unreaped
            // child, so it cannot have been recycled for another process.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            eprintln!("killing {} (pid {})", self.name, child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Serial console lines of the guest, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Serial(pub Arc<Mutex<Vec<String>>>);

impl Serial {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().expect("serial lock poisoned").clone()
    }

    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }
}

pub fn file_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Standard base64 with padding (what busybox `base64 -d` in the guest decodes).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// MD5 of a whole file (`md5sum FILE`).
pub fn md5_file(path: &Path) -> String {
    run_checked(Command::new("md5sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

pub fn md5_hex(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn md5sum");
    let mut stdin = child.stdin.take().expect("md5sum stdin");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("md5sum output");
    writer
        .join()
        .expect("md5sum writer thread")
        .expect("write to md5sum");
    assert!(out.status.success(), "md5sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

pub fn run_checked(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Builds (or finds cached) the guest kernel and initramfs with tests/guest/build.sh.
pub fn build_guest() -> (PathBuf, PathBuf) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| manifest.join("target"), Path::to_path_buf)
        .join("guest");
    let text = run_checked(
        Command::new("bash")
            .arg(manifest.join("tests/guest/build.sh"))
            .arg("--out")
            .arg(&out_dir),
    );
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(key))
            .next_back()
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("build.sh printed no {key}:\n{text}"))
    };
    (get("KERNEL="), get("INITRD="))
}

/// How many guests may run at once in one test process (`VUQ_E2E_PARALLEL`, default 2): each
/// TCG guest wants two host threads, and `cargo test` starts every test at once.
pub fn parallel_guests() -> usize {
    std::env::var("VUQ_E2E_PARALLEL")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2)
}

/// A slot to run one guest in; released on drop. See [`parallel_guests`].
pub struct GuestSlot;

static RUNNING_GUESTS: Mutex<usize> = Mutex::new(0);
static GUEST_DONE: Condvar = Condvar::new();

impl GuestSlot {
    /// Waits until fewer than [`parallel_guests`] guests run.
    pub fn acquire() -> GuestSlot {
        let limit = parallel_guests();
        let mut running = RUNNING_GUESTS.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= limit {
            running = GUEST_DONE.wait(running).unwrap_or_else(|e| e.into_inner());
        }
        *running += 1;
        GuestSlot
    }
}

impl Drop for GuestSlot {
    fn drop(&mut self) {
        let mut running = RUNNING_GUESTS.lock().unwrap_or_else(|e| e.into_inner());
        *running -= 1;
        GUEST_DONE.notify_one();
    }
}

pub fn timeout_secs() -> u64 {
    std::env::var("VUQ_E2E_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

/// A temp dir for image and socket: /dev/shm (tmpfs) when there is one.
pub fn temp_dir() -> tempfile::TempDir {
    let base = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    };
    tempfile::Builder::new()
        .prefix("vuq-e2e-")
        .tempdir_in(base)
        .expect("temp dir")
}

/// One finished QEMU run.
pub struct GuestRun {
    /// QEMU's exit status.
    pub status: ExitStatus,
    /// Serial console (and QEMU's stderr) lines.
    pub serial: Vec<String>,
    /// Wall-clock seconds from spawning QEMU to its exit.
    pub secs: f64,
}

/// Boots the test guest attached to the vhost-user-blk socket and runs `script` in it (see
/// tests/guest/init). Errors if QEMU does not exit within `VUQ_E2E_TIMEOUT_SECS` (it is then
/// killed); the error carries the serial log tail.
pub fn boot_guest(
    kernel: &Path,
    initrd: &Path,
    socket: &Path,
    script: &str,
) -> Result<GuestRun, String> {
    boot_guest_with(kernel, initrd, socket, script, "")
}

/// [`boot_guest`] with extra `-chardev socket` options, e.g. `,reconnect-ms=500`.
pub fn boot_guest_with(
    kernel: &Path,
    initrd: &Path,
    socket: &Path,
    script: &str,
    chardev_extra: &str,
) -> Result<GuestRun, String> {
    let encoded = base64(script.as_bytes());
    let append = format!("console=ttyS0 panic=-1 loglevel=4 vuq.script={encoded}");
    // x86's COMMAND_LINE_SIZE is 2048 including the terminating NUL.
    if append.len() >= 2000 {
        return Err(format!(
            "kernel command line too long ({} bytes)",
            append.len()
        ));
    }
    let mem = "1G";
    let mut qemu_cmd = Command::new("qemu-system-x86_64");
    qemu_cmd
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            &QUEUES.to_string(),
            "-m",
            mem,
        ])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!(
            "socket,path={},id=c0{chardev_extra}",
            socket.display()
        ))
        .args([
            "-device",
            &format!("vhost-user-blk-pci,chardev=c0,num-queues={QUEUES}"),
        ])
        .args(["-nic", "none", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let _slot = GuestSlot::acquire();
    let start = Instant::now();
    let mut child = qemu_cmd
        .spawn()
        .map_err(|e| format!("spawn qemu-system-x86_64: {e}"))?;
    let serial = Serial::default();
    let mut readers = Vec::new();
    let streams = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for stream in streams.into_iter().flatten() {
        let serial = serial.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                serial.0.lock().expect("serial lock poisoned").push(line);
            }
        }));
    }
    let mut qemu = Reaped::new("qemu-system-x86_64", child);
    let timeout = Duration::from_secs(timeout_secs());
    let status = qemu.wait_timeout(timeout);
    drop(qemu);
    for r in readers {
        let _ = r.join();
    }
    let Some(status) = status else {
        return Err(format!(
            "guest did not finish within {} s (VUQ_E2E_TIMEOUT_SECS); QEMU killed; serial log tail:\n{}",
            timeout.as_secs(),
            serial.tail(60)
        ));
    };
    Ok(GuestRun {
        status,
        serial: serial.lines(),
        secs: start.elapsed().as_secs_f64(),
    })
}
