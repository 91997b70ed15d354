//! Command-line behaviour of `serve`: errors, signals, sockets.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;

use common::{spawn_serve, wait_timeout, Daemon, BIN};

#[test]
fn print_capabilities_is_json_for_a_block_backend() {
    let out = Command::new(BIN)
        .args(["serve", "--print-capabilities"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["type"], "block");
    assert!(v["features"]
        .as_array()
        .expect("features")
        .contains(&"read-only".into()));
}

#[test]
fn missing_image_exits_1_and_leaves_no_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(dir.path().join("missing.img"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("missing.img"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn unwritable_socket_path_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let sock = dir.path().join("no-such-dir").join("s.sock");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}

#[test]
fn socket_in_use_exits_1_and_the_first_daemon_keeps_its_socket() {
    let d = Daemon::start(1 << 20, &[]);
    // Another image: the same one would be refused earlier, by its lock.
    let other = d.dir.path().join("other.img");
    std::fs::write(&other, vec![0u8; 1 << 20]).expect("other image");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&d.sock)
        .arg("--image")
        .arg(&other)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert!(d.sock.exists());
    UnixStream::connect(&d.sock).expect("first daemon still listening");
}

#[test]
fn a_non_socket_at_the_socket_path_is_never_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&image)
        .arg("--image")
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        std::fs::metadata(&image).expect("still there").len(),
        1 << 20
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let sock = dir.path().join("s.sock");
    drop(UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists());
    let mut child = spawn_serve(&sock, &image, &[]);
    let t = std::time::Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed().as_secs() < 20, "daemon did not take over");
        assert!(child.try_wait().expect("wait").is_none(), "daemon exited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn sigterm_and_sigint_exit_0_and_remove_the_socket() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut d = Daemon::start(1 << 20, &[]);
        d.signal(sig);
        let status = d.wait_exit(20);
        assert_eq!(status.code(), Some(0), "signal {sig}");
        assert!(!d.sock.exists(), "socket left behind after signal {sig}");
    }
}

#[test]
fn inherited_listening_fd_is_served() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let sock = dir.path().join("s.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let fd = listener.as_raw_fd();
    // Let the child inherit the fd: clear FD_CLOEXEC.
    // SAFETY: fcntl on a descriptor we own.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let mut child = Command::new(BIN)
        .args(["serve", "--fd", &fd.to_string(), "--once", "--image"])
        .arg(&image)
        .spawn()
        .expect("spawn");
    drop(listener);
    // A frontend connects and leaves: with --once the daemon exits 0 and the path is not ours.
    let s = UnixStream::connect(&sock).expect("connect");
    drop(s);
    let status = wait_timeout(&mut child, 20).expect("exit after --once");
    assert_eq!(status.code(), Some(0));
    assert!(
        sock.exists(),
        "the daemon must not remove a socket it did not create"
    );

    let out = Command::new(BIN)
        .args(["serve", "--fd", "0", "--image"])
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn direct_on_a_qcow2_image_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let img = dir.path().join("d.qcow2");
    let st = Command::new(BIN)
        .args(["create", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .expect("create");
    assert!(st.success());
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(&img)
        .arg("--direct")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("raw images only"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn backend_program_conventions_work_without_a_subcommand() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["type"], "block");
    // The vhost-user JSON descriptor shipped for management tools names this binary.
    let desc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/vhost-user/50-vhost-user-qcow2.json"
        ))
        .expect("descriptor"),
    )
    .expect("descriptor json");
    assert_eq!(desc["type"], "block");
    assert!(desc["binary"]
        .as_str()
        .is_some_and(|b| b.ends_with("/vhost-user-qcow2")));
    // `--socket-path` without `serve`.
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let sock = dir.path().join("s.sock");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&image)
        .spawn()
        .expect("spawn");
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed().as_secs() < 20, "no socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn control_socket_queries_and_resizes_a_raw_export() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control.sock");
    let d = common::Daemon::start(
        1 << 20,
        &["--control-socket", control.to_str().expect("utf-8")],
    );
    let t = std::time::Instant::now();
    while !control.exists() {
        assert!(t.elapsed().as_secs() < 20, "no control socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&control)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    let ctl = |args: &[&str]| {
        Command::new(BIN)
            .arg("control")
            .arg(&control)
            .args(args)
            .output()
            .expect("control")
    };
    let q = ctl(&["query"]);
    assert!(q.status.success(), "{q:?}");
    let v: serde_json::Value = serde_json::from_slice(&q.stdout).expect("json");
    assert_eq!(v["capacity"], 1 << 20);
    assert_eq!(v["connected"], false);
    assert!(v["queue-stats"].is_array());
    let shrink = ctl(&["resize", "512K"]);
    assert_eq!(shrink.status.code(), Some(1), "shrink must be refused");
    assert_eq!(std::fs::metadata(&d.image).expect("stat").len(), 1 << 20);
    let grow = ctl(&["resize", "3M"]);
    assert!(grow.status.success(), "{grow:?}");
    let v: serde_json::Value = serde_json::from_slice(&grow.stdout).expect("json");
    assert_eq!(v["capacity"], 3 << 20);
    assert_eq!(std::fs::metadata(&d.image).expect("stat").len(), 3 << 20);
    let q: serde_json::Value = serde_json::from_slice(&ctl(&["query"]).stdout).expect("json");
    assert_eq!(q["capacity"], 3 << 20);
}

#[test]
fn offline_resize_grows_and_refuses_to_shrink_without_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("resize")
            .args(args)
            .output()
            .expect("resize")
    };
    let img = image.to_str().expect("utf-8");
    let out = run(&["-f", "raw", img, "+1M"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::metadata(&image).expect("stat").len(), 2 << 20);
    let out = run(&["-f", "raw", img, "1M"]);
    assert!(!out.status.success(), "shrink without --shrink must fail");
    assert_eq!(std::fs::metadata(&image).expect("stat").len(), 2 << 20);
    let out = run(&["--shrink", "-f", "raw", img, "-512K"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::metadata(&image).expect("stat").len(), 1536 << 10);
}

#[test]
fn offline_resize_grows_qcow2_and_qcow2_luks_as_qemu_img_sees_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "secret,id=s0,data=resize-pass";
    let plain = dir.path().join("p.qcow2");
    let enc = dir.path().join("e.qcow2");
    let qemu_img = |args: &[&str]| {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img");
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let p = plain.to_str().expect("utf-8");
    let e = enc.to_str().expect("utf-8");
    qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        secret,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        e,
        "64M",
    ]);
    let io = |opts: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["--object", secret, "--image-opts", opts]);
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        let out = c.output().expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("fail"),
            "qemu-io {cmds:?}: {text}"
        );
    };
    let p_opts = format!("driver=qcow2,file.filename={p}");
    let e_opts = format!("driver=qcow2,encrypt.key-secret=s0,file.filename={e}");
    for opts in [&p_opts, &e_opts] {
        io(opts, &["write -P 0x33 63M 1M"]);
    }
    for img in [p, e] {
        let out = Command::new(BIN)
            .args(["resize", img, "+192M"])
            .output()
            .expect("resize");
        assert!(out.status.success(), "{out:?}");
        let shrink = Command::new(BIN)
            .args(["resize", img, "32M"])
            .output()
            .expect("resize");
        assert!(!shrink.status.success(), "shrink must be refused");
    }
    for opts in [&p_opts, &e_opts] {
        let info = qemu_img(&[
            "info",
            "--object",
            secret,
            "--output=json",
            "--image-opts",
            opts,
        ]);
        assert!(info.contains("\"virtual-size\": 268435456"), "{info}");
        io(
            opts,
            &[
                "read -P 0x33 63M 1M",
                "write -P 0x44 250M 1M",
                "read -P 0x44 250M 1M",
            ],
        );
        qemu_img(&["check", "--object", secret, "--image-opts", opts]);
    }
}

#[test]
fn control_socket_resizes_a_raw_luks_export_as_qemu_sees_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("l.luks");
    let key = dir.path().join("key");
    std::fs::write(&key, "luks-resize").expect("key");
    let secret = "secret,id=s0,data=luks-resize";
    let i = img.to_str().expect("utf-8");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "luks", "--object", secret, "-o"])
        .args(["key-secret=s0,iter-time=10", i, "4M"])
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    let opts = format!("driver=luks,key-secret=s0,file.filename={i}");
    let io = |cmd: &str| {
        let out = Command::new("qemu-io")
            .args(["--object", secret, "--image-opts", &opts, "-c", cmd])
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("fail"),
            "{cmd}: {text}"
        );
    };
    io("write -P 0x5e 3M 1M");
    let control = dir.path().join("c.sock");
    let sock = dir.path().join("v.sock");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = KillOnDrop(spawn_serve(
        &sock,
        &img,
        &[
            "--key-secret-file",
            key.to_str().expect("utf-8"),
            "--control-socket",
            control.to_str().expect("utf-8"),
        ],
    ));
    let t = std::time::Instant::now();
    while !control.exists() {
        assert!(t.elapsed().as_secs() < 20, "no control socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = Command::new(BIN)
        .arg("control")
        .arg(&control)
        .args(["resize", "8M"])
        .output()
        .expect("control");
    assert!(out.status.success(), "{out:?}");
    drop(child);
    let info = Command::new("qemu-img")
        .args([
            "info",
            "--object",
            secret,
            "--output=json",
            "--image-opts",
            &opts,
        ])
        .output()
        .expect("qemu-img info");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("\"virtual-size\": 8388608"), "{text}");
    io("read -P 0x5e 3M 1M");
    io("write -P 0x6f 7M 1M");
    io("read -P 0x6f 7M 1M");
}

/// Log lines name the image and the socket; `--log-level` sets the level (RUST_LOG unset).
#[test]
fn log_lines_name_image_and_socket_and_follow_log_level() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::make_image(dir.path(), 1 << 20);
    let run = |level: &str| {
        let sock = dir.path().join(format!("{level}.sock"));
        let child = Command::new(BIN)
            .args(["--log-level", level, "serve", "--socket-path"])
            .arg(&sock)
            .arg("--image")
            .arg(&image)
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let t = std::time::Instant::now();
        while !sock.exists() {
            assert!(t.elapsed().as_secs() < 20, "no socket");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: kill() with our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success());
        (sock, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (sock, info) = run("info");
    let want = format!("{} on {}: serving", image.display(), sock.display());
    assert!(info.contains(&want), "{want:?} not in {info}");
    let (_, quiet) = run("error");
    assert!(!quiet.contains("serving"), "{quiet}");
}
