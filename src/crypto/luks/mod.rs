//! LUKS1, bit-compatible with QEMU (crypto/block-luks.c) and cryptsetup's `--type luks1`.
//!
//! * [`header`]: the 592-byte header and QEMU's sanity checks.
//! * [`af`]: the anti-forensic splitter.
//! * [`pbkdf`]: PBKDF2 with sha1/sha256/sha512 and iteration calibration.
//!
//! The LUKS "area" is where the header and key material live: the start of a raw LUKS file, or
//! the region the qcow2 full-disk-encryption header extension points at. Key-material offsets
//! are relative to the start of the area.

pub mod af;
pub mod header;
pub mod pbkdf;

pub use header::{HeaderError, LuksHeader};
pub use pbkdf::{LuksHash, PbkdfError};
