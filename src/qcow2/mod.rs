//! qcow2 images (QEMU docs/interop/qcow2.rst).
