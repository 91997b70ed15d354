//! Does one queue's allocating writer stall another queue's reads? (issue 14)
//!
//! Two queues on one qcow2+LUKS image (8 GiB, in /dev/shm): queue 1 does 4 KiB random reads at
//! depth 16 of data allocated beforehand; queue 0 writes fresh 64 KiB clusters (sequentially
//! through never-written space) at depth 1, or 16, with a flush after every 32 writes. The
//! figure is queue 1's IOPS with the writer running against its IOPS alone, for our daemon and
//! for qemu-storage-daemon, back to back on copies of the same image, alternating which goes
//! first; medians of `--reps` repetitions (the percentage: the median of each repetition's
//! ratio, alone and with the writer measured on the same server one after the other).
//!
//! Run: `cargo bench --bench qcow2_concurrency` (builds the daemon in the bench profile).
//! Options after `--`: `--secs S` per measurement (default 3), `--warmup S` (0.5), `--reps N`
//! (3), `--prefill-mib M` allocated region the reader reads (256). See docs/benchmarks-daemon.md.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, ReqFlags};

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");
const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 << 30;
const PASSPHRASE: &str = "bench-passphrase";
const READ_BS: usize = 4096;
const READ_DEPTH: usize = 16;
const WRITE_BS: usize = 65536;
const FLUSH_EVERY: u64 = 32;

struct Opts {
    secs: f64,
    warmup: f64,
    reps: usize,
    prefill: u64,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        secs: 3.0,
        warmup: 0.5,
        reps: 3,
        prefill: 256 * MIB,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--secs" => o.secs = val().parse().expect("--secs"),
            "--warmup" => o.warmup = val().parse().expect("--warmup"),
            "--reps" => o.reps = val().parse().expect("--reps"),
            "--prefill-mib" => o.prefill = val().parse::<u64>().expect("--prefill-mib") * MIB,
            "--bench" => {}
            other => panic!("unknown option {other:?} (see the header of this file)"),
        }
    }
    o
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Ours,
    Qsd,
}

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own unreaped child; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
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

/// Whether QEMU's block layer here accepts aio=io_uring (as benches/vhost_blk.rs decides).
fn qsd_aio(dir: &Path) -> &'static str {
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
    if ok {
        "io_uring"
    } else {
        "threads"
    }
}

fn start(backend: Backend, image: &Path, key: &Path, dir: &Path, aio: &str) -> Server {
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
                .args(["--num-queues", "2", "--key-secret-file"])
                .arg(key)
                .env("RUST_LOG", "warn");
            c
        }
        Backend::Qsd => {
            let mut c = Command::new("qemu-storage-daemon");
            c.args(["--object", &format!("secret,id=sec0,data={PASSPHRASE}")])
                .args(["--object", "iothread,id=io0"])
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=f,cache.direct=off,aio={aio}",
                    image.display()
                ))
                .arg("--blockdev")
                .arg("driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0,file=f,node-name=d")
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues=2,iothread=io0",
                    socket.display()
                ));
            c
        }
    };
    let err = log.try_clone().expect("log fd");
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("{backend:?} exited ({s}) before listening");
        }
        assert!(Instant::now() < deadline, "{backend:?} did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    Server { child, socket }
}

/// Queue 1: 4 KiB random reads at depth 16 within `0..prefill` until `stop`; returns the reads
/// completed between `from` and `to`. Every read must return the prefill pattern.
fn reader(mut q: Blkioq, buf: usize, prefill: u64, from: Instant, to: Instant) -> u64 {
    let blocks = prefill / READ_BS as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * READ_BS as u64
    };
    for slot in 0..READ_DEPTH {
        let p = (buf + slot * READ_BS) as *mut u8;
        q.read(next(), p, READ_BS, slot, ReqFlags::empty());
    }
    let mut inflight = READ_DEPTH;
    let mut n_in_window = 0u64;
    let mut done: Vec<MaybeUninit<blkio::Completion>> =
        (0..READ_DEPTH).map(|_| MaybeUninit::uninit()).collect();
    while inflight > 0 {
        let n = q.do_io(&mut done, 1, None, None).expect("do_io");
        let now = Instant::now();
        inflight -= n;
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "read failed");
            let p = (buf + c.user_data * READ_BS) as *mut u8;
            // SAFETY: the slot is this thread's, and its request has completed.
            let slot = unsafe { std::slice::from_raw_parts_mut(p, READ_BS) };
            assert!(
                slot[0] == 0x55 && slot[READ_BS - 1] == 0x55,
                "read returned {:#04x}, not the prefill",
                slot[0]
            );
            slot[0] = 0xaa;
            if now >= from && now < to {
                n_in_window += 1;
            }
            if now < to {
                q.read(next(), p, READ_BS, c.user_data, ReqFlags::empty());
                inflight += 1;
            }
        }
    }
    n_in_window
}

/// Queue 0: fresh 64 KiB writes at `depth` from the shared `cursor` on, a flush after every 32
/// write completions, until `to`; returns the writes completed in `from..to`.
fn writer(
    mut q: Blkioq,
    buf: usize,
    depth: usize,
    cursor: &AtomicU64,
    from: Instant,
    to: Instant,
) -> u64 {
    const FLUSH: usize = usize::MAX;
    let next = || cursor.fetch_add(WRITE_BS as u64, Ordering::Relaxed) % SIZE;
    for slot in 0..depth {
        q.write(
            next(),
            (buf + slot * WRITE_BS) as *const u8,
            WRITE_BS,
            slot,
            ReqFlags::empty(),
        );
    }
    let mut inflight = depth;
    let mut writes = 0u64;
    let mut in_window = 0u64;
    let mut done: Vec<MaybeUninit<blkio::Completion>> =
        (0..depth + 1).map(|_| MaybeUninit::uninit()).collect();
    while inflight > 0 {
        let n = q.do_io(&mut done, 1, None, None).expect("do_io");
        let now = Instant::now();
        inflight -= n;
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "write or flush failed");
            if c.user_data == FLUSH {
                continue;
            }
            writes += 1;
            if now >= from && now < to {
                in_window += 1;
            }
            if writes.is_multiple_of(FLUSH_EVERY) {
                q.flush(FLUSH, ReqFlags::empty());
                inflight += 1;
                if depth == 1 {
                    // At depth 1 the flush is waited for before the next write.
                    continue_after_flush(&mut q);
                    inflight -= 1;
                }
            }
            if now < to {
                let slot = c.user_data;
                q.write(
                    next(),
                    (buf + slot * WRITE_BS) as *const u8,
                    WRITE_BS,
                    slot,
                    ReqFlags::empty(),
                );
                inflight += 1;
            }
        }
    }
    in_window
}

fn continue_after_flush(q: &mut Blkioq) {
    let mut done = [MaybeUninit::uninit()];
    let n = q.do_io(&mut done, 1, None, None).expect("do_io");
    assert_eq!(n, 1);
    // SAFETY: do_io initialised the first completion.
    assert_eq!(unsafe { done[0].assume_init_read() }.ret, 0, "flush failed");
}

/// One measurement: (reader IOPS, writer MB/s); `writer_depth` 0 = reader alone.
fn measure(socket: &Path, opts: &Opts, writer_depth: usize, cursor: &AtomicU64) -> (f64, f64) {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    blkio
        .set_str("path", socket.to_str().expect("utf-8"))
        .expect("path");
    blkio.connect().expect("connect");
    blkio.set_i32("num-queues", 2).expect("num-queues");
    let mut out = blkio.start().expect("start");
    let wlen = WRITE_BS * 16;
    let region = blkio
        .alloc_mem_region(wlen + READ_BS * READ_DEPTH)
        .expect("region");
    blkio.map_mem_region(&region).expect("map");
    // SAFETY: the region is a live mapping of `len` bytes owned by `blkio`.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x33, region.len) };
    let q1 = out.queues.remove(1);
    let q0 = out.queues.remove(0);
    let start = Instant::now();
    let from = start + Duration::from_secs_f64(opts.warmup);
    let to = from + Duration::from_secs_f64(opts.secs);
    let barrier = Arc::new(Barrier::new(2));
    let (prefill, rbuf) = (opts.prefill, region.addr + wlen);
    let r = {
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            barrier.wait();
            reader(q1, rbuf, prefill, from, to)
        })
    };
    barrier.wait();
    let writes = if writer_depth > 0 {
        writer(q0, region.addr, writer_depth, cursor, from, to)
    } else {
        drop(q0);
        0
    };
    let reads = r.join().expect("reader");
    drop(blkio);
    (
        reads as f64 / opts.secs,
        writes as f64 * WRITE_BS as f64 / opts.secs / 1e6,
    )
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

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".into(), |(_, m)| m.trim().to_owned())
}

fn main() {
    let opts = parse_opts();
    let dir = tempfile::Builder::new()
        .prefix("vuq-conc-")
        .tempdir_in("/dev/shm")
        .expect("temp dir in /dev/shm");
    let key = dir.path().join("key");
    std::fs::write(&key, PASSPHRASE).expect("key");
    let aio = qsd_aio(dir.path());
    // The template: created and prefilled once; each server start gets a fresh sparse copy, so
    // the writer always allocates fresh clusters and /dev/shm holds one copy at a time.
    let template = dir.path().join("template.qcow2");
    let image = dir.path().join("img.qcow2");
    let secret = format!("secret,id=sec0,data={PASSPHRASE}");
    run(Command::new("qemu-img")
        .args(["create", "-q", "--object", &secret, "-f", "qcow2", "-o"])
        .arg("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10")
        .arg(&template)
        .arg(SIZE.to_string()));
    run(Command::new("qemu-io")
        .args(["--object", &secret, "--image-opts"])
        .arg(format!(
            "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
            template.display()
        ))
        .args(["-c", &format!("write -q -P 0x55 0 {}", opts.prefill)]));
    // rows[backend][writer depth index] = per-rep (reader IOPS, writer MB/s)
    let depths = [0usize, 1, 16];
    let backends = [Backend::Ours, Backend::Qsd];
    let mut rows = vec![vec![(Vec::new(), Vec::new()); depths.len()]; backends.len()];
    for rep in 0..opts.reps {
        let order: Vec<usize> = if rep % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for b in order {
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(&template)
                .arg(&image));
            // The writer walks never-written space after the reader's region.
            let cursor = AtomicU64::new(opts.prefill);
            let server = start(backends[b], &image, &key, dir.path(), aio);
            for (d, &depth) in depths.iter().enumerate() {
                let (iops, mbs) = measure(&server.socket, &opts, depth, &cursor);
                eprintln!(
                    "rep {rep} {:?} writer qd{depth}: reader {iops:.0} IOPS, writer {mbs:.1} MB/s",
                    backends[b]
                );
                rows[b][d].0.push(iops);
                rows[b][d].1.push(mbs);
            }
            drop(server);
            if cursor.load(Ordering::Relaxed) > SIZE {
                eprintln!(
                    "warning: the writer wrapped around: some writes were not to fresh clusters"
                );
            }
            std::fs::remove_file(&image).expect("remove image");
        }
    }
    println!(
        "qcow2_concurrency: qcow2+LUKS {} GiB in /dev/shm, {} MiB prefilled; qemu-storage-daemon aio={aio}, cache.direct=off; {} s per measurement, medians of {}; {}",
        SIZE >> 30,
        opts.prefill / MIB,
        opts.secs,
        opts.reps,
        cpu_model()
    );
    println!(
        "| backend | q1 4k randread qd16 alone | + q0 64k fresh writes qd1 (flush/32) | + q0 qd16 |"
    );
    println!("|---|---|---|---|");
    for (b, backend) in backends.iter().enumerate() {
        let solos = rows[b][0].0.clone();
        let solo = median(&mut rows[b][0].0);
        let mut cells = vec![format!("{solo:.0} IOPS")];
        for row in rows[b].iter_mut().skip(1) {
            // The ratio of each repetition (same server, back to back), then the median.
            let mut ratios: Vec<f64> = row.0.iter().zip(&solos).map(|(w, s)| w / s).collect();
            let iops = median(&mut row.0);
            let mbs = median(&mut row.1);
            cells.push(format!(
                "{iops:.0} IOPS ({:.0}%; writer {mbs:.0} MB/s)",
                100.0 * median(&mut ratios)
            ));
        }
        let name = match backend {
            Backend::Ours => "vhost-user-qcow2",
            Backend::Qsd => "qemu-storage-daemon",
        };
        println!("| {name} | {} |", cells.join(" | "));
    }
}
