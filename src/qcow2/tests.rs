//! Unit tests of the qcow2 layer over MemStorage.
#![allow(clippy::cast_possible_truncation)] // test patterns truncate on purpose

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use super::check::{check, Repair};
use super::create::{create_on, CreateOptions, Preallocation};
use super::*;
use crate::storage::{self, MemStorage};

/// A MemStorage shared between the image and the test.
#[derive(Clone, Default)]
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

fn new_image(opts: &CreateOptions) -> Shared {
    let s = Shared::default();
    create_on(Box::new(s.clone()), opts).expect("create");
    s
}

fn open(s: &Shared) -> Qcow2 {
    Qcow2::open(Box::new(s.clone()), &Qcow2Options::default(), None, None).expect("open")
}

fn read_vec(img: &Qcow2, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0xAAu8; len];
    img.read(off, &mut [IoSliceMut::new(&mut v)]).expect("read");
    v
}

fn assert_clean(s: &Shared) {
    let r = check(s, None).expect("check");
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "check: {r:?}"
    );
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8))
        .collect()
}

#[test]
fn new_image_reads_zeroes_and_checks_clean() {
    let s = new_image(&CreateOptions {
        size: 1 << 30,
        ..Default::default()
    });
    assert_clean(&s);
    let img = open(&s);
    assert_eq!(img.size(), 1 << 30);
    assert!(read_vec(&img, 12345 * 512, 70000).iter().all(|&b| b == 0));
}

#[test]
fn writes_round_trip_across_clusters_and_iovecs() {
    let s = new_image(&CreateOptions {
        size: 64 << 20,
        cluster_size: 4096,
        ..Default::default()
    });
    let img = open(&s);
    let a = pattern(1, 3000);
    let b = pattern(2, 9000);
    img.write(1000, &[IoSlice::new(&a), IoSlice::new(&b)])
        .expect("write");
    // Overwrite in place (fast path) across the same clusters.
    let c = pattern(3, 5000);
    img.write(2500, &[IoSlice::new(&c)]).expect("write");
    let mut expect = vec![0u8; 16384];
    expect[1000..4000].copy_from_slice(&a);
    expect[4000..13000].copy_from_slice(&b);
    expect[2500..7500].copy_from_slice(&c);
    let mut x = vec![0u8; 7];
    let mut y = vec![0u8; 16384 - 7];
    img.read(0, &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)])
        .expect("read");
    x.extend_from_slice(&y);
    assert_eq!(x, expect);
    img.flush().expect("flush");
    drop(img);
    assert_clean(&s);
    let img = open(&s);
    assert_eq!(read_vec(&img, 0, 16384), expect);
}

#[test]
fn every_refcount_order_grows_blocks_and_table() {
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let s = new_image(&CreateOptions {
            size: 256 << 20,
            cluster_size: 512,
            refcount_bits: bits,
            ..Default::default()
        });
        let img = open(&s);
        // Enough clusters to need many refcount blocks and a bigger refcount table.
        let data = pattern(bits as u8, 512);
        for i in 0..3000u64 {
            img.write(i * 4096, &[IoSlice::new(&data)]).expect("write");
        }
        img.flush().expect("flush");
        assert_eq!(read_vec(&img, 2999 * 4096, 512), data);
        drop(img);
        let r = check(&s, None).expect("check");
        assert_eq!((r.corruptions, r.leaks), (0, 0), "bits {bits}: {r:?}");
        assert_eq!(r.allocated_clusters, 3000, "bits {bits}");
    }
}

#[test]
fn discard_and_write_zeroes_read_back_zero_and_free_clusters() {
    let s = new_image(&CreateOptions {
        size: 16 << 20,
        cluster_size: 65536,
        ..Default::default()
    });
    let img = open(&s);
    let d = pattern(9, 4 << 20);
    img.write(0, &[IoSlice::new(&d)]).expect("write");
    img.discard(65536, 3 * 65536 + 100).expect("discard");
    img.write_zeroes(1 << 20, 65536 * 2 + 4096).expect("zeroes");
    img.flush().expect("flush");
    let got = read_vec(&img, 0, 4 << 20);
    let mut expect = d.clone();
    expect[65536..4 * 65536].fill(0);
    expect[(1 << 20)..(1 << 20) + 2 * 65536 + 4096].fill(0);
    assert_eq!(got, expect);
    drop(img);
    let r = check(&s, None).expect("check");
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    assert_eq!(r.allocated_clusters, 64 - 3 - 2);
}

#[test]
fn dropped_references_are_leaks_until_flush_and_repair_fixes_them() {
    let s = new_image(&CreateOptions {
        size: 16 << 20,
        ..Default::default()
    });
    let img = open(&s);
    img.write(0, &[IoSlice::new(&pattern(1, 65536 * 4))])
        .expect("write");
    img.discard(0, 65536 * 4).expect("discard");
    // Simulate a crash before the flush: the image is leaked, never corrupt.
    let snapshot = s.0.contents();
    drop(img);
    let crashed = Shared(Arc::new(MemStorage::new(snapshot)));
    let r = check(&crashed, None).expect("check");
    assert_eq!(r.corruptions, 0);
    assert_eq!(r.leaks, 4);
    let r = check(&crashed, Some(Repair::Leaks)).expect("repair");
    assert_eq!((r.leaks_fixed, r.leaks, r.corruptions), (4, 0, 0));
    assert_clean(&s);
}

#[test]
fn preallocation_metadata_maps_every_cluster() {
    let s = new_image(&CreateOptions {
        size: 8 << 20,
        preallocation: Preallocation::Metadata,
        ..Default::default()
    });
    let r = check(&s, None).expect("check");
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    assert_eq!(r.allocated_clusters, 128);
    let img = open(&s);
    assert!(matches!(img.mapping(0).expect("map"), Mapping::Data { .. }));
    assert!(read_vec(&img, 0, 65536).iter().all(|&b| b == 0));
}

#[test]
fn luks_region_is_reserved_and_counted() {
    let s = Shared::default();
    let c = create_on(
        Box::new(s.clone()),
        &CreateOptions {
            size: 1 << 20,
            luks_header_len: Some(2_068_480),
            ..Default::default()
        },
    )
    .expect("create");
    let (off, len) = c.luks_region.expect("region");
    assert_eq!(off % 65536, 0);
    assert_eq!(len, 2_068_480);
    let p = probe(&s).expect("probe");
    assert_eq!(p.crypt_method, 2);
    assert_eq!(p.fde_header, Some((off, len)));
    assert_clean(&s);
    assert!(matches!(
        Qcow2::open(Box::new(s.clone()), &Qcow2Options::default(), None, None),
        Err(Error::NeedKey(2))
    ));
}

/// A toy ClusterCrypt: XOR with a key stream that depends on the host sector.
fn key(host_offset: u64, i: usize) -> u8 {
    let at = host_offset + i as u64;
    ((at / 512) as u8) ^ ((at % 512) as u8) ^ 0x5a
}

struct XorCrypt;

impl ClusterCrypt for XorCrypt {
    fn decrypt(
        &self,
        buf: &mut [u8],
        host: HostOffset,
        _g: GuestOffset,
    ) -> std::result::Result<(), CryptError> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key(host.0, i);
        }
        Ok(())
    }
    fn encrypt_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        host: HostOffset,
        _g: GuestOffset,
    ) -> std::result::Result<(), CryptError> {
        for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
            *d = *s ^ key(host.0, i);
        }
        Ok(())
    }
}

#[test]
fn cluster_crypt_round_trips_and_never_stores_plaintext() {
    let s = Shared::default();
    create_on(
        Box::new(s.clone()),
        &CreateOptions {
            size: 4 << 20,
            luks_header_len: Some(4096),
            ..Default::default()
        },
    )
    .expect("create");
    let img = Qcow2::open(
        Box::new(s.clone()),
        &Qcow2Options::default(),
        None,
        Some(Arc::new(XorCrypt)),
    )
    .expect("open");
    let data = vec![0x11u8; 3 * 512];
    let orig = data.clone();
    img.write(512, &[IoSlice::new(&data)]).expect("write");
    img.write(65536 - 512, &[IoSlice::new(&data)])
        .expect("write");
    assert_eq!(data, orig);
    let raw = s.0.contents();
    assert!(!raw.windows(512).any(|w| w.iter().all(|&b| b == 0x11)));
    let mut a = vec![0u8; 100];
    let mut b = vec![0u8; 1436];
    img.read(512, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
        .expect("read");
    assert!(a.iter().chain(b.iter()).all(|&x| x == 0x11));
    assert!(read_vec(&img, 65536 - 512, 1536).iter().all(|&x| x == 0x11));
    assert!(read_vec(&img, 0, 512).iter().all(|&x| x == 0));
}

#[test]
fn dirty_image_gets_refcounts_rebuilt() {
    let s = new_image(&CreateOptions {
        size: 16 << 20,
        ..Default::default()
    });
    {
        let img = open(&s);
        img.write(0, &[IoSlice::new(&pattern(3, 200_000))])
            .expect("write");
    }
    // Wipe the refcount block and set the dirty bit: as after a crash with lazy refcounts.
    let h = Header::read(&s).expect("header");
    let rt = h.refcount_table_offset;
    let mut e = [0u8; 8];
    s.read_at(&mut e, rt).expect("read");
    let blk = u64::from_be_bytes(e);
    s.write_at(&vec![0u8; 65536], blk).expect("wipe");
    s.write_at(&header::INCOMPAT_DIRTY.to_be_bytes(), header::OFF_INCOMPAT)
        .expect("dirty");
    assert!(check(&s, None).expect("check").corruptions > 0);
    let img = open(&s);
    assert_eq!(read_vec(&img, 0, 200_000), pattern(3, 200_000));
    drop(img);
    assert!(!Header::read(&s).expect("header").is_dirty());
    assert_clean(&s);
}

#[test]
fn refcount_table_growth_at_a_block_boundary_keeps_counts() {
    // 512-byte clusters, 16-bit refcounts: one table cluster covers 8 MiB of file, so writing
    // 9 MiB makes the table grow while the block for the next range does not exist yet.
    let s = new_image(&CreateOptions {
        size: 32 << 20,
        cluster_size: 512,
        ..Default::default()
    });
    let img = open(&s);
    let data = pattern(7, 65536);
    for i in 0..144u64 {
        img.write(i * 65536, &[IoSlice::new(&data)]).expect("write");
    }
    img.flush().expect("flush");
    drop(img);
    assert!(Header::read(&s).expect("header").refcount_table_clusters > 1);
    assert_clean(&s);
    let img = open(&s);
    for i in [0u64, 77, 143] {
        assert_eq!(read_vec(&img, i * 65536, 65536), data);
    }
}

#[test]
fn tiny_l2_cache_with_requests_spanning_many_tables() {
    // 512-byte clusters: one L2 table maps 32 KiB, so a 2 MiB write touches 64 tables while
    // the cache holds 16.
    let s = new_image(&CreateOptions {
        size: 8 << 20,
        cluster_size: 512,
        ..Default::default()
    });
    let img = Qcow2::open(
        Box::new(s.clone()),
        &Qcow2Options {
            read_only: false,
            l2_cache_bytes: 0,
        },
        None,
        None,
    )
    .expect("open");
    let data = pattern(5, 2 << 20);
    img.write(1000 * 512, &[IoSlice::new(&data)])
        .expect("write");
    img.write_zeroes(1500 * 512, 1 << 20).expect("zeroes");
    let mut expect = data.clone();
    expect[500 * 512..500 * 512 + (1 << 20)].fill(0);
    assert_eq!(read_vec(&img, 1000 * 512, 2 << 20), expect);
    drop(img);
    assert_clean(&s);
    let img = open(&s);
    assert_eq!(read_vec(&img, 1000 * 512, 2 << 20), expect);
}

#[test]
fn concurrent_writers_and_readers_keep_data_and_metadata_consistent() {
    let s = new_image(&CreateOptions {
        size: 64 << 20,
        cluster_size: 4096,
        ..Default::default()
    });
    let img = Arc::new(open(&s));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                // Each thread owns every 4th 64 KiB stripe; writes overlap clusters' halves.
                for round in 0..40u64 {
                    let stripe = (round * 4 + u64::from(t)) % 256;
                    let off = stripe * 65536 + (round % 3) * 512;
                    let data = vec![t + 1; 6000 + usize::from(t) * 512];
                    img.write(off, &[IoSlice::new(&data)]).expect("write");
                    let back = read_vec(&img, off, data.len());
                    assert_eq!(back, data, "thread {t} round {round}");
                    if round % 10 == 9 {
                        img.flush().expect("flush");
                        img.discard(stripe * 65536, 65536).expect("discard");
                    }
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("thread");
    }
    img.flush().expect("flush");
    drop(img);
    assert_clean(&s);
}

/// Random byte mutations of the metadata never panic, whatever the image says: open, read
/// everything, write a little, check.
#[test]
fn random_metadata_mutations_never_panic() {
    let base = new_image(&CreateOptions {
        size: 4 << 20,
        cluster_size: 4096,
        ..Default::default()
    });
    {
        let img = open(&base);
        img.write(0, &[IoSlice::new(&pattern(1, 300_000))])
            .expect("write");
        img.write(2 << 20, &[IoSlice::new(&pattern(2, 70_000))])
            .expect("write");
    }
    let orig = base.0.contents();
    let meta_len = 12 * 4096; // header, refcount table/block, L1, L2 tables, first data
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..1000 {
        let mut b = orig.clone();
        for _ in 0..(next() % 6 + 1) {
            let at = (next() % meta_len) as usize;
            b[at] = next() as u8;
        }
        let s = Shared(Arc::new(MemStorage::new(b)));
        let Ok(img) = Qcow2::open(Box::new(s.clone()), &Qcow2Options::default(), None, None) else {
            continue;
        };
        let mut buf = vec![0u8; 65536];
        let mut pos = 0;
        while pos < img.size() {
            let n = (img.size() - pos).min(65536) as usize;
            if img
                .read(pos, &mut [IoSliceMut::new(&mut buf[..n])])
                .is_err()
            {
                break;
            }
            pos += n as u64;
        }
        let _ = img.write(4096 * (next() % 1000), &[IoSlice::new(&[9u8; 5000])]);
        let _ = img.discard(0, 65536);
        let _ = img.flush();
        drop(img);
        let _ = check(&s, Some(Repair::All));
    }
}

#[test]
fn check_reports_progress_through_the_l1_table() {
    let s = new_image(&CreateOptions {
        size: 64 << 20,
        cluster_size: 4096,
        ..Default::default()
    });
    let calls = std::cell::Cell::new((0u64, 0u64));
    let progress = |done: u64, total: u64| calls.set((calls.get().0 + 1, total.max(done)));
    let r = super::check::check_with_progress(&s, None, Some(&progress)).expect("check");
    assert_eq!(r.corruptions, 0);
    // 64 MiB with 4 KiB clusters: 32 L1 entries of 2 MiB (512 L2 entries) each.
    assert_eq!(calls.get(), (32, 32));
}
