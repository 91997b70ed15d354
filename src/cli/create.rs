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
    /// The new image file.
    pub file: PathBuf,
    /// Virtual size (e.g. 10G); defaults to the backing file's size.
    pub size: Option<String>,
}

/// Runs `create`; returns the exit code.
pub fn run(args: &CreateArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
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
    if size % 512 != 0 {
        return Err(ToolError::BadArgument("the size must be a multiple of 512"));
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
        CreateFormat::Raw if luks.is_some() => {
            if args.backing.is_some() {
                return Err(ToolError::BadArgument("raw images have no backing file"));
            }
            if let (Some(params), Some(pass)) = (&luks, &pass) {
                crate::image::luks::LuksImage::create(&args.file, size, params, pass)?;
            }
        }
        CreateFormat::Raw => {
            if args.backing.is_some() {
                return Err(ToolError::BadArgument("raw images have no backing file"));
            }
            // A new file, or an rbd: image.
            let st = crate::rbd::create_new(&args.file)?;
            st.set_len(size)?;
            if args.preallocation == PreallocArg::Full {
                st.write_zeroes(0, size)?;
                st.sync()?;
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
                backing_file: args.backing.clone(),
                backing_format: args.backing_format.clone(),
                preallocation: match args.preallocation {
                    PreallocArg::Off => Preallocation::Off,
                    PreallocArg::Metadata => Preallocation::Metadata,
                    PreallocArg::Full => Preallocation::Full,
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
        }
    }
    writeln!(
        out,
        "Formatting '{}', fmt={}{} size={}",
        args.file.display(),
        match (args.format, luks.is_some()) {
            (CreateFormat::Qcow2, _) => "qcow2",
            (CreateFormat::Raw, false) => "raw",
            (CreateFormat::Raw, true) => "luks",
        },
        match (args.format, &luks) {
            (CreateFormat::Qcow2, Some(_)) => " encrypt.format=luks",
            _ => "",
        },
        size
    )?;
    Ok(0)
}
