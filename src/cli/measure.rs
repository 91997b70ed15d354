//! `vhost-user-qcow2 measure`: how large a new image must be, with qemu-img measure's numbers
//! (block/qcow2.c `qcow2_measure`, block/raw-format.c `raw_measure`).
//!
//! qcow2 target: "fully allocated" is the LUKS payload region (rounded to clusters) plus QEMU's
//! `qcow2_calc_prealloc_size` (header, L2 and L1 tables, refcount metadata found as a fixed
//! point, and the data); "required" replaces the data by the source's clusters that hold data
//! (zero ranges skipped; a target cluster counted once however much of it the source fills), or
//! all of it with `preallocation=full|falloc` or a backing file. "bitmaps" (qcow2 v3 sources):
//! the persistent bitmaps' data, tables and directory. Raw target: the virtual size.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::create::{CreateArgs, CreateFormat, PreallocArg};
use super::tools::{parse_size, OutputFormat, ToolError};
use crate::image::{self, Format};

/// Arguments of `measure`.
#[derive(Debug, Clone, clap::Args)]
pub struct MeasureArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Source format (detected when not given).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Target format: raw or qcow2 (default raw, as qemu-img).
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Target options, as `create -o`.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Secret objects named by the options (`secret,id=ID,file=F`).
    #[arg(long = "object", value_name = "OBJECT")]
    pub objects: Vec<String>,
    /// Measure a new empty image of this size instead of a source.
    #[arg(long, conflicts_with = "source")]
    pub size: Option<String>,
    /// The source image.
    pub source: Option<PathBuf>,
}

/// What [`measure`] found (the fields of QEMU's BlockMeasureInfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    pub required: u64,
    pub fully_allocated: u64,
    pub bitmaps: Option<u64>,
}

/// QEMU's `qcow2_refcount_metadata_size`: refcount blocks and table for `clusters`, found as the
/// fixed point where they also count themselves.
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// QEMU's `qcow2_calc_prealloc_size`.
fn prealloc_size(total: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = total.next_multiple_of(cs);
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).next_multiple_of(cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

/// QEMU's `qcow2_get_persistent_dirty_bitmap_size` for a qcow2 source (None: no bitmap support).
fn bitmaps_size(path: &std::path::Path, cs: u64) -> Result<Option<u64>, ToolError> {
    let st = super::tools::open_read_only(path)?;
    let h = crate::qcow2::Header::read(&st)?;
    if h.version < 3 {
        return Ok(None);
    }
    let Some(ext) = h.bitmaps else {
        return Ok(Some(0));
    };
    // The directory: 24-byte entries + extra data + name, each padded to 8.
    const MAX_DIR: u64 = 64 << 20;
    if ext.directory_size > MAX_DIR {
        return Err(ToolError::BadArgument("bitmap directory too large"));
    }
    let mut dir = vec![0u8; usize::try_from(ext.directory_size).unwrap_or(0)];
    std::fs::File::open(path)?.read_exact_at(&mut dir, ext.directory_offset)?;
    let (mut size, mut dir_size, mut at) = (0u64, 0u64, 0usize);
    for _ in 0..ext.nb_bitmaps {
        let e = dir
            .get(at..at + 24)
            .ok_or(ToolError::BadArgument("bitmap directory truncated"))?;
        let gran_bits = u32::from(e[17]);
        let name = u64::from(u16::from_be_bytes([e[18], e[19]]));
        let extra = u64::from(u32::from_be_bytes([e[20], e[21], e[22], e[23]]));
        if gran_bits > 63 {
            return Err(ToolError::BadArgument("bitmap granularity out of range"));
        }
        let bits = h.size.div_ceil(1u64 << gran_bits);
        let clusters = bits.div_ceil(8).div_ceil(cs);
        size += clusters * cs + (clusters * 8).next_multiple_of(cs);
        let entry = (24 + name + extra).next_multiple_of(8);
        // Our own bitmaps carry no extra data in the copy: QEMU counts (name, 0).
        dir_size += (24 + name).next_multiple_of(8);
        at += usize::try_from(entry).map_err(|_| ToolError::BadArgument("bitmap entry"))?;
    }
    Ok(Some(size + dir_size.next_multiple_of(cs)))
}

/// Measures `args`.
pub fn measure(args: &MeasureArgs) -> Result<Measure, ToolError> {
    let format = match args.output_format.as_str() {
        "raw" => CreateFormat::Raw,
        "qcow2" => CreateFormat::Qcow2,
        _ => return Err(ToolError::BadArgument("target format must be raw or qcow2")),
    };
    let mut c = CreateArgs::new(format, PathBuf::new(), None);
    c.options.clone_from(&args.options);
    c.objects.clone_from(&args.objects);
    let c = super::create_opts::apply(&c)?;
    let src_format = args
        .format
        .as_deref()
        .map(|f| Format::from_name(f).ok_or(ToolError::BadArgument("unknown source format")))
        .transpose()?;
    let entries = match &args.source {
        Some(s) => Some(super::map::map_entries(s, src_format, 0, None)?),
        None => None,
    };
    let source_size = match (&entries, &args.size) {
        (Some(e), _) => e.last().map_or(0, |l| l.start + l.length),
        (None, Some(s)) => parse_size(s)?,
        (None, None) => return Err(ToolError::BadArgument("a source image or --size is needed")),
    };
    if c.format == CreateFormat::Raw {
        let r = if entries.is_some() {
            source_size
        } else {
            source_size.next_multiple_of(512)
        };
        return Ok(Measure {
            required: r,
            fully_allocated: r,
            bitmaps: None,
        });
    }
    let cs = parse_size(&c.cluster_size)?;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(ToolError::BadArgument(
            "cluster size must be a power of two, 512 to 2M",
        ));
    }
    if !c.refcount_bits.is_power_of_two() || c.refcount_bits > 64 {
        return Err(ToolError::BadArgument(
            "refcount_bits must be a power of two up to 64",
        ));
    }
    let virtual_size = source_size.next_multiple_of(cs);
    let mut required = 0u64;
    if let Some(entries) = &entries {
        if c.backing.is_some() {
            required = virtual_size;
        } else {
            // Target clusters that hold any data of the source.
            let mut next = 0u64;
            for e in entries.iter().filter(|e| !e.zero && e.data && e.present) {
                let start = e.start.max(next) / cs * cs;
                let end = (e.start + e.length).next_multiple_of(cs);
                if end > start && e.start + e.length > next {
                    required += end - start;
                    next = end;
                }
            }
        }
    }
    if c.preallocation == PreallocArg::Full {
        required = virtual_size;
    }
    let luks = match c.encrypt.luks_params()? {
        Some(p) => crate::crypto::luks::create::area_len(&p.spec)
            .map_err(image::ImageError::from)?
            .next_multiple_of(cs),
        None => 0,
    };
    let fully = luks
        + prealloc_size(
            virtual_size,
            cs,
            c.refcount_bits.trailing_zeros(),
            c.extended_l2,
        );
    let bitmaps = match (&args.source, src_format) {
        (Some(s), _) if c.compat == "1.1" => {
            let st = super::tools::open_read_only(s)?;
            let f = match src_format {
                Some(f) => f,
                None => image::detect_format(&st)?,
            };
            if f == Format::Qcow2 {
                bitmaps_size(s, cs)?
            } else {
                None
            }
        }
        _ => None,
    };
    Ok(Measure {
        required: fully - virtual_size + required,
        fully_allocated: fully,
        bitmaps,
    })
}

/// Runs `measure`.
pub fn run(args: &MeasureArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let m = measure(args)?;
    match args.output {
        OutputFormat::Human => {
            writeln!(out, "required size: {}", m.required)?;
            writeln!(out, "fully allocated size: {}", m.fully_allocated)?;
            if let Some(b) = m.bitmaps {
                writeln!(out, "bitmaps size: {b}")?;
            }
        }
        OutputFormat::Json => {
            // qemu-img's key order.
            writeln!(out, "{{")?;
            if let Some(b) = m.bitmaps {
                writeln!(out, "    \"bitmaps\": {b},")?;
            }
            writeln!(out, "    \"required\": {},", m.required)?;
            writeln!(out, "    \"fully-allocated\": {}", m.fully_allocated)?;
            writeln!(out, "}}")?;
        }
    }
    Ok(0)
}
