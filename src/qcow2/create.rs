//! Creating qcow2 images as `qemu-img create -f qcow2` does (v3, 64 KiB clusters,
//! refcount_bits 16, feature-name table by default).
//!
//! Layout: header cluster, refcount table (1 cluster), first refcount block, L1 table; then,
//! through the normal allocator, the LUKS region (if asked for) and preallocated clusters.

use std::path::Path;

use super::alloc::Refcounts;
use super::header::{
    self, build_header_cluster, Header, EXT_BACKING_FORMAT, EXT_FDE, EXT_FEATURE_TABLE,
};
use super::{Error, Qcow2, Qcow2Options, Result};
use crate::storage::{FileStorage, Storage};

/// Preallocation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    Metadata,
    Full,
}

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Guest-visible size in bytes.
    pub size: u64,
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    /// Extended L2 entries (128 bits, 32 subclusters; clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// Compression type: 0 zlib (deflate), 1 zstd.
    pub compression_type: u8,
    /// Backing file name as stored in the header.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub preallocation: Preallocation,
    /// Reserve a cluster-aligned region of this many bytes for a LUKS header + key material,
    /// write the 0x0537BE77 extension and crypt_method = 2. The caller writes the LUKS bytes at
    /// [`Created::luks_region`].
    pub luks_header_len: Option<u64>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
            luks_header_len: None,
        }
    }
}

/// What [`create`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    /// (offset, length) of the reserved LUKS region.
    pub luks_region: Option<(u64, u64)>,
}

/// Creates a new image file at `path` (fails if it exists).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<Created> {
    let st = FileStorage::create(path)?;
    create_on(Box::new(st), opts)
}

/// Writes a new image into an empty `storage`.
pub fn create_on(storage: Box<dyn Storage>, opts: &CreateOptions) -> Result<Created> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() {
        return Err(Error::InvalidHeader {
            what: "cluster size must be a power of two",
        });
    }
    let cluster_bits = cs.trailing_zeros();
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Error::ClusterBits(cluster_bits));
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(Error::InvalidHeader {
            what: "refcount_bits must be a power of two up to 64",
        });
    }
    let refcount_order = opts.refcount_bits.trailing_zeros();
    if opts.version == 2 && (refcount_order != 4 || opts.lazy_refcounts) {
        return Err(Error::InvalidHeader {
            what: "compat 0.10 needs refcount_bits 16 and no lazy refcounts",
        });
    }
    if opts.version != 2 && opts.version != 3 {
        return Err(Error::Version(opts.version));
    }
    if opts.luks_header_len.is_some() && opts.version != 3 {
        return Err(Error::InvalidHeader {
            what: "LUKS encryption needs compat 1.1",
        });
    }
    if !opts.size.is_multiple_of(512) {
        return Err(Error::InvalidHeader {
            what: "size must be a multiple of 512",
        });
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(Error::InvalidHeader {
            what: "extended L2 entries need clusters of at least 16 KiB",
        });
    }
    if (opts.extended_l2 || opts.compression_type != 0) && opts.version != 3 {
        return Err(Error::InvalidHeader {
            what: "extended L2 and zstd compression need compat 1.1",
        });
    }
    if opts.compression_type > 1 {
        return Err(Error::CompressionType(opts.compression_type));
    }
    let l2_entry = if opts.extended_l2 { 16 } else { 8 };
    let per_l1 = cs * (cs / l2_entry);
    let l1_size = u32::try_from(opts.size.div_ceil(per_l1)).map_err(|_| Error::TooLarge)?;
    let l1_bytes = u64::from(l1_size) * 8;
    if l1_bytes > header::MAX_L1_BYTES {
        return Err(Error::TooLarge);
    }
    let l1_clusters = l1_bytes.div_ceil(cs).max(1);
    let luks_clusters = opts.luks_header_len.map(|l| l.div_ceil(cs));
    // Refcount table at cluster 1 with one entry: the block at cluster 2, covering 0..=2.
    let mut rt = vec![0u8; usize::try_from(cs).map_err(|_| Error::TooLarge)?];
    rt[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    storage.write_at(&rt, cs)?;
    let mut rb = vec![0u8; usize::try_from(cs).map_err(|_| Error::TooLarge)?];
    for i in 0..3 {
        Refcounts::set_entry(refcount_order, &mut rb, i, 1);
    }
    storage.write_at(&rb, 2 * cs)?;
    // A provisional header so that the allocator can move the refcount table if it must.
    storage.write_at(
        &vec![0u8; usize::try_from(cs).map_err(|_| Error::TooLarge)?],
        0,
    )?;
    // L1 and the LUKS region through the allocator, so that any number of refcount blocks works.
    let mut rc = Refcounts::load(storage.as_ref(), refcount_order, cluster_bits, cs, 1, false)?;
    let l1_off = rc.alloc(storage.as_ref(), l1_clusters)?;
    storage.write_zeroes(l1_off, l1_clusters * cs)?;
    let mut end = l1_off + l1_clusters * cs;
    let mut luks_region = None;
    if let (Some(n), Some(len)) = (luks_clusters, opts.luks_header_len) {
        let got = rc.alloc(storage.as_ref(), n)?;
        storage.write_zeroes(got, n * cs)?;
        end = end.max(got + n * cs);
        luks_region = Some((got, len));
    }
    let (rt_off, rt_clusters) = rc.table_location();
    let h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: opts.size,
        crypt_method: if opts.luks_header_len.is_some() { 2 } else { 0 },
        l1_size,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: u32::try_from(rt_clusters).map_err(|_| Error::TooLarge)?,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: if opts.extended_l2 {
            header::INCOMPAT_EXTL2
        } else {
            0
        } | if opts.compression_type != 0 {
            header::INCOMPAT_COMPRESSION
        } else {
            0
        },
        compatible: if opts.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order,
        header_length: if opts.version == 3 { 112 } else { 72 },
        compression_type: opts.compression_type,
        extensions: Vec::new(),
        backing_file: opts.backing_file.clone(),
        backing_format: None,
        data_file: None,
        fde: None,
        bitmaps: None,
        feature_names: Vec::new(),
    };
    let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
    if let (Some(_), Some(fmt)) = (&opts.backing_file, &opts.backing_format) {
        exts.push((EXT_BACKING_FORMAT, fmt.as_bytes().to_vec()));
    }
    if let Some((off, len)) = luks_region {
        let mut d = off.to_be_bytes().to_vec();
        d.extend_from_slice(&len.to_be_bytes());
        exts.push((EXT_FDE, d));
    }
    if opts.version == 3 {
        exts.push((EXT_FEATURE_TABLE, header::feature_table()));
    }
    let hc = match build_header_cluster(&h, &exts) {
        Ok(b) => b,
        Err(Error::HeaderFull) if opts.version == 3 => {
            // Small clusters: leave the (optional) feature-name table out.
            exts.pop();
            build_header_cluster(&h, &exts)?
        }
        Err(e) => return Err(e),
    };
    if storage.len()? < end {
        storage.set_len(end)?;
    }
    storage.sync()?;
    storage.write_at(&hc, 0)?;
    storage.sync()?;
    if opts.preallocation != Preallocation::Off {
        if opts.backing_file.is_some() {
            return Err(Error::Unsupported("preallocation with a backing file"));
        }
        if luks_region.is_some() {
            return Err(Error::Unsupported("preallocation of an encrypted image"));
        }
        let img = Qcow2::open(storage, &Qcow2Options::default(), None, None)?;
        img.preallocate(opts.preallocation == Preallocation::Full)?;
        img.flush()?;
    }
    Ok(Created { luks_region })
}
