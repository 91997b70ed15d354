//! The virtio-blk request path over a split virtqueue in fake guest memory.
//!
//! Structure-aware, as rust-vmm/vm-virtio's `fuzz/` is: the input describes limits, a
//! descriptor table, the avail ring and the guest memory contents; virtio-queue walks the
//! chains (next, indirect, loops) and every chain goes through
//! [`handle_chain`](crate::virtio_blk::exec::handle_chain) (parse + execute + status) against a
//! raw in-memory disk.

use std::sync::OnceLock;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Input;
use crate::image::raw::RawImage;
use crate::storage::MemStorage;
use crate::virtio_blk::exec::{handle_chain, Device};
use crate::virtio_blk::request::{Limits, Scratch};

const QUEUE_SIZE: u16 = 16;
/// [`QUEUE_SIZE`] + 1, as a byte: counts of descriptors and avail entries are taken modulo it.
const QUEUE_SIZE_PLUS_ONE: u8 = 17;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Where the input's memory contents go (request headers, segments, indirect tables).
const DATA: u64 = 0x3000;
/// Two regions with a hole between them, so a buffer may straddle the hole.
const REGION0: (u64, usize) = (0, 0x10000);
const REGION1: (u64, usize) = (0x11000, 0x8000);
/// Largest descriptor length the fuzzer picks within the regions.
const SMALL_LEN_MASK: u32 = 0x1_ffff;

fn memory() -> &'static GuestMemoryMmap<()> {
    static MEM: OnceLock<GuestMemoryMmap<()>> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(REGION0.0), REGION0.1),
            (GuestAddress(REGION1.0), REGION1.1),
        ])
        .expect("fuzz guest memory")
    })
}

fn limits(inp: &mut Input<'_>) -> Limits {
    let flags = inp.u8();
    Limits {
        capacity_sectors: u64::from(inp.u8() % 64 + 1) * 8,
        block_size: if flags & 1 == 0 { 512 } else { 4096 },
        seg_max: u32::from(inp.u8() % 8) + 1,
        discard: flags & 2 != 0,
        write_zeroes: flags & 4 != 0,
        max_discard_sectors: u32::from(inp.u8()),
        max_discard_seg: u32::from(inp.u8() % 4) + 1,
        max_write_zeroes_sectors: u32::from(inp.u8()),
        max_write_zeroes_seg: u32::from(inp.u8() % 4) + 1,
    }
}

/// A descriptor address: mostly inside the data area, sometimes anywhere.
fn addr(raw: u32) -> u64 {
    if raw & 0x8000_0000 != 0 {
        u64::from(raw) << 8
    } else {
        DATA + u64::from(raw & 0x1_ffff)
    }
}

fn len(raw: u32) -> u32 {
    if raw & 0x8000_0000 != 0 {
        raw
    } else {
        raw & SMALL_LEN_MASK
    }
}

/// Input: limits (7 bytes), descriptor count, descriptors (addr u32, len u32, flags u16,
/// next u16), avail count and heads (u16 each), then guest memory contents.
pub fn virtio_blk_chain(data: &[u8]) {
    let mem = memory();
    let mut inp = Input::new(data);
    let l = limits(&mut inp);

    // Fresh memory contents for every run: zero, then the input's bytes.
    let zeros = vec![0u8; REGION0.1];
    mem.write_slice(&zeros, GuestAddress(REGION0.0))
        .expect("region 0");
    mem.write_slice(&zeros[..REGION1.1], GuestAddress(REGION1.0))
        .expect("region 1");

    let ndesc = inp.u8() % QUEUE_SIZE_PLUS_ONE;
    for i in 0..u64::from(ndesc) {
        let a = addr(inp.u32());
        let n = len(inp.u32());
        // NEXT | WRITE | INDIRECT and one unknown bit.
        let flags = inp.u16() & 0x000f;
        let next = inp.u16() % (QUEUE_SIZE + 1);
        let at = GuestAddress(DESC_TABLE + i * 16);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&a.to_le_bytes());
        d[8..12].copy_from_slice(&n.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, at).expect("descriptor table");
    }
    let navail = inp.u8() % QUEUE_SIZE_PLUS_ONE;
    for i in 0..u64::from(navail) {
        let head = inp.u16() % (QUEUE_SIZE + 2);
        mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * i))
            .expect("avail ring");
    }
    // The avail index may claim more entries than the ring holds (a malformed driver).
    let idx = u16::from(navail) + u16::from(inp.u8().is_multiple_of(4)) * u16::from(inp.u8());
    mem.write_obj(idx, GuestAddress(AVAIL_RING + 2))
        .expect("avail idx");
    let contents = inp.rest();
    let room = REGION0.1 - usize::try_from(DATA).expect("small");
    mem.write_slice(&contents[..contents.len().min(room)], GuestAddress(DATA))
        .expect("contents");

    let mut q = match Queue::new(QUEUE_SIZE) {
        Ok(q) => q,
        Err(_) => return,
    };
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(u32::try_from(AVAIL_RING).expect("small")), Some(0));
    q.set_used_ring_address(Some(u32::try_from(USED_RING).expect("small")), Some(0));
    q.set_ready(true);
    if !q.is_valid(mem) {
        return;
    }

    let Ok(capacity) = usize::try_from(l.capacity_sectors * 512) else {
        return;
    };
    let Ok(img) = RawImage::new(Box::new(MemStorage::new(vec![0; capacity])), false) else {
        return;
    };
    let serial = *b"fuzz-serial\0\0\0\0\0\0\0\0\0";
    let dev = Device {
        limits: &l,
        serial: &serial,
        writethrough: l.seg_max.is_multiple_of(2),
    };
    let mut scratch = Scratch::with_capacity(l.seg_max);
    // Bounded: a queue holds at most QUEUE_SIZE chains, a malformed idx must not loop forever.
    for _ in 0..usize::from(QUEUE_SIZE) * 2 {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let used = handle_chain(mem, chain, &mut scratch, &img, &dev, 0);
        if q.add_used(mem, head, used).is_err() {
            break;
        }
    }
}
