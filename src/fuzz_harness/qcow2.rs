//! qcow2 targets: open + a random operation sequence, and check + repair.

use std::io::{IoSlice, IoSliceMut};

use super::storage::CappedMem;
use super::Input;
use crate::qcow2::check::{check, Repair};
use crate::qcow2::{Qcow2, Qcow2Options};

/// Bytes at the end of a `qcow2_ops` input that encode the operations (8 bytes each); the rest
/// is the image.
pub const OPS_TAIL: usize = 64;

/// Largest request of one operation (a few clusters of the small-cluster seeds; larger ones
/// cost time and find nothing new).
const MAX_OP_BYTES: u64 = 64 << 10;

fn options(read_only: bool) -> Qcow2Options {
    Qcow2Options {
        read_only,
        // Small enough that eviction paths run; at least 16 tables in any case.
        l2_cache_bytes: 1 << 20,
    }
}

/// Splits a `qcow2_ops` input into (image, ops).
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < OPS_TAIL {
        (data, &[])
    } else {
        data.split_at(data.len() - OPS_TAIL)
    }
}

/// One operation of the script.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64, fill: u8 },
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
    Flush,
}

fn decode(ops: &mut Input<'_>, size: u64) -> Op {
    let kind = ops.u8();
    let sector = u64::from(ops.u32());
    let extra = ops.u8();
    let len_sectors = u64::from(ops.u16() % 128) + 1;
    // Mostly sector-aligned (as virtio-blk issues them), sometimes not.
    let misalign = if extra & 1 == 1 {
        u64::from(extra >> 1)
    } else {
        0
    };
    let span = (size / 512).max(1);
    // A few requests past the end: they must be refused.
    let offset = (sector % (span + 2)) * 512 + misalign;
    let len = (len_sectors * 512).min(MAX_OP_BYTES);
    match kind % 6 {
        0 | 5 => Op::Read { offset, len },
        1 => Op::Write {
            offset,
            len,
            fill: extra | 1,
        },
        2 => Op::Discard { offset, len },
        3 => Op::WriteZeroes { offset, len },
        _ => Op::Flush,
    }
}

fn read(img: &Qcow2, offset: u64, len: u64) -> Option<Vec<u8>> {
    let n = usize::try_from(len).ok()?;
    let mut buf = vec![0u8; n];
    // Two iovecs, to run the scatter paths.
    let (a, b) = buf.split_at_mut(n / 3);
    img.read(offset, &mut [IoSliceMut::new(a), IoSliceMut::new(b)])
        .ok()?;
    Some(buf)
}

/// Whether `offset..offset+len` lies within one cluster (so no corrupt mapping can alias two
/// parts of the request).
fn in_one_cluster(img: &Qcow2, offset: u64, len: u64) -> bool {
    let cs = img.cluster_size();
    len > 0 && offset / cs == (offset + len - 1) / cs
}

fn run_op(img: &Qcow2, op: Op) {
    match op {
        Op::Read { offset, len } => {
            let _ = read(img, offset, len);
        }
        Op::Write { offset, len, fill } => {
            let Ok(n) = usize::try_from(len) else { return };
            let data = vec![fill; n];
            let (a, b) = data.split_at(n / 2);
            let ok = img
                .write(offset, &[IoSlice::new(a), IoSlice::new(b)])
                .is_ok();
            if ok && in_one_cluster(img, offset, len) {
                if let Some(back) = read(img, offset, len) {
                    assert!(
                        back == data,
                        "read after a successful write of {len} bytes at {offset:#x} differs"
                    );
                }
            }
        }
        Op::Discard { offset, len } => {
            let _ = img.discard(offset, len);
        }
        Op::WriteZeroes { offset, len } => {
            let ok = img.write_zeroes(offset, len).is_ok();
            if ok && in_one_cluster(img, offset, len) {
                if let Some(back) = read(img, offset, len) {
                    assert!(
                        back.iter().all(|&b| b == 0),
                        "read after a successful write-zeroes of {len} bytes at {offset:#x} \
                         is not zero"
                    );
                }
            }
        }
        Op::Flush => {
            let _ = img.flush();
        }
    }
}

/// qcow2 open (read-write, then read-only if that fails) and up to 8 operations.
///
/// Input: image bytes, then [`OPS_TAIL`] bytes of operations.
pub fn qcow2_ops(data: &[u8]) {
    let (image, ops) = split(data);
    let img = match Qcow2::open(
        Box::new(CappedMem::new(image.to_vec())),
        &options(false),
        None,
        None,
    ) {
        Ok(i) => i,
        Err(_) => match Qcow2::open(
            Box::new(CappedMem::new(image.to_vec())),
            &options(true),
            None,
            None,
        ) {
            Ok(i) => i,
            Err(_) => return,
        },
    };
    let size = img.size();
    let mut ops = Input::new(ops);
    while !ops.is_empty() {
        let op = decode(&mut ops, size);
        run_op(&img, op);
    }
    let _ = img.flush();
}

/// `check`, then `check --repair all` on the same bytes, then a second check of the repaired
/// image, which must not find what the repair claimed to fix.
pub fn qcow2_check(data: &[u8]) {
    let st = CappedMem::new(data.to_vec());
    if check(&st, None).is_err() {
        return;
    }
    let Ok(repaired) = check(&st, Some(Repair::All)) else {
        return;
    };
    if let Ok(after) = check(&st, None) {
        assert!(
            after.corruptions <= repaired.corruptions && after.leaks <= repaired.leaks,
            "a check after repair finds more than the repair reported: {after:?} vs {repaired:?}"
        );
    }
}
