//! qcow2 + LUKS (crypt_method 2) and legacy qcow2 AES (crypt_method 1) against qemu-img /
//! qemu-io: images QEMU makes read here as QEMU reads them, what we write QEMU reads back and
//! `qemu-img check` passes, images we create open in QEMU, and plaintext never reaches the file
//! (including COW over a snapshot and copy-up from a backing file).

mod luks_common;

use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::process::Command;

use luks_common::{chain, pattern, run};
use vhost_user_qcow2::crypto::luks::{CreateParams, Iterations, LuksHash};
use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::image::{self, crypt, BlockImage, OpenOptions};

fn qopts(f: &Path) -> String {
    format!(
        "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
        f.display()
    )
}

fn qemu_img_create(f: &Path, pw: &str, opts: &str, size: &str) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "--object"])
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("-o")
        .arg(opts)
        .arg(f)
        .arg(size));
}

fn qio(f: &Path, pw: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("--image-opts")
        .arg(qopts(f));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(&mut c)
}

fn qemu_plain(f: &Path, pw: &str) -> Vec<u8> {
    let out = format!("{}.plain", f.display());
    let _ = std::fs::remove_file(&out);
    run(Command::new("qemu-img")
        .args(["convert", "--object"])
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("--image-opts")
        .arg(qopts(f))
        .args(["-O", "raw"])
        .arg(&out));
    let d = std::fs::read(&out).expect("plain");
    let _ = std::fs::remove_file(&out);
    d
}

fn qemu_check(f: &Path, pw: &str) {
    let out = run(Command::new("qemu-img")
        .args(["check", "--output=json", "--object"])
        .arg(format!("secret,id=s0,data={pw}"))
        .arg("--image-opts")
        .arg(qopts(f)));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    for k in ["corruptions", "leaks", "check-errors"] {
        assert!(v.get(k).is_none_or(|x| x == 0), "{k} in {out}");
    }
}

fn open(f: &Path, pw: &[u8]) -> Box<dyn BlockImage> {
    image::open_with_secret(f, &OpenOptions::default(), Some(&Passphrase::new(pw)))
        .unwrap_or_else(|e| panic!("open {}: {}", f.display(), chain(&e)))
}

fn read_all(img: &dyn BlockImage) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(img.capacity()).expect("fits")];
    img.read(0, &mut [IoSliceMut::new(&mut buf)]).expect("read");
    buf
}

fn write(img: &dyn BlockImage, off: u64, data: &[u8]) {
    img.write(off, &[IoSlice::new(data)]).expect("write");
}

const VARIANTS: &[&str] = &[
    "encrypt.format=luks",
    "encrypt.format=luks,encrypt.cipher-alg=aes-128",
    "encrypt.format=luks,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    "encrypt.format=luks,encrypt.hash-alg=sha1,cluster_size=4096",
    "encrypt.format=luks,encrypt.hash-alg=sha512,cluster_size=2M",
    "encrypt.format=aes",
];

#[test]
fn qemu_made_encrypted_qcow2_reads_and_writes_equal_both_ways() {
    let dir = tempfile::tempdir().expect("tmp");
    for (i, v) in VARIANTS.iter().enumerate() {
        let f = dir.path().join(format!("q{i}.qcow2"));
        let luks = v.contains("luks");
        let opts = if luks {
            format!("{v},encrypt.key-secret=s0,encrypt.iter-time=10")
        } else {
            format!("{v},encrypt.key-secret=s0")
        };
        qemu_img_create(&f, "pw", &opts, "4M");
        qio(
            &f,
            "pw",
            &[
                "write -P 0x5a 0 96k",
                "write -P 0xa5 1M 4k",
                "write -P 0x11 4092k 4k",
            ],
        );
        let img = open(&f, b"pw");
        assert_eq!(read_all(img.as_ref()), qemu_plain(&f, "pw"), "{v}");
        let data = pattern(300 * 1024, u8::try_from(i).expect("small"));
        write(img.as_ref(), 2 * 1024 * 1024 + 4096, &data); // new clusters, partial ones
        write(img.as_ref(), 8192, &data[..16384]); // over QEMU-written data
        img.flush().expect("flush");
        let mine = read_all(img.as_ref());
        drop(img);
        let theirs = qemu_plain(&f, "pw");
        assert_eq!(
            &theirs[2 * 1024 * 1024 + 4096..][..data.len()],
            &data[..],
            "{v}"
        );
        assert_eq!(&theirs[8192..8192 + 16384], &data[..16384], "{v}");
        assert_eq!(mine, theirs, "{v}");
        qemu_check(&f, "pw");
    }
}

#[test]
fn encrypted_qcow2_without_or_with_a_wrong_key_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("k.qcow2");
    qemu_img_create(
        &f,
        "pw",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "1M",
    );
    let before = std::fs::read(&f).expect("read");
    let e = image::open(&f, &OpenOptions::default())
        .err()
        .expect("needs a key");
    assert!(chain(&e).contains("a key is needed"), "{}", chain(&e));
    let e = image::open_with_secret(&f, &OpenOptions::default(), Some(&Passphrase::new(b"no")))
        .err()
        .expect("wrong key");
    assert!(chain(&e).contains("no key slot matches"), "{}", chain(&e));
    assert_eq!(std::fs::read(&f).expect("read"), before);
}

#[test]
fn qcow2_luks_images_we_create_open_in_qemu_and_pass_check() {
    let dir = tempfile::tempdir().expect("tmp");
    for (i, (cipher, hash)) in [
        ("aes-256-xts-plain64", LuksHash::Sha256),
        ("aes-128-cbc-essiv:sha256", LuksHash::Sha1),
    ]
    .iter()
    .enumerate()
    {
        let f = dir.path().join(format!("ours{i}.qcow2"));
        let params = CreateParams {
            spec: vhost_user_qcow2::crypto::luks::create::parse_cipher(cipher).expect("c"),
            hash: *hash,
            iterations: Iterations::Fixed(1000),
        };
        let opts = vhost_user_qcow2::qcow2::create::CreateOptions {
            size: 4 << 20,
            ..Default::default()
        };
        crypt::create_qcow2_luks(&f, &opts, &params, &Passphrase::new(b"ours")).expect("create");
        qemu_check(&f, "ours");
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&f));
        assert!(info.contains("\"format\": \"luks\""), "{info}");
        let img = open(&f, b"ours");
        let data = pattern(1 << 20, 40 + u8::try_from(i).expect("small"));
        write(img.as_ref(), 512 * 1024 + 512, &data);
        img.flush().expect("flush");
        drop(img);
        let theirs = qemu_plain(&f, "ours");
        assert_eq!(&theirs[512 * 1024 + 512..][..data.len()], &data[..]);
        qemu_check(&f, "ours");
    }
}

fn file_contains(f: &Path, marker: &[u8]) -> bool {
    let raw = std::fs::read(f).expect("read");
    raw.windows(marker.len()).any(|w| w == marker)
}

#[test]
fn plaintext_never_reaches_the_file_including_snapshot_cow_and_backing_copy_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let marker = b"LEAK-CANARY-0123";
    let data: Vec<u8> = marker.iter().copied().cycle().take(256 * 1024).collect();

    // COW over an internal snapshot: clusters with refcount 2 are copied before the write.
    let f = dir.path().join("snap.qcow2");
    qemu_img_create(
        &f,
        "pw",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "2M",
    );
    qio(&f, "pw", &["write -P 0x61 0 2M"]);
    run(Command::new("qemu-img")
        .args([
            "snapshot",
            "-c",
            "s1",
            "--object",
            "secret,id=s0,data=pw",
            "--image-opts",
        ])
        .arg(qopts(&f)));
    let img = open(&f, b"pw");
    write(img.as_ref(), 4096, &data[..100 * 1024]); // partial clusters: COW + fill
    write(img.as_ref(), 1 << 20, &data);
    img.flush().expect("flush");
    let back = read_all(img.as_ref());
    drop(img);
    assert_eq!(&back[4096..4096 + 100 * 1024], &data[..100 * 1024]);
    assert!(back[..4096].iter().all(|&b| b == 0x61));
    assert!(
        !file_contains(&f, marker),
        "plaintext in the snapshot image"
    );
    assert_eq!(qemu_plain(&f, "pw"), back);
    qemu_check(&f, "pw");

    // Copy-up from a plaintext backing file into an encrypted overlay.
    let base = dir.path().join("base.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("2M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x62 0 2M"])
        .arg(&base));
    // The backing's own data carries the canary too: a copy-up that skipped encryption shows.
    let bimg = image::open(&base, &OpenOptions::default()).expect("base");
    write(bimg.as_ref(), 0, &data);
    bimg.flush().expect("flush");
    drop(bimg);
    let over = dir.path().join("over.qcow2");
    qemu_img_create(
        &over,
        "pw",
        &format!(
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,backing_file={},backing_fmt=qcow2",
            base.display()
        ),
        "2M",
    );
    let img = open(&over, b"pw");
    write(img.as_ref(), 512, &data[..1024]); // partial cluster: copy-up of the rest
    write(img.as_ref(), 300 * 1024, &data[..8192]);
    img.flush().expect("flush");
    let back = read_all(img.as_ref());
    drop(img);
    assert_eq!(&back[..512], &data[..512]);
    assert_eq!(&back[512..1536], &data[..1024]);
    assert_eq!(&back[1536..256 * 1024], &data[1536..]);
    assert!(!file_contains(&over, marker), "plaintext in the overlay");
    assert_eq!(qemu_plain(&over, "pw"), back);
    qemu_check(&over, "pw");
}

#[test]
fn keyslot_cli_manages_qcow2_luks_slots_with_qemu_as_oracle() {
    use clap::Parser;
    use vhost_user_qcow2::cli::keyslot::{run_to, KeyslotArgs};
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: KeyslotArgs,
    }
    let ks = |argv: &[&str]| {
        let mut full = vec!["keyslot"];
        full.extend_from_slice(argv);
        let mut out = Vec::new();
        run_to(Cli::try_parse_from(full).expect("parse").args, &mut out)
            .map(|()| String::from_utf8(out).expect("utf8"))
    };
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("ks.qcow2");
    qemu_img_create(
        &f,
        "one",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "1M",
    );
    qio(&f, "one", &["write -P 0x44 0 64k"]);
    let fs = f.to_str().expect("p");
    let (k1, k2) = (dir.path().join("k1"), dir.path().join("k2"));
    std::fs::write(&k1, "one").expect("k1");
    std::fs::write(&k2, "two").expect("k2");
    let out = ks(&["list", fs, "--output", "json"]).expect("list");
    assert!(out.contains("\"payload-offset\": 2068480"), "{out}");
    ks(&[
        "add",
        fs,
        "--key-secret-file",
        k1.to_str().expect("p"),
        "--new-key-secret-file",
        k2.to_str().expect("p"),
        "--iter-time",
        "10",
    ])
    .expect("add");
    ks(&[
        "remove",
        fs,
        "--key-secret-file",
        k2.to_str().expect("p"),
        "--slot",
        "0",
    ])
    .expect("remove");
    // QEMU: "one" no longer opens, "two" does and sees the data; the image is clean.
    let bad = Command::new("qemu-io")
        .args(["--object", "secret,id=s0,data=one", "--image-opts"])
        .arg(qopts(&f))
        .args(["-c", "read 0 512"])
        .output()
        .expect("qemu-io");
    assert!(!bad.status.success());
    let out = qio(&f, "two", &["read -P 0x44 0 64k"]);
    assert!(!out.contains("fail"), "{out}");
    qemu_check(&f, "two");
    // A plain qcow2 has no keyslots.
    let plain = dir.path().join("plain.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&plain)
        .arg("1M"));
    let e = ks(&["list", plain.to_str().expect("p")]).expect_err("not luks");
    assert!(
        chain(&e).contains("without LUKS encryption"),
        "{}",
        chain(&e)
    );
}

#[test]
fn slots_qemu_img_amend_adds_to_qcow2_open_here_and_truncated_regions_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("am.qcow2");
    qemu_img_create(
        &f,
        "one",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "1M",
    );
    qio(&f, "one", &["write -P 0x55 0 128k"]);
    run(Command::new("qemu-img")
        .args(["amend", "--object", "secret,id=s0,data=one"])
        .args(["--object", "secret,id=s1,data=three", "--image-opts"])
        .arg(qopts(&f))
        .args([
            "-o",
            "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10",
        ]));
    let img = open(&f, b"three");
    assert_eq!(read_all(img.as_ref()), qemu_plain(&f, "one"));
    drop(img);

    // Cut the file inside the FDE region: a clear error, nothing written.
    let cut = dir.path().join("cut.qcow2");
    std::fs::copy(&f, &cut).expect("copy");
    let fh = std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .expect("open");
    fh.set_len(0x40000 + 1000).expect("truncate");
    drop(fh);
    let before = std::fs::read(&cut).expect("read");
    let e = image::open_with_secret(
        &cut,
        &OpenOptions::default(),
        Some(&Passphrase::new(b"one")),
    )
    .err()
    .expect("truncated");
    assert!(
        chain(&e).contains("past the end of the file"),
        "{}",
        chain(&e)
    );
    assert_eq!(std::fs::read(&cut).expect("read"), before);
}

#[test]
fn info_shows_luks_as_qemu_img_info_does() {
    use vhost_user_qcow2::cli::info::info_json;
    let dir = tempfile::tempdir().expect("tmp");
    let q = dir.path().join("i.qcow2");
    qemu_img_create(
        &q,
        "pw",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "1M",
    );
    let r = dir.path().join("i.luks");
    luks_common::qemu_create(&r, "pw", "cipher-alg=aes-128,hash-alg=sha512", "1M");
    for f in [&q, &r] {
        let theirs: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(f)))
        .expect("json");
        let ours = info_json(f, None).expect("info");
        assert_eq!(ours["format"], theirs["format"]);
        assert_eq!(ours["virtual-size"], theirs["virtual-size"]);
        assert_eq!(ours["encrypted"], true);
        assert_eq!(
            ours["format-specific"],
            theirs["format-specific"],
            "{}",
            f.display()
        );
    }
}

#[test]
fn compressed_clusters_in_a_luks_image_read_as_qemu_reads_them() {
    // QEMU writes compressed clusters of an encrypted image unencrypted; they must be read
    // without decryption, and overwriting them must allocate new encrypted clusters.
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("c.qcow2");
    qemu_img_create(
        &f,
        "pw",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "1M",
    );
    qio(
        &f,
        "pw",
        &[
            "write -c -P 0x77 0 64k",
            "write -c -P 0x78 128k 64k",
            "write -P 0x79 256k 64k",
        ],
    );
    let img = open(&f, b"pw");
    let plain = qemu_plain(&f, "pw");
    assert!(plain[..65536].iter().all(|&b| b == 0x77));
    assert_eq!(read_all(img.as_ref()), plain);
    let marker = b"COMPRESSED-OVER!";
    let data: Vec<u8> = marker.iter().copied().cycle().take(8192).collect();
    write(img.as_ref(), 4096, &data); // partial overwrite of a compressed cluster
    img.flush().expect("flush");
    let mine = read_all(img.as_ref());
    drop(img);
    assert_eq!(&mine[4096..4096 + 8192], &data[..]);
    assert!(mine[..4096].iter().all(|&b| b == 0x77));
    assert_eq!(qemu_plain(&f, "pw"), mine);
    assert!(!file_contains(&f, marker));
    qemu_check(&f, "pw");
}
