//! Merging adapters into a GGUF model: the same plan and per-row operations as the safetensors
//! executor, over a GGUF base, into a GGUF file llama.cpp loads.
//!
//! Every metadata entry is carried over in order. Tensors no adapter touches are copied byte for
//! byte in their own type, quantized or not. Targets stored as F32, F16 or BF16 are merged in f32
//! and written back in their type; quantized targets are dequantized, merged and written as F16
//! (what llama.cpp's export-lora writes) with a note.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapterkit_core::convert::{decode_to_f32, encode_from_f32};
use adapterkit_core::{DType, TensorInfo, TensorSource};
use adapterkit_formats::gguf::{self, GgmlType, GgufFile, GgufPending, GgufSpec};
use adapterkit_formats::quants::dequantize;
use rayon::prelude::*;

use crate::apply::{apply_ops, prepare};
use crate::error::{Error, Result};
use crate::execute::{ExecOptions, MergeReport};
use crate::kernels::non_finite;
use crate::plan::{plan_direction, Direction, OutDType, WeightedAdapter};

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
    /// Quantized targets written as F16.
    pub widened: Vec<String>,
}

/// Merge `adapters` into the GGUF model `base`, writing the GGUF file `out`.
pub fn merge_gguf(
    base: Arc<GgufFile>,
    adapters: Vec<WeightedAdapter>,
    out: &Path,
    overwrite: bool,
    opts: &ExecOptions,
) -> Result<GgufMergeReport> {
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
    let mut specs = Vec::with_capacity(plan.tensors.len());
    let mut widened = Vec::new();
    for (pt, gt) in plan.tensors.iter().zip(base.tensors()) {
        let ty = if pt.ops.is_empty() || !gt.ggml_type.is_quantized() {
            gt.ggml_type
        } else {
            widened.push(gt.name.clone());
            GgmlType::F16
        };
        specs.push(GgufSpec {
            name: gt.name.clone(),
            ne: gt.ne.clone(),
            ggml_type: ty,
        });
    }
    // Like export-lora: once merged tensors are widened to F16 the file is no longer "mostly"
    // its quantized type; general.file_type says F16 (1), a label llama.cpp only displays.
    let mut metadata = base.metadata().to_vec();
    if !widened.is_empty() {
        for (k, v) in &mut metadata {
            if k == "general.file_type" {
                *v = gguf::Value::U32(1);
            }
        }
    }
    let layout = gguf::layout(out, &metadata, &specs)?;
    let pending = GgufPending::create(out, layout)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Options(format!("thread pool: {e}")))?;
    let block = opts.block_elems.max(1) as u64;
    let results: Vec<Result<(bool, u64)>> = pool.install(|| {
        plan.tensors
            .par_iter()
            .enumerate()
            .map(|(i, pt)| -> Result<(bool, u64)> {
                let gt = &base.tensors()[i];
                let out_ty = specs[i].ggml_type;
                if pt.ops.is_empty() {
                    let mut off = 0u64;
                    let mut buf = vec![0u8; (gt.len.min(1 << 22)) as usize];
                    while off < gt.len {
                        let n = (gt.len - off).min(buf.len() as u64) as usize;
                        base.read_raw(&gt.name, off, &mut buf[..n])?;
                        pending.write(i, off, &buf[..n])?;
                        off += n as u64;
                    }
                    return Ok((false, gt.len));
                }
                let ops = prepare(&plan, &view, pt)?;
                let out_dt = out_ty
                    .dtype()
                    .expect("merged targets are written unquantized");
                let (rows, cols) = pt.source.rows_cols();
                let step = (block / cols.max(1)).max(1);
                let mut tmp = Vec::new();
                let mut bytes = Vec::new();
                let mut written = 0u64;
                let mut r = 0u64;
                while r < rows {
                    let n = step.min(rows - r);
                    let mut input =
                        vec![0u8; pt.source.dtype.byte_len(n * cols).expect("validated") as usize];
                    view.read_bytes(
                        &pt.source.name,
                        pt.source.dtype.byte_len(r * cols).expect("validated"),
                        &mut input,
                    )?;
                    let mut vals = vec![0f32; (n * cols) as usize];
                    decode_to_f32(pt.source.dtype, &input, &mut vals)?;
                    apply_ops(&mut vals, r as usize, cols as usize, &ops, &mut tmp);
                    if !opts.allow_nonfinite {
                        if let Some((count, first)) = non_finite(&vals) {
                            return Err(Error::NonFinite {
                                tensor: pt.source.name.clone(),
                                count,
                                first: first + (r * cols) as usize,
                            });
                        }
                    }
                    bytes.resize(out_dt.byte_len(n * cols).expect("float") as usize, 0);
                    encode_from_f32(out_dt, &vals, &mut bytes)?;
                    pending.write(i, out_dt.byte_len(r * cols).expect("float"), &bytes)?;
                    written += bytes.len() as u64;
                    r += n;
                }
                Ok((true, written))
            })
            .collect()
    });
    let mut report = MergeReport {
        tensors: plan.tensors.len(),
        ..Default::default()
    };
    for r in results {
        let (merged, bytes) = r?;
        report.bytes += bytes;
        if merged {
            report.merged += 1;
        } else {
            report.copied += 1;
        }
    }
    pending.commit(opts.fsync)?;
    report.files = vec![PathBuf::from(out)];
    Ok(GgufMergeReport { report, widened })
}
