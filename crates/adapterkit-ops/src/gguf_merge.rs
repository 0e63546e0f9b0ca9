//! Merging adapters into a GGUF model: the same plan and per-row operations as the safetensors
//! executor, over a GGUF base, into a GGUF file llama.cpp loads.
//!
//! Every metadata entry is carried over in order. Tensors no adapter touches are copied byte for
//! byte in their own type, quantized or not. Targets are merged in f32 and written back in their
//! own type: F32/F16/BF16 rounded once, quantized ones requantized with ggml's reference
//! quantizers (the i-quants, which need an importance matrix, are written as F16 with a note).
//! Or, with a scheme, the merged model is quantized as llama-quantize would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapterkit_core::{DType, TensorInfo, TensorSource};
use adapterkit_formats::gguf::{GgmlType, GgufFile, GgufSpec};
use adapterkit_formats::gguf_quant::{self, Scheme};
use adapterkit_formats::quants::{self, dequantize};

use crate::error::{Error, Result};
use crate::execute::MergeReport;
use crate::merged_rows::MergedRows;
use crate::plan::{plan_direction, Direction, OutDType, WeightedAdapter};
use crate::quantize::{
    model_facts, quantized_metadata, refuse_split, tensor_facts, write_gguf, OutTensor, RowSource,
    TensorError, WriteOptions,
};

/// A GGUF model seen as plain tensors: unquantized ones as they are, quantized ones as F32,
/// dequantized row by row when read.
pub struct GgufView {
    file: Arc<GgufFile>,
    infos: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufView")
            .field("path", &self.file.path())
            .finish_non_exhaustive()
    }
}

impl GgufView {
    /// View `file`.
    pub fn new(file: Arc<GgufFile>) -> Self {
        let infos: Vec<TensorInfo> = file
            .tensors()
            .iter()
            .map(|t| {
                let dtype = t.ggml_type.dtype().unwrap_or(DType::F32);
                TensorInfo {
                    name: t.name.clone(),
                    dtype,
                    shape: t.shape(),
                    offset: t.offset,
                    len: dtype.byte_len(t.numel()).unwrap_or(t.len),
                }
            })
            .collect();
        let by_name = infos
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        GgufView {
            file,
            infos,
            by_name,
        }
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }
}

impl TensorSource for GgufView {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.infos[i])
    }

    fn read_bytes(&self, name: &str, offset: u64, buf: &mut [u8]) -> adapterkit_core::Result<()> {
        let t = self
            .file
            .tensor(name)
            .ok_or_else(|| adapterkit_core::Error::TensorNotFound { name: name.into() })?;
        let io = |e: adapterkit_formats::Error| adapterkit_core::Error::Io {
            path: self.file.path().to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        };
        if t.ggml_type.dtype().is_some() {
            return self.file.read_raw(name, offset, buf).map_err(io);
        }
        // f32 bytes [offset, offset + len) → whole rows of blocks.
        let row = t.ne[0] as usize;
        let raw_row = t.ggml_type.byte_len(t.ne[0]).expect("validated") as usize;
        let (e0, e1) = (
            offset as usize / 4,
            (offset as usize + buf.len()).div_ceil(4),
        );
        let (r0, r1) = (e0 / row, e1.div_ceil(row));
        let mut raw = vec![0u8; (r1 - r0) * raw_row];
        self.file
            .read_raw(name, (r0 * raw_row) as u64, &mut raw)
            .map_err(io)?;
        let vals = dequantize(t.ggml_type, &raw, (r1 - r0) * row).ok_or_else(|| {
            adapterkit_core::Error::Io {
                path: self.file.path().to_path_buf(),
                source: std::io::Error::other(format!(
                    "tensor {name}: {} cannot be dequantized by this version",
                    t.ggml_type
                )),
            }
        })?;
        let bytes: &[u8] = bytemuck::cast_slice(&vals);
        let start = offset as usize - r0 * row * 4;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }
}

/// What a GGUF merge did, beyond the usual report.
#[derive(Debug, Clone, Default)]
pub struct GgufMergeReport {
    /// The usual counts.
    pub report: MergeReport,
    /// Quantized targets requantized to their own type.
    pub requantized: Vec<String>,
    /// Quantized targets of a type this version has no quantizer for (the i-quants, ternary and
    /// FP4 types): written as F16.
    pub widened: Vec<String>,
    /// Per converted tensor, when asked for.
    pub errors: Vec<TensorError>,
}

/// Rows of the merged GGUF model, output index → base tensor.
struct MergedGguf<'a> {
    rows: MergedRows<'a>,
    base: &'a GgufFile,
    map: Vec<usize>,
}

impl RowSource for MergedGguf<'_> {
    fn rows(&self, index: usize, row: u64, out: &mut [f32]) -> Result<()> {
        let t = &self.base.tensors()[self.map[index]];
        self.rows.elements(&t.name, row * t.ne[0], out)
    }

    fn raw(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let t = &self.base.tensors()[self.map[index]];
        self.base.read_raw(&t.name, offset, buf)?;
        Ok(true)
    }

    fn whole(&self, index: usize) -> bool {
        self.rows
            .needs_whole(&self.base.tensors()[self.map[index]].name)
    }
}

/// Merge `adapters` into the GGUF model `base`, writing the GGUF file `out`; `pure` is
/// llama-quantize's `--pure` for `scheme`.
///
/// Without a `scheme`, merged tensors keep their type: F32/F16/BF16 as they are, quantized ones
/// requantized to the same type with ggml's reference quantizers (llama.cpp's export-lora writes
/// them as F16). With a `scheme`, the merged model is quantized as llama-quantize would quantize
/// it (types chosen per tensor, tensors in its order).
pub fn merge_gguf(
    base: Arc<GgufFile>,
    adapters: Vec<WeightedAdapter>,
    out: &Path,
    overwrite: bool,
    scheme: Option<Scheme>,
    pure: bool,
    opts: &WriteOptions,
) -> Result<GgufMergeReport> {
    refuse_split(&base)?;
    if out.exists() && !overwrite {
        return Err(Error::Output {
            path: out.to_path_buf(),
            message: "exists; pass --force to replace it".into(),
        });
    }
    let view = GgufView::new(base.clone());
    let plan = plan_direction(
        base.path(),
        &view,
        view.tensors().iter(),
        adapters,
        OutDType::Auto,
        Direction::Merge,
    )?;
    let rows = MergedRows::new(&view, &plan);
    let mut rep = GgufMergeReport::default();
    let (order, types, metadata) = match scheme {
        Some(s) => {
            let facts = model_facts(base.metadata());
            let tf = tensor_facts(&base);
            let names: Vec<&str> = base.tensors().iter().map(|t| t.name.as_str()).collect();
            (
                gguf_quant::quantize_order(&names),
                gguf_quant::choose_types(s, &facts, &tf, pure),
                quantized_metadata(base.metadata(), s),
            )
        }
        None => {
            let mut types = Vec::new();
            for t in base.tensors() {
                let ty = t.ggml_type;
                if !rows.is_changed(&t.name) || !ty.is_quantized() {
                    types.push(ty);
                } else if quants::can_quantize(ty) {
                    rep.requantized.push(t.name.clone());
                    types.push(ty);
                } else {
                    rep.widened.push(t.name.clone());
                    types.push(GgmlType::F16);
                }
            }
            (
                (0..base.tensors().len()).collect(),
                types,
                base.metadata().to_vec(),
            )
        }
    };
    let mut tensors = Vec::with_capacity(order.len());
    for &i in &order {
        let t = &base.tensors()[i];
        let ty = types[i];
        tensors.push(OutTensor {
            spec: GgufSpec {
                name: t.name.clone(),
                ne: t.ne.clone(),
                ggml_type: ty,
            },
            copy: ty == t.ggml_type && !rows.is_changed(&t.name),
        });
    }
    let source = MergedGguf {
        rows,
        base: &base,
        map: order,
    };
    let w = write_gguf(out, &metadata, &tensors, &source, opts)?;
    rep.report = MergeReport {
        files: vec![PathBuf::from(out)],
        tensors: w.tensors,
        merged: plan.tensors.iter().filter(|t| !t.ops.is_empty()).count(),
        copied: w.copied,
        bytes: w.bytes,
        ..Default::default()
    };
    rep.errors = w.errors;
    Ok(rep)
}
