//! `vhost-user-qcow2 rebase [-u] -b NEW [-F FMT] FILE`: change a qcow2 image's backing file, as
//! `qemu-img rebase`.
//!
//! Safe mode (default): wherever the image does not allocate a cluster itself, the content the
//! old backing chain gives it is compared with what the new backing file (or, with `-b ""`,
//! zeroes) would give; clusters that differ are written into the image first, with the old
//! content, so the guest sees the same disk afterwards. Then the header names the new backing
//! file. A crash in between leaves the old backing file named and some clusters copied up:
//! the same disk. Unsafe mode (`-u`) only rewrites the header, for a backing file that was
//! moved or renamed.

use std::io::{IoSlice, IoSliceMut, Write};
use std::path::PathBuf;

use super::keyslot::KeyArgs;
use super::tools::ToolError;
use crate::image::{self, BlockImage, Format, Locking, OpenOptions};
use crate::qcow2::header::{build_header_cluster, Header, EXT_BACKING_FORMAT};
use crate::storage::{FileStorage, OpenFlags, Storage};

/// Arguments of `rebase`.
#[derive(Debug, Clone, clap::Args)]
pub struct RebaseArgs {
    /// Unsafe: only change the name in the header.
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// The new backing file (relative names resolve against the image's folder); "" for none.
    #[arg(short = 'b', value_name = "NEW")]
    pub backing: String,
    /// Format of the new backing file (stored in the header).
    #[arg(short = 'F', value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Show progress on a terminal.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Passphrase of an encrypted image.
    #[command(flatten)]
    pub key: KeyArgs,
    /// The qcow2 image.
    pub file: PathBuf,
}

fn open_with_key(
    path: &std::path::Path,
    opts: &OpenOptions,
    key: &KeyArgs,
) -> Result<(Box<dyn BlockImage>, crate::lock::LockSet), ToolError> {
    super::tools::open_image(path, opts, key, &mut None)
}

/// Rewrites the header cluster with `backing` (and its format) named instead of the old one.
fn write_header(
    path: &std::path::Path,
    backing: Option<&str>,
    fmt: Option<&str>,
) -> Result<(), ToolError> {
    let st = FileStorage::open(
        path,
        OpenFlags {
            read_only: false,
            direct: false,
        },
    )?;
    let mut h = Header::read(&st)?;
    if h.version == 3 && h.header_length > 112 {
        return Err(ToolError::BadArgument(
            "the header has fields this tool does not know: refusing to rewrite it",
        ));
    }
    let exts: Vec<(u32, Vec<u8>)> = h
        .extensions
        .iter()
        .filter(|e| e.kind != EXT_BACKING_FORMAT)
        .map(|e| (e.kind, e.data.clone()))
        .chain(
            backing
                .and(fmt)
                .map(|f| (EXT_BACKING_FORMAT, f.as_bytes().to_vec())),
        )
        .collect();
    h.backing_file = backing.map(str::to_string);
    let hc = build_header_cluster(&h, &exts)?;
    // Only the bytes up to the end of the backing name matter; write the whole first cluster
    // in one write so the header never names half a file.
    st.write_at(&hc, 0)?;
    st.sync()?;
    Ok(())
}

/// Runs `rebase`.
pub fn run(args: &RebaseArgs, _out: &mut dyn Write) -> Result<i32, ToolError> {
    {
        let st = super::tools::open_read_only(&args.file)?;
        if image::detect_format(&st)? != Format::Qcow2 {
            return Err(ToolError::BadArgument("rebase needs a qcow2 image"));
        }
    }
    let new = (!args.backing.is_empty()).then_some(args.backing.as_str());
    let new_fmt = args
        .backing_format
        .as_deref()
        .map(|f| Format::from_name(f).ok_or(ToolError::BadArgument("unknown backing format")))
        .transpose()?;
    match (new, &args.backing_format) {
        (None, Some(_)) => return Err(ToolError::BadArgument("-F needs a backing file (-b)")),
        // As qemu-img 10: the format is never probed into the header.
        (Some(_), None) => {
            return Err(ToolError::BadArgument(
                "backing format must be specified (-F)",
            ))
        }
        _ => {}
    }
    // The image is written: QEMU's write lock on it (and read locks on its chains) until the
    // header names the new backing file.
    let (_write_lock, _locks);
    if args.unsafe_mode {
        _write_lock = image::open_file_locked(&args.file, false, Locking::On)?.1;
        _locks = None;
    } else {
        _write_lock = None;
        let (top, top_locks) = open_with_key(
            &args.file,
            &OpenOptions {
                read_only: false,
                format: Some(Format::Qcow2),
                locking: Locking::On,
                ..Default::default()
            },
            &args.key,
        )?;
        let newb = match new {
            Some(n) => Some(open_with_key(
                &image::resolve_backing(&args.file, n),
                &OpenOptions {
                    read_only: true,
                    format: new_fmt,
                    locking: Locking::On,
                    ..Default::default()
                },
                &args.key,
            )?),
            None => None,
        };
        copy_differences(args, top.as_ref(), newb.as_ref().map(|(b, _)| b.as_ref()))?;
        _locks = Some(top_locks);
    }
    write_header(&args.file, new, args.backing_format.as_deref())?;
    Ok(0)
}

/// Copies into `top` the clusters it does not allocate whose content differs between its old
/// backing chain and `new`.
fn copy_differences(
    args: &RebaseArgs,
    top: &dyn BlockImage,
    new: Option<&dyn BlockImage>,
) -> Result<(), ToolError> {
    let size = top.capacity();
    let map = super::map::map_entries(&args.file, Some(Format::Qcow2), 0, None)?;
    let st = super::tools::open_read_only(&args.file)?;
    let cs = Header::read(&st)?.cluster_size();
    drop(st);
    let step = cs.max(64 << 10);
    let n = usize::try_from(step).map_err(|_| ToolError::BadArgument("cluster size"))?;
    let (mut old_buf, mut new_buf) = (vec![0u8; n], vec![0u8; n]);
    let show = args.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    for e in map.iter().filter(|e| e.depth > 0 || !e.present) {
        let end = e.start + e.length;
        let mut off = e.start;
        while off < end {
            let len = (end - off).min(step - off % step);
            let l = usize::try_from(len).unwrap_or(n);
            top.read(off, &mut [IoSliceMut::new(&mut old_buf[..l])])?;
            new_buf[..l].fill(0);
            if let Some(nb) = new {
                let cap = nb.capacity();
                if off < cap {
                    let m = usize::try_from((cap - off).min(len)).unwrap_or(l);
                    nb.read(off, &mut [IoSliceMut::new(&mut new_buf[..m])])?;
                }
            }
            if old_buf[..l] != new_buf[..l] {
                top.write(off, &[IoSlice::new(&old_buf[..l])])?;
            }
            off += len;
            if show {
                eprint!(
                    "\r    ({:.2}/100%)",
                    off as f64 * 100.0 / size.max(1) as f64
                );
            }
        }
    }
    if show {
        eprintln!("\r    (100.00/100%)");
    }
    top.flush()?;
    Ok(())
}
