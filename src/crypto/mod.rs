//! Cryptography: the sector cipher engine, LUKS1 and legacy qcow2 AES.
//!
//! Nothing here knows about virtio or qcow2; callers pass byte buffers and sector numbers.
//! The sector size for every disk-encryption operation is 512 bytes.

pub mod luks;
pub mod qcow_aes;
pub mod secret;
pub mod sector;

/// Size of an encryption sector in bytes, whatever the image's cluster or block size.
pub const SECTOR_SIZE: usize = 512;
