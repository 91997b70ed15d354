//! Images in Ceph RBD, against a real throwaway cluster (scripts/ceph-cluster: one monitor, one
//! memstore OSD, auth none, 127.0.0.1 only), started once for this test binary and stopped at
//! exit. QEMU's own rbd driver (qemu-img, qemu-io) is the oracle; libblkio is the client.
//!
//! Set VUQ_SKIP_RBD=1 to skip these tests where Ceph is not installed (CI installs it).

// Test patterns truncate small counters to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

mod common;
#[allow(dead_code)] // the RBD test uses part of the rig
#[path = "guest/rig.rs"]
mod rig;
#[allow(dead_code)]
#[path = "guest/vm.rs"]
mod vm;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use common::{spawn_serve, Daemon, BIN};

const MIB: u64 = 1 << 20;
const PASS: &str = "rbd-test-passphrase";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ceph-cluster");

// ---------------------------------------------------------------------------------------------
// The cluster

struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

/// Clusters to stop at exit.
static STARTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Tests that stop the OSD take this for writing, every other test for reading.
static OSD_GATE: RwLock<()> = RwLock::new(());

extern "C" fn stop_clusters() {
    let dirs = STARTED.lock().map(|l| l.clone()).unwrap_or_default();
    for d in dirs {
        stop_cluster(&d);
    }
}

fn stop_cluster(dir: &Path) {
    let _ = Command::new(SCRIPT)
        .arg("stop")
        .arg(dir)
        .stdout(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(dir);
}

fn skip() -> bool {
    std::env::var("VUQ_SKIP_RBD").as_deref() == Ok("1")
}

fn start_cluster(bluestore: bool) -> Cluster {
    for tool in ["ceph-mon", "ceph-osd", "ceph", "rbd", "qemu-img", "qemu-io"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .expect("sh")
                .success(),
            "{tool} not found: run .ci/run (ceph-mon ceph-osd ceph-common qemu-block-extra) \
             or set VUQ_SKIP_RBD=1"
        );
    }
    // /tmp, not /dev/shm: bluestore wants O_DIRECT.
    let dir = tempfile::Builder::new()
        .prefix("vuq-ceph-")
        .tempdir_in("/tmp")
        .expect("tempdir")
        .keep();
    {
        let mut l = STARTED.lock().expect("cluster list");
        if l.is_empty() {
            // SAFETY: registers a plain extern "C" function.
            assert_eq!(unsafe { libc::atexit(stop_clusters) }, 0);
        }
        l.push(dir.clone());
    }
    let mut cmd = Command::new(SCRIPT);
    cmd.arg("start").arg(&dir);
    if bluestore {
        cmd.arg("--bluestore");
    }
    let out = cmd.output().expect("run scripts/ceph-cluster");
    assert!(
        out.status.success(),
        "cluster start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = dir.join("ceph.conf");
    Cluster { dir, conf }
}

/// The memstore cluster shared by this binary's tests (None when skipped).
fn cluster() -> Option<&'static Cluster> {
    static C: OnceLock<Cluster> = OnceLock::new();
    if skip() {
        eprintln!("SKIPPED: VUQ_SKIP_RBD=1");
        return None;
    }
    Some(C.get_or_init(|| start_cluster(false)))
}

/// The shared cluster and a read hold on the OSD gate.
fn shared() -> Option<(&'static Cluster, RwLockReadGuard<'static, ()>)> {
    let c = cluster()?;
    Some((c, OSD_GATE.read().unwrap_or_else(|e| e.into_inner())))
}

impl Cluster {
    fn name(&self, image: &str) -> String {
        format!("rbd:rbd/{image}:conf={}", self.conf.display())
    }

    /// `--image-opts` for QEMU's rbd driver under `format_opts` (e.g. `driver=raw`).
    fn image_opts(&self, format_opts: &str, image: &str) -> String {
        format!(
            "{format_opts},file.driver=rbd,file.pool=rbd,file.image={image},file.conf={}",
            self.conf.display()
        )
    }

    fn osd_pid(&self) -> i32 {
        let s = std::fs::read_to_string(self.dir.join("run/osd.0.pid")).expect("osd pid file");
        s.trim().parse().expect("osd pid")
    }
}

// ---------------------------------------------------------------------------------------------
// Tools

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn secret_obj() -> String {
    format!("secret,id=sec0,data={PASS}")
}

fn pass_file(dir: &Path) -> PathBuf {
    let p = dir.join("pass");
    std::fs::write(&p, PASS).expect("pass file");
    p
}

/// qemu-io commands on an image (`--image-opts`); output on success.
fn qemu_io(opts: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["--object", &secret_obj(), "--image-opts", opts]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!s.contains("Pattern verification failed"), "{s}");
    assert!(!s.contains("failed:"), "{s}");
    s
}

/// `qemu-img check` of an image given as `--image-opts` (exit 0: no errors, no leaks).
fn qemu_img_check(opts: &str) {
    run(Command::new("qemu-img").args(["check", "--object", &secret_obj(), "--image-opts", opts]));
}

/// An image format on RBD: how qemu-img creates it and how QEMU and the daemon open it.
struct Kind {
    label: &'static str,
    create: &'static [&'static str],
    qemu_opts: &'static str,
    qcow2: bool,
    encrypted: bool,
}

const KINDS: [Kind; 4] = [
    Kind {
        label: "raw",
        create: &["-f", "raw"],
        qemu_opts: "driver=raw",
        qcow2: false,
        encrypted: false,
    },
    Kind {
        label: "qcow2",
        create: &["-f", "qcow2"],
        qemu_opts: "driver=qcow2",
        qcow2: true,
        encrypted: false,
    },
    Kind {
        label: "qcow2-luks",
        create: &[
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ],
        qemu_opts: "driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0",
        qcow2: true,
        encrypted: true,
    },
    Kind {
        label: "luks",
        create: &["-f", "luks", "-o", "key-secret=sec0,iter-time=10"],
        qemu_opts: "driver=luks,key-secret=sec0",
        qcow2: false,
        encrypted: true,
    },
];

// ---------------------------------------------------------------------------------------------
// The daemon and a client

fn serve(image: &str, extra: &[&str]) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vhost.sock");
    let mut args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    if extra.contains(&"--key-secret-file") {
        let i = args
            .iter()
            .position(|a| a == "--key-secret-file")
            .expect("flag")
            + 1;
        args[i] = pass_file(dir.path()).display().to_string();
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn_serve(&sock, Path::new(image), &argv);
    let mut d = Daemon {
        child,
        dir,
        sock,
        image: PathBuf::from(image),
    };
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&d.sock).is_err() {
        if let Some(st) = d.child.try_wait().expect("try_wait") {
            panic!("daemon exited ({st}): {}", daemon_log(&d));
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no socket after 120 s: {}",
            daemon_log(&d)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

fn daemon_log(d: &Daemon) -> String {
    std::fs::read_to_string(d.dir.path().join("daemon.log")).unwrap_or_default()
}

/// Stops the daemon with SIGTERM (it flushes and releases the lock) and checks it exited 0.
fn stop(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(60);
    assert!(st.success(), "daemon exit {st}: {}", daemon_log(&d));
}

struct Client {
    _blkio: Blkio,
    q: Blkioq,
    region: MemoryRegion,
    /// How long one request may take before it counts as failed (-ETIMEDOUT).
    timeout: Duration,
}

impl Client {
    fn connect(d: &Daemon) -> Client {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio");
        blkio
            .set_str("path", d.sock.to_str().expect("utf-8"))
            .expect("path");
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", 1).expect("num-queues");
        let mut out = blkio.start().expect("start");
        let region = blkio.alloc_mem_region(4 * MIB as usize).expect("region");
        blkio.map_mem_region(&region).expect("map");
        let q = out.queues.pop().expect("queue");
        Client {
            _blkio: blkio,
            q,
            region,
            timeout: Duration::from_secs(120),
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping owned by the blkio instance; every request is
        // waited for before the buffer is touched again.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// The request's result, or -ETIMEDOUT if it did not complete in time (a dead daemon).
    fn wait(&mut self) -> i32 {
        let mut c = [MaybeUninit::uninit()];
        let mut left = self.timeout;
        match self.q.do_io(&mut c, 1, Some(&mut left), None) {
            Ok(1) => {}
            _ => return -libc::ETIMEDOUT,
        }
        // SAFETY: do_io initialised the first `n` completions.
        unsafe { c[0].assume_init_read() }.ret
    }

    fn write(&mut self, offset: u64, byte: u8, len: usize) -> i32 {
        self.buf()[..len].fill(byte);
        let p = self.buf().as_ptr();
        self.q.write(offset, p, len, 0, ReqFlags::empty());
        self.wait()
    }

    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let p = self.buf().as_mut_ptr();
        self.q.read(offset, p, len, 0, ReqFlags::empty());
        assert_eq!(self.wait(), 0, "read at {offset}");
        self.buf()[..len].to_vec()
    }

    fn flush(&mut self) -> i32 {
        self.q.flush(0, ReqFlags::empty());
        self.wait()
    }
}

fn key_args(kind: &Kind) -> &'static [&'static str] {
    if kind.encrypted {
        &["--key-secret-file", "PASS"]
    } else {
        &[]
    }
}

// ---------------------------------------------------------------------------------------------
// Interop

/// qemu-img creates each format on RBD and qemu-io writes to it; the daemon serves it on the same
/// rbd: name: the client reads QEMU's data and writes its own, which qemu-io reads back and
/// qemu-img check finds clean.
#[test]
fn qemu_made_images_are_served_and_read_back_by_qemu() {
    let Some((c, _g)) = shared() else { return };
    for kind in &KINDS {
        let image = format!("qemu-{}", kind.label);
        let name = c.name(&image);
        run(Command::new("qemu-img")
            .args(["create", "--object", &secret_obj()])
            .args(kind.create)
            .args([&name, "64M"]));
        let opts = c.image_opts(kind.qemu_opts, &image);
        qemu_io(&opts, &["write -P 0x5a 1M 1M".to_owned()]);

        let d = serve(&name, key_args(kind));
        let mut cl = Client::connect(&d);
        assert!(
            cl.read(MIB, MIB as usize).iter().all(|&b| b == 0x5a),
            "{}: QEMU's data",
            kind.label
        );
        assert_eq!(cl.write(8 * MIB + 4096, 0xc3, 128 * 1024), 0);
        assert_eq!(
            cl.write(63 * MIB, 0x3c, 4096),
            0,
            "{}: last MiB",
            kind.label
        );
        assert_eq!(cl.flush(), 0);
        drop(cl);
        stop(d);

        let out = qemu_io(
            &opts,
            &[
                "read -P 0xc3 8196k 128k".to_owned(),
                "read -P 0x3c 63M 4k".to_owned(),
                "read -P 0x5a 1M 1M".to_owned(),
            ],
        );
        assert_eq!(out.matches("read ").count(), 3, "{}: {out}", kind.label);
        if kind.label != "luks" {
            // Never written: zeroes (a raw LUKS image decrypts unwritten sectors to noise).
            qemu_io(&opts, &["read -P 0 0 1M".to_owned()]);
        }
        if kind.qcow2 {
            qemu_img_check(&opts);
        }
    }
}

/// Images our `create` makes on RBD open in qemu-img and qemu-io (and check clean).
#[test]
fn images_we_create_on_rbd_open_in_qemu() {
    let Some((c, _g)) = shared() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let pass = pass_file(dir.path());
    let pass = pass.to_str().expect("utf-8");
    let cases: [(&str, &[&str], &str, bool); 4] = [
        ("ours-raw", &["-f", "raw"], "driver=raw", false),
        ("ours-qcow2", &["-f", "qcow2"], "driver=qcow2", true),
        (
            "ours-qcow2-luks",
            &["-f", "qcow2", "--encrypt", "luks", "--iter-time", "10"],
            "driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0",
            true,
        ),
        (
            "ours-luks",
            &["-f", "raw", "--encrypt", "luks", "--iter-time", "10"],
            "driver=luks,key-secret=sec0",
            false,
        ),
    ];
    for (image, args, opts, qcow2) in cases {
        let name = c.name(image);
        run(Command::new(BIN)
            .arg("create")
            .args(args)
            .args(["--key-secret-file", pass])
            .args([&name, "32M"]));
        let info = run(Command::new("qemu-img").args([
            "info",
            "--object",
            &secret_obj(),
            "--image-opts",
            &c.image_opts(opts, image),
        ]));
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains("virtual size: 32 MiB"), "{image}: {info}");
        let o = c.image_opts(opts, image);
        qemu_io(
            &o,
            &[
                "write -P 0x77 0 64k".to_owned(),
                "read -P 0x77 0 64k".to_owned(),
            ],
        );
        qemu_io(&o, &["read -P 0x77 0 64k".to_owned()]);
        if qcow2 {
            qemu_img_check(&o);
        }
        // And our own tools read the same name.
        let out = run(Command::new(BIN).args(["info", &name]));
        assert!(String::from_utf8_lossy(&out.stdout).contains("virtual size: 32 MiB"));
    }
}

/// `rbd encryption format` measures PBKDF2 for 2 s of OpenSSL time (~2M iterations), which an
/// unoptimised test build takes minutes to repeat. cryptsetup (itself a reference reader of the
/// header) re-keys the slot with 1000 iterations; the header stays rbd's otherwise (cipher,
/// master key, payload offset), and librbd still opens it below.
fn cheapen_keyslot(c: &Cluster, image: &str, dir: &Path, pass: &Path) {
    let hdr = dir.join("hdr");
    run(Command::new("rbd")
        .arg("-c")
        .arg(&c.conf)
        .args(["export", image])
        .arg(&hdr));
    run(Command::new("cryptsetup")
        .args([
            "luksChangeKey",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
        ])
        .arg("--key-file")
        .arg(pass)
        .arg(&hdr)
        .arg(pass));
    let f = std::fs::File::options()
        .write(true)
        .open(&hdr)
        .expect("header copy");
    f.set_len(4 * MIB).expect("truncate");
    qemu_io(
        &c.image_opts("driver=raw", image),
        &[format!("write -s {} 0 4M", hdr.display())],
    );
}

/// An image formatted with RBD's own client-side encryption (`rbd encryption format ... luks1`)
/// is a raw LUKS1 image to us: data written through librbd's encryption (QEMU's rbd driver with
/// `encrypt.format=luks`) reads back through the daemon, and the daemon's writes read back
/// through librbd's encryption.
#[test]
fn rbd_client_side_encryption_interop_both_ways() {
    let Some((c, _g)) = shared() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let pass = pass_file(dir.path());
    run(Command::new("rbd")
        .arg("-c")
        .arg(&c.conf)
        .args(["create", "--size", "64M", "rbdenc"]));
    run(Command::new("rbd")
        .arg("-c")
        .arg(&c.conf)
        .args(["encryption", "format", "rbdenc", "luks1"])
        .arg(&pass));
    cheapen_keyslot(c, "rbdenc", dir.path(), &pass);
    let librbd_opts = format!(
        "driver=rbd,pool=rbd,image=rbdenc,conf={},encrypt.format=luks,encrypt.key-secret=sec0",
        c.conf.display()
    );
    qemu_io(&librbd_opts, &["write -P 0x21 0 1M".to_owned()]);

    let name = c.name("rbdenc");
    let out = run(Command::new(BIN).args(["info", &name]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("file format: luks"),
        "rbd encryption format makes a LUKS image"
    );
    let d = serve(&name, &["--key-secret-file", "PASS"]);
    let mut cl = Client::connect(&d);
    assert!(cl.read(0, MIB as usize).iter().all(|&b| b == 0x21));
    assert_eq!(cl.write(2 * MIB, 0x42, 256 * 1024), 0);
    assert_eq!(cl.flush(), 0);
    drop(cl);
    stop(d);
    qemu_io(
        &librbd_opts,
        &[
            "read -P 0x42 2M 256k".to_owned(),
            "read -P 0x21 0 1M".to_owned(),
        ],
    );
    // The ciphertext is what reaches the cluster: QEMU's raw view does not show the pattern.
    let raw = c.image_opts("driver=raw", "rbdenc");
    let out = Command::new("qemu-io")
        .args(["--image-opts", &raw, "-c", "read -P 0x42 6M 256k"])
        .output()
        .expect("qemu-io");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
}

// ---------------------------------------------------------------------------------------------
// Ownership

/// While the daemon writes an image, a second daemon is refused with a clear message and QEMU's
/// writes fail; once the daemon has exited, the image is free again.
#[test]
fn a_second_writer_is_refused_while_the_daemon_serves() {
    let Some((c, _g)) = shared() else { return };
    let name = c.name("owned");
    run(Command::new("qemu-img").args(["create", "-f", "raw", &name, "16M"]));
    let d = serve(&name, &[]);

    let out = Command::new(BIN)
        .args(["serve", "--socket-path"])
        .arg(d.dir.path().join("second.sock"))
        .args(["--image", &name])
        .output()
        .expect("second daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is being written by client") && err.contains("refusing"),
        "{err}"
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &name])
        .output()
        .expect("qemu-io");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("Read-only file system"), "QEMU write: {all}");
    // Readers are not writers: a read-only open still works.
    run(Command::new(BIN).args(["info", &name]));

    stop(d);
    let d = serve(&name, &[]);
    stop(d);
    qemu_io(
        &c.image_opts("driver=raw", "owned"),
        &["write -P 2 0 4k".to_owned(), "read -P 2 0 4k".to_owned()],
    );
}

// ---------------------------------------------------------------------------------------------
// Faults

/// An OSD that stops answering (SIGSTOP) while the client writes: the writes stall, resume after
/// SIGCONT without errors, and every acknowledged write reads back.
#[test]
fn osd_stopped_then_continued_stalls_and_loses_nothing() {
    let Some(c) = cluster() else { return };
    let _g = OSD_GATE.write().unwrap_or_else(|e| e.into_inner());
    let name = c.name("sigstop");
    run(Command::new("qemu-img").args(["create", "-f", "raw", &name, "64M"]));
    let d = serve(&name, &[]);
    let mut cl = Client::connect(&d);
    let pid = c.osd_pid();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill() on the OSD's pid from its pid file.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        std::thread::sleep(Duration::from_secs(3));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    });
    // Writes cycle over 480 slots of 128 KiB for 6 s; each slot remembers its last byte.
    const SLOTS: u64 = 480;
    let mut last = [0u8; SLOTS as usize];
    let (mut longest, mut acked) = (Duration::ZERO, 0u64);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        let slot = acked % SLOTS;
        let byte = (acked % 251) as u8 + 1;
        let t = Instant::now();
        assert_eq!(
            cl.write(slot * 128 * 1024, byte, 128 * 1024),
            0,
            "write {acked}"
        );
        longest = longest.max(t.elapsed());
        last[slot as usize] = byte;
        acked += 1;
    }
    stopper.join().expect("stopper");
    assert_eq!(cl.flush(), 0);
    assert!(
        longest >= Duration::from_secs(2),
        "no write stalled while the OSD was stopped (longest {longest:?}, {acked} writes)"
    );
    for (slot, &byte) in last.iter().enumerate() {
        let got = cl.read(slot as u64 * 128 * 1024, 128 * 1024);
        assert!(got.iter().all(|&b| b == byte), "slot {slot}");
    }
    drop(cl);
    stop(d);
}

/// An OSD restart on a persistent store (bluestore on a file) while a qcow2 image is written:
/// I/O waits for the OSD to come back, nothing acknowledged is lost, the image checks clean.
#[test]
fn osd_restart_on_bluestore_resumes_without_loss() {
    if skip() {
        return;
    }
    let c = start_cluster(true);
    let name = c.name("restart");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", &name, "64M"]));
    let d = serve(&name, &[]);
    let mut cl = Client::connect(&d);
    for i in 0..64u64 {
        assert_eq!(cl.write(i * 256 * 1024, i as u8 + 1, 64 * 1024), 0);
    }
    assert_eq!(cl.flush(), 0);
    let conf_dir = c.dir.clone();
    let restarter = std::thread::spawn(move || {
        run(Command::new(SCRIPT).arg("restart-osd").arg(&conf_dir));
    });
    // Writes issued while the OSD is down wait for it.
    for i in 64..128u64 {
        assert_eq!(cl.write(i * 256 * 1024, i as u8 + 1, 64 * 1024), 0);
    }
    restarter.join().expect("restart");
    assert_eq!(cl.flush(), 0);
    for i in 0..128u64 {
        let got = cl.read(i * 256 * 1024, 64 * 1024);
        assert!(got.iter().all(|&b| b == i as u8 + 1), "write {i}");
    }
    drop(cl);
    stop(d);
    qemu_img_check(&c.image_opts("driver=qcow2", "restart"));
    qemu_io(
        &c.image_opts("driver=qcow2", "restart"),
        &[format!("read -P 128 {} 64k", 127 * 256 * 1024)],
    );
    stop_cluster(&c.dir);
}

/// The daemon SIGKILLed while a client writes a qcow2 image: qemu-img check finds no corruption,
/// every write flushed before the kill reads back, and a new daemon can take the image over once
/// the cluster has noticed the old one is gone.
#[test]
fn daemon_killed_under_load_leaves_a_consistent_image() {
    let Some((c, _g)) = shared() else { return };
    let name = c.name("killed");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", &name, "64M"]));
    let mut d = serve(&name, &[]);
    let mut cl = Client::connect(&d);
    cl.timeout = Duration::from_secs(5);
    for i in 0..16u64 {
        assert_eq!(cl.write(i * MIB, 0xa0 + i as u8, 64 * 1024), 0);
    }
    assert_eq!(cl.flush(), 0);
    let pid = i32::try_from(d.child.id()).expect("pid");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: kill() on our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    // Writes to fresh clusters (allocations) until the daemon dies under them.
    for i in 16..4096u64 {
        let off = (i % 63) * MIB + (i / 63) * 4096 + 512 * 1024;
        if cl.write(off, 0x11, 4096) != 0 {
            break;
        }
    }
    killer.join().expect("killer");
    let _ = d.child.wait();
    drop(cl);
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", &name])
        .output()
        .expect("qemu-img check");
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check after SIGKILL: {code:?} {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let opts = c.image_opts("driver=qcow2", "killed");
    let cmds: Vec<String> = (0..16u64)
        .map(|i| format!("read -P {} {} 64k", 0xa0 + i, i * MIB))
        .collect();
    qemu_io(&opts, &cmds);
    // The dead daemon still owns the lock until its watch times out; then we take over.
    let t = Instant::now();
    loop {
        let out = Command::new(BIN)
            .args(["check", "-r", "leaks", &name])
            .output()
            .expect("check");
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is being written by"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(90), "lock never freed");
        std::thread::sleep(Duration::from_secs(2));
    }
    qemu_img_check(&c.image_opts("driver=qcow2", "killed"));
}

/// Monitors that do not answer: a clear error within the connect bound, no socket left behind.
#[test]
fn unreachable_cluster_fails_clearly_within_the_bound() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\n\
             [client]\nadmin socket =\nlog file = /dev/null\n"
        ),
    )
    .expect("conf");
    let sock = dir.path().join("vhost.sock");
    let name = format!("rbd:rbd/x:conf={}:client_mount_timeout=3", conf.display());
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["serve", "--socket-path"])
        .arg(&sock)
        .args(["--image", &name])
        .output()
        .expect("serve");
    let took = t.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to the Ceph cluster") && err.contains("at most 3 s"),
        "{err}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(!sock.exists(), "socket left behind");
}

/// A pool or image that does not exist: a clear error naming it.
#[test]
fn wrong_pool_or_image_fails_clearly() {
    let Some((c, _g)) = shared() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, want) in [
        (
            format!("rbd:nopool/x:conf={}", c.conf.display()),
            "pool nopool does not exist",
        ),
        (c.name("missing"), "image rbd/missing does not exist"),
        ("rbd:justapool".to_owned(), "a pool name is needed"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--socket-path"])
            .arg(dir.path().join("s.sock"))
            .args(["--image", &name])
            .output()
            .expect("serve");
        assert!(!out.status.success(), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{name}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// A real guest

/// A QEMU guest (TCG) runs fio with crc32c verify on both queues against a qcow2 image in RBD
/// served by the daemon; afterwards qemu-io reads the guest's data back on the same rbd: name and
/// `qemu-img check` is clean (the e2e rig, docs/testing.md; `VUQ_SKIP_E2E=1` skips it).
#[test]
fn guest_fio_verify_on_an_rbd_qcow2_image_via_daemon() {
    let Some((c, _g)) = shared() else { return };
    let mut case = rig::ImageCase::qcow2();
    case.name = "rbd-qcow2";
    case.location = Some(PathBuf::from(c.name("guest-qcow2")));
    rig::run_guest_fio(&case, rig::Backend::Daemon);
}
