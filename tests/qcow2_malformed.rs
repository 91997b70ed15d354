//! Malformed images: each gives a clear error (or, for a decompression bomb, a bounded read),
//! never a panic, and the file stays byte-for-byte unchanged.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::IoSliceMut;
use std::path::Path;
use std::process::Command;

use vhost_user_qcow2::image::{self, ImageError, OpenOptions};
use vhost_user_qcow2::qcow2::Error as QErr;

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

fn hash(path: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    std::fs::read(path).expect("read").hash(&mut h);
    h.finish()
}

fn base(dir: &Path, compressed: bool) -> Vec<u8> {
    let raw = dir.join("src.raw");
    let img = dir.join("base.qcow2");
    let run = |args: &[&str], cmd: &str| {
        let o = Command::new(cmd).args(args).output().expect("spawn");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["create", "-q", "-f", "raw", p(&raw), "4M"], "qemu-img");
    run(
        &["-f", "raw", "-c", "write -P 0x61 0 1M", p(&raw)],
        "qemu-io",
    );
    let mut args = vec!["convert", "-O", "qcow2"];
    if compressed {
        args.push("-c");
    }
    args.extend_from_slice(&[p(&raw), p(&img)]);
    run(&args, "qemu-img");
    std::fs::read(&img).expect("read")
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Offset of the first L2 entry of guest cluster 0.
fn first_l2_entry(b: &[u8]) -> usize {
    let l1 = usize::try_from(get64(b, 40)).expect("l1");
    let l2 = get64(b, l1) & 0x00ff_ffff_ffff_fe00;
    usize::try_from(l2).expect("l2")
}

/// Opens (read-only and read-write) and reads everything; returns the first error.
fn try_image(path: &Path) -> Option<ImageError> {
    for ro in [true, false] {
        let opened = image::open(
            path,
            &OpenOptions {
                read_only: ro,
                ..Default::default()
            },
        );
        let img = match opened {
            Ok(i) => i,
            Err(e) => return Some(e),
        };
        let mut buf = vec![0u8; 65536];
        let mut pos = 0;
        while pos < img.capacity() {
            let n = (img.capacity() - pos).min(65536);
            let b = &mut buf[..usize::try_from(n).expect("n")];
            if let Err(e) = img.read(pos, &mut [IoSliceMut::new(b)]) {
                return Some(e);
            }
            pos += n;
        }
    }
    None
}

fn qerr(e: &ImageError) -> &QErr {
    match e {
        ImageError::Qcow2(q) => q,
        other => panic!("not a qcow2 error: {other:?}"),
    }
}

type Mutation = (&'static str, bool, fn(&mut Vec<u8>), fn(&QErr) -> bool);

const CASES: &[Mutation] = &[
    (
        "truncated header",
        false,
        |b| b.truncate(50),
        |e| matches!(e, QErr::Truncated { .. }),
    ),
    (
        "L1 size overflow",
        false,
        |b| put32(b, 36, u32::MAX),
        |e| matches!(e, QErr::InvalidHeader { .. }),
    ),
    (
        "L1 table past EOF",
        false,
        |b| put64(b, 40, 1 << 40),
        |e| {
            matches!(
                e,
                QErr::BadTable {
                    reason: "past the end of the file",
                    ..
                }
            )
        },
    ),
    (
        "L1 table overlapping the header",
        false,
        |b| put64(b, 40, 0),
        |e| {
            matches!(
                e,
                QErr::BadTable {
                    reason: "overlaps the header",
                    ..
                }
            )
        },
    ),
    (
        "refcount table past EOF",
        false,
        |b| put64(b, 48, 1 << 45),
        |e| matches!(e, QErr::BadTable { .. }),
    ),
    (
        "refcount table size 0",
        false,
        |b| put32(b, 56, 0),
        |e| matches!(e, QErr::InvalidHeader { .. }),
    ),
    (
        "cluster_bits 8",
        false,
        |b| put32(b, 20, 8),
        |e| matches!(e, QErr::ClusterBits(8)),
    ),
    (
        "cluster_bits 22",
        false,
        |b| put32(b, 20, 22),
        |e| matches!(e, QErr::ClusterBits(22)),
    ),
    (
        "cluster_bits 63",
        false,
        |b| put32(b, 20, 63),
        |e| matches!(e, QErr::ClusterBits(63)),
    ),
    (
        "backing name longer than 1023",
        false,
        |b| {
            put64(b, 8, 0x200);
            put32(b, 16, 2000);
        },
        |e| matches!(e, QErr::BackingNameTooLong(2000)),
    ),
    (
        "unknown incompatible bit",
        false,
        |b| put64(b, 72, 1 << 17),
        |e| matches!(e, QErr::UnknownIncompatible { bits } if *bits == 1 << 17),
    ),
    (
        "corrupt bit: read-only only",
        false,
        |b| put64(b, 72, 1 << 1),
        |e| matches!(e, QErr::Corrupt),
    ),
    (
        "crypt method 3",
        false,
        |b| put32(b, 32, 3),
        |e| matches!(e, QErr::CryptMethod(3)),
    ),
    (
        "too many snapshots",
        false,
        |b| put32(b, 60, 1 << 20),
        |e| matches!(e, QErr::InvalidHeader { .. }),
    ),
    (
        "header_length beyond the cluster",
        false,
        |b| put32(b, 100, 1 << 20),
        |e| matches!(e, QErr::InvalidHeader { .. }),
    ),
    (
        "extension running past the header cluster",
        false,
        |b| {
            // The first extension's length field.
            put32(b, 112 + 4, 0x7fff_fff0);
        },
        |e| matches!(e, QErr::InvalidHeader { .. }),
    ),
    (
        "FDE pointer on an unencrypted image",
        false,
        |b| {
            put32(b, 112, 0x0537_BE77);
        },
        |e| matches!(e, QErr::InvalidHeader { .. }),
    ),
    (
        "L2 table past EOF",
        false,
        |b| {
            let l1 = usize::try_from(get64(b, 40)).expect("l1");
            put64(b, l1, (1 << 40) | (1 << 63));
        },
        |e| matches!(e, QErr::BadOffset { .. }),
    ),
    (
        "compressed descriptor past EOF",
        true,
        |b| {
            let at = first_l2_entry(b);
            let e = get64(b, at);
            assert!(e & (1 << 62) != 0, "first cluster is compressed");
            // Keep the sector count, move the offset far past the end.
            let shift = 62 - (16 - 8);
            let sectors = e & !((1u64 << shift) - 1);
            put64(b, at, sectors | (1 << 40));
        },
        |e| matches!(e, QErr::Compressed { .. }),
    ),
    (
        "compressed garbage",
        true,
        |b| {
            let at = first_l2_entry(b);
            let e = get64(b, at);
            let off = usize::try_from(e & ((1u64 << 54) - 1)).expect("off");
            b[off..off + 64].fill(0xff);
        },
        |e| matches!(e, QErr::Compressed { .. }),
    ),
];

#[test]
fn malformed_images_are_refused_and_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = base(dir.path(), false);
    let comp = base(dir.path(), true);
    for (name, compressed, mutate, expect) in CASES {
        let mut b = if *compressed {
            comp.clone()
        } else {
            plain.clone()
        };
        mutate(&mut b);
        let path = dir.path().join("bad.qcow2");
        std::fs::write(&path, &b).expect("write");
        let before = hash(&path);
        let err = try_image(&path).unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(expect(qerr(&err)), "{name}: unexpected error {err:?}");
        assert!(!format!("{}", qerr(&err)).is_empty());
        assert_eq!(hash(&path), before, "{name}: file changed");
    }
}

#[test]
fn decompression_bomb_is_bounded_to_one_cluster() {
    use flate2::{Compress, Compression, FlushCompress};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = base(dir.path(), true);
    // 64 MiB of 0x62 deflates to ~64 KiB; the descriptor can only name 1 cluster + 1 sector of
    // input, and the output stops at one cluster.
    let mut c = Compress::new(Compression::best(), false);
    let src = vec![0x62u8; 64 << 20];
    let mut z = vec![0u8; 1 << 20];
    c.compress(&src, &mut z, FlushCompress::Finish)
        .expect("deflate");
    let zlen = usize::try_from(c.total_out()).expect("len");
    let at = first_l2_entry(&b);
    let off = b.len().next_multiple_of(512);
    b.resize(off, 0);
    let take = zlen.min(65536);
    b.extend_from_slice(&z[..take]);
    let sectors = u64::try_from(take.div_ceil(512) - 1).expect("n");
    put64(
        &mut b,
        at,
        (1 << 62) | (sectors << (62 - 8)) | u64::try_from(off).expect("off"),
    );
    let path = dir.path().join("bomb.qcow2");
    std::fs::write(&path, &b).expect("write");
    let before = hash(&path);
    let img = image::open(
        &path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .expect("open");
    let mut buf = vec![0u8; 65536];
    img.read(0, &mut [IoSliceMut::new(&mut buf)]).expect("read");
    assert!(buf.iter().all(|&x| x == 0x62));
    drop(img);
    assert_eq!(hash(&path), before);
}
