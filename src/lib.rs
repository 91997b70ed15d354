//! vhost-user-qcow2: a vhost-user-blk backend serving raw, qcow2 and LUKS-encrypted images.
//!
//! Layers point one way: `cli → vhost_user → virtio_blk → image → {qcow2, crypto} → storage`.

pub mod cli;
pub mod crypto;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod image;
pub mod lock;
pub mod qcow2;
pub mod rbd;
pub mod sandbox;
pub mod storage;
pub mod vhost_user;
pub mod virtio_blk;
