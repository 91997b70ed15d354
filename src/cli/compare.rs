//! `vhost-user-qcow2 compare A B`: whether two images show the guest the same content, with
//! qemu-img compare's messages and exit codes (0 identical, 1 different, 2 error).
//!
//! As qemu-img (qemu-img.c `img_compare`): the guest content is compared in 512-byte sectors and
//! the first differing sector is reported; ranges that read as zero in both images are skipped
//! without reading; when the sizes differ, the extra part of the larger image must read as zero
//! ("Warning: Image size mismatch!"), and `-s` (strict) refuses any size difference and any
//! allocation difference. Strict mode compares the allocation status of `map` (present, zero,
//! data) range by range; qemu-img also compares block-status bits that `map` does not show (such
//! as whether a run reaches the end of the image), so it can report a mismatch at an earlier
//! offset than we do.

use std::io::{IoSliceMut, Write};
use std::path::{Path, PathBuf};

use super::keyslot::KeyArgs;
use super::map;
use super::tools::ToolError;
use crate::crypto::secret::Passphrase;
use crate::image::{BlockImage, Format, OpenOptions};

/// Arguments of `compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Format of the first image (detected when not given).
    #[arg(short = 'f', value_name = "FMT")]
    pub format1: Option<String>,
    /// Format of the second image (detected when not given).
    #[arg(short = 'F', value_name = "FMT")]
    pub format2: Option<String>,
    /// Strict mode: a size or allocation difference is a mismatch too.
    #[arg(short = 's', long)]
    pub strict: bool,
    /// Quiet: no messages, only the exit code.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Share the images with writers (no lock), as qemu-img's -U.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Passphrase for encrypted images (both images, if both are encrypted).
    #[command(flatten)]
    pub key: KeyArgs,
    pub file1: PathBuf,
    pub file2: PathBuf,
}

const SECTOR: usize = 512;
const CHUNK: u64 = 1 << 20;

/// What the comparison found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Identical {
        size_mismatch: bool,
    },
    /// Content differs from this (512-byte aligned) offset.
    Mismatch {
        offset: u64,
        size_mismatch: bool,
    },
    StrictSize,
    StrictStatus {
        offset: u64,
    },
}

fn format_of(f: Option<&str>) -> Result<Option<Format>, ToolError> {
    f.map(|f| {
        Format::from_name(f).ok_or(ToolError::BadArgument(
            "unknown format (raw, qcow2 or luks)",
        ))
    })
    .transpose()
}

fn open(
    path: &Path,
    format: Option<Format>,
    args: &CompareArgs,
    secret: &mut Option<Passphrase>,
) -> Result<(Box<dyn BlockImage>, crate::lock::LockSet), ToolError> {
    let opts = OpenOptions {
        read_only: true,
        format,
        locking: super::tools::read_locking(args.force_share),
        ..Default::default()
    };
    super::tools::open_image(path, &opts, &args.key, secret)
}

/// Index of the first 512-byte sector in which `a` and `b` differ.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR)
}

fn first_nonzero(a: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .position(|x| x.iter().any(|&b| b != 0))
        .map(|i| i * SECTOR)
}

fn read(img: &dyn BlockImage, off: u64, buf: &mut [u8]) -> Result<(), ToolError> {
    img.read(off, &mut [IoSliceMut::new(buf)])?;
    Ok(())
}

/// Compares the two images.
pub fn compare(args: &CompareArgs) -> Result<Outcome, ToolError> {
    let f1 = format_of(args.format1.as_deref())?;
    let f2 = format_of(args.format2.as_deref())?;
    let mut secret = None;
    let (a, _locks1) = open(&args.file1, f1, args, &mut secret)?;
    let (b, _locks2) = open(&args.file2, f2, args, &mut secret)?;
    let (s1, s2) = (a.capacity(), b.capacity());
    let size_mismatch = s1 != s2;
    if size_mismatch && args.strict {
        return Ok(Outcome::StrictSize);
    }
    let m1 = map::map_entries(&args.file1, f1, 0, None)?;
    let m2 = map::map_entries(&args.file2, f2, 0, None)?;
    let common = s1.min(s2);
    let mut buf1 = vec![0u8; usize::try_from(CHUNK).unwrap_or(1 << 20)];
    let mut buf2 = buf1.clone();
    let mut off = 0u64;
    while off < common {
        let (Some(e1), Some(e2)) = (map::entry_at(&m1, off), map::entry_at(&m2, off)) else {
            break;
        };
        let end = (e1.start + e1.length).min(e2.start + e2.length).min(common);
        let len = (end - off).min(CHUNK);
        if args.strict && (e1.present, e1.zero, e1.data) != (e2.present, e2.zero, e2.data) {
            return Ok(Outcome::StrictStatus { offset: off });
        }
        if !(e1.zero && e2.zero) {
            let n = usize::try_from(len).unwrap_or(buf1.len());
            read(a.as_ref(), off, &mut buf1[..n])?;
            read(b.as_ref(), off, &mut buf2[..n])?;
            if let Some(i) = first_diff(&buf1[..n], &buf2[..n]) {
                return Ok(Outcome::Mismatch {
                    offset: off + i as u64,
                    size_mismatch,
                });
            }
        }
        off += len;
    }
    // The rest of the larger image must read as zero.
    let (over, over_map, total) = if s1 > s2 {
        (a.as_ref(), &m1, s1)
    } else {
        (b.as_ref(), &m2, s2)
    };
    while off < total {
        let Some(e) = map::entry_at(over_map, off) else {
            break;
        };
        let len = (e.start + e.length)
            .min(total)
            .saturating_sub(off)
            .min(CHUNK);
        if !e.zero {
            let n = usize::try_from(len).unwrap_or(buf1.len());
            read(over, off, &mut buf1[..n])?;
            if let Some(i) = first_nonzero(&buf1[..n]) {
                return Ok(Outcome::Mismatch {
                    offset: off + i as u64,
                    size_mismatch,
                });
            }
        }
        off += len.max(1);
    }
    Ok(Outcome::Identical { size_mismatch })
}

/// Runs `compare`: 0 identical, 1 different, 2 error (the error is printed here, as qemu-img
/// prints it, instead of making the process exit 1).
pub fn run(args: &CompareArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let outcome = match compare(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vhost-user-qcow2: {}", super::error_chain(&e));
            return Ok(2);
        }
    };
    let mut say = |s: String| -> Result<(), ToolError> {
        if !args.quiet {
            writeln!(out, "{s}")?;
        }
        Ok(())
    };
    Ok(match outcome {
        Outcome::Identical { size_mismatch } => {
            if size_mismatch {
                say("Warning: Image size mismatch!".into())?;
            }
            say("Images are identical.".into())?;
            0
        }
        Outcome::Mismatch {
            offset,
            size_mismatch,
        } => {
            if size_mismatch {
                say("Warning: Image size mismatch!".into())?;
            }
            say(format!("Content mismatch at offset {offset}!"))?;
            1
        }
        Outcome::StrictSize => {
            say("Strict mode: Image size mismatch!".into())?;
            1
        }
        Outcome::StrictStatus { offset } => {
            say(format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ))?;
            1
        }
    })
}
