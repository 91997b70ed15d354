//! Hardening regressions: dirty-image refcount rebuilds and opens that must refuse cleanly
//! (never abort, never rewrite the file) on huge sparse files or malformed metadata.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::IoSliceMut;
use std::path::Path;
use std::process::Command;

use vhost_user_qcow2::image::{self, ImageError, OpenOptions};
use vhost_user_qcow2::qcow2::check::check;
use vhost_user_qcow2::qcow2::Error as QErr;
use vhost_user_qcow2::storage::{FileStorage, OpenFlags};

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

fn run(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().expect("spawn");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn hash(path: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    std::fs::read(path).expect("read").hash(&mut h);
    h.finish()
}

fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Offset of the first L2 entry of guest cluster 0.
fn first_l2_entry(b: &[u8]) -> usize {
    let l1 = usize::try_from(get64(b, 40)).expect("l1");
    usize::try_from(get64(b, l1) & 0x00ff_ffff_ffff_fe00).expect("l2")
}

/// A qcow2 image with lazy refcounts and `0x61` in its first 128 KiB, left dirty.
fn dirty_image(dir: &Path, opts: &str) -> std::path::PathBuf {
    let img = dir.join("a.qcow2");
    let o = format!("lazy_refcounts=on,{opts}");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &o, p(&img), "64M"],
    );
    run("qemu-io", &["-c", "write -P 0x61 0 128k", p(&img)]);
    set_dirty(&img, |_| {});
    img
}

/// Applies `f` to the file's bytes and sets the dirty bit (incompatible bit 0).
fn set_dirty(img: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(img).expect("read");
    f(&mut b);
    let inc = get64(&b, 72) | 1;
    put64(&mut b, 72, inc);
    std::fs::write(img, &b).expect("write");
}

fn open_rw(img: &Path) -> Result<Box<dyn image::BlockImage>, ImageError> {
    image::open(img, &OpenOptions::default())
}

fn qerr(e: &ImageError) -> &QErr {
    match e {
        ImageError::Qcow2(q) => q,
        other => panic!("not a qcow2 error: {other:?}"),
    }
}

fn file_storage(img: &Path, read_only: bool) -> FileStorage {
    FileStorage::open(
        img,
        OpenFlags {
            read_only,
            direct: false,
        },
    )
    .expect("open")
}

/// 8 TiB sparse file, 512-byte clusters: counting per file cluster would allocate 64 GiB.
/// Opening refuses with TooLarge (the refcount table the rebuild needs exceeds the cap), and
/// `check` counts without aborting.
#[test]
fn dirty_sparse_8t_image_with_small_clusters_is_refused_not_aborted() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dirty_image(dir.path(), "cluster_size=512");
    std::fs::File::options()
        .write(true)
        .open(&img)
        .expect("open")
        .set_len(8 << 40)
        .expect("truncate");
    let before = hash_head(&img);
    let r = check(&file_storage(&img, true), None).expect("check");
    assert_eq!(r.corruptions, 0, "{r:?}");
    match open_rw(&img) {
        Err(e) => assert!(matches!(qerr(&e), QErr::TooLarge), "{e:?}"),
        Ok(_) => panic!("rebuild of an 8 TiB file with 512-byte clusters accepted"),
    }
    assert_eq!(hash_head(&img), before, "refused open changed the file");
}

/// Same with 64 KiB clusters: the rebuild succeeds and the image checks clean.
#[test]
fn dirty_sparse_8t_image_is_rebuilt_and_checks_clean() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dirty_image(dir.path(), "cluster_size=65536");
    std::fs::File::options()
        .write(true)
        .open(&img)
        .expect("open")
        .set_len(8 << 40)
        .expect("truncate");
    {
        let i = open_rw(&img).expect("open dirty 8T image");
        let mut b = vec![0u8; 131072];
        i.read(0, &mut [IoSliceMut::new(&mut b)]).expect("read");
        assert!(b.iter().all(|&x| x == 0x61));
    }
    let r = check(&file_storage(&img, true), None).expect("check");
    assert_eq!((r.corruptions, r.check_errors), (0, 0), "{r:?}");
}

/// Hash of the first 1 MiB (the part of a sparse 8 TiB file that has data).
fn hash_head(path: &Path) -> u64 {
    use std::io::Read;
    let mut b = vec![0u8; 1 << 20];
    let mut f = std::fs::File::open(path).expect("open");
    let n = f.read(&mut b).expect("read");
    let mut h = DefaultHasher::new();
    b[..n].hash(&mut h);
    h.finish()
}

/// An L2 entry past the end of the file is a corruption: the rebuild refuses, file untouched.
#[test]
fn dirty_image_with_corruption_is_not_rebuilt() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dirty_image(dir.path(), "cluster_size=65536");
    set_dirty(&img, |b| {
        let e = first_l2_entry(b);
        put64(b, e, (1u64 << 40) | (1 << 63));
    });
    let before = hash(&img);
    let e = open_rw(&img)
        .err()
        .expect("dirty corrupt image opened read-write");
    assert!(matches!(qerr(&e), QErr::Corrupt), "{e:?}");
    assert_eq!(hash(&img), before, "refused rebuild changed the file");
}

/// 1-bit refcounts and two L2 entries sharing a cluster: the count 2 does not fit.
#[test]
fn dirty_image_refcount_overflow_is_an_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dirty_image(dir.path(), "cluster_size=65536,refcount_bits=1");
    set_dirty(&img, |b| {
        let e = first_l2_entry(b);
        let v = get64(b, e);
        put64(b, e + 8, v);
    });
    let before = hash(&img);
    let e = open_rw(&img).err().expect("overflowing refcount accepted");
    assert!(matches!(qerr(&e), QErr::RefcountOverflow { .. }), "{e:?}");
    assert_eq!(hash(&img), before, "refused rebuild changed the file");
}

/// A refcount-table entry or an L1 entry far past the end of the file: a read-write open
/// refuses it (the first allocation would write at ~2^50), the file untouched.
#[test]
fn table_offsets_past_eof_are_refused_read_write() {
    type Mutate = fn(&mut Vec<u8>);
    let cases: [(&str, Mutate); 2] = [
        ("refcount block", |b| {
            let rt = usize::try_from(get64(b, 48)).expect("rt");
            put64(b, rt, 1 << 50);
        }),
        ("L2 table", |b| {
            let l1 = usize::try_from(get64(b, 40)).expect("l1");
            put64(b, l1, (1 << 50) | (1 << 63));
        }),
    ];
    for (name, f) in cases {
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("a.qcow2");
        run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
        run("qemu-io", &["-c", "write -P 0x61 0 128k", p(&img)]);
        let mut b = std::fs::read(&img).expect("read");
        f(&mut b);
        std::fs::write(&img, &b).expect("write");
        let before = hash(&img);
        match open_rw(&img) {
            Err(e) => assert!(
                matches!(qerr(&e), QErr::BadTable { what, .. } if *what == name),
                "{name}: {e:?}"
            ),
            Ok(i) => {
                let _ = i.write(1 << 20, &[std::io::IoSlice::new(&[1u8; 4096])]);
                drop(i);
                panic!(
                    "{name} past EOF accepted; file is now {} bytes",
                    std::fs::metadata(&img).expect("stat").len()
                );
            }
        }
        assert_eq!(hash(&img), before, "{name}: refused open changed the file");
    }
}

/// A malformed L2 entry (COPIED) pointing at the refcount table / L1 table / header: the guest
/// write is refused, the image turns read-only, and the metadata is not overwritten.
#[test]
fn data_write_over_metadata_is_refused_and_image_turns_read_only() {
    type Target = fn(&[u8]) -> u64;
    let targets: [(&str, Target); 4] = [
        ("refcount table", |b| get64(b, 48)),
        ("L1 table", |b| get64(b, 40)),
        ("refcount block", |b| {
            get64(b, usize::try_from(get64(b, 48)).expect("rt")) & !0x1ff
        }),
        ("L2 table", |b| first_l2_entry(b) as u64),
    ];
    for (name, target) in targets {
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("a.qcow2");
        run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
        run("qemu-io", &["-c", "write -P 0x61 0 128k", p(&img)]);
        let mut b = std::fs::read(&img).expect("read");
        let meta = target(&b);
        let e = first_l2_entry(&b);
        // Guest cluster 1 (cluster 0 stays valid for the fast path).
        put64(&mut b, e + 8, meta | (1 << 63));
        std::fs::write(&img, &b).expect("write");
        // The first write of an open goes through the slow path, later ones the fast path.
        for fast in [false, true] {
            let i = open_rw(&img).expect("open");
            let buf = [0xeeu8; 4096];
            if fast {
                assert!(i.write(0, &[std::io::IoSlice::new(&buf)]).is_ok());
            }
            let r = i.write(65536, &[std::io::IoSlice::new(&buf)]);
            assert!(
                r.is_err(),
                "{name} (fast {fast}): write over metadata accepted"
            );
            assert!(
                i.read_only(),
                "{name}: image not read-only after the overlap"
            );
            assert!(i.write(1 << 20, &[std::io::IoSlice::new(&buf)]).is_err());
        }
        let after = std::fs::read(&img).expect("read");
        let m = usize::try_from(meta).expect("offset");
        assert_eq!(&after[m..m + 4096], &b[m..m + 4096], "{name} overwritten");
    }
}

fn qemu_img_check_clean(img: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "--output=json", p(img)])
        .output()
        .expect("spawn qemu-img");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "qemu-img check: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("check json");
    for key in ["corruptions", "leaks", "check-errors"] {
        let n = v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
        assert_eq!(n, 0, "qemu-img check reports {key}: {out}");
    }
}

/// Issue 8 item 3: on an extended-L2 image, a write into the second half of a freshly
/// allocated L2 table's span succeeds, reads back, and checks clean (a new table once had
/// half the words that 128-bit entries need, and the write panicked the worker).
#[test]
fn extended_l2_write_in_second_half_of_new_table() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("x.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            p(&img),
            "1G",
        ],
    );
    // 64 KiB clusters: 4096 extended entries (8192 words) per L2 table, spanning 256 MiB; 130
    // MiB is entry 2080 (words 4160..4162) of the new table 0, 200 MiB entry 3200.
    let offsets = [130u64 << 20, 200 << 20, (130 << 20) + 12 * 1024];
    {
        let i = open_rw(&img).expect("open");
        for (k, &off) in offsets.iter().enumerate() {
            let buf = vec![0x30 + u8::try_from(k).expect("small"); 4096];
            i.write(off, &[std::io::IoSlice::new(&buf)])
                .unwrap_or_else(|e| panic!("write at {off:#x}: {e:?}"));
        }
        for (k, &off) in offsets.iter().enumerate() {
            let mut got = vec![0u8; 4096];
            i.read(off, &mut [IoSliceMut::new(&mut got)]).expect("read");
            assert!(got
                .iter()
                .all(|&x| x == 0x30 + u8::try_from(k).expect("small")));
        }
        i.flush().expect("flush");
    }
    qemu_img_check_clean(&img);
    for (k, &off) in offsets.iter().enumerate() {
        let cmd = format!("read -P {} {off} 4k", 0x30 + k);
        let o = Command::new("qemu-io")
            .args(["-c", &cmd, p(&img)])
            .output()
            .expect("qemu-io");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && !out.contains("Pattern verification failed"),
            "qemu-io {cmd}: {out}"
        );
    }
}

/// Issue 8 item 6: a dirty image whose 2,000 snapshot entries all share one L1 table whose
/// 2,048 entries all point at one L2 table. Walking the L2 table once per L1 entry (as the
/// rebuild at open did) means 4 million 64 KiB table reads; the open must instead finish in
/// seconds, with an error (the shared data cluster's count overflows 16-bit refcounts) and the
/// file untouched.
#[test]
fn dirty_image_with_shared_snapshot_tables_is_rebuilt_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("s.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            p(&img),
            "1T",
        ],
    );
    run("qemu-io", &["-c", "write -P 0x61 0 64k", p(&img)]);
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    set_dirty(&img, |b| {
        let l1 = usize::try_from(get64(b, 40)).expect("l1");
        let l1_size =
            usize::try_from(u32::from_be_bytes(b[36..40].try_into().expect("4"))).expect("l1 size");
        assert_eq!(l1_size, 2048);
        let l2 = get64(b, l1) & 0x00ff_ffff_ffff_fe00;
        let snap = usize::try_from(get64(b, 64)).expect("snapshot table");
        let snap_l1 = usize::try_from(get64(b, snap)).expect("snapshot L1");
        for i in 0..l1_size {
            put64(b, snap_l1 + i * 8, l2);
        }
        // 2,000 copies of the first snapshot entry in a new table at the end of the file.
        let table = b.len().div_ceil(65536) * 65536;
        b.resize(table, 0);
        let entry_len = (40
            + usize::try_from(u32::from_be_bytes(
                b[snap + 36..snap + 40].try_into().expect("4"),
            ))
            .expect("extra")
            + usize::from(u16::from_be_bytes([b[snap + 12], b[snap + 13]]))
            + usize::from(u16::from_be_bytes([b[snap + 14], b[snap + 15]])))
        .div_ceil(8)
            * 8;
        let entry = b[snap..snap + entry_len].to_vec();
        for _ in 0..2000 {
            b.extend_from_slice(&entry);
        }
        b.resize(b.len().div_ceil(65536) * 65536, 0);
        put64(b, 64, table as u64);
        b[60..64].copy_from_slice(&2000u32.to_be_bytes());
    });
    let before = hash(&img);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = img.clone();
    std::thread::spawn(move || {
        let _ = tx.send(open_rw(&path).map(|_| ()).map_err(|e| format!("{e:?}")));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("open of a dirty image with shared snapshot tables took over 30 s");
    assert!(r.is_err(), "open accepted the overflowing refcounts");
    assert_eq!(hash(&img), before, "refused rebuild changed the file");
}

fn patch_file(img: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::options()
        .write(true)
        .open(img)
        .expect("open for patching");
    f.write_all_at(bytes, off).expect("patch");
}

fn read_file_at(img: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).expect("open");
    let flen = f.metadata().expect("stat").len();
    let n = u64::try_from(len)
        .expect("len")
        .min(flen.saturating_sub(off));
    let mut v = vec![0u8; usize::try_from(n).expect("len")];
    f.read_exact_at(&mut v, off).expect("read");
    v
}

/// Points the L2 entry of guest cluster 1 (table 0) at `target` with COPIED set, then writes
/// 4 KiB there through `i`: the write must be refused, the image turn read-only and the 64 KiB
/// at `target` stay as they were.
fn assert_write_over_refused(i: &dyn image::BlockImage, img: &Path, target: u64, name: &str) {
    let b = std::fs::read(img).expect("read");
    let e = first_l2_entry(&b) as u64;
    patch_file(img, e + 8, &(target | (1 << 63)).to_be_bytes());
    let before = read_file_at(img, target, 65536);
    let r = i.write(65536, &[std::io::IoSlice::new(&[0xeeu8; 4096])]);
    assert!(r.is_err(), "{name}: write over metadata accepted");
    assert!(
        i.read_only(),
        "{name}: image not read-only after the overlap"
    );
    assert_eq!(
        read_file_at(img, target, 65536),
        before,
        "{name} overwritten"
    );
}

/// Issue 8 item 6: the overlap check knows tables allocated after open, snapshot L1 and L2
/// tables and the bitmap directory (each was unprotected).
#[test]
fn data_write_over_later_or_inactive_metadata_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    // An L2 table allocated by this open (L1 index 1, guest 512 MiB).
    let img = dir.path().join("a.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "1G"]);
    run("qemu-io", &["-c", "write -P 0x61 0 64k", p(&img)]);
    {
        let i = open_rw(&img).expect("open");
        i.write(512 << 20, &[std::io::IoSlice::new(&[1u8; 4096])])
            .expect("write");
        let b = std::fs::read(&img).expect("read");
        let l1 = usize::try_from(get64(&b, 40)).expect("l1");
        let t = get64(&b, l1 + 8) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(t, 0);
        assert_write_over_refused(i.as_ref(), &img, t, "L2 table allocated after open");
    }
    // The L1 and L2 tables of a snapshot (the L2 table is the snapshot's own after the COW).
    let img = dir.path().join("s.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    run("qemu-io", &["-c", "write -P 0x61 0 64k", p(&img)]);
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    run("qemu-io", &["-c", "write -P 0x62 0 64k", p(&img)]);
    let b = std::fs::read(&img).expect("read");
    let snap = usize::try_from(get64(&b, 64)).expect("snapshot table");
    let snap_l1 = get64(&b, snap);
    let snap_l2 = get64(&b, usize::try_from(snap_l1).expect("l1")) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(
        snap_l2,
        first_l2_entry(&b) as u64,
        "the active table was copied"
    );
    for (target, name) in [
        (snap_l1, "snapshot L1 table"),
        (snap_l2, "snapshot L2 table"),
    ] {
        let copy = dir.path().join("s2.qcow2");
        std::fs::copy(&img, &copy).expect("copy");
        let i = open_rw(&copy).expect("open");
        assert_write_over_refused(i.as_ref(), &copy, target, name);
    }
    // The bitmap directory.
    let img = dir.path().join("b.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    run("qemu-io", &["-c", "write -P 0x61 0 64k", p(&img)]);
    run("qemu-img", &["bitmap", "--add", p(&img), "b0"]);
    let h = vhost_user_qcow2::qcow2::probe(&file_storage(&img, true))
        .expect("probe")
        .header;
    let dir_off = h.bitmaps.expect("bitmaps extension").directory_offset;
    let i = open_rw(&img).expect("open");
    assert_write_over_refused(i.as_ref(), &img, dir_off & !0xffff, "bitmap directory");
}

/// Issue 8 item 6: allocations are checked too. Refcounts that call the L1 table's cluster
/// free make the allocator hand it out for a new L2 table: refused, the L1 table intact.
#[test]
fn allocation_over_metadata_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("a.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "1G"]);
    run("qemu-io", &["-c", "write -P 0x61 0 64k", p(&img)]);
    let b = std::fs::read(&img).expect("read");
    let l1 = get64(&b, 40);
    let block = get64(&b, usize::try_from(get64(&b, 48)).expect("rt")) & !0x1ff;
    // 16-bit refcounts: the L1 table's cluster entry → 0.
    patch_file(&img, block + (l1 >> 16) * 2, &[0, 0]);
    let before = read_file_at(&img, l1, 65536);
    let i = open_rw(&img).expect("open");
    let r = i.write(512 << 20, &[std::io::IoSlice::new(&[1u8; 4096])]);
    assert!(r.is_err(), "allocation over the L1 table accepted");
    drop(i);
    assert_eq!(
        read_file_at(&img, l1, 65536),
        before,
        "L1 table overwritten"
    );
}

/// Issue 8 item 6: an L2 entry pointing far past the end of the file (here 2^50) is refused as
/// corruption instead of growing the file into a sparse petabyte.
#[test]
fn data_cluster_past_the_end_of_the_image_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("a.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    run("qemu-io", &["-c", "write -P 0x61 0 64k", p(&img)]);
    let len = std::fs::metadata(&img).expect("stat").len();
    let i = open_rw(&img).expect("open");
    let b = std::fs::read(&img).expect("read");
    let e = first_l2_entry(&b) as u64;
    patch_file(&img, e + 8, &((1u64 << 50) | (1 << 63)).to_be_bytes());
    let r = i.write(65536, &[std::io::IoSlice::new(&[0xeeu8; 4096])]);
    assert!(r.is_err(), "write at 2^50 accepted");
    assert!(i.read_only());
    drop(i);
    assert!(
        std::fs::metadata(&img).expect("stat").len() <= len + (1 << 20),
        "the file grew"
    );
}
