//! `extract --sparse`: the top-d fraction of each tensor's fine-tuning difference, by magnitude,
//! stored as a sparse difference (`adapterkit_formats::sparse`) — the sibling of LoRA extraction
//! for fine-tunes that are not low-rank (diff pruning, FishMask, LT-SFT, BitFit, LN-only, …).
//!
//! Per tensor whose difference is not all zero: `k = clamp(round_half_even(d · n), 1, n)` entries
//! with the largest |ΔW| (ties at the threshold to the lower row-major index; zeros dropped), by a
//! selection rather than a sort. The reconstruction error ‖ΔW − ΔW_sparse‖ / ‖ΔW‖ is reported per
//! tensor and for the whole model. A tensor whose every entry changed and is kept is stored whole
//! (its fine-tuned value), so density 1 gives the fine-tune back exactly.

use std::path::Path;

use adapterkit_core::{DType, TensorSource};
use adapterkit_formats::safetensors::{write_small, TensorSpec};
use adapterkit_formats::sparse::{top_k, FORMAT};
use adapterkit_formats::Checkpoint;

use crate::error::{Error, Result};

/// One tensor's extraction.
#[derive(Debug, Clone)]
pub struct SparseTensor {
    /// The tensor.
    pub name: String,
    /// Its elements.
    pub numel: u64,
    /// Entries asked for.
    pub k: u64,
    /// Entries stored (k minus zeros).
    pub nnz: u64,
    /// ‖ΔW − ΔW_sparse‖ / ‖ΔW‖.
    pub rel_error: f64,
}

/// What [`extract_sparse`] did.
#[derive(Debug, Clone, Default)]
pub struct SparseReport {
    /// Every changed tensor.
    pub tensors: Vec<SparseTensor>,
    /// Tensors whose difference is zero (not stored).
    pub unchanged: usize,
    /// ‖ΔW − ΔW_sparse‖ / ‖ΔW‖ over the whole model.
    pub total_rel_error: f64,
}

/// Extract the top-`density` differences of `ft` against `base` into the file `out`.
pub fn extract_sparse(
    base: &Checkpoint,
    ft: &Checkpoint,
    density: f64,
    out: &Path,
    overwrite: bool,
) -> Result<SparseReport> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(Error::Options(format!(
            "--density {density}: must be in (0, 1]"
        )));
    }
    if out.exists() && !overwrite {
        return Err(Error::Output {
            path: out.to_path_buf(),
            message: "exists; pass --force to replace it".into(),
        });
    }
    let mut names: Vec<&adapterkit_core::TensorInfo> = ft.tensors().collect();
    names.sort_by(|a, b| a.name.cmp(&b.name));
    let mut problems = Vec::new();
    for t in &names {
        match base.info(&t.name) {
            None => problems.push(format!("{}: not in the base", t.name)),
            Some(b) if b.shape != t.shape => problems.push(format!(
                "{}: shape {:?} in the fine-tune, {:?} in the base",
                t.name, t.shape, b.shape
            )),
            Some(b) if !b.dtype.is_float() || !t.dtype.is_float() => {
                problems.push(format!("{}: not floating point", t.name))
            }
            _ => {}
        }
    }
    if !problems.is_empty() {
        return Err(Error::Options(format!(
            "the fine-tune does not match the base:\n  {}",
            problems.join("\n  ")
        )));
    }
    let mut report = SparseReport::default();
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    let (mut sse, mut ssx) = (0f64, 0f64);
    for t in names {
        let (w0, w1) = (base.read_f32(&t.name)?, ft.read_f32(&t.name)?);
        let delta: Vec<f32> = w1.iter().zip(&w0).map(|(a, b)| a - b).collect();
        if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteUpdate {
                what: format!("{} (element {i})", t.name),
                count: delta.iter().filter(|v| !v.is_finite()).count(),
            });
        }
        if delta.iter().all(|v| *v == 0.0) {
            report.unchanged += 1;
            continue;
        }
        let n = delta.len() as u64;
        let k = ((density * n as f64).round_ties_even() as u64).clamp(1, n);
        let (idx, val) = top_k(&delta, k as usize);
        let all: f64 = delta.iter().map(|v| f64::from(*v).powi(2)).sum();
        let kept: f64 = val.iter().map(|v| f64::from(*v).powi(2)).sum();
        let dropped = (all - kept).max(0.0);
        sse += dropped;
        ssx += all;
        report.tensors.push(SparseTensor {
            name: t.name.clone(),
            numel: n,
            k,
            nnz: idx.len() as u64,
            rel_error: (dropped / all).sqrt(),
        });
        let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let nnz = idx.len() as u64;
        if nnz == n {
            // Every entry changed and kept: the tensor was tuned densely. Its fine-tuned value is
            // stored whole (`.dense`), so the merge gives it back exactly (W + (W_ft − W) need
            // not round to W_ft).
            tensors.push((
                TensorSpec {
                    name: format!("{}.dense", t.name),
                    dtype: DType::F32,
                    shape: t.shape.clone(),
                },
                w1.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            continue;
        }
        tensors.push((
            TensorSpec {
                name: format!("{}.indices", t.name),
                dtype: DType::I64,
                shape: vec![nnz],
            },
            i64s(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>()),
        ));
        tensors.push((
            TensorSpec {
                name: format!("{}.shape", t.name),
                dtype: DType::I64,
                shape: vec![t.shape.len() as u64],
            },
            i64s(&t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()),
        ));
        tensors.push((
            TensorSpec {
                name: format!("{}.values", t.name),
                dtype: DType::F32,
                shape: vec![nnz],
            },
            val.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    report.total_rel_error = if ssx > 0.0 { (sse / ssx).sqrt() } else { 0.0 };
    let meta = vec![
        ("format".to_string(), FORMAT.to_string()),
        ("density".to_string(), density.to_string()),
    ];
    write_small(out, &tensors, Some(&meta))?;
    Ok(report)
}
