//! safetensors: validated header parsing, positional and memory-mapped reading, and a streaming
//! writer. Spec and the rules enforced: `formats/safetensors.md`.
//!
//! Layout: an 8-byte little-endian header length `N`, `N` bytes of JSON, then the data section.
//! Every length read from a file is checked against a cap or the file's real size before it is
//! used, and all arithmetic on it is checked.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use adapterkit_core::{DType, TensorInfo, TensorSource};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result, SizeMismatch};

/// The largest header adapterkit accepts (the same cap as the reference implementation).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// The most tensors one file may declare.
pub const MAX_TENSORS: usize = 10_000_000;
/// The most dimensions one tensor may have.
pub const MAX_RANK: usize = 64;

/// A parsed and validated safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// The JSON length `N` (the data section starts at `8 + N`).
    pub header_len: u64,
    /// Tensors in file (offset) order, with absolute offsets.
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__`, in the order the file lists it, if present.
    pub metadata: Option<Vec<(String, String)>>,
}

/// A JSON object kept as an ordered list so duplicate keys can be detected.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = map.next_entry::<String, Value>()? {
                    if v.len() >= MAX_TENSORS {
                        return Err(serde::de::Error::custom("too many header entries"));
                    }
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::InvalidHeader {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn bad_tensor(path: &Path, tensor: &str, message: impl Into<String>) -> Error {
    Error::InvalidTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        message: message.into(),
    }
}

fn as_u64_list(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(Value::as_u64).collect()
}

/// Parse and validate a header. `json` is the `N` header bytes; `file_len` the whole file's
/// length. Rules: UTF-8 JSON object; `__metadata__` a string→string object; each tensor an object
/// with a known `dtype`, a `shape` of non-negative integers and two `data_offsets`; no duplicate
/// names; sizes agree with dtype×shape (checked arithmetic); the byte ranges tile the data section
/// exactly, with no holes, overlaps or trailing bytes.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
    let header_len = json.len() as u64;
    let text = std::str::from_utf8(json).map_err(|e| invalid(path, format!("not UTF-8: {e}")))?;
    let entries: Entries = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| invalid(path, format!("not a JSON object: {e}")))?;
    let data_len = file_len
        .checked_sub(8)
        .and_then(|l| l.checked_sub(header_len))
        .ok_or_else(|| Error::HeaderOutOfBounds {
            path: path.to_path_buf(),
            size: header_len,
            file_len,
        })?;
    let data_start = 8 + header_len;

    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(entries.0.len());
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, value) in &entries.0 {
        if seen.insert(name.as_str(), ()).is_some() {
            return Err(Error::DuplicateTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
            });
        }
        if name == "__metadata__" && value.is_null() {
            // The Rust safetensors crate reads `null` as no metadata, and mlx writes it.
            continue;
        }
        if name == "__metadata__" {
            let obj = value
                .as_object()
                .ok_or_else(|| invalid(path, "__metadata__ is not an object"))?;
            let mut m = Vec::with_capacity(obj.len());
            for (k, v) in obj {
                let s = v.as_str().ok_or_else(|| {
                    invalid(
                        path,
                        format!("__metadata__[{k:?}] is not a string (found {v})"),
                    )
                })?;
                m.push((k.clone(), s.to_string()));
            }
            metadata = Some(m);
            continue;
        }
        let obj = value
            .as_object()
            .ok_or_else(|| bad_tensor(path, name, "entry is not an object"))?;
        let dtype_name = obj
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_tensor(path, name, "missing or non-string \"dtype\""))?;
        let dtype: DType = dtype_name
            .parse()
            .map_err(|_| bad_tensor(path, name, format!("unknown dtype {dtype_name:?}")))?;
        let shape = obj.get("shape").and_then(as_u64_list).ok_or_else(|| {
            bad_tensor(
                path,
                name,
                "missing \"shape\" or not a list of non-negative integers",
            )
        })?;
        if shape.len() > MAX_RANK {
            return Err(bad_tensor(
                path,
                name,
                format!("{} dimensions exceed the cap of {MAX_RANK}", shape.len()),
            ));
        }
        let offsets = obj
            .get("data_offsets")
            .and_then(as_u64_list)
            .filter(|o| o.len() == 2)
            .ok_or_else(|| {
                bad_tensor(
                    path,
                    name,
                    "missing \"data_offsets\" or not two non-negative integers",
                )
            })?;
        let (begin, end) = (offsets[0], offsets[1]);
        // Every dimension ≤ 2^31 and the non-zero ones' product ≤ 2^48 elements, so the readers'
        // and planner's products of dimensions (even across tensors) fit in u64, also for
        // zero-element tensors whose other dimensions are huge.
        let nonzero = shape.iter().filter(|&&d| d != 0).try_fold(1u64, |acc, &d| {
            (d <= 1 << 31).then_some(())?;
            acc.checked_mul(d).filter(|p| *p <= 1 << 48)
        });
        let numel = nonzero
            .map(|n| if shape.contains(&0) { 0 } else { n })
            .ok_or_else(|| bad_tensor(path, name, format!("shape {shape:?} overflows")))?;
        let expected = dtype.byte_len(numel).ok_or_else(|| {
            bad_tensor(
                path,
                name,
                format!("{numel} elements of {dtype} are not a whole number of bytes"),
            )
        })?;
        if end < begin || end - begin != expected {
            return Err(Error::TensorSizeMismatch(Box::new(SizeMismatch {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: dtype.name().to_string(),
                shape,
                expected,
                found: end.saturating_sub(begin),
                begin,
                end,
            })));
        }
        if end > data_len {
            return Err(Error::DataLayout {
                path: path.to_path_buf(),
                message: format!(
                    "tensor {name:?} ends at {end}, past the {data_len}-byte data section"
                ),
            });
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            offset: data_start + begin,
            len: expected,
        });
    }
    tensors.sort_by_key(|t| (t.offset, t.len));
    let mut pos = data_start;
    for t in &tensors {
        if t.offset != pos {
            let what = if t.offset > pos { "hole" } else { "overlap" };
            return Err(Error::DataLayout {
                path: path.to_path_buf(),
                message: format!(
                    "{what} before tensor {:?}: it starts at data offset {} but the previous tensor ends at {}",
                    t.name,
                    t.offset - data_start,
                    pos - data_start
                ),
            });
        }
        pos += t.len;
    }
    if pos - data_start != data_len {
        return Err(Error::DataLayout {
            path: path.to_path_buf(),
            message: format!(
                "{} trailing bytes after the last tensor (tensors cover {} of {} data bytes)",
                data_len - (pos - data_start),
                pos - data_start,
                data_len
            ),
        });
    }
    Ok(Header {
        header_len,
        tensors,
        metadata,
    })
}

/// Read and validate the header of the file at `path`.
pub fn read_header(path: &Path, file: &mut File) -> Result<Header> {
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(Error::FileTooSmall {
            path: path.to_path_buf(),
            len: file_len,
        });
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_LEN {
        return Err(Error::HeaderTooLarge {
            path: path.to_path_buf(),
            size: n,
            cap: MAX_HEADER_LEN,
        });
    }
    if n > file_len - 8 {
        return Err(Error::HeaderOutOfBounds {
            path: path.to_path_buf(),
            size: n,
            file_len,
        });
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
    parse_header(path, &json, file_len)
}

enum Data {
    Positional(File),
    Mapped(memmap2::Mmap),
}

/// An open, validated safetensors file. Tensor bytes are read with positional reads (so pages
/// do not linger in the process's memory) or, for small files, from a memory map.
pub struct SafetensorsFile {
    path: PathBuf,
    header: Header,
    by_name: HashMap<String, usize>,
    data: Data,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.header.tensors.len())
            .finish_non_exhaustive()
    }
}

impl SafetensorsFile {
    /// Open and validate `path`; tensor data is read with positional reads.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let header = read_header(path, &mut file)?;
        Ok(Self::build(path, header, Data::Positional(file)))
    }

    /// Open and validate `path`, memory-mapping it for zero-copy tensor views.
    pub fn open_mapped(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let header = read_header(path, &mut file)?;
        // SAFETY: the map is read-only; a file truncated underneath us by another process is the
        // one hazard memory maps carry, the same as every mmap-based safetensors reader accepts.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Self::build(path, header, Data::Mapped(map)))
    }

    fn build(path: &Path, header: Header, data: Data) -> Self {
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        SafetensorsFile {
            path: path.to_path_buf(),
            header,
            by_name,
            data,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// `__metadata__`, if any.
    pub fn metadata(&self) -> Option<&[(String, String)]> {
        self.header.metadata.as_deref()
    }

    /// Zero-copy bytes of a tensor when the file is memory-mapped.
    pub fn mapped_bytes(&self, name: &str) -> Option<&[u8]> {
        let t = &self.header.tensors[*self.by_name.get(name)?];
        match &self.data {
            Data::Mapped(m) => Some(&m[t.offset as usize..(t.offset + t.len) as usize]),
            Data::Positional(_) => None,
        }
    }
}

impl TensorSource for SafetensorsFile {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    fn read_bytes(&self, name: &str, offset: u64, buf: &mut [u8]) -> adapterkit_core::Result<()> {
        let t = self
            .info(name)
            .ok_or_else(|| adapterkit_core::Error::TensorNotFound { name: name.into() })?;
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > t.len) {
            return Err(adapterkit_core::Error::BufferLength {
                dtype: t.dtype,
                expected: t.len.saturating_sub(offset) as usize,
                found: buf.len(),
            });
        }
        let start = t.offset + offset;
        match &self.data {
            Data::Positional(f) => {
                f.read_exact_at(buf, start)
                    .map_err(|source| adapterkit_core::Error::Io {
                        path: self.path.clone(),
                        source,
                    })
            }
            Data::Mapped(m) => {
                buf.copy_from_slice(&m[start as usize..start as usize + buf.len()]);
                Ok(())
            }
        }
    }
}

/// One tensor to be written: name, dtype, shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
}

/// A complete file layout: the header bytes (length prefix included) and every tensor's absolute
/// byte range, known before any tensor data is produced.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Length prefix plus JSON header, space-padded to a multiple of 8.
    pub header: Vec<u8>,
    /// Tensors in the order given, with absolute offsets.
    pub tensors: Vec<TensorInfo>,
    /// Total file length.
    pub total_len: u64,
}

/// Lay out `specs` in the given order, with optional `__metadata__`.
pub fn layout(specs: &[TensorSpec], metadata: Option<&[(String, String)]>) -> Result<Layout> {
    let mut json = String::from("{");
    let mut first = true;
    if let Some(m) = metadata {
        let obj: serde_json::Map<String, Value> = m
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json.push_str("\"__metadata__\":");
        json.push_str(&Value::Object(obj).to_string());
        first = false;
    }
    let mut rel = 0u64;
    let mut ranges = Vec::with_capacity(specs.len());
    for s in specs {
        let numel = s.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let len = numel
            .and_then(|n| s.dtype.byte_len(n))
            .ok_or_else(|| Error::InvalidTensor {
                path: PathBuf::new(),
                tensor: s.name.clone(),
                message: format!("shape {:?} of {} has no byte size", s.shape, s.dtype),
            })?;
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&Value::String(s.name.clone()).to_string());
        json.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
            s.dtype.name(),
            Value::from(s.shape.clone()),
            rel,
            rel + len
        ));
        ranges.push((rel, len));
        rel += len;
    }
    json.push('}');
    while (json.len() + 8) % 8 != 0 {
        json.push(' ');
    }
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(json.as_bytes());
    let start = header.len() as u64;
    let tensors = specs
        .iter()
        .zip(ranges)
        .map(|(s, (r, len))| TensorInfo {
            name: s.name.clone(),
            dtype: s.dtype,
            shape: s.shape.clone(),
            offset: start + r,
            len,
        })
        .collect();
    Ok(Layout {
        header,
        tensors,
        total_len: start + rel,
    })
}

/// A safetensors file being written: a temporary file in the destination directory, sized and
/// headed up front; workers write tensor bytes at their offsets through `&self` from any thread.
/// [`PendingFile::commit`] renames it into place; dropping it uncommitted deletes it.
pub struct PendingFile {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
    layout: Layout,
}

impl fmt::Debug for PendingFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingFile")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PendingFile {
    /// Create the temporary file beside `target`, write the header and size the file.
    pub fn create(target: &Path, layout: Layout) -> Result<Self> {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".adapterkit-")
            .suffix(".tmp")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(|e| Error::io(dir, e))?;
        tmp.as_file()
            .set_len(layout.total_len)
            .map_err(|e| Error::io(tmp.path(), e))?;
        tmp.as_file()
            .write_all_at(&layout.header, 0)
            .map_err(|e| Error::io(tmp.path(), e))?;
        Ok(PendingFile {
            tmp,
            target: target.to_path_buf(),
            layout,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Where the file will land.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Write `bytes` at absolute offset `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.tmp
            .as_file()
            .write_all_at(bytes, offset)
            .map_err(|e| Error::io(self.tmp.path(), e))
    }

    /// Rename into place; with `durable`, flush the data to disk first (as `fsync` before a
    /// rename does: a crash of the machine then cannot leave an empty file under the final name).
    pub fn commit(self, durable: bool) -> Result<()> {
        if durable {
            self.tmp
                .as_file()
                .sync_data()
                .map_err(|e| Error::io(self.tmp.path(), e))?;
        }
        let target = self.target.clone();
        self.tmp
            .persist(&target)
            .map_err(|e| Error::io(&target, e.error))?;
        Ok(())
    }
}

/// Write a whole small file from in-memory tensors (used for tests and small outputs).
pub fn write_small(
    path: &Path,
    tensors: &[(TensorSpec, Vec<u8>)],
    metadata: Option<&[(String, String)]>,
) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let lay = layout(&specs, metadata)?;
    let offsets: Vec<(u64, u64)> = lay.tensors.iter().map(|t| (t.offset, t.len)).collect();
    let pending = PendingFile::create(path, lay)?;
    for ((spec, bytes), (off, len)) in tensors.iter().zip(offsets) {
        if bytes.len() as u64 != len {
            return Err(Error::InvalidTensor {
                path: path.to_path_buf(),
                tensor: spec.name.clone(),
                message: format!("{} bytes given, {len} expected", bytes.len()),
            });
        }
        pending.write_at(off, bytes)?;
    }
    pending.commit(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(json: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        std::fs::write(&p, bytes).unwrap();
        let mut f = File::open(&p).unwrap();
        read_header(&p, &mut f)
    }

    #[test]
    fn valid_file_parses_with_metadata() {
        let h = parse(&file_with(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
            &[0; 8],
        ))
        .unwrap();
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.tensors[1].offset, 8 + h.header_len + 4);
        assert_eq!(
            h.metadata.unwrap(),
            vec![("format".to_string(), "pt".to_string())]
        );
    }

    #[test]
    fn too_small() {
        assert!(matches!(
            parse(&[1, 2, 3]),
            Err(Error::FileTooSmall { len: 3, .. })
        ));
    }

    #[test]
    fn header_too_large() {
        let mut b = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(matches!(parse(&b), Err(Error::HeaderTooLarge { .. })));
    }

    #[test]
    fn header_out_of_bounds() {
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(matches!(
            parse(&b),
            Err(Error::HeaderOutOfBounds { size: 1000, .. })
        ));
    }

    #[test]
    fn not_json_and_not_utf8() {
        assert!(matches!(
            parse(&file_with("[1,2]", &[])),
            Err(Error::InvalidHeader { .. })
        ));
        let mut b = 2u64.to_le_bytes().to_vec();
        b.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(parse(&b), Err(Error::InvalidHeader { .. })));
    }

    #[test]
    fn duplicate_names() {
        let j = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(matches!(
            parse(&file_with(j, &[0, 0])),
            Err(Error::DuplicateTensor { .. })
        ));
    }

    #[test]
    fn unknown_dtype_and_bad_shape() {
        let j = r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(matches!(
            parse(&file_with(j, &[0])),
            Err(Error::InvalidTensor { .. })
        ));
        let j = r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#;
        assert!(matches!(
            parse(&file_with(j, &[0])),
            Err(Error::InvalidTensor { .. })
        ));
        let j = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#;
        assert!(matches!(
            parse(&file_with(j, &[0])),
            Err(Error::InvalidTensor { .. })
        ));
    }

    #[test]
    fn metadata_must_be_strings() {
        let j = r#"{"__metadata__":{"n":1}}"#;
        assert!(matches!(
            parse(&file_with(j, &[])),
            Err(Error::InvalidHeader { .. })
        ));
    }

    #[test]
    fn size_mismatch_names_both() {
        let j = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        match parse(&file_with(j, &[0; 4])) {
            Err(Error::TensorSizeMismatch(m)) if m.expected == 8 && m.found == 4 => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn holes_overlaps_and_trailing_bytes() {
        let hole = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(matches!(
            parse(&file_with(hole, &[0, 0])),
            Err(Error::DataLayout { .. })
        ));
        let overlap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(matches!(
            parse(&file_with(overlap, &[0, 0])),
            Err(Error::DataLayout { .. })
        ));
        let trailing = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(matches!(
            parse(&file_with(trailing, &[0, 0])),
            Err(Error::DataLayout { .. })
        ));
        let past_end = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            parse(&file_with(past_end, &[0, 0])),
            Err(Error::DataLayout { .. })
        ));
    }

    #[test]
    fn writer_round_trips_and_is_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.safetensors");
        let t = vec![
            (
                TensorSpec {
                    name: "x\"y".into(),
                    dtype: DType::F32,
                    shape: vec![2],
                },
                [1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                TensorSpec {
                    name: "s".into(),
                    dtype: DType::U8,
                    shape: vec![],
                },
                vec![7u8],
            ),
        ];
        write_small(&p, &t, Some(&[("format".into(), "pt".into())])).unwrap();
        let f = SafetensorsFile::open_mapped(&p).unwrap();
        assert_eq!(f.header().header_len % 8, 0);
        assert_eq!(f.read_f32("x\"y").unwrap(), vec![1.0, 2.0]);
        assert_eq!(f.mapped_bytes("s").unwrap(), &[7]);
        assert_eq!(f.metadata().unwrap()[0].1, "pt");
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.safetensors");
        let lay = layout(
            &[TensorSpec {
                name: "a".into(),
                dtype: DType::U8,
                shape: vec![3],
            }],
            None,
        )
        .unwrap();
        drop(PendingFile::create(&p, lay).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

#[cfg(test)]
mod robustness {
    use super::*;

    /// xorshift64*: a tiny deterministic generator for mutation tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// Thousands of mutated copies of a real file (bytes flipped, header bytes overwritten with
    /// JSON-significant characters, truncations, length prefixes rewritten): every one either
    /// parses into a header whose tensors tile the data exactly, or is refused with an error.
    /// None panics.
    #[test]
    fn mutated_files_never_panic() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/peft/bases/conv.safetensors");
        let original = std::fs::read(&fixture).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let header_end = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
        let specials = b"{}[]\",:0123456789-eE. \x00\xff";
        let (mut ok, mut refused) = (0, 0);
        for i in 0..3000 {
            let mut b = original.clone();
            match i % 4 {
                0 => {
                    for _ in 0..1 + rng.next() % 4 {
                        let at = (rng.next() as usize) % header_end;
                        b[at] = specials[(rng.next() as usize) % specials.len()];
                    }
                }
                1 => {
                    let at = (rng.next() as usize) % b.len();
                    b[at] ^= 1 << (rng.next() % 8);
                }
                2 => b.truncate((rng.next() as usize) % b.len()),
                _ => {
                    let n = match rng.next() % 3 {
                        0 => rng.next(),
                        1 => (header_end as u64 - 8)
                            .wrapping_add(rng.next() % 16)
                            .wrapping_sub(8),
                        _ => rng.next() % 64,
                    };
                    b[..8].copy_from_slice(&n.to_le_bytes());
                }
            }
            std::fs::write(&p, &b).unwrap();
            match SafetensorsFile::open(&p) {
                Ok(f) => {
                    ok += 1;
                    let end = f
                        .tensors()
                        .last()
                        .map(|t| t.offset + t.len)
                        .unwrap_or(8 + f.header().header_len);
                    assert_eq!(end, b.len() as u64);
                    for t in f.tensors() {
                        let mut buf = vec![0u8; t.len as usize];
                        f.read_bytes(&t.name, 0, &mut buf).unwrap();
                    }
                }
                Err(e) => {
                    refused += 1;
                    assert!(
                        e.to_string().contains("m.safetensors"),
                        "error does not name the file: {e}"
                    );
                }
            }
        }
        assert!(refused > 1000 && ok > 0, "ok {ok}, refused {refused}");
    }
}
