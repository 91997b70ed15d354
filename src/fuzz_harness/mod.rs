//! Fuzz target bodies (not part of the supported API).
//!
//! Each `pub fn` here is one cargo-fuzz target in `fuzz/fuzz_targets/`: the fuzz crate only
//! calls it. Keeping the bodies in the library lets the normal test suite replay the committed
//! corpora (`fuzz/corpus/<target>/*`) without a fuzzing toolchain; see `docs/fuzzing.md`.
//!
//! A target returns normally on any error the library reports; it panics only when an
//! invariant the library promises is broken (a read after a successful write returns other
//! bytes, for example). Hangs, panics, aborts and out-of-memory are what the fuzzer looks for.

#![deny(unsafe_code)]

mod chain;
mod decompress;
mod luks;
mod qcow2;
mod storage;

#[cfg(test)]
mod tests;

pub use chain::virtio_blk_chain;
pub use decompress::decompress;
pub use luks::{luks1_seed, luks1_unlock, LUKS_FUZZ_PASSPHRASE, LUKS_MAX_ITERATIONS};
pub use qcow2::{qcow2_check, qcow2_ops, OPS_TAIL};

/// A fuzz target body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by the name of their corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("qcow2_ops", qcow2_ops),
    ("qcow2_check", qcow2_check),
    ("luks1_unlock", luks1_unlock),
    ("virtio_blk_chain", virtio_blk_chain),
    ("decompress", decompress),
];

/// Reads little-endian integers from fuzz input; reads past the end give zeroes, so every
/// input is valid.
pub(crate) struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// The rest of the input.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
}
