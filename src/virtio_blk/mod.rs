//! virtio-blk request parsing and execution against a [`crate::image::BlockImage`].
