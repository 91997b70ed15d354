//! `vhost-user-qcow2 map`: where the guest's data lives, as `qemu-img map` prints it.
//!
//! The walk follows qemu-img's `get_block_status` (qemu-img.c): for each range, ask the top layer;
//! a range it does not allocate goes to the next layer of the backing chain, and the layer that
//! answers gives the depth. Per layer, the status follows the block driver:
//! - qcow2 (block/qcow2.c `qcow2_co_block_status`): data, zero, compressed or unallocated per
//!   cluster (subcluster with extended L2); a host offset only for plain data and preallocated
//!   zero clusters of an unencrypted image;
//! - raw (block/file-posix.c `raw_co_block_status`): data or hole per `SEEK_DATA`/`SEEK_HOLE`, the
//!   file offset always valid;
//! - raw LUKS (block/crypto.c has no block status): all data, no offset.
//!
//! Unallocated at the bottom of the chain reads as zero but is not "present"; unallocated past the
//! end of a shorter backing file reads as zero at the overlay's depth.
//!
//! Differences from qemu-img, by choice: no key is needed to map an encrypted image (mapping reads
//! no data), and an external data file is never opened (its offsets equal the guest offsets).

use std::fs::File;
use std::io::{IoSliceMut, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::tools::{OutputFormat, ToolError};
use crate::image::{self, Format};
use crate::qcow2::{self, BackingRead, ClusterCrypt, CryptError, Mapping, Qcow2, Qcow2Options};
use crate::storage::{MemStorage, Storage};

/// Arguments of `map`.
#[derive(Debug, Clone, clap::Args)]
pub struct MapArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Image format (detected when not given).
    #[arg(short = 'f', long)]
    pub format: Option<String>,
    /// Start mapping at this guest offset.
    #[arg(short = 's', long = "start-offset", default_value = "0")]
    pub start_offset: String,
    /// Map at most this many bytes.
    #[arg(short = 'l', long = "max-length")]
    pub max_length: Option<String>,
    /// The image file.
    pub file: PathBuf,
}

/// One entry of the map, as qemu-img's `MapEntry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Host offset and the file it is in.
    pub offset: Option<(u64, String)>,
}

enum LayerKind {
    Raw(File),
    RawLuks,
    Qcow2 {
        q: Box<Qcow2>,
        encrypted: bool,
        /// The image file, to read raw L2 entries and to look for holes under data clusters.
        file: File,
        /// qcow2's "metadata preallocation" heuristic held at open: data clusters over holes of
        /// the file then read as zero (BDRV_BLOCK_RECURSE).
        prealloc: bool,
    },
}

struct Layer {
    name: String,
    size: u64,
    kind: LayerKind,
}

/// A block status of one layer: `len` bytes from the asked offset.
struct Status {
    len: u64,
    data: bool,
    zero: bool,
    compressed: bool,
    offset: Option<(u64, String)>,
}

/// A backing file that must never be read (mapping reads no data).
struct NoBacking(u64);

impl BackingRead for NoBacking {
    fn size(&self) -> u64 {
        self.0
    }
    fn read(&self, _offset: u64, _bufs: &mut [IoSliceMut<'_>]) -> qcow2::Result<()> {
        Err(qcow2::Error::Unsupported("map reads no data"))
    }
}

/// A cipher that must never be used (mapping reads no data).
struct NoCrypt;

impl ClusterCrypt for NoCrypt {
    fn decrypt(
        &self,
        _: &mut [u8],
        _: qcow2::HostOffset,
        _: qcow2::GuestOffset,
    ) -> Result<(), CryptError> {
        Err(CryptError::new("map reads no data"))
    }
    fn encrypt_to(
        &self,
        _: &[u8],
        _: &mut [u8],
        _: qcow2::HostOffset,
        _: qcow2::GuestOffset,
    ) -> Result<(), CryptError> {
        Err(CryptError::new("map reads no data"))
    }
}

fn parse_format(f: &str) -> Result<Format, ToolError> {
    Format::from_name(f).ok_or(ToolError::BadArgument(
        "unknown format (raw, qcow2 or luks)",
    ))
}

fn open_layers(path: &Path, format: Option<Format>) -> Result<Vec<Layer>, ToolError> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((path, format)) = next.take() {
        if layers.len() > image::MAX_BACKING_DEPTH {
            return Err(image::ImageError::BackingChain {
                path: path.display().to_string(),
                reason: "is deeper than 16",
            }
            .into());
        }
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.contains(&canon) {
            return Err(image::ImageError::BackingChain {
                path: path.display().to_string(),
                reason: "has a loop",
            }
            .into());
        }
        seen.push(canon);
        let name = path.display().to_string();
        let st = super::tools::open_read_only(&path)?;
        let format = match format {
            Some(f) => f,
            None => image::detect_format(&st)?,
        };
        let layer = match format {
            Format::Raw => {
                let size = st.len()?;
                Layer {
                    name,
                    size,
                    kind: LayerKind::Raw(File::open(&path)?),
                }
            }
            Format::Luks => {
                let area =
                    crate::crypto::luks::LuksArea::whole(&st).map_err(image::ImageError::from)?;
                let h = crate::crypto::luks::keyslot::read_header(&area)
                    .map_err(image::ImageError::from)?;
                let size = st.len()?.saturating_sub(h.payload_offset_bytes()) & !511;
                Layer {
                    name,
                    size,
                    kind: LayerKind::RawLuks,
                }
            }
            Format::Qcow2 => {
                let probe = qcow2::probe(&st)?;
                let h = &probe.header;
                let encrypted = h.crypt_method != 0;
                let crypt: Option<Arc<dyn ClusterCrypt>> = if encrypted {
                    Some(Arc::new(NoCrypt))
                } else {
                    None
                };
                // The external data file is not opened: its offsets are the guest offsets.
                let data: Option<Box<dyn Storage>> = h
                    .data_file
                    .as_ref()
                    .map(|_| Box::new(MemStorage::new(Vec::new())) as Box<dyn Storage>);
                let mut backing: Option<Box<dyn BackingRead>> = None;
                if let Some(b) = &h.backing_file {
                    let bpath = image::resolve_backing(&path, b);
                    let bformat = h.backing_format.as_deref().map(parse_format).transpose()?;
                    // The backing layer's size is known once it is opened (next iteration).
                    backing = Some(Box::new(NoBacking(0)));
                    next = Some((bpath, bformat));
                }
                // qemu-img names the data file as the header spells it.
                let data_name = h.data_file.clone();
                let external = h.data_file.is_some();
                let file = File::open(&path)?;
                let prealloc = !external && !encrypted && metadata_preallocated(&st, h, &file)?;
                let q = Qcow2::open_with_data_file(
                    Box::new(st),
                    data,
                    &Qcow2Options {
                        read_only: true,
                        ..Default::default()
                    },
                    backing,
                    crypt,
                )?;
                Layer {
                    name: data_name.unwrap_or(name),
                    size: q.size(),
                    kind: LayerKind::Qcow2 {
                        q: Box::new(q),
                        encrypted,
                        file,
                        prealloc,
                    },
                }
            }
        };
        layers.push(layer);
    }
    Ok(layers)
}

fn layer_status(layer: &Layer, off: u64, max: u64) -> Result<Status, ToolError> {
    let name = &layer.name;
    Ok(match &layer.kind {
        LayerKind::RawLuks => Status {
            len: max,
            data: true,
            zero: false,
            compressed: false,
            offset: None,
        },
        LayerKind::Raw(f) => {
            let (len, data) = match super::tools::seek(f, off, libc::SEEK_DATA)? {
                // Trailing hole.
                None => (max, false),
                Some(d) if d == off => {
                    let hole = super::tools::seek(f, off, libc::SEEK_HOLE)?.unwrap_or(layer.size);
                    (hole.saturating_sub(off).max(1), true)
                }
                Some(d) => (d - off, false),
            };
            Status {
                len: len.min(max),
                data,
                zero: !data,
                compressed: false,
                offset: Some((off, name.clone())),
            }
        }
        LayerKind::Qcow2 {
            q,
            encrypted,
            file,
            prealloc,
        } => {
            let h = q.header();
            let cs = q.cluster_size();
            let unit = if h.extended_l2() { cs / 32 } else { cs };
            let len = (unit - (off & (unit - 1))).min(max);
            let in_cluster = off & (cs - 1);
            let host = |h: u64| {
                if *encrypted {
                    None
                } else {
                    Some((h + in_cluster, name.clone()))
                }
            };
            let mut s = Status {
                len,
                data: false,
                zero: false,
                compressed: false,
                offset: None,
            };
            match q.mapping(off)? {
                Mapping::Unallocated => {
                    // An unallocated subcluster of an allocated cluster keeps the host offset.
                    if h.extended_l2() {
                        let c = l2_host(q, file, off)?;
                        if c != 0 {
                            s.offset = host(c);
                        }
                    }
                }
                Mapping::Zero { host: h } => {
                    s.zero = true;
                    s.offset = if h == 0 { None } else { host(h) };
                }
                Mapping::Data { host: h, .. } => {
                    s.data = true;
                    s.offset = host(h);
                    if *prealloc {
                        // Ask the file whether the cluster is a hole (or past its end).
                        let ho = h + in_cluster;
                        match super::tools::seek(file, ho, libc::SEEK_DATA)? {
                            None => s.zero = true,
                            Some(d) if d > ho => {
                                s.zero = true;
                                s.len = s.len.min(d - ho);
                            }
                            Some(_) => {
                                if let Some(hole) = super::tools::seek(file, ho, libc::SEEK_HOLE)? {
                                    s.len = s.len.min(hole.saturating_sub(ho).max(1));
                                }
                            }
                        }
                    }
                }
                Mapping::Compressed { .. } => {
                    s.data = true;
                    s.compressed = true;
                }
            }
            s
        }
    })
}

fn read_be64(file: &File, off: u64) -> Result<u64, ToolError> {
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut b, off)?;
    Ok(u64::from_be_bytes(b))
}

/// The host cluster an extended L2 entry names for the cluster holding `off` (0 if none).
fn l2_host(q: &Qcow2, file: &File, off: u64) -> Result<u64, ToolError> {
    use crate::qcow2::metadata::{COMPRESSED, OFFSET_MASK};
    let h = q.header();
    let cs = h.cluster_size();
    let per_l2 = h.l2_entries();
    let cluster = off / cs;
    let l1_index = cluster / per_l2;
    if l1_index >= u64::from(h.l1_size) {
        return Ok(0);
    }
    let l2 = read_be64(file, h.l1_table_offset + l1_index * 8)? & OFFSET_MASK;
    if l2 == 0 {
        return Ok(0);
    }
    let entry = read_be64(file, l2 + (cluster % per_l2) * 16)?;
    if entry & COMPRESSED != 0 {
        return Ok(0);
    }
    Ok(entry & OFFSET_MASK)
}

/// qcow2's `qcow2_detect_metadata_preallocation`: more clusters have a reference than the file
/// has blocks allocated for (by a margin of 1/9, at least 2).
fn metadata_preallocated(
    st: &dyn Storage,
    h: &qcow2::Header,
    file: &File,
) -> Result<bool, ToolError> {
    use std::os::unix::fs::MetadataExt;
    let cs = h.cluster_size();
    let real_clusters = file.metadata()?.blocks().saturating_mul(512) / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = st.len()?.div_ceil(cs);
    let mut rc = qcow2::alloc::Refcounts::load(
        st,
        h.refcount_order,
        h.cluster_bits,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        true,
    )?;
    let mut count = 0u64;
    let mut i = 0u64;
    while i < end_cluster && count < threshold {
        count += u64::from(rc.get(st, i)? != 0);
        i += 1;
    }
    Ok(count >= threshold)
}

/// The map entry at `off` (at most `max` bytes), walking down the chain.
fn block_status(layers: &[Layer], off: u64, max: u64) -> Result<MapEntry, ToolError> {
    let mut max = max;
    for (depth, layer) in layers.iter().enumerate() {
        let depth = u32::try_from(depth).unwrap_or(u32::MAX);
        let s = layer_status(layer, off, max)?;
        max = s.len;
        let entry = |present: bool, zero: bool| MapEntry {
            start: off,
            length: s.len,
            depth,
            present,
            zero,
            data: s.data,
            compressed: s.compressed,
            offset: s.offset.clone(),
        };
        if s.data || s.zero {
            return Ok(entry(true, s.zero));
        }
        match layers.get(usize::try_from(depth).unwrap_or(usize::MAX) + 1) {
            // Bottom of the chain, or past the end of a shorter backing file: zero here.
            None => return Ok(entry(false, true)),
            Some(b) if off >= b.size => return Ok(entry(false, true)),
            Some(b) => max = max.min(b.size - off),
        }
    }
    Err(ToolError::BadArgument("empty backing chain"))
}

/// Index of the entry covering `off` in a map (entries sorted and contiguous), or the length
/// if `off` is past the end.
pub fn entry_index(entries: &[MapEntry], off: u64) -> usize {
    entries.partition_point(|e| e.start + e.length <= off)
}

/// The entry covering `off`, if any.
pub fn entry_at(entries: &[MapEntry], off: u64) -> Option<&MapEntry> {
    entries.get(entry_index(entries, off))
}

fn mergeable(a: &MapEntry, b: &MapEntry) -> bool {
    a.length > 0
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed
        && a.depth == b.depth
        && a.present == b.present
        && match (&a.offset, &b.offset) {
            (None, None) => true,
            (Some((ao, an)), Some((bo, bn))) => an == bn && ao + a.length == *bo,
            _ => false,
        }
}

/// The map of `start..start+len` of the image at `path`, merged as qemu-img merges it.
pub fn map_entries(
    path: &Path,
    format: Option<Format>,
    start: u64,
    len: Option<u64>,
) -> Result<Vec<MapEntry>, ToolError> {
    let layers = open_layers(path, format)?;
    let size = layers.first().map_or(0, |l| l.size);
    let end = match len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = start.min(end);
    while off < end {
        let e = block_status(&layers, off, end - off)?;
        off += e.length;
        match out.last_mut() {
            Some(last) if mergeable(last, &e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}

fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some((o, _)) = &e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

/// C's `%#-16x`: `0x` prefix except for zero, left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Writes the map as qemu-img does; the result is the exit code.
pub fn write_map(
    entries: &[MapEntry],
    output: OutputFormat,
    out: &mut dyn Write,
) -> Result<i32, ToolError> {
    match output {
        OutputFormat::Json => {
            let lines: Vec<String> = entries.iter().map(json_entry).collect();
            writeln!(out, "[{}]", lines.join(",\n"))?;
            Ok(0)
        }
        OutputFormat::Human => {
            writeln!(
                out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            )?;
            // Only data is listed; qemu-img's extra merging of the other entries changes nothing
            // that is printed.
            for e in entries {
                let Some((o, name)) = &e.offset else {
                    if e.data {
                        return Err(ToolError::BadArgument(
                            "File contains external, encrypted or compressed clusters.",
                        ));
                    }
                    continue;
                };
                if e.data && !e.zero {
                    writeln!(
                        out,
                        "{}{}{}{}",
                        hex16(e.start),
                        hex16(e.length),
                        hex16(*o),
                        name
                    )?;
                }
            }
            Ok(0)
        }
    }
}

/// Runs `map`.
pub fn run(args: &MapArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let format = args.format.as_deref().map(parse_format).transpose()?;
    let start = super::tools::parse_size(&args.start_offset)?;
    let len = args
        .max_length
        .as_deref()
        .map(super::tools::parse_size)
        .transpose()?;
    let entries = map_entries(&args.file, format, start, len)?;
    write_map(&entries, args.output, out)
}
