//! A compressed qcow2 image written in one sequential pass (`convert -c`), as `qemu-img convert -c`
//! makes them: every data cluster deflate- or zstd-compressed and packed byte by byte after the
//! previous one (a compressed cluster may straddle a host-cluster boundary), a cluster whose
//! compressed form is not smaller stored uncompressed, zero clusters left unallocated.
//!
//! Layout: header cluster; the data, appended; then the L2 tables, the L1 table, the refcount
//! blocks and table; the header last, after a sync, so that a crash leaves no valid image
//! rather than a wrong one. Refcounts count every reference: a host cluster holding parts of
//! three compressed clusters has refcount 3.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::alloc::Refcounts;
use super::header::{self, build_header_cluster, Header, EXT_FEATURE_TABLE};
use super::metadata::{COMPRESSED, COPIED};
use super::{Error, Result};
use crate::storage::StorageError;

/// Refcount order of the images written (16-bit refcounts, QEMU's default).
const REFCOUNT_ORDER: u32 = 4;

/// Writes a compressed qcow2 image cluster by cluster.
pub struct CompressedWriter {
    file: File,
    size: u64,
    cluster_bits: u32,
    cs: u64,
    compression_type: u8,
    /// Next free byte of the data area.
    pos: u64,
    /// Guest cluster index → L2 entry.
    l2: BTreeMap<u64, u64>,
    /// Refcount per host cluster index.
    refs: Vec<u64>,
}

fn open_err(path: &str, source: std::io::Error) -> Error {
    Error::Storage(StorageError::Open {
        path: path.to_string(),
        source,
    })
}

fn write_err(offset: u64, len: usize, source: std::io::Error) -> Error {
    Error::Storage(StorageError::Write {
        offset,
        len,
        source,
    })
}

impl CompressedWriter {
    /// Creates `path` (which must not exist) for an image of `size` bytes.
    pub fn new(path: &Path, size: u64, cluster_size: u64, compression_type: u8) -> Result<Self> {
        if !cluster_size.is_power_of_two() {
            return Err(Error::InvalidHeader {
                what: "cluster size must be a power of two",
            });
        }
        let cluster_bits = cluster_size.trailing_zeros();
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::ClusterBits(cluster_bits));
        }
        if compression_type > 1 {
            return Err(Error::CompressionType(compression_type));
        }
        let shown = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| open_err(&shown, e))?;
        Ok(Self {
            file,
            size,
            cluster_bits,
            cs: cluster_size,
            compression_type,
            pos: cluster_size,
            l2: BTreeMap::new(),
            refs: vec![1],
        })
    }

    fn compress(&self, data: &[u8]) -> Option<Vec<u8>> {
        let out = match self.compression_type {
            0 => {
                let mut e = flate2::write::DeflateEncoder::new(
                    Vec::with_capacity(data.len()),
                    flate2::Compression::default(),
                );
                e.write_all(data).ok()?;
                e.finish().ok()?
            }
            _ => single_segment(
                ruzstd::encoding::compress_to_vec(
                    data,
                    ruzstd::encoding::CompressionLevel::Fastest,
                ),
                data.len(),
            )?,
        };
        (u64::try_from(out.len()).ok()? < self.cs).then_some(out)
    }

    fn add_ref(&mut self, host_cluster: u64) -> Result<()> {
        let i = usize::try_from(host_cluster).map_err(|_| Error::TooLarge)?;
        if self.refs.len() <= i {
            self.refs.resize(i + 1, 0);
        }
        self.refs[i] += 1;
        Ok(())
    }

    fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(data, off)
            .map_err(|e| write_err(off, data.len(), e))
    }

    /// Writes guest cluster `index` (`data` is the cluster, shorter only at the end of the disk).
    pub fn write_cluster(&mut self, index: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs;
        if index.checked_mul(cs).is_none_or(|o| o >= self.size) || self.l2.contains_key(&index) {
            return Err(Error::OutOfRange {
                offset: index.saturating_mul(cs),
                len: cs,
            });
        }
        let full: Vec<u8>;
        let data = if (data.len() as u64) < cs {
            let mut f = vec![0u8; usize::try_from(cs).map_err(|_| Error::TooLarge)?];
            f[..data.len()].copy_from_slice(data);
            full = f;
            &full[..]
        } else {
            &data[..usize::try_from(cs).map_err(|_| Error::TooLarge)?]
        };
        match self.compress(data) {
            Some(z) => {
                let off = self.pos;
                let len = z.len() as u64;
                self.write_at(&z, off)?;
                let (first, last) = (off / cs, (off + len - 1) / cs);
                for c in first..=last {
                    self.add_ref(c)?;
                }
                // Additional 512-byte sectors after the first, in the bits above the offset.
                let shift = 62 - (self.cluster_bits - 8);
                let sectors = (off + len - 1) / 512 - off / 512;
                self.l2.insert(index, COMPRESSED | (sectors << shift) | off);
                self.pos = off + len;
            }
            None => {
                let off = self.pos.next_multiple_of(cs);
                self.write_at(data, off)?;
                self.add_ref(off / cs)?;
                self.l2.insert(index, COPIED | off);
                self.pos = off + cs;
            }
        }
        Ok(())
    }

    /// Writes the tables and the header, and syncs: the image is complete.
    pub fn finish(mut self) -> Result<()> {
        let cs = self.cs;
        let per_l2 = cs / 8;
        let l1_size = self.size.div_ceil(cs * per_l2);
        let l1_len = u32::try_from(l1_size).map_err(|_| Error::TooLarge)?;
        let mut next = self.pos.next_multiple_of(cs);
        // L2 tables.
        let mut l1 = vec![0u64; usize::try_from(l1_size).map_err(|_| Error::TooLarge)?];
        let mut tables: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (&gc, &entry) in &self.l2 {
            let t = tables
                .entry(gc / per_l2)
                .or_insert_with(|| vec![0u8; usize::try_from(cs).unwrap_or(0)]);
            let i = usize::try_from((gc % per_l2) * 8).map_err(|_| Error::TooLarge)?;
            t[i..i + 8].copy_from_slice(&entry.to_be_bytes());
        }
        for (l1i, t) in &tables {
            self.write_at(t, next)?;
            let i = usize::try_from(*l1i).map_err(|_| Error::TooLarge)?;
            l1[i] = COPIED | next;
            self.add_ref(next / cs)?;
            next += cs;
        }
        // L1 table.
        let l1_off = next;
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_clusters = (l1_bytes.len() as u64).div_ceil(cs).max(1);
        self.write_at(&l1_bytes, l1_off)?;
        for c in 0..l1_clusters {
            self.add_ref(l1_off / cs + c)?;
        }
        next += l1_clusters * cs;
        // Refcount blocks and table, sized so that they count themselves too.
        let per_block = cs * 8 / (1u64 << REFCOUNT_ORDER);
        let per_table = cs / 8;
        let base = next / cs;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = base + blocks + table;
            let b = total.div_ceil(per_block);
            let t = b.div_ceil(per_table).max(1);
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        let rb_off = next;
        let rt_off = rb_off + blocks * cs;
        for c in 0..blocks + table {
            self.add_ref(base + c)?;
        }
        let cs_usize = usize::try_from(cs).map_err(|_| Error::TooLarge)?;
        let mut rt = vec![0u8; usize::try_from(table * cs).map_err(|_| Error::TooLarge)?];
        for b in 0..blocks {
            let mut block = vec![0u8; cs_usize];
            for j in 0..per_block {
                let c = usize::try_from(b * per_block + j).map_err(|_| Error::TooLarge)?;
                if let Some(&r) = self.refs.get(c) {
                    if r > u64::from(u16::MAX) {
                        return Err(Error::RefcountOverflow {
                            offset: c as u64 * cs,
                        });
                    }
                    if r != 0 {
                        let j = usize::try_from(j).map_err(|_| Error::TooLarge)?;
                        Refcounts::set_entry(REFCOUNT_ORDER, &mut block, j, r);
                    }
                }
            }
            self.write_at(&block, rb_off + b * cs)?;
            let i = usize::try_from(b * 8).map_err(|_| Error::TooLarge)?;
            rt[i..i + 8].copy_from_slice(&(rb_off + b * cs).to_be_bytes());
        }
        self.write_at(&rt, rt_off)?;
        let end = rt_off + table * cs;
        self.file
            .set_len(end)
            .map_err(|e| Error::Storage(StorageError::Size(e)))?;
        self.file
            .sync_all()
            .map_err(|e| Error::Storage(StorageError::Flush(e)))?;
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.cluster_bits,
            size: self.size,
            crypt_method: 0,
            l1_size: l1_len,
            l1_table_offset: l1_off,
            refcount_table_offset: rt_off,
            refcount_table_clusters: u32::try_from(table).map_err(|_| Error::TooLarge)?,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: if self.compression_type != 0 {
                header::INCOMPAT_COMPRESSION
            } else {
                0
            },
            compatible: 0,
            autoclear: 0,
            refcount_order: REFCOUNT_ORDER,
            header_length: 112,
            compression_type: self.compression_type,
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            fde: None,
            bitmaps: None,
            feature_names: Vec::new(),
        };
        let mut exts = vec![(EXT_FEATURE_TABLE, header::feature_table())];
        let hc = match build_header_cluster(&h, &exts) {
            Ok(b) => b,
            Err(Error::HeaderFull) => {
                exts.clear();
                build_header_cluster(&h, &exts)?
            }
            Err(e) => return Err(e),
        };
        self.write_at(&hc, 0)?;
        self.file
            .sync_all()
            .map_err(|e| Error::Storage(StorageError::Flush(e)))?;
        Ok(())
    }
}

/// Rewrites a zstd frame header to the single-segment form QEMU's zstd frames have (window =
/// content size = one cluster), so that readers that bound the window by the cluster size, ours
/// included, accept it. The blocks are unchanged; `None` for a frame we do not recognise.
fn single_segment(frame: Vec<u8>, content: usize) -> Option<Vec<u8>> {
    const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let fhd = *frame.get(4)?;
    if frame.get(..4)? != MAGIC {
        return None;
    }
    if fhd & 0x20 != 0 {
        return Some(frame);
    }
    // Only the plain form: no dictionary id, no content size, a window descriptor byte.
    if fhd & 0x03 != 0 || fhd >> 6 != 0 {
        return None;
    }
    let (flag, fcs): (u8, Vec<u8>) = match u64::try_from(content).ok()? {
        n @ 256..=65791 => (1, u16::try_from(n - 256).ok()?.to_le_bytes().to_vec()),
        n => (2, u32::try_from(n).ok()?.to_le_bytes().to_vec()),
    };
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.push((flag << 6) | 0x20 | (fhd & 0x04));
    out.extend_from_slice(&fcs);
    out.extend_from_slice(frame.get(6..)?);
    Some(out)
}
