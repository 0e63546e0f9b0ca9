//! The ops crate's typed error.

use std::fmt;
use std::path::PathBuf;

/// One problem found while validating a merge, naming the file, the tensor and what was expected
/// against what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in (adapter or base).
    pub file: PathBuf,
    /// The tensor (or module) concerned.
    pub tensor: String,
    /// What is wrong, with expected vs found.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.tensor,
            self.message
        )
    }
}

/// Errors raised by planning and executing merges.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Validation found problems; nothing was written.
    #[error("{} problem(s) found, nothing written:\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Validation(Vec<Problem>),
    /// A merged tensor holds NaN or infinity.
    #[error("merged tensor {tensor:?} has {count} non-finite value(s) (first at element {first}); refusing to write it (pass --allow-nonfinite to write it anyway)")]
    NonFinite {
        /// The tensor.
        tensor: String,
        /// How many values are NaN or infinite.
        count: usize,
        /// Index of the first one.
        first: usize,
    },
    /// An unmerge whose inverse does not exist or is numerically meaningless.
    #[error("cannot unmerge {tensor:?}: {message}")]
    IllConditioned {
        /// The tensor.
        tensor: String,
        /// Why.
        message: String,
    },
    /// An update to factorise holds NaN or infinity.
    #[error("{what}: the update has {count} non-finite value(s) (NaN or infinity); it cannot be factorised")]
    NonFiniteUpdate {
        /// The module or tensor.
        what: String,
        /// How many values are NaN or infinite.
        count: usize,
    },
    /// A decomposition failed.
    #[error("{what}: {message}")]
    Decomposition {
        /// The module or tensor.
        what: String,
        /// What went wrong.
        message: String,
    },
    /// Invalid options (weights count, output path).
    #[error("{0}")]
    Options(String),
    /// The output location is not acceptable.
    #[error("{path}: {message}")]
    Output {
        /// The output path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file-format error.
    #[error(transparent)]
    Format(#[from] adapterkit_formats::Error),
    /// A data-model error (conversion, read).
    #[error(transparent)]
    Core(#[from] adapterkit_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for the ops crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
