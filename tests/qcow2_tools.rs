//! create / info / check against qemu-img: what we create passes `qemu-img check` and reads as
//! qemu-img describes it; `info --output json` and `check --output json` carry qemu-img's fields
//! and values; repairs leave an image qemu-img calls clean.

use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vhost_user_qcow2::cli::check::{self as ck, CheckArgs, RepairArg};
use vhost_user_qcow2::cli::create::{self as cr, CreateArgs, CreateFormat, PreallocArg};
use vhost_user_qcow2::cli::info::{self, InfoArgs};
use vhost_user_qcow2::cli::tools::OutputFormat;
use vhost_user_qcow2::image::{self, OpenOptions};

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

fn qemu_json(args: &[&str]) -> (Value, i32) {
    let out = Command::new("qemu-img").args(args).output().expect("spawn");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img {args:?}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.code().unwrap_or(-1))
}

fn create_args(file: PathBuf, size: Option<&str>) -> CreateArgs {
    CreateArgs {
        format: CreateFormat::Qcow2,
        cluster_size: "64k".into(),
        backing: None,
        backing_format: None,
        preallocation: PreallocArg::Off,
        compat: "1.1".into(),
        refcount_bits: 16,
        encrypt: Default::default(),
        file,
        size: size.map(str::to_string),
    }
}

fn our_info(file: &Path) -> Value {
    let mut out = Vec::new();
    let code = info::run(
        &InfoArgs {
            output: OutputFormat::Json,
            format: None,
            file: file.to_path_buf(),
        },
        &mut out,
    )
    .expect("info");
    assert_eq!(code, 0);
    serde_json::from_slice(&out).expect("json")
}

fn our_check(file: &Path, repair: Option<RepairArg>) -> (Value, i32) {
    let mut out = Vec::new();
    let code = ck::run(
        &CheckArgs {
            repair,
            output: OutputFormat::Json,
            file: file.to_path_buf(),
        },
        &mut out,
    )
    .expect("check");
    (serde_json::from_slice(&out).expect("json"), code)
}

fn assert_info_matches(file: &Path) {
    let ours = our_info(file);
    let (theirs, _) = qemu_json(&["info", "--output=json", p(file)]);
    for k in [
        "virtual-size",
        "filename",
        "cluster-size",
        "format",
        "actual-size",
        "dirty-flag",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "encrypted",
    ] {
        assert_eq!(
            ours.get(k),
            theirs.get(k),
            "info field {k} of {}",
            file.display()
        );
    }
    let od = ours.pointer("/format-specific/data").expect("ours data");
    let td = theirs.pointer("/format-specific/data").expect("their data");
    for k in [
        "compat",
        "compression-type",
        "lazy-refcounts",
        "refcount-bits",
        "corrupt",
        "extended-l2",
    ] {
        assert_eq!(od.get(k), td.get(k), "format-specific {k}");
    }
    assert_eq!(
        od.pointer("/encrypt/format"),
        td.pointer("/encrypt/format"),
        "encrypt format"
    );
}

fn assert_check_matches(file: &Path) -> Value {
    let (ours, oc) = our_check(file, None);
    let (theirs, tc) = qemu_json(&["check", "--output=json", p(file)]);
    assert_eq!(oc, tc, "exit codes: ours {ours} theirs {theirs}");
    for k in [
        "image-end-offset",
        "total-clusters",
        "check-errors",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
        "leaks",
        "corruptions",
        "format",
    ] {
        assert_eq!(
            ours.get(k),
            theirs.get(k),
            "check field {k}: {ours} vs {theirs}"
        );
    }
    theirs
}

#[test]
fn created_images_check_clean_and_info_matches_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n = 0;
    let mut make = |f: &dyn Fn(&mut CreateArgs)| -> PathBuf {
        n += 1;
        let file = dir.path().join(format!("img{n}.qcow2"));
        let mut a = create_args(file.clone(), Some("100M"));
        f(&mut a);
        let mut out = Vec::new();
        assert_eq!(cr::run(&a, &mut out).expect("create"), 0);
        file
    };
    let plain = make(&|_| {});
    let v2 = make(&|a| a.compat = "0.10".into());
    let small = make(&|a| a.cluster_size = "512".into());
    let big = make(&|a| a.cluster_size = "2M".into());
    let r1 = make(&|a| a.refcount_bits = 1);
    let r64 = make(&|a| a.refcount_bits = 64);
    let meta = make(&|a| a.preallocation = PreallocArg::Metadata);
    let full = make(&|a| {
        a.preallocation = PreallocArg::Full;
        a.size = Some("8M".into());
    });
    let overlay = make(&|a| {
        a.backing = Some("img1.qcow2".into());
        a.backing_format = Some("qcow2".into());
        a.size = None;
    });
    for f in [&plain, &v2, &small, &big, &r1, &r64, &meta, &full, &overlay] {
        let c = assert_check_matches(f);
        assert!(
            c.get("corruptions").is_none() && c.get("leaks").is_none(),
            "{c}"
        );
        assert_info_matches(f);
    }
    let (m, _) = qemu_json(&["map", "--output=json", p(&meta)]);
    assert!(m.as_array().expect("map").iter().all(|e| e["data"] == true));
    // The overlay reads through to its backing file.
    Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x42 0 64k", p(&plain)])
        .output()
        .expect("qemu-io");
    let img = image::open(&overlay, &OpenOptions::default()).expect("open overlay");
    assert_eq!(img.capacity(), 100 << 20);
    let mut buf = vec![0u8; 65536];
    img.read(0, &mut [std::io::IoSliceMut::new(&mut buf)])
        .expect("read");
    assert!(buf.iter().all(|&b| b == 0x42));
}

#[test]
fn leaks_and_corruptions_are_counted_as_qemu_img_and_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("l.qcow2");
    let mut out = Vec::new();
    cr::run(&create_args(file.clone(), Some("64M")), &mut out).expect("create");
    {
        let img = image::open(&file, &OpenOptions::default()).expect("open");
        let data = vec![7u8; 1 << 20];
        img.write(0, &[IoSlice::new(&data)]).expect("write");
        img.flush().expect("flush");
        img.discard(0, 512 << 10).expect("discard");
        // A crash before the next flush: the discarded clusters leak.
        std::mem::forget(img);
    }
    let theirs = assert_check_matches(&file);
    assert_eq!(theirs["leaks"], 8);
    let (r, code) = our_check(&file, Some(RepairArg::Leaks));
    assert_eq!((code, &r["leaks-fixed"]), (0, &Value::from(8)), "{r}");
    let theirs = assert_check_matches(&file);
    assert!(theirs.get("leaks").is_none());

    // Corrupt a refcount: zero the refcount block, qemu-img and we see the same errors.
    let st = vhost_user_qcow2::storage::FileStorage::open(&file, Default::default()).expect("open");
    let h = vhost_user_qcow2::qcow2::Header::read(&st).expect("header");
    let mut e = [0u8; 8];
    vhost_user_qcow2::storage::Storage::read_at(&st, &mut e, h.refcount_table_offset)
        .expect("read");
    let blk = u64::from_be_bytes(e);
    vhost_user_qcow2::storage::Storage::write_at(&st, &[0u8; 64], blk + 16).expect("zero");
    drop(st);
    let theirs = assert_check_matches(&file);
    assert!(theirs["corruptions"].as_u64().unwrap_or(0) > 0);
    let (r, _) = our_check(&file, Some(RepairArg::All));
    assert!(r.get("corruptions-fixed").is_some(), "{r}");
    let (theirs, code) = qemu_json(&["check", "--output=json", p(&file)]);
    assert_eq!(code, 0, "{theirs}");
    // The data survived.
    let img = image::open(&file, &OpenOptions::default()).expect("open");
    let mut buf = vec![0u8; 512 << 10];
    img.read(512 << 10, &mut [std::io::IoSliceMut::new(&mut buf)])
        .expect("read");
    assert!(buf.iter().all(|&b| b == 7));
}

#[test]
fn raw_create_and_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("r.raw");
    let mut a = create_args(file.clone(), Some("3M"));
    a.format = CreateFormat::Raw;
    cr::run(&a, &mut Vec::new()).expect("create raw");
    let ours = our_info(&file);
    let (theirs, _) = qemu_json(&["info", "--output=json", p(&file)]);
    for k in ["virtual-size", "format", "actual-size", "dirty-flag"] {
        assert_eq!(ours.get(k), theirs.get(k), "{k}");
    }
}
