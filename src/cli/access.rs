//! Options that decide which files an image may open and how they are locked: `--data-file`
//! (the operator's consent to a qcow2 external data file) and `-U`/`--force-share` (qemu-img's
//! escape from image locking, for read-only use).

use std::path::PathBuf;

use clap::Args;

use crate::image::Locking;

/// `-U`/`--force-share`, as qemu-img has it.
#[derive(Debug, Clone, Args)]
pub struct ShareArgs {
    /// Open read-only without refusing other users' writes (qemu-img's -U): the image may change
    /// under us, so what is read may be inconsistent.
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

impl ShareArgs {
    /// The locking mode: QEMU's locks, or force-share.
    pub fn locking(&self) -> Locking {
        if self.force_share {
            Locking::ForceShare
        } else {
            Locking::On
        }
    }
}

/// What `serve` may open besides the image.
#[derive(Debug, Clone, Args)]
pub struct AccessArgs {
    /// The external data file of a qcow2 image (QEMU's data-file option). An image that names a
    /// data file in its header is refused without it: the name could be any host file.
    #[arg(long, value_name = "PATH")]
    pub data_file: Option<PathBuf>,
    #[command(flatten)]
    pub share: ShareArgs,
}
