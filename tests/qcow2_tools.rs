//! create / info / check against qemu-img: what we create passes `qemu-img check` and reads as
//! qemu-img describes it; `info --output json` and `check --output json` carry qemu-img's fields
//! and values; repairs leave an image qemu-img calls clean.

mod common;

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

/// Runs `cmd` with sh -e in `dir`; its stdout. Panics (with stderr) if it fails.
fn sh_in(dir: &Path, cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn create_args(file: PathBuf, size: Option<&str>) -> CreateArgs {
    CreateArgs::new(CreateFormat::Qcow2, file, size.map(str::to_string))
}

fn our_info(file: &Path) -> Value {
    let mut out = Vec::new();
    let code = info::run(
        &InfoArgs {
            output: OutputFormat::Json,
            format: None,
            backing_chain: false,
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
            format: None,
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

/// `map`: our JSON (and human) output is byte-for-byte qemu-img's, over raw, qcow2 with data /
/// zero / compressed clusters, backing chains (qcow2 and raw, a shorter backing file), extended
/// L2 subclusters, metadata preallocation, an external data file, 512-byte clusters and
/// qcow2+LUKS (offsets hidden).
#[test]
fn map_output_equals_qemu_img() {
    use vhost_user_qcow2::cli::map;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let sh = |cmd: &str| {
        sh_in(d, cmd);
    };
    sh("printf secret > pw");
    sh("qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 1 0 64k' -c 'write -c -P 2 128k 64k' -c 'write -z 256k 64k' base.qcow2");
    sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 8M && qemu-io -c 'write -P 3 64k 64k' -c 'write -z 0 4k' -c 'write -P 4 1M 100k' -c 'write -P 5 6M 64k' top.qcow2");
    sh("truncate -s 1M r.raw && qemu-io -f raw -c 'write -P 1 4k 8k' r.raw");
    sh("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k x.qcow2 4M && qemu-io -c 'write -P 1 4k 4k' -c 'write -z 64k 8k' -c 'write -P 2 200k 100k' x.qcow2");
    sh("qemu-img create -q -f raw rb.raw 2M && qemu-io -f raw -c 'write -P 7 512k 64k' rb.raw && qemu-img create -q -f qcow2 -b rb.raw -F raw ov.qcow2 4M && qemu-io -c 'write -P 8 0 4k' ov.qcow2");
    sh("qemu-img create -q -f qcow2 -o preallocation=metadata pm.qcow2 2M && qemu-io -c 'write -P 9 64k 4k' pm.qcow2");
    sh("qemu-img create -q -f qcow2 -o data_file=df.raw,data_file_raw=on dfi.qcow2 2M && qemu-io -c 'write -P 3 64k 64k' dfi.qcow2");
    sh("qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 1M && qemu-io -c 'write -P 3 1000 3000' small.qcow2");
    sh("qemu-img create -q -f qcow2 --object secret,id=s0,file=pw -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 q.qcow2 4M && qemu-io --object secret,id=s0,file=pw --image-opts driver=qcow2,encrypt.key-secret=s0,file.filename=q.qcow2 -c 'write -P 1 64k 64k' -c 'write -z 1M 64k'");

    let ours = |file: &str, fmt: Option<&str>, output: OutputFormat| -> (String, bool) {
        let format = fmt.map(|f| image::Format::from_name(f).expect("format"));
        let e = map::map_entries(&d.join(file), format, 0, None).expect("map");
        let mut out = Vec::new();
        let ok = map::write_map(&e, output, &mut out).is_ok();
        (String::from_utf8(out).expect("utf-8"), ok)
    };
    let theirs = |args: &[&str]| -> (String, bool) {
        let out = Command::new("qemu-img")
            .arg("map")
            .args(args)
            .current_dir(d)
            .output()
            .expect("qemu-img map");
        (
            String::from_utf8(out.stdout).expect("utf-8"),
            out.status.success(),
        )
    };
    let mut checked = 0;
    for (file, fmt) in [
        ("base.qcow2", None),
        ("top.qcow2", None),
        ("r.raw", Some("raw")),
        ("x.qcow2", None),
        ("ov.qcow2", None),
        ("pm.qcow2", None),
        ("dfi.qcow2", None),
        ("small.qcow2", None),
    ] {
        let path = d.join(file);
        let mut args = vec!["--output=json"];
        if let Some(f) = fmt {
            args.extend(["-f", f]);
        }
        args.push(p(&path));
        assert_eq!(
            ours(file, fmt, OutputFormat::Json),
            theirs(&args),
            "{file} json"
        );
        args.remove(0);
        let (o, ok) = ours(file, fmt, OutputFormat::Human);
        let (t, tok) = theirs(&args);
        assert_eq!(ok, tok, "{file} human exit status");
        if ok {
            assert_eq!(o, t, "{file} human");
        }
        checked += 1;
    }
    // qemu-img needs the key to open the LUKS image; we do not (mapping reads no data).
    let luks = theirs(&[
        "--output=json",
        "--object",
        "secret,id=s0,file=pw",
        "--image-opts",
        "driver=qcow2,encrypt.key-secret=s0,file.filename=q.qcow2",
    ]);
    assert_eq!(
        ours("q.qcow2", None, OutputFormat::Json),
        luks,
        "qcow2+luks json"
    );
    assert!(luks.0.contains("\"data\": true") && !luks.0.contains("offset"));
    assert_eq!(checked, 8);
}

/// `compare`: the same message and exit code as `qemu-img compare` (identical, content mismatch
/// at the first differing sector, size mismatch with a zero or non-zero tail, strict size,
/// qcow2 against raw, a missing file → 2). Strict allocation mismatches agree on the exit code
/// only (qemu-img also compares block-status bits that map does not show).
#[test]
fn compare_equals_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let sh = |cmd: &str| {
        sh_in(d, cmd);
    };
    let both = |args: &[&str], strict_status: bool| {
        let q = Command::new("qemu-img")
            .arg("compare")
            .args(args)
            .current_dir(d)
            .output()
            .expect("qemu-img");
        let o = Command::new(common::BIN)
            .arg("compare")
            .args(args)
            .current_dir(d)
            .output()
            .expect("ours");
        assert_eq!(o.status.code(), q.status.code(), "{args:?}");
        if !strict_status {
            assert_eq!(
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&q.stdout),
                "{args:?}"
            );
        }
        o.status.code()
    };
    sh("qemu-img create -q -f qcow2 c1.qcow2 4M && qemu-img create -q -f qcow2 c2.qcow2 4M && qemu-io -c 'write -P 1 1000 10' c1.qcow2");
    assert_eq!(both(&["c1.qcow2", "c2.qcow2"], false), Some(1));
    sh("qemu-io -c 'write -P 1 1000 10' c2.qcow2");
    assert_eq!(both(&["c1.qcow2", "c2.qcow2"], false), Some(0));
    sh("qemu-img create -q -f qcow2 c3.qcow2 5M && qemu-io -c 'write -P 1 1000 10' c3.qcow2");
    assert_eq!(both(&["c1.qcow2", "c3.qcow2"], false), Some(0));
    assert_eq!(both(&["-s", "c1.qcow2", "c3.qcow2"], false), Some(1));
    sh("qemu-io -c 'write -P 2 4200000 10' c3.qcow2");
    assert_eq!(both(&["c3.qcow2", "c1.qcow2"], false), Some(1));
    sh("qemu-io -c 'write -P 0 2M 64k' c1.qcow2");
    assert_eq!(both(&["c1.qcow2", "c2.qcow2"], false), Some(0));
    assert_eq!(both(&["-s", "c1.qcow2", "c2.qcow2"], true), Some(1));
    assert_eq!(both(&["c1.qcow2", "missing.qcow2"], false), Some(2));
    sh("qemu-io -c 'write -P 3 3000000 1' c2.qcow2 && qemu-img convert -O raw c2.qcow2 c2.raw");
    assert_eq!(both(&["-q", "c1.qcow2", "c2.qcow2"], false), Some(1));
    assert_eq!(
        both(&["-f", "qcow2", "-F", "raw", "c2.qcow2", "c2.raw"], false),
        Some(0)
    );
}

/// `info --backing-chain` lists the chain top first with the same names qemu-img gives
/// (filename, format, virtual size, backing file), and `check -f` refuses what qemu-img refuses
/// with its exit codes (63: format without checks; 1: not a qcow2 image).
#[test]
fn info_backing_chain_and_check_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .current_dir(d)
            .output()
            .expect("spawn")
    };
    assert!(
        run("qemu-img", &["create", "-q", "-f", "raw", "b.raw", "1M"])
            .status
            .success()
    );
    assert!(run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "m.qcow2", "2M"]
    )
    .status
    .success());
    assert!(run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "t.qcow2"]
    )
    .status
    .success());
    let theirs: Value = serde_json::from_slice(
        &run(
            "qemu-img",
            &["info", "--backing-chain", "--output=json", "t.qcow2"],
        )
        .stdout,
    )
    .expect("qemu json");
    let ours: Value = serde_json::from_slice(
        &run(
            common::BIN,
            &["info", "--backing-chain", "--output", "json", "t.qcow2"],
        )
        .stdout,
    )
    .expect("our json");
    let (t, o) = (
        theirs.as_array().expect("array"),
        ours.as_array().expect("array"),
    );
    assert_eq!(o.len(), 3);
    assert_eq!(t.len(), o.len());
    for (t, o) in t.iter().zip(o) {
        for k in [
            "filename",
            "format",
            "virtual-size",
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
        ] {
            assert_eq!(o.get(k), t.get(k), "{k}");
        }
    }
    let human = String::from_utf8(run(common::BIN, &["info", "--backing-chain", "t.qcow2"]).stdout)
        .expect("utf-8");
    assert_eq!(human.matches("image: ").count(), 3, "{human}");
    // The same exit code from both programs for each case.
    for (args, code) in [
        (["check", "-f", "raw", "t.qcow2"], 63),
        (["check", "-f", "qcow2", "b.raw"], 1),
        (["check", "-f", "qcow2", "t.qcow2"], 0),
    ] {
        for prog in [common::BIN, "qemu-img"] {
            assert_eq!(
                run(prog, &args).status.code(),
                Some(code),
                "{prog} {args:?}"
            );
        }
    }
}

/// `create -o` as qemu-img spells it: the images we make with each option set open in qemu-img
/// with the same `info` facts as the ones qemu-img makes with the same options, check clean;
/// decimal sizes round as qemu-img's; the refusals qemu-img gives are ours too.
#[test]
fn create_dash_o_matches_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("pw"), "secret").expect("pw");
    let run = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .current_dir(d)
            .output()
            .expect("spawn")
    };
    let facts = |file: &str| -> Value {
        let (v, code) = qemu_json(&["info", "--output=json", p(&d.join(file))]);
        assert_eq!(code, 0);
        let mut v = v;
        let o = v.as_object_mut().expect("object");
        for k in ["filename", "actual-size", "children"] {
            o.remove(k);
        }
        if let Some(enc) = v.pointer_mut("/format-specific/data/encrypt") {
            // Salts, UUID and iteration counts differ between any two LUKS headers.
            for k in ["uuid", "master-key-iters", "slots", "payload-offset"] {
                enc.as_object_mut().expect("object").remove(k);
            }
        }
        v
    };
    for (i, (opts, size)) in [
        ("cluster_size=4k,lazy_refcounts=on,refcount_bits=8", "1.5G"),
        ("compat=0.10", "100M"),
        ("cluster_size=32k,extended_l2=on,compression_type=zstd", "1000"),
        ("preallocation=metadata,cluster_size=512", "0.1M"),
        ("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256", "16M"),
    ]
    .into_iter()
    .enumerate()
    {
        let (q, o) = (format!("q{i}.qcow2"), format!("o{i}.qcow2"));
        let obj = ["--object", "secret,id=s0,file=pw"];
        let mut qa = vec!["create", "-q", "-f", "qcow2"];
        qa.extend(obj);
        qa.extend(["-o", opts, &q, size]);
        assert!(run("qemu-img", &qa).status.success(), "qemu-img {opts}");
        let mut oa = vec!["create", "-f", "qcow2"];
        oa.extend(obj);
        oa.extend(["-o", opts, &o, size]);
        let out = run(common::BIN, &oa);
        assert!(out.status.success(), "ours {opts}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(facts(&o), facts(&q), "{opts}");
        let mut ca = vec!["check"];
        if opts.contains("encrypt") {
            ca.extend(obj);
            ca.extend(["--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=o4.qcow2"]);
        } else {
            ca.push(&o);
        }
        assert!(run("qemu-img", &ca).status.success(), "check {opts}");
    }
    // Raw: decimal size rounded up to sectors as qemu-img does; metadata preallocation refused.
    assert!(run(common::BIN, &["create", "-f", "raw", "r.raw", "0.1M"])
        .status
        .success());
    assert_eq!(
        std::fs::metadata(d.join("r.raw")).expect("raw").len(),
        104_960
    );
    let bad = run(
        common::BIN,
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=metadata",
            "m.raw",
            "1M",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("Unsupported preallocation mode: metadata")
    );
    let bad = run(
        common::BIN,
        &["create", "-f", "qcow2", "-o", "bogus=1", "b.qcow2", "1M"],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Invalid parameter 'bogus'"));
    assert!(!d.join("b.qcow2").exists());
    // -f luks: qemu-img's raw LUKS format, keys without the encrypt. prefix.
    let out = run(
        common::BIN,
        &[
            "create",
            "-f",
            "luks",
            "--object",
            "secret,id=k,file=pw",
            "-o",
            "key-secret=k,iter-time=10",
            "l.luks",
            "4M",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (v, _) = qemu_json(&["info", "--output=json", p(&d.join("l.luks"))]);
    assert_eq!(v["format"], "luks");
    assert_eq!(v["virtual-size"], 4 << 20);
}

/// `convert`: qcow2 → qcow2 / raw (sparse) / compressed qcow2 (deflate and zstd, 512 B to
/// 2 MiB clusters) / qcow2+LUKS / raw LUKS, and back to plaintext; each target passes
/// `qemu-img check` and `qemu-img compare` equals the source; the source is never modified.
#[test]
fn convert_output_compares_equal_in_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("pw"), "secret").expect("pw");
    let sh = |cmd: &str| sh_in(d, cmd);
    sh(
        "qemu-img create -q -f qcow2 src.qcow2 64M && head -c 262144 /dev/urandom > rnd && \
        qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 10M 64k' -c 'write -c -P 3 30M 64k' \
                -c 'write -z 31M 64k' -c 'write -s rnd 40M 256k' -c 'write -P 4 63M 4k' src.qcow2",
    );
    let before = sh("md5sum src.qcow2");
    let bin = common::BIN;
    let key = "--object secret,id=s0,file=pw";
    for (i, conv) in [
        "-O qcow2",
        "-O raw",
        "-c -O qcow2",
        "-c -O qcow2 -o compression_type=zstd",
        "-c -O qcow2 -o cluster_size=512",
        "-c -O qcow2 -o compression_type=zstd,cluster_size=2M",
        "-O qcow2 -o cluster_size=4k,compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let t = format!("t{i}");
        sh(&format!("{bin} convert {conv} src.qcow2 {t}"));
        if conv.contains("qcow2") {
            sh(&format!("qemu-img check {t}"));
        }
        sh(&format!("qemu-img compare src.qcow2 {t}"));
        // Our own reader agrees too.
        sh(&format!("{bin} compare src.qcow2 {t}"));
    }
    // Sparse: the raw target allocates about the data, not the 64 MiB.
    let du: u64 = sh("du -k t1 | cut -f1").trim().parse().expect("du");
    assert!(du < 4096, "raw target allocated {du} KiB");
    // Compressed: the 1 MiB of 0x01 shrinks to almost nothing.
    let (plain, comp) = (
        std::fs::metadata(d.join("t0")).expect("t0").len(),
        std::fs::metadata(d.join("t2")).expect("t2").len(),
    );
    assert!(comp < plain / 2, "compressed {comp} vs {plain}");
    // Encrypt (qcow2+LUKS and raw LUKS), then decrypt with our tool.
    sh(&format!("{bin} convert -O qcow2 {key} -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 src.qcow2 e.qcow2"));
    sh(&format!("qemu-img compare {key} --image-opts driver=qcow2,file.filename=src.qcow2 driver=qcow2,encrypt.key-secret=s0,file.filename=e.qcow2"));
    sh(&format!("qemu-img check {key} --image-opts driver=qcow2,encrypt.key-secret=s0,file.filename=e.qcow2"));
    sh(&format!(
        "{bin} convert -O luks {key} -o key-secret=s0,iter-time=10 src.qcow2 e.luks"
    ));
    sh(&format!("qemu-img compare {key} --image-opts driver=qcow2,file.filename=src.qcow2 driver=luks,key-secret=s0,file.filename=e.luks"));
    sh(&format!(
        "{bin} convert -O raw --key-secret-file pw e.qcow2 d.raw"
    ));
    sh("qemu-img compare src.qcow2 d.raw");
    // Refusals: compression with encryption, an existing target.
    let out = Command::new(bin)
        .args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "--object",
            "secret,id=s0,file=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "src.qcow2",
            "x.qcow2",
        ])
        .current_dir(d)
        .output()
        .expect("convert");
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(bin)
        .args(["convert", "-O", "qcow2", "src.qcow2", "t0"])
        .current_dir(d)
        .output()
        .expect("convert");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(sh("md5sum src.qcow2"), before, "the source changed");
}

/// `measure`: the same numbers (and text / JSON) as `qemu-img measure` for sources with data,
/// zero and compressed clusters, backing chains, extended L2, bitmaps, raw and LUKS targets,
/// preallocation, and `--size` without a source.
#[test]
fn measure_equals_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("pw"), "secret").expect("pw");
    let sh = |cmd: &str| sh_in(d, cmd);
    sh("qemu-img create -q -f qcow2 s.qcow2 64M && qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 10M 64k' \
        -c 'write -c -P 3 30M 64k' -c 'write -z 31M 64k' -c 'write -P 4 40M 1k' s.qcow2 && \
        qemu-img create -q -f qcow2 -b s.qcow2 -F qcow2 o.qcow2 && qemu-io -c 'write -P 5 50M 64k' o.qcow2 && \
        qemu-img create -q -f qcow2 -o extended_l2=on x.qcow2 8M && qemu-io -c 'write -P 1 4k 4k' x.qcow2 && \
        qemu-img bitmap --add s.qcow2 b1 && qemu-img bitmap --add -g 4096 s.qcow2 second-bitmap && \
        qemu-img convert -O raw s.qcow2 s.raw");
    let bin = common::BIN;
    for a in [
        "-O qcow2 s.qcow2",
        "-O raw s.qcow2",
        "-O qcow2 --size 1G",
        "-O raw --size 1000",
        "-O qcow2 -o cluster_size=4k s.qcow2",
        "-O qcow2 -o cluster_size=512,refcount_bits=1 o.qcow2",
        "-O qcow2 -f raw s.raw",
        "-O qcow2 -o preallocation=full s.qcow2",
        "-O qcow2 --object secret,id=s0,file=pw -o encrypt.format=luks,encrypt.key-secret=s0 s.qcow2",
        "-O qcow2 -o extended_l2=on,refcount_bits=1 --size 10G",
        "-O qcow2 -o compat=0.10 s.qcow2",
        "-O qcow2 -o cluster_size=2M,refcount_bits=64 --size 100T",
        "-O qcow2 -o backing_file=s.qcow2 s.qcow2",
        "-O qcow2 x.qcow2",
    ] {
        assert_eq!(sh(&format!("{bin} measure {a}")), sh(&format!("qemu-img measure {a}")), "{a}");
        assert_eq!(
            sh(&format!("{bin} measure --output json {a}")),
            sh(&format!("qemu-img measure --output=json {a}")),
            "{a} json"
        );
    }
}

/// `snapshot`: ours list and apply in qemu-img, theirs here; after every step `qemu-img check`
/// is clean (no leaks) and qemu-io reads each snapshot's data back after applying it; `info`
/// and `snapshot -l` print what qemu-img prints.
#[test]
fn snapshots_interoperate_with_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let sh = |cmd: &str| sh_in(d, cmd);
    let bin = common::BIN;
    let clean = |f: &str| {
        let out = sh(&format!("qemu-img check {f}"));
        assert!(out.contains("No errors were found"), "{out}");
    };
    let verify = |f: &str, reads: &str| {
        let out = sh(&format!("qemu-io {reads} {f}"));
        assert!(!out.contains("failed"), "{out}");
    };
    sh("qemu-img create -q -f qcow2 s.qcow2 64M && qemu-io -c 'write -P 1 0 128k' -c 'write -c -P 7 1M 64k' -c 'write -z 2M 64k' s.qcow2");
    sh(&format!("{bin} snapshot -c one s.qcow2"));
    clean("s.qcow2");
    sh("qemu-io -c 'write -P 2 0 64k' -c 'write -P 3 1M 4k' -c 'write -P 4 3M 64k' s.qcow2");
    clean("s.qcow2");
    sh("qemu-img snapshot -c theirs s.qcow2");
    sh(&format!("{bin} snapshot -c two s.qcow2"));
    clean("s.qcow2");
    assert_eq!(
        sh(&format!("{bin} snapshot -l s.qcow2")),
        sh("qemu-img snapshot -l s.qcow2")
    );
    let ours = sh(&format!("{bin} info s.qcow2"));
    assert!(ours.contains(&sh("qemu-img snapshot -l s.qcow2")), "{ours}");
    // Ours applied by qemu-img, theirs and ours applied here.
    sh("qemu-img snapshot -a one s.qcow2");
    clean("s.qcow2");
    verify(
        "s.qcow2",
        "-c 'read -P 1 0 128k' -c 'read -P 7 1M 64k' -c 'read -P 0 2M 64k' -c 'read -P 0 3M 64k'",
    );
    sh(&format!("{bin} snapshot -a theirs s.qcow2"));
    clean("s.qcow2");
    verify(
        "s.qcow2",
        "-c 'read -P 2 0 64k' -c 'read -P 1 64k 64k' -c 'read -P 3 1M 4k' -c 'read -P 4 3M 64k'",
    );
    sh("qemu-io -c 'write -P 9 0 64k' s.qcow2");
    sh(&format!("{bin} snapshot -a one s.qcow2"));
    clean("s.qcow2");
    verify("s.qcow2", "-c 'read -P 1 0 128k' -c 'read -P 7 1M 64k'");
    // Deleting everything leaves a clean image with the applied data.
    for n in ["one", "theirs", "two"] {
        sh(&format!("{bin} snapshot -d {n} s.qcow2"));
        clean("s.qcow2");
    }
    assert_eq!(sh(&format!("{bin} snapshot -l s.qcow2")), "");
    verify("s.qcow2", "-c 'read -P 1 0 128k' -c 'read -P 7 1M 64k'");
    // A missing snapshot is an error, as in qemu-img.
    let out = Command::new(bin)
        .args(["snapshot", "-a", "nope", "s.qcow2"])
        .current_dir(d)
        .output()
        .expect("snapshot");
    assert_eq!(out.status.code(), Some(1));
}

/// `rebase`: safe mode keeps the guest's disk identical (qemu-img compare against an export made
/// before) and allocates the same clusters qemu-img's own rebase does (equal `qemu-img map`);
/// `-b ""` flattens; `-u` only renames; a missing -F is refused as qemu-img refuses it.
#[test]
fn rebase_matches_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let sh = |cmd: &str| sh_in(d, cmd);
    let bin = common::BIN;
    sh("qemu-img create -q -f qcow2 base.qcow2 8M && qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' base.qcow2 && \
        qemu-img create -q -f qcow2 new.qcow2 8M && qemu-io -c 'write -P 1 0 512k' -c 'write -P 9 6M 64k' new.qcow2 && \
        qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ours.qcow2 && qemu-io -c 'write -P 5 2M 64k' ours.qcow2 && \
        cp ours.qcow2 theirs.qcow2 && qemu-img convert -O raw ours.qcow2 expect.raw");
    sh(&format!("{bin} rebase -b new.qcow2 -F qcow2 ours.qcow2"));
    sh("qemu-img rebase -b new.qcow2 -F qcow2 theirs.qcow2");
    sh("qemu-img check ours.qcow2 && qemu-img compare ours.qcow2 expect.raw");
    let info = sh("qemu-img info ours.qcow2");
    assert!(
        info.contains("backing file: new.qcow2") && info.contains("backing file format: qcow2"),
        "{info}"
    );
    assert_eq!(
        sh("qemu-img map --output=json ours.qcow2").replace("ours.qcow2", "X"),
        sh("qemu-img map --output=json theirs.qcow2").replace("theirs.qcow2", "X")
    );
    sh(&format!("{bin} rebase -b '' ours.qcow2"));
    sh("qemu-img check ours.qcow2 && qemu-img compare ours.qcow2 expect.raw");
    assert!(!sh("qemu-img info ours.qcow2").contains("backing file"));
    sh(&format!(
        "{bin} rebase -u -b moved.qcow2 -F qcow2 theirs.qcow2"
    ));
    // The header names the moved file (which does not exist: qemu-img info would fail to open it).
    let v: Value =
        serde_json::from_str(&sh(&format!("{bin} info --output json theirs.qcow2"))).expect("json");
    assert_eq!(v["backing-filename"], "moved.qcow2");
    assert_eq!(v["backing-filename-format"], "qcow2");
    let out = Command::new(bin)
        .args(["rebase", "-b", "new.qcow2", "ours.qcow2"])
        .current_dir(d)
        .output()
        .expect("rebase");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backing format must be specified"));
}

/// The tools lock as qemu-img does: while the daemon serves an image, `snapshot -c`, `rebase`
/// and a locking `compare` are refused, and `snapshot -l -U` / `compare -U` still read it.
#[test]
fn tools_respect_the_serving_daemons_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    sh_in(
        d,
        "qemu-img create -q -f qcow2 s.qcow2 8M && qemu-img create -q -f qcow2 o.qcow2 8M",
    );
    let sock = d.join("s.sock");
    let mut daemon = common::spawn_serve(&sock, &d.join("s.qcow2"), &[]);
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(t.elapsed().as_secs() < 20, "daemon did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let run = |args: &[&str]| {
        Command::new(common::BIN)
            .args(args)
            .current_dir(d)
            .output()
            .expect("run")
    };
    for args in [
        &["snapshot", "-c", "x", "s.qcow2"][..],
        &["snapshot", "-l", "s.qcow2"],
        &["rebase", "-u", "-b", "o.qcow2", "-F", "qcow2", "s.qcow2"],
        &["compare", "s.qcow2", "o.qcow2"],
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?} was not refused");
        assert!(err.contains("lock"), "{args:?}: {err}");
    }
    assert_eq!(
        run(&["snapshot", "-l", "-U", "s.qcow2"]).status.code(),
        Some(0)
    );
    assert_eq!(
        run(&["compare", "-U", "s.qcow2", "o.qcow2"]).status.code(),
        Some(0)
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(
        run(&["snapshot", "-c", "x", "s.qcow2"]).status.code(),
        Some(0)
    );
}

/// Long operations show progress on a terminal (and nothing in a pipe): `convert -p`, full
/// preallocation, `check`. The terminal is a pty from util-linux `script`.
#[test]
fn long_operations_show_progress_on_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let bin = common::BIN;
    sh_in(
        d,
        "qemu-img create -q -f qcow2 s.qcow2 64M && qemu-io -c 'write -P 1 0 8M' s.qcow2",
    );
    for cmd in [
        format!("{bin} convert -p -O qcow2 s.qcow2 t.qcow2"),
        format!("{bin} create -f qcow2 --preallocation full f.qcow2 64M"),
        format!("{bin} check s.qcow2"),
    ] {
        let tty = sh_in(d, &format!("script -qec '{cmd}' /dev/null"));
        assert!(tty.contains("(100.00/100%)"), "{cmd}: {tty:?}");
        // And no progress without a terminal.
        let out = Command::new("sh")
            .arg("-c")
            .arg(
                format!("{cmd} 2>&1")
                    .replace("t.qcow2", "t2.qcow2")
                    .replace("f.qcow2", "f2.qcow2"),
            )
            .current_dir(d)
            .output()
            .expect("sh");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("/100%)"),
            "{cmd}"
        );
    }
    sh_in(
        d,
        "qemu-img check t.qcow2 && qemu-img compare s.qcow2 t.qcow2 && qemu-img check f.qcow2",
    );
}
