//! The daemon driven by an independent vhost-user-blk client: libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate).

// Test patterns truncate small counters to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::mem::MaybeUninit;
use std::os::unix::fs::MetadataExt;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use common::Daemon;

const MIB: u64 = 1 << 20;

struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

impl Client {
    fn connect(d: &Daemon, num_queues: i32, read_only: bool) -> blkio::Result<Client> {
        Self::connect_path(&d.sock, num_queues, read_only)
    }

    fn connect_path(
        sock: &std::path::Path,
        num_queues: i32,
        read_only: bool,
    ) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", sock.to_str().expect("utf-8 path"))?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let out = blkio.start()?;
        let region = blkio.alloc_mem_region(4 * 1024 * 1024)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues: out.queues,
            region,
        })
    }

    /// The client buffer (shared with the daemon through the mapped region).
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping of `len` bytes owned by `self.blkio`; requests are
        // waited for before the buffer is looked at again.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }
}

/// Waits for one completion on `q` and returns its `ret` (0 or -errno).
fn complete(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::uninit()];
    let n = q.do_io(&mut c, 1, None, None).expect("do_io");
    assert_eq!(n, 1);
    // SAFETY: do_io initialised the first `n` completions.
    unsafe { c[0].assume_init_read() }.ret
}

fn read(c: &mut Client, q: usize, offset: u64, len: usize) -> Vec<u8> {
    let ptr = c.buf().as_mut_ptr();
    c.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
    assert_eq!(complete(&mut c.queues[q]), 0, "read at {offset}");
    c.buf()[..len].to_vec()
}

fn write(c: &mut Client, q: usize, offset: u64, data: &[u8]) -> i32 {
    c.buf()[..data.len()].copy_from_slice(data);
    let ptr = c.buf().as_ptr();
    c.queues[q].write(offset, ptr, data.len(), 0, ReqFlags::empty());
    complete(&mut c.queues[q])
}

fn file_bytes(d: &Daemon, offset: u64, len: usize) -> Vec<u8> {
    let all = std::fs::read(&d.image).expect("read image");
    let o = usize::try_from(offset).expect("fits");
    all[o..o + len].to_vec()
}

#[test]
fn capacity_matches_the_image() {
    let d = Daemon::start(8 * MIB, &[]);
    let c = Client::connect(&d, 1, false).expect("connect");
    assert_eq!(c.blkio.get_u64("capacity").expect("capacity"), 8 * MIB);
    assert_eq!(c.blkio.get_i32("max-queues").expect("max-queues"), 4);
}

#[test]
fn every_request_type_reaches_the_file() {
    let d = Daemon::start(8 * MIB, &[]);
    let mut c = Client::connect(&d, 1, false).expect("connect");

    // Read what make_image wrote.
    assert_eq!(read(&mut c, 0, 3 * 512, 512), vec![3u8; 512]);

    // Write (gather from two buffers with writev), flush, and find it in the file.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8).collect();
    c.buf()[..8192].copy_from_slice(&pattern);
    let base = c.buf().as_ptr() as usize;
    let iov = [
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: 4096,
        },
        libc::iovec {
            iov_base: (base + 4096) as *mut libc::c_void,
            iov_len: 4096,
        },
    ];
    c.queues[0].writev(MIB, iov.as_ptr(), 2, 0, ReqFlags::empty());
    assert_eq!(complete(&mut c.queues[0]), 0);
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(complete(&mut c.queues[0]), 0);
    assert_eq!(file_bytes(&d, MIB, 8192), pattern);
    assert_eq!(read(&mut c, 0, MIB, 8192), pattern);

    // Discard deallocates (punches a hole) and reads back as zeroes.
    let blocks_before = std::fs::metadata(&d.image).expect("stat").blocks();
    c.queues[0].discard(2 * MIB, MIB, 0, ReqFlags::empty());
    assert_eq!(complete(&mut c.queues[0]), 0);
    assert_eq!(read(&mut c, 0, 2 * MIB, 4096), vec![0u8; 4096]);
    let blocks_after = std::fs::metadata(&d.image).expect("stat").blocks();
    assert!(
        blocks_after + 1024 < blocks_before,
        "discard did not deallocate: {blocks_before} -> {blocks_after} blocks"
    );

    // Write-zeroes without unmap keeps the range allocated; with unmap it may deallocate.
    let blocks_before = std::fs::metadata(&d.image).expect("stat").blocks();
    c.queues[0].write_zeroes(4 * MIB, MIB, 0, ReqFlags::NO_UNMAP);
    assert_eq!(complete(&mut c.queues[0]), 0);
    assert_eq!(file_bytes(&d, 4 * MIB, 4096), vec![0u8; 4096]);
    let blocks_after = std::fs::metadata(&d.image).expect("stat").blocks();
    assert!(blocks_after + 256 >= blocks_before, "NO_UNMAP deallocated");
    c.queues[0].write_zeroes(5 * MIB, MIB, 0, ReqFlags::empty());
    assert_eq!(complete(&mut c.queues[0]), 0);
    assert_eq!(
        file_bytes(&d, 5 * MIB, MIB as usize),
        vec![0u8; MIB as usize]
    );
    assert_eq!(read(&mut c, 0, 5 * MIB, 4096), vec![0u8; 4096]);
    // Neighbours untouched.
    assert_eq!(
        file_bytes(&d, 6 * MIB, 512),
        vec![((6 * MIB / 512) % 251) as u8; 512]
    );
}

#[test]
fn reads_past_capacity_fail_and_the_daemon_keeps_serving() {
    let d = Daemon::start(MIB, &[]);
    let mut c = Client::connect(&d, 1, false).expect("connect");
    let ptr = c.buf().as_mut_ptr();
    c.queues[0].read(MIB - 512, ptr, 1024, 0, ReqFlags::empty());
    assert_eq!(complete(&mut c.queues[0]), -libc::EIO);
    assert_eq!(write(&mut c, 0, MIB, &[1u8; 512]), -libc::EIO);
    assert_eq!(read(&mut c, 0, 0, 512), vec![0u8; 512]);
}

#[test]
fn read_only_export_refuses_writers_and_serves_readers() {
    let d = Daemon::start(MIB, &["--read-only"]);
    // A read-write client must notice VIRTIO_BLK_F_RO.
    let e = Client::connect(&d, 1, false)
        .err()
        .expect("read-write start must fail");
    assert_eq!(e.errno(), blkio::Errno::ROFS);
    let mut c = Client::connect(&d, 1, true).expect("read-only connect");
    assert_eq!(read(&mut c, 0, 512, 512), vec![1u8; 512]);
}

#[test]
fn two_queues_serve_concurrently() {
    let d = Daemon::start(16 * MIB, &["--num-queues", "2"]);
    let c = Client::connect(&d, 2, false).expect("connect");
    let Client {
        blkio,
        mut queues,
        region,
    } = c;
    let q1 = queues.pop().expect("queue 1");
    let q0 = queues.pop().expect("queue 0");
    let half = region.len / 2;
    let run = move |mut q: Blkioq, buf: usize, id: u8| {
        for round in 0..64u64 {
            let offset = u64::from(id) * 8 * MIB + round * 65536;
            // SAFETY: each thread uses its own half of the mapped region.
            let b = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, 65536) };
            b.fill(id.wrapping_mul(16).wrapping_add(round as u8));
            q.write(offset, buf as *const u8, 65536, 0, ReqFlags::empty());
            assert_eq!(complete(&mut q), 0);
            b.fill(0);
            q.read(offset, buf as *mut u8, 65536, 0, ReqFlags::empty());
            assert_eq!(complete(&mut q), 0);
            assert!(b
                .iter()
                .all(|&x| x == id.wrapping_mul(16).wrapping_add(round as u8)));
        }
        q
    };
    let t0 = std::thread::spawn(move || run(q0, region.addr, 0));
    let t1 = std::thread::spawn(move || run(q1, region.addr + half, 1));
    let _q0 = t0.join().expect("queue 0 thread");
    let _q1 = t1.join().expect("queue 1 thread");
    drop(blkio);
    let file = std::fs::read(&d.image).expect("image");
    let at = |o: u64| file[usize::try_from(o).expect("fits")];
    assert_eq!(at(63 * 65536), 63);
    assert_eq!(at(8 * MIB + 63 * 65536), 16 + 63);
}

#[test]
fn a_new_frontend_can_attach_after_disconnect() {
    let d = Daemon::start(MIB, &[]);
    {
        let mut c = Client::connect(&d, 1, false).expect("first connect");
        assert_eq!(write(&mut c, 0, 4096, &[9u8; 4096]), 0);
    }
    let mut c = Client::connect(&d, 1, false).expect("second connect");
    assert_eq!(read(&mut c, 0, 4096, 4096), vec![9u8; 4096]);
}

#[test]
fn logical_block_size_4096_is_reported_and_enforced() {
    let d = Daemon::start(MIB, &["--logical-block-size", "4096"]);
    let mut c = Client::connect(&d, 1, false).expect("connect");
    assert_eq!(
        c.blkio.get_i32("request-alignment").expect("alignment"),
        4096
    );
    let got = read(&mut c, 0, 8192, 4096);
    assert!(
        got == file_bytes(&d, 8192, 4096),
        "read differs from the file"
    );
    // A 512-byte read is refused by the device (blkio passes it through).
    let ptr = c.buf().as_mut_ptr();
    c.queues[0].read(512, ptr, 512, 0, ReqFlags::empty());
    assert_ne!(complete(&mut c.queues[0]), 0);
}

/// (thread id, name, seccomp mode, number of filters) of every thread of `pid`.
fn seccomp_of_threads(pid: u32) -> Vec<(u32, String, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let t = t.expect("task entry").path();
        let tid: u32 = t
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .expect("tid");
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in {}", t.display()))
        };
        out.push((
            tid,
            comm.trim().to_owned(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out
}

#[test]
fn every_daemon_thread_runs_under_a_seccomp_filter() {
    let d = Daemon::start(8 * MIB, &["--num-queues", "2"]);
    let mut c = Client::connect(&d, 2, false).expect("connect");
    // I/O on every queue (each worker narrowed the main thread's filter to its own at start).
    for q in 0..2 {
        assert_eq!(write(&mut c, q, 4096, &[0x5a; 4096]), 0);
        assert_eq!(read(&mut c, q, 4096, 4096), vec![0x5a; 4096]);
    }
    let pid = d.child.id();
    let threads = seccomp_of_threads(pid);
    // main (accept loop and vhost-user messages), signals and two queue workers.
    assert!(threads.len() >= 4, "{threads:?}");
    for (tid, name, mode, filters) in &threads {
        // 2 = SECCOMP_MODE_FILTER.
        assert_eq!(
            *mode, 2,
            "thread {tid} ({name}) is not filtered: {threads:?}"
        );
        // Main and signals carry their own filter; the others the inherited one plus their own.
        let expect = if *tid == pid || name == "signals" {
            1
        } else {
            2
        };
        assert_eq!(*filters, expect, "thread {tid} ({name}): {threads:?}");
    }
    drop(c);
}

#[test]
fn seccomp_off_leaves_every_thread_unfiltered() {
    let d = Daemon::start(8 * MIB, &["--num-queues", "1", "--seccomp", "off"]);
    let mut c = Client::connect(&d, 1, false).expect("connect");
    assert_eq!(write(&mut c, 0, 0, &[1; 512]), 0);
    let threads = seccomp_of_threads(d.child.id());
    assert!(threads.iter().all(|t| t.2 == 0), "{threads:?}");
    drop(c);
}

/// systemd socket activation and readiness: under `systemd-socket-activate` (LISTEN_FDS /
/// LISTEN_PID, no --socket-path or --fd) the daemon serves the passed socket, tells the
/// NOTIFY_SOCKET `READY=1` once it serves and `STOPPING=1` on SIGTERM, and exits 0.
#[test]
fn systemd_socket_activation_and_notify() {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 4 * MIB);
    let sock = dir.path().join("activated.sock");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut child = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        // It passes only the variables named with -E to the service.
        .arg("-E")
        .arg("NOTIFY_SOCKET")
        .arg(common::BIN)
        .arg("serve")
        .arg("--image")
        .arg(&image)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon on the passed socket.
    let mut c = Client::connect_path(&sock, 1, false).expect("connect");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 datagram");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(write(&mut c, 0, MIB, &[0x5c; 4096]), 0);
    assert_eq!(read(&mut c, 0, MIB, 4096), vec![0x5c; 4096]);
    drop(c);
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill() with the pid of our own child (systemd-socket-activate exec'd the daemon).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let n = notify.recv(&mut buf).expect("STOPPING=1 datagram");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let st = common::wait_timeout(&mut child, 20).expect("daemon exits");
    assert!(st.success(), "{st:?}");
    let all = std::fs::read(&image).expect("image");
    assert_eq!(&all[1 << 20..(1 << 20) + 4096], &[0x5c; 4096][..]);
}

/// `stats`: the counters and latency histograms of a running daemon, as JSON, text and
/// Prometheus text exposition, agree with the requests a client made.
#[test]
fn stats_count_what_the_client_did() {
    let ctl_dir = tempfile::tempdir().expect("tempdir");
    let ctl = ctl_dir.path().join("control.sock");
    let d = Daemon::start(8 * MIB, &["--control-socket", ctl.to_str().expect("utf-8")]);
    let mut c = Client::connect(&d, 1, false).expect("connect");
    for i in 0..3u64 {
        assert_eq!(write(&mut c, 0, i * 4096, &[7u8; 4096]), 0);
    }
    assert_eq!(read(&mut c, 0, 0, 8192), vec![7u8; 8192]);
    assert_eq!(read(&mut c, 0, 4096, 512), vec![7u8; 512]);
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(complete(&mut c.queues[0]), 0);
    let stats = |fmt: &str| {
        let out = std::process::Command::new(common::BIN)
            .args(["stats", "--output", fmt])
            .arg(&ctl)
            .output()
            .expect("stats");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let prom = stats("prometheus");
    let image = d.image.display().to_string();
    let series = |name: &str, labels: &str| -> u64 {
        let prefix = format!("vhost_user_qcow2_{name}{{image=\"{image}\",");
        prom.lines()
            .find(|l| l.starts_with(&prefix) && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} {labels} in\n{prom}"))
    };
    assert_eq!(series("requests_total", "queue=\"0\",type=\"write\""), 3);
    assert_eq!(series("requests_total", "queue=\"0\",type=\"read\""), 2);
    assert_eq!(series("requests_total", "queue=\"0\",type=\"flush\""), 1);
    assert_eq!(
        series("bytes_total", "queue=\"0\",direction=\"write\""),
        3 * 4096
    );
    assert_eq!(
        series("bytes_total", "queue=\"0\",direction=\"read\""),
        8192 + 512
    );
    assert_eq!(series("errors_total", "queue=\"0\",status=\"ioerr\""), 0);
    assert_eq!(series("in_flight", "queue=\"0\""), 0);
    assert_eq!(
        series(
            "request_duration_seconds_bucket",
            "queue=\"0\",op=\"write\",le=\"+Inf\""
        ),
        3
    );
    assert_eq!(
        series("request_duration_seconds_count", "queue=\"0\",op=\"read\""),
        2
    );
    assert_eq!(series("capacity_bytes", "socket="), 8 * MIB);
    assert!(prom.contains("# TYPE vhost_user_qcow2_request_duration_seconds histogram"));
    let v: serde_json::Value = serde_json::from_str(&stats("json")).expect("json");
    assert_eq!(v["queue-stats"][0]["write"], 3);
    assert_eq!(v["queue-stats"][0]["latency_us"]["write"]["count"], 3);
    let text = stats("human");
    assert!(
        text.contains(&image) && text.contains("frontend: connected"),
        "{text}"
    );
}
