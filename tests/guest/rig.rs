//! The end-to-end rig: a real Linux guest in QEMU (TCG) attached over vhost-user-blk to a backend
//! (our daemon or qemu-storage-daemon) serving an image, fio inside, qemu-io outside.
//!
//! See docs/testing.md. A new image format is one [`ImageCase`] value; a new backend is one
//! [`Backend`] variant.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// Virtual size of the test disk.
pub const DISK_SIZE: u64 = 256 * MIB;
/// fio random-write + crc32c-verify region: one 16 MiB slice per job (and per queue).
const FIO_JOB_SIZE: u64 = 16 * MIB;
const FIO_JOBS: u64 = 2;
const FIO_REGION: u64 = FIO_JOB_SIZE * FIO_JOBS;
/// Written by the guest with a fixed byte, checked from the host with `qemu-io read -P`.
const PATTERN_OFFSET: u64 = 128 * MIB;
const PATTERN_LEN: u64 = 8 * MIB;
const PATTERN_BYTE: u8 = 0xa5;
/// Written from the host before boot, read (hashed) by the guest, left alone by it.
const PREFILL_OFFSET: u64 = 200 * MIB;
const PREFILL_LEN: u64 = 4 * MIB;
const PREFILL_BYTE: u8 = 0x5a;
/// Number of virtqueues the device gets; the guest has as many vCPUs, one fio job per vCPU.
const QUEUES: u32 = 2;

/// Who serves the image to QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// This crate's `vhost-user-qcow2 serve`.
    Daemon,
    /// QEMU's own `qemu-storage-daemon` (the reference; also used by benchmarks).
    QemuStorageDaemon,
}

impl Backend {
    /// The name used in `VUQ_E2E_BACKENDS`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Daemon => "daemon",
            Backend::QemuStorageDaemon => "qsd",
        }
    }
}

/// Creates an image of the given virtual size at the given path.
pub type CreateImage = Box<dyn Fn(&Path, u64) -> Result<(), String>>;

/// One image format as the rig sees it: how to create it, how QEMU's tools open it, and what the
/// daemon needs besides `--image`.
pub struct ImageCase {
    /// Short name for messages.
    pub name: &'static str,
    /// Format-layer options in QEMU's `--image-opts` / `--blockdev` syntax without the file
    /// child, e.g. `driver=raw` or `driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0`.
    pub format_opts: String,
    /// `--object` values the options refer to (secrets), given to qemu-io, qemu-img and
    /// qemu-storage-daemon.
    pub objects: Vec<String>,
    /// Extra arguments for `vhost-user-qcow2 serve` (e.g. a key secret).
    pub daemon_args: Vec<String>,
    /// Creates the image file.
    pub create: CreateImage,
    /// Run `qemu-img check` on the image afterwards (qcow2).
    pub qemu_img_check: bool,
}

impl ImageCase {
    /// A raw image: a sparse file.
    pub fn raw() -> Self {
        ImageCase {
            name: "raw",
            format_opts: "driver=raw".to_owned(),
            objects: Vec::new(),
            daemon_args: Vec::new(),
            create: Box::new(|path, size| {
                let f = std::fs::File::create(path).map_err(|e| format!("create {path:?}: {e}"))?;
                f.set_len(size)
                    .map_err(|e| format!("truncate {path:?}: {e}"))
            }),
            qemu_img_check: false,
        }
    }

    fn image_opts(&self, image: &Path) -> String {
        format!(
            "{},file.driver=file,file.filename={}",
            self.format_opts,
            image.display()
        )
    }

    fn object_args(&self) -> Vec<String> {
        self.objects
            .iter()
            .flat_map(|o| ["--object".to_owned(), o.clone()])
            .collect()
    }
}

/// What to do when a prerequisite is missing or the backend is deselected.
enum Gate {
    Run,
    Skip(String),
}

fn gate(backend: Backend) -> Gate {
    if std::env::var("VUQ_SKIP_E2E").as_deref() == Ok("1") {
        return Gate::Skip("VUQ_SKIP_E2E=1".to_owned());
    }
    if let Ok(list) = std::env::var("VUQ_E2E_BACKENDS") {
        if !list.split(',').any(|b| b.trim() == backend.name()) {
            return Gate::Skip(format!(
                "backend {} not in VUQ_E2E_BACKENDS={list}",
                backend.name()
            ));
        }
    }
    let mut tools = vec![
        "qemu-system-x86_64",
        "qemu-io",
        "qemu-img",
        "fio",
        "busybox",
        "cpio",
        "md5sum",
    ];
    if backend == Backend::QemuStorageDaemon {
        tools.push("qemu-storage-daemon");
    }
    let missing: Vec<&str> = tools.into_iter().filter(|t| which(t).is_none()).collect();
    let has_kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    if !missing.is_empty() || !has_kernel {
        let mut msg = String::from("end-to-end guest test prerequisites missing:");
        for m in &missing {
            let _ = write!(msg, " {m}");
        }
        if !has_kernel {
            msg.push_str(" /boot/vmlinuz-* (linux-image-amd64)");
        }
        msg.push_str(". Run .ci/run (or install them) or set VUQ_SKIP_E2E=1 to skip these tests.");
        panic!("{msg}");
    }
    Gate::Run
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing behind.
struct Reaped {
    name: &'static str,
    child: Option<Child>,
}

impl Reaped {
    fn new(name: &'static str, child: Child) -> Self {
        Reaped {
            name,
            child: Some(child),
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Waits up to `timeout` for the process to exit by itself.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
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

    fn signal(&self, sig: libc::c_int) {
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
struct Serial(Arc<Mutex<Vec<String>>>);

impl Serial {
    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("serial lock poisoned").clone()
    }

    fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }
}

fn file_tail(path: &Path, n: usize) -> String {
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

fn md5_hex(data: &[u8]) -> String {
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

fn run_checked(cmd: &mut Command) -> String {
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
fn build_guest() -> (PathBuf, PathBuf) {
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

/// The shell script the guest runs (see tests/guest/init for what it provides).
fn guest_script() -> String {
    format!(
        "\
t() {{ echo \"E2E-TIME $1 $(cut -d' ' -f1 /proc/uptime)\"; }}
t start
fio --name=verify --filename=$DEV --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
--bsrange=4k-128k --size={job} --numjobs={jobs} --offset_increment={job} --cpus_allowed=0-{lastcpu} \
--cpus_allowed_policy=split --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting \
--output-format=terse --terse-version=3 >/tmp/fio.out 2>&1 || {{ cat /tmp/fio.out; exit 1; }}
t fio-verify-done
fio --name=pattern --filename=$DEV --direct=1 --rw=write --bs=1M --offset={poff} --size={plen} \
--buffer_pattern={pbyte:#04x} --end_fsync=1 --output-format=terse >/tmp/fio.out 2>&1 || {{ cat /tmp/fio.out; exit 1; }}
t pattern-done
e2e_md5 fio 0 {region}
e2e_md5 prefill {foff} {flen}
t hashes-done
awk '/-req\\./ {{ s = 0; for (i = 2; i <= NF; i++) {{ if ($i ~ /^[0-9]+$/) s += $i; else break }}; \
print \"E2E-IRQ\", $NF, s }}' /proc/interrupts
",
        job = FIO_JOB_SIZE,
        jobs = FIO_JOBS,
        lastcpu = QUEUES - 1,
        poff = PATTERN_OFFSET,
        plen = PATTERN_LEN,
        pbyte = PATTERN_BYTE,
        region = FIO_REGION,
        foff = PREFILL_OFFSET,
        flen = PREFILL_LEN,
    )
}

fn timeout_secs() -> u64 {
    std::env::var("VUQ_E2E_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

fn start_backend(
    backend: Backend,
    case: &ImageCase,
    qsd_format_opts: &str,
    image: &Path,
    socket: &Path,
    log: &Path,
) -> Reaped {
    let log_file = std::fs::File::create(log).expect("create backend log");
    let mut cmd = match backend {
        Backend::Daemon => {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"));
            cmd.arg("serve")
                .arg("--socket-path")
                .arg(socket)
                .arg("--image")
                .arg(image)
                .arg("--num-queues")
                .arg(QUEUES.to_string())
                .arg("--once")
                .args(&case.daemon_args)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
                );
            cmd
        }
        Backend::QemuStorageDaemon => {
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.args(case.object_args())
                .arg("--blockdev")
                .arg(format!("driver=file,filename={},node-name=f", image.display()))
                .arg("--blockdev")
                .arg(format!("{qsd_format_opts},file=f,node-name=d"))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues={QUEUES}",
                    socket.display()
                ));
            cmd
        }
    };
    let err = log_file.try_clone().expect("clone log fd");
    cmd.stdin(Stdio::null()).stdout(log_file).stderr(err);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut proc = Reaped::new(backend.name(), child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = proc.try_wait() {
            panic!(
                "{} exited ({status}) before creating {}:\n{}",
                backend.name(),
                socket.display(),
                file_tail(log, 30)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not create {} within 20 s",
            backend.name(),
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

/// Parsed result markers of one guest run.
#[derive(Debug, Default)]
struct GuestReport {
    passed: bool,
    md5: Vec<(String, String)>,
    irqs: Vec<(String, u64)>,
    queues: Option<u32>,
    init_uptime: Option<f64>,
    done_uptime: Option<f64>,
    /// `E2E-TIME <step> <uptime>` markers.
    times: Vec<(String, f64)>,
}

fn parse_report(lines: &[String]) -> GuestReport {
    let mut r = GuestReport::default();
    for line in lines {
        // The console may glue a marker to earlier output (firmware, kernel messages).
        let Some(pos) = line.find("E2E-") else {
            continue;
        };
        let mut words = line[pos..].split_whitespace();
        match words.next() {
            Some("E2E-RESULT:") => r.passed = words.next() == Some("PASS"),
            Some("E2E-MD5") => {
                if let (Some(name), Some(hash)) = (words.next(), words.next()) {
                    r.md5.push((name.to_owned(), hash.to_owned()));
                }
            }
            Some("E2E-IRQ") => {
                if let (Some(name), Some(n)) =
                    (words.next(), words.next().and_then(|n| n.parse().ok()))
                {
                    r.irqs.push((name.to_owned(), n));
                }
            }
            Some("E2E-DISK:") => {
                r.queues = words
                    .find_map(|w| w.strip_prefix("queues="))
                    .and_then(|q| q.parse().ok());
            }
            Some("E2E-TIME") => {
                if let (Some(step), Some(t)) =
                    (words.next(), words.next().and_then(|t| t.parse().ok()))
                {
                    r.times.push((step.to_owned(), t));
                }
            }
            Some("E2E-INIT:") => r.init_uptime = words.nth(1).and_then(|u| u.parse().ok()),
            Some("E2E-SCRIPT-DONE:") => r.done_uptime = words.nth(2).and_then(|u| u.parse().ok()),
            _ => {}
        }
    }
    r
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
        .arg(format!("socket,path={},id=c0", socket.display()))
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

/// Boots the guest against `backend` serving a fresh image made by `case`, runs fio with
/// crc32c verification on both queues and a pattern write, then checks from the host with
/// qemu-io that the guest's bytes are in the file. Panics with the serial log tail on failure.
pub fn run_guest_fio(case: &ImageCase, backend: Backend) {
    run(case, backend, &case.format_opts);
}

/// The rig's self-test: qemu-storage-daemon serves a view of the raw image shifted by 1 MiB, so
/// the guest's own checks pass but the bytes land 1 MiB away from where the guest put them.
/// The host-side checks must catch that. Returns the panic message they raised (empty if none),
/// or `None` if the e2e tests are skipped.
pub fn run_guest_fio_with_misplaced_writes() -> Option<String> {
    let case = ImageCase::raw();
    let shifted = format!("driver=raw,offset={MIB},size={}", DISK_SIZE - MIB);
    eprintln!("rig self-test: a panic from the host-side checks is expected below");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&case, Backend::QemuStorageDaemon, &shifted)
    }));
    match outcome {
        Ok(false) => None,
        Ok(true) => Some(String::new()),
        Err(payload) => Some(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default(),
        ),
    }
}

/// Returns false if the run was skipped (see [`gate`]).
fn run(case: &ImageCase, backend: Backend, qsd_format_opts: &str) -> bool {
    if let Gate::Skip(why) = gate(backend) {
        eprintln!("SKIPPED e2e {} on {}: {why}", case.name, backend.name());
        return false;
    }
    let t_start = Instant::now();
    let (kernel, initrd) = build_guest();
    let t_built = Instant::now();

    let base = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    };
    let dir = tempfile::Builder::new()
        .prefix("vuq-e2e-")
        .tempdir_in(base)
        .expect("temp dir");
    let image = dir.path().join(format!("disk.{}", case.name));
    let socket = dir.path().join("vhost.sock");
    let backend_log = dir.path().join("backend.log");
    (case.create)(&image, DISK_SIZE)
        .unwrap_or_else(|e| panic!("creating the {} image: {e}", case.name));

    let qemu_io = |cmds: &[String]| -> (bool, String) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(case.object_args())
            .arg("--image-opts")
            .arg(case.image_opts(&image));
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        let out = cmd.output().expect("spawn qemu-io");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success() && !text.contains("verification failed"),
            text,
        )
    };
    let (ok, text) = qemu_io(&[format!(
        "write -P {PREFILL_BYTE:#04x} {PREFILL_OFFSET} {PREFILL_LEN}"
    )]);
    assert!(ok, "qemu-io prefill failed:\n{text}");

    let mut daemon = start_backend(
        backend,
        case,
        qsd_format_opts,
        &image,
        &socket,
        &backend_log,
    );

    let guest = boot_guest(&kernel, &initrd, &socket, &guest_script()).unwrap_or_else(|e| {
        panic!(
            "{e}\n--- {} log tail:\n{}",
            backend.name(),
            file_tail(&backend_log, 30)
        )
    });
    let qemu_status = guest.status;
    let guest_secs = guest.secs;
    let serial = Serial(Arc::new(Mutex::new(guest.serial)));
    let lines = serial.lines();
    let report = parse_report(&lines);
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\nQEMU exit: {qemu_status}\nserial log tail:\n{}\n--- {} log tail:\n{}",
            serial.tail(60),
            backend.name(),
            file_tail(&backend_log, 30)
        )
    };
    if !qemu_status.success() {
        fail("QEMU failed");
    }
    if !report.passed {
        fail("the guest did not report E2E-RESULT: PASS");
    }
    if report.queues != Some(QUEUES) {
        fail(&format!(
            "the guest saw {:?} queues, expected {QUEUES}",
            report.queues
        ));
    }
    let used: Vec<_> = report.irqs.iter().filter(|(_, n)| *n > 0).collect();
    if report.irqs.len() != QUEUES as usize || used.len() != QUEUES as usize {
        fail(&format!(
            "expected completions on all {QUEUES} request queues, got {:?}",
            report.irqs
        ));
    }

    // The backend must let go of the image before qemu-io can lock it. Ours was started with
    // --once and must exit by itself, successfully, when QEMU disconnects.
    let t_stop = Instant::now();
    let status = match backend {
        Backend::Daemon => daemon
            .wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| {
                fail("the daemon (--once) did not exit within 10 s of QEMU disconnecting")
            }),
        Backend::QemuStorageDaemon => {
            daemon.signal(libc::SIGTERM);
            daemon
                .wait_timeout(Duration::from_secs(10))
                .unwrap_or_else(|| fail("qemu-storage-daemon ignored SIGTERM for 10 s"))
        }
    };
    if !status.success() {
        fail(&format!("{} exited with {status}", backend.name()));
    }
    let stop_secs = t_stop.elapsed().as_secs_f64();
    assert!(
        !socket.exists() || backend == Backend::QemuStorageDaemon,
        "the daemon left {} behind",
        socket.display()
    );

    // The bytes must be in the file: fixed patterns with qemu-io, the fio region by hash.
    let (ok, text) = qemu_io(&[
        format!("read -P {PATTERN_BYTE:#04x} {PATTERN_OFFSET} {PATTERN_LEN}"),
        format!("read -P {PREFILL_BYTE:#04x} {PREFILL_OFFSET} {PREFILL_LEN}"),
        format!("read -P 0 {FIO_REGION} {}", PATTERN_OFFSET - FIO_REGION),
        format!(
            "read -P 0 {} {}",
            PATTERN_OFFSET + PATTERN_LEN,
            PREFILL_OFFSET - PATTERN_OFFSET - PATTERN_LEN
        ),
        format!(
            "read -P 0 {} {}",
            PREFILL_OFFSET + PREFILL_LEN,
            DISK_SIZE - PREFILL_OFFSET - PREFILL_LEN
        ),
    ]);
    assert!(ok, "qemu-io pattern checks failed:\n{text}");

    let raw = dir.path().join("export.raw");
    let mut convert = Command::new("qemu-img");
    convert
        .arg("convert")
        .args(case.object_args())
        .arg("--image-opts")
        .arg(case.image_opts(&image))
        .args(["-O", "raw"])
        .arg(&raw);
    run_checked(&mut convert);
    let mut region = vec![0u8; usize::try_from(FIO_REGION).expect("region fits usize")];
    let mut f = std::fs::File::open(&raw).expect("open export");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_exact(&mut region).expect("read export");
    let expect_fio = md5_hex(&region);
    let expect_prefill = md5_hex(&vec![
        PREFILL_BYTE;
        usize::try_from(PREFILL_LEN).expect("fits")
    ]);
    let guest_md5 = |name: &str| {
        report
            .md5
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.clone())
    };
    assert_eq!(
        guest_md5("fio"),
        Some(expect_fio),
        "fio region in the file differs from what the guest read"
    );
    assert_eq!(
        guest_md5("prefill"),
        Some(expect_prefill),
        "the guest read wrong data from the host-written region"
    );
    assert!(
        region.iter().any(|&b| b != 0),
        "fio region is all zeroes: nothing was written"
    );

    if case.qemu_img_check {
        let mut check = Command::new("qemu-img");
        check
            .arg("check")
            .args(case.object_args())
            .arg("--image-opts")
            .arg(case.image_opts(&image));
        run_checked(&mut check);
    }

    eprintln!(
        "e2e {} on {}: PASS in {:.1} s (guest build {:.1} s, QEMU {guest_secs:.1} s, backend stop \
         {stop_secs:.1} s); guest uptime at /init {:?} s, steps {:?}, script done {:?} s; irqs {:?}",
        case.name,
        backend.name(),
        t_start.elapsed().as_secs_f64(),
        (t_built - t_start).as_secs_f64(),
        report.init_uptime,
        report.times,
        report.done_uptime,
        report.irqs
    );
    true
}
