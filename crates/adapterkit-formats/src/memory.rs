//! In-memory tensors, optionally in front of another source: what the format readers use when a
//! format stores a tensor differently from the IR (MLX's transposed factors, GGUF's permuted
//! rows, a kohya Flux `qkv` split into parts) and the rest can be read from the file as it is.

use std::collections::HashMap;
use std::sync::Arc;

use adapterkit_core::convert::{decode_to_f32, encode_from_f32};
use adapterkit_core::{DType, TensorInfo, TensorSource};

/// Owned tensors by name, in front of an optional source for every other name.
#[derive(Default)]
pub struct MemorySource {
    infos: Vec<TensorInfo>,
    data: Vec<Vec<u8>>,
    by_name: HashMap<String, usize>,
    aliases: HashMap<String, (String, Vec<u64>)>,
    inner: Option<Arc<dyn TensorSource>>,
}

impl std::fmt::Debug for MemorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySource")
            .field("tensors", &self.infos.len())
            .field("aliases", &self.aliases.len())
            .finish_non_exhaustive()
    }
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty source in front of `inner`.
    pub fn over(inner: Arc<dyn TensorSource>) -> Self {
        MemorySource {
            inner: Some(inner),
            ..Self::default()
        }
    }

    /// Add (or replace) tensor `name` from raw bytes.
    pub fn insert(&mut self, name: &str, dtype: DType, shape: Vec<u64>, bytes: Vec<u8>) {
        let info = TensorInfo {
            name: name.to_string(),
            dtype,
            shape,
            offset: 0,
            len: bytes.len() as u64,
        };
        if let Some(&i) = self.by_name.get(name) {
            self.infos[i] = info;
            self.data[i] = bytes;
        } else {
            self.by_name.insert(name.to_string(), self.infos.len());
            self.infos.push(info);
            self.data.push(bytes);
        }
    }

    /// Add tensor `name` from f32 values, stored as `dtype`.
    pub fn insert_f32(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Vec<u64>,
        values: &[f32],
    ) -> adapterkit_core::Result<()> {
        let n =
            dtype
                .byte_len(values.len() as u64)
                .ok_or(adapterkit_core::Error::BufferLength {
                    dtype,
                    expected: 0,
                    found: values.len(),
                })?;
        let mut bytes = vec![0u8; n as usize];
        encode_from_f32(dtype, values, &mut bytes)?;
        self.insert(name, dtype, shape, bytes);
        Ok(())
    }

    /// Make `name` read the bytes of `target` (in this source or the inner one) with `shape`
    /// (same number of elements): a reshape or rename without a copy.
    pub fn alias(&mut self, name: &str, target: &str, shape: Vec<u64>) {
        self.aliases
            .insert(name.to_string(), (target.to_string(), shape.clone()));
        if let Some(info) = self.lookup(target).cloned() {
            let info = TensorInfo {
                name: name.to_string(),
                shape,
                ..info
            };
            self.by_name.insert(name.to_string(), self.infos.len());
            self.infos.push(info);
            self.data.push(Vec::new());
        }
    }

    fn lookup(&self, name: &str) -> Option<&TensorInfo> {
        match self.by_name.get(name) {
            Some(&i) => Some(&self.infos[i]),
            None => self.inner.as_ref()?.info(name),
        }
    }

    /// Names of the tensors held here (not the inner source's).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.infos.iter().map(|i| i.name.as_str())
    }
}

impl TensorSource for MemorySource {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.lookup(name)
    }

    fn read_bytes(&self, name: &str, offset: u64, buf: &mut [u8]) -> adapterkit_core::Result<()> {
        if let Some((target, _)) = self.aliases.get(name) {
            return self.read_bytes(target, offset, buf);
        }
        match self.by_name.get(name) {
            Some(&i) => {
                let d = &self.data[i];
                let start = offset as usize;
                let end = start
                    .checked_add(buf.len())
                    .filter(|&e| e <= d.len())
                    .ok_or(adapterkit_core::Error::BufferLength {
                        dtype: self.infos[i].dtype,
                        expected: d.len().saturating_sub(start),
                        found: buf.len(),
                    })?;
                buf.copy_from_slice(&d[start..end]);
                Ok(())
            }
            None => match &self.inner {
                Some(inner) => inner.read_bytes(name, offset, buf),
                None => Err(adapterkit_core::Error::TensorNotFound { name: name.into() }),
            },
        }
    }
}

/// The whole of tensor `name`: its description and raw bytes.
pub fn raw_tensor(
    src: &dyn TensorSource,
    name: &str,
) -> adapterkit_core::Result<(TensorInfo, Vec<u8>)> {
    let info = src
        .info(name)
        .ok_or_else(|| adapterkit_core::Error::TensorNotFound { name: name.into() })?
        .clone();
    let mut bytes = vec![0u8; info.len as usize];
    src.read_bytes(name, 0, &mut bytes)?;
    Ok((info, bytes))
}

/// A row-major `rows × cols` matrix transposed.
pub fn transpose_f32(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// Read a 0-dimensional (or one-element) tensor of any numeric dtype, integers included (kohya
/// stores `alpha` as F32, F16, BF16 or I64).
pub fn scalar(src: &dyn TensorSource, name: &str) -> adapterkit_core::Result<f64> {
    let info = src
        .info(name)
        .ok_or_else(|| adapterkit_core::Error::TensorNotFound { name: name.into() })?
        .clone();
    let mut b = vec![0u8; info.len as usize];
    src.read_bytes(name, 0, &mut b)?;
    if info.numel() != 1 {
        return Err(adapterkit_core::Error::BufferLength {
            dtype: info.dtype,
            expected: 1,
            found: info.numel() as usize,
        });
    }
    Ok(match info.dtype {
        DType::I64 => i64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f64,
        DType::U64 => u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f64,
        DType::I32 => i32::from_le_bytes(b[..4].try_into().expect("4 bytes")).into(),
        DType::U32 => u32::from_le_bytes(b[..4].try_into().expect("4 bytes")).into(),
        DType::I16 => i16::from_le_bytes(b[..2].try_into().expect("2 bytes")).into(),
        DType::U16 => u16::from_le_bytes(b[..2].try_into().expect("2 bytes")).into(),
        DType::I8 => (b[0] as i8).into(),
        DType::U8 | DType::Bool => b[0].into(),
        DType::F64 => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        dt => {
            let mut v = [0f32];
            decode_to_f32(dt, &b, &mut v)?;
            v[0].into()
        }
    })
}
