//! Native vhost-user-blk throughput: our daemon against qemu-storage-daemon, same client, same
//! image file, same number of queues, back to back.
//!
//! The client is libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate) in this process:
//! no guest, no TCG, so the figures are about the backends. For every image type and workload
//! each repetition measures both backends one after the other (alternating which goes first),
//! starting each backend fresh on a socket in /dev/shm; the table shows medians.
//!
//! Run: `cargo bench --bench vhost_blk` (builds the daemon in the bench profile, i.e. release).
//! Options after `--`: `--secs S` per measurement (default 2), `--warmup S` (0.3), `--reps N` (3),
//! `--size-mib M` image size (512), `--only SUBSTR` (image or workload name filter, repeatable),
//! `--qsd-aio io_uring|threads` (default io_uring when qemu-storage-daemon accepts it),
//! `--mode NAME` (repeatable: base, io_uring, poll50, direct, direct+uring; default all),
//! `--svg PATH` (the chart; default docs/benchmarks-daemon.svg, empty for none).
//!
//! Modes: `base` is both backends through the page cache on /dev/shm (ours with its defaults);
//! `io_uring` and `poll50` add `--aio io_uring` / `--poll-us 50` to ours; `direct` and
//! `direct+uring` put the image on /tmp (disk) and run ours with `--direct` and qsd with
//! `cache.direct=on,aio=io_uring`. Columns add CPU µs per I/O (user + system of all the backend's
//! threads from /proc over the run, divided by the requests it completed) and p50 latency.
//! See docs/benchmarks-daemon.md.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, ReqFlags};

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");
const MIB: u64 = 1 << 20;
const PASSPHRASE: &str = "bench-passphrase";

struct Opts {
    secs: f64,
    warmup: f64,
    reps: usize,
    size: u64,
    only: Vec<String>,
    qsd_aio: String,
    /// Where the chart goes (empty: no chart).
    svg: String,
    /// Run only the modes whose name contains one of these (empty: all).
    modes: Vec<String>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        secs: 2.0,
        warmup: 0.3,
        reps: 3,
        size: 512 * MIB,
        only: Vec::new(),
        qsd_aio: String::new(),
        svg: format!("{}/docs/benchmarks-daemon.svg", env!("CARGO_MANIFEST_DIR")),
        modes: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--secs" => o.secs = val().parse().expect("--secs"),
            "--warmup" => o.warmup = val().parse().expect("--warmup"),
            "--reps" => o.reps = val().parse().expect("--reps"),
            "--size-mib" => o.size = val().parse::<u64>().expect("--size-mib") * MIB,
            "--only" => o.only.push(val()),
            "--qsd-aio" => o.qsd_aio = val(),
            "--svg" => o.svg = val(),
            "--mode" => o.modes.push(val()),
            // cargo bench passes --bench; libtest-style filters are not supported.
            "--bench" => {}
            other => panic!("unknown option {other:?} (see the header of benches/vhost_blk.rs)"),
        }
    }
    o
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Raw,
    Qcow2,
    Qcow2Luks,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Qcow2 => "qcow2",
            Kind::Qcow2Luks => "qcow2+luks",
        }
    }

    /// `--blockdev` / `--image-opts` format options (without the file child).
    fn format_opts(self) -> &'static str {
        match self {
            Kind::Raw => "driver=raw",
            Kind::Qcow2 => "driver=qcow2",
            Kind::Qcow2Luks => "driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0",
        }
    }

    fn objects(self) -> Vec<String> {
        match self {
            Kind::Qcow2Luks => vec![
                "--object".to_owned(),
                format!("secret,id=sec0,data={PASSPHRASE}"),
            ],
            _ => Vec::new(),
        }
    }
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    bs: usize,
    random: bool,
    write: bool,
    queues: usize,
    /// Requests in flight per queue.
    depth: usize,
}

const QD1: Workload = Workload {
    name: "randread 4k qd1 1q",
    bs: 4096,
    random: true,
    write: false,
    queues: 1,
    depth: 1,
};

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "randread 4k qd32 1q",
        bs: 4096,
        random: true,
        write: false,
        queues: 1,
        depth: 32,
    },
    Workload {
        name: "randwrite 4k qd32 1q",
        bs: 4096,
        random: true,
        write: true,
        queues: 1,
        depth: 32,
    },
    Workload {
        name: "randread 4k qd32x2 2q",
        bs: 4096,
        random: true,
        write: false,
        queues: 2,
        depth: 32,
    },
    Workload {
        name: "randwrite 4k qd32x2 2q",
        bs: 4096,
        random: true,
        write: true,
        queues: 2,
        depth: 32,
    },
    Workload {
        name: "read 128k seq qd32 1q",
        bs: 131_072,
        random: false,
        write: false,
        queues: 1,
        depth: 32,
    },
    Workload {
        name: "write 128k seq qd32 1q",
        bs: 131_072,
        random: false,
        write: true,
        queues: 1,
        depth: 32,
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Ours,
    Qsd,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Creates the image and writes all of it once (so qcow2 clusters are allocated and reads
/// return data, not holes).
fn make_image(kind: Kind, path: &Path, size: u64) {
    let mut create = Command::new("qemu-img");
    create.args(["create", "-q"]).args(kind.objects());
    match kind {
        Kind::Raw => create.args(["-f", "raw"]),
        Kind::Qcow2 => create.args(["-f", "qcow2"]),
        Kind::Qcow2Luks => create.args([
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts",
        ]),
    };
    run(create.arg(path).arg(size.to_string()));
    let mut io = Command::new("qemu-io");
    io.args(kind.objects()).arg("--image-opts").arg(format!(
        "{},file.driver=file,file.filename={}",
        kind.format_opts(),
        path.display()
    ));
    let chunk = 64 * MIB;
    let mut off = 0;
    while off < size {
        let len = chunk.min(size - off);
        io.arg("-c").arg(format!("write -q -P 0x55 {off} {len}"));
        off += len;
    }
    run(&mut io);
}

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    /// CPU seconds (user + system, all threads) the backend used so far.
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|x| x.parse().ok())
            .collect();
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        f.iter().sum::<u64>() as f64 / hz as f64
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own unreaped child; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[allow(clippy::too_many_arguments)]
fn start(
    backend: Backend,
    kind: Kind,
    image: &Path,
    key_file: &Path,
    queues: usize,
    qsd_aio: &str,
    dir: &Path,
    mode: &Mode,
) -> Server {
    let socket = dir.join("bench.sock");
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::File::create(dir.join(format!("{backend:?}.log"))).expect("log");
    let mut cmd = match backend {
        Backend::Ours => {
            let mut c = Command::new(DAEMON);
            c.arg("serve")
                .arg("--socket-path")
                .arg(&socket)
                .arg("--image")
                .arg(image)
                .arg("--num-queues")
                .arg(queues.to_string())
                .args(mode.ours)
                .env("RUST_LOG", "warn");
            if kind == Kind::Qcow2Luks {
                c.arg("--key-secret-file").arg(key_file);
            }
            c
        }
        Backend::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.args(kind.objects())
                .args(["--object", "iothread,id=io0"])
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=f,cache.direct={},aio={}",
                    image.display(),
                    if mode.direct { "on" } else { "off" },
                    // QEMU's production setting for O_DIRECT is aio=io_uring (or native).
                    if mode.direct { "io_uring" } else { qsd_aio }
                ))
                .arg("--blockdev")
                .arg(format!("{},file=f,node-name=d", kind.format_opts()))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues={queues},iothread=io0",
                    socket.display()
                ));
            c
        }
    };
    let err = log.try_clone().expect("log fd");
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "{backend:?} exited ({s}) before listening; log:\n{}",
                std::fs::read_to_string(dir.join(format!("{backend:?}.log"))).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{backend:?} did not listen in 20 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Server { child, socket }
}

/// Requests completed and bytes moved inside the measurement window, per queue.
#[derive(Default, Clone)]
struct Count {
    ops: u64,
    bytes: u64,
    /// Every completion, inside the window or not (for CPU per I/O, whose clock is the run's).
    all_ops: u64,
}

/// Keeps `depth` requests in flight on `q` until `stop`, counting completions between `from`
/// and `to`. Buffers: `depth` slots of `bs` bytes at `buf`.
#[allow(clippy::too_many_arguments)]
fn drive(
    mut q: Blkioq,
    wl: Workload,
    buf: usize,
    span: (u64, u64),
    seed: u64,
    from: Instant,
    to: Instant,
    lat: &mut Vec<u32>,
) -> Count {
    let bs = wl.bs as u64;
    let (base, len) = span;
    let blocks = len / bs;
    let mut rng = seed | 1;
    let mut cursor = 0u64;
    let mut next_offset = || {
        let block = if wl.random {
            // xorshift64
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            let b = cursor;
            cursor = (cursor + 1) % blocks;
            b
        };
        base + block * bs
    };
    let submit = |q: &mut Blkioq, slot: usize, offset: u64| {
        let p = buf + slot * wl.bs;
        if wl.write {
            q.write(offset, p as *const u8, wl.bs, slot, ReqFlags::empty());
        } else {
            q.read(offset, p as *mut u8, wl.bs, slot, ReqFlags::empty());
        }
    };
    let mut issued = vec![Instant::now(); wl.depth];
    for (slot, t) in issued.iter_mut().enumerate() {
        *t = Instant::now();
        submit(&mut q, slot, next_offset());
    }
    let mut inflight = wl.depth;
    let mut count = Count::default();
    let mut done: Vec<MaybeUninit<blkio::Completion>> =
        (0..wl.depth).map(|_| MaybeUninit::uninit()).collect();
    while inflight > 0 {
        let n = q.do_io(&mut done, 1, None, None).expect("do_io");
        let now = Instant::now();
        inflight -= n;
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "request failed: {}", c.ret);
            count.all_ops += 1;
            if now >= from && now < to {
                let ns = now.duration_since(issued[c.user_data]).as_nanos();
                lat.push(u32::try_from(ns).unwrap_or(u32::MAX));
            }
            if !wl.write {
                // Every read must have moved data: each 4 KiB block of the image holds 0x55 (the
                // fill) or 0x33 (our writes); the slot was poisoned with 0xaa before submission.
                let p = (buf + c.user_data * wl.bs) as *mut u8;
                // SAFETY: the slot lies inside the mapped region this thread owns, and its request
                // has completed, so nobody writes it now.
                let slot = unsafe { std::slice::from_raw_parts_mut(p, wl.bs) };
                for block in slot.chunks_mut(4096) {
                    let (first, last) = (block[0], block[block.len() - 1]);
                    assert!(
                        (first == 0x55 || first == 0x33) && last == first,
                        "read returned {first:#04x}..{last:#04x}, not the image's data"
                    );
                    block[0] = 0xaa;
                    let n = block.len();
                    block[n - 1] = 0xaa;
                }
            }
            if now >= from && now < to {
                count.ops += 1;
                count.bytes += bs;
            }
            if now < to {
                issued[c.user_data] = Instant::now();
                submit(&mut q, c.user_data, next_offset());
                inflight += 1;
            }
        }
    }
    count
}

/// What one run measured.
struct Measured {
    iops: f64,
    mbs: f64,
    /// Every request completed during the run (warm-up included).
    all_ops: u64,
    /// Median request latency in the window, microseconds.
    p50_us: f64,
}

/// Connects to `socket`, runs `wl` for `warmup + secs`; IOPS and MB/s over the last `secs`.
fn measure(socket: &Path, wl: Workload, warmup: f64, secs: f64) -> Measured {
    // The socket file appears at bind(), a moment before listen(): retry a refused connect.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut blkio = loop {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio");
        blkio
            .set_str("path", socket.to_str().expect("utf-8"))
            .expect("path");
        match blkio.connect() {
            Ok(()) => break blkio,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connect {}: {e:?}", socket.display()),
        }
    };
    blkio
        .set_i32("num-queues", i32::try_from(wl.queues).expect("queues"))
        .expect("num-queues");
    let out = blkio.start().expect("start");
    let capacity = blkio.get_u64("capacity").expect("capacity");
    let per_queue = wl.depth * wl.bs;
    let region = blkio
        .alloc_mem_region(per_queue * wl.queues)
        .expect("alloc region");
    blkio.map_mem_region(&region).expect("map region");
    // Write workloads write 0x33; read workloads start from poisoned buffers (see `drive`).
    let fill = if wl.write { 0x33 } else { 0xaa };
    // SAFETY: the region is a live mapping of `len` bytes owned by `blkio`.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, fill, region.len) };

    let barrier = Arc::new(Barrier::new(wl.queues));
    let span = capacity / wl.queues as u64;
    let threads: Vec<_> = out
        .queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let barrier = Arc::clone(&barrier);
            let buf = region.addr + i * per_queue;
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let from = start + Duration::from_secs_f64(warmup);
                let to = from + Duration::from_secs_f64(secs);
                let seed = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(i as u64 + 1);
                // Sequential: each queue streams through its own slice of the disk.
                let slice = if wl.random {
                    (0, capacity)
                } else {
                    (i as u64 * span, span)
                };
                let mut lat = Vec::new();
                let c = drive(q, wl, buf, slice, seed, from, to, &mut lat);
                (c, lat)
            })
        })
        .collect();
    let mut total = Count::default();
    let mut lat: Vec<f64> = Vec::new();
    for t in threads {
        let (c, l) = t.join().expect("queue thread");
        total.ops += c.ops;
        total.bytes += c.bytes;
        total.all_ops += c.all_ops;
        lat.extend(l.iter().map(|&ns| f64::from(ns) / 1000.0));
    }
    drop(blkio);
    Measured {
        iops: total.ops as f64 / secs,
        mbs: total.bytes as f64 / secs / 1e6,
        all_ops: total.all_ops,
        p50_us: if lat.is_empty() {
            0.0
        } else {
            median(&mut lat)
        },
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Whether QEMU's block layer here can use io_uring (built in and allowed by the kernel).
fn qsd_accepts_io_uring(dir: &Path) -> bool {
    let img = dir.join("probe.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(MIB))
        .expect("probe image");
    let ok = Command::new("qemu-io")
        .arg("--image-opts")
        .arg(format!(
            "driver=file,filename={},aio=io_uring,cache.direct=off",
            img.display()
        ))
        .args(["-c", "read -q 0 4096"])
        .output()
        .is_ok_and(|o| o.status.success());
    let _ = std::fs::remove_file(&img);
    ok
}

/// How both backends are run for a group of rows.
struct Mode {
    name: &'static str,
    /// Extra arguments for our `serve`.
    ours: &'static [&'static str],
    /// Image on the disk (/tmp) with O_DIRECT on both sides (qsd: cache.direct=on,aio=io_uring),
    /// instead of /dev/shm through the page cache.
    direct: bool,
    /// Image kinds and workloads of this mode (the base mode: all of them).
    kinds: &'static [Kind],
    workloads: &'static [Workload],
}

const ALL_KINDS: [Kind; 3] = [Kind::Raw, Kind::Qcow2, Kind::Qcow2Luks];
const RR32: Workload = WORKLOADS[0];
const RW32: Workload = WORKLOADS[1];
const SEQ128: Workload = WORKLOADS[4];

const MODES: [Mode; 5] = [
    Mode {
        name: "base",
        ours: &[],
        direct: false,
        kinds: &ALL_KINDS,
        workloads: &[
            WORKLOADS[0],
            WORKLOADS[1],
            WORKLOADS[2],
            WORKLOADS[3],
            WORKLOADS[4],
            WORKLOADS[5],
            QD1,
        ],
    },
    Mode {
        name: "io_uring",
        ours: &["--aio", "io_uring"],
        direct: false,
        kinds: &ALL_KINDS,
        workloads: &[RR32, RW32, SEQ128],
    },
    Mode {
        name: "poll50",
        ours: &["--poll-us", "50"],
        direct: false,
        kinds: &[Kind::Raw, Kind::Qcow2],
        workloads: &[QD1],
    },
    Mode {
        name: "direct",
        ours: &["--direct"],
        direct: true,
        kinds: &[Kind::Qcow2, Kind::Qcow2Luks],
        workloads: &[RR32, RW32, SEQ128],
    },
    Mode {
        name: "direct+uring",
        ours: &["--direct", "--aio", "io_uring"],
        direct: true,
        kinds: &[Kind::Qcow2, Kind::Qcow2Luks],
        workloads: &[RR32, RW32],
    },
];

/// One line of the table.
struct Row {
    mode: &'static str,
    kind: Kind,
    wl: &'static str,
    /// [ours, qsd]: IOPS, MB/s, CPU % of a core, CPU µs per I/O, p50 µs.
    v: [[f64; 5]; 2],
}

/// The table as a horizontal bar chart (ours / qsd IOPS per row, log scale), hand-written SVG.
fn write_svg(path: &str, rows: &[Row], caption: &str) {
    let bar_h = 16.0;
    let left = 330.0;
    let width = 900.0;
    let plot_w = width - left - 90.0;
    let top = 50.0;
    let height = top + rows.len() as f64 * (bar_h + 6.0) + 50.0;
    // Log2 scale from 1/4x to 16x.
    let x = |r: f64| left + (r.clamp(0.25, 16.0).log2() + 2.0) / 6.0 * plot_w;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' \
         font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n\
         <text x='10' y='20' font-size='14' font-weight='bold'>vhost-user-qcow2 / qemu-storage-daemon, IOPS ratio (log scale)</text>\n\
         <text x='10' y='38' font-size='11'>{caption}</text>\n"
    );
    for t in [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0] {
        let xx = x(t);
        let stroke = if t == 1.0 { "#000" } else { "#ccc" };
        svg += &format!(
            "<line x1='{xx:.1}' y1='{top}' x2='{xx:.1}' y2='{:.1}' stroke='{stroke}'/>\n\
             <text x='{xx:.1}' y='{:.1}' text-anchor='middle'>{t}x</text>\n",
            height - 40.0,
            height - 26.0
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + i as f64 * (bar_h + 6.0);
        let ratio = r.v[0][0] / r.v[1][0];
        let (x0, x1) = (x(1.0).min(x(ratio)), x(1.0).max(x(ratio)));
        let color = if ratio >= 1.0 { "#2a7" } else { "#c44" };
        svg += &format!(
            "<text x='{:.1}' y='{:.1}' text-anchor='end'>{} {} {}</text>\n\
             <rect x='{x0:.1}' y='{y:.1}' width='{:.1}' height='{bar_h}' fill='{color}'/>\n\
             <text x='{:.1}' y='{:.1}'>{ratio:.2}x</text>\n",
            left - 6.0,
            y + 12.0,
            r.mode,
            r.kind.name(),
            r.wl,
            (x1 - x0).max(1.0),
            x1 + 4.0,
            y + 12.0
        );
    }
    svg += "</svg>\n";
    if let Err(e) = std::fs::write(path, svg) {
        println!("note: cannot write the chart to {path}: {e}");
    } else {
        println!("chart: {path}");
    }
}

fn main() {
    let opts = parse_opts();
    let dir = tempfile::Builder::new()
        .prefix("vuq-bench-")
        .tempdir_in("/dev/shm")
        .expect("temp dir in /dev/shm");
    // O_DIRECT rows need a real file system (tmpfs refuses O_DIRECT).
    let disk_dir = tempfile::Builder::new()
        .prefix("vuq-bench-")
        .tempdir_in("/tmp")
        .expect("temp dir in /tmp");
    let qsd_aio = if opts.qsd_aio.is_empty() {
        if qsd_accepts_io_uring(dir.path()) {
            "io_uring".to_owned()
        } else {
            "threads".to_owned()
        }
    } else {
        opts.qsd_aio.clone()
    };
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, PASSPHRASE).expect("key file");
    let help = run(Command::new(DAEMON).args(["serve", "--help"]));
    let has_luks = help.contains("--key-secret-file");
    if !has_luks {
        println!("qcow2+luks: skipped (this daemon's serve has no --key-secret-file)");
    }
    let selected =
        |s: &str| opts.only.is_empty() || opts.only.iter().any(|o| s.contains(o.as_str()));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "vhost_blk: daemon {DAEMON}\n  vs qemu-storage-daemon (iothread, cache.direct=off, aio={qsd_aio}; direct rows: cache.direct=on, aio=io_uring); \
         image {} MiB in {} (direct rows: {}); {} reps x ({}s warm-up + {}s) per backend, alternating; medians\n  load average at start: {}",
        opts.size / MIB,
        dir.path().display(),
        disk_dir.path().display(),
        opts.reps,
        opts.warmup,
        opts.secs,
        load.trim()
    );
    println!(
        "{:<12} {:<11} {:<23} {:>9} {:>8} {:>5} {:>6} {:>6} {:>9} {:>8} {:>5} {:>6} {:>6} {:>6}",
        "mode",
        "image",
        "workload",
        "ours IOPS",
        "MB/s",
        "CPU%",
        "us/IO",
        "p50us",
        "qsd IOPS",
        "MB/s",
        "CPU%",
        "us/IO",
        "p50us",
        "ratio"
    );
    let t0 = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    for mode in MODES
        .iter()
        .filter(|m| opts.modes.is_empty() || opts.modes.iter().any(|o| m.name == o.as_str()))
    {
        let home = if mode.direct {
            disk_dir.path()
        } else {
            dir.path()
        };
        for &kind in mode.kinds {
            if kind == Kind::Qcow2Luks && !has_luks {
                continue;
            }
            let wls: Vec<Workload> = mode
                .workloads
                .iter()
                .copied()
                .filter(|w| selected(kind.name()) || selected(w.name))
                .collect();
            if wls.is_empty() {
                continue;
            }
            let image = home.join(format!("bench.{}", kind.name()));
            if !image.exists() {
                make_image(kind, &image, opts.size);
            }
            for wl in wls {
                // Per repetition: Measured and CPU seconds, [ours, qsd].
                let mut results: [Vec<[f64; 5]>; 2] = [Vec::new(), Vec::new()];
                for rep in 0..opts.reps {
                    let order = if rep % 2 == 0 {
                        [Backend::Ours, Backend::Qsd]
                    } else {
                        [Backend::Qsd, Backend::Ours]
                    };
                    for b in order {
                        let server = start(
                            b,
                            kind,
                            &image,
                            &key_file,
                            wl.queues,
                            &qsd_aio,
                            dir.path(),
                            mode,
                        );
                        let cpu0 = server.cpu_secs();
                        let t = Instant::now();
                        let m = measure(&server.socket, wl, opts.warmup, opts.secs);
                        let cpu = server.cpu_secs() - cpu0;
                        let pct = cpu / t.elapsed().as_secs_f64() * 100.0;
                        let per_io = cpu / (m.all_ops.max(1) as f64) * 1e6;
                        drop(server);
                        results[usize::from(b == Backend::Qsd)]
                            .push([m.iops, m.mbs, pct, per_io, m.p50_us]);
                    }
                }
                let med = |i: usize| -> [f64; 5] {
                    let mut out = [0.0; 5];
                    for (k, o) in out.iter_mut().enumerate() {
                        *o = median(&mut results[i].iter().map(|r| r[k]).collect::<Vec<_>>());
                    }
                    out
                };
                let (o, q) = (med(0), med(1));
                println!(
                    "{:<12} {:<11} {:<23} {:>9.0} {:>8.1} {:>5.0} {:>6.2} {:>6.1} {:>9.0} {:>8.1} {:>5.0} {:>6.2} {:>6.1} {:>6.2}",
                    mode.name, kind.name(), wl.name, o[0], o[1], o[2], o[3], o[4], q[0], q[1], q[2],
                    q[3], q[4], o[0] / q[0]
                );
                rows.push(Row {
                    mode: mode.name,
                    kind,
                    wl: wl.name,
                    v: [o, q],
                });
            }
            let _ = std::fs::remove_file(&image);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    println!("total {elapsed:.0} s");
    println!("\nmarkdown:\n");
    println!("| mode | image | workload | ours IOPS | MB/s | CPU µs/IO | p50 µs | qsd IOPS | MB/s | CPU µs/IO | p50 µs | ratio |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let [o, q] = r.v;
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.2} | {:.1} | {:.0} | {:.1} | {:.2} | {:.1} | {:.2} |",
            r.mode, r.kind.name(), r.wl, o[0], o[1], o[3], o[4], q[0], q[1], q[3], q[4], o[0] / q[0]
        );
    }
    if !opts.svg.is_empty() && !rows.is_empty() {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_default();
        let caption = format!(
            "{cpu}, {} CPUs, load average at start {}; medians of {} back-to-back runs; green: ours faster",
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            load.split_whitespace().next().unwrap_or("?"),
            opts.reps
        );
        write_svg(&opts.svg, &rows, &caption);
    }
}
