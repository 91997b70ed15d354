//! A hostile image, a hostile guest and other local processes, tried against the real daemon:
//! external data files need the operator's consent, a guest cannot turn a probed raw image into
//! qcow2, images are locked as QEMU locks them (against qemu-io, qemu-img, qemu-storage-daemon
//! and a second daemon, both directions), the socket is 0600 under any umask, and a second
//! `serve` on a live socket does not take the first daemon's frontend slot.

mod common;

use std::mem::MaybeUninit;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use common::{spawn_serve, wait_timeout, Daemon, BIN};

const MIB: u64 = 1 << 20;
const MIB_US: usize = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn run_ok(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs our binary to completion (at most 30 s) and returns its output.
fn ours(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if wait_timeout(&mut child, 30).is_none() {
        let _ = child.kill();
        panic!("{args:?} did not exit: it is serving");
    }
    child.wait_with_output().expect("output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits until `path` exists (the daemon renames its socket into place once it listens, so
/// this never connects and never takes a `--once` daemon's frontend slot).
fn wait_for_path(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{path:?} never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Client {
    _blkio: Blkio,
    q: Blkioq,
    region: MemoryRegion,
}

impl Client {
    fn connect(sock: &Path) -> Client {
        Self::connect_ro(sock, false)
    }

    fn connect_ro(sock: &Path, read_only: bool) -> Client {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio");
        blkio.set_str("path", p(sock)).expect("path");
        blkio.set_bool("read-only", read_only).expect("read-only");
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", 1).expect("num-queues");
        let mut out = blkio.start().expect("start");
        let region = blkio.alloc_mem_region(MIB_US).expect("region");
        blkio.map_mem_region(&region).expect("map");
        Client {
            q: out.queues.remove(0),
            _blkio: blkio,
            region,
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping of `len` bytes owned by `_blkio`; requests are
        // waited for before the buffer is looked at again.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn complete(&mut self) -> i32 {
        let mut c = [MaybeUninit::uninit()];
        let n = self.q.do_io(&mut c, 1, None, None).expect("do_io");
        assert_eq!(n, 1);
        // SAFETY: do_io initialised the first `n` completions.
        unsafe { c[0].assume_init_read() }.ret
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        let ptr = self.buf().as_ptr();
        self.q.write(offset, ptr, data.len(), 0, ReqFlags::empty());
        self.complete()
    }

    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let ptr = self.buf().as_mut_ptr();
        self.q.read(offset, ptr, len, 0, ReqFlags::empty());
        assert_eq!(self.complete(), 0, "read at {offset}");
        self.buf()[..len].to_vec()
    }
}

// ---- 1. external data files ------------------------------------------------------------------

/// A qcow2 image whose header names `victim` as its raw external data file; `victim` holds 0x5a.
fn data_file_image(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("evil.qcow2");
    let victim = dir.join("victim.bin");
    let opt = format!("data_file={},data_file_raw=on", p(&victim));
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &opt, p(&img), "1M"],
    );
    std::fs::write(&victim, vec![0x5au8; MIB_US]).expect("victim");
    (img, victim)
}

#[test]
fn data_file_named_by_the_image_is_never_opened_without_consent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (img, victim) = data_file_image(dir.path());
    let sock = dir.path().join("s.sock");
    for extra in [&["--backing", "deny"][..], &[][..]] {
        let mut args = vec!["serve", "--socket-path", p(&sock), "--image", p(&img)];
        args.extend_from_slice(extra);
        let o = ours(&args);
        assert!(!o.status.success(), "{extra:?}: served");
        let e = stderr(&o);
        assert!(e.contains("external data file"), "{extra:?}: {e}");
        assert!(!sock.exists(), "{extra:?}: socket left behind");
    }
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        vec![0x5au8; MIB_US]
    );
    // A data file on an image without one is a mistake too.
    let plain = dir.path().join("plain.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&plain), "1M"],
    );
    let o = ours(&[
        "serve",
        "--socket-path",
        p(&sock),
        "--image",
        p(&plain),
        "--data-file",
        p(&victim),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no external data file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn data_file_named_by_the_operator_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (img, victim) = data_file_image(dir.path());
    let sock = dir.path().join("s.sock");
    let mut d = spawn_serve(&sock, &img, &["--data-file", p(&victim)]);
    wait_for_path(&sock);
    let mut c = Client::connect(&sock);
    assert_eq!(c.read(0, 4096), vec![0x5au8; 4096]);
    assert_eq!(c.write(8192, &[7u8; 512]), 0);
    drop(c);
    let _ = d.kill();
    let _ = d.wait();
    assert_eq!(
        std::fs::read(&victim).expect("victim")[8192..8704],
        [7u8; 512]
    );
}

// ---- 2. probed raw images ----------------------------------------------------------------------

/// The first 64 KiB of a qcow2 image naming a host file as its data file, as a guest would write.
/// (qemu-img creates and truncates the data file it is given: it must be a scratch path.)
fn qcow2_header_bytes(dir: &Path) -> Vec<u8> {
    let img = dir.join("forged.qcow2");
    let target = dir.join("host-file");
    let opt = format!("data_file={},data_file_raw=on", p(&target));
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &opt, p(&img), "1M"],
    );
    let mut b = std::fs::read(&img).expect("forged");
    b.resize(65536, 0);
    b
}

#[test]
fn guest_cannot_turn_a_probed_raw_image_into_qcow2() {
    let d = Daemon::start(8 * MIB, &[]);
    let header = qcow2_header_bytes(d.dir.path());
    let before = std::fs::read(&d.image).expect("image");
    let mut c = Client::connect(&d.sock);
    let r = c.write(0, &header);
    assert!(
        r < 0,
        "the write of a qcow2 header at offset 0 completed ({r})"
    );
    // The disk still probes as raw, and the daemon keeps serving.
    let after = std::fs::read(&d.image).expect("image");
    assert_eq!(&after[..512], &before[..512]);
    assert_eq!(c.read(0, 512), before[..512].to_vec());
    // Other writes to sector 0 and the header elsewhere are fine.
    let mut mbr = vec![0u8; 512];
    mbr[510..].copy_from_slice(&[0x55, 0xaa]);
    assert_eq!(c.write(0, &mbr), 0);
    assert_eq!(c.write(MIB, &header), 0);
    drop(c);
    let o = ours(&["info", "--output=json", p(&d.image)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["format"], "raw");
}

#[test]
fn explicit_raw_format_lets_the_guest_write_any_sector_0() {
    let d = Daemon::start(8 * MIB, &["--format", "raw"]);
    let header = qcow2_header_bytes(d.dir.path());
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.write(0, &header), 0);
    drop(c);
    assert_eq!(&std::fs::read(&d.image).expect("image")[..4], b"QFI\xfb");
}

// ---- 3. image locking ----------------------------------------------------------------------

fn qemu(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().expect(cmd)
}

#[test]
fn qemu_tools_are_refused_while_we_serve_except_read_only_with_u() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "8M"]);
    let sock = dir.path().join("s.sock");
    let mut d = spawn_serve(&sock, &img, &[]);
    wait_for_path(&sock);
    let o = qemu("qemu-io", &["-c", "write 0 512", p(&img)]);
    assert!(!o.status.success(), "qemu-io wrote to an image we serve");
    assert!(
        stderr(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&o)
    );
    let o = qemu("qemu-img", &["info", p(&img)]);
    assert!(!o.status.success(), "qemu-img info without -U");
    assert!(
        stderr(&o).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&o)
    );
    let o = qemu("qemu-img", &["info", "-U", p(&img)]);
    assert!(o.status.success(), "qemu-img info -U: {}", stderr(&o));
    let o = qemu("qemu-io", &["-r", "-U", "-c", "read 0 512", p(&img)]);
    assert!(o.status.success(), "qemu-io -r -U: {}", stderr(&o));
    // Once we are gone, qemu-io may write.
    d.kill().expect("kill");
    d.wait().expect("wait");
    let o = qemu("qemu-io", &["-c", "write 0 512", p(&img)]);
    assert!(o.status.success(), "after exit: {}", stderr(&o));
}

#[test]
fn backing_file_is_read_locked_while_we_serve_the_overlay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "8M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    let sock = dir.path().join("s.sock");
    let mut d = spawn_serve(&sock, &top, &[]);
    wait_for_path(&sock);
    // Nobody may write the backing file under us; reading it (as another overlay's base) is fine.
    let o = qemu("qemu-io", &["-c", "write 0 512", p(&base)]);
    assert!(!o.status.success(), "qemu-io wrote to our backing file");
    assert!(
        stderr(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&o)
    );
    let o = qemu("qemu-io", &["-r", "-c", "read 0 512", p(&base)]);
    assert!(o.status.success(), "reading the base: {}", stderr(&o));
    d.kill().expect("kill");
    d.wait().expect("wait");
}

#[test]
fn a_second_daemon_is_refused_unless_read_only_force_share() {
    let d = Daemon::start(8 * MIB, &["--format", "raw"]);
    let sock2 = d.dir.path().join("second.sock");
    let o = ours(&["serve", "--socket-path", p(&sock2), "--image", p(&d.image)]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("Failed to get"), "{e}");
    assert!(e.contains("Is another process using the image"), "{e}");
    assert!(!sock2.exists());
    // Read-only without -U is refused too (we do not share write with a reader).
    let o = ours(&[
        "serve",
        "--socket-path",
        p(&sock2),
        "--image",
        p(&d.image),
        "--read-only",
    ]);
    assert!(!o.status.success());
    // -U without --read-only is a usage error.
    let o = ours(&[
        "serve",
        "--socket-path",
        p(&sock2),
        "--image",
        p(&d.image),
        "-U",
    ]);
    assert!(stderr(&o).contains("read-only"), "{}", stderr(&o));
    // Read-only with --force-share serves.
    let mut ro = spawn_serve(&sock2, &d.image, &["--read-only", "--force-share"]);
    wait_for_path(&sock2);
    let mut c = Client::connect_ro(&sock2, true);
    assert_eq!(c.read(512, 512), vec![1u8; 512]);
    drop(c);
    let _ = ro.kill();
    let _ = ro.wait();
}

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn we_are_refused_while_qemu_storage_daemon_serves_the_image_writable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "8M"]);
    let qsock = dir.path().join("qsd.sock");
    let _qsd = Qsd(Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,filename={},node-name=f", p(&img)),
            "--blockdev",
            "driver=qcow2,file=f,node-name=q",
            "--export",
            &format!(
                "type=vhost-user-blk,id=e,node-name=q,writable=on,addr.type=unix,addr.path={}",
                p(&qsock)
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon"));
    wait_for_path(&qsock);
    let sock = dir.path().join("ours.sock");
    for extra in [&[][..], &["--read-only"][..]] {
        let mut args = vec!["serve", "--socket-path", p(&sock), "--image", p(&img)];
        args.extend_from_slice(extra);
        let o = ours(&args);
        assert!(!o.status.success(), "{extra:?}: served beside qsd");
        assert!(stderr(&o).contains("Failed to get"), "{}", stderr(&o));
    }
    let o = ours(&["check", "--repair", "all", p(&img)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Failed to get"), "{}", stderr(&o));
    let o = ours(&[
        "keyslot",
        "add",
        "--key-secret-file",
        "/dev/null",
        "--new-key-secret-file",
        "/dev/null",
        p(&img),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Failed to get"), "{}", stderr(&o));
    // A read-only check and a force-share read-only serve still work.
    let o = ours(&["check", p(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut ro = spawn_serve(&sock, &img, &["--read-only", "-U"]);
    wait_for_path(&sock);
    let mut c = Client::connect_ro(&sock, true);
    assert_eq!(c.read(0, 512), vec![0u8; 512]);
    drop(c);
    let _ = ro.kill();
    let _ = ro.wait();
}

// ---- 4. socket permissions ---------------------------------------------------------------------

fn serve_under_umask(dir: &Path, umask: &str, extra: &str) -> (Child, PathBuf) {
    let img = common::make_image(dir, MIB);
    let sock = dir.join("u.sock");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask {umask}; exec \"$0\" serve --socket-path \"$1\" --image \"$2\" --format raw {extra}"
        ))
        .arg(BIN)
        .arg(&sock)
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh");
    (child, sock)
}

#[test]
fn socket_is_0600_under_umask_000_and_widened_only_on_request() {
    for (extra, want) in [("", 0o600), ("--socket-mode 0660", 0o660)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut child, sock) = serve_under_umask(dir.path(), "000", extra);
        wait_for_path(&sock);
        let mode = std::fs::symlink_metadata(&sock)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777;
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(mode, want, "{extra:?}: socket mode {mode:o}");
        // Nothing but the image and the socket (if not removed) is left in the directory.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "private directory left behind: {left:?}");
    }
}

#[test]
fn socket_group_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    let (mut child, sock) = serve_under_umask(
        dir.path(),
        "077",
        &format!("--socket-mode 0660 --socket-group {gid}"),
    );
    wait_for_path(&sock);
    let meta = std::fs::symlink_metadata(&sock).expect("stat");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
}

// ---- 5. a second serve does not take a --once daemon's frontend ----------------------------

#[test]
fn second_serve_on_a_live_socket_leaves_the_once_daemon_its_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = common::make_image(dir.path(), 8 * MIB);
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![0u8; MIB_US]).expect("other");
    let sock = dir.path().join("s.sock");
    let mut first = spawn_serve(&sock, &img, &["--once", "--format", "raw"]);
    wait_for_path(&sock);
    let o = ours(&[
        "serve",
        "--socket-path",
        p(&sock),
        "--image",
        p(&other),
        "--once",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        first.try_wait().expect("try_wait").is_none(),
        "the first daemon exited: the probe took its only connection"
    );
    let mut c = Client::connect(&sock);
    assert_eq!(c.read(512, 512), vec![1u8; 512]);
    drop(c);
    assert!(
        wait_timeout(&mut first, 20).is_some(),
        "--once daemon kept running"
    );
}
