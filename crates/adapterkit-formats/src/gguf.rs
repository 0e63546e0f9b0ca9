//! GGUF v3 (and v2): a complete reader and a layout-first writer (spec: `formats/gguf.md`).
//!
//! The reader validates everything llama.cpp's `gguf_init_from_file` validates — magic, version,
//! every metadata type, string and array lengths against the bytes left in the file, at most four
//! dimensions, row lengths that are whole blocks, `general.alignment`, and tensors packed in order
//! at aligned offsets inside the file — and refuses duplicate keys and tensor names. Tensor data
//! is read with positional reads; F32/F16/BF16 and the integer types are visible through
//! [`TensorSource`], the block-quantized ones through [`GgufFile::tensor`] and
//! [`GgufFile::read_raw`].
//!
//! The writer computes the whole header and every offset before any data is written, into a
//! temporary file renamed into place (the same [`PendingFile`] the safetensors writer uses).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use adapterkit_core::{DType, TensorInfo, TensorSource};

use crate::error::{Error, Result};
use crate::safetensors::{Layout, PendingFile};

/// The four magic bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays the reader accepts.
const MAX_ARRAY_DEPTH: usize = 8;

/// A metadata value's type tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// The tag's number in the file.
    pub fn id(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::String => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    /// The tag for number `id`.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// Bytes of one scalar of this type (strings and arrays: their smallest encoding).
    fn min_size(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array: its element type and elements (all of that type).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value as a float, for any numeric type.
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::F32(v) => v.into(),
            Value::U64(v) => v as f64,
            Value::I64(v) => v as f64,
            Value::F64(v) => v,
            _ => return None,
        })
    }

    /// The value as an unsigned integer, for any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The string, for a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A JSON rendering (for `inspect --json`).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Bool(b) => J::Bool(*b),
            Value::String(s) => J::String(s.clone()),
            Value::Array(_, items) => J::Array(items.iter().map(Value::to_json).collect()),
            Value::F32(v) => serde_json::Number::from_f64(f64::from(*v)).map_or(J::Null, J::Number),
            Value::F64(v) => serde_json::Number::from_f64(*v).map_or(J::Null, J::Number),
            Value::U64(v) => J::from(*v),
            Value::I64(v) => J::from(*v),
            other => J::from(other.as_f64().unwrap_or(0.0) as i64),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(t, items) if items.len() > 8 => {
                write!(f, "[{} × {:?}]", items.len(), t)
            }
            Value::Array(_, items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Value::Bool(b) => write!(f, "{b}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            other => write!(f, "{}", other.as_f64().unwrap_or(0.0)),
        }
    }
}

/// A ggml tensor type: its id, block size and bytes per block, as ggml defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs, non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Q2_0,
}

/// `(type, id, name, block size, bytes per block)` for every type ggml can store in a file.
const GGML_TYPES: &[(GgmlType, u32, &str, u64, u64)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
    (GgmlType::NVFP4, 40, "NVFP4", 64, 36),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 18),
    (GgmlType::Q2_0, 42, "Q2_0", 64, 18),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, u64, u64) {
        GGML_TYPES
            .iter()
            .find(|r| r.0 == self)
            .expect("every type is in the table")
    }

    /// The type with id `id`.
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// The type named `name` (`"Q8_0"`, case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        GGML_TYPES
            .iter()
            .find(|r| r.2.eq_ignore_ascii_case(name))
            .map(|r| r.0)
    }

    /// The id stored in the file.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// ggml's name (`"Q4_K"`).
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        self.row().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.row().4
    }

    /// Bytes of `n` elements (`None` when `n` is not whole blocks or overflows).
    pub fn byte_len(self, n: u64) -> Option<u64> {
        if n % self.block_size() != 0 {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }

    /// The plain element type this ggml type stores, for the unquantized types.
    pub fn dtype(self) -> Option<DType> {
        Some(match self {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            GgmlType::F64 => DType::F64,
            GgmlType::I8 => DType::I8,
            GgmlType::I16 => DType::I16,
            GgmlType::I32 => DType::I32,
            GgmlType::I64 => DType::I64,
            _ => return None,
        })
    }

    /// The ggml type storing `dtype`, if ggml has one.
    pub fn from_dtype(dtype: DType) -> Option<Self> {
        Some(match dtype {
            DType::F32 => GgmlType::F32,
            DType::F16 => GgmlType::F16,
            DType::BF16 => GgmlType::BF16,
            DType::F64 => GgmlType::F64,
            DType::I8 => GgmlType::I8,
            DType::I16 => GgmlType::I16,
            DType::I32 => GgmlType::I32,
            DType::I64 => GgmlType::I64,
            _ => return None,
        })
    }

    /// Whether values are stored in blocks with shared scales.
    pub fn is_quantized(self) -> bool {
        self.dtype().is_none()
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// Name.
    pub name: String,
    /// ggml's dimensions, fastest-varying first (`ne[0]` is the row length).
    pub ne: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub len: u64,
}

impl GgufTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.ne.iter().product()
    }

    /// The row-major shape (outermost first): `ne` reversed.
    pub fn shape(&self) -> Vec<u64> {
        self.ne.iter().rev().copied().collect()
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<GgufTensor>,
    by_name: HashMap<String, usize>,
    /// [`TensorInfo`]s of the tensors with a plain element type.
    infos: Vec<Option<TensorInfo>>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// A counting reader over the header, with the file's length for length caps.
struct Cursor<'a> {
    path: &'a Path,
    r: BufReader<&'a File>,
    pos: u64,
    len: u64,
}

impl Cursor<'_> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.to_path_buf(),
            message: message.into(),
        }
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(self.err(format!(
                "{what}: {n} bytes declared at offset {}, but only {} bytes remain in the file",
                self.pos,
                self.len.saturating_sub(self.pos)
            )));
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(v)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        Ok(v.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let at = self.pos;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| self.err(format!("{what} at offset {at} is not UTF-8")))
    }

    fn value(&mut self, t: ValueType, key: &str, depth: usize) -> Result<Value> {
        let what = || format!("value of {key:?}");
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>(&what())?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(&what())?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(&what())?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(&what())?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
            ValueType::Bool => {
                let b = self.array::<1>(&what())?[0];
                if b > 1 {
                    return Err(self.err(format!("{key:?}: boolean byte is {b}, not 0 or 1")));
                }
                Value::Bool(b == 1)
            }
            ValueType::String => Value::String(self.string(&what())?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                    )));
                }
                let id = self.u32(&what())?;
                let et = ValueType::from_id(id)
                    .ok_or_else(|| self.err(format!("{key:?}: unknown array element type {id}")))?;
                let n = self.u64(&what())?;
                let room = self.len.saturating_sub(self.pos) / et.min_size();
                if n > room {
                    return Err(self.err(format!(
                        "{key:?}: array of {n} {et:?} elements cannot fit in the {} bytes left",
                        self.len.saturating_sub(self.pos)
                    )));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(et, items)
            }
        })
    }
}

impl GgufFile {
    /// Open and validate `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut c = Cursor {
            path,
            r: BufReader::with_capacity(1 << 16, &file),
            pos: 0,
            len,
        };
        let magic: [u8; 4] = c.array("magic")?;
        if &magic != MAGIC {
            return Err(c.err(format!("magic is {magic:02x?}, not \"GGUF\" (47 47 55 46)")));
        }
        let version = c.u32("version")?;
        match version {
            2 | 3 => {}
            1 => return Err(c.err(
                "version 1 (pre-2023 layout) is not supported; convert it with a current llama.cpp",
            )),
            v if v.swap_bytes() <= 3 => {
                return Err(c.err(format!(
                    "big-endian GGUF (version {}) is not supported",
                    v.swap_bytes()
                )))
            }
            v => return Err(c.err(format!("unsupported version {v} (2 and 3 are read)"))),
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let room = len.saturating_sub(c.pos);
        if n_kv > room / 12 {
            return Err(c.err(format!(
                "{n_kv} metadata entries cannot fit in the {room} bytes left"
            )));
        }
        if n_tensors > room / 28 {
            return Err(c.err(format!(
                "{n_tensors} tensors cannot fit in the {room} bytes left"
            )));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut keys = HashSet::new();
        for i in 0..n_kv {
            let key = c.string(&format!("key of metadata entry {i}"))?;
            if !keys.insert(key.clone()) {
                return Err(c.err(format!("metadata key {key:?} appears more than once")));
            }
            let id = c.u32(&format!("type of {key:?}"))?;
            let t = ValueType::from_id(id)
                .ok_or_else(|| c.err(format!("{key:?}: unknown metadata type {id}")))?;
            let v = c.value(t, &key, 0)?;
            metadata.push((key, v));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(c.err(format!(
                    "general.alignment must be a UINT32 power of two, found {v} ({:?})",
                    v.value_type()
                )))
            }
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        let mut names = HashSet::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor {i}"))?;
            if !names.insert(name.clone()) {
                return Err(c.err(format!("tensor {name:?} appears more than once")));
            }
            let n_dims = c.u32(&format!("dimension count of {name:?}"))?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(c.err(format!(
                    "tensor {name:?}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(c.u64(&format!("dimensions of {name:?}"))?);
            }
            let id = c.u32(&format!("type of {name:?}"))?;
            let ggml_type = GgmlType::from_id(id)
                .ok_or_else(|| c.err(format!("tensor {name:?}: unknown ggml type {id}")))?;
            let rel = c.u64(&format!("offset of {name:?}"))?;
            raw.push((name, ne, ggml_type, rel));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut expected = 0u64;
        for (name, ne, ggml_type, rel) in raw {
            // The non-zero dimensions' product must fit, so a product in any order does too.
            let numel = ne
                .iter()
                .filter(|&&d| d != 0)
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .map(|n| if ne.contains(&0) { 0 } else { n })
                .ok_or_else(|| c.err(format!("tensor {name:?}: dimensions {ne:?} overflow")))?;
            if ne[0] % ggml_type.block_size() != 0 {
                return Err(c.err(format!(
                    "tensor {name:?}: row length {} is not a multiple of {}'s block size {}",
                    ne[0],
                    ggml_type,
                    ggml_type.block_size()
                )));
            }
            let bytes = ggml_type
                .byte_len(numel)
                .ok_or_else(|| c.err(format!("tensor {name:?}: dimensions {ne:?} overflow")))?;
            if rel != expected {
                return Err(c.err(format!(
                    "tensor {name:?} has data offset {rel}, expected {expected} (tensors are packed in order, each padded to the {alignment}-byte alignment)"
                )));
            }
            let end = data_start
                .checked_add(rel)
                .and_then(|s| s.checked_add(bytes))
                .filter(|&e| e <= len)
                .ok_or_else(|| {
                    c.err(format!(
                        "tensor {name:?}: {bytes} bytes at data offset {rel} run past the end of the {len}-byte file"
                    ))
                })?;
            expected = (rel + bytes).div_ceil(alignment) * alignment;
            tensors.push(GgufTensor {
                name,
                ne,
                ggml_type,
                offset: end - bytes,
                len: bytes,
            });
        }
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let infos = tensors
            .iter()
            .map(|t| {
                t.ggml_type.dtype().map(|dtype| TensorInfo {
                    name: t.name.clone(),
                    dtype,
                    shape: t.shape(),
                    offset: t.offset,
                    len: t.len,
                })
            })
            .collect();
        drop(c);
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            version,
            alignment,
            data_start,
            metadata,
            tensors,
            by_name,
            infos,
        })
    }

    /// Whether `path` starts with the GGUF magic.
    pub fn sniff(path: &Path) -> bool {
        let mut m = [0u8; 4];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut m))
            .is_ok()
            && &m == MAGIC
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where tensor data starts.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A string value under `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// `buf.len()` raw bytes of tensor `name` from byte `offset` of its data.
    pub fn read_raw(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let t = self.tensor(name).ok_or_else(|| Error::Gguf {
            path: self.path.clone(),
            message: format!("no tensor {name:?}"),
        })?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > t.len)
        {
            return Err(Error::Gguf {
                path: self.path.clone(),
                message: format!(
                    "tensor {name:?}: read of {} bytes at {offset} past its {} bytes",
                    buf.len(),
                    t.len
                ),
            });
        }
        self.file
            .read_exact_at(buf, t.offset + offset)
            .map_err(|e| Error::io(&self.path, e))
    }
}

impl TensorSource for GgufFile {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).and_then(|&i| self.infos[i].as_ref())
    }

    fn read_bytes(&self, name: &str, offset: u64, buf: &mut [u8]) -> adapterkit_core::Result<()> {
        let t = self
            .info(name)
            .ok_or_else(|| adapterkit_core::Error::TensorNotFound { name: name.into() })?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > t.len)
        {
            return Err(adapterkit_core::Error::BufferLength {
                dtype: t.dtype,
                expected: t.len.saturating_sub(offset) as usize,
                found: buf.len(),
            });
        }
        self.file
            .read_exact_at(buf, t.offset + offset)
            .map_err(|source| adapterkit_core::Error::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// One tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSpec {
    /// Name.
    pub name: String,
    /// ggml dimensions, fastest first.
    pub ne: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
}

impl GgufSpec {
    /// A spec from a row-major shape.
    pub fn from_shape(name: impl Into<String>, shape: &[u64], ggml_type: GgmlType) -> Self {
        GgufSpec {
            name: name.into(),
            ne: shape.iter().rev().copied().collect(),
            ggml_type,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> std::result::Result<(), String> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(t, items) => {
            out.extend_from_slice(&t.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                if it.value_type() != *t {
                    return Err(format!(
                        "array of {t:?} holds a {:?} element",
                        it.value_type()
                    ));
                }
                put_value(out, it)?;
            }
        }
    }
    Ok(())
}

/// The bytes and offsets of a GGUF file to be written.
#[derive(Debug, Clone)]
pub struct GgufLayout {
    /// Header: magic, version, counts, metadata, tensor infos, padding to the alignment.
    pub header: Vec<u8>,
    /// `(spec, absolute offset, bytes)` per tensor.
    pub tensors: Vec<(GgufSpec, u64, u64)>,
    /// Total file length.
    pub total_len: u64,
}

/// Lay out a GGUF v3 file: `metadata` in order (`general.alignment`, when present, must be a
/// UINT32 power of two and sets the alignment), then `tensors` packed in order.
pub fn layout(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[GgufSpec],
) -> Result<GgufLayout> {
    let err = |message: String| Error::Gguf {
        path: path.to_path_buf(),
        message,
    };
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(err(format!(
                "general.alignment must be a UINT32 power of two, not {v}"
            )))
        }
    };
    let mut h = Vec::new();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    let mut seen = HashSet::new();
    for (k, v) in metadata {
        if !seen.insert(k.as_str()) {
            return Err(err(format!("metadata key {k:?} given twice")));
        }
        put_str(&mut h, k);
        h.extend_from_slice(&v.value_type().id().to_le_bytes());
        put_value(&mut h, v).map_err(|m| err(format!("{k:?}: {m}")))?;
    }
    let mut rel = 0u64;
    let mut placed = Vec::with_capacity(tensors.len());
    let mut names = HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(err(format!("tensor {:?} given twice", t.name)));
        }
        if t.ne.is_empty() || t.ne.len() > MAX_DIMS {
            return Err(err(format!(
                "tensor {:?}: {} dimensions",
                t.name,
                t.ne.len()
            )));
        }
        let n = t.ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let bytes = n
            .and_then(|n| t.ggml_type.byte_len(n))
            .filter(|_| t.ne[0] % t.ggml_type.block_size() == 0)
            .ok_or_else(|| {
                err(format!(
                    "tensor {:?}: dimensions {:?} are not whole {} blocks",
                    t.name, t.ne, t.ggml_type
                ))
            })?;
        put_str(&mut h, &t.name);
        h.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        h.extend_from_slice(&rel.to_le_bytes());
        placed.push((t.clone(), rel, bytes));
        rel = (rel + bytes).div_ceil(alignment) * alignment;
    }
    let data_start = (h.len() as u64).div_ceil(alignment) * alignment;
    h.resize(data_start as usize, 0);
    let last_end = placed.last().map_or(0, |(_, r, b)| r + b);
    Ok(GgufLayout {
        header: h,
        tensors: placed
            .into_iter()
            .map(|(s, r, b)| (s, data_start + r, b))
            .collect(),
        total_len: data_start + last_end,
    })
}

/// A GGUF file being written: header in place, tensor data written at its offsets from any
/// thread, renamed into place by [`GgufPending::commit`] (dropped uncommitted, it is deleted).
#[derive(Debug)]
pub struct GgufPending {
    inner: PendingFile,
    tensors: Vec<(GgufSpec, u64, u64)>,
}

impl GgufPending {
    /// Create the temporary file beside `target` with `layout`'s header.
    pub fn create(target: &Path, layout: GgufLayout) -> Result<Self> {
        let inner = PendingFile::create(
            target,
            Layout {
                header: layout.header,
                tensors: Vec::new(),
                total_len: layout.total_len,
            },
        )?;
        Ok(GgufPending {
            inner,
            tensors: layout.tensors,
        })
    }

    /// `(spec, absolute offset, bytes)` of every tensor.
    pub fn tensors(&self) -> &[(GgufSpec, u64, u64)] {
        &self.tensors
    }

    /// Write `bytes` at `offset` bytes into tensor `index`'s data.
    pub fn write(&self, index: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let (spec, start, len) = &self.tensors[index];
        if offset + bytes.len() as u64 > *len {
            return Err(Error::Gguf {
                path: self.inner.target().to_path_buf(),
                message: format!("write past the end of tensor {:?}", spec.name),
            });
        }
        self.inner.write_at(start + offset, bytes)
    }

    /// Rename into place.
    pub fn commit(self, durable: bool) -> Result<()> {
        self.inner.commit(durable)
    }
}

/// Write a whole GGUF file from in-memory tensor bytes.
pub fn write_small(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(GgufSpec, Vec<u8>)],
) -> Result<()> {
    let specs: Vec<GgufSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let lay = layout(path, metadata, &specs)?;
    let pending = GgufPending::create(path, lay)?;
    for (i, (spec, bytes)) in tensors.iter().enumerate() {
        let want = pending.tensors()[i].2;
        if bytes.len() as u64 != want {
            return Err(Error::Gguf {
                path: path.to_path_buf(),
                message: format!(
                    "tensor {:?}: {} bytes given, {want} expected",
                    spec.name,
                    bytes.len()
                ),
            });
        }
        pending.write(i, 0, bytes)?;
    }
    pending.commit(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Vec<(String, Value)> {
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("a.u8".into(), Value::U8(7)),
            ("a.i8".into(), Value::I8(-7)),
            ("a.u16".into(), Value::U16(65535)),
            ("a.i16".into(), Value::I16(-300)),
            ("a.u32".into(), Value::U32(1 << 31)),
            ("a.i32".into(), Value::I32(-5)),
            ("a.f32".into(), Value::F32(0.25)),
            ("a.bool".into(), Value::Bool(true)),
            ("a.u64".into(), Value::U64(u64::MAX)),
            ("a.i64".into(), Value::I64(i64::MIN)),
            ("a.f64".into(), Value::F64(-1.5)),
            (
                "a.strs".into(),
                Value::Array(
                    ValueType::String,
                    vec![Value::String("x".into()), Value::String("".into())],
                ),
            ),
            (
                "a.nested".into(),
                Value::Array(
                    ValueType::Array,
                    vec![Value::Array(
                        ValueType::I32,
                        vec![Value::I32(1), Value::I32(2)],
                    )],
                ),
            ),
            ("general.alignment".into(), Value::U32(64)),
        ]
    }

    #[test]
    fn round_trip_every_type() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let a: Vec<u8> = (0..24u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let q = vec![3u8; 34 * 2];
        write_small(
            &p,
            &meta(),
            &[
                (GgufSpec::from_shape("a", &[4, 6], GgmlType::F32), a.clone()),
                (
                    GgufSpec::from_shape("q", &[1, 64], GgmlType::Q8_0),
                    q.clone(),
                ),
            ],
        )
        .unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.metadata(), &meta()[..]);
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.tensor("a").unwrap().ne, vec![6, 4]);
        assert_eq!(f.info("a").unwrap().shape, vec![4, 6]);
        assert!(f.info("q").is_none());
        assert_eq!(f.read_f32("a").unwrap()[23], 23.0);
        let mut b = vec![0u8; 68];
        f.read_raw("q", 0, &mut b).unwrap();
        assert_eq!(b, q);
        assert_eq!(f.tensor("q").unwrap().offset % 64, 0);
    }

    fn corrupt(edit: impl Fn(&mut Vec<u8>)) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let a: Vec<u8> = vec![0; 16];
        write_small(
            &p,
            &[("k".into(), Value::String("v".into()))],
            &[(GgufSpec::from_shape("a", &[4], GgmlType::F32), a)],
        )
        .unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        edit(&mut bytes);
        std::fs::write(&p, &bytes).unwrap();
        GgufFile::open(&p).unwrap_err().to_string()
    }

    #[test]
    fn malformed_files_are_refused_by_name() {
        // Header: magic 4, version 4, counts 16, key (8+1), type 4, value (8+1) = 46; then the
        // tensor name length at 46.
        assert!(corrupt(|b| b[0] = b'X').contains("magic"));
        assert!(corrupt(|b| b[4] = 9).contains("unsupported version 9"));
        assert!(corrupt(|b| b[4..8].copy_from_slice(&3u32.to_be_bytes())).contains("big-endian"));
        assert!(
            corrupt(|b| b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()))
                .contains("tensors cannot fit")
        );
        assert!(
            corrupt(|b| b[24..32].copy_from_slice(&u64::MAX.to_le_bytes()))
                .contains("bytes remain")
        );
        assert!(corrupt(|b| b[33..37].copy_from_slice(&77u32.to_le_bytes()))
            .contains("unknown metadata type 77"));
        // n_dims of tensor "a" sits after its name (8 + 1 bytes).
        assert!(
            corrupt(|b| b[55..59].copy_from_slice(&5u32.to_le_bytes())).contains("5 dimensions")
        );
        // ggml type after one dimension.
        assert!(corrupt(|b| b[67..71].copy_from_slice(&5u32.to_le_bytes()))
            .contains("unknown ggml type 5"));
        assert!(corrupt(|b| b[71..79].copy_from_slice(&32u64.to_le_bytes())).contains("expected 0"));
        assert!(corrupt(|b| b.truncate(b.len() - 1)).contains("run past the end"));
        assert!(corrupt(|b| b[67..71].copy_from_slice(&8u32.to_le_bytes())).contains("block size"));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let e = layout(
            &p,
            &[("k".into(), Value::U8(1)), ("k".into(), Value::U8(2))],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("given twice"));
    }
}
