//! `resize [--shrink] FILE [+|-]SIZE`: change an image's size offline, as `qemu-img resize`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::tools::{parse_size, ToolError};
use crate::image::{self, ImageError, OpenOptions};
use crate::qcow2;

/// `resize` arguments.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long)]
    pub shrink: bool,
    /// Image format (probed if absent).
    #[arg(short = 'f', long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// The image.
    pub image: PathBuf,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one (K, M, G, T suffixes).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
    #[command(flatten)]
    pub key: super::keyslot::KeyArgs,
}

/// Resizes; prints "Image resized." as qemu-img does.
pub fn run(args: &ResizeArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let format = match args.format.as_deref() {
        None => None,
        Some(f) => {
            Some(image::Format::from_name(f).ok_or(ToolError::InvalidParameter(f.to_owned()))?)
        }
    };
    let opts = OpenOptions {
        read_only: false,
        direct: false,
        format,
        backing: image::BackingPolicy::Deny,
        data_file: None,
        // As qemu-img resize: refuse an image someone else writes (a running daemon or QEMU).
        locking: image::Locking::On,
    };
    let given = args.key.key_secret_file.is_some() || args.key.key_fd.is_some();
    let secret = if given {
        Some(
            args.key
                .source()
                .read("Passphrase: ", false)
                .map_err(|_| ToolError::BadArgument("cannot read the passphrase"))?,
        )
    } else {
        None
    };
    let probe = crate::storage::FileStorage::open(
        &args.image,
        crate::storage::OpenFlags {
            read_only: false,
            direct: false,
        },
    )?;
    let detected = match format {
        Some(f) => f,
        None => image::detect_format(&probe)?,
    };
    if detected == image::Format::Qcow2 {
        // As qemu-img resize: hold the write lock while changing the header.
        let lock_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&args.image)?;
        let _lock =
            crate::lock::ImageLock::acquire(&lock_file, &args.image, crate::lock::Perms::WRITE)
                .map_err(std::io::Error::other)?;
        // Header-only growth: no key needed, even for an encrypted image.
        let current = qcow2::header::Header::read(&probe)?.size;
        let new = new_size(&args.size, current)?;
        if new < current {
            return Err(ToolError::BadArgument(
                "shrinking a qcow2 image is not supported yet",
            ));
        }
        qcow2::resize::grow(&probe, new)?;
        writeln!(out, "Image resized.")?;
        return Ok(0);
    }
    drop(probe);
    let img = image::open_with_secret(&args.image, &opts, secret.as_ref())?;
    let current = img.capacity();
    let new = new_size(&args.size, current)?;
    if new < current && !args.shrink {
        return Err(ToolError::BadArgument(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    if new == 0 {
        return Err(ToolError::BadSize(args.size.clone()));
    }
    img.resize(new).map_err(|e| match e {
        ImageError::Unsupported => {
            ToolError::BadArgument("this image format cannot be resized yet")
        }
        e => ToolError::Image(e),
    })?;
    img.flush()?;
    writeln!(out, "Image resized.")?;
    Ok(0)
}

/// `SIZE`, `+SIZE` or `-SIZE` against `current`, rounded up to whole sectors as qemu-img does.
fn new_size(arg: &str, current: u64) -> Result<u64, ToolError> {
    let bad = || ToolError::BadSize(arg.to_owned());
    let s = arg.trim();
    let new = if let Some(d) = s.strip_prefix('+') {
        current.checked_add(parse_size(d)?)
    } else if let Some(d) = s.strip_prefix('-') {
        current.checked_sub(parse_size(d)?)
    } else {
        Some(parse_size(s)?)
    }
    .ok_or_else(bad)?;
    new.checked_add(511).map(|n| n & !511).ok_or_else(bad)
}
