//! The end-to-end rig: a real Linux guest in QEMU (TCG) attached over vhost-user-blk to a backend
//! (our daemon or qemu-storage-daemon) serving an image, fio inside, qemu-io outside.
//!
//! See docs/testing.md. A new image format is one [`ImageCase`] value; a new backend is one
//! [`Backend`] variant.

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vm::{
    boot_guest, boot_guest_with, build_guest, file_tail, md5_file, md5_hex, run_checked, temp_dir,
    which, Reaped, Serial, QUEUES,
};

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
const KIB: u64 = 1024;
/// Small writes by the guest inside one cluster, after the pattern: on a qcow2 image the rest of
/// the cluster must come from the backing file (or be zero), which only the host checks see.
const POKES: [Fill; 2] = [
    Fill::new(PATTERN_OFFSET + PATTERN_LEN + 20 * KIB, 4 * KIB, 0xc3),
    Fill::new(150 * MIB + 3 * KIB, KIB, 0xe7),
];
/// [`POKES`] widened to whole blocks of `bs` bytes (unchanged for 512).
fn pokes(bs: u64) -> [Fill; 2] {
    POKES.map(|p| {
        let start = p.offset / bs * bs;
        let end = (p.offset + p.len).div_ceil(bs) * bs;
        Fill::new(start, end - start, p.byte)
    })
}

/// Regions the guest hashes after its writes (O_DIRECT, whole MiB), compared with what the host
/// expects there: host-written data, the guest's own pattern and pokes, and the base image's
/// content seen through an overlay.
const GUEST_READS: [(&str, u64, u64); 4] = [
    ("prefill", PREFILL_OFFSET, PREFILL_LEN),
    ("pattern-edge", PATTERN_OFFSET + PATTERN_LEN - MIB, 2 * MIB),
    ("poke", 150 * MIB, MIB),
    ("base-edge", 159 * MIB, 2 * MIB),
];
/// What the base image of the overlay cases holds (written with qemu-io; zeroes elsewhere). It
/// covers the fio region, the pattern and the first poke, ends inside the guest's reads, and
/// has a second piece around the host's prefill.
const BASE_FILLS: [Fill; 2] = [
    Fill::new(0, 160 * MIB, 0x3c),
    Fill::new(196 * MIB, 12 * MIB, 0x69),
];

/// `len` bytes of `byte` at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    pub offset: u64,
    pub len: u64,
    pub byte: u8,
}

impl Fill {
    pub const fn new(offset: u64, len: u64, byte: u8) -> Self {
        Fill { offset, len, byte }
    }

    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// One stretch of the expected disk content: a byte, or `None` where it is not one fixed byte
/// (fio's data, checked by hash; or content nobody wrote on an image where that is undefined).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    offset: u64,
    len: u64,
    byte: Option<u8>,
}

/// The expected content of the whole disk: `base` (zeroes where it says nothing; undefined
/// everywhere if `None`), overwritten by `writes` in order. Adjacent stretches with the same
/// content are merged.
fn layout(base: Option<&[Fill]>, writes: &[(u64, u64, Option<u8>)]) -> Vec<Region> {
    let mut cuts = vec![0, DISK_SIZE];
    for f in base.unwrap_or_default() {
        cuts.extend([f.offset, f.end()]);
    }
    for &(o, l, _) in writes {
        cuts.extend([o, o + l]);
    }
    cuts.retain(|&c| c <= DISK_SIZE);
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<Region> = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let byte = writes
            .iter()
            .rev()
            .find(|&&(o, l, _)| o <= a && a < o + l)
            .map(|&(_, _, c)| c)
            .unwrap_or_else(|| {
                base.map(|base| {
                    base.iter()
                        .rev()
                        .find(|f| f.offset <= a && a < f.end())
                        .map_or(0, |f| f.byte)
                })
            });
        match out.last_mut() {
            Some(last) if last.byte == byte && last.offset + last.len == a => last.len += b - a,
            _ => out.push(Region {
                offset: a,
                len: b - a,
                byte,
            }),
        }
    }
    out
}

/// The bytes `layout` says are at `offset..offset + len`, or `None` if part of it is not one
/// fixed byte.
fn expected_bytes(layout: &[Region], offset: u64, len: u64) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(usize::try_from(len).expect("fits"));
    for r in layout {
        let a = r.offset.max(offset);
        let b = (r.offset + r.len).min(offset + len);
        if a < b {
            out.resize(out.len() + usize::try_from(b - a).expect("fits"), r.byte?);
        }
    }
    Some(out)
}

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

/// Creates an image of the given virtual size at the given path; returns the other files it
/// made (backing files), which the backend must leave byte-for-byte unchanged.
pub type CreateImage = Box<dyn Fn(&Path, u64) -> Result<Vec<PathBuf>, String>>;

/// How qemu-storage-daemon opens the image: the `--blockdev` values, the exported node being
/// `d`. The rig's self-tests use it to make qemu-storage-daemon misbehave.
pub type QsdView = Box<dyn Fn(&Path) -> Vec<String>>;

/// Who makes the overlay in [`ImageCase::qcow2_overlay`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlayMaker {
    /// `qemu-img create -f qcow2 -b base.qcow2 -F qcow2`.
    QemuImg,
    /// `vhost-user-qcow2 create --backing base.qcow2 --backing-format qcow2`.
    Ours,
}

/// The name of the base image next to an overlay case's image (stored relative in the overlay).
pub const BASE_NAME: &str = "base.qcow2";

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
    /// What the image reads as before anyone writes (zeroes where it says nothing): the base
    /// image's content for an overlay. `None`: undefined (a raw LUKS file decrypts unwritten
    /// sectors to noise), so only written stretches are checked by pattern.
    pub base: Option<Vec<Fill>>,
    /// Run `qemu-img check` on the image afterwards (qcow2).
    pub qemu_img_check: bool,
    /// The image is encrypted: the plaintext patterns the guest and the host wrote must not
    /// appear anywhere in the file.
    pub encrypted: bool,
    /// Logical block size the guest sees (4096 for LUKS2 with 4 KiB encryption sectors): the
    /// guest's small writes are widened to it.
    pub block_size: u64,
    /// For formats QEMU cannot open (LUKS2): how the host writes and reads plaintext instead of
    /// qemu-io / qemu-img on the image (then qemu-io checks a plaintext raw export).
    pub plain: Option<PlainAccess>,
    /// Where the image lives when not in the test's temp dir: an `rbd:POOL/IMAGE:conf=…` name
    /// (QEMU's tools reach it with `file.driver=rbd`).
    pub location: Option<PathBuf>,
}

/// Writes `len` bytes of `byte` at `offset` of the guest disk of an image.
pub type PlainFill = Box<dyn Fn(&Path, u64, u64, u8) -> Result<(), String>>;
/// Writes the whole guest disk's plaintext of an image (first path) to a raw file.
pub type PlainExport = Box<dyn Fn(&Path, &Path) -> Result<(), String>>;

/// Host-side plaintext access for formats QEMU's tools cannot open.
pub struct PlainAccess {
    pub fill: PlainFill,
    pub export: PlainExport,
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
                    .map_err(|e| format!("truncate {path:?}: {e}"))?;
                Ok(Vec::new())
            }),
            base: Some(Vec::new()),
            qemu_img_check: false,
            encrypted: false,
            block_size: 512,
            plain: None,
            location: None,
        }
    }

    /// A qcow2 image as `qemu-img create -f qcow2` makes it (v3, 64 KiB clusters).
    pub fn qcow2() -> Self {
        ImageCase {
            name: "qcow2",
            format_opts: "driver=qcow2".to_owned(),
            objects: Vec::new(),
            daemon_args: Vec::new(),
            create: Box::new(|path, size| {
                qemu_img_create(&["-f", "qcow2"], path, size).map(|()| Vec::new())
            }),
            base: Some(Vec::new()),
            qemu_img_check: true,
            encrypted: false,
            block_size: 512,
            plain: None,
            location: None,
        }
    }

    /// A LUKS-encrypted qcow2 image (QEMU's defaults: aes-256-xts-plain64, sha256) with the given
    /// passphrase; `daemon_args` tell our daemon how to get the same passphrase.
    #[allow(dead_code)] // for the encryption issue
    pub fn qcow2_luks(passphrase: &str, daemon_args: Vec<String>) -> Self {
        let secret = format!("secret,id=sec0,data={passphrase}");
        let create_secret = secret.clone();
        ImageCase {
            name: "qcow2-luks",
            // qemu-storage-daemon needs encrypt.format as well as the key; qemu-io and qemu-img
            // accept it too.
            format_opts: "driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0".to_owned(),
            objects: vec![secret],
            daemon_args,
            create: Box::new(move |path, size| {
                qemu_img_create(
                    &[
                        "-f",
                        "qcow2",
                        "--object",
                        &create_secret,
                        // Fast key derivation: the test is about data, not PBKDF2 cost.
                        "-o",
                        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                    ],
                    path,
                    size,
                )
                .map(|()| Vec::new())
            }),
            base: Some(Vec::new()),
            qemu_img_check: true,
            encrypted: true,
            block_size: 512,
            plain: None,
            location: None,
        }
    }

    /// A raw LUKS1 file as `qemu-img create -f luks` makes it (aes-256-xts-plain64, sha256) with
    /// the given passphrase; `daemon_args` tell our daemon how to get the same passphrase.
    pub fn luks(passphrase: &str, daemon_args: Vec<String>) -> Self {
        let secret = format!("secret,id=sec0,data={passphrase}");
        let create_secret = secret.clone();
        ImageCase {
            name: "luks",
            format_opts: "driver=luks,key-secret=sec0".to_owned(),
            objects: vec![secret],
            daemon_args,
            create: Box::new(move |path, size| {
                qemu_img_create(
                    &[
                        "-f",
                        "luks",
                        "--object",
                        &create_secret,
                        "-o",
                        "key-secret=sec0,iter-time=10",
                    ],
                    path,
                    size,
                )
                .map(|()| Vec::new())
            }),
            base: None,
            qemu_img_check: false,
            encrypted: true,
            block_size: 512,
            plain: None,
            location: None,
        }
    }

    /// A qcow2 overlay over a qcow2 base image ([`BASE_NAME`], next to it, named relative) that
    /// holds [`BASE_FILLS`]. The base must stay byte-for-byte unchanged.
    pub fn qcow2_overlay(maker: OverlayMaker) -> Self {
        ImageCase {
            name: match maker {
                OverlayMaker::QemuImg => "qcow2-overlay",
                OverlayMaker::Ours => "qcow2-overlay-ours",
            },
            format_opts: "driver=qcow2".to_owned(),
            objects: Vec::new(),
            daemon_args: Vec::new(),
            create: Box::new(move |path, size| {
                let base = path.with_file_name(BASE_NAME);
                qemu_img_create(&["-f", "qcow2"], &base, size)?;
                let mut io = Command::new("qemu-io");
                io.args(["-f", "qcow2"]);
                for f in BASE_FILLS {
                    io.arg("-c")
                        .arg(format!("write -P {:#04x} {} {}", f.byte, f.offset, f.len));
                }
                run_tool(io.arg(&base))?;
                match maker {
                    OverlayMaker::QemuImg => {
                        qemu_img_create(
                            &["-f", "qcow2", "-b", BASE_NAME, "-F", "qcow2"],
                            path,
                            size,
                        )?;
                    }
                    OverlayMaker::Ours => {
                        run_tool(
                            Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"))
                                .args(["create", "-f", "qcow2", "--backing", BASE_NAME])
                                .args(["--backing-format", "qcow2"])
                                .arg(path)
                                .arg(size.to_string()),
                        )?;
                    }
                }
                Ok(vec![base])
            }),
            base: Some(BASE_FILLS.to_vec()),
            qemu_img_check: true,
            encrypted: false,
            block_size: 512,
            plain: None,
            location: None,
        }
    }

    fn image_opts(&self, image: &Path) -> String {
        format!(
            "{},file.driver={},file.filename={}",
            self.format_opts,
            file_driver(image),
            image.display()
        )
    }

    /// Runs qemu-io on the image with the given commands; true if all succeeded (and every
    /// `read -P` pattern matched), plus the output.
    fn qemu_io(&self, image: &Path, cmds: &[String]) -> (bool, String) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(self.object_args())
            .arg("--image-opts")
            .arg(self.image_opts(image));
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

/// Runs a tool, Err with its output if it fails.
fn run_tool(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn qemu_img_create(args: &[&str], path: &Path, size: u64) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .arg("create")
        .arg("-q")
        .args(args)
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| format!("spawn qemu-img: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img create {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The shell script the guest runs (see tests/guest/init for what it provides).
fn guest_script(bs: u64) -> String {
    let mut script = format!(
        "\
t() {{ echo \"E2E-TIME $1 $(cut -d' ' -f1 /proc/uptime)\"; }}
w() {{ fio --name=w --filename=$DEV --direct=1 --rw=write --offset=$1 --size=$2 --bs=$3 \
--buffer_pattern=$4 --end_fsync=1 --output-format=terse >/tmp/fio.out 2>&1 || {{ cat /tmp/fio.out; exit 1; }}; }}
t start
fio --name=verify --filename=$DEV --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
--bsrange=4k-128k --size={job} --numjobs={jobs} --offset_increment={job} --cpus_allowed=0-{lastcpu} \
--cpus_allowed_policy=split --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting \
--output-format=terse --terse-version=3 >/tmp/fio.out 2>&1 || {{ cat /tmp/fio.out; exit 1; }}
t fio-verify-done
w {poff} {plen} 1M {pbyte:#04x}
t pattern-done
",
        job = FIO_JOB_SIZE,
        jobs = FIO_JOBS,
        lastcpu = QUEUES - 1,
        poff = PATTERN_OFFSET,
        plen = PATTERN_LEN,
        pbyte = PATTERN_BYTE,
    );
    for p in pokes(bs) {
        let _ = writeln!(script, "w {} {} {} {:#04x}", p.offset, p.len, p.len, p.byte);
    }
    let _ = writeln!(script, "e2e_md5 fio 0 {FIO_REGION}");
    for (name, offset, len) in GUEST_READS {
        let _ = writeln!(script, "e2e_md5 {name} {offset} {len}");
    }
    script.push_str(
        "t hashes-done
awk '/-req\\./ { s = 0; for (i = 2; i <= NF; i++) { if ($i ~ /^[0-9]+$/) s += $i; else break }; \
print \"E2E-IRQ\", $NF, s }' /proc/interrupts
",
    );
    script
}

/// What the disk must hold after [`guest_script`] ran on an image that read as `base`.
fn expected_layout(base: Option<&[Fill]>, bs: u64) -> Vec<Region> {
    let mut writes = vec![
        (PREFILL_OFFSET, PREFILL_LEN, Some(PREFILL_BYTE)),
        (0, FIO_REGION, None),
        (PATTERN_OFFSET, PATTERN_LEN, Some(PATTERN_BYTE)),
    ];
    writes.extend(pokes(bs).iter().map(|p| (p.offset, p.len, Some(p.byte))));
    layout(base, &writes)
}

/// The default [`QsdView`]: the image file under the case's format options.
/// QEMU's protocol driver for an image location: `rbd` for an `rbd:` name, else `file`.
fn file_driver(image: &Path) -> &'static str {
    if image.to_str().is_some_and(|s| s.starts_with("rbd:")) {
        "rbd"
    } else {
        "file"
    }
}

fn qsd_blockdevs(format_opts: &str, file: &Path) -> Vec<String> {
    vec![
        format!(
            "driver={},filename={},node-name=f",
            file_driver(file),
            file.display()
        ),
        format!("{format_opts},file=f,node-name=d"),
    ]
}

fn start_backend(
    backend: Backend,
    case: &ImageCase,
    qsd_view: Option<&QsdView>,
    image: &Path,
    socket: &Path,
    log: &Path,
    once: bool,
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
                .args(once.then_some("--once"))
                .args(&case.daemon_args)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
                );
            cmd
        }
        Backend::QemuStorageDaemon => {
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.args(case.object_args());
            let blockdevs = match qsd_view {
                Some(view) => view(image),
                None => qsd_blockdevs(&case.format_opts, image),
            };
            for b in blockdevs {
                cmd.arg("--blockdev").arg(b);
            }
            cmd.arg("--export")
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
    /// The guest's logical block size of the disk.
    lbs: Option<u64>,
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
                r.lbs = line[pos..]
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("lbs="))
                    .and_then(|q| q.parse().ok());
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

/// Boots the guest twice against one backend process started without `--once`: the second
/// QEMU must attach to the same socket and read what the first guest wrote. Then SIGTERM must
/// make the backend exit 0 (our daemon also removes its socket).
pub fn run_guest_reconnect(case: &ImageCase, backend: Backend) {
    if let Gate::Skip(why) = gate(backend) {
        eprintln!(
            "SKIPPED e2e reconnect {} on {}: {why}",
            case.name,
            backend.name()
        );
        return;
    }
    let (kernel, initrd) = build_guest();
    let dir = temp_dir();
    let image = dir.path().join(format!("disk.{}", case.name));
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("backend.log");
    (case.create)(&image, DISK_SIZE)
        .unwrap_or_else(|e| panic!("creating the {} image: {e}", case.name));
    let mut daemon = start_backend(backend, case, None, &image, &socket, &log, false);

    let write = |byte: u8, offset: u64| {
        format!(
            "fio --name=w --filename=$DEV --direct=1 --rw=write --bs=1M --offset={offset} --size=4M \
             --buffer_pattern={byte:#04x} --end_fsync=1 --output-format=terse >/tmp/fio.out 2>&1 \
             || {{ cat /tmp/fio.out; exit 1; }}\n"
        )
    };
    let scripts = [
        write(0x11, 0),
        format!("e2e_md5 first 0 {}\n{}", 4 * MIB, write(0x22, 4 * MIB)),
    ];
    let mut reports = Vec::new();
    for (i, script) in scripts.iter().enumerate() {
        let run = boot_guest(&kernel, &initrd, &socket, script).unwrap_or_else(|e| {
            panic!(
                "boot {}: {e}\n--- backend log tail:\n{}",
                i + 1,
                file_tail(&log, 30)
            )
        });
        let report = parse_report(&run.serial);
        if !run.status.success() || !report.passed {
            let start = run.serial.len().saturating_sub(60);
            panic!(
                "boot {} failed (QEMU {}); serial log tail:\n{}\n--- backend log tail:\n{}",
                i + 1,
                run.status,
                run.serial[start..].join("\n"),
                file_tail(&log, 30)
            );
        }
        assert!(
            daemon.try_wait().is_none(),
            "{} exited after QEMU disconnected although it was started without --once:\n{}",
            backend.name(),
            file_tail(&log, 30)
        );
        eprintln!(
            "reconnect {} on {}: boot {} PASS in {:.1} s",
            case.name,
            backend.name(),
            i + 1,
            run.secs
        );
        reports.push(report);
    }
    let expect_first = md5_hex(&vec![0x11; 4 * 1024 * 1024]);
    let first = reports[1]
        .md5
        .iter()
        .find(|(n, _)| n == "first")
        .map(|(_, h)| h.clone());
    assert_eq!(
        first,
        Some(expect_first),
        "the second guest did not read what the first one wrote"
    );

    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{} ignored SIGTERM for 10 s", backend.name()));
    assert!(
        status.success(),
        "{} exited with {status} on SIGTERM:\n{}",
        backend.name(),
        file_tail(&log, 30)
    );
    if backend == Backend::Daemon {
        assert!(
            !socket.exists(),
            "the daemon left {} behind after SIGTERM",
            socket.display()
        );
    }
    let expect = layout(
        case.base.as_deref(),
        &[(0, 4 * MIB, Some(0x11)), (4 * MIB, 4 * MIB, Some(0x22))],
    );
    let (ok, text) = case.qemu_io(&image, &read_pattern_cmds(&expect));
    assert!(ok, "qemu-io checks after two guests failed:\n{text}");
}

/// `qemu-io` commands checking every stretch of `layout` that holds a fixed byte.
fn read_pattern_cmds(layout: &[Region]) -> Vec<String> {
    layout
        .iter()
        .filter_map(|r| {
            r.byte
                .map(|b| format!("read -P {b:#04x} {} {}", r.offset, r.len))
        })
        .collect()
}

/// Boots the guest against `backend` serving a fresh image made by `case`, runs fio with
/// crc32c verification on both queues, a pattern write and small writes inside clusters, then
/// checks from the host: the backing files are unchanged, qemu-io finds the guest's bytes where
/// it wrote them and the image's earlier content (zeroes, or the base image's) everywhere else,
/// the guest read what the host expects, and `qemu-img check` is clean. Panics with the serial
/// log tail on failure.
pub fn run_guest_fio(case: &ImageCase, backend: Backend) {
    run_retrying_emulator_crashes(case, backend, None);
}

/// Runs the flow with qemu-storage-daemon opening the image through `view` (a deliberately wrong
/// view, for the rig's self-tests). Returns the panic message the run raised (empty if none),
/// or `None` if the e2e tests are skipped.
pub fn run_guest_fio_expecting_failure(case: &ImageCase, view: &QsdView) -> Option<String> {
    eprintln!(
        "rig self-test ({}): a panic from the host-side checks is expected below",
        case.name
    );
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_retrying_emulator_crashes(case, Backend::QemuStorageDaemon, Some(view))
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

/// A view of the raw image shifted by 1 MiB: the guest's own checks pass but the bytes land
/// 1 MiB away from where the guest put them.
pub fn shifted_raw_view() -> QsdView {
    Box::new(|image| {
        qsd_blockdevs(
            &format!("driver=raw,offset={MIB},size={}", DISK_SIZE - MIB),
            image,
        )
    })
}

/// The overlay opened without its backing file: reads of unwritten clusters return zeroes and
/// partial-cluster writes fill the rest of the cluster with zeroes instead of the base's data.
pub fn overlay_without_backing_view() -> QsdView {
    Box::new(|image| {
        let mut b = qsd_blockdevs("", image);
        b[1] = r#"{"driver":"qcow2","backing":null,"file":"f","node-name":"d"}"#.to_owned();
        b
    })
}

/// The base image served instead of the overlay: the guest writes into the backing file.
pub fn overlay_base_instead_view() -> QsdView {
    Box::new(|image| qsd_blockdevs("driver=qcow2", &image.with_file_name(BASE_NAME)))
}

/// How one run of the flow ended (failures panic).
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Passed,
    /// Skipped (see [`gate`]).
    Skipped,
    /// QEMU's TCG aborted on its own assertion before the guest's `/init` ran, so no I/O
    /// happened: an emulator bug, not a backend one (seen on our loaded 2-core machine as
    /// `iotlb_to_section: Assertion 'section_index < d->map.sections_nb' failed` during
    /// firmware/kernel start).
    EmulatorCrashBeforeInit,
}

/// [`run`], once more when QEMU itself crashed before the guest started (see
/// [`Outcome::EmulatorCrashBeforeInit`]). Returns false if skipped.
fn run_retrying_emulator_crashes(
    case: &ImageCase,
    backend: Backend,
    qsd_view: Option<&QsdView>,
) -> bool {
    match run(case, backend, qsd_view) {
        Outcome::Passed => true,
        Outcome::Skipped => false,
        Outcome::EmulatorCrashBeforeInit => {
            eprintln!(
                "e2e {} on {}: QEMU crashed (its own assertion) before /init; retrying once",
                case.name,
                backend.name()
            );
            match run(case, backend, qsd_view) {
                Outcome::Passed => true,
                Outcome::Skipped => false,
                Outcome::EmulatorCrashBeforeInit => {
                    panic!("QEMU crashed before /init twice in a row (see the log above)")
                }
            }
        }
    }
}

fn run(case: &ImageCase, backend: Backend, qsd_view: Option<&QsdView>) -> Outcome {
    if let Gate::Skip(why) = gate(backend) {
        eprintln!("SKIPPED e2e {} on {}: {why}", case.name, backend.name());
        return Outcome::Skipped;
    }
    let t_start = Instant::now();
    let (kernel, initrd) = build_guest();
    let t_built = Instant::now();

    let dir = temp_dir();
    let image = case
        .location
        .clone()
        .unwrap_or_else(|| dir.path().join(format!("disk.{}", case.name)));
    let socket = dir.path().join("vhost.sock");
    let backend_log = dir.path().join("backend.log");
    let backing_files = (case.create)(&image, DISK_SIZE)
        .unwrap_or_else(|e| panic!("creating the {} image: {e}", case.name));

    let raw = dir.path().join("export.raw");
    // Formats QEMU cannot open are checked through a plaintext raw export.
    let qemu_io = |cmds: &[String]| match &case.plain {
        None => case.qemu_io(&image, cmds),
        Some(_) => ImageCase::raw().qemu_io(&raw, cmds),
    };
    match &case.plain {
        None => {
            let (ok, text) = qemu_io(&[format!(
                "write -P {PREFILL_BYTE:#04x} {PREFILL_OFFSET} {PREFILL_LEN}"
            )]);
            assert!(ok, "qemu-io prefill failed:\n{text}");
        }
        Some(p) => (p.fill)(&image, PREFILL_OFFSET, PREFILL_LEN, PREFILL_BYTE)
            .unwrap_or_else(|e| panic!("prefill: {e}")),
    }
    let backing_md5: Vec<String> = backing_files.iter().map(|f| md5_file(f)).collect();

    let mut daemon = start_backend(backend, case, qsd_view, &image, &socket, &backend_log, true);

    let guest = boot_guest(&kernel, &initrd, &socket, &guest_script(case.block_size))
        .unwrap_or_else(|e| {
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
        let aborted = qemu_status.signal() == Some(libc::SIGABRT);
        let qemu_assert = lines
            .iter()
            .any(|l| l.starts_with("qemu-system-x86_64:") && l.contains("Assertion"));
        if aborted && qemu_assert && report.init_uptime.is_none() {
            eprintln!(
                "QEMU aborted before /init:\n{}\n--- {} log tail:\n{}",
                serial.tail(10),
                backend.name(),
                file_tail(&backend_log, 10)
            );
            return Outcome::EmulatorCrashBeforeInit;
        }
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
    if report.lbs != Some(case.block_size) {
        fail(&format!(
            "the guest saw a {:?}-byte logical block size, expected {}",
            report.lbs, case.block_size
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

    // Backing files are opened read-only: not one byte may change.
    for (file, before) in backing_files.iter().zip(&backing_md5) {
        assert_eq!(
            &md5_file(file),
            before,
            "the backing file {} changed while the overlay was served",
            file.display()
        );
    }

    // The bytes must be in the image: fixed patterns with qemu-io (the guest's where it wrote,
    // the image's earlier content everywhere else), the fio region by hash.
    let expect = expected_layout(case.base.as_deref(), case.block_size);
    match &case.plain {
        None => {
            let mut convert = Command::new("qemu-img");
            convert
                .arg("convert")
                .args(case.object_args())
                .arg("--image-opts")
                .arg(case.image_opts(&image))
                .args(["-O", "raw"])
                .arg(&raw);
            run_checked(&mut convert);
        }
        Some(p) => (p.export)(&image, &raw).unwrap_or_else(|e| panic!("export: {e}")),
    }
    let (ok, text) = qemu_io(&read_pattern_cmds(&expect));
    assert!(ok, "qemu-io pattern checks failed:\n{text}");
    let exported = std::fs::read(&raw).expect("read export");
    let at = |offset: u64, len: u64| {
        let a = usize::try_from(offset).expect("fits");
        &exported[a..a + usize::try_from(len).expect("fits")]
    };
    let guest_md5 = |name: &str| {
        report
            .md5
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.clone())
    };
    assert_eq!(
        guest_md5("fio"),
        Some(md5_hex(at(0, FIO_REGION))),
        "fio region in the file differs from what the guest read"
    );
    for (name, offset, len) in GUEST_READS {
        let want = expected_bytes(&expect, offset, len);
        assert_eq!(
            guest_md5(name),
            Some(md5_hex(want.as_deref().unwrap_or(at(offset, len)))),
            "the guest read other data at {offset}+{len} ({name}) than {}",
            if want.is_some() {
                "the host expects"
            } else {
                "the file holds"
            }
        );
    }
    if let Some(before) = expected_bytes(&layout(case.base.as_deref(), &[]), 0, FIO_REGION) {
        assert!(
            at(0, FIO_REGION) != before.as_slice(),
            "fio region still holds the image's earlier content: nothing was written"
        );
    }

    if case.encrypted {
        let file = std::fs::read(&image).expect("read image");
        for byte in [PATTERN_BYTE, PREFILL_BYTE] {
            let run = [byte; 512];
            assert!(
                !file.chunks_exact(run.len()).any(|c| c == run),
                "plaintext ({byte:#04x} x 512) found in the encrypted image file"
            );
        }
    }
    if case.qemu_img_check {
        // Exit status 0 means no corruptions and no leaks (2: corruptions, 3: leaks).
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
    Outcome::Passed
}

/// Lines of `log` that contain `needle`.
fn count_in_log(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().filter(|l| l.contains(needle)).count())
        .unwrap_or(0)
}

/// Waits until `log` has at least `n` lines containing `needle`; false on timeout.
fn wait_for_log(log: &Path, needle: &str, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if count_in_log(log, needle) >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A guest runs fio randwrite with crc32c verification on both queues while our daemon is
/// SIGKILLed and restarted `kills` times under it (QEMU reconnects with `reconnect-ms=500` and
/// hands the in-flight region back): fio must finish with its verification passing, the guest's
/// kernel must log no I/O error, and `qemu-img check` must be clean.
pub fn run_guest_kill_restart(case: &ImageCase, kills: usize) {
    if let Gate::Skip(why) = gate(Backend::Daemon) {
        eprintln!("SKIPPED e2e kill-restart {}: {why}", case.name);
        return;
    }
    let (kernel, initrd) = build_guest();
    let dir = temp_dir();
    let image = dir.path().join(format!("disk.{}", case.name));
    let socket = dir.path().join("vhost.sock");
    (case.create)(&image, DISK_SIZE)
        .unwrap_or_else(|e| panic!("creating the {} image: {e}", case.name));
    let log_of = |i: usize| dir.path().join(format!("daemon.{i}.log"));
    // Long enough that the kills land while fio writes: ~8k random 4 KiB writes per job.
    let script = "fio --name=kr --filename=$DEV --direct=1 --ioengine=libaio --rw=randwrite \
         --bs=4k --size=32M --numjobs=2 --offset_increment=128M --iodepth=16 \
         --verify=crc32c --verify_fatal=1 --group_reporting --output-format=terse \
         >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 1; }
         grep -c . /tmp/fio.out
         if dmesg | grep -i 'I/O error'; then echo 'guest logged I/O errors'; exit 1; fi
";
    let mut killed = 0;
    let (run, mut daemon) = std::thread::scope(|scope| {
        let guest =
            scope.spawn(|| boot_guest_with(&kernel, &initrd, &socket, script, ",reconnect-ms=500"));
        let mut daemon = start_backend(
            Backend::Daemon,
            case,
            None,
            &image,
            &socket,
            &log_of(0),
            false,
        );
        for i in 0..kills {
            // Both queues running, and fio well under way (longer for the first boot).
            if !wait_for_log(&log_of(i), "queue 1 started", 1, Duration::from_secs(120))
                || guest.is_finished()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(if i == 0 { 4000 } else { 1500 }));
            if guest.is_finished() {
                break;
            }
            daemon.signal(libc::SIGKILL);
            let _ = daemon.wait_timeout(Duration::from_secs(10));
            killed += 1;
            daemon = start_backend(
                Backend::Daemon,
                case,
                None,
                &image,
                &socket,
                &log_of(i + 1),
                false,
            );
        }
        (guest.join().expect("guest thread"), daemon)
    });
    let logs = || {
        (0..=kills)
            .map(|i| format!("--- daemon {i}:\n{}", file_tail(&log_of(i), 15)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let run = run.unwrap_or_else(|e| panic!("guest: {e}\n{}", logs()));
    let report = parse_report(&run.serial);
    let kernel_errors: Vec<&String> = run
        .serial
        .iter()
        .filter(|l| l.contains("I/O error") || l.contains("blk_update_request"))
        .collect();
    if !run.status.success() || !report.passed || !kernel_errors.is_empty() {
        let start = run.serial.len().saturating_sub(60);
        panic!(
            "guest failed (QEMU {}); serial log tail:\n{}\n{}",
            run.status,
            run.serial[start..].join("\n"),
            logs()
        );
    }
    let n = killed;
    assert_eq!(
        n,
        kills,
        "fio finished before all kills happened:\n{}",
        logs()
    );
    let resubmitted: usize = (1..=kills)
        .map(|i| count_in_log(&log_of(i), "resubmitting"))
        .sum();
    eprintln!(
        "kill-restart {}: {n} SIGKILLs under fio, {resubmitted} queue restarts resubmitted \
         in-flight requests, guest done in {:.1} s",
        case.name, run.secs
    );
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon did not exit cleanly on SIGTERM:\n{}",
        logs()
    );
    if case.qemu_img_check {
        // SIGKILL may leak clusters (allocated, not yet referenced): qemu-img check exits 3 for
        // leaks only, 2 for corruption. Corruption fails the test; leaks are counted, repaired
        // with qemu-img's own `-r leaks`, and the image must then check clean.
        let check = |repair: bool| {
            let out = Command::new("qemu-img")
                .arg("check")
                .args(repair.then_some(["-r", "leaks"]).into_iter().flatten())
                .args(case.object_args())
                .arg("--image-opts")
                .arg(case.image_opts(&image))
                .output()
                .expect("spawn qemu-img check");
            (
                out.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        };
        let (code, text) = check(false);
        assert!(
            matches!(code, Some(0 | 3)),
            "qemu-img check after {kills} SIGKILLs: exit {code:?} (corruption):\n{text}"
        );
        if code == Some(3) {
            let leaks = text
                .lines()
                .filter(|l| l.starts_with("Leaked cluster"))
                .count();
            eprintln!(
                "kill-restart {}: {leaks} leaked cluster(s) after SIGKILL, repairing",
                case.name
            );
            let (code, text) = check(true);
            assert_eq!(
                code,
                Some(0),
                "qemu-img check -r leaks did not leave it clean:\n{text}"
            );
        }
    }
}

/// Live resize under guest I/O: the guest runs fio verify on the start of the disk while the
/// host grows the image through the daemon's control socket; the guest must see the new size
/// in /sys/block/vda/size, write and verify the new tail; `qemu-img info` must show the size.
pub fn run_guest_live_resize(case: &ImageCase, new_size: u64) {
    if let Gate::Skip(why) = gate(Backend::Daemon) {
        eprintln!("SKIPPED e2e live resize {}: {why}", case.name);
        return;
    }
    let (kernel, initrd) = build_guest();
    let dir = temp_dir();
    let image = dir.path().join(format!("disk.{}", case.name));
    let socket = dir.path().join("vhost.sock");
    let control = dir.path().join("control.sock");
    let log = dir.path().join("daemon.log");
    (case.create)(&image, DISK_SIZE)
        .unwrap_or_else(|e| panic!("creating the {} image: {e}", case.name));
    let mut with_control = case.daemon_args.clone();
    with_control.extend(["--control-socket".to_owned(), control.display().to_string()]);
    let case_c = ImageCase {
        name: case.name,
        format_opts: case.format_opts.clone(),
        objects: case.objects.clone(),
        daemon_args: with_control,
        create: Box::new(|_, _| Ok(Vec::new())),
        base: None,
        qemu_img_check: case.qemu_img_check,
        encrypted: case.encrypted,
        block_size: case.block_size,
        // Live resize runs on formats QEMU opens: no plaintext side channel needed.
        plain: None,
        location: case.location.clone(),
    };
    let old_sectors = DISK_SIZE / 512;
    let new_sectors = new_size / 512;
    let tail = new_size - DISK_SIZE;
    let script = format!(
        "fio --name=bg --filename=$DEV --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \\
           --size=32M --iodepth=8 --verify=crc32c --verify_fatal=1 --output-format=terse \\
           >/tmp/bg.out 2>&1 &
         bg=$!
         i=0
         while [ \"$(cat /sys/block/vda/size)\" = {old_sectors} ]; do
           sleep 0.2; i=$((i+1)); [ $i -lt 600 ] || {{ echo 'size never changed'; exit 1; }}
         done
         echo E2E-SIZE $(cat /sys/block/vda/size)
         [ \"$(cat /sys/block/vda/size)\" = {new_sectors} ] || {{ echo 'wrong new size'; exit 1; }}
         fio --name=tail --filename=$DEV --direct=1 --ioengine=libaio --rw=write --bs=64k \\
           --offset={DISK_SIZE} --size={tail} --verify=crc32c --verify_fatal=1 \\
           --output-format=terse >/tmp/tail.out 2>&1 || {{ cat /tmp/tail.out; exit 1; }}
         wait $bg || {{ cat /tmp/bg.out; exit 1; }}
         if dmesg | grep -i 'I/O error'; then exit 1; fi
"
    );
    let mut daemon = start_backend(Backend::Daemon, &case_c, None, &image, &socket, &log, false);
    let answer = std::thread::scope(|scope| {
        let guest = scope.spawn(|| boot_guest(&kernel, &initrd, &socket, &script));
        let answer = if wait_for_log(&log, "queue 1 started", 1, Duration::from_secs(120)) {
            std::thread::sleep(Duration::from_millis(3000));
            let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"))
                .arg("control")
                .arg(&control)
                .arg("resize")
                .arg(new_size.to_string())
                .output()
                .expect("spawn control");
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        } else {
            "the guest never started its queues".to_owned()
        };
        (guest.join().expect("guest thread"), answer)
    });
    let (run, answer) = answer;
    let run = run.unwrap_or_else(|e| panic!("guest: {e}\n{}", file_tail(&log, 30)));
    let report = parse_report(&run.serial);
    if !run.status.success() || !report.passed {
        let start = run.serial.len().saturating_sub(60);
        panic!(
            "guest failed (QEMU {}); control said: {answer}\nserial log tail:\n{}\n--- daemon:\n{}",
            run.status,
            run.serial[start..].join("\n"),
            file_tail(&log, 30)
        );
    }
    assert!(
        answer.contains("\"guest-notified\": true"),
        "control resize answer: {answer}"
    );
    daemon.signal(libc::SIGTERM);
    let _ = daemon.wait_timeout(Duration::from_secs(10));
    let mut info = Command::new("qemu-img");
    info.arg("info")
        .args(case.object_args())
        .arg("--output=json")
        .arg("--image-opts")
        .arg(case.image_opts(&image));
    let text = run_checked(&mut info);
    assert!(
        text.contains(&format!("\"virtual-size\": {new_size}")),
        "qemu-img info does not show {new_size} bytes:\n{text}"
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
        "live resize {}: guest saw {new_sectors} sectors, done in {:.1} s",
        case.name, run.secs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_merges_and_overrides() {
        let base = [Fill::new(0, 10 * MIB, 1), Fill::new(20 * MIB, MIB, 2)];
        let got = layout(
            Some(&base),
            &[(5 * MIB, MIB, Some(1)), (8 * MIB, 4 * MIB, None)],
        );
        let r = |o: u64, l: u64, b: Option<u8>| Region {
            offset: o * MIB,
            len: l * MIB,
            byte: b,
        };
        assert_eq!(
            got,
            vec![
                r(0, 8, Some(1)),
                r(8, 4, None),
                r(12, 8, Some(0)),
                r(20, 1, Some(2)),
                r(21, 256 - 21, Some(0)),
            ]
        );
        assert_eq!(
            expected_bytes(&got, 19 * MIB, 2 * MIB).expect("fixed")[1 << 20],
            2
        );
        assert_eq!(expected_bytes(&got, 7 * MIB, 2 * MIB), None);
        let unknown = layout(None, &[(MIB, MIB, Some(7))]);
        assert_eq!(
            unknown,
            vec![r(0, 1, None), r(1, 1, Some(7)), r(2, 254, None)]
        );
    }
}
