//! RBD throughput: the same RBD image served by our daemon and by qemu-storage-daemon's rbd
//! driver, same client (libblkio's `virtio-blk-vhost-user` driver in this process), back to back.
//!
//! A throwaway cluster is started with scripts/ceph-cluster (one monitor, one memstore OSD on
//! 127.0.0.1) and stopped at the end. For each image (raw, raw LUKS) and workload, each
//! repetition measures both backends one after the other (alternating which goes first); the
//! table shows medians and our/qsd ratios. The backends cannot hold the image at the same time
//! (we take RBD's exclusive lock), so each is started, measured and stopped in turn.
//!
//! Run: `cargo bench --bench rbd_blk -- [--secs S] [--reps N] [--size-mib M] [--only SUBSTR]`.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, ReqFlags};

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ceph-cluster");
const MIB: u64 = 1 << 20;
const PASSPHRASE: &str = "bench-passphrase";
const DEPTH: usize = 32;

struct Workload {
    name: &'static str,
    bs: usize,
    random: bool,
    write: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "randread 4k qd32",
        bs: 4096,
        random: true,
        write: false,
    },
    Workload {
        name: "randwrite 4k qd32",
        bs: 4096,
        random: true,
        write: true,
    },
    Workload {
        name: "read 128k seq qd32",
        bs: 131_072,
        random: false,
        write: false,
    },
    Workload {
        name: "write 128k seq qd32",
        bs: 131_072,
        random: false,
        write: true,
    },
];

/// (label, qemu-img create args, QEMU format options over the rbd child).
const IMAGES: [(&str, &[&str], &str); 2] = [
    ("raw", &["-f", "raw"], "driver=raw"),
    (
        "luks",
        &["-f", "luks", "-o", "key-secret=sec0,iter-time=10"],
        "driver=luks,key-secret=sec0",
    ),
];

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Cluster(PathBuf);

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT).arg("stop").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.0.id()).expect("pid");
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(ours: bool, conf: &Path, image: &str, fmt: &str, dir: &Path) -> Server {
    let sock = dir.join("bench.sock");
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::File::create(dir.join(if ours { "ours.log" } else { "qsd.log" })).unwrap();
    let mut cmd = if ours {
        let mut c = Command::new(DAEMON);
        c.args(["serve", "--num-queues", "1", "--socket-path"])
            .arg(&sock)
            .arg("--image")
            .arg(format!("rbd:rbd/{image}:conf={}", conf.display()))
            .env("RUST_LOG", "warn");
        if fmt.contains("luks") {
            c.arg("--key-secret-file").arg(dir.join("pass"));
        }
        c
    } else {
        let mut c = Command::new("qemu-storage-daemon");
        c.args(["--object", &format!("secret,id=sec0,data={PASSPHRASE}")])
            .args(["--object", "iothread,id=io0", "--blockdev"])
            .arg(format!(
                "driver=rbd,pool=rbd,image={image},conf={},node-name=f,cache.direct=off",
                conf.display()
            ))
            .arg("--blockdev")
            .arg(format!("{fmt},file=f,node-name=d"))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues=1,iothread=io0",
                sock.display()
            ));
        c
    };
    let err = log.try_clone().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("{} exited: {s}", if ours { "daemon" } else { "qsd" });
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

/// Requests per second of one workload for `secs` (after `warmup`), `DEPTH` in flight.
fn measure(sock: &Path, wl: &Workload, size: u64, secs: f64, warmup: f64) -> f64 {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().unwrap();
    let region = b.alloc_mem_region(DEPTH * wl.bs).unwrap();
    b.map_mem_region(&region).unwrap();
    let mut q: Blkioq = out.queues.pop().unwrap();
    let blocks = size / wl.bs as u64;
    let (mut rng, mut cursor) = (0x9e37_79b9_7f4a_7c15u64, 0u64);
    let mut next = || {
        let blk = if wl.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            cursor = (cursor + 1) % blocks;
            cursor
        };
        blk * wl.bs as u64
    };
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        let p = region.addr + slot * wl.bs;
        if wl.write {
            q.write(off, p as *const u8, wl.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, p as *mut u8, wl.bs, slot, ReqFlags::empty());
        }
    };
    for slot in 0..DEPTH {
        submit(&mut q, slot, next());
    }
    let t0 = Instant::now();
    let (from, to) = (
        t0 + Duration::from_secs_f64(warmup),
        t0 + Duration::from_secs_f64(warmup + secs),
    );
    let mut done: Vec<MaybeUninit<blkio::Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let (mut inflight, mut ops) = (DEPTH, 0u64);
    while inflight > 0 {
        let n = q.do_io(&mut done, 1, None, None).unwrap();
        let now = Instant::now();
        inflight -= n;
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "request failed");
            if now >= from && now < to {
                ops += 1;
            }
            if now < to {
                submit(&mut q, c.user_data, next());
                inflight += 1;
            }
        }
    }
    ops as f64 / secs
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut secs, mut reps, mut size, mut only) = (3.0f64, 3usize, 256 * MIB, Vec::new());
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--secs" => secs = val().parse().unwrap(),
            "--reps" => reps = val().parse().unwrap(),
            "--size-mib" => size = val().parse::<u64>().unwrap() * MIB,
            "--only" => only.push(val()),
            "--bench" => {}
            o => panic!("unknown option {o}"),
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("vuq-rbd-bench-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::write(dir.path().join("pass"), PASSPHRASE).unwrap();
    let cdir = dir.path().join("cluster");
    let cluster = Cluster(cdir.clone());
    run(Command::new(SCRIPT).arg("start").arg(&cdir));
    let conf = cdir.join("ceph.conf");
    let secret = format!("secret,id=sec0,data={PASSPHRASE}");
    println!("| image | workload | ours IOPS | qsd IOPS | ours/qsd |\n|---|---|---|---|---|");
    for (label, create, fmt) in IMAGES {
        let image = format!("bench-{label}");
        let name = format!("rbd:rbd/{image}:conf={}", conf.display());
        run(Command::new("qemu-img")
            .args(["create", "-q", "--object", &secret])
            .args(create)
            .args([&name, &size.to_string()]));
        // Fill it, so reads return data (and librbd's object map says "exists").
        let opts = format!(
            "{fmt},file.driver=rbd,file.pool=rbd,file.image={image},file.conf={}",
            conf.display()
        );
        run(Command::new("qemu-io")
            .args(["--object", &secret, "--image-opts", &opts])
            .args(["-c", &format!("write -q -P 0x55 0 {size}")]));
        for wl in &WORKLOADS {
            let full = format!("{label} {}", wl.name);
            if !only.is_empty() && !only.iter().any(|o| full.contains(o.as_str())) {
                continue;
            }
            let (mut ours, mut qsd) = (Vec::new(), Vec::new());
            for rep in 0..reps {
                for first_ours in [rep % 2 == 0, rep % 2 != 0] {
                    let srv = start(first_ours, &conf, &image, fmt, dir.path());
                    let r = measure(&dir.path().join("bench.sock"), wl, size, secs, 0.5);
                    drop(srv);
                    if first_ours {
                        ours.push(r);
                    } else {
                        qsd.push(r);
                    }
                }
            }
            let (o, q) = (median(&mut ours), median(&mut qsd));
            println!(
                "| {label} | {} | {o:.0} | {q:.0} | {:.2} |",
                wl.name,
                o / q.max(1.0)
            );
        }
    }
    drop(cluster);
}
