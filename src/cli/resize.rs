//! `resize [--shrink] FILE [+|-]SIZE`: change an image's size offline, as `qemu-img resize`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::tools::{parse_size, ToolError};
use crate::image::{self, ImageError, OpenOptions};

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
    let img = image::open_with_secret(&args.image, &opts, secret.as_ref())?;
    let current = img.capacity();
    let s = args.size.trim();
    let new = if let Some(d) = s.strip_prefix('+') {
        current.checked_add(parse_size(d)?)
    } else if let Some(d) = s.strip_prefix('-') {
        current.checked_sub(parse_size(d)?)
    } else {
        Some(parse_size(s)?)
    }
    .ok_or_else(|| ToolError::BadSize(args.size.clone()))?;
    // qemu-img rounds the size up to whole sectors.
    let new = new
        .checked_add(511)
        .map(|n| n & !511)
        .ok_or_else(|| ToolError::BadSize(args.size.clone()))?;
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
            ToolError::BadArgument("this image format cannot be resized yet (raw only)")
        }
        e => ToolError::Image(e),
    })?;
    img.flush()?;
    writeln!(out, "Image resized.")?;
    Ok(0)
}
