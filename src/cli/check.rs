//! `vhost-user-qcow2 check`: refcount consistency, as `qemu-img check` (same counts, same
//! JSON field names, same exit codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use serde_json::{json, Value};

use super::tools::{OutputFormat, ToolError};
use crate::image::{self, Format};
use crate::qcow2::check::{check_with_progress, CheckResult, Repair};
use crate::storage::OpenFlags;

/// What `--repair` fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairArg {
    Leaks,
    All,
}

/// Arguments of `check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Repair leaks only, or all errors (rebuilding the refcounts if needed).
    #[arg(short = 'r', long, value_enum)]
    pub repair: Option<RepairArg>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Image format (detected when not given); only qcow2 images can be checked.
    #[arg(short = 'f', long)]
    pub format: Option<String>,
    /// The image file.
    pub file: PathBuf,
}

/// The JSON object `qemu-img check --output=json` prints.
pub fn to_json(r: &CheckResult, filename: &str) -> Value {
    let mut v = json!({
        "image-end-offset": r.image_end_offset,
        "total-clusters": r.total_clusters,
        "check-errors": r.check_errors,
        "filename": filename,
        "format": "qcow2",
    });
    // As qemu-img, counts that are zero are left out.
    for (k, n) in [
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
        ("leaks", r.leaks),
        ("corruptions", r.corruptions),
        ("leaks-fixed", r.leaks_fixed),
        ("corruptions-fixed", r.corruptions_fixed),
    ] {
        if n > 0 {
            v[k] = json!(n);
        }
    }
    v
}

/// Exit code as qemu-img check.
pub fn exit_code(r: &CheckResult) -> i32 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// Runs `check`; returns the exit code.
pub fn run(args: &CheckArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    // A repair writes: it takes QEMU's write lock (refused while a VM or daemon uses the image);
    // a plain check reads without locking, as `qemu-img check -U`. An `rbd:` image takes RBD's
    // exclusive lock instead when repairing (src/rbd).
    let read_only = args.repair.is_none();
    let locking = if read_only {
        image::Locking::Off
    } else {
        image::Locking::On
    };
    let (st, _lock): (Box<dyn crate::storage::Storage>, _) =
        if args.file.to_str().is_some_and(crate::rbd::is_rbd) {
            let flags = OpenFlags {
                read_only,
                direct: false,
            };
            (crate::rbd::open_storage(&args.file, flags)?, None)
        } else {
            let (st, lock) = image::open_file_locked(&args.file, read_only, locking)?;
            (Box::new(st), lock)
        };
    let format = match args.format.as_deref() {
        None => image::detect_format(&*st)?,
        Some(f) => Format::from_name(f)
            .ok_or(ToolError::BadArgument("format must be raw, qcow2 or luks"))?,
    };
    if format == Format::Qcow2 && !crate::qcow2::is_qcow2(&*st)? {
        return Err(crate::qcow2::Error::BadMagic.into());
    }
    if format != Format::Qcow2 {
        writeln!(out, "This image format does not support checks")?;
        return Ok(63);
    }
    let repair = args.repair.map(|r| match r {
        RepairArg::Leaks => Repair::Leaks,
        RepairArg::All => Repair::All,
    });
    // A progress line on a terminal (as qemu-img -p), nothing in pipes and logs.
    let tty = args.output == OutputFormat::Human && std::io::stderr().is_terminal();
    let show = |done: u64, total: u64| {
        if total > 0 && done.is_multiple_of(16) {
            eprint!("\r    ({:.2}/100%)", done as f64 * 100.0 / total as f64);
        }
    };
    let r = check_with_progress(&*st, repair, tty.then_some(&show as &dyn Fn(u64, u64)))?;
    if tty {
        eprint!("\r    (100.00/100%)\n");
    }
    let name = args.file.display().to_string();
    if args.output == OutputFormat::Json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&to_json(&r, &name))?
        )?;
        return Ok(exit_code(&r));
    }
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        writeln!(
            out,
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            r.leaks_fixed, r.corruptions_fixed
        )?;
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        writeln!(out, "No errors were found on the image.")?;
    } else {
        if r.corruptions > 0 {
            writeln!(
                out,
                "{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            )?;
        }
        if r.leaks > 0 {
            writeln!(
                out,
                "{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            )?;
        }
    }
    if r.total_clusters > 0 {
        let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
        writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            pct(r.fragmented_clusters),
            pct(r.compressed_clusters)
        )?;
    }
    writeln!(out, "Image end offset: {}", r.image_end_offset)?;
    Ok(exit_code(&r))
}
