//! Unit tests of chain parsing, over a real `GuestMemoryMmap`.

use super::*;
use crate::image::raw::RawImage;
use crate::storage::MemStorage;
use crate::virtio_blk::exec::{handle_chain, Device};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 1 << 20;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0x2000;

fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM).expect("fits"))])
        .expect("guest memory")
}

fn limits() -> Limits {
    Limits {
        capacity_sectors: 64,
        block_size: 512,
        seg_max: 4,
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 32,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 32,
        max_write_zeroes_seg: 4,
    }
}

fn header(m: &GuestMemoryMmap<()>, kind: u32, sector: u64) {
    m.write_obj(kind, GuestAddress(HDR)).expect("w");
    m.write_obj(0u32, GuestAddress(HDR + 4)).expect("w");
    m.write_obj(sector, GuestAddress(HDR + 8)).expect("w");
}

fn r(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, 0, 0)
}

fn w(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(
        addr,
        len,
        u16::try_from(VRING_DESC_F_WRITE).expect("fits"),
        0,
    )
}

fn parse_err(m: &GuestMemoryMmap<()>, chain: Vec<Descriptor>, l: &Limits) -> RequestError {
    let mut s = Scratch::with_capacity(l.seg_max);
    match parse(m, chain.into_iter(), l, &mut s) {
        Parsed::Invalid { error, .. } => error,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn read_request_parses_offset_and_len() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 3);
    let mut s = Scratch::with_capacity(4);
    let chain = vec![r(HDR, 16), w(DATA, 512), w(DATA + 4096, 1024), w(STATUS, 1)];
    match parse(&m, chain.into_iter(), &limits(), &mut s) {
        Parsed::Ok(req) => {
            assert_eq!(req.kind, RequestKind::In { offset: 3 * 512 });
            assert_eq!(req.data_len(), 1536);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn header_and_data_may_share_descriptors() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 1);
    let mut s = Scratch::with_capacity(4);
    // Header split 10 + 6, and the second piece carries 512 bytes of data after it.
    let chain = vec![r(HDR, 10), r(HDR + 10, 6 + 512), w(STATUS, 1)];
    match parse(&m, chain.into_iter(), &limits(), &mut s) {
        Parsed::Ok(req) => {
            assert_eq!(req.kind, RequestKind::Out { offset: 512 });
            assert_eq!(req.data_len(), 512);
            assert_eq!(req.data().len(), 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn header_shorter_than_16_bytes_is_ioerr() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let e = parse_err(&m, vec![r(HDR, 8), w(STATUS, 1)], &limits());
    assert_eq!(e, RequestError::HeaderTooShort { len: 8 });
}

#[test]
fn read_only_status_descriptor_drops_the_chain() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let mut s = Scratch::default();
    let chain = vec![r(HDR, 16), w(DATA, 512), r(STATUS, 1)];
    assert!(matches!(
        parse(&m, chain.into_iter(), &limits(), &mut s),
        Parsed::Dropped(RequestError::NoStatus)
    ));
    let chain = vec![r(HDR, 16), w(STATUS, 0)];
    assert!(matches!(
        parse(&m, chain.into_iter(), &limits(), &mut s),
        Parsed::Dropped(_)
    ));
    let chain = vec![r(HDR, 16), w(MEM, 1)];
    assert!(matches!(
        parse(&m, chain.into_iter(), &limits(), &mut s),
        Parsed::Dropped(_)
    ));
}

#[test]
fn request_past_capacity_is_out_of_range() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 63);
    let e = parse_err(&m, vec![r(HDR, 16), w(DATA, 1024), w(STATUS, 1)], &limits());
    assert!(matches!(e, RequestError::OutOfRange { sector: 63, .. }));
}

#[test]
fn overflowing_sector_is_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, u64::MAX);
    let e = parse_err(&m, vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &limits());
    assert_eq!(e, RequestError::SectorOverflow { sector: u64::MAX });
    let l = Limits {
        capacity_sectors: u64::MAX,
        ..limits()
    };
    header(&m, VIRTIO_BLK_T_IN, u64::MAX - 1);
    let e = parse_err(&m, vec![r(HDR, 16), w(DATA, 1024), w(STATUS, 1)], &l);
    assert!(matches!(e, RequestError::SectorOverflow { .. }));
    // A discard whose sector + count wraps u64 is out of range, not wrapped around.
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    dwz(&m, DATA, u64::MAX - 1, 4, 0);
    let e = parse_err(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &l);
    assert!(matches!(e, RequestError::OutOfRange { .. }));
}

#[test]
fn too_many_segments_are_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let mut chain = vec![r(HDR, 16)];
    for i in 0..5 {
        chain.push(w(DATA + i * 512, 512));
    }
    chain.push(w(STATUS, 1));
    let e = parse_err(&m, chain, &limits());
    assert!(matches!(e, RequestError::TooManySegments { .. }));
}

#[test]
fn unknown_type_is_unsupported_and_descriptor_order_checked() {
    let m = mem();
    header(&m, 0x77, 0);
    let e = parse_err(&m, vec![r(HDR, 16), w(STATUS, 1)], &limits());
    assert_eq!(e, RequestError::Unsupported { kind: 0x77 });
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let e = parse_err(&m, vec![w(DATA, 512), r(HDR, 16), w(STATUS, 1)], &limits());
    assert_eq!(e, RequestError::DescriptorOrder);
}

#[test]
fn descriptor_outside_memory_and_wrong_direction_are_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let e = parse_err(
        &m,
        vec![r(HDR, 16), w(MEM - 256, 512), w(STATUS, 1)],
        &limits(),
    );
    assert!(matches!(e, RequestError::BadAddress { .. }));
    let e = parse_err(&m, vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &limits());
    assert!(matches!(e, RequestError::WrongDirection { .. }));
}

#[test]
fn unaligned_request_on_4k_disk_is_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 1);
    let l = Limits {
        block_size: 4096,
        ..limits()
    };
    let e = parse_err(&m, vec![r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &l);
    assert!(matches!(e, RequestError::Unaligned { .. }));
}

fn dwz(m: &GuestMemoryMmap<()>, at: u64, sector: u64, num: u32, flags: u32) {
    m.write_obj(sector, GuestAddress(at)).expect("w");
    m.write_obj(num, GuestAddress(at + 8)).expect("w");
    m.write_obj(flags, GuestAddress(at + 12)).expect("w");
}

#[test]
fn discard_and_write_zeroes_segments_are_validated() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dwz(&m, DATA, 2, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    dwz(&m, DATA + 16, 10, 2, 0);
    let mut s = Scratch::default();
    let chain = vec![r(HDR, 16), r(DATA, 32), w(STATUS, 1)];
    match parse(&m, chain.into_iter(), &limits(), &mut s) {
        Parsed::Ok(req) => {
            assert_eq!(req.kind, RequestKind::WriteZeroes { count: 2 });
            assert_eq!(
                req.ranges[0],
                ByteRange {
                    offset: 1024,
                    len: 2048,
                    unmap: true
                }
            );
            assert!(!req.ranges[1].unmap);
        }
        other => panic!("{other:?}"),
    }
    // DISCARD must not carry the unmap flag.
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    let e = parse_err(&m, vec![r(HDR, 16), r(DATA, 32), w(STATUS, 1)], &limits());
    assert!(matches!(e, RequestError::BadDwzFlags { .. }));
    // Past capacity, and too large.
    dwz(&m, DATA, 60, 8, 0);
    let e = parse_err(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &limits());
    assert!(matches!(e, RequestError::OutOfRange { .. }));
    dwz(&m, DATA, 0, 33, 0);
    let e = parse_err(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &limits());
    assert!(matches!(e, RequestError::DwzSegmentTooLarge { .. }));
    let e = parse_err(&m, vec![r(HDR, 16), r(DATA, 15), w(STATUS, 1)], &limits());
    assert!(matches!(e, RequestError::BadSegmentPayload { .. }));
}

fn run(m: &GuestMemoryMmap<()>, img: &RawImage, chain: Vec<Descriptor>, l: &Limits) -> (u8, u32) {
    let serial = *b"serial-0123\0\0\0\0\0\0\0\0\0";
    let dev = Device {
        limits: l,
        serial: &serial,
        writethrough: false,
    };
    let mut s = Scratch::default();
    m.write_obj(0xffu8, GuestAddress(STATUS)).expect("w");
    let used = handle_chain(m, chain.into_iter(), &mut s, img, &dev, 0);
    let st: u8 = m.read_obj(GuestAddress(STATUS)).expect("r");
    (st, used)
}

#[test]
fn handle_chain_moves_data_and_writes_status() {
    let m = mem();
    let img = RawImage::new(Box::new(MemStorage::new(vec![0; 64 * 512])), false).expect("img");
    let l = limits();
    m.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .expect("w");
    header(&m, VIRTIO_BLK_T_OUT, 4);
    let (st, used) = run(&m, &img, vec![r(HDR, 16), r(DATA, 1024), w(STATUS, 1)], &l);
    assert_eq!((u32::from(st), used), (VIRTIO_BLK_S_OK, 1));

    header(&m, VIRTIO_BLK_T_IN, 4);
    let (st, used) = run(
        &m,
        &img,
        vec![r(HDR, 16), w(DATA + 8192, 1024), w(STATUS, 1)],
        &l,
    );
    assert_eq!((u32::from(st), used), (VIRTIO_BLK_S_OK, 1025));
    let mut back = [0u8; 1024];
    m.read_slice(&mut back, GuestAddress(DATA + 8192))
        .expect("r");
    assert_eq!(back, [0xab; 1024]);

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let (st, used) = run(&m, &img, vec![r(HDR, 16), w(DATA, 20), w(STATUS, 1)], &l);
    assert_eq!((u32::from(st), used), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).expect("r");
    assert_eq!(&id[..11], b"serial-0123");

    header(&m, VIRTIO_BLK_T_IN, 64);
    let (st, _) = run(&m, &img, vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &l);
    assert_eq!(u32::from(st), VIRTIO_BLK_S_IOERR);

    header(&m, 0x1234, 0);
    let (st, _) = run(&m, &img, vec![r(HDR, 16), w(STATUS, 1)], &l);
    assert_eq!(u32::from(st), VIRTIO_BLK_S_UNSUPP);

    // Dropped chain: nothing written, used length 0.
    let (st, used) = run(&m, &img, vec![r(HDR, 16), r(STATUS, 1)], &l);
    assert_eq!((st, used), (0xff, 0));
}

#[test]
fn write_to_read_only_image_is_ioerr() {
    let m = mem();
    let img = RawImage::new(Box::new(MemStorage::new(vec![0; 64 * 512])), true).expect("img");
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let (st, _) = run(
        &m,
        &img,
        vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
        &limits(),
    );
    assert_eq!(u32::from(st), VIRTIO_BLK_S_IOERR);
}
