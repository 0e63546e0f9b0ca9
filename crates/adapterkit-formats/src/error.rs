//! The formats crate's typed error. Every variant names the file, and where it applies the tensor,
//! what was expected and what was found.

use std::path::PathBuf;

/// Errors raised while reading or writing files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A path that does not exist or is not what is expected there.
    #[error("{path}: {message}")]
    NotFound {
        /// The path looked for.
        path: PathBuf,
        /// What was missing.
        message: String,
    },
    /// The file is shorter than the 8-byte safetensors length prefix.
    #[error(
        "{path}: not a safetensors file: {len} bytes is shorter than the 8-byte header length"
    )]
    FileTooSmall {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The declared header length exceeds the cap.
    #[error("{path}: safetensors header of {size} bytes exceeds the {cap}-byte cap")]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// Declared header size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// The declared header length runs past the end of the file.
    #[error(
        "{path}: safetensors header of {size} bytes runs past the end of the {file_len}-byte file"
    )]
    HeaderOutOfBounds {
        /// The file.
        path: PathBuf,
        /// Declared header size.
        size: u64,
        /// File length.
        file_len: u64,
    },
    /// The header is not valid UTF-8 JSON of the expected shape.
    #[error("{path}: invalid safetensors header: {message}")]
    InvalidHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor entry in the header is malformed.
    #[error("{path}: tensor {tensor:?}: {message}")]
    InvalidTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor name appears twice.
    #[error("{path}: tensor {tensor:?} appears more than once")]
    DuplicateTensor {
        /// The file (or index).
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor's byte range disagrees with its dtype and shape.
    #[error("{}: tensor {:?} ({} {:?}) needs {} bytes but data_offsets [{}, {}] hold {}", .0.path.display(), .0.tensor, .0.dtype, .0.shape, .0.expected, .0.begin, .0.end, .0.found)]
    TensorSizeMismatch(Box<SizeMismatch>),
    /// The tensors' byte ranges do not tile the data section exactly.
    #[error("{path}: data section not covered exactly: {message}")]
    DataLayout {
        /// The file.
        path: PathBuf,
        /// What is wrong (hole, overlap, trailing bytes), with offsets.
        message: String,
    },
    /// A sharded checkpoint's index disagrees with its shards.
    #[error("{path}: {message}")]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A pickled PyTorch file, which adapterkit never unpickles.
    #[error("{path}: pickled PyTorch weights are not loaded (unpickling can run arbitrary code); convert it to safetensors first, e.g. load it in PEFT and call save_pretrained(..., safe_serialization=True)")]
    PickleRefused {
        /// The `.bin`/`.pt` file.
        path: PathBuf,
    },
    /// `adapter_config.json` is invalid.
    #[error("{path}: invalid adapter config: {message}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `peft_type` adapterkit does not know at all.
    #[error("{path}: unknown peft_type {peft_type:?}; known types: {known}")]
    UnknownPeftType {
        /// The config file.
        path: PathBuf,
        /// The type found.
        peft_type: String,
        /// The known types, comma-separated.
        known: String,
    },
    /// A PEFT method adapterkit knows but does not read yet.
    #[error("{path}: peft_type {peft_type} cannot be merged: {reason}")]
    UnsupportedPeftType {
        /// The config file.
        path: PathBuf,
        /// The type found.
        peft_type: String,
        /// Why, or what would be needed.
        reason: String,
    },
    /// One or more problems found while validating an adapter's tensors against its config.
    #[error("{path}: {} problem(s) in adapter:\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    InvalidAdapter {
        /// The adapter.
        path: PathBuf,
        /// Each problem, naming the tensor and expected vs found.
        problems: Vec<String>,
    },
    /// A merge recipe that cannot be run as written.
    #[error("recipe {path}: {message}")]
    Recipe {
        /// The recipe file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A GGUF file that breaks the format's rules (or adapterkit's caps on it).
    #[error("{path}: invalid GGUF: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key or tensor.
        message: String,
    },
    /// An adapter in one of the ecosystem formats (kohya, LyCORIS, diffusers, GGUF LoRA, MLX)
    /// that cannot be read or written as asked.
    #[error("{path}: {format}: {message}")]
    Format {
        /// The file or directory.
        path: PathBuf,
        /// The format involved ("kohya", "mlx", …).
        format: &'static str,
        /// What is wrong, naming the tensor, key or module.
        message: String,
    },
    /// A tensor could not be converted.
    #[error(transparent)]
    Core(#[from] adapterkit_core::Error),
}

/// The details of [`Error::TensorSizeMismatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeMismatch {
    /// The file.
    pub path: PathBuf,
    /// The tensor.
    pub tensor: String,
    /// Its dtype name.
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Bytes needed.
    pub expected: u64,
    /// Bytes given.
    pub found: u64,
    /// Start offset.
    pub begin: u64,
    /// End offset.
    pub end: u64,
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for the formats crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
