//! Tensor descriptions and the [`TensorSource`] seam.

use crate::convert;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// What a file says about one tensor: name, dtype, shape and where its bytes lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name in its file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (row-major, outermost first). Empty for a scalar.
    pub shape: Vec<u64>,
    /// Absolute byte offset of the first element in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar). Callers validated the product when parsing.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The shape as (rows, columns): the first dimension against the product of the rest.
    /// A scalar or 1-D tensor is one row.
    pub fn rows_cols(&self) -> (u64, u64) {
        match self.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [first, rest @ ..] => (*first, rest.iter().product()),
        }
    }
}

/// Anything that can hand out tensor bytes by name: a safetensors file, a sharded checkpoint, a
/// GGUF file, a GPU buffer. Two required methods; everything else is provided.
pub trait TensorSource: Send + Sync {
    /// The description of tensor `name`, if present.
    fn info(&self, name: &str) -> Option<&TensorInfo>;

    /// Fill `buf` with `buf.len()` bytes of tensor `name` starting `offset` bytes into it.
    fn read_bytes(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Read a whole floating-point tensor and convert it to f32.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info(name).ok_or_else(|| Error::TensorNotFound {
            name: name.to_string(),
        })?;
        let len = usize::try_from(info.len).map_err(|_| Error::BufferLength {
            dtype: info.dtype,
            expected: usize::MAX,
            found: 0,
        })?;
        let mut bytes = vec![0u8; len];
        self.read_bytes(name, 0, &mut bytes)?;
        let mut out = vec![0f32; info.numel() as usize];
        convert::decode_to_f32(info.dtype, &bytes, &mut out)?;
        Ok(out)
    }
}
