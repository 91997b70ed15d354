//! `vhost-user-qcow2 create`: a new qcow2 or raw image, as `qemu-img create`.

use std::io::Write;
use std::path::PathBuf;

use super::tools::{parse_size, ToolError};
use crate::image::{self, Format, OpenOptions};
use crate::qcow2::create::{create_on, CreateOptions, Preallocation};

/// Image format to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CreateFormat {
    #[default]
    Qcow2,
    Raw,
    /// A raw LUKS file (qemu-img's `luks` format): `-f raw --encrypt luks`.
    Luks,
}

/// Preallocation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PreallocArg {
    #[default]
    Off,
    Metadata,
    Full,
}

/// Arguments of `create`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_enum, default_value_t)]
    pub format: CreateFormat,
    /// Cluster size (qcow2), 512 to 2M.
    #[arg(long, default_value = "64k")]
    pub cluster_size: String,
    /// Backing file (qcow2), stored as given; relative names resolve against the image's folder.
    #[arg(short = 'b', long)]
    pub backing: Option<String>,
    /// Format of the backing file (raw or qcow2); probed when not given.
    #[arg(short = 'F', long)]
    pub backing_format: Option<String>,
    /// Preallocation.
    #[arg(long, value_enum, default_value_t)]
    pub preallocation: PreallocArg,
    /// qcow2 version: 1.1 (v3, default) or 0.10 (v2).
    #[arg(long, default_value = "1.1")]
    pub compat: String,
    /// Refcount width in bits (1, 2, 4, 8, 16, 32, 64).
    #[arg(long, default_value_t = 16)]
    pub refcount_bits: u32,
    /// Encryption: `--encrypt luks [--cipher ..] [--hash ..] [--iter-time MS]`, the passphrase
    /// from `--key-secret-file F`, `--key-fd N` or the terminal. With `-f raw` this makes a raw
    /// LUKS file (qemu-img's `luks` format); with qcow2, crypt_method 2.
    #[command(flatten)]
    pub encrypt: super::encrypt::EncryptArgs,
    /// Format options as qemu-img spells them (`-o cluster_size=64k,lazy_refcounts=on,…`);
    /// they override the long options.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// A secret object, `secret,id=ID,file=FILE`, named by `-o encrypt.key-secret=ID`.
    #[arg(long = "object", value_name = "OBJECT")]
    pub objects: Vec<String>,
    /// qcow2 lazy refcounts (`-o lazy_refcounts=on`).
    #[arg(skip)]
    pub lazy_refcounts: bool,
    /// qcow2 extended L2 entries with subclusters (`-o extended_l2=on`).
    #[arg(skip)]
    pub extended_l2: bool,
    /// qcow2 compression type, 0 zlib or 1 zstd (`-o compression_type=zstd`).
    #[arg(skip)]
    pub compression_type: u8,
    /// The new image file.
    pub file: PathBuf,
    /// Virtual size (e.g. 10G); defaults to the backing file's size.
    pub size: Option<String>,
}

/// Full preallocation: allocates every hole of the file (zeroes), 64 MiB at a time, with a
/// progress line on a terminal. The metadata (already written) is never touched: only holes are
/// filled, so an interrupted run leaves a valid, partly preallocated image.
fn allocate_holes(
    st: &crate::storage::FileStorage,
    path: &std::path::Path,
) -> Result<(), ToolError> {
    use crate::storage::Storage;
    use std::io::IsTerminal;
    const CHUNK: u64 = 64 << 20;
    let len = st.len()?;
    // A second descriptor of the same file, only to find its holes.
    let probe = std::fs::File::open(path)?;
    let tty = std::io::stderr().is_terminal();
    let mut off = 0u64;
    while off < len {
        // The next hole at or after `off` (EOF counts as one), and the data after it.
        let Some(hole) = super::tools::seek(&probe, off, libc::SEEK_HOLE)?.filter(|&h| h < len)
        else {
            break;
        };
        let data = super::tools::seek(&probe, hole, libc::SEEK_DATA)?
            .unwrap_or(len)
            .min(len);
        let mut at = hole;
        while at < data {
            let n = CHUNK.min(data - at);
            st.write_zeroes(at, n)?;
            at += n;
            if tty {
                eprint!("\r    ({:.2}/100%)", at as f64 * 100.0 / len as f64);
            }
        }
        off = data;
    }
    st.sync()?;
    if tty {
        eprintln!("\r    (100.00/100%)");
    }
    Ok(())
}

impl CreateArgs {
    /// The arguments `create FILE SIZE` would have, every option at its default (for commands
    /// that create an image on the way, such as convert and measure).
    pub fn new(format: CreateFormat, file: PathBuf, size: Option<String>) -> Self {
        Self {
            format,
            cluster_size: "64k".into(),
            backing: None,
            backing_format: None,
            preallocation: PreallocArg::Off,
            compat: "1.1".into(),
            refcount_bits: 16,
            encrypt: Default::default(),
            options: Vec::new(),
            objects: Vec::new(),
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: 0,
            file,
            size,
        }
    }
}

/// Runs `create`; returns the exit code.
pub fn run(args: &CreateArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let args = &super::create_opts::apply(args)?;
    let backing_size = match &args.backing {
        Some(b) => {
            let path = image::resolve_backing(&args.file, b);
            let format = args.backing_format.as_deref().map(Format::from_name);
            let format = match format {
                Some(None) => {
                    return Err(ToolError::BadArgument(
                        "backing format must be raw or qcow2",
                    ))
                }
                Some(Some(f)) => Some(f),
                None => None,
            };
            let img = image::open(
                &path,
                &OpenOptions {
                    read_only: true,
                    format,
                    ..Default::default()
                },
            )?;
            Some(img.capacity())
        }
        None => None,
    };
    let size = match (&args.size, backing_size) {
        (Some(s), _) => parse_size(s)?,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(ToolError::BadArgument(
                "a size is needed without a backing file",
            ))
        }
    };
    // As qemu-img: sizes are rounded up to whole 512-byte sectors.
    let size = size
        .checked_next_multiple_of(512)
        .ok_or(ToolError::BadArgument("the size is too large"))?;
    if let Some(params) = args.encrypt.luks2_params()? {
        return create_luks2(args, size, &params, out);
    }
    let luks = args.encrypt.luks_params()?;
    if luks.is_some() && args.preallocation != PreallocArg::Off {
        // Preallocated clusters hold plaintext zeroes, which would read back as garbage.
        return Err(ToolError::BadArgument(
            "preallocation is not supported with encryption",
        ));
    }
    let pass = match luks {
        Some(_) => Some(args.encrypt.new_passphrase()?),
        None => None,
    };
    match args.format {
        CreateFormat::Raw | CreateFormat::Luks if luks.is_some() => {
            if args.backing.is_some() {
                return Err(ToolError::BadArgument("raw images have no backing file"));
            }
            if let (Some(params), Some(pass)) = (&luks, &pass) {
                crate::image::luks::LuksImage::create(&args.file, size, params, pass)?;
            }
        }
        CreateFormat::Raw | CreateFormat::Luks => {
            if args.backing.is_some() {
                return Err(ToolError::BadArgument("raw images have no backing file"));
            }
            // A new file, or an rbd: image.
            let st = crate::rbd::create_new(&args.file)?;
            st.set_len(size)?;
            if args.preallocation == PreallocArg::Full {
                if crate::rbd::is_rbd(&args.file.to_string_lossy()) {
                    st.write_zeroes(0, size)?;
                    st.sync()?;
                } else {
                    drop(st);
                    let st = crate::storage::FileStorage::open(
                        &args.file,
                        crate::storage::OpenFlags {
                            read_only: false,
                            direct: false,
                        },
                    )?;
                    allocate_holes(&st, &args.file)?;
                }
            }
        }
        CreateFormat::Qcow2 => {
            let version = match args.compat.as_str() {
                "1.1" | "v3" => 3,
                "0.10" | "v2" => 2,
                _ => return Err(ToolError::BadArgument("compat must be 1.1 or 0.10")),
            };
            let opts = CreateOptions {
                size,
                cluster_size: parse_size(&args.cluster_size)?,
                version,
                refcount_bits: args.refcount_bits,
                lazy_refcounts: args.lazy_refcounts,
                extended_l2: args.extended_l2,
                compression_type: args.compression_type,
                backing_file: args.backing.clone(),
                backing_format: args.backing_format.clone(),
                // Full = metadata, then every hole of the file allocated here (with progress).
                preallocation: match args.preallocation {
                    PreallocArg::Off => Preallocation::Off,
                    PreallocArg::Metadata | PreallocArg::Full => Preallocation::Metadata,
                },
                ..Default::default()
            };
            match (&luks, &pass) {
                (Some(params), Some(pass)) => {
                    crate::image::crypt::create_qcow2_luks(&args.file, &opts, params, pass)?
                }
                _ => {
                    create_on(crate::rbd::create_new(&args.file)?, &opts)?;
                }
            }
            // (RBD images are thin whatever is written: nothing to fill there.)
            if args.preallocation == PreallocArg::Full
                && !crate::rbd::is_rbd(&args.file.to_string_lossy())
            {
                let st = crate::storage::FileStorage::open(
                    &args.file,
                    crate::storage::OpenFlags {
                        read_only: false,
                        direct: false,
                    },
                )?;
                allocate_holes(&st, &args.file)?;
            }
        }
    }
    writeln!(
        out,
        "Formatting '{}', fmt={}{} size={}",
        args.file.display(),
        match (args.format, luks.is_some()) {
            (CreateFormat::Qcow2, _) => "qcow2",
            (CreateFormat::Raw | CreateFormat::Luks, false) => "raw",
            (CreateFormat::Raw | CreateFormat::Luks, true) => "luks",
        },
        match (args.format, &luks) {
            (CreateFormat::Qcow2, Some(_)) => " encrypt.format=luks",
            _ => "",
        },
        size
    )?;
    Ok(0)
}

/// `create -f raw --encrypt luks2`: a raw LUKS2 file as cryptsetup lays it out.
fn create_luks2(
    args: &CreateArgs,
    size: u64,
    params: &crate::crypto::luks::luks2::Luks2CreateParams,
    out: &mut dyn Write,
) -> Result<i32, ToolError> {
    if args.format != CreateFormat::Raw {
        return Err(ToolError::BadArgument(
            "LUKS2 is for raw images (-f raw); qcow2 encryption is LUKS1, as QEMU's",
        ));
    }
    if args.backing.is_some() || args.preallocation != PreallocArg::Off {
        return Err(ToolError::BadArgument(
            "LUKS2 images have no backing file or preallocation",
        ));
    }
    if !size.is_multiple_of(u64::from(params.sector_size)) {
        return Err(ToolError::BadArgument(
            "the size must be a multiple of the sector size",
        ));
    }
    let pass = args.encrypt.new_passphrase()?;
    crate::image::luks::LuksImage::create_luks2(&args.file, size, params, &pass)?;
    writeln!(
        out,
        "Formatting '{}', fmt=luks2 size={size} sector-size={}",
        args.file.display(),
        params.sector_size
    )?;
    Ok(0)
}
