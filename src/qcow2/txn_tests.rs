//! Error paths of the metadata transactions, from inside: a storage that fails its N-th
//! operation once, walked over every operation of a mixed workload. After each fault the
//! failed request returns an error, later requests work, and after a flush and a reopen the
//! image has no corruption and every request that succeeded reads back.
#![allow(clippy::cast_possible_truncation)] // test patterns truncate on purpose

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::check::check;
use super::create::{create_on, CreateOptions};
use super::*;
use crate::storage::{self, MemStorage};

/// MemStorage that fails operation number `fail_at` (reads, writes, syncs; counted from 0)
/// with EIO, once.
#[derive(Clone)]
struct FailNth {
    inner: Arc<MemStorage>,
    ops: Arc<AtomicU64>,
    fail_at: Arc<AtomicU64>,
}

impl FailNth {
    fn new(inner: Arc<MemStorage>) -> Self {
        Self {
            inner,
            ops: Arc::new(AtomicU64::new(0)),
            fail_at: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    fn tick(&self) -> storage::Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if n == self.fail_at.load(Ordering::SeqCst) {
            return Err(storage::StorageError::Write {
                offset: n,
                len: 0,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(())
    }
}

impl Storage for FailNth {
    fn len(&self) -> storage::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        self.tick()?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()> {
        self.tick()?;
        self.inner.write_at(buf, offset)
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> storage::Result<()> {
        self.tick()?;
        self.inner.readv_at(bufs, offset)
    }
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> storage::Result<()> {
        self.tick()?;
        self.inner.writev_at(bufs, offset)
    }
    fn set_len(&self, len: u64) -> storage::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> storage::Result<()> {
        self.tick()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.tick()?;
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.tick()?;
        self.inner.write_zeroes(offset, len)
    }
}

#[derive(Debug, Clone, Copy)]
enum Req {
    Write(u64, usize, u8),
    Discard(u64, u64),
    Zeroes(u64, u64),
    Flush,
}

const K: u64 = 1024;
const M: u64 = 1024 * K;

/// Allocating writes (new L2 table, pool refill, partial and whole clusters, across a cluster
/// boundary), in-place overwrites, copy-on-write of a discarded cluster, discard, write-zeroes
/// and flushes.
const WORKLOAD: &[Req] = &[
    Req::Write(0, 4096, 1),
    Req::Write(M, 65536, 2),
    Req::Write(M + 4 * K, 4096, 3),
    Req::Write(2 * M + 60 * K, 8192, 4),
    Req::Flush,
    Req::Write(3 * M, 131_072, 5),
    Req::Discard(3 * M, 65536),
    Req::Write(4 * M, 65536, 6),
    Req::Zeroes(4 * M, 65536),
    Req::Flush,
    Req::Write(3 * M + 8 * K, 4096, 7),
    Req::Write(600 * M, 4096, 8),
];

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

/// The guest ranges the workload touches (checked after each fault).
const CHECKED: [(u64, u64); 7] = [
    (0, 64 * K),
    (M, 64 * K),
    (2 * M, 128 * K),
    (3 * M, 128 * K),
    (4 * M, 64 * K),
    (500 * M, 4 * K),
    (600 * M, 4 * K),
];

/// Index of a checked guest byte in the model.
fn slot(off: u64) -> Option<usize> {
    let mut base = 0u64;
    for (o, n) in CHECKED {
        if (o..o + n).contains(&off) {
            return Some((base + off - o) as usize);
        }
        base += n;
    }
    None
}

/// The expected bytes of the checked ranges: `None` where a failed request may or may not
/// have landed.
fn apply(model: &mut [Option<u8>], r: Req, ok: bool) {
    let (off, data): (u64, Vec<u8>) = match r {
        Req::Write(o, n, s) => (o, fill(s, n)),
        Req::Discard(o, n) | Req::Zeroes(o, n) => (o, vec![0; n as usize]),
        Req::Flush => return,
    };
    for (i, b) in (0u64..).zip(data) {
        if let Some(k) = slot(off + i) {
            model[k] = if ok { Some(b) } else { None };
        }
    }
}

/// Runs the workload; returns the model and the operations it took (before the last write).
fn run_workload(st: &FailNth) -> (Vec<Option<u8>>, u64) {
    let img = Qcow2::open(Box::new(st.clone()), &Qcow2Options::default(), None, None);
    let mut model = vec![Some(0u8); CHECKED.iter().map(|c| c.1 as usize).sum()];
    let Ok(img) = img else {
        return (model, st.ops.load(Ordering::SeqCst));
    };
    for &r in WORKLOAD {
        let res = match r {
            Req::Write(o, n, s) => img.write(o, &[IoSlice::new(&fill(s, n))]),
            Req::Discard(o, n) => img.discard(o, n),
            Req::Zeroes(o, n) => img.write_zeroes(o, n),
            Req::Flush => img.flush(),
        };
        apply(&mut model, r, res.is_ok());
    }
    let ops = st.ops.load(Ordering::SeqCst);
    // Whatever failed, the image keeps working: a last write and a flush succeed.
    img.write(500 * M, &[IoSlice::new(&fill(9, 4096))])
        .expect("write after the fault");
    apply(&mut model, Req::Write(500 * M, 4096, 9), true);
    img.flush().expect("flush after the fault");
    (model, ops)
}

#[test]
fn every_failed_operation_leaves_memory_and_disk_consistent() {
    let fresh = || {
        let s = Arc::new(MemStorage::new(Vec::new()));
        create_on(
            Box::new(Shared(s.clone())),
            &CreateOptions {
                size: 1 << 30,
                ..Default::default()
            },
        )
        .expect("create");
        s
    };
    // Count the operations of a clean run.
    let (_, total) = run_workload(&FailNth::new(fresh()));
    assert!(total > 40, "only {total} operations");
    eprintln!("walking a fault over {total} operations");
    for n in 0..total {
        let mem = fresh();
        let st = FailNth::new(mem.clone());
        st.fail_at.store(n, Ordering::SeqCst);
        let (model, _) = run_workload(&st);
        let r = check(&Shared(mem.clone()), None).expect("check");
        assert_eq!(
            (r.corruptions, r.check_errors),
            (0, 0),
            "fault at op {n}: {r:?}"
        );
        let img = Qcow2::open(
            Box::new(Shared(mem)),
            &Qcow2Options {
                read_only: true,
                ..Default::default()
            },
            None,
            None,
        )
        .expect("reopen");
        let mut base = 0usize;
        for (off, len) in CHECKED {
            let mut got = vec![0u8; len as usize];
            img.read(off, &mut [IoSliceMut::new(&mut got)])
                .expect("read");
            let expect = &model[base..base + len as usize];
            base += len as usize;
            for (i, (g, w)) in (0u64..).zip(got.into_iter().zip(expect)) {
                if let Some(want) = *w {
                    assert_eq!(
                        g,
                        want,
                        "fault at op {n}: byte {:#x} reads {g}, not {want}",
                        off + i
                    );
                }
            }
        }
    }
}

/// A MemStorage shared with the test.
#[derive(Clone)]
struct Shared(Arc<MemStorage>);

impl Storage for Shared {
    fn len(&self) -> storage::Result<u64> {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> storage::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> storage::Result<()> {
        self.0.readv_at(bufs, offset)
    }
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> storage::Result<()> {
        self.0.writev_at(bufs, offset)
    }
    fn set_len(&self, len: u64) -> storage::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> storage::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> storage::Result<()> {
        self.0.write_zeroes(offset, len)
    }
}
