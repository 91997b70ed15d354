//! The qcow2 header (big-endian, docs/interop/qcow2.rst "Header") and its extensions.
//!
//! Parsing validates every field that later code relies on, against the file length, so that
//! nothing derived from a hostile header can cause a huge allocation or an overflow.

use super::Error;
use crate::storage::Storage;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this implementation knows.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible bit 0.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: bitmaps are consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_FDE: u32 = 0x0537_BE77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte offsets of header fields we rewrite in place.
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_REFCOUNT_TABLE: u64 = 48;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

/// QEMU's limits (block/qcow2.h).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets live in bits 9..=55 of table entries.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// The 72-byte v2 header; v3 adds the feature words.
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;

/// A header extension kept verbatim (unknown ones are preserved by never rewriting the area).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    /// File offset of the extension's data.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The bitmaps extension (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// A parsed and validated header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub fde: Option<(u64, u64)>,
    pub bitmaps: Option<BitmapsExt>,
    /// Feature-name table entries: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

fn bad(what: &'static str) -> Error {
    Error::InvalidHeader { what }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Checks a table at `offset` of `bytes` bytes: cluster-aligned, not in the header cluster,
/// within the file.
pub fn check_table(
    what: &'static str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), Error> {
    if bytes == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(Error::BadTable {
            what,
            offset,
            reason: "not cluster-aligned",
        });
    }
    if offset < cluster_size {
        return Err(Error::BadTable {
            what,
            offset,
            reason: "overlaps the header",
        });
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len && end <= MAX_HOST_OFFSET => Ok(()),
        _ => Err(Error::BadTable {
            what,
            offset,
            reason: "past the end of the file",
        }),
    }
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether the image is encrypted.
    pub fn crypt_method(&self) -> u32 {
        self.crypt_method
    }

    /// The full-disk-encryption header region (offset, length), present iff crypt_method == 2.
    pub fn fde_header(&self) -> Option<(u64, u64)> {
        self.fde
    }

    /// Reads and validates the header of `storage`.
    pub fn read(storage: &dyn Storage) -> Result<Self, Error> {
        let file_len = storage.len()?;
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(Error::Truncated { len: file_len });
        }
        let mut fixed = [0u8; 112];
        storage.read_at(&mut fixed, 0)?;
        if be32(&fixed, 0) != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(Error::Version(version));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::ClusterBits(cluster_bits));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(&fixed, 8),
            backing_file_size: be32(&fixed, 16),
            cluster_bits,
            size: be64(&fixed, 24),
            crypt_method: be32(&fixed, 32),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            snapshots_offset: be64(&fixed, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            fde: None,
            bitmaps: None,
            feature_names: Vec::new(),
        };
        if version == 3 {
            if file_len < u64::from(V3_HEADER_LEN) {
                return Err(Error::Truncated { len: file_len });
            }
            h.incompatible = be64(&fixed, 72);
            h.compatible = be64(&fixed, 80);
            h.autoclear = be64(&fixed, 88);
            h.refcount_order = be32(&fixed, 96);
            h.header_length = be32(&fixed, 100);
            if h.header_length < V3_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(bad(
                    "header_length must be at least 104 and a multiple of 8",
                ));
            }
            if u64::from(h.header_length) > cs {
                return Err(bad("header_length exceeds the cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = fixed[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(bad("refcount_order above 6"));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::UnknownIncompatible { bits: unknown });
        }
        match (
            h.compression_type,
            h.incompatible & INCOMPAT_COMPRESSION != 0,
        ) {
            (0, false) | (1, true) => {}
            (0 | 1, _) => {
                return Err(bad(
                    "compression type and its incompatible bit do not agree",
                ))
            }
            _ => return Err(Error::CompressionType(h.compression_type)),
        }
        if h.crypt_method > 2 {
            return Err(Error::CryptMethod(h.crypt_method));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
            return Err(bad("extended L2 needs clusters of at least 16 KiB"));
        }
        // L1: big enough for the disk, capped like QEMU's, within the file.
        let l2_entries = h.l2_entries();
        let per_l1 = cs
            .checked_mul(l2_entries)
            .ok_or(bad("cluster geometry overflows"))?;
        let needed = h.size.div_ceil(per_l1);
        if u64::from(h.l1_size) < needed {
            return Err(bad("L1 table too small for the disk size"));
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad("L1 table larger than 32 MiB"));
        }
        check_table("L1 table", h.l1_table_offset, l1_bytes, cs, file_len)?;
        if h.l1_size > 0 && h.l1_table_offset == 0 {
            return Err(bad("L1 table offset is 0"));
        }
        if h.refcount_table_clusters == 0 {
            return Err(bad("refcount table has no clusters"));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters)
            .checked_mul(cs)
            .ok_or(bad("refcount table size overflows"))?;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad("refcount table larger than 8 MiB"));
        }
        check_table(
            "refcount table",
            h.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad("too many snapshots"));
        }
        if h.nb_snapshots > 0 {
            check_table("snapshot table", h.snapshots_offset, 1, cs, file_len)?;
        }
        // The header cluster, bounded by the cluster size and the file.
        let hc_len = usize::try_from(cs.min(file_len)).map_err(|_| bad("cluster size"))?;
        let mut hc = vec![0u8; hc_len];
        storage.read_at(&mut hc, 0)?;
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(Error::BackingNameTooLong(h.backing_file_size));
            }
            let end = h
                .backing_file_offset
                .checked_add(u64::from(h.backing_file_size))
                .ok_or(bad("backing file name offset overflows"))?;
            if end > hc_len as u64 {
                return Err(bad("backing file name is outside the header cluster"));
            }
            let s = usize::try_from(h.backing_file_offset).map_err(|_| Error::TooLarge)?;
            let e = usize::try_from(end).map_err(|_| Error::TooLarge)?;
            let name = &hc[s..e];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        // Extensions: from the end of the header to the backing name (or the cluster end).
        let mut pos = h.header_length as usize;
        let ext_end = if h.backing_file_offset != 0 {
            usize::try_from(h.backing_file_offset)
                .unwrap_or(usize::MAX)
                .min(hc_len)
        } else {
            hc_len
        };
        while pos + 8 <= ext_end {
            let kind = be32(&hc, pos);
            let len = be32(&hc, pos + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_start = pos + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= ext_end)
                .ok_or(bad("header extension runs past the header cluster"))?;
            let data = hc[data_start..data_end].to_vec();
            h.parse_extension(kind, &data, file_len)?;
            h.extensions.push(Extension {
                kind,
                offset: data_start as u64,
                data,
            });
            pos = data_start + len.div_ceil(8) * 8;
        }
        if h.crypt_method == 2 && h.fde.is_none() {
            return Err(bad(
                "LUKS encryption without the full-disk-encryption header extension",
            ));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 && h.data_file.is_none() {
            return Err(bad("external data file bit set but no file name"));
        }
        Ok(h)
    }

    fn parse_extension(&mut self, kind: u32, data: &[u8], file_len: u64) -> Result<(), Error> {
        match kind {
            EXT_BACKING_FORMAT => self.backing_format = Some(cstr(data)),
            EXT_DATA_FILE => self.data_file = Some(cstr(data)),
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    self.feature_names.push((e[0], e[1], cstr(&e[2..])));
                }
            }
            EXT_BITMAPS => {
                if data.len() < 24 {
                    return Err(bad("bitmaps extension shorter than 24 bytes"));
                }
                self.bitmaps = Some(BitmapsExt {
                    nb_bitmaps: be32(data, 0),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                });
            }
            EXT_FDE => {
                if self.crypt_method != 2 {
                    return Err(bad(
                        "encryption header extension on an image not encrypted with LUKS",
                    ));
                }
                if data.len() != 16 {
                    return Err(bad("encryption header extension is not 16 bytes"));
                }
                let off = be64(data, 0);
                let len = be64(data, 8);
                let cs = self.cluster_size();
                if !off.is_multiple_of(cs) {
                    return Err(bad("encryption header offset is not cluster-aligned"));
                }
                check_table("encryption header", off, len, cs, file_len)?;
                self.fde = Some((off, len));
            }
            _ => {}
        }
        Ok(())
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry
    }

    /// Whether L2 entries carry a subcluster bitmap.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Name of a known feature bit for `info`.
    pub fn is_dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// The corrupt bit.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }
}

/// Serialises a fresh header cluster (for create). `exts` are (type, data) pairs written in order.
pub fn build_header_cluster(h: &Header, exts: &[(u32, Vec<u8>)]) -> Result<Vec<u8>, Error> {
    let cs = usize::try_from(h.cluster_size()).map_err(|_| bad("cluster size"))?;
    let mut b = vec![0u8; cs];
    let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, h.version);
    put32(&mut b, 20, h.cluster_bits);
    put64(&mut b, 24, h.size);
    put32(&mut b, 32, h.crypt_method);
    put32(&mut b, 36, h.l1_size);
    put64(&mut b, 40, h.l1_table_offset);
    put64(&mut b, 48, h.refcount_table_offset);
    put32(&mut b, 56, h.refcount_table_clusters);
    put32(&mut b, 60, h.nb_snapshots);
    put64(&mut b, 64, h.snapshots_offset);
    let mut pos = if h.version == 3 {
        put64(&mut b, 72, h.incompatible);
        put64(&mut b, 80, h.compatible);
        put64(&mut b, 88, h.autoclear);
        put32(&mut b, 96, h.refcount_order);
        put32(&mut b, 100, h.header_length);
        b[104] = h.compression_type;
        h.header_length as usize
    } else {
        V2_HEADER_LEN as usize
    };
    for (kind, data) in exts {
        let padded = data.len().div_ceil(8) * 8;
        if pos + 8 + padded + 8 > cs {
            return Err(Error::HeaderFull);
        }
        put32(&mut b, pos, *kind);
        put32(
            &mut b,
            pos + 4,
            u32::try_from(data.len()).map_err(|_| Error::HeaderFull)?,
        );
        b[pos + 8..pos + 8 + data.len()].copy_from_slice(data);
        pos += 8 + padded;
    }
    // End-of-extensions marker (8 zero bytes) is already there.
    pos += 8;
    if let Some(name) = &h.backing_file {
        let n = name.as_bytes();
        if n.len() > MAX_BACKING_NAME as usize {
            return Err(Error::BackingNameTooLong(
                u32::try_from(n.len()).unwrap_or(u32::MAX),
            ));
        }
        if pos + n.len() > cs {
            return Err(Error::HeaderFull);
        }
        b[pos..pos + n.len()].copy_from_slice(n);
        put64(&mut b, 8, pos as u64);
        put32(
            &mut b,
            16,
            u32::try_from(n.len()).map_err(|_| Error::HeaderFull)?,
        );
    }
    Ok(b)
}

/// The feature-name table QEMU 10 writes.
pub fn feature_table() -> Vec<u8> {
    let entries: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut v = Vec::with_capacity(entries.len() * 48);
    for (t, bit, name) in entries {
        let mut e = [0u8; 48];
        e[0] = t;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}
