//! The compressed-cluster decoders (deflate, zstd) with their one-cluster output cap.

use flate2::{Compress, Compression, FlushCompress, Status};

use super::Input;
use crate::qcow2::compressed;

/// Raw deflate of `data` (no zlib header, as qcow2 stores it), or `None` if it does not fit in
/// `max` bytes.
fn deflate(data: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut c = Compress::new(Compression::fast(), false);
    let mut out = vec![0u8; max];
    match c.compress(data, &mut out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => {
            let n = usize::try_from(c.total_out()).ok()?;
            out.truncate(n);
            Some(out)
        }
        _ => None,
    }
}

/// Input: mode byte (bit 0: zstd, else deflate; bit 7 with deflate: round trip of a plaintext
/// pattern), cluster_bits byte (9..=16: the cap works the same for QEMU's largest, 21, and
/// small clusters keep a run fast), then the compressed stream (or the pattern).
pub fn decompress(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let cluster_bits = 9 + u32::from(inp.u8() % 8);
    let cluster = 1usize << cluster_bits;
    let rest = inp.rest();
    let mut out = vec![0u8; cluster];
    if mode & 1 == 0 && mode & 0x80 != 0 && !rest.is_empty() {
        // Round trip: a cluster made of the pattern must come back bit for bit.
        let plain: Vec<u8> = rest.iter().copied().cycle().take(cluster).collect();
        // qcow2 stores a compressed cluster only if it is smaller than the cluster.
        let Some(z) = deflate(&plain, cluster - 1) else {
            return;
        };
        compressed::decompress(0, &z, &mut out, 0).expect("inflate of our own deflate stream");
        assert!(out == plain, "deflate round trip differs");
        return;
    }
    // The input is bounded as the L2 descriptor bounds it: at most a cluster plus a sector.
    let stream = &rest[..rest.len().min(cluster + 512)];
    let _ = compressed::decompress(mode & 1, stream, &mut out, 0);
}
