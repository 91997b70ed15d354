//! Shared pieces of the image tools (create / info / check).

use std::io;

use thiserror::Error;

use crate::image::ImageError;
use crate::qcow2;
use crate::storage::StorageError;

/// Errors of the image tools.
#[derive(Debug, Error)]
pub enum ToolError {
    #[error("invalid size {0:?} (use a number with an optional K, M, G, T suffix)")]
    BadSize(String),
    #[error("{0}")]
    BadArgument(&'static str),
    #[error("image")]
    Image(#[from] ImageError),
    #[error("qcow2")]
    Qcow2(#[from] qcow2::Error),
    #[error("storage")]
    Storage(#[from] StorageError),
    #[error("output")]
    Io(#[from] io::Error),
    #[error("json output")]
    Json(#[from] serde_json::Error),
    #[error("encryption options")]
    Encrypt(#[from] super::encrypt::EncryptArgsError),
}

/// Output format of `info` and `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// Parses `16M`, `1G`, `512`, `64k` (binary multiples, as qemu-img).
pub fn parse_size(s: &str) -> Result<u64, ToolError> {
    let bad = || ToolError::BadSize(s.to_string());
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(bad()),
            };
            (&t[..i], 1u64 << shift)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mul).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("512").expect("n"), 512);
        assert_eq!(parse_size("64k").expect("n"), 65536);
        assert_eq!(parse_size("16M").expect("n"), 16 << 20);
        assert_eq!(parse_size("2G").expect("n"), 2 << 30);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
