//! `vhost-user-qcow2 convert SRC DST`: copy any readable image into a new raw or qcow2 image, as
//! `qemu-img convert` does.
//!
//! - Sparse: ranges the source maps as zero are not read, and 4 KiB blocks of zeroes in the data
//!   read are not written (qemu-img's default `-S 4k`), so the target allocates only data.
//! - Encryption: the source is unlocked with `--key-secret-file`/`--key-fd` (or a prompt); the target
//!   is encrypted with `-o encrypt.format=luks,encrypt.key-secret=ID --object secret,id=ID,file=F`
//!   (or `-O luks` for a raw LUKS file), so an image can be encrypted, decrypted or re-keyed.
//! - `-c`: compressed qcow2 output (deflate, or zstd with `-o compression_type=zstd`), written by
//!   [`crate::qcow2::stream`] as one sequential pass; encryption and compression together are
//!   refused, as qemu-img refuses them.
//! - `-p`: a progress line on a terminal. The source is opened read-only, so an interrupted
//!   convert never changes it; the partial target is left for the user to remove (as qemu-img).

use std::io::{IoSlice, IoSliceMut, IsTerminal, Write};
use std::path::PathBuf;

use super::create::{CreateArgs, CreateFormat};
use super::keyslot::KeyArgs;
use super::tools::ToolError;
use crate::crypto::secret::Passphrase;
use crate::image::{self, BlockImage, Format, OpenOptions};

/// Arguments of `convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// Source format (detected when not given).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Target format: raw, qcow2 (default raw, as qemu-img) or luks (a raw LUKS file).
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Compress the data clusters (qcow2 target only).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Show progress on a terminal.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Share the source with writers (no lock), as qemu-img's -U.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Target format options, as `create -o`.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Secret objects for the target's key, `secret,id=ID,file=FILE`.
    #[arg(long = "object", value_name = "OBJECT")]
    pub objects: Vec<String>,
    /// The source's passphrase, if it is encrypted.
    #[command(flatten)]
    pub key: KeyArgs,
    pub source: PathBuf,
    pub target: PathBuf,
}

/// Blocks of zeroes this large are left unwritten (qemu-img's `-S 4k`).
const SPARSE: usize = 4096;
/// Bytes read per step.
const CHUNK: u64 = 2 << 20;

fn open_source(
    args: &ConvertArgs,
) -> Result<(Box<dyn BlockImage>, crate::lock::LockSet), ToolError> {
    let format = args
        .format
        .as_deref()
        .map(|f| Format::from_name(f).ok_or(ToolError::BadArgument("unknown source format")))
        .transpose()?;
    let opts = OpenOptions {
        read_only: true,
        format,
        locking: super::tools::read_locking(args.force_share),
        ..Default::default()
    };
    super::tools::open_image(&args.source, &opts, &args.key, &mut None)
}

/// The `create` arguments for the target.
fn target_args(args: &ConvertArgs, size: u64) -> Result<CreateArgs, ToolError> {
    let format = match args.output_format.as_str() {
        "raw" => CreateFormat::Raw,
        "qcow2" => CreateFormat::Qcow2,
        "luks" => CreateFormat::Luks,
        _ => {
            return Err(ToolError::BadArgument(
                "target format must be raw, qcow2 or luks",
            ))
        }
    };
    let mut c = CreateArgs::new(format, args.target.clone(), Some(size.to_string()));
    c.options.clone_from(&args.options);
    c.objects.clone_from(&args.objects);
    let c = super::create_opts::apply(&c)?;
    if c.backing.is_some() {
        return Err(ToolError::BadArgument(
            "convert writes a standalone image: no backing_file (use rebase afterwards)",
        ));
    }
    if c.encrypt.encrypt.is_some() && c.encrypt.key.key_secret_file.is_none() {
        return Err(ToolError::BadArgument(
            "an encrypted target needs its passphrase in a file: --object secret,id=ID,file=F with -o encrypt.key-secret=ID",
        ));
    }
    Ok(c)
}

/// Progress on a terminal, as qemu-img -p prints it.
struct Progress {
    on: bool,
    total: u64,
    last: u64,
}

impl Progress {
    fn new(on: bool, total: u64) -> Self {
        let on = on && std::io::stderr().is_terminal();
        let p = Self {
            on,
            total,
            last: u64::MAX,
        };
        p.show(0);
        p
    }
    fn show(&self, done: u64) {
        if self.on {
            let pct = if self.total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / self.total as f64
            };
            eprint!("\r    ({pct:.2}/100%)");
        }
    }
    fn update(&mut self, done: u64) {
        let step = (done * 10_000).checked_div(self.total).unwrap_or(0);
        if step != self.last {
            self.last = step;
            self.show(done);
        }
    }
    fn finish(&self) {
        if self.on {
            eprintln!("\r    (100.00/100%)");
        }
    }
}

/// Runs `convert`.
pub fn run(args: &ConvertArgs, _out: &mut dyn Write) -> Result<i32, ToolError> {
    let (src, _source_locks) = open_source(args)?;
    let size = src.capacity();
    let create = target_args(args, size)?;
    if args.compress {
        if create.format != CreateFormat::Qcow2 {
            return Err(ToolError::BadArgument(
                "compression needs a qcow2 target (-O qcow2)",
            ));
        }
        if create.encrypt.encrypt.is_some() {
            return Err(ToolError::BadArgument(
                "compression and encryption together are not supported (as in qemu-img)",
            ));
        }
    }
    if args.target.exists() {
        return Err(ToolError::BadArgument(
            "the target file exists: refusing to overwrite it",
        ));
    }
    let map = super::map::map_entries(
        &args.source,
        args.format.as_deref().and_then(Format::from_name),
        0,
        None,
    )?;
    let mut progress = Progress::new(args.progress, size);
    if args.compress {
        let cs = super::tools::parse_size(&create.cluster_size)?;
        let mut w = crate::qcow2::stream::CompressedWriter::new(
            &args.target,
            size,
            cs,
            create.compression_type,
        )?;
        let mut buf =
            vec![0u8; usize::try_from(cs).map_err(|_| ToolError::BadArgument("cluster size"))?];
        let mut off = 0u64;
        while off < size {
            let n = usize::try_from(cs.min(size - off)).unwrap_or(buf.len());
            let zero = map_zero(&map, off, n as u64);
            if !zero {
                buf[..n].fill(0);
                src.read(off, &mut [IoSliceMut::new(&mut buf[..n])])?;
                if buf[..n].iter().any(|&b| b != 0) {
                    w.write_cluster(off / cs, &buf[..n])?;
                }
            }
            off += n as u64;
            progress.update(off);
        }
        w.finish()?;
        progress.finish();
        return Ok(0);
    }
    super::create::run(&create, &mut std::io::sink())?;
    let secret = match &create.encrypt.key.key_secret_file {
        Some(f) if create.encrypt.encrypt.is_some() => Some(
            Passphrase::from_file(f)
                .map_err(|_| ToolError::BadArgument("cannot read the target passphrase"))?,
        ),
        _ => None,
    };
    let dst = image::open_with_secret(
        &args.target,
        &OpenOptions {
            read_only: false,
            format: Some(match create.format {
                CreateFormat::Qcow2 => Format::Qcow2,
                CreateFormat::Raw | CreateFormat::Luks if secret.is_some() => Format::Luks,
                CreateFormat::Raw | CreateFormat::Luks => Format::Raw,
            }),
            ..Default::default()
        },
        secret.as_ref(),
    )?;
    // A new raw LUKS file does not read as zeroes (its payload is unwritten ciphertext): every
    // byte is written there, as qemu-img does. qcow2 and plain raw targets start out zero.
    let zero_init = !(create.format != CreateFormat::Qcow2 && secret.is_some());
    let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(2 << 20)];
    for e in &map {
        let end = e.start + e.length;
        let mut off = e.start;
        while off < end {
            let n = (end - off).min(CHUNK);
            let nu = usize::try_from(n).unwrap_or(buf.len());
            if !zero_init {
                if e.zero {
                    buf[..nu].fill(0);
                } else {
                    src.read(off, &mut [IoSliceMut::new(&mut buf[..nu])])?;
                }
                dst.write(off, &[IoSlice::new(&buf[..nu])])?;
            } else if !e.zero {
                src.read(off, &mut [IoSliceMut::new(&mut buf[..nu])])?;
                write_nonzero(dst.as_ref(), off, &buf[..nu])?;
            }
            off += n;
            progress.update(off);
        }
    }
    dst.flush()?;
    progress.finish();
    Ok(0)
}

/// Whether the map says `off..off+len` reads as zero throughout.
fn map_zero(map: &[super::map::MapEntry], off: u64, len: u64) -> bool {
    let end = off + len;
    let i = super::map::entry_index(map, off);
    map[i..]
        .iter()
        .take_while(|e| e.start < end)
        .all(|e| e.zero)
}

/// Writes the parts of `data` (at `off`) that are not whole 4 KiB blocks of zeroes.
fn write_nonzero(dst: &dyn BlockImage, off: u64, data: &[u8]) -> Result<(), ToolError> {
    let mut i = 0usize;
    while i < data.len() {
        let blk = SPARSE.min(data.len() - i);
        if data[i..i + blk].iter().all(|&b| b == 0) {
            i += blk;
            continue;
        }
        // Extend over following non-zero blocks and write them at once.
        let mut j = i + blk;
        while j < data.len() {
            let b = SPARSE.min(data.len() - j);
            if data[j..j + b].iter().all(|&x| x == 0) {
                break;
            }
            j += b;
        }
        dst.write(off + i as u64, &[IoSlice::new(&data[i..j])])?;
        i = j;
    }
    Ok(())
}
