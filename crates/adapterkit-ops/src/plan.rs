//! The merge planner: validate every adapter against the base, then fix the output's tensor list,
//! dtypes and the ordered operations on each tensor before a byte is written.

use std::collections::HashMap;
use std::path::Path;

use adapterkit_core::ir::{Adapter, LayerKind, Payload};
use adapterkit_core::{DType, TensorInfo, TensorSource};

use crate::error::{Error, Problem, Result};

/// One adapter to merge and its weight.
#[derive(Debug, Clone)]
pub struct WeightedAdapter {
    /// The adapter.
    pub adapter: Adapter,
    /// Its weight (1.0 merges it as trained; negative weights subtract).
    pub weight: f64,
}

/// The output dtype policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutDType {
    /// Keep each tensor's dtype.
    #[default]
    Auto,
    /// Convert every floating-point tensor to this dtype (other tensors keep theirs).
    Fixed(DType),
}

/// How `L` and `R` of a low-rank update are read from the adapter's `A` and `B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// Stored rows are outputs: `L = B` (rows×r), `R = A` (r×cols). Linear and conv layers.
    Normal,
    /// Stored rows are inputs: `L = Aᵀ`, `R = Bᵀ`. `fan_in_fan_out` linears and embeddings.
    Transposed,
}

/// Which stored axis a DoRA norm runs along: one norm per stored row, or per stored column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormAxis {
    /// One norm per row (linear, conv).
    Rows,
    /// One norm per column (`fan_in_fan_out` linear, embedding).
    Cols,
}

/// One operation on a base tensor, referring to tensors in an adapter.
#[derive(Debug, Clone, PartialEq)]
pub enum OpSpec {
    /// `W += weight·scale·L·R`, or DoRA when `magnitude` is set.
    LowRank {
        /// Index of the adapter in the merge.
        adapter: usize,
        /// `A` tensor name.
        a: String,
        /// `B` tensor name.
        b: String,
        /// Rank.
        rank: usize,
        /// Orientation.
        orientation: Orientation,
        /// `α/r` or `α/√r`.
        scale: f32,
        /// The adapter's merge weight.
        weight: f32,
        /// DoRA magnitude tensor and its norm axis.
        magnitude: Option<(String, NormAxis)>,
    },
    /// `W += weight·scale·D`.
    Add {
        /// Index of the adapter.
        adapter: usize,
        /// Delta tensor name.
        tensor: String,
        /// Scale.
        scale: f32,
        /// Merge weight.
        weight: f32,
    },
    /// `W ← W + weight·(N − W)` (plain replacement at weight 1).
    Replace {
        /// Index of the adapter.
        adapter: usize,
        /// Replacement tensor name.
        tensor: String,
        /// Merge weight.
        weight: f32,
    },
}

impl OpSpec {
    /// Whether the op needs whole columns (so the tensor cannot be split into row blocks).
    pub fn needs_whole_tensor(&self) -> bool {
        matches!(
            self,
            OpSpec::LowRank {
                magnitude: Some((_, NormAxis::Cols)),
                ..
            }
        )
    }
}

/// A tensor of the output: where it comes from, its output dtype and what is done to it.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// The source tensor in the base.
    pub source: TensorInfo,
    /// Output dtype.
    pub out_dtype: DType,
    /// Operations, in application order (replacements first, then adapters in order).
    pub ops: Vec<OpSpec>,
}

impl PlannedTensor {
    /// Whether the output bytes are the input bytes.
    pub fn is_copy(&self) -> bool {
        self.ops.is_empty() && self.out_dtype == self.source.dtype
    }

    /// Output byte length.
    pub fn out_len(&self) -> u64 {
        self.out_dtype
            .byte_len(self.source.numel())
            .unwrap_or(self.source.len)
    }
}

/// A validated merge plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Every base tensor, in base order.
    pub tensors: Vec<PlannedTensor>,
    /// The adapters, indexed by the ops.
    pub adapters: Vec<WeightedAdapter>,
}

impl Plan {
    /// Total bytes of tensor data the output will hold.
    pub fn out_bytes(&self) -> u64 {
        self.tensors.iter().map(PlannedTensor::out_len).sum()
    }

    /// Number of tensors an adapter changes.
    pub fn touched(&self) -> usize {
        self.tensors.iter().filter(|t| !t.ops.is_empty()).count()
    }
}

fn problem(file: &Path, tensor: &str, message: impl Into<String>) -> Problem {
    Problem {
        file: file.to_path_buf(),
        tensor: tensor.to_string(),
        message: message.into(),
    }
}

/// Validate `adapters` against `base` (all problems together) and build the plan. `base_tensors`
/// lists the base's tensors in output order.
pub fn plan<'a>(
    base_path: &Path,
    base: &dyn TensorSource,
    base_tensors: impl IntoIterator<Item = &'a TensorInfo>,
    adapters: Vec<WeightedAdapter>,
    out_dtype: OutDType,
) -> Result<Plan> {
    let mut problems = Vec::new();
    if let OutDType::Fixed(d) = out_dtype {
        if !d.is_writable_float() {
            return Err(Error::Options(format!(
                "--dtype {d} is not an output type adapterkit writes (f32, bf16, f16, f64)"
            )));
        }
    }
    let mut ops: HashMap<String, Vec<OpSpec>> = HashMap::new();
    for (ai, wa) in adapters.iter().enumerate() {
        let ad = &wa.adapter;
        let file = ad.path.as_path();
        if !wa.weight.is_finite() {
            problems.push(problem(
                file,
                "-",
                format!("weight {} is not finite", wa.weight),
            ));
        }
        let weight = wa.weight as f32;
        // Every tensor of the file is consumed exactly once.
        let mut uses: HashMap<&str, usize> =
            ad.tensor_names.iter().map(|n| (n.as_str(), 0)).collect();
        for m in &ad.modules {
            for t in m.payload.tensors() {
                match uses.get_mut(t) {
                    Some(c) => *c += 1,
                    None => problems.push(problem(
                        file,
                        t,
                        "referenced by a module but absent from the file",
                    )),
                }
            }
        }
        for n in &ad.tensor_names {
            match uses[n.as_str()] {
                1 => {}
                0 => problems.push(problem(
                    file,
                    n,
                    "not used by any module (every adapter tensor must be consumed)",
                )),
                k => problems.push(problem(
                    file,
                    n,
                    format!("used by {k} modules (must be consumed exactly once)"),
                )),
            }
        }
        for m in &ad.modules {
            let Some(info) = base.info(&m.target) else {
                let hint = if m.target.ends_with("lm_head.weight") {
                    " (the base stores no separate output head: its lm_head is probably tied to the input embeddings, and merging into one would change both)"
                } else {
                    ""
                };
                problems.push(problem(
                    file,
                    &m.target,
                    format!(
                        "module {:?} targets base tensor {:?}, which {} does not have{hint}",
                        m.module,
                        m.target,
                        base_path.display()
                    ),
                ));
                continue;
            };
            let ainfo = |n: &str| ad.tensors.info(n).cloned();
            if !info.dtype.is_float() {
                problems.push(problem(
                    file,
                    &m.target,
                    format!(
                        "base tensor has dtype {}, which cannot be merged into",
                        info.dtype
                    ),
                ));
                continue;
            }
            let op = match &m.payload {
                Payload::LowRank(lr) => {
                    let (Some(a), Some(b)) = (ainfo(&lr.a), ainfo(&lr.b)) else {
                        continue;
                    };
                    let (expected, orientation, axis): (Vec<u64>, _, _) = match &lr.layer {
                        LayerKind::Linear {
                            fan_in_fan_out: false,
                        } => (
                            vec![b.shape[0], a.shape[1]],
                            Orientation::Normal,
                            NormAxis::Rows,
                        ),
                        LayerKind::Linear {
                            fan_in_fan_out: true,
                        } => (
                            vec![a.shape[1], b.shape[0]],
                            Orientation::Transposed,
                            NormAxis::Cols,
                        ),
                        LayerKind::Embedding => (
                            vec![a.shape[1], b.shape[0]],
                            Orientation::Transposed,
                            NormAxis::Cols,
                        ),
                        LayerKind::Conv { kernel } => {
                            let mut s = vec![b.shape[0], a.shape[1]];
                            s.extend(kernel);
                            (s, Orientation::Normal, NormAxis::Rows)
                        }
                    };
                    if info.shape != expected {
                        let mut msg = format!(
                            "shape mismatch: {} {:?} and {} {:?} give a {:?} update but the base tensor is {:?}",
                            lr.a, a.shape, lr.b, b.shape, expected, info.shape
                        );
                        if let LayerKind::Linear { fan_in_fan_out } = lr.layer {
                            let flipped: Vec<u64> = expected.iter().rev().copied().collect();
                            if info.shape == flipped {
                                msg.push_str(&format!(
                                    " (the base is stored transposed: the adapter's fan_in_fan_out={fan_in_fan_out} looks wrong for this base)"
                                ));
                            }
                        }
                        problems.push(problem(file, &m.target, msg));
                        continue;
                    }
                    OpSpec::LowRank {
                        adapter: ai,
                        a: lr.a.clone(),
                        b: lr.b.clone(),
                        rank: lr.rank as usize,
                        orientation,
                        scale: lr.scale as f32,
                        weight,
                        magnitude: lr.magnitude.clone().map(|mname| (mname, axis)),
                    }
                }
                Payload::Add { tensor, scale } => {
                    let Some(d) = ainfo(tensor) else { continue };
                    if d.shape != info.shape {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!(
                                "shape mismatch: {tensor} is {:?} but the base tensor is {:?}",
                                d.shape, info.shape
                            ),
                        ));
                        continue;
                    }
                    OpSpec::Add {
                        adapter: ai,
                        tensor: tensor.clone(),
                        scale: *scale as f32,
                        weight,
                    }
                }
                Payload::Replace { tensor } => {
                    let Some(d) = ainfo(tensor) else { continue };
                    if d.shape != info.shape {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!("shape mismatch: replacement {tensor} is {:?} but the base tensor is {:?} (was the vocabulary resized? merge into a base with the same shapes)", d.shape, info.shape),
                        ));
                        continue;
                    }
                    OpSpec::Replace {
                        adapter: ai,
                        tensor: tensor.clone(),
                        weight,
                    }
                }
                other => {
                    problems.push(problem(
                        file,
                        &m.target,
                        format!(
                            "payload {:?} cannot be merged by this version",
                            other.kind()
                        ),
                    ));
                    continue;
                }
            };
            ops.entry(m.target.clone()).or_default().push(op);
        }
    }
    let mut tensors = Vec::new();
    for t in base_tensors {
        let mut o = ops.remove(&t.name).unwrap_or_default();
        // Within the merge: every replacement first (it becomes the layer the adapters were
        // trained on), then the updates in adapter order.
        o.sort_by_key(|op| !matches!(op, OpSpec::Replace { .. }));
        let out = match out_dtype {
            OutDType::Fixed(d) if t.dtype.is_float() => d,
            _ => t.dtype,
        };
        if (!o.is_empty() || out != t.dtype) && !out.is_writable_float() {
            problems.push(problem(
                base_path,
                &t.name,
                format!("cannot write merged values as {out}; pass --dtype bf16, f16 or f32"),
            ));
        }
        tensors.push(PlannedTensor {
            source: t.clone(),
            out_dtype: out,
            ops: o,
        });
    }
    if !problems.is_empty() {
        return Err(Error::Validation(problems));
    }
    Ok(Plan { tensors, adapters })
}
