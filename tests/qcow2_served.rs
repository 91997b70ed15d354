//! qcow2 images made by qemu-img served by the daemon to an independent vhost-user-blk client
//! (libblkio): reads equal QEMU's view, writes / write-zeroes / discards land, and after a
//! SIGTERM the image passes `qemu-img check` with no leaks and QEMU reads what the client wrote.

mod common;

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::Command;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

#[path = "support/workload.rs"]
mod workload;
use workload::{prepare, replay_and_compare, workload, Op, SIZE};

const MIB: usize = 1 << 20;

struct Client {
    _blkio: Blkio,
    q: Blkioq,
    region: MemoryRegion,
}

impl Client {
    fn connect(sock: &Path) -> Client {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio");
        blkio
            .set_str("path", sock.to_str().expect("utf-8"))
            .expect("path");
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", 1).expect("queues");
        let mut out = blkio.start().expect("start");
        let region = blkio.alloc_mem_region(4 * MIB).expect("region");
        blkio.map_mem_region(&region).expect("map");
        Client {
            q: out.queues.remove(0),
            _blkio: blkio,
            region,
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping of `len` bytes owned by the Blkio instance;
        // every request is completed before the buffer is touched again.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn complete(&mut self) -> i32 {
        let mut c = [MaybeUninit::uninit()];
        let n = self.q.do_io(&mut c, 1, None, None).expect("do_io");
        assert_eq!(n, 1);
        // SAFETY: do_io initialised the first `n` completions.
        unsafe { c[0].assume_init_read() }.ret
    }

    fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        let p = self.buf().as_mut_ptr();
        self.q.read(off, p, len, 0, ReqFlags::empty());
        assert_eq!(self.complete(), 0, "read at {off}");
        self.buf()[..len].to_vec()
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        self.buf()[..data.len()].copy_from_slice(data);
        let p = self.buf().as_ptr();
        self.q.write(off, p, data.len(), 0, ReqFlags::empty());
        assert_eq!(self.complete(), 0, "write at {off}");
    }

    fn zeroes(&mut self, off: u64, len: u64) {
        self.q.write_zeroes(off, len, 0, ReqFlags::empty());
        assert_eq!(self.complete(), 0, "write-zeroes at {off}");
    }

    fn discard(&mut self, off: u64, len: u64) {
        self.q.discard(off, len, 0, ReqFlags::empty());
        assert_eq!(self.complete(), 0, "discard at {off}");
    }

    /// Submits one request per `(offset, byte)` at once (`bs` bytes each, slot i of the buffer),
    /// then waits for all: writes of `byte`, or reads checked against it.
    fn batch(&mut self, items: &[(u64, u8)], bs: usize, write: bool) {
        for (i, &(off, b)) in items.iter().enumerate() {
            let slot = &mut self.buf()[i * bs..(i + 1) * bs];
            slot.fill(if write { b } else { !b });
            let p = slot.as_mut_ptr();
            if write {
                self.q.write(off, p, bs, i, ReqFlags::empty());
            } else {
                self.q.read(off, p, bs, i, ReqFlags::empty());
            }
        }
        let mut c: Vec<MaybeUninit<blkio::Completion>> =
            (0..items.len()).map(|_| MaybeUninit::uninit()).collect();
        let n = self
            .q
            .do_io(&mut c, items.len(), None, None)
            .expect("do_io");
        assert_eq!(n, items.len());
        for done in &c[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            assert_eq!(unsafe { done.assume_init_read() }.ret, 0);
        }
        if !write {
            for (i, &(off, b)) in items.iter().enumerate() {
                let slot = &self.buf()[i * bs..(i + 1) * bs];
                assert!(slot.iter().all(|&x| x == b), "batch read at {off}");
            }
        }
    }

    fn flush(&mut self) {
        self.q.flush(0, ReqFlags::empty());
        assert_eq!(self.complete(), 0, "flush");
    }
}

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

fn run(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_view(img: &Path) -> Vec<u8> {
    let out = img.with_extension("view");
    let _ = std::fs::remove_file(&out);
    run("qemu-img", &["convert", "-O", "raw", p(img), p(&out)]);
    std::fs::read(&out).expect("view")
}

fn serve_round_trip(name: &str, make: &dyn Fn(&Path)) {
    serve_round_trip_args(name, make, &[]);
}

/// As `serve_round_trip`, with extra `serve` arguments.
fn serve_round_trip_args(name: &str, make: &dyn Fn(&Path), extra: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img.qcow2");
    make(&img);
    let mut expect = qemu_view(&img);
    let sock = dir.path().join("vhost.sock");
    let mut child = common::spawn_serve(&sock, &img, extra);
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(t.elapsed().as_secs() < 20, "{name}: no socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut c = Client::connect(&sock);
    assert_eq!(
        common::has_open_with_o_direct(child.id(), &img),
        extra.contains(&"--direct"),
        "{name}: O_DIRECT on the image file"
    );
    for (i, chunk) in expect.chunks(MIB).enumerate() {
        let got = c.read((i * MIB) as u64, chunk.len());
        assert!(got == chunk, "{name}: MiB {i} differs from qemu's view");
    }
    assert_eq!(
        common::has_io_uring(child.id()),
        extra.contains(&"io_uring"),
        "{name}: io_uring in use"
    );
    let writes: &[(u64, usize, u8)] = &[
        (512, 3 * 512, 0xB1),
        (65536 - 1024, 8192, 0xB2),
        (3 << 20, MIB + 512, 0xB3),
        (10 << 20, 4096, 0xB4),
    ];
    for &(off, len, b) in writes {
        c.write(off, &vec![b; len]);
        let o = usize::try_from(off).expect("off");
        expect[o..o + len].fill(b);
    }
    c.zeroes(6 << 20, 256 * 1024);
    expect[6 * MIB..6 * MIB + 256 * 1024].fill(0);
    c.discard(8 << 20, 2 << 20);
    expect[8 * MIB..10 * MIB].fill(0);
    c.flush();
    for (i, chunk) in expect.chunks(MIB).enumerate() {
        let got = c.read((i * MIB) as u64, chunk.len());
        assert!(got == chunk, "{name}: MiB {i} differs after our writes");
    }
    drop(c);
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    common::wait_timeout(&mut child, 20).expect("daemon exit");
    let chk = Command::new("qemu-img")
        .args(["check", p(&img)])
        .output()
        .expect("check");
    assert!(
        chk.status.success(),
        "{name}: qemu-img check after SIGTERM: {}",
        String::from_utf8_lossy(&chk.stdout)
    );
    assert!(qemu_view(&img) == expect, "{name}: qemu reads our writes");
}

fn seeded(img: &Path, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend_from_slice(&["-o", opts]);
    }
    args.extend_from_slice(&[p(img), "16M"]);
    run("qemu-img", &args);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x21 0 5M",
            "-c",
            "write -P 0x22 8M 3M",
            p(img),
        ],
    );
}

#[test]
fn served_qcow2_images_round_trip_through_a_vhost_user_client() {
    serve_round_trip("v3", &|i| seeded(i, ""));
    serve_round_trip("v2-512", &|i| seeded(i, "compat=0.10,cluster_size=512"));
    serve_round_trip("extended-l2", &|i| seeded(i, "extended_l2=on"));
    serve_round_trip("compressed", &|i| {
        let raw = i.with_extension("raw");
        run("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "16M"]);
        run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x23 1M 6M", p(&raw)],
        );
        run("qemu-img", &["convert", "-c", "-O", "qcow2", p(&raw), p(i)]);
    });
    serve_round_trip("overlay", &|i| {
        let base = i.with_file_name("base.qcow2");
        seeded(&base, "");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                p(i),
            ],
        );
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x24 2M 64k", p(i)],
        );
    });
}

/// `--direct` (O_DIRECT) on a file on disk (tempfile's /tmp; tmpfs refuses O_DIRECT): the
/// metadata, the sub-block writes of the round trip (512 bytes at 512, 8 KiB across a cluster
/// boundary) and 512-byte clusters all go through the storage layer's bounce buffers.
#[test]
fn served_qcow2_with_direct_round_trips() {
    serve_round_trip_args("v3-direct", &|i| seeded(i, ""), &["--direct"]);
    serve_round_trip_args(
        "v2-512-direct",
        &|i| seeded(i, "compat=0.10,cluster_size=512"),
        &["--direct"],
    );
    // The io_uring engine and ring polling, with and without O_DIRECT.
    serve_round_trip_args(
        "v3-direct-uring-poll",
        &|i| seeded(i, ""),
        &["--direct", "--aio", "io_uring", "--poll-us", "50"],
    );
    serve_round_trip_args(
        "overlay-uring",
        &|i| seeded(i, ""),
        &["--aio", "io_uring", "--num-queues", "2"],
    );
}

/// With `--direct` the requests of one kick run concurrently (several threads per queue): up to
/// 30 4 KiB writes in flight at once, then as many reads, then two 512-byte writes into the same
/// 4 KiB block together (a read-modify-write each where the disk's alignment is 4 KiB); QEMU
/// reads the same data afterwards and `qemu-img check` is clean.
#[test]
fn direct_requests_in_flight_together_land_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img.qcow2");
    seeded(&img, "");
    let mut expect = qemu_view(&img);
    let sock = dir.path().join("vhost.sock");
    let mut child = common::spawn_serve(&sock, &img, &["--direct", "--num-queues", "1"]);
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed().as_secs() < 20, "no socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut c = Client::connect(&sock);
    // Spread over allocated and unallocated clusters.
    let mut items: Vec<(u64, u8)> = (0..30u64)
        .map(|i| {
            (
                i * 337 * 4096 % (15 << 20),
                0x40 + u8::try_from(i).expect("i"),
            )
        })
        .collect();
    items.sort_by_key(|x| x.0);
    items.dedup_by_key(|x| x.0);
    let bs = 4096;
    c.batch(&items, bs, true);
    c.batch(&items, bs, false);
    let sub = [(15 << 20, 0x71u8), ((15 << 20) + 512, 0x72)];
    c.batch(&sub, 512, true);
    c.batch(&sub, 512, false);
    for &(off, b) in &items {
        let o = usize::try_from(off).expect("off");
        expect[o..o + bs].fill(b);
    }
    for &(off, b) in &sub {
        let o = usize::try_from(off).expect("off");
        expect[o..o + 512].fill(b);
    }
    c.flush();
    drop(c);
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    common::wait_timeout(&mut child, 20).expect("daemon exit");
    run("qemu-img", &["check", p(&img)]);
    assert!(
        qemu_view(&img) == expect,
        "qemu reads what the batches wrote"
    );
}

/// The differential workload of tests/qcow2_differential.rs, but through the daemon and a real
/// vhost-user client: the same random writes / write-zeroes / discards / flushes go to our daemon
/// on one copy and to qemu-io on another; `qemu-img compare` agrees and `qemu-img check` is clean
/// (no leaks) on ours after the daemon's SIGTERM.
fn differential_through_daemon(name: &str, create: &[&str], with_backing: bool, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = prepare(dir.path(), create, with_backing);
    let ops = workload(seed, SIZE, 200);
    let sock = dir.path().join("vhost.sock");
    let mut child = common::spawn_serve(&sock, &ours, &["--num-queues", "1"]);
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed().as_secs() < 20, "{name}: daemon does not listen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut c = Client::connect(&sock);
    for op in &ops {
        match *op {
            Op::Write(off, len, b) => c.write(off, &vec![b; usize::try_from(len).expect("len")]),
            Op::Zero(off, len) => c.zeroes(off, len),
            Op::Discard(off, len) => c.discard(off, len),
            Op::Flush => c.flush(),
        }
    }
    c.flush();
    drop(c);
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    let st = common::wait_timeout(&mut child, 20).expect("daemon exit");
    assert!(st.success(), "{name}: daemon exit {st}");

    replay_and_compare(name, seed, &ops, &ours, &theirs);
}

#[test]
fn differential_workload_through_the_daemon_matches_qemu_io() {
    differential_through_daemon("v3", &[], false, 101);
    differential_through_daemon("v3-overlay", &[], true, 102);
    differential_through_daemon("extl2-overlay", &["-o", "extended_l2=on"], true, 103);
    differential_through_daemon("v2-c4k", &["-o", "compat=0.10,cluster_size=4k"], false, 104);
}
