//! Errors of the sector cipher engine.

use super::{CipherSpec, EnginePath};

/// Everything that can go wrong when building or using a [`super::SectorCipher`].
#[derive(Debug, thiserror::Error)]
pub enum SectorCipherError {
    /// The cipher algorithm name (e.g. from a LUKS header) is not one we implement.
    #[error("unsupported cipher {name:?}")]
    UnsupportedCipher {
        /// The name as given.
        name: String,
    },
    /// The cipher mode / IV generator string is not one we implement.
    #[error("unsupported cipher mode {mode:?}")]
    UnsupportedMode {
        /// The mode string as given.
        mode: String,
    },
    /// The mode and IV generator do not go together (e.g. CBC without an IV).
    #[error("invalid mode and IV generator combination {spec:?}")]
    InvalidSpec {
        /// The offending spec.
        spec: CipherSpec,
    },
    /// The key length does not match the cipher spec.
    #[error("key is {len} bytes, {expected} expected")]
    KeyLength {
        /// Length given.
        len: usize,
        /// Length required by the spec.
        expected: usize,
    },
    /// A LUKS master key length that no AES variant of this mode uses.
    #[error("no AES variant of this mode has a {len}-byte key")]
    NoAlgForKeyLength {
        /// Length given.
        len: usize,
    },
    /// The buffer is not a whole number of 512-byte sectors.
    #[error("buffer of {len} bytes is not a multiple of 512")]
    UnalignedLength {
        /// Buffer length.
        len: usize,
    },
    /// Source and destination of an out-of-place operation differ in length.
    #[error("source is {src} bytes but destination is {dst} bytes")]
    LengthMismatch {
        /// Source length.
        src: usize,
        /// Destination length.
        dst: usize,
    },
    /// The requested engine path cannot run on this CPU.
    #[error("engine path {path:?} is not available on this CPU")]
    PathUnavailable {
        /// The requested path.
        path: EnginePath,
    },
    /// `VUQ_CRYPTO_PATH` holds something else than auto, vaes512, portable or soft.
    #[error("VUQ_CRYPTO_PATH={value:?} is not one of auto, vaes512, portable, soft")]
    BadPathVariable {
        /// The variable's value.
        value: String,
    },
}
