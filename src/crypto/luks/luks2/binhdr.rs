//! The two binary LUKS2 headers and their JSON areas (LUKS2 On-Disk Format Specification §2–3,
//! cryptsetup `lib/luks2/luks2_disk_metadata.c`).
//!
//! Each copy is a 4096-byte binary header followed by the JSON area; the primary copy is at 0,
//! the secondary right after it at `hdr_size`. Binary header (big-endian, byte offsets): 0 magic
//! (`LUKS\xBA\xBE` primary, `SKUL\xBA\xBE` secondary), 6 version (u16, 2), 8 hdr_size (u64,
//! binary header + JSON area), 16 seqid (u64), 24 label (48), 72 checksum_alg (32), 104 salt
//! (64), 168 uuid (40), 208 subsystem (48), 256 hdr_offset (u64), 448 checksum (64).
//! The checksum is the hash (named by checksum_alg) of the binary header with the checksum
//! field zeroed followed by the whole JSON area.
//!
//! Reading follows cryptsetup: a copy is usable when its binary header is sane, its checksum
//! matches and its JSON parses and validates; of two usable copies the higher seqid wins; with
//! one copy unusable the other is used. Nothing is written while reading (cryptsetup repairs the
//! stale copy on open; we leave the file untouched and repair only when we write a header).

use sha2::Digest;

use super::{Luks2Error, Result};
use crate::storage::Storage;

/// Size of the binary header.
pub const BIN_LEN: usize = 4096;
/// Primary magic.
pub const MAGIC_1ST: [u8; 6] = *b"LUKS\xba\xbe";
/// Secondary magic.
pub const MAGIC_2ND: [u8; 6] = *b"SKUL\xba\xbe";
/// Smallest header size (binary + JSON).
pub const HDR_MIN: u64 = 0x4000;
/// Largest header size (binary + JSON) cryptsetup accepts; also caps our allocation.
pub const HDR_MAX: u64 = 0x40_0000;
/// The header sizes the format allows (= the offsets where a secondary copy may be).
pub const HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000,
];

const CSUM_AT: usize = 448;
const CSUM_LEN: usize = 64;

/// The fields of one binary header.
#[derive(Clone, PartialEq, Eq)]
pub struct BinHeader {
    pub hdr_size: u64,
    pub seqid: u64,
    pub label: [u8; 48],
    pub checksum_alg: [u8; 32],
    pub salt: [u8; 64],
    pub uuid: [u8; 40],
    pub subsystem: [u8; 48],
}

impl std::fmt::Debug for BinHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinHeader")
            .field("hdr_size", &self.hdr_size)
            .field("seqid", &self.seqid)
            .field("uuid", &cstr_lossy(&self.uuid))
            .field("label", &cstr_lossy(&self.label))
            .finish_non_exhaustive()
    }
}

/// Text of a NUL-padded field.
pub fn cstr_lossy(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// Checksum algorithms a header may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CsumAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl CsumAlg {
    fn from_field(f: &[u8; 32]) -> Option<Self> {
        match cstr_lossy(f).as_str() {
            "sha1" => Some(Self::Sha1),
            "sha256" => Some(Self::Sha256),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    /// Digest of the binary header (checksum zeroed) and the JSON area, zero-padded to 64 bytes.
    fn digest(self, bin: &[u8], json: &[u8]) -> [u8; CSUM_LEN] {
        fn run<D: Digest>(bin: &[u8], json: &[u8]) -> [u8; CSUM_LEN] {
            let mut h = D::new();
            h.update(&bin[..CSUM_AT]);
            h.update([0u8; CSUM_LEN]);
            h.update(&bin[CSUM_AT + CSUM_LEN..]);
            h.update(json);
            let d = h.finalize();
            let mut out = [0u8; CSUM_LEN];
            out[..d.len()].copy_from_slice(&d);
            out
        }
        match self {
            Self::Sha1 => run::<sha1::Sha1>(bin, json),
            Self::Sha256 => run::<sha2::Sha256>(bin, json),
            Self::Sha512 => run::<sha2::Sha512>(bin, json),
        }
    }
}

/// One copy as read from disk: its binary header and the JSON text (up to the first NUL).
#[derive(Debug)]
pub struct Copy {
    pub bin: BinHeader,
    pub json: serde_json::Value,
    /// Length of the JSON text in the area (cryptsetup's on-disk JSON end).
    pub json_len: usize,
}

/// Why one copy could not be used.
fn bad(copy: &'static str, reason: impl Into<String>) -> Luks2Error {
    Luks2Error::BadCopy {
        copy,
        reason: reason.into(),
    }
}

/// Reads and checks the copy at `offset` (`secondary` selects the magic and the offset rule).
pub fn read_copy(storage: &dyn Storage, offset: u64, secondary: bool) -> Result<Copy> {
    let which = if secondary { "secondary" } else { "primary" };
    let file_len = storage.len()?;
    let mut raw = vec![0u8; BIN_LEN];
    if offset
        .checked_add(BIN_LEN as u64)
        .is_none_or(|e| e > file_len)
    {
        return Err(bad(which, "lies past the end of the file"));
    }
    storage.read_at(&mut raw, offset)?;
    let magic = if secondary { MAGIC_2ND } else { MAGIC_1ST };
    if raw[0..6] != magic {
        return Err(bad(which, "bad magic"));
    }
    let version = u16::from_be_bytes([raw[6], raw[7]]);
    if version != 2 {
        return Err(bad(which, format!("version {version} is not 2")));
    }
    if be64(&raw, 256) != offset {
        return Err(bad(
            which,
            format!("header offset field {} is not {offset}", be64(&raw, 256)),
        ));
    }
    let hdr_size = be64(&raw, 8);
    if !(HDR_MIN..=HDR_MAX).contains(&hdr_size) {
        return Err(bad(which, format!("header size {hdr_size} out of range")));
    }
    if secondary && offset != hdr_size {
        return Err(bad(which, "offset does not match its header size"));
    }
    let bin = BinHeader {
        hdr_size,
        seqid: be64(&raw, 16),
        label: arr(&raw, 24),
        checksum_alg: arr(&raw, 72),
        salt: arr(&raw, 104),
        uuid: arr(&raw, 168),
        subsystem: arr(&raw, 208),
    };
    let alg = CsumAlg::from_field(&bin.checksum_alg).ok_or_else(|| {
        bad(
            which,
            format!(
                "checksum algorithm {:?} not supported",
                cstr_lossy(&bin.checksum_alg)
            ),
        )
    })?;
    // hdr_size ≤ HDR_MAX (4 MiB): the allocation is capped.
    let json_area_len = usize::try_from(hdr_size).map_err(|_| Luks2Error::Overflow)? - BIN_LEN;
    if offset.checked_add(hdr_size).is_none_or(|e| e > file_len) {
        return Err(bad(which, "JSON area lies past the end of the file"));
    }
    let mut area = vec![0u8; json_area_len];
    storage.read_at(&mut area, offset + BIN_LEN as u64)?;
    let want = alg.digest(&raw, &area);
    if raw[CSUM_AT..CSUM_AT + CSUM_LEN] != want[..] {
        return Err(bad(which, "checksum mismatch"));
    }
    let json_len = area
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| bad(which, "JSON fills the whole area (no terminating NUL)"))?;
    if area.first() != Some(&b'{') {
        return Err(bad(which, "JSON area does not start with '{'"));
    }
    if area[json_len..].iter().any(|&c| c != 0) {
        return Err(bad(which, "bytes after the JSON text are not zero"));
    }
    let json: serde_json::Value = serde_json::from_slice(&area[..json_len])
        .map_err(|e| bad(which, format!("JSON does not parse: {e}")))?;
    if !json.is_object() {
        return Err(bad(which, "JSON is not an object"));
    }
    Ok(Copy {
        bin,
        json,
        json_len,
    })
}

/// Encodes a binary header for the copy at `offset` with its checksum over `json_area`.
pub fn encode(bin: &BinHeader, offset: u64, secondary: bool, json_area: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; BIN_LEN];
    b[0..6].copy_from_slice(if secondary { &MAGIC_2ND } else { &MAGIC_1ST });
    b[6..8].copy_from_slice(&2u16.to_be_bytes());
    b[8..16].copy_from_slice(&bin.hdr_size.to_be_bytes());
    b[16..24].copy_from_slice(&bin.seqid.to_be_bytes());
    b[24..72].copy_from_slice(&bin.label);
    b[72..104].copy_from_slice(&bin.checksum_alg);
    b[104..168].copy_from_slice(&bin.salt);
    b[168..208].copy_from_slice(&bin.uuid);
    b[208..256].copy_from_slice(&bin.subsystem);
    b[256..264].copy_from_slice(&offset.to_be_bytes());
    // The last byte of each text field stays NUL, as cryptsetup writes them.
    for (start, len) in [(24, 48), (72, 32), (168, 40), (208, 48)] {
        b[start + len - 1] = 0;
    }
    let alg = CsumAlg::from_field(&bin.checksum_alg).unwrap_or(CsumAlg::Sha256);
    let sum = alg.digest(&b, json_area);
    b[CSUM_AT..CSUM_AT + CSUM_LEN].copy_from_slice(&sum);
    b
}

/// The JSON area for `json` in a header of `hdr_size` bytes: the compact text, NUL-padded.
/// The text must leave at least one NUL.
pub fn json_area(json: &serde_json::Value, hdr_size: u64) -> Result<Vec<u8>> {
    let text = serde_json::to_vec(json).map_err(|e| Luks2Error::Json(e.to_string()))?;
    let area_len = usize::try_from(hdr_size).map_err(|_| Luks2Error::Overflow)? - BIN_LEN;
    if text.len() >= area_len {
        return Err(Luks2Error::JsonTooBig {
            len: text.len(),
            area: area_len,
        });
    }
    let mut area = vec![0u8; area_len];
    area[..text.len()].copy_from_slice(&text);
    Ok(area)
}

/// Writes one copy (JSON area, then the binary header with seqid and checksum) and syncs.
/// cryptsetup writes the header without checksum first; we write the JSON area first and the
/// binary header (which carries the checksum) last, so a crash in between leaves this copy with
/// a bad checksum, never with a valid checksum over half-written JSON.
pub fn write_copy(
    storage: &dyn Storage,
    bin: &BinHeader,
    secondary: bool,
    area: &[u8],
) -> Result<()> {
    let offset = if secondary { bin.hdr_size } else { 0 };
    let header = encode(bin, offset, secondary, area);
    // Any prefix of these writes leaves this copy old-valid, invalid (checksum mismatch) or
    // new-valid.
    storage.write_at(area, offset + BIN_LEN as u64)?;
    storage.write_at(&header, offset)?;
    storage.sync()?;
    Ok(())
}
