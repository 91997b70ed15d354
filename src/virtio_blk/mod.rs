//! virtio-blk request parsing and execution against a [`crate::image::BlockImage`].
//!
//! Nothing here knows about vhost-user: the `vhost_user` layer hands in descriptor chains and guest
//! memory, and gets back the number of bytes written into the chain.
//!
//! - [`request`] turns a descriptor chain into a validated [`request::Request`] (parse, don't
//!   validate): the status byte is split off first, every address is resolved to host memory once,
//!   every sector range is checked against the capacity.
//! - [`exec`] executes a parsed request against the image and maps every error to exactly one
//!   `VIRTIO_BLK_S_*` status in one exhaustive match.
//! - [`config`] is the device configuration space (`struct virtio_blk_config`).
//! - [`device`] is the device model: offered features, configuration, limits, write cache and
//!   capacity (which live resize changes); [`stats`] its per-queue counters.

pub mod config;
pub mod device;
pub mod exec;
pub mod request;
pub mod stats;

/// The unit of virtio-blk sector numbers, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// `VIRTIO_BLK_S_OK`.
pub const STATUS_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const STATUS_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const STATUS_UNSUPP: u8 = 2;

const _: () = {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
    assert!(STATUS_OK as u32 == VIRTIO_BLK_S_OK);
    assert!(STATUS_IOERR as u32 == VIRTIO_BLK_S_IOERR);
    assert!(STATUS_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP);
};
