//! Interop matrix: images made by qemu-img / qemu-io read back byte-equal to QEMU's view through
//! our library; our writes keep `qemu-img check` clean and read back the same through QEMU.
//! Requires qemu-img and qemu-io (10.x) on PATH.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::process::Command;

use vhost_user_qcow2::image::{self, BlockImage, OpenOptions};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = img.to_str().expect("path");
    args.push(p);
    run("qemu-io", &args);
}

/// QEMU's view of the guest disk.
fn qemu_view(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("view.raw");
    let _ = std::fs::remove_file(&out);
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().expect("path"),
            out.to_str().expect("path"),
        ],
    );
    std::fs::read(&out).expect("read view")
}

fn our_view(img: &dyn BlockImage) -> Vec<u8> {
    let mut v = vec![0x5au8; usize::try_from(img.capacity()).expect("size")];
    // Odd-sized requests, each split into two iovecs, to exercise run splitting.
    let cap = img.capacity();
    let mut pos = 0u64;
    let mut k = 0usize;
    while pos < cap {
        let n = [7 * 512u64, 65536 + 512, 1 << 20, 3 << 20][k % 4].min(cap - pos);
        let s = usize::try_from(pos).expect("pos");
        let e = usize::try_from(pos + n).expect("end");
        let (a, b) = v[s..e].split_at_mut(usize::try_from(n / 2 / 512 * 512).expect("half"));
        img.read(pos, &mut [IoSliceMut::new(a), IoSliceMut::new(b)])
            .expect("read");
        pos += n;
        k += 1;
    }
    v
}

#[derive(serde::Deserialize, Debug)]
struct QemuCheck {
    #[serde(default)]
    corruptions: u64,
    #[serde(default)]
    leaks: u64,
    #[serde(default, rename = "check-errors")]
    check_errors: u64,
    #[serde(default, rename = "allocated-clusters")]
    allocated_clusters: u64,
    #[serde(default, rename = "compressed-clusters")]
    compressed_clusters: u64,
    #[serde(default, rename = "fragmented-clusters")]
    fragmented_clusters: u64,
    #[serde(default, rename = "total-clusters")]
    total_clusters: u64,
    #[serde(default, rename = "image-end-offset")]
    image_end_offset: u64,
}

/// Our check's figures must equal qemu-img check's.
fn assert_same_check(img: &Path, name: &str) -> u64 {
    let q = qemu_check(img);
    let st = vhost_user_qcow2::storage::FileStorage::open(img, Default::default()).expect("open");
    let r = vhost_user_qcow2::qcow2::check::check(&st, None).expect("check");
    assert_eq!(
        (
            r.corruptions,
            r.leaks,
            r.allocated_clusters,
            r.compressed_clusters,
            r.fragmented_clusters,
            r.total_clusters,
            r.image_end_offset
        ),
        (
            q.corruptions,
            q.leaks,
            q.allocated_clusters,
            q.compressed_clusters,
            q.fragmented_clusters,
            q.total_clusters,
            q.image_end_offset
        ),
        "{name}: our check vs qemu-img check"
    );
    r.compressed_clusters
}

fn qemu_check(img: &Path) -> QemuCheck {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", img.to_str().expect("path")])
        .output()
        .expect("spawn");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check output: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn assert_qemu_clean(img: &Path) {
    let c = qemu_check(img);
    assert_eq!(
        (c.corruptions, c.leaks, c.check_errors),
        (0, 0, 0),
        "qemu-img check of {}: {c:?}",
        img.display()
    );
}

/// QEMU-written content to start from.
const SEED: &[&str] = &[
    "write -P 0x11 0 100k",
    "write -P 0x22 1M 64k",
    "write -P 0x33 3145216 4k",
    "write -z 1088k 64k",
    "write -P 0x44 5M 2M",
];

/// Our writes: (offset, len, byte); a 0 byte is write-zeroes; 0xFF discard.
const OURS: &[(u64, u64, u8)] = &[
    (512, 1024, 0xA1),
    (65536 - 512, 4096, 0xA2),
    (1 << 20, 200 * 1024, 0xA3),
    (3 << 20, 512, 0xA4),
    (5 << 20, 128 * 1024, 0),
    (6 << 20, 64 * 1024, 0xA5),
    (9 << 20, 3 << 20, 0xA6),
    (15 << 20, 1 << 20, 0xA7),
];

fn apply_ours(img: &dyn BlockImage, expect: &mut [u8]) {
    for &(off, len, b) in OURS {
        let s = usize::try_from(off).expect("off");
        let e = usize::try_from(off + len).expect("end");
        if b == 0 {
            img.write_zeroes(off, len, true).expect("zeroes");
            expect[s..e].fill(0);
        } else {
            let data = vec![b; e - s];
            img.write(off, &[IoSlice::new(&data)]).expect("write");
            expect[s..e].fill(b);
        }
    }
    img.flush().expect("flush");
}

struct Case {
    name: &'static str,
    /// Makes `img` (qcow2) in `dir`.
    make: fn(&Path, &Path),
}

fn create(img: &Path, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(img.to_str().expect("path"));
    args.push("16M");
    run("qemu-img", &args);
    qemu_io(img, "qcow2", SEED);
}

fn compressed(img: &Path, dir: &Path, opts: &str) {
    let raw = dir.join("src.raw");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", raw.to_str().expect("p"), "16M"],
    );
    qemu_io(&raw, "raw", SEED);
    let mut args = vec!["convert", "-c", "-O", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(raw.to_str().expect("p"));
    args.push(img.to_str().expect("p"));
    run("qemu-img", &args);
}

fn overlay(img: &Path, dir: &Path, base_fmt: &str) {
    let base = dir.join(format!("base.{base_fmt}"));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            base_fmt,
            base.to_str().expect("p"),
            "12M",
        ],
    );
    qemu_io(
        &base,
        base_fmt,
        &["write -P 0x77 0 12M", "write -P 0x78 700k 3k"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &format!("base.{base_fmt}"),
            "-F",
            base_fmt,
            img.to_str().expect("p"),
            "16M",
        ],
    );
    qemu_io(img, "qcow2", &["write -P 0x12 64k 4k", "write -z 2M 64k"]);
}

const CASES: &[Case] = &[
    Case {
        name: "v2",
        make: |i, _| create(i, "compat=0.10"),
    },
    Case {
        name: "v3-default",
        make: |i, _| create(i, ""),
    },
    Case {
        name: "cluster-512",
        make: |i, _| create(i, "cluster_size=512"),
    },
    Case {
        name: "cluster-2M",
        make: |i, _| create(i, "cluster_size=2M"),
    },
    Case {
        name: "refcount-1",
        make: |i, _| create(i, "refcount_bits=1"),
    },
    Case {
        name: "refcount-64",
        make: |i, _| create(i, "refcount_bits=64"),
    },
    Case {
        name: "lazy-refcounts",
        make: |i, _| create(i, "lazy_refcounts=on"),
    },
    Case {
        name: "compressed-deflate",
        make: |i, d| compressed(i, d, ""),
    },
    Case {
        name: "compressed-zstd",
        make: |i, d| compressed(i, d, "compression_type=zstd"),
    },
    Case {
        name: "extended-l2",
        make: |i, _| create(i, "extended_l2=on"),
    },
    Case {
        name: "extended-l2-overlay",
        make: |i, d| {
            overlay(i, d, "qcow2");
            let tmp = d.join("x.qcow2");
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "extended_l2=on,cluster_size=128k",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    tmp.to_str().expect("p"),
                    "16M",
                ],
            );
            qemu_io(
                &tmp,
                "qcow2",
                &[
                    "write -P 0x12 64k 4k",
                    "write -z 2M 64k",
                    "write -P 0x13 300k 8k",
                ],
            );
            std::fs::rename(&tmp, i).expect("rename");
        },
    },
    Case {
        name: "data-file",
        make: |i, d| {
            let df = d.join("img.data");
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("data_file={}", df.display()),
                    i.to_str().expect("p"),
                    "16M",
                ],
            );
            qemu_io(i, "qcow2", SEED);
        },
    },
    Case {
        name: "overlay-on-qcow2",
        make: |i, d| overlay(i, d, "qcow2"),
    },
    Case {
        name: "overlay-on-raw",
        make: |i, d| overlay(i, d, "raw"),
    },
];

fn round_trip(case: &Case) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img.qcow2");
    (case.make)(&img, dir.path());
    let qemu_before = qemu_view(&img, dir.path());
    let compressed = assert_same_check(&img, case.name);
    assert_eq!(
        compressed > 0,
        case.name.starts_with("compressed"),
        "{}",
        case.name
    );
    // An external data file is opened only when named by the caller (the operator's consent).
    let opts = OpenOptions {
        data_file: (case.name == "data-file").then(|| dir.path().join("img.data")),
        ..Default::default()
    };
    let opened = image::open(&img, &opts).unwrap_or_else(|e| panic!("{}: open: {e:?}", case.name));
    let ours = our_view(opened.as_ref());
    assert!(ours == qemu_before, "{}: read differs from qemu", case.name);
    let mut expect = qemu_before;
    apply_ours(opened.as_ref(), &mut expect);
    assert!(
        our_view(opened.as_ref()) == expect,
        "{}: our read-back of our writes",
        case.name
    );
    drop(opened);
    assert_qemu_clean(&img);
    let qemu_after = qemu_view(&img, dir.path());
    assert!(qemu_after == expect, "{}: qemu reads our writes", case.name);
    assert_same_check(&img, case.name);
}

#[test]
fn interop_matrix_reads_and_writes_match_qemu() {
    for case in CASES {
        round_trip(case);
    }
}

#[test]
fn internal_snapshot_survives_our_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img.qcow2");
    create(&img, "");
    let at_snapshot = qemu_view(&img, dir.path());
    run(
        "qemu-img",
        &["snapshot", "-c", "s1", img.to_str().expect("p")],
    );
    qemu_io(&img, "qcow2", &["write -P 0x55 32k 64k"]);
    let before = qemu_view(&img, dir.path());
    let opened = image::open(&img, &OpenOptions::default()).expect("open");
    assert!(our_view(opened.as_ref()) == before);
    let mut expect = before;
    apply_ours(opened.as_ref(), &mut expect);
    drop(opened);
    assert_qemu_clean(&img);
    assert!(qemu_view(&img, dir.path()) == expect);
    let list = run("qemu-img", &["snapshot", "-l", img.to_str().expect("p")]);
    assert!(list.contains("s1"), "{list}");
    run(
        "qemu-img",
        &["snapshot", "-a", "s1", img.to_str().expect("p")],
    );
    assert!(
        qemu_view(&img, dir.path()) == at_snapshot,
        "snapshot content changed"
    );
    assert_qemu_clean(&img);
}

#[test]
fn unsupported_features_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("x.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "--object",
            "secret,id=sec0,data=abc",
            img.to_str().expect("p"),
            "1M",
        ],
    );
    let e = image::open(&img, &OpenOptions::default())
        .err()
        .expect("refused");
    let msg = format!(
        "{e}: {:?}",
        std::error::Error::source(&e).map(ToString::to_string)
    );
    assert!(msg.contains("encrypted (LUKS): a key is needed"), "{msg}");
}

#[test]
fn backing_deny_and_loops_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a: PathBuf = dir.path().join("a.qcow2");
    let b: PathBuf = dir.path().join("b.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", a.to_str().expect("p"), "1M"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            b.to_str().expect("p"),
            "1M",
        ],
    );
    let deny = OpenOptions {
        backing: image::BackingPolicy::Deny,
        ..Default::default()
    };
    assert!(matches!(
        image::open(&b, &deny),
        Err(image::ImageError::BackingDenied { .. })
    ));
    // Make a point back at b: a loop.
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            a.to_str().expect("p"),
        ],
    );
    assert!(matches!(
        image::open(&b, &OpenOptions::default()),
        Err(image::ImageError::BackingChain { .. })
    ));
}

/// We do not maintain persistent bitmaps: the first write clears autoclear bit 0, after which
/// QEMU (and our check) no longer count the bitmap clusters, so they show up as leaks, exactly
/// as QEMU warns ("Some clusters may be leaked"). Our repair then leaves a clean image.
#[test]
fn bitmaps_are_invalidated_like_qemu_and_repair_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("bm.qcow2");
    create(&img, "");
    run(
        "qemu-img",
        &["bitmap", "--add", img.to_str().expect("p"), "b0"],
    );
    qemu_io(&img, "qcow2", &["write -P 0x66 8M 1M"]);
    assert_same_check(&img, "bitmap before");
    assert_qemu_clean(&img);
    let before = qemu_view(&img, dir.path());
    let opened = image::open(&img, &OpenOptions::default()).expect("open");
    let mut expect = before;
    apply_ours(opened.as_ref(), &mut expect);
    drop(opened);
    let c = qemu_check(&img);
    assert_eq!(c.corruptions, 0);
    assert!(c.leaks > 0, "bitmap clusters should now be leaked: {c:?}");
    assert_same_check(&img, "bitmap after");
    let st = vhost_user_qcow2::storage::FileStorage::open(&img, Default::default()).expect("open");
    vhost_user_qcow2::qcow2::check::check(&st, Some(vhost_user_qcow2::qcow2::check::Repair::Leaks))
        .expect("repair");
    drop(st);
    assert_qemu_clean(&img);
    assert!(qemu_view(&img, dir.path()) == expect);
}

/// An image QEMU left dirty (lazy refcounts, qemu-io `abort`): refcounts on disk are stale.
/// Opening it read-write rebuilds them; qemu-img check is then clean and the data intact.
#[test]
fn dirty_lazy_refcount_image_from_qemu_is_rebuilt_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("lazy.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            img.to_str().expect("p"),
            "16M",
        ],
    );
    // qemu-io's `abort` kills qemu-io itself (SIGABRT): that is the point.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x12 4M 64k",
            "-c",
            "abort",
        ])
        .arg(&img)
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    let c = qemu_check(&img);
    assert!(
        c.corruptions > 0,
        "QEMU's crash should leave stale refcounts: {c:?}"
    );
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let opened = image::open(&img, &ro).expect("read-only open of a dirty image");
    let mut expect = vec![0u8; 16 << 20];
    expect[..1 << 20].fill(0x11);
    expect[4 << 20..(4 << 20) + 65536].fill(0x12);
    assert!(our_view(opened.as_ref()) == expect);
    drop(opened);
    let opened = image::open(&img, &OpenOptions::default()).expect("read-write open");
    drop(opened);
    assert_qemu_clean(&img);
    assert!(qemu_view(&img, dir.path()) == expect);
}
