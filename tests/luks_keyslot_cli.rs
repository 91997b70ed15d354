//! `keyslot list|add|remove` on raw LUKS files, with qemu-io as the oracle.

mod luks_common;

use clap::Parser;
use luks_common::*;
use vhost_user_qcow2::cli::keyslot::{run_to, KeyslotArgs, KeyslotError};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: KeyslotArgs,
}

fn keyslot(argv: &[&str]) -> Result<String, KeyslotError> {
    let mut full = vec!["keyslot"];
    full.extend_from_slice(argv);
    let cli = Cli::try_parse_from(full).expect("arguments parse");
    let mut out = Vec::new();
    run_to(cli.args, &mut out)?;
    Ok(String::from_utf8(out).expect("utf8"))
}

#[test]
fn list_add_remove_round_trip_with_qemu() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("cli.luks");
    let fs = f.to_str().expect("utf8 path");
    qemu_create(
        &f,
        "alpha",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
        "128K",
    );
    let k1 = dir.path().join("k1");
    let k2 = dir.path().join("k2");
    std::fs::write(&k1, "alpha").expect("k1");
    std::fs::write(&k2, "beta").expect("k2");
    let (k1s, k2s) = (k1.to_str().expect("p"), k2.to_str().expect("p"));

    let json = keyslot(&["list", fs, "--output", "json"]).expect("list");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["cipher"], "aes-cbc-essiv:sha256");
    assert_eq!(v["key-bits"], 128);
    assert_eq!(v["slots"][0]["active"], true);
    assert_eq!(v["slots"][1]["active"], false);

    let out = keyslot(&[
        "add",
        fs,
        "--key-secret-file",
        k1s,
        "--new-key-secret-file",
        k2s,
        "--iter-time",
        "10",
    ])
    .expect("add");
    assert_eq!(out, "added keyslot 1\n");
    assert!(qemu_can_open(&f, "beta"));
    let human = keyslot(&["list", fs]).expect("list");
    assert!(human.contains("slot 1: active"), "{human}");

    // Wrong passphrase: refused, file untouched.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "gamma").expect("bad");
    let before = std::fs::read(&f).expect("read");
    let e = keyslot(&["remove", fs, "--key-secret-file", bad.to_str().expect("p")])
        .expect_err("wrong key");
    assert!(chain(&e).contains("no key slot matches"), "{}", chain(&e));
    assert_eq!(std::fs::read(&f).expect("read"), before);

    let out = keyslot(&["remove", fs, "--key-secret-file", k2s, "--slot", "0"]).expect("remove");
    assert_eq!(out, "removed keyslot 0\n");
    assert!(!qemu_can_open(&f, "alpha"));
    assert!(qemu_can_open(&f, "beta"));
    let before = std::fs::read(&f).expect("read");
    let e = keyslot(&["remove", fs, "--key-secret-file", k2s]).expect_err("last slot");
    assert!(chain(&e).contains("last active"), "{}", chain(&e));
    assert_eq!(std::fs::read(&f).expect("read"), before);
}

#[test]
fn qemu_info_json_matches_qemu_img_info_for_raw_luks() {
    use vhost_user_qcow2::cli::keyslot::qemu_info_json;
    use vhost_user_qcow2::crypto::luks::{keyslot::read_header, LuksArea};
    use vhost_user_qcow2::storage::{FileStorage, OpenFlags};
    let dir = tempfile::tempdir().expect("tmp");
    for (i, opts) in [
        "",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
    ]
    .iter()
    .enumerate()
    {
        let f = dir.path().join(format!("i{i}.luks"));
        qemu_create(&f, "pw", opts, "64K");
        let out = run(std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&f));
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let st = FileStorage::open(
            &f,
            OpenFlags {
                read_only: true,
                direct: false,
            },
        )
        .expect("open");
        let h = read_header(&LuksArea::whole(&st).expect("area")).expect("header");
        assert_eq!(qemu_info_json(&h), v["format-specific"]["data"], "{opts}");
    }
}

/// The passphrase prompt on a terminal (a pty from util-linux `script`): echo is off, the new
/// passphrase is asked twice, and the slot it makes opens in qemu-io.
#[test]
fn terminal_prompt_reads_without_echo_and_confirms() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("tty.luks");
    qemu_create(&f, "one", "", "64K");
    let k1 = dir.path().join("k1");
    std::fs::write(&k1, "one").expect("k1");
    let cmd = format!(
        "{} keyslot add {} --key-secret-file {} --iter-time 10",
        env!("CARGO_BIN_EXE_vhost-user-qcow2"),
        f.display(),
        k1.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut wait_for = |what: &str, seen: &mut String| {
        let mut b = [0u8; 256];
        while !seen.contains(what) {
            let n = stdout.read(&mut b).expect("read");
            assert!(n > 0, "EOF before {what:?}: {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&b[..n]));
        }
    };
    wait_for("New passphrase:", &mut seen);
    stdin.write_all(b"typed-secret\n").expect("type");
    wait_for("Verify passphrase:", &mut seen);
    stdin.write_all(b"typed-secret\n").expect("type");
    wait_for("added keyslot 1", &mut seen);
    drop(stdin);
    assert!(child.wait().expect("wait").success());
    assert!(!seen.contains("typed-secret"), "echoed: {seen:?}");
    assert!(qemu_can_open(&f, "typed-secret"));
    assert!(qemu_can_open(&f, "one"));
}
