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
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
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

/// Opens a file read-only through the page cache.
pub fn open_read_only(path: &std::path::Path) -> Result<crate::storage::FileStorage, ToolError> {
    Ok(crate::storage::FileStorage::open(
        path,
        crate::storage::OpenFlags {
            read_only: true,
            direct: false,
        },
    )?)
}

/// Opens an image with `opts` and takes QEMU's locks on its files as `opts.locking` says (held
/// until the returned [`crate::lock::LockSet`] is dropped); if it turns out to be encrypted,
/// reads the passphrase from `key` (file, fd or prompt) once, keeps it in `secret` for the next
/// image, and opens it again.
pub fn open_image(
    path: &std::path::Path,
    opts: &crate::image::OpenOptions,
    key: &super::keyslot::KeyArgs,
    secret: &mut Option<crate::crypto::secret::Passphrase>,
) -> Result<(Box<dyn crate::image::BlockImage>, crate::lock::LockSet), ToolError> {
    use crate::image::{open_locked, ImageError};
    match open_locked(path, opts, secret.as_ref()) {
        Err(ImageError::NeedKey(_)) | Err(ImageError::Qcow2(crate::qcow2::Error::NeedKey(_)))
            if secret.is_none() =>
        {
            let p = key
                .source()
                .read(&format!("Passphrase for {}: ", path.display()), false)
                .map_err(|_| ToolError::BadArgument("cannot read the passphrase"))?;
            *secret = Some(p);
            Ok(open_locked(path, opts, secret.as_ref())?)
        }
        r => Ok(r?),
    }
}

/// The locking of a read-only tool: QEMU's shared read lock, or none of it with `-U`.
pub fn read_locking(force_share: bool) -> crate::image::Locking {
    if force_share {
        crate::image::Locking::ForceShare
    } else {
        crate::image::Locking::On
    }
}

/// `lseek` with `whence`; `None` for ENXIO (no data / no hole past `off`).
pub fn seek(f: &std::fs::File, off: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let o =
        libc::off_t::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a valid open descriptor; it only moves the file position.
    let r = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(f), o, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(u64::try_from(r).unwrap_or(0)))
}

/// Output format of `info` and `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// Parses `16M`, `1G`, `512`, `64k`, `1.5G`, `1024b` (binary multiples, as qemu-img; a
/// fractional part needs a suffix and is truncated to whole bytes, as QEMU's `qemu_strtosz`).
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
                'E' => 60,
                _ => return Err(bad()),
            };
            (&t[..i], 1u64 << shift)
        }
        _ => (t, 1),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) if mul > 1 && !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => (i, f),
        Some(_) => return Err(bad()),
        None => (num, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = int.parse().map_err(|_| bad())?;
    let whole = n.checked_mul(mul).ok_or_else(bad)?;
    // frac / 10^len × mul, truncated, in u128 so no step overflows (at most 19 digits kept).
    let digits = &frac[..frac.len().min(19)];
    let part = if digits.is_empty() {
        0
    } else {
        let f: u128 = digits.parse().map_err(|_| bad())?;
        let scale = 10u128.pow(u32::try_from(digits.len()).map_err(|_| bad())?);
        u64::try_from(f * u128::from(mul) / scale).map_err(|_| bad())?
    };
    whole.checked_add(part).ok_or_else(bad)
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
        // Decimal sizes as qemu-img: a fraction needs a suffix and is truncated to bytes.
        assert_eq!(parse_size("1.5G").expect("n"), 1_610_612_736);
        assert_eq!(parse_size("1.25M").expect("n"), 1_310_720);
        assert_eq!(parse_size("0.1M").expect("n"), 104_857);
        assert_eq!(parse_size("1024b").expect("n"), 1024);
        assert_eq!(parse_size("1E").expect("n"), 1 << 60);
        for bad in ["1.5", "1e3", ".5M", "1.M", "-1", "1.5.5M", "16E"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
