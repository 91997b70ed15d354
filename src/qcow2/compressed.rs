//! Compressed clusters (read only): raw deflate (compression_type 0) or zstd (1).
//!
//! The output is bounded to exactly one cluster: a descriptor that inflates to more is cut off
//! there (as QEMU does), one that inflates to less is an error. The input is bounded by the
//! descriptor, itself at most one cluster plus a sector.

use flate2::{Decompress, FlushDecompress, Status};

use super::Error;

/// Decompresses `input` into `out` (one cluster).
pub fn decompress(
    compression_type: u8,
    input: &[u8],
    out: &mut [u8],
    at: u64,
) -> Result<(), Error> {
    match compression_type {
        0 => inflate(input, out, at),
        1 => unzstd(input, out, at),
        t => Err(Error::CompressionType(t)),
    }
}

fn inflate(input: &[u8], out: &mut [u8], at: u64) -> Result<(), Error> {
    let mut d = Decompress::new(false);
    let mut inp = 0usize;
    let mut outp = 0usize;
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let st = d
            .decompress(&input[inp..], &mut out[outp..], FlushDecompress::Finish)
            .map_err(|_| Error::Compressed { offset: at })?;
        inp += usize::try_from(d.total_in() - before_in).map_err(|_| Error::TooLarge)?;
        outp += usize::try_from(d.total_out() - before_out).map_err(|_| Error::TooLarge)?;
        if outp == out.len() {
            return Ok(());
        }
        match st {
            Status::StreamEnd => return Err(Error::Compressed { offset: at }),
            _ if d.total_in() == before_in && d.total_out() == before_out => {
                return Err(Error::Compressed { offset: at })
            }
            _ => {}
        }
    }
}

/// Smallest window a zstd frame can declare (1 KiB).
const MIN_ZSTD_WINDOW: u64 = 1 << 10;

fn unzstd(input: &[u8], out: &mut [u8], at: u64) -> Result<(), Error> {
    use std::io::Read;
    // The decoder reserves the window the frame declares (up to 128 MiB): a cluster never needs
    // more than its own size (QEMU's frames are single-segment, window = content size).
    let max_window = u64::try_from(out.len())
        .map_err(|_| Error::TooLarge)?
        .max(MIN_ZSTD_WINDOW);
    let mut dec = ruzstd::decoding::StreamingDecoder::new_with_max_window_size(input, max_window)
        .map_err(|_| Error::Compressed { offset: at })?;
    let mut outp = 0;
    while outp < out.len() {
        let n = dec
            .read(&mut out[outp..])
            .map_err(|_| Error::Compressed { offset: at })?;
        if n == 0 {
            return Err(Error::Compressed { offset: at });
        }
        outp += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = vec![0u8; data.len() + 1024];
        c.compress(data, &mut out, FlushCompress::Finish)
            .expect("compress");
        out.truncate(usize::try_from(c.total_out()).expect("size"));
        out
    }

    #[test]
    fn inflates_one_cluster() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let z = deflate(&data);
        let mut out = vec![0u8; 4096];
        decompress(0, &z, &mut out, 0).expect("inflate");
        assert_eq!(out, data);
    }

    #[test]
    fn bomb_is_cut_at_one_cluster() {
        let data = vec![0u8; 16 << 20];
        let z = deflate(&data);
        let mut out = vec![1u8; 65536];
        decompress(0, &z, &mut out, 0).expect("inflate");
        assert!(out.iter().all(|&b| b == 0));
    }

    /// A zstd frame header (magic, descriptor without single-segment flag, window descriptor)
    /// declaring a window of `1 << log` bytes, then one raw last block of `data`.
    fn zstd_frame(log: u8, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (log - 10) << 3];
        let hdr = (u32::try_from(data.len()).expect("len") << 3) | 1; // raw block, last
        f.extend_from_slice(&hdr.to_le_bytes()[..3]);
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn zstd_window_is_bounded_by_the_cluster() {
        let data = vec![7u8; 4096];
        let mut out = vec![0u8; 4096];
        decompress(1, &zstd_frame(12, &data), &mut out, 0).expect("window = cluster");
        assert_eq!(out, data);
        // 128 MiB window for a 4 KiB cluster: refused before anything is reserved.
        assert!(matches!(
            decompress(1, &zstd_frame(27, &data), &mut out, 9),
            Err(Error::Compressed { offset: 9 })
        ));
    }

    #[test]
    fn short_stream_is_an_error() {
        let z = deflate(&[5u8; 100]);
        let mut out = vec![0u8; 4096];
        assert!(matches!(
            decompress(0, &z, &mut out, 7),
            Err(Error::Compressed { offset: 7 })
        ));
        assert!(decompress(0, &[0xff; 10], &mut out, 0).is_err());
    }
}
