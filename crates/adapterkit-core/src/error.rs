//! The core crate's typed error.

use crate::dtype::DType;

/// Errors raised by the data model itself (dtype names, conversions, shapes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A dtype name that safetensors does not define.
    #[error("unknown dtype {0:?}")]
    UnknownDType(String),
    /// A conversion adapterkit does not implement (e.g. rounding to an 8-bit float).
    #[error("cannot {op} dtype {dtype}")]
    UnsupportedConversion {
        /// The dtype involved.
        dtype: DType,
        /// What was attempted ("decode to f32", "encode from f32").
        op: &'static str,
    },
    /// A buffer whose length does not match the element count.
    #[error("buffer of {found} bytes does not hold {expected} bytes of {dtype}")]
    BufferLength {
        /// Element type of the buffer.
        dtype: DType,
        /// Bytes expected.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// A tensor the caller asked for is not in the source.
    #[error("tensor {name:?} not found")]
    TensorNotFound {
        /// The tensor name.
        name: String,
    },
    /// An I/O error while reading tensor data.
    #[error("reading {path}: {source}")]
    Io {
        /// The file being read.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for the core crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
