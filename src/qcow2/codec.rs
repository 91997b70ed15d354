//! The one big-endian table codec: L1, L2, refcount and bitmap tables are arrays of big-endian
//! 64-bit words on disk and `Vec<u64>` in memory.

use super::{Error, Result};
use crate::storage::Storage;

/// Decodes big-endian 64-bit words (a trailing partial word is ignored).
pub fn decode(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Encodes words big-endian.
pub fn encode(words: &[u64]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(words.len() * 8);
    for w in words {
        raw.extend_from_slice(&w.to_be_bytes());
    }
    raw
}

/// Reads a table of `entries` words at `offset` (the caller has bounded `entries`).
pub fn read(storage: &dyn Storage, offset: u64, entries: u64) -> Result<Vec<u64>> {
    let bytes = entries.checked_mul(8).ok_or(Error::TooLarge)?;
    let mut raw = vec![0u8; usize::try_from(bytes).map_err(|_| Error::TooLarge)?];
    storage.read_at(&mut raw, offset)?;
    Ok(decode(&raw))
}

/// Writes a table of words at `offset`.
pub fn write(storage: &dyn Storage, offset: u64, words: &[u64]) -> Result<()> {
    storage.write_at(&encode(words), offset)?;
    Ok(())
}

/// Big-endian u16/u32/u64 at a byte offset of a small on-disk record (the caller has checked
/// the record's length).
pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// See [`be16`].
pub fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

/// See [`be16`].
pub fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    #[test]
    fn encode_then_decode_round_trips() {
        let w = [0u64, 1, 0x0102_0304_0506_0708, u64::MAX];
        let raw = super::encode(&w);
        assert_eq!(&raw[16..24], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(super::decode(&raw), w);
    }
}
