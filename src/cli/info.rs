//! `vhost-user-qcow2 info`: image facts, as `qemu-img info` (JSON field names included).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::tools::{OutputFormat, ToolError};
use crate::image::{self, Format};
use crate::qcow2::Header;
use crate::storage::OpenFlags;

/// Arguments of `info`.
#[derive(Debug, Clone, clap::Args)]
pub struct InfoArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Image format (detected when not given).
    #[arg(short = 'f', long)]
    pub format: Option<String>,
    /// Show every image of the backing chain, top first (JSON: an array).
    #[arg(long)]
    pub backing_chain: bool,
    /// The image file.
    pub file: PathBuf,
}

/// The facts `qemu-img info --output=json` reports, under its field names.
pub fn info_json(path: &Path, format: Option<Format>) -> Result<Value, ToolError> {
    let st = crate::rbd::open_storage(
        path,
        OpenFlags {
            read_only: true,
            direct: false,
        },
    )?;
    let format = match format {
        Some(f) => f,
        None => image::detect_format(&*st)?,
    };
    let meta = StorageMeta::of(path, &*st)?;
    let mut v = Map::new();
    v.insert("filename".into(), json!(path.display().to_string()));
    v.insert("format".into(), json!(format.name()));
    v.insert("actual-size".into(), json!(meta.blocks() * 512));
    match format {
        Format::Raw => {
            v.insert("virtual-size".into(), json!(meta.len()));
            v.insert("dirty-flag".into(), json!(false));
        }
        Format::Luks if crate::crypto::luks::luks2::luks_version(st.as_ref())? == Some(2) => {
            let h = crate::crypto::luks::luks2::Luks2Header::read(st.as_ref())
                .map_err(|e| image::ImageError::from(crate::crypto::luks::LuksError::from(e)))?;
            let seg = &h.meta.segment;
            let unit = u64::from(seg.sector_size);
            let size = seg.size.unwrap_or(meta.len().saturating_sub(seg.offset)) / unit * unit;
            v.insert("virtual-size".into(), json!(size));
            v.insert("encrypted".into(), json!(true));
            v.insert("dirty-flag".into(), json!(false));
            v.insert(
                "format-specific".into(),
                json!({"type": "luks2", "data": super::luks2_info::to_json(&h)}),
            );
        }
        Format::Luks => {
            let area =
                crate::crypto::luks::LuksArea::whole(&*st).map_err(image::ImageError::from)?;
            let h = crate::crypto::luks::keyslot::read_header(&area)
                .map_err(image::ImageError::from)?;
            let payload = h.payload_offset_bytes();
            v.insert(
                "virtual-size".into(),
                json!(meta.len().saturating_sub(payload) & !511),
            );
            v.insert("encrypted".into(), json!(true));
            v.insert("dirty-flag".into(), json!(false));
            v.insert(
                "format-specific".into(),
                json!({"type": "luks", "data": super::keyslot::qemu_info_json(&h)}),
            );
        }
        Format::Qcow2 => {
            let h = Header::read(&*st)?;
            v.insert("virtual-size".into(), json!(h.size));
            v.insert("cluster-size".into(), json!(h.cluster_size()));
            v.insert("dirty-flag".into(), json!(h.is_dirty()));
            if h.crypt_method != 0 {
                v.insert("encrypted".into(), json!(true));
            }
            let mut data = Map::new();
            data.insert(
                "compat".into(),
                json!(if h.version >= 3 { "1.1" } else { "0.10" }),
            );
            if h.version >= 3 {
                data.insert(
                    "compression-type".into(),
                    json!(if h.compression_type == 1 {
                        "zstd"
                    } else {
                        "zlib"
                    }),
                );
                data.insert(
                    "lazy-refcounts".into(),
                    json!(h.compatible & crate::qcow2::header::COMPAT_LAZY_REFCOUNTS != 0),
                );
                data.insert("corrupt".into(), json!(h.is_corrupt()));
                data.insert("extended-l2".into(), json!(h.extended_l2()));
            } else {
                data.insert("compression-type".into(), json!("zlib"));
            }
            data.insert("refcount-bits".into(), json!(1u64 << h.refcount_order));
            match h.crypt_method {
                1 => {
                    data.insert("encrypt".into(), json!({"format": "aes"}));
                }
                2 => {
                    // The LUKS header as qemu-img shows it; just the format if it is unreadable.
                    let luks = h
                        .fde
                        .and_then(|(base, len)| {
                            let area =
                                crate::crypto::luks::LuksArea::region(&*st, base, len).ok()?;
                            crate::crypto::luks::keyslot::read_header(&area).ok()
                        })
                        .map(|lh| super::keyslot::qemu_info_json(&lh));
                    let mut enc = match luks {
                        Some(Value::Object(m)) => m,
                        _ => Map::new(),
                    };
                    enc.insert("format".into(), json!("luks"));
                    data.insert("encrypt".into(), Value::Object(enc));
                }
                _ => {}
            }
            if let Some(df) = &h.data_file {
                data.insert("data-file".into(), json!(df));
            }
            v.insert(
                "format-specific".into(),
                json!({"type": "qcow2", "data": Value::Object(data)}),
            );
            let snaps = crate::qcow2::snapshot_ops::read_table(&*st, &h)?;
            if !snaps.is_empty() {
                v.insert("snapshots".into(), super::snapshot::info_json(&snaps));
            }
            if let Some(b) = &h.backing_file {
                v.insert("backing-filename".into(), json!(b));
                v.insert(
                    "full-backing-filename".into(),
                    json!(image::resolve_backing(path, b).display().to_string()),
                );
                if let Some(f) = &h.backing_format {
                    v.insert("backing-filename-format".into(), json!(f));
                }
            }
        }
    }
    Ok(Value::Object(v))
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut u = 0;
    let mut whole = n;
    while whole >= 1024 && u + 1 < UNITS.len() {
        whole /= 1024;
        u += 1;
    }
    if u == 0 {
        return format!("{n} B");
    }
    let div = 1u64 << (10 * u);
    let tenths = (n % div) * 10 / div;
    if tenths == 0 {
        format!("{whole} {}", UNITS[u])
    } else {
        format!("{whole}.{tenths} {}", UNITS[u])
    }
}

/// Runs `info`; returns the exit code.
pub fn run(args: &InfoArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let format = match args.format.as_deref() {
        None => None,
        Some(f) => Some(
            Format::from_name(f)
                .ok_or(ToolError::BadArgument("format must be raw, qcow2 or luks"))?,
        ),
    };
    if !args.backing_chain {
        let v = info_json(&args.file, format)?;
        if args.output == OutputFormat::Json {
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        } else {
            write_human(&args.file, &v, out)?;
        }
        return Ok(0);
    }
    // The chain: each image's backing file, with its recorded format, until one has none.
    let mut chain = Vec::new();
    let mut next = Some((args.file.clone(), format));
    while let Some((path, format)) = next.take() {
        if chain.len() > image::MAX_BACKING_DEPTH {
            return Err(image::ImageError::BackingChain {
                path: path.display().to_string(),
                reason: "is deeper than 16",
            }
            .into());
        }
        let v = info_json(&path, format)?;
        if let Some(full) = v.get("full-backing-filename").and_then(Value::as_str) {
            let f = v
                .get("backing-filename-format")
                .and_then(Value::as_str)
                .and_then(Format::from_name);
            next = Some((PathBuf::from(full), f));
        }
        chain.push((path, v));
    }
    if args.output == OutputFormat::Json {
        let all: Vec<&Value> = chain.iter().map(|(_, v)| v).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
    } else {
        for (i, (path, v)) in chain.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            write_human(path, v, out)?;
        }
    }
    Ok(0)
}

/// One image's facts as `qemu-img info` prints them.
fn write_human(path: &Path, v: &Value, out: &mut dyn Write) -> Result<(), ToolError> {
    let get = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let num = |k: &str| get(k).as_u64().unwrap_or(0);
    writeln!(out, "image: {}", path.display())?;
    writeln!(out, "file format: {}", get("format").as_str().unwrap_or(""))?;
    let vs = num("virtual-size");
    writeln!(out, "virtual size: {} ({vs} bytes)", human_size(vs))?;
    writeln!(out, "disk size: {}", human_size(num("actual-size")))?;
    if let Some(cs) = v.get("cluster-size").and_then(Value::as_u64) {
        writeln!(out, "cluster_size: {cs}")?;
    }
    if let Some(b) = v.get("backing-filename").and_then(Value::as_str) {
        let full = get("full-backing-filename");
        writeln!(
            out,
            "backing file: {b} (actual path: {})",
            full.as_str().unwrap_or(b)
        )?;
        if let Some(f) = v.get("backing-filename-format").and_then(Value::as_str) {
            writeln!(out, "backing file format: {f}")?;
        }
    }
    if v.get("encrypted").is_some() {
        writeln!(out, "encrypted: yes")?;
    }
    if let Some(snaps) = v.get("snapshots").and_then(Value::as_array) {
        writeln!(out, "Snapshot list:")?;
        writeln!(out, "{}", super::snapshot::dump_line(None))?;
        for j in snaps {
            let n = |k: &str| j.get(k).and_then(Value::as_u64).unwrap_or(0);
            let t = |k: &str| j.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let sn = crate::qcow2::snapshot_ops::Snapshot {
                l1_offset: 0,
                l1_size: 0,
                id: t("id"),
                name: t("name"),
                date_sec: u32::try_from(n("date-sec")).unwrap_or(0),
                date_nsec: u32::try_from(n("date-nsec")).unwrap_or(0),
                vm_clock_nsec: n("vm-clock-sec") * 1_000_000_000 + n("vm-clock-nsec"),
                vm_state_size: n("vm-state-size"),
                disk_size: None,
                icount: j.get("icount").and_then(Value::as_u64),
                unknown_extra: Vec::new(),
            };
            writeln!(out, "{}", super::snapshot::dump_line(Some(&sn)))?;
        }
    }
    if let Some(data) = v
        .pointer("/format-specific/data")
        .and_then(Value::as_object)
    {
        writeln!(out, "Format specific information:")?;
        for (k, val) in data {
            let shown = match val {
                Value::String(s) => s.clone(),
                Value::Object(o) => o
                    .get("format")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                other => other.to_string(),
            };
            writeln!(out, "    {}: {shown}", k.replace('-', " "))?;
        }
    }
    Ok(())
}

/// The length and allocated bytes of the storage an image lives on: a file's metadata, or for an
/// `rbd:` image its size (RBD does not report allocation cheaply; the size stands for both).
struct StorageMeta {
    len: u64,
    allocated: u64,
}

impl StorageMeta {
    fn of(path: &Path, st: &dyn crate::storage::Storage) -> Result<Self, ToolError> {
        if path.to_str().is_some_and(crate::rbd::is_rbd) {
            let len = st.len()?;
            return Ok(StorageMeta {
                len,
                allocated: len,
            });
        }
        let meta = std::fs::metadata(path)?;
        Ok(StorageMeta {
            len: meta.len(),
            allocated: meta.blocks() * 512,
        })
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn blocks(&self) -> u64 {
        self.allocated / 512
    }
}
