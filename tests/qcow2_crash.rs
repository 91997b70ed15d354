//! Crash consistency: a child process writes randomly through our library and is SIGKILLed at
//! random moments (50 times). After each kill `qemu-img check` must find no corruption (leaks
//! are allowed, and our `check --repair leaks` must clear them), and every write acknowledged
//! before the last completed FLUSH must read back (through QEMU), while sectors touched after it
//! may hold any value written after it.
//!
//! The child is this test binary itself, re-run with `--ignored --exact crash_child_writer`.

use std::io::{IoSlice, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost_user_qcow2::image::{self, OpenOptions};

const SIZE: u64 = 16 << 20;
const SECTOR: u64 = 512;

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

/// The writer. Logs "I seq off len byte" before each op, "F" after each completed flush.
#[test]
#[ignore = "run as a child of crash_kills_never_corrupt"]
fn crash_child_writer() {
    let (Ok(img_path), Ok(log_path), Ok(seed)) = (
        std::env::var("VUQ_CRASH_IMG"),
        std::env::var("VUQ_CRASH_LOG"),
        std::env::var("VUQ_CRASH_SEED"),
    ) else {
        return;
    };
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)
        .expect("log");
    let img = image::open(Path::new(&img_path), &OpenOptions::default()).expect("open");
    let mut rng = StdRng::seed_from_u64(seed.parse().expect("seed"));
    let mut seq = 0u64;
    loop {
        seq += 1;
        let sectors: u64 = if rng.random_bool(0.7) {
            rng.random_range(1..=32)
        } else {
            rng.random_range(1..=512)
        };
        let start = rng.random_range(0..SIZE / SECTOR - sectors);
        let (off, len) = (start * SECTOR, sectors * SECTOR);
        let kind = rng.random_range(0..10);
        let byte: u8 = if kind < 7 {
            u8::try_from(seq % 255).expect("byte") + 1
        } else {
            0
        };
        log.write_all(format!("I {seq} {off} {len} {byte} {kind}\n").as_bytes())
            .expect("log");
        match kind {
            0..=6 => {
                let data = vec![byte; usize::try_from(len).expect("len")];
                img.write(off, &[IoSlice::new(&data)]).expect("write");
            }
            7..=8 => img.write_zeroes(off, len, true).expect("zeroes"),
            _ => img.discard(off, len).expect("discard"),
        }
        if seq.is_multiple_of(8) {
            img.flush().expect("flush");
            log.write_all(b"F\n").expect("log");
        }
    }
}

fn qemu_view(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("view.raw");
    let _ = std::fs::remove_file(&out);
    let o = Command::new("qemu-img")
        .args(["convert", "-O", "raw", p(img), p(&out)])
        .output()
        .expect("spawn");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(&out).expect("read")
}

#[test]
fn crash_kills_never_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("crash.qcow2");
    let o = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            p(&img),
            "16M",
        ])
        .output()
        .expect("spawn");
    assert!(o.status.success());
    let exe = std::env::current_exe().expect("exe");
    let mut rng = StdRng::seed_from_u64(0xC0FFEE);
    let mut baseline = vec![0u8; usize::try_from(SIZE).expect("size")];
    let mut total_flushed = 0usize;
    for round in 0..50u64 {
        let log = dir.path().join(format!("log{round}"));
        let mut child = Command::new(&exe)
            .args(["--ignored", "--exact", "crash_child_writer", "--nocapture"])
            .env("VUQ_CRASH_IMG", &img)
            .env("VUQ_CRASH_LOG", &log)
            .env("VUQ_CRASH_SEED", (round + 1).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        std::thread::sleep(Duration::from_millis(rng.random_range(30..400)));
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");

        let chk = Command::new("qemu-img")
            .args(["check", "--output=json", p(&img)])
            .output()
            .expect("check");
        let code = chk.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check exit {code}: {}",
            String::from_utf8_lossy(&chk.stdout)
        );

        // What must hold: the state at the last flush, and what may hold after it.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let last_flush = lines.iter().rposition(|l| *l == "F");
        let mut must = baseline.clone();
        let mut may: Vec<Vec<u8>> = vec![Vec::new(); baseline.len() / 512];
        for (i, l) in lines.iter().enumerate() {
            let f: Vec<u64> = l
                .split(' ')
                .skip(1)
                .map(|x| x.parse().expect("num"))
                .collect();
            if f.is_empty() {
                continue;
            }
            let (off, len, byte, kind) = (f[1], f[2], u8::try_from(f[3]).expect("b"), f[4]);
            let s = usize::try_from(off).expect("off");
            let e = usize::try_from(off + len).expect("end");
            let before_flush = last_flush.is_some_and(|lf| i < lf);
            if kind == 9 {
                // A discard may leave old data or zeroes.
                for m in &mut may[s / 512..e / 512] {
                    m.push(0);
                }
                continue;
            }
            if before_flush {
                must[s..e].fill(byte);
                for m in &mut may[s / 512..e / 512] {
                    m.clear();
                }
            } else {
                for m in &mut may[s / 512..e / 512] {
                    m.push(byte);
                }
            }
            if before_flush {
                total_flushed += 1;
            }
        }
        let got = qemu_view(&img, dir.path());
        for sec in 0..may.len() {
            let g = &got[sec * 512..sec * 512 + 512];
            let m = must[sec * 512];
            assert!(
                g.iter().all(|&b| b == m || may[sec].contains(&b)),
                "round {round}: sector {sec} holds {:#x}, expected {m:#x} or one of {:?}",
                g[0],
                may[sec]
            );
        }
        baseline = got;

        // Our repair clears the leaks; then qemu-img finds nothing.
        let st =
            vhost_user_qcow2::storage::FileStorage::open(&img, Default::default()).expect("open");
        vhost_user_qcow2::qcow2::check::check(
            &st,
            Some(vhost_user_qcow2::qcow2::check::Repair::Leaks),
        )
        .expect("repair");
        drop(st);
        let chk = Command::new("qemu-img")
            .args(["check", p(&img)])
            .output()
            .expect("check");
        assert!(
            chk.status.success(),
            "round {round}: after repair: {}",
            String::from_utf8_lossy(&chk.stdout)
        );
    }
    assert!(
        total_flushed > 500,
        "too few flushed writes: {total_flushed}"
    );
}
