//! Regression tests of the hardening fixes (races, bounds, crash ordering).

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::create::{create_on, CreateOptions};
use super::*;
use crate::storage::{self, MemStorage};

/// What a [`Probe`] storage saw, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write(u64, u64),
    Sync,
}

/// A MemStorage shared with the test: data reads at `slow_at` sleep 300 ms before touching the
/// store (a slow disk or a preempted worker), and writes / syncs are logged.
#[derive(Clone)]
struct Probe {
    mem: Arc<MemStorage>,
    slow_at: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Op>>>,
}

impl Probe {
    fn new() -> Self {
        Self {
            mem: Arc::new(MemStorage::default()),
            slow_at: Arc::new(AtomicU64::new(u64::MAX)),
            log: Arc::default(),
        }
    }
    fn record(&self, op: Op) {
        self.log.lock().expect("log").push(op);
    }
}

impl Storage for Probe {
    fn len(&self) -> storage::Result<u64> {
        self.mem.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()> {
        self.record(Op::Write(offset, buf.len() as u64));
        self.mem.write_at(buf, offset)
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> storage::Result<()> {
        if offset == self.slow_at.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(300));
        }
        self.mem.readv_at(bufs, offset)
    }
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> storage::Result<()> {
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        self.record(Op::Write(offset, n as u64));
        self.mem.writev_at(bufs, offset)
    }
    fn set_len(&self, len: u64) -> storage::Result<()> {
        self.mem.set_len(len)
    }
    fn sync(&self) -> storage::Result<()> {
        self.record(Op::Sync);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.mem.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.mem.write_zeroes(offset, len)
    }
}

fn probe_image(size: u64) -> (Probe, Arc<Qcow2>) {
    let p = Probe::new();
    create_on(
        Box::new(p.clone()),
        &CreateOptions {
            size,
            ..CreateOptions::default()
        },
    )
    .expect("create");
    let q = Qcow2::open(Box::new(p.clone()), &Qcow2Options::default(), None, None).expect("open");
    (p, Arc::new(q))
}

/// A read that looked up its mapping before a discard + flush must not see the freed cluster
/// reused (here as an L2 table) before its data read: it gets the old data or zeroes.
#[test]
fn read_racing_discard_and_flush_never_sees_reused_cluster() {
    let (p, q) = probe_image(2 << 30);
    q.write(0, &[IoSlice::new(&vec![0x11u8; 65536])])
        .expect("write");
    q.flush().expect("flush");
    let Mapping::Data { host, .. } = q.mapping(0).expect("mapping") else {
        panic!("cluster 0 not allocated");
    };
    // Use up the reserve pool so that the next allocation comes from freed clusters.
    let mut g = 2u64 << 20;
    loop {
        let before = p.len().expect("len");
        q.write(g, &[IoSlice::new(&vec![0u8; 65536])])
            .expect("write");
        g += 65536;
        if p.len().expect("len") > before + (1 << 20) || g > (40 << 20) {
            break;
        }
    }
    p.slow_at.store(host, Ordering::SeqCst);
    let q2 = q.clone();
    let reader = std::thread::spawn(move || {
        let mut b = vec![0u8; 65536];
        q2.read(0, &mut [IoSliceMut::new(&mut b)]).expect("read");
        b
    });
    std::thread::sleep(Duration::from_millis(50));
    q.discard(0, 65536).expect("discard");
    q.flush().expect("flush");
    // A write in a new 512 MiB range allocates an L2 table, from the lowest free cluster.
    q.write(1 << 30, &[IoSlice::new(&vec![0x99u8; 65536])])
        .expect("write");
    let b = reader.join().expect("reader");
    let bad = b.iter().filter(|&&x| x != 0 && x != 0x11).count();
    assert_eq!(
        bad,
        0,
        "read of LBA 0 returned other bytes: {:02x?}",
        &b[..16]
    );
}

/// A backing file whose every byte is 0x55.
struct Fives(u64);

impl BackingRead for Fives {
    fn size(&self) -> u64 {
        self.0
    }
    fn read(&self, _offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        for b in bufs.iter_mut() {
            b.fill(0x55);
        }
        Ok(())
    }
}

/// A partial write into a cluster of the backing file copies the rest of the cluster into a new
/// one: that data is synced before the L2 entry pointing at it is written.
#[test]
fn cow_data_is_synced_before_its_l2_entry() {
    let p = Probe::new();
    create_on(
        Box::new(p.clone()),
        &CreateOptions {
            size: 16 << 20,
            backing_file: Some("base.raw".into()),
            ..CreateOptions::default()
        },
    )
    .expect("create");
    let q = Qcow2::open(
        Box::new(p.clone()),
        &Qcow2Options::default(),
        Some(Box::new(Fives(16 << 20))),
        None,
    )
    .expect("open");
    // Allocates the L2 table and the reserve pool.
    q.write(65536, &[IoSlice::new(&[1u8; 65536])])
        .expect("write");
    q.flush().expect("flush");
    p.log.lock().expect("log").clear();
    q.write(512, &[IoSlice::new(&[2u8; 512])]).expect("write");
    let Mapping::Data { host, .. } = q.mapping(0).expect("mapping") else {
        panic!("cluster 0 not allocated");
    };
    let log = p.log.lock().expect("log").clone();
    let i = log
        .iter()
        .position(|&o| o == Op::Write(host, 65536))
        .expect("data write of the new cluster");
    let next = log[i + 1..]
        .iter()
        .find(|o| matches!(o, Op::Sync | Op::Write(..)));
    assert_eq!(
        next,
        Some(&Op::Sync),
        "no sync between COW data and L2 entry: {log:?}"
    );
    let mut b = vec![0u8; 2048];
    q.read(0, &mut [IoSliceMut::new(&mut b)]).expect("read");
    assert!(b[..512].iter().all(|&x| x == 0x55) && b[512..1024].iter().all(|&x| x == 2));
}

/// Metadata freed after open (the refcount table moves when it grows) may be reused for data;
/// in-place writes after the growth (and after freeing and reallocating everything) are not
/// mistaken for writes over metadata.
#[test]
fn in_place_writes_after_refcount_table_growth_are_not_overlaps() {
    let p = Probe::new();
    create_on(
        Box::new(p.clone()),
        &CreateOptions {
            size: 16 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..CreateOptions::default()
        },
    )
    .expect("create");
    let q = Qcow2::open(Box::new(p.clone()), &Qcow2Options::default(), None, None).expect("open");
    let rt0 = Header::read(&p).expect("header").refcount_table_offset;
    let chunk = vec![0x42u8; 65536];
    for off in (0..(8u64 << 20)).step_by(65536) {
        q.write(off, &[IoSlice::new(&chunk)]).expect("write");
    }
    q.flush().expect("flush");
    let rt1 = Header::read(&p).expect("header").refcount_table_offset;
    assert_ne!(rt1, rt0, "refcount table did not move");
    q.discard(0, 8 << 20).expect("discard");
    q.flush().expect("flush");
    for data in [0x43u8, 0x44] {
        let v = vec![data; 65536];
        for off in (0..(8u64 << 20)).step_by(65536) {
            q.write(off, &[IoSlice::new(&v)]).expect("write");
        }
    }
    assert!(!q.read_only());
    let mut b = vec![0u8; 65536];
    q.read(7 << 20, &mut [IoSliceMut::new(&mut b)])
        .expect("read");
    assert!(b.iter().all(|&x| x == 0x44));
}
