//! Issue 14's proof: the qcow2 engine under injected storage faults and under power loss.
//!
//! Two images made by QEMU (`plain`: qcow2 v3, 1 KiB clusters; `luks`: the same with LUKS,
//! unlocked by the library with its passphrase), each over a backing file, with an internal
//! snapshot (`qemu-img snapshot -c`) and compressed clusters (`qemu-io -c 'write -c …'`). The
//! workload ([`WORKLOAD`]) does allocating writes, copy-on-write over the snapshot, an overwrite
//! of a compressed cluster, copy-up from the backing file, discard, write-zeroes, enough fresh
//! allocation to need new refcount blocks (1 KiB clusters: one refcount block covers 512 KiB),
//! and flushes.
//!
//! - Fault injection ([`faults::FaultStorage`]): for every operation index N of the workload and
//!   each fault (EIO on any operation, ENOSPC on any write-type one, a short write), the request
//!   that meets the fault may fail but must not panic; every later request must succeed; after a
//!   last flush the image reads back what the shadow model says (the failed request's sectors
//!   may hold old or new data) after reopening (and through the open image in the full sweep);
//!   and `qemu-img check` finds no corruption (leaks are counted; the full sweep allows none).
//! - Power loss ([`faults::PowerLossStorage`]): the workload runs once; for every cut point (every
//!   storage operation) the images a power loss could leave (unsynced writes all dropped, all
//!   kept, random subsets, torn 512-byte pieces) must pass `qemu-img check` without corruption
//!   (leaks are allowed: a crash between a refcount increment and the pointer that uses it leaks
//!   by design, as in QEMU) and hold every write completed before the last completed flush.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

#[path = "support/faults.rs"]
mod faults;
use faults::{Fault, FaultStorage, PowerLossLog, PowerLossStorage};

use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::image::qcow2::Qcow2Image;
use vhost_user_qcow2::image::{self, BlockImage, OpenOptions};
use vhost_user_qcow2::qcow2::{self, ClusterCrypt, Qcow2, Qcow2Options};
use vhost_user_qcow2::storage::{MemStorage, Storage};

const KIB: u64 = 1024;
/// Guest size of the test images.
const SIZE: u64 = 2 << 20;
const SECTORS: usize = (SIZE / 512) as usize;
const PASSPHRASE: &str = "fault-pass";

/// One guest request.
#[derive(Clone, Copy, Debug)]
enum Req {
    Write(u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
    Flush,
}

/// The mixed workload (offsets for 1 KiB clusters; see [`make_images`] for what is where).
const WORKLOAD: &[Req] = &[
    Req::Write(1024 * KIB, 8 * KIB), // fresh clusters over the backing file
    Req::Write(4 * KIB + 512, 3 * KIB), // COW of snapshot clusters, partial ends
    Req::Write(256 * KIB + KIB + 512, 512), // overwrite inside a compressed cluster
    Req::Write(1152 * KIB + 512, 1536), // copy-up of backing data, partial clusters
    Req::Flush,
    Req::Discard(64 * KIB, 8 * KIB), // discard of snapshot clusters
    Req::Zero(512 * KIB + KIB + 512, 4 * KIB), // write-zeroes, partial and whole clusters
    Req::Write(1280 * KIB, 24 * KIB), // crosses a refcount block (see make_images)
    Req::Zero(640 * KIB, 8 * KIB),   // zeroes over refcount-1 clusters (frees)
    Req::Flush,
    Req::Discard(1024 * KIB, 4 * KIB), // discard of our own clusters (frees)
    Req::Write(1026 * KIB, 4 * KIB),   // re-allocate over the discarded range
    Req::Write(644 * KIB, 2 * KIB),    // allocate over the zeroed range
    Req::Write(260 * KIB, 4 * KIB),    // whole compressed clusters overwritten
    Req::Flush,
];

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

fn run(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The whole error chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

// ------------------------------------------------------------------ images

/// One test image made by QEMU, with what it takes to open it over any storage.
struct Scenario {
    name: &'static str,
    dir: tempfile::TempDir,
    /// The overlay's path (backing names resolve against it; check copies go next to it).
    path: PathBuf,
    /// The overlay file as QEMU left it.
    initial: Vec<u8>,
    /// The guest view of `initial`, as QEMU reads it, one tag per sector.
    initial_tags: Vec<u64>,
    secret: Option<Passphrase>,
    crypt: Option<Arc<dyn ClusterCrypt>>,
}

impl Scenario {
    /// `qemu-img`/`qemu-io` arguments naming a file of this scenario's kind.
    fn qemu_args(&self, file: &Path) -> Vec<String> {
        if self.secret.is_some() {
            vec![
                "--object".into(),
                format!("secret,id=s0,data={PASSPHRASE}"),
                "--image-opts".into(),
                format!(
                    "driver=qcow2,file.filename={},encrypt.key-secret=s0",
                    p(file)
                ),
            ]
        } else {
            vec!["-f".into(), "qcow2".into(), p(file).into()]
        }
    }

    fn qemu(&self, cmd: &str, pre: &[&str], file: &Path, post: &[&str]) {
        let mut args: Vec<String> = pre.iter().map(|s| s.to_string()).collect();
        args.extend(self.qemu_args(file));
        args.extend(post.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(cmd, &refs);
    }

    /// Opens the image held by `st` through the library's public API, as `image::open` does
    /// for a file: probe, unlock (the key is derived once per scenario), backing chain, engine.
    fn open(&self, st: Box<dyn Storage>, read_only: bool) -> image::Result<Qcow2Image> {
        let probe = qcow2::probe(st.as_ref())?;
        let backing = image::open_backing(
            &self.path,
            &probe.header,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
            self.secret.as_ref(),
            &mut image::OpenCtx::default(),
        )?;
        let q = Qcow2::open(
            st,
            &Qcow2Options {
                read_only,
                ..Default::default()
            },
            backing,
            self.crypt.clone(),
        )?;
        Ok(Qcow2Image::new(q))
    }

    /// `qemu-img check` of `bytes` (written next to the overlay): Ok(leaks) or Err(report).
    fn qemu_check(&self, bytes: &[u8]) -> Result<u64, String> {
        let f = self.dir.path().join("check.qcow2");
        std::fs::write(&f, bytes).expect("write check copy");
        let mut args: Vec<String> = vec!["check".into(), "--output=json".into()];
        args.extend(self.qemu_args(&f));
        let o = Command::new("qemu-img")
            .args(&args)
            .output()
            .expect("spawn");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let json: serde_json::Value = match serde_json::from_str(&out) {
            Ok(v) => v,
            Err(_) => {
                return Err(format!(
                    "qemu-img check exit {:?}: {out}{}",
                    o.status.code(),
                    String::from_utf8_lossy(&o.stderr)
                ))
            }
        };
        let field = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let bad = field("corruptions") + field("check-errors");
        if bad != 0 || !(o.status.success() || o.status.code() == Some(3)) {
            // The human-readable report names the clusters.
            let mut args: Vec<String> = vec!["check".into()];
            args.extend(self.qemu_args(&f));
            let o = Command::new("qemu-img")
                .args(&args)
                .output()
                .expect("spawn");
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            let errs: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
            return Err(format!(
                "qemu-img check: {} corruptions, {} leaks: {}",
                field("corruptions"),
                field("leaks"),
                errs.join(" | ")
            ));
        }
        Ok(field("leaks"))
    }
}

/// The tag of a sector our workload writes: request `seq` (1-based), guest sector `sector`.
fn tag(seq: usize, sector: usize) -> u64 {
    0xA5 << 56 | (seq as u64) << 32 | sector as u64
}

/// A sector's tag: its first 8 bytes (LE) if all 64 words are equal, else `None`.
fn decode(sector: &[u8]) -> Option<u64> {
    let w = u64::from_le_bytes(sector[..8].try_into().expect("8 bytes"));
    // Periodic with period 8 ⇔ every word equals the first (one memcmp, fast in debug builds).
    (sector[8..] == sector[..sector.len() - 8]).then_some(w)
}

fn make_images(name: &'static str, luks: bool) -> Scenario {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let path = dir.path().join("img.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "2M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5b 0 2M", p(&base)],
    );
    let mut opts = String::from("cluster_size=1024");
    let mut pre: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if luks {
        pre.extend(["--object".into(), format!("secret,id=s0,data={PASSPHRASE}")]);
        opts.push_str(",encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10");
    }
    pre.extend([
        "-o".into(),
        opts,
        "-b".into(),
        "base.qcow2".into(),
        "-F".into(),
        "qcow2".into(),
        p(&path).into(),
        "2M".into(),
    ]);
    run(
        "qemu-img",
        &pre.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut sc = Scenario {
        name,
        dir,
        path: path.clone(),
        initial: Vec::new(),
        initial_tags: Vec::new(),
        secret: luks.then(|| Passphrase::new(PASSPHRASE.as_bytes())),
        crypt: None,
    };
    // Data before the snapshot (so the snapshot shares it), compressed clusters, then data that
    // only the active layer references.
    sc.qemu(
        "qemu-io",
        &[],
        &path,
        &[
            "-c",
            "write -P 0x11 0 256k",
            "-c",
            "write -c -P 0x22 256k 16k",
            "-c",
            "write -P 0x33 512k 64k",
        ],
    );
    sc.qemu("qemu-img", &["snapshot", "-c", "snap1"], &path, &[]);
    sc.qemu("qemu-io", &[], &path, &["-c", "write -P 0x44 640k 32k"]);
    // Fill guest 1536k.. until the file ends a few clusters short of the next 512 KiB boundary
    // (what one refcount block covers at 1 KiB clusters), so that the workload's allocations
    // need a new refcount block.
    let len = std::fs::metadata(&path).expect("stat").len();
    let boundary = (len + 32 * KIB).div_ceil(512 * KIB) * 512 * KIB;
    let fill = (boundary - len - 16 * KIB) / KIB * 1024 / 2048 * 2048;
    assert!(fill <= 512 * KIB);
    if fill > 0 {
        sc.qemu(
            "qemu-io",
            &[],
            &path,
            &["-c", &format!("write -P 0x55 1536k {fill}")],
        );
    }
    sc.initial = std::fs::read(&path).expect("read image");
    let raw = sc.dir.path().join("initial.raw");
    let mut conv = vec!["convert", "-O", "raw"];
    let a = sc.qemu_args(&path);
    conv.extend(a.iter().map(String::as_str));
    conv.push(p(&raw));
    // `convert` takes the source arguments before the target.
    let conv: Vec<&str> = conv;
    run("qemu-img", &conv);
    let view = std::fs::read(&raw).expect("read view");
    sc.initial_tags = view
        .chunks_exact(512)
        .map(|s| decode(s).expect("QEMU's patterns are uniform per sector"))
        .collect();
    assert_eq!(sc.initial_tags.len(), SECTORS);
    let st = MemStorage::new(sc.initial.clone());
    let probe = qcow2::probe(&st).expect("probe");
    sc.crypt = image::crypt::qcow2_crypt(&st, &probe, sc.secret.as_ref()).expect("unlock");
    assert_eq!(sc.crypt.is_some(), luks);
    sc
}

// ------------------------------------------------------------------ shadow model

/// Per guest sector, the tags it may hold.
#[derive(Clone)]
struct Shadow(Vec<Vec<u64>>);

impl Shadow {
    fn new(initial: &[u64]) -> Self {
        Self(initial.iter().map(|&t| vec![t]).collect())
    }

    fn sectors(off: u64, len: u64) -> std::ops::Range<usize> {
        usize::try_from(off / 512).expect("s")..usize::try_from((off + len) / 512).expect("e")
    }

    /// Request `seq` completed (`certain`) or may have partly happened (not `certain`).
    fn apply(&mut self, seq: usize, req: Req, certain: bool) {
        let (range, val): (_, Box<dyn Fn(usize) -> u64>) = match req {
            Req::Write(o, l) => (Self::sectors(o, l), Box::new(move |s| tag(seq, s))),
            // A discard is advisory: old data or zeroes.
            Req::Discard(o, l) => {
                for s in Self::sectors(o, l) {
                    if !self.0[s].contains(&0) {
                        self.0[s].push(0);
                    }
                }
                return;
            }
            Req::Zero(o, l) => (Self::sectors(o, l), Box::new(|_| 0)),
            Req::Flush => return,
        };
        for s in range {
            let v = val(s);
            if certain {
                self.0[s] = vec![v];
            } else if !self.0[s].contains(&v) {
                self.0[s].push(v);
            }
        }
    }

    /// Reads through `img` (the whole disk if `full`, else every range the workload touches,
    /// widened to 4 KiB) and compares; the first mismatches as text.
    fn verify(&self, img: &dyn BlockImage, full: bool) -> Result<(), String> {
        let ranges: Vec<(u64, u64)> = if full {
            vec![(0, SIZE)]
        } else {
            WORKLOAD
                .iter()
                .filter_map(|r| match *r {
                    Req::Write(o, l) | Req::Zero(o, l) | Req::Discard(o, l) => {
                        let a = o / 4096 * 4096;
                        Some((a, (o + l).div_ceil(4096) * 4096 - a))
                    }
                    Req::Flush => None,
                })
                .collect()
        };
        let mut bad = Vec::new();
        for (off, len) in ranges {
            let mut buf = vec![0u8; usize::try_from(len).expect("len")];
            img.read(off, &mut [IoSliceMut::new(&mut buf)])
                .map_err(|e| format!("read-back at {off:#x} failed: {}", chain(&e)))?;
            let first = usize::try_from(off / 512).expect("sector");
            for (i, sec) in buf.chunks_exact(512).enumerate() {
                let s = first + i;
                let got = decode(sec);
                if !got.is_some_and(|g| self.0[s].contains(&g)) {
                    bad.push(format!(
                        "sector {s} (guest {:#x}) holds {got:x?}, allowed {:x?}",
                        s * 512,
                        self.0[s]
                    ));
                }
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            let n = bad.len();
            bad.truncate(3);
            Err(format!("{n} sectors differ: {}", bad.join("; ")))
        }
    }
}

fn data_for(seq: usize, off: u64, len: u64) -> Vec<u8> {
    let first = usize::try_from(off / 512).expect("s");
    let mut v = Vec::with_capacity(usize::try_from(len).expect("len"));
    for s in first..first + usize::try_from(len / 512).expect("n") {
        for _ in 0..64 {
            v.extend_from_slice(&tag(seq, s).to_le_bytes());
        }
    }
    v
}

fn submit(img: &dyn BlockImage, seq: usize, req: Req) -> image::Result<()> {
    match req {
        Req::Write(o, l) => img.write(o, &[IoSlice::new(&data_for(seq, o, l))]),
        Req::Zero(o, l) => img.write_zeroes(o, l, true),
        Req::Discard(o, l) => img.discard(o, l),
        Req::Flush => img.flush(),
    }
}

// ------------------------------------------------------------------ fault injection

/// Runs the workload with the `n`-th operation failing; `Ok(None)` when the workload has fewer
/// than `n + 1` operations (the sweep is over), `Ok(Some(leaks))` when every property held.
fn fault_case(sc: &Scenario, fault: Fault, n: u64, full: bool) -> Result<Option<u64>, String> {
    let mem = Arc::new(MemStorage::new(sc.initial.clone()));
    let fs = FaultStorage::new(mem.clone(), fault);
    let img = sc
        .open(Box::new(fs.clone()), false)
        .map_err(|e| format!("open: {}", chain(&e)))?;
    fs.arm(n);
    let mut shadow = Shadow::new(&sc.initial_tags);
    let mut errors = Vec::new();
    let r = catch_unwind(AssertUnwindSafe(|| {
        for (i, &req) in WORKLOAD.iter().enumerate() {
            let before = fs.fired();
            let r = submit(&img, i + 1, req);
            let hit = !before && fs.fired();
            match r {
                Ok(()) => shadow.apply(i + 1, req, true),
                Err(_) if hit => shadow.apply(i + 1, req, false),
                Err(e) => errors.push(format!(
                    "request {i} {req:?} failed {} the fault: {}",
                    if before { "after" } else { "without" },
                    chain(&e)
                )),
            }
        }
        // One more flush: after a failed last flush this one must make everything durable (and
        // if the fault lands in this flush itself, the one after it).
        let before = fs.fired();
        let r = img.flush();
        let r = if r.is_err() && !before && fs.fired() {
            img.flush()
        } else {
            r
        };
        if let Err(e) = r {
            errors.push(format!("flush after the workload: {}", chain(&e)));
        }
    }));
    if let Err(p) = r {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        return Err(format!("panic: {msg}"));
    }
    if !fs.fired() {
        return Ok(None);
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    if full {
        shadow
            .verify(&img, true)
            .map_err(|e| format!("open image: {e}"))?;
    }
    drop(img);
    let bytes = mem.contents();
    let leaks = sc.qemu_check(&bytes)?;
    let again = sc
        .open(Box::new(MemStorage::new(bytes)), true)
        .map_err(|e| format!("reopen: {}", chain(&e)))?;
    shadow
        .verify(&again, full)
        .map_err(|e| format!("after reopen: {e}"))?;
    Ok(Some(leaks))
}

/// Walks N over every `stride`-th operation index of the workload under `fault` (every one with
/// stride 1); returns the failures. Leaks count as failures only if `strict`; otherwise they
/// are summed up in the summary line.
fn fault_sweep(sc: &Scenario, fault: Fault, stride: u64, full: bool, strict: bool) -> Vec<String> {
    let mut failures = Vec::new();
    let (mut leaky, mut max_leak) = (0u64, 0u64);
    let mut n = 0u64;
    loop {
        match fault_case(sc, fault, n, full) {
            Ok(None) => break,
            Ok(Some(0)) => {}
            Ok(Some(leaks)) => {
                leaky += 1;
                max_leak = max_leak.max(leaks);
                if strict {
                    failures.push(format!(
                        "{} {fault:?} at op {n}: {leaks} leaked clusters",
                        sc.name
                    ));
                }
            }
            Err(e) => failures.push(format!("{} {fault:?} at op {n}: {e}", sc.name)),
        }
        n += stride;
        assert!(n < 100_000, "the workload never ends");
    }
    eprintln!(
        "{} {fault:?}: operation indices 0..{n} step {stride}, {} failed, {leaky} leaked (at most {max_leak} clusters)",
        sc.name,
        failures.len()
    );
    failures
}

/// Sweeps each of `faults` over every operation index; `full` reads the whole disk back, both
/// through the open image and after reopening (else only what the workload touched, after
/// reopening: `qemu-img check` vouches for the rest of the structure). Without `strict`,
/// clusters leaked by a failed request are allowed: after an I/O error the engine cannot know
/// whether a refcount increment reached the disk, and leaking is the safe direction (never
/// corruption; `qemu-img check -r leaks` repairs it), as in QEMU.
fn assert_sweeps(sc: &Scenario, faults: &[Fault], stride: u64, full: bool, strict: bool) {
    let mut failures = Vec::new();
    for &fault in faults {
        failures.extend(fault_sweep(sc, fault, stride, full, strict));
    }
    assert!(
        failures.is_empty(),
        "{} of the fault cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ------------------------------------------------------------------ power loss

/// Runs the workload once over a [`PowerLossStorage`], then checks the images of every cut.
/// `stride` > 1 checks only every `stride`-th cut point (the CI version of the LUKS sweep).
fn power_loss_sweep(sc: &Scenario, subsets: usize, stride: usize, full: bool) -> Vec<String> {
    let pl = PowerLossStorage::new(sc.initial.clone());
    let img = sc.open(Box::new(pl.clone()), false).expect("open");
    let opened = pl.events();
    // (first event, event after the last, request) per request.
    let mut spans = Vec::new();
    for (i, &req) in WORKLOAD.iter().enumerate() {
        let start = pl.events();
        submit(&img, i + 1, req).expect("no fault: request succeeds");
        spans.push((start, pl.events(), req));
    }
    let end = pl.events();
    drop(img);
    let log: Vec<_> = pl.log().into_iter().take(end).collect();
    let plog = PowerLossLog::new(sc.initial.clone(), log);
    let mut failures = Vec::new();
    let mut images = 0usize;
    let mut leaky = 0usize;
    let mut checked: std::collections::HashMap<usize, Result<u64, String>> = Default::default();
    plog.for_each_cut(subsets, 0x5eed, |cut, cands| {
        if cut < opened || !(cut - opened).is_multiple_of(stride) {
            return; // opening writes nothing that matters here; the sweep starts at the workload
        }
        // Requests up to the last flush that completed before the cut are durable; the ones
        // after it that had started may have happened, in part.
        let last_flush = spans
            .iter()
            .rposition(|&(_, e, r)| matches!(r, Req::Flush) && e <= cut);
        let mut shadow = Shadow::new(&sc.initial_tags);
        for (i, &(s, _, req)) in spans.iter().enumerate() {
            if last_flush.is_some_and(|f| i < f) {
                shadow.apply(i + 1, req, true);
            } else if s < cut {
                shadow.apply(i + 1, req, false);
            }
        }
        for c in cands {
            images += 1;
            let check = match c.key {
                Some(k) => checked
                    .entry(k)
                    .or_insert_with(|| sc.qemu_check(&c.image))
                    .clone(),
                None => sc.qemu_check(&c.image),
            };
            let r = check.and_then(|leaks| {
                let img = sc
                    .open(Box::new(MemStorage::new(c.image.clone())), true)
                    .map_err(|e| format!("open: {}", chain(&e)))?;
                shadow.verify(&img, full)?;
                Ok(leaks)
            });
            match r {
                Ok(0) => {}
                Ok(_) => leaky += 1,
                Err(e) => failures.push(format!(
                    "{} power loss at event {cut}/{end} during request {} ({}): {e}",
                    sc.name,
                    spans
                        .iter()
                        .position(|&(s, e, _)| s <= cut && cut < e)
                        .map_or("none".into(), |i| format!("{i} {:?}", WORKLOAD[i])),
                    c.what
                )),
            }
        }
    });
    eprintln!(
        "{}: power loss at {} cut points, {images} images ({leaky} with leaks), {} failed",
        sc.name,
        end + 1 - opened,
        failures.len()
    );
    failures
}

fn assert_power_loss(sc: &Scenario, subsets: usize, stride: usize, full: bool) {
    let failures = power_loss_sweep(sc, subsets, stride, full);
    assert!(
        failures.is_empty(),
        "{} power-loss images failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ------------------------------------------------------------------ tests

/// The workload does what the sweeps claim to cover: a snapshot, compressed clusters and a
/// backing file are there, the refcount table gains refcount blocks, and without faults the
/// result is clean and reads back.
#[test]
fn workload_covers_the_claimed_paths() {
    for (name, luks) in [("plain", false), ("luks", true)] {
        let sc = make_images(name, luks);
        let rc_blocks = |img: &[u8]| {
            let off = usize::try_from(u64::from_be_bytes(img[48..56].try_into().expect("8")))
                .expect("off");
            let n = u32::from_be_bytes(img[56..60].try_into().expect("4")) as usize * 1024 / 8;
            (0..n)
                .filter(|i| img[off + i * 8..off + i * 8 + 8] != [0; 8])
                .count()
        };
        let nb_snapshots = u32::from_be_bytes(sc.initial[60..64].try_into().expect("4"));
        assert_eq!(nb_snapshots, 1, "{name}: one internal snapshot");
        let mut args = vec!["check".to_string(), "--output=json".into()];
        args.extend(sc.qemu_args(&sc.path));
        let o = Command::new("qemu-img")
            .args(&args)
            .output()
            .expect("check");
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert!(
            json["compressed-clusters"].as_u64().unwrap_or(0) > 0,
            "{name}: compressed clusters"
        );
        let mem = Arc::new(MemStorage::new(sc.initial.clone()));
        let fs = FaultStorage::new(mem.clone(), Fault::Eio);
        let img = sc.open(Box::new(fs.clone()), false).expect("open");
        fs.arm(u64::MAX);
        assert!(img.inner().header().backing_file.is_some());
        let mut shadow = Shadow::new(&sc.initial_tags);
        let mut counts = Vec::new();
        for (i, &req) in WORKLOAD.iter().enumerate() {
            submit(&img, i + 1, req).expect("request");
            shadow.apply(i + 1, req, true);
            counts.push(fs.count());
        }
        eprintln!("{name}: storage operations after each request: {counts:?}");
        drop(img);
        let bytes = mem.contents();
        let (before, after) = (rc_blocks(&sc.initial), rc_blocks(&bytes));
        assert!(
            after > before,
            "{name}: refcount blocks {before} -> {after}: the workload must grow them"
        );
        assert_eq!(
            sc.qemu_check(&bytes),
            Ok(0),
            "{name}: clean after the workload"
        );
        let again = sc
            .open(Box::new(MemStorage::new(bytes)), true)
            .expect("open");
        shadow.verify(&again, true).expect("reads back");
    }
}

/// The wrappers themselves: the N-th operation fails once (a short write lands its first half)
/// over a real file, and a power loss keeps what was synced and may drop what was not.
#[test]
fn fault_and_power_loss_wrappers_do_what_they_claim() {
    use vhost_user_qcow2::storage::{FileStorage, OpenFlags};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    std::fs::write(&path, [0u8; 8192]).expect("file");
    let file = FileStorage::open(&path, OpenFlags::default()).expect("open");
    let fs = FaultStorage::new(Arc::new(file), Fault::ShortWrite);
    fs.arm(1);
    fs.write_at(&[1; 512], 0).expect("write 0 passes");
    assert!(
        fs.read_at(&mut [0; 512], 0).is_ok(),
        "reads are not counted"
    );
    assert!(fs.write_at(&[2; 4096], 4096).is_err(), "write 1 fails");
    assert!(fs.fired());
    fs.write_at(&[3; 512], 512).expect("write 2 passes");
    let got = std::fs::read(&path).expect("read");
    assert_eq!(&got[..512], &[1; 512][..]);
    assert_eq!(&got[512..1024], &[3; 512][..]);
    assert_eq!(
        &got[4096..6144],
        &[2; 2048][..],
        "the short write landed half"
    );
    assert_eq!(&got[6144..], &[0; 2048][..]);

    let pl = PowerLossStorage::new(vec![0; 2048]);
    pl.write_at(&[1; 512], 0).expect("write");
    pl.sync().expect("sync");
    pl.write_at(&[2; 1024], 512).expect("write");
    let log = PowerLossLog::new(vec![0; 2048], pl.log());
    let mut last = Vec::new();
    log.for_each_cut(2, 1, |cut, cands| {
        if cut == 0 {
            assert_eq!(cands.len(), 1);
            assert_eq!(cands[0].image, vec![0; 2048], "nothing synced yet");
        }
        last = cands;
    });
    assert_eq!(last.len(), 6, "dropped, kept, 2 subsets, 2 torn");
    assert_eq!(&last[0].image[..512], &[1; 512][..], "synced data survives");
    assert_eq!(&last[0].image[512..], &[0; 1536][..], "unsynced dropped");
    assert_eq!(&last[1].image[512..1536], &[2; 1024][..], "unsynced kept");
    for c in &last {
        assert_eq!(&c.image[..512], &[1; 512][..], "{}", c.what);
    }
}

// The CI versions below keep the debug-build run short on two busy cores: every operation index
// and every cut point on the plain image; on the LUKS image (where debug-build crypto makes each
// case several times slower) every 4th index / 6th cut. The ignored full sweep does everything.

/// EIO at every operation and a short write at every write, plain image.
#[test]
fn fault_at_every_operation_plain() {
    assert_sweeps(
        &make_images("plain", false),
        &[Fault::Eio, Fault::ShortWrite],
        1,
        false,
        false,
    );
}

/// EIO at every 4th operation, LUKS image.
#[test]
fn fault_at_every_4th_operation_luks() {
    assert_sweeps(&make_images("luks", true), &[Fault::Eio], 4, false, false);
}

/// Power loss at every cut point, plain image: all dropped, all kept, one random subset of
/// whole writes and one of torn 512-byte pieces.
#[test]
fn power_loss_at_every_cut_plain() {
    assert_power_loss(&make_images("plain", false), 1, 1, false);
}

/// Power loss at every 6th cut point, LUKS image.
#[test]
fn power_loss_at_every_6th_cut_luks() {
    assert_power_loss(&make_images("luks", true), 1, 6, false);
}

/// The full sweeps: every fault kind at every operation index on both images with whole-disk
/// read-back (through the open image too), and 8 random subsets of whole and of torn writes at
/// every power-loss cut point.
#[test]
#[ignore = "long (tens of minutes in a debug build): the full fault and power-loss sweeps"]
fn faults_and_power_loss_full_sweep() {
    for (name, luks) in [("plain", false), ("luks", true)] {
        let sc = make_images(name, luks);
        assert_sweeps(
            &sc,
            &[Fault::Eio, Fault::Enospc, Fault::ShortWrite],
            1,
            true,
            true,
        );
        assert_power_loss(&sc, 8, 1, true);
    }
}

// ------------------------------------------------------------------ SIGKILL at scale

/// Size of the soak image.
const SOAK_SIZE: u64 = 32 << 20;
const SOAK_SECTORS: u64 = SOAK_SIZE / 512;

/// A sector the soak writes: kill round, queue, request and sector, so a misplaced sector shows.
fn soak_tag(round: u64, queue: u64, seq: u64, sector: u64) -> u64 {
    0xC0 << 56
        | (round & 0xffff) << 40
        | queue << 39
        | (seq & 0x1f_ffff) << 18
        | (sector & 0x3_ffff)
}

/// A request of the soak client.
#[derive(Clone, Copy)]
enum SoakOp {
    /// Offset, length, request number (in the tags).
    Write(u64, u64, u64),
    /// Offset, length: frees clusters, so that later writes allocate again.
    Discard(u64, u64),
    Flush,
}

/// One request of the soak client, stamped with a global clock at submission and completion.
struct SoakReq {
    op: SoakOp,
    submitted: u64,
    completed: Option<u64>,
}

/// Drives one queue at depth 1 until `stop`, in its half of the disk: writes of 4–64 KiB at
/// random places (sector-tagged), a discard of 64–512 KiB every 16th request, a flush every 9th.
fn soak_queue(
    mut q: blkio::Blkioq,
    buf: usize,
    queue: u64,
    round: u64,
    clock: &std::sync::atomic::AtomicU64,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<SoakReq> {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::Ordering::SeqCst;
    let mut rng = rand::rngs::StdRng::seed_from_u64(round << 1 | queue);
    let half = SOAK_SECTORS / 2;
    let mut log = Vec::new();
    let mut seq = 0u64;
    while !stop.load(SeqCst) {
        seq += 1;
        let op = if seq.is_multiple_of(9) {
            SoakOp::Flush
        } else if seq.is_multiple_of(16) {
            let n = rng.random_range(16..=128u64) * 8;
            let start = queue * half + rng.random_range(0..(half - n) / 8) * 8;
            SoakOp::Discard(start * 512, n * 512)
        } else {
            let n = rng.random_range(8..=128u64);
            let start = queue * half + rng.random_range(0..half - n);
            SoakOp::Write(start * 512, n * 512, seq)
        };
        let submitted = clock.fetch_add(1, SeqCst);
        match op {
            SoakOp::Write(off, len, seq) => {
                let p = buf as *mut u8;
                // SAFETY: `buf` is this queue's own 64 KiB slice of the mapped region, idle
                // between requests (depth 1).
                let b = unsafe { std::slice::from_raw_parts_mut(p, 65536) };
                for (i, s) in b[..usize::try_from(len).expect("len")]
                    .chunks_exact_mut(512)
                    .enumerate()
                {
                    let t = soak_tag(round, queue, seq, off / 512 + i as u64);
                    for w in s.chunks_exact_mut(8) {
                        w.copy_from_slice(&t.to_le_bytes());
                    }
                }
                let len = usize::try_from(len).expect("len");
                q.write(off, p, len, 0, blkio::ReqFlags::empty());
            }
            SoakOp::Discard(off, len) => q.discard(off, len, 0, blkio::ReqFlags::empty()),
            SoakOp::Flush => q.flush(0, blkio::ReqFlags::empty()),
        }
        log.push(SoakReq {
            op,
            submitted,
            completed: None,
        });
        // Wait for the completion, giving up when the daemon is gone.
        let mut done = [std::mem::MaybeUninit::uninit()];
        loop {
            let mut t = std::time::Duration::from_millis(50);
            match q.do_io(&mut done, 1, Some(&mut t), None) {
                Ok(1) => break,
                _ if stop.load(SeqCst) => return log,
                // A timeout (ETIME): the daemon is slow (or about to be killed); wait on.
                _ => {}
            }
        }
        // SAFETY: do_io initialised the first completion.
        let c = unsafe { done[0].assume_init_read() };
        if c.ret != 0 {
            return log; // the daemon died under the request
        }
        if let Some(last) = log.last_mut() {
            last.completed = Some(clock.fetch_add(1, SeqCst));
        }
    }
    log
}

/// Figures of a soak run.
#[derive(Debug, Default)]
struct SoakFigures {
    kills: u64,
    corrupt_images: u64,
    rounds_with_leaks: u64,
    lost_flushed_sectors: u64,
    flushed_writes: u64,
    writes: u64,
}

/// Kills `serve` with SIGKILL `kills` times under a 2-queue write + flush workload from a
/// libblkio client; after each kill `qemu-img check` (no corruption; leaks are counted and
/// repaired with `qemu-img check -r leaks`) and QEMU's view of the image (every write completed
/// before a completed flush's submission reads back; later ones may or may not).
fn kill_soak(kills: u64) -> SoakFigures {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("soak.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            p(&img),
            "32M",
        ],
    );
    let view = dir.path().join("view.raw");
    let mut baseline = vec![0u64; usize::try_from(SOAK_SECTORS).expect("sectors")];
    let mut fig = SoakFigures::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x50a);
    let sock = dir.path().join("vhost.sock");
    for round in 0..kills {
        let _ = std::fs::remove_file(&sock);
        let mut child = common::spawn_serve(&sock, &img, &["--num-queues", "2"]);
        let t = std::time::Instant::now();
        let mut blkio = loop {
            let mut b = blkio::Blkio::new("virtio-blk-vhost-user").expect("blkio");
            b.set_str("path", p(&sock)).expect("path");
            if b.connect().is_ok() {
                break b;
            }
            assert!(
                t.elapsed().as_secs() < 20,
                "round {round}: daemon does not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        blkio.set_i32("num-queues", 2).expect("queues");
        let out = blkio.start().expect("start");
        let region = blkio.alloc_mem_region(2 << 16).expect("region");
        blkio.map_mem_region(&region).expect("map");
        let clock = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = out
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let (clock, stop) = (clock.clone(), stop.clone());
                let buf = region.addr + (i << 16);
                std::thread::spawn(move || soak_queue(q, buf, i as u64, round, &clock, &stop))
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(20..300)));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let logs: Vec<Vec<SoakReq>> = threads
            .into_iter()
            .map(|t| t.join().expect("queue thread"))
            .collect();
        drop(blkio);
        fig.kills += 1;

        // Durable: writes completed before the submission of the last completed flush.
        let durable_before = logs
            .iter()
            .flatten()
            .filter(|r| matches!(r.op, SoakOp::Flush))
            .filter_map(|r| r.completed.map(|_| r.submitted))
            .max();
        let mut allowed: Vec<Vec<u64>> = baseline.iter().map(|&t| vec![t]).collect();
        for (queue, log) in logs.iter().enumerate() {
            for r in log {
                let (off, len, seq) = match r.op {
                    SoakOp::Write(off, len, seq) => (off, len, Some(seq)),
                    // Advisory: old data or zeroes, flushed or not.
                    SoakOp::Discard(off, len) => (off, len, None),
                    SoakOp::Flush => continue,
                };
                let durable = matches!((r.completed, durable_before), (Some(c), Some(d)) if c < d);
                if seq.is_some() {
                    fig.writes += 1;
                    fig.flushed_writes += u64::from(durable);
                }
                for s in off / 512..(off + len) / 512 {
                    let a = &mut allowed[usize::try_from(s).expect("s")];
                    match seq {
                        Some(seq) => {
                            let t = soak_tag(round, queue as u64, seq, s);
                            if durable {
                                *a = vec![t];
                            } else {
                                a.push(t);
                            }
                        }
                        None => a.push(0),
                    }
                }
            }
        }
        let chk = Command::new("qemu-img")
            .args(["check", "--output=json", p(&img)])
            .output()
            .expect("check");
        match chk.status.code() {
            Some(0) => {}
            Some(3) => fig.rounds_with_leaks += 1,
            code => {
                fig.corrupt_images += 1;
                eprintln!(
                    "round {round}: qemu-img check exit {code:?}: {}",
                    String::from_utf8_lossy(&chk.stdout)
                );
            }
        }
        let _ = std::fs::remove_file(&view);
        run("qemu-img", &["convert", "-O", "raw", p(&img), p(&view)]);
        let got = std::fs::read(&view).expect("view");
        let mut lost = 0u64;
        for (s, sec) in got.chunks_exact(512).enumerate() {
            let t = decode(sec);
            if !t.is_some_and(|t| allowed[s].contains(&t)) {
                if lost == 0 {
                    eprintln!(
                        "round {round}: sector {s} holds {t:x?}, allowed {:x?}",
                        allowed[s]
                    );
                }
                lost += 1;
            }
            baseline[s] = t.unwrap_or(u64::MAX);
        }
        fig.lost_flushed_sectors += lost;
        if chk.status.code() == Some(3) {
            run("qemu-img", &["check", "-q", "-r", "leaks", p(&img)]);
        }
        if round % 50 == 49 {
            eprintln!("after {} kills: {fig:?}", round + 1);
        }
    }
    eprintln!("kill soak: {fig:?}");
    fig
}

fn assert_soak(kills: u64) {
    let fig = kill_soak(kills);
    assert_eq!(fig.kills, kills);
    assert!(
        fig.flushed_writes > 0,
        "no write was flushed before a kill: the soak proves nothing ({fig:?})"
    );
    assert_eq!(fig.corrupt_images, 0, "{fig:?}");
    assert_eq!(fig.lost_flushed_sectors, 0, "{fig:?}");
}

/// The short SIGKILL soak CI runs (10 kills).
#[test]
fn sigkill_under_two_queue_writes_and_flushes() {
    assert_soak(10);
}

/// The 1,000-kill soak (`scripts/kill-soak`; `VUQ_KILLS` overrides the count).
#[test]
#[ignore = "long: 1,000 kills (scripts/kill-soak)"]
fn sigkill_soak_1000() {
    let kills = std::env::var("VUQ_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    assert_soak(kills);
}
