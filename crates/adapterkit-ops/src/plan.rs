//! The merge planner: validate every adapter against the base, then fix the output's tensor list,
//! dtypes and the ordered operations on each tensor before a byte is written.

use std::collections::HashMap;
use std::path::Path;

use adapterkit_core::ir::{Adapter, KronFactor, LayerKind, MissMode, Payload, ScaleAxis, VbLogits};
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
        /// AdaLoRA's `E` (r×1): `A` rows are scaled by it.
        singular_values: Option<String>,
    },
    /// Replace rows `indices` (embedding rows) with the rows of `tensor`, blended by weight.
    ReplaceRows {
        /// Index of the adapter.
        adapter: usize,
        /// `(len(indices), cols)` rows.
        tensor: String,
        /// Row indices.
        indices: Vec<u64>,
        /// Merge weight.
        weight: f32,
    },
    /// `W ← W + weight·(W ⊙ M)` with `M` built from the payload (HiRA).
    DenseMul {
        /// Index of the adapter.
        adapter: usize,
        /// The payload to build `M` from.
        payload: Payload,
        /// Whether the stored tensor is `(in, out)`.
        fan_in_fan_out: bool,
        /// Merge weight.
        weight: f32,
    },
    /// GLoRA on a weight (`W + W⊙A + B`) or its bias (`b + b⊙D + E + W·C`).
    Glora {
        /// Index of the adapter.
        adapter: usize,
        /// The payload.
        payload: Payload,
        /// Whether this is the bias part.
        bias: bool,
        /// Merge weight.
        weight: f32,
    },
    /// RoAd: mix pairs of rows `h = group/2` apart, `W ← R · W` (also for the bias).
    RowMix {
        /// Index of the adapter.
        adapter: usize,
        /// The payload.
        payload: Payload,
        /// Merge weight.
        weight: f32,
    },
    /// MiSS "bat": every `r×r` tile `T` of row block `i` becomes `T + w·(T·B_i + B_i)`.
    MissBat {
        /// Index of the adapter.
        adapter: usize,
        /// `(out/r, r, r)` blocks.
        tensor: String,
        /// Merge weight.
        weight: f32,
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
    /// Multiply along a stored axis by a vector: `W ← W ⊙ (1 + weight·(s − 1))` (IA3). For
    /// `Cols`, each entry of `s` covers `repeat` consecutive columns (a conv's kernel).
    Scale {
        /// Index of the adapter.
        adapter: usize,
        /// Vector tensor name.
        tensor: String,
        /// Stored axis the vector runs along.
        axis: NormAxis,
        /// Columns per entry.
        repeat: usize,
        /// Merge weight.
        weight: f32,
    },
    /// Add a dense update built from the payload (LoHa, LoKr), `(out, in·k)` in PEFT's
    /// orientation, transposed onto the stored tensor when `fan_in_fan_out`.
    Dense {
        /// Index of the adapter.
        adapter: usize,
        /// The payload to build the update from.
        payload: Payload,
        /// Whether the stored tensor is `(in, out)`.
        fan_in_fan_out: bool,
        /// Merge weight.
        weight: f32,
    },
    /// Multiply each input-space vector by an orthogonal transform (OFT, HRA):
    /// `W ← W + weight·(W·T − W)` in PEFT's orientation. `transposed` when the stored tensor is
    /// `(in, out)`, so the transform runs down columns.
    Transform {
        /// Index of the adapter.
        adapter: usize,
        /// The payload to build the transform from.
        payload: Payload,
        /// Whether the stored tensor is `(in, out)`.
        transposed: bool,
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
            } | OpSpec::Transform {
                transposed: true,
                ..
            } | OpSpec::MissBat { .. }
                | OpSpec::RowMix { .. }
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
    /// Whether the plan merges adapters in or takes them back out.
    pub direction: Direction,
}

/// Merge adapters into a base, or take them out of a merged checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// `W ← f(W)`.
    #[default]
    Merge,
    /// `W ← f⁻¹(W)`, adapters undone in reverse order.
    Unmerge,
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

/// Whether a newer tuner's tensors have the shapes its math indexes for an `out × in` weight
/// (so malformed files are problems, not out-of-range panics).
fn tuner_shapes_fit(
    t: &adapterkit_core::ir::Tuner,
    dims: &dyn Fn(&str) -> Option<Vec<u64>>,
    out_dim: u64,
    in_dim: u64,
) -> bool {
    let d = |r: &str| dims(r).unwrap_or_default();
    let has = |r: &str| t.tensor(r).is_some();
    match t.method.as_str() {
        "SHIRA" => {
            let (w, i) = (d("shira_weight"), d("shira_indices"));
            w.len() == 1 && i.len() == 2 && i[0] == 2 && i[1] == w[0]
        }
        "C3A" => {
            let k = d("c3a_kernel");
            k.len() == 3 && k[2] > 0 && k[0] * k[2] == out_dim && k[1] * k[2] == in_dim
        }
        "ROAD" => {
            let (th, al) = (d("road_theta"), d("road_alpha"));
            let n = th.iter().product::<u64>();
            let gs = t.param("group_size").unwrap_or(0.0) as u64;
            // road_1: one (θ, α) per pair; road_2: one per row; road_4: two per row.
            let want = match t.param("variant").unwrap_or(1.0) as u32 {
                1 => out_dim / 2,
                2 => out_dim,
                _ => 2 * out_dim,
            };
            th == al && n == want && gs >= 2 && gs % 2 == 0 && out_dim % gs == 0
        }
        "DELORA" => {
            let (a, b, l, w) = (
                d("delora_A"),
                d("delora_B"),
                d("delora_lambda"),
                d("delora_w_norm"),
            );
            a.len() == 2
                && b.len() == 2
                && a[1] == in_dim
                && b[0] == out_dim
                && a[0] == b[1]
                && l.iter().product::<u64>() >= 1
                && w.iter().product::<u64>() == in_dim
        }
        "GRALORA" => {
            let (a, b) = (d("gralora_A"), d("gralora_B"));
            let ok = a.len() == 3
                && b.len() == 3
                && a[0] == b[0]
                && a[0] > 0
                && a[2] == b[1]
                && a[0] * a[1] == in_dim
                && b[0] * b[2] == out_dim
                && a[2] % a[0] == 0;
            let general = match (
                t.tensor("gralora_A_general.weight"),
                t.tensor("gralora_B_general.weight"),
            ) {
                (None, None) => true,
                (Some(_), Some(_)) => {
                    let (ga, gb) = (d("gralora_A_general.weight"), d("gralora_B_general.weight"));
                    ga.len() == 2
                        && gb.len() == 2
                        && ga[1] == in_dim
                        && gb[0] == out_dim
                        && ga[0] == gb[1]
                }
                _ => false,
            };
            ok && general
        }
        "PVERA" => {
            let (a, b, lb, ld) = (
                d("base_model.pvera_A"),
                d("base_model.pvera_B"),
                d("pvera_lambda_b"),
                d("pvera_lambda_d"),
            );
            let r = t.param("r").unwrap_or(0.0) as u64;
            a.len() == 2
                && b.len() == 2
                && a[1] >= in_dim
                && b[0] >= out_dim
                && b[1] >= r
                && a[0] >= r
                && lb.iter().product::<u64>() == out_dim
                && ld.iter().product::<u64>() >= r
        }
        "UNILORA" => {
            let (ia, ib, sa, sb) = (
                d("unilora_indices_A"),
                d("unilora_indices_B"),
                d("unilora_scales_A"),
                d("unilora_scales_B"),
            );
            ia.len() == 2
                && ia == sa
                && ib == sb
                && ib.len() == 2
                && ia[1] == in_dim
                && ib[0] == out_dim
                && ia[0] == ib[1]
        }
        "HIRA" => {
            if has("hira_embedding_A") {
                let (a, b) = (d("hira_embedding_A"), d("hira_embedding_B"));
                // The embedding's weight is (vocab, dim): out_dim here is the vocabulary.
                a.len() == 2 && b.len() == 2 && a[1] == out_dim && b[0] == in_dim && a[0] == b[1]
            } else {
                let (a, b) = (d("hira_A"), d("hira_B"));
                a.len() >= 2
                    && b.len() >= 2
                    && b[0] == out_dim
                    && a[0] == b[1]
                    && b[2..].iter().all(|&x| x == 1)
                    && a[1..].iter().product::<u64>() == in_dim
            }
        }
        "RANDLORA" => {
            let (l, g) = (d("randlora_lambda"), d("randlora_gamma"));
            if t.param("regen").is_some() {
                let mn = out_dim.min(in_dim);
                return l.len() == 2
                    && g.len() == 2
                    && g[0] == l[1]
                    && g[1] == mn
                    && l[0] == t.param("r").unwrap_or(0.0) as u64;
            }
            let a = if has("randlora_A") {
                d("randlora_A")
            } else {
                d("base_model.randlora_A")
            };
            let b = if has("randlora_B") {
                d("randlora_B")
            } else {
                d("base_model.randlora_B")
            };
            let (mn, mx) = (out_dim.min(in_dim), out_dim.max(in_dim));
            l.len() == 2
                && g.len() == 2
                && a.len() == 3
                && b.len() == 3
                && g[0] == l[1]
                && g[1] == mn
                && a[0] == l[0]
                && a[2] >= mn
                && b[0] >= mx
                && b[2] == l[0]
                && b[1] >= l[1]
        }
        "WAVEFT" => d("waveft_spectrum").len() == 1 && d("waveft_spectrum")[0] <= out_dim * in_dim,
        "GLORA" => {
            // Each path: low-rank Xd (rows, r)·Xu (r, cols), or X with 1 or `rows` values.
            let path = |name: &str, rows: u64, cols: u64| -> bool {
                let (xd, xu, x) = (
                    format!("{name}.Xd"),
                    format!("{name}.Xu"),
                    format!("{name}.X"),
                );
                match (has(&xd), has(&xu), has(&x)) {
                    (true, true, false) => {
                        let (a, b) = (d(&xd), d(&xu));
                        a.len() == 2 && b.len() == 2 && a[0] == rows && a[1] == b[0] && b[1] == cols
                    }
                    (false, false, true) => {
                        let n = d(&x).iter().product::<u64>();
                        n == 1 || n == rows
                    }
                    (false, false, false) => true,
                    _ => false,
                }
            };
            path("glora_A", out_dim, in_dim)
                && path("glora_B", out_dim, in_dim)
                && path("glora_C", in_dim, 1)
                && path("glora_D", out_dim, 1)
                && path("glora_E", out_dim, 1)
        }
        "SUPERTUNING" => {
            let v = d("supertuning_values");
            let idx_ok = !has("supertuning_indices") || d("supertuning_indices") == v;
            let lora_ok = match (
                t.tensor("supertuning_lora_A.weight"),
                t.tensor("supertuning_lora_B.weight"),
            ) {
                (None, None) => true,
                (Some(_), Some(_)) => {
                    let (a, b) = (
                        d("supertuning_lora_A.weight"),
                        d("supertuning_lora_B.weight"),
                    );
                    a.len() == 2
                        && b.len() == 2
                        && a[1] == in_dim
                        && b[0] == out_dim
                        && a[0] == b[1]
                }
                _ => false,
            };
            v.len() == 1 && idx_ok && lora_ok
        }
        "DEFT" => {
            let p = d("deft_P");
            let r_ok =
                !has("deft_R") || d("deft_R") == vec![p.get(1).copied().unwrap_or(0), in_dim];
            p.len() == 2 && p[0] == out_dim && r_ok
        }
        "PEANUT" => {
            let (a, b) = (d("peanut_A.weight"), d("peanut_B.weight"));
            let chain_ok = t
                .tensors
                .iter()
                .filter(|(r, _)| {
                    r.starts_with("peanut_encoders.") || r.starts_with("peanut_decoders.")
                })
                .all(|(r, _)| d(r).len() == 2);
            a.len() == 2 && b.len() == 2 && a[1] == out_dim && b[0] == out_dim && chain_ok
        }
        "FROD" => {
            let v = d("frod_V");
            v.len() == 2
                && v[0] == in_dim
                && v[1] == in_dim
                && d("frod_lambda_l").iter().product::<u64>() <= in_dim
        }
        "OSF" => {
            let (u, sv, v) = (
                d("osf_svd_params.U_low"),
                d("osf_svd_params.S_low"),
                d("osf_svd_params.V_low"),
            );
            sv.len() == 1
                && u.len() == 2
                && v.len() == 2
                && u[0] == out_dim
                && v[1] == in_dim
                && u[1] == sv[0]
                && v[0] == sv[0]
                && sv[0] <= out_dim.min(in_dim)
        }
        _ => true,
    }
}

/// Architectures whose projection layers are GPT-2's `Conv1D` (weights stored `(in, out)`).
const CONV1D_MODEL_TYPES: &[&str] = &["gpt2", "imagegpt", "decision_transformer"];

/// PEFT forces `fan_in_fan_out` on for `Conv1D` layers whatever the config says (it warns and
/// flips the flag while injecting; a config that also targets a plain `Linear` such as `lm_head`
/// is then saved with `false`). Do the same: on a GPT-2-family base, LoRA modules on `Conv1D`
/// projections (`c_attn`, `c_proj`, `c_fc`, `q_attn`) are read as `fan_in_fan_out`. Returns a
/// note per adapter changed.
pub fn conv1d_layout(adapter: &mut Adapter, model_type: Option<&str>) -> Vec<String> {
    if !model_type.is_some_and(|t| CONV1D_MODEL_TYPES.contains(&t)) {
        return Vec::new();
    }
    let mut changed = 0;
    for m in &mut adapter.modules {
        let last = m.module.rsplit('.').next().unwrap_or("");
        if let Payload::LowRank(lr) = &mut m.payload {
            if lr.layer
                == (LayerKind::Linear {
                    fan_in_fan_out: false,
                })
                && matches!(last, "c_attn" | "c_proj" | "c_fc" | "q_attn")
            {
                lr.layer = LayerKind::Linear {
                    fan_in_fan_out: true,
                };
                changed += 1;
            }
        }
    }
    if changed == 0 {
        return Vec::new();
    }
    vec![format!(
        "{changed} LoRA module(s) on GPT-2 Conv1D layers read with fan_in_fan_out=true, as PEFT does whatever the config says"
    )]
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
    plan_direction(
        base_path,
        base,
        base_tensors,
        adapters,
        out_dtype,
        Direction::Merge,
    )
}

/// Like [`plan`], for `direction`. An unmerge takes the adapters out of `base` (a merged
/// checkpoint) in reverse order; updates that destroy information are refused: replacements
/// (the original tensor is gone), DoRA (the merged rows have the magnitude's norm whatever the
/// original norms were) and weighted rotations.
pub fn plan_direction<'a>(
    base_path: &Path,
    base: &dyn TensorSource,
    base_tensors: impl IntoIterator<Item = &'a TensorInfo>,
    adapters: Vec<WeightedAdapter>,
    out_dtype: OutDType,
    direction: Direction,
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
                k if k > 1 && ad.shared_tensors.contains(n) => {}
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
                        singular_values: lr.singular_values.clone(),
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
                Payload::Scale {
                    tensor,
                    axis,
                    fan_in_fan_out,
                    bias: scale_bias,
                } => {
                    let Some(v) = ainfo(tensor) else { continue };
                    let n = v.numel();
                    // In PEFT's orientation the weight is (out, in, k…); stored transposed with
                    // fan_in_fan_out.
                    let (out_dim, in_dim) = if *fan_in_fan_out {
                        (info.shape.get(1).copied().unwrap_or(1), info.shape[0])
                    } else {
                        (info.shape[0], info.shape.get(1).copied().unwrap_or(1))
                    };
                    let kernel: u64 = info.shape.iter().skip(2).product();
                    let (axis_stored, repeat, want) = match (axis, fan_in_fan_out) {
                        (ScaleAxis::Output, false) => (NormAxis::Rows, 1, out_dim),
                        (ScaleAxis::Output, true) => (NormAxis::Cols, 1, out_dim),
                        (ScaleAxis::Input, false) => (NormAxis::Cols, kernel as usize, in_dim),
                        (ScaleAxis::Input, true) => (NormAxis::Rows, 1, in_dim),
                    };
                    if n != want || info.shape.len() < 2 {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!("shape mismatch: {tensor} {:?} scales {} {want} {}, but the base tensor is {:?}", v.shape, if *axis == ScaleAxis::Output { "outputs: expected" } else { "inputs: expected" }, "values", info.shape),
                        ));
                        continue;
                    }
                    // PEFT also scales the bias of an output-scaled layer, when it has one.
                    if *axis == ScaleAxis::Output && *scale_bias {
                        let bias = format!("{}.bias", m.module);
                        if base.info(&bias).is_some_and(|b| b.numel() == n) {
                            ops.entry(bias).or_default().push(OpSpec::Scale {
                                adapter: ai,
                                tensor: tensor.clone(),
                                axis: NormAxis::Cols,
                                repeat: 1,
                                weight,
                            });
                        }
                    }
                    OpSpec::Scale {
                        adapter: ai,
                        tensor: tensor.clone(),
                        axis: axis_stored,
                        repeat,
                        weight,
                    }
                }
                Payload::Hadamard(_) | Payload::Kronecker(_) => {
                    let fifo = false;
                    let dims = |n: &str| ainfo(n).map(|t| t.shape);
                    let shape = match &m.payload {
                        Payload::Hadamard(h) => match &h.cp {
                            None => {
                                match (dims(&h.w1a), dims(&h.w1b), dims(&h.w2a), dims(&h.w2b)) {
                                    (Some(a1), Some(b1), Some(a2), Some(b2))
                                        if a1.len() == 2
                                            && b1.len() == 2
                                            && a1 == a2
                                            && b1 == b2
                                            && a1[1] == b1[0] =>
                                    {
                                        Some(vec![a1[0], b1[1]])
                                    }
                                    _ => None,
                                }
                            }
                            Some((t1, t2)) => match (dims(t1), dims(&h.w1a), dims(&h.w1b)) {
                                (Some(t), Some(a), Some(b))
                                    if t.len() >= 3
                                        && a.len() == 2
                                        && b.len() == 2
                                        && t[0] == a[0]
                                        && t[1] == b[0]
                                        && dims(t2) == Some(t.clone())
                                        && dims(&h.w2a) == Some(a.clone())
                                        && dims(&h.w2b) == Some(b.clone()) =>
                                {
                                    let mut s = vec![a[1], b[1]];
                                    s.extend(&t[2..]);
                                    Some(vec![a[1], s[1..].iter().product()])
                                }
                                _ => None,
                            },
                        },
                        Payload::Kronecker(k) => {
                            let factor = |f: &KronFactor| -> Option<(u64, u64)> {
                                match f {
                                    KronFactor::Full(x) => dims(x)
                                        .filter(|d| d.len() >= 2)
                                        .map(|d| (d[0], d[1..].iter().product())),
                                    KronFactor::Product { a, b } => match (dims(a), dims(b)) {
                                        (Some(a), Some(b))
                                            if a.len() == 2 && b.len() >= 2 && a[1] == b[0] =>
                                        {
                                            Some((a[0], b[1..].iter().product()))
                                        }
                                        _ => None,
                                    },
                                    // t (r, r, k…), a (r, p), b (r, q).
                                    KronFactor::Tucker { t, a, b } => {
                                        match (dims(t), dims(a), dims(b)) {
                                            (Some(t), Some(a), Some(b))
                                                if t.len() >= 3
                                                    && a.len() == 2
                                                    && b.len() == 2
                                                    && t[0] == a[0]
                                                    && t[1] == b[0] =>
                                            {
                                                Some((a[1], b[1] * t[2..].iter().product::<u64>()))
                                            }
                                            _ => None,
                                        }
                                    }
                                }
                            };
                            match (factor(&k.w1), factor(&k.w2)) {
                                (Some((a, b)), Some((c, d))) => Some(vec![a * c, b * d]),
                                _ => None,
                            }
                        }
                        _ => None,
                    };
                    let (rows, cols) = info.rows_cols();
                    match shape {
                        Some(s) if s == vec![rows, cols] => {}
                        Some(s) => {
                            problems.push(problem(file, &m.target, format!("shape mismatch: the {} factors give a {:?} update but the base tensor is {:?}", m.payload.kind(), s, info.shape)));
                            continue;
                        }
                        None => {
                            problems.push(problem(
                                file,
                                &m.target,
                                format!(
                                    "the {} factors have inconsistent shapes",
                                    m.payload.kind()
                                ),
                            ));
                            continue;
                        }
                    }
                    OpSpec::Dense {
                        adapter: ai,
                        payload: m.payload.clone(),
                        fan_in_fan_out: fifo,
                        weight,
                    }
                }
                Payload::Oft(o) => {
                    let Some(t) = ainfo(&o.tensor) else { continue };
                    let (rows, cols) = info.rows_cols();
                    let in_dim = if o.fan_in_fan_out { rows } else { cols };
                    let blocks = if o.block_share {
                        in_dim / o.block_size
                    } else {
                        t.shape[0]
                    };
                    if blocks * o.block_size != in_dim || info.shape.len() < 2 {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!(
                                "shape mismatch: {} holds {} block(s) of size {} = {} inputs, but the base tensor {:?} has {in_dim}",
                                o.tensor, blocks, o.block_size, blocks * o.block_size, info.shape
                            ),
                        ));
                        continue;
                    }
                    OpSpec::Transform {
                        adapter: ai,
                        payload: m.payload.clone(),
                        transposed: o.fan_in_fan_out,
                        weight,
                    }
                }
                Payload::Butterfly {
                    r,
                    s: sc,
                    fan_in_fan_out,
                } => {
                    let (Some(tr), Some(ts)) = (ainfo(r), ainfo(sc)) else {
                        continue;
                    };
                    let (rows, cols) = info.rows_cols();
                    let (out_dim, in_dim) = if *fan_in_fan_out {
                        (cols, rows)
                    } else {
                        (rows, cols)
                    };
                    if tr.shape[1] * tr.shape[2] != in_dim
                        || ts.numel() != out_dim
                        || info.shape.len() < 2
                    {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!("shape mismatch: boft_R {:?} rotates {} inputs and boft_s {:?} scales {} outputs, but the base tensor is {:?}", tr.shape, tr.shape[1] * tr.shape[2], ts.shape, ts.numel(), info.shape),
                        ));
                        continue;
                    }
                    OpSpec::Transform {
                        adapter: ai,
                        payload: m.payload.clone(),
                        transposed: *fan_in_fan_out,
                        weight,
                    }
                }
                Payload::Stages {
                    blocks,
                    perms,
                    fan_in_fan_out,
                } => {
                    let (Some(tb), Some(tp)) = (ainfo(blocks), ainfo(perms)) else {
                        continue;
                    };
                    let (rows, cols) = info.rows_cols();
                    let in_dim = if *fan_in_fan_out { rows } else { cols };
                    let ok = tb.shape.len() == 4
                        && tp.shape.len() == 2
                        && tp.shape[0] == tb.shape[0]
                        && tp.shape[1] == in_dim
                        && tb.shape[1] * tb.shape[2] == in_dim
                        && tb.shape[2] == tb.shape[3];
                    if !ok || info.shape.len() < 2 {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!("shape mismatch: {blocks} {:?} and {perms} {:?} transform {in_dim}-wide vectors of the base tensor {:?}", tb.shape, tp.shape, info.shape),
                        ));
                        continue;
                    }
                    OpSpec::Transform {
                        adapter: ai,
                        payload: m.payload.clone(),
                        transposed: *fan_in_fan_out,
                        weight,
                    }
                }
                Payload::RightMultiply {
                    u,
                    v,
                    kernel,
                    fan_in_fan_out,
                } => {
                    let (Some(tu), Some(tv)) = (ainfo(u), ainfo(v)) else {
                        continue;
                    };
                    let (rows, cols) = info.rows_cols();
                    let in_dim = if *fan_in_fan_out { rows } else { cols };
                    let fits = tu.shape.len() == 2
                        && tv.shape == [tu.shape[1], tu.shape[0]]
                        && tu.shape[0] * kernel == in_dim;
                    if !fits || info.shape.len() < 2 {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!("shape mismatch: {u} {:?} and {v} {:?} update {in_dim}-wide rows of the base tensor {:?}", tu.shape, tv.shape, info.shape),
                        ));
                        continue;
                    }
                    OpSpec::Transform {
                        adapter: ai,
                        payload: m.payload.clone(),
                        transposed: *fan_in_fan_out,
                        weight,
                    }
                }
                Payload::Householder(h) => {
                    let Some(t) = ainfo(&h.tensor) else { continue };
                    let (rows, cols) = info.rows_cols();
                    let in_dim = if h.fan_in_fan_out { rows } else { cols };
                    if t.shape[0] != in_dim || info.shape.len() < 2 {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!("shape mismatch: {} {:?} reflects {}-vectors, but the base tensor {:?} has {in_dim} inputs", h.tensor, t.shape, t.shape[0], info.shape),
                        ));
                        continue;
                    }
                    OpSpec::Transform {
                        adapter: ai,
                        payload: m.payload.clone(),
                        transposed: h.fan_in_fan_out,
                        weight,
                    }
                }
                Payload::Vera {
                    a,
                    b,
                    lambda_b,
                    lambda_d,
                    fan_in_fan_out,
                } => {
                    let (Some(ta), Some(tb), Some(lb), Some(ld)) =
                        (ainfo(a), ainfo(b), ainfo(lambda_b), ainfo(lambda_d))
                    else {
                        continue;
                    };
                    let (rows, cols) = info.rows_cols();
                    let (out_dim, in_dim) = if *fan_in_fan_out {
                        (cols, rows)
                    } else {
                        (rows, cols)
                    };
                    let ok = ta.shape.len() == 2
                        && tb.shape.len() == 2
                        && ta.shape[0] == tb.shape[1]
                        && tb.shape[0] >= out_dim
                        && ta.shape[1] >= in_dim
                        && lb.numel() == out_dim
                        && ld.numel() == ta.shape[0]
                        && info.shape.len() == 2;
                    if !ok {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!(
                                "shape mismatch: VeRA A {:?}, B {:?}, lambda_b {:?}, lambda_d {:?} cannot update a base tensor {:?} ({out_dim} outputs, {in_dim} inputs)",
                                ta.shape, tb.shape, lb.shape, ld.shape, info.shape
                            ),
                        ));
                        continue;
                    }
                    OpSpec::Dense {
                        adapter: ai,
                        payload: m.payload.clone(),
                        fan_in_fan_out: *fan_in_fan_out,
                        weight,
                    }
                }
                Payload::Fourier {
                    spectrum,
                    fan_in_fan_out,
                    ..
                } => {
                    let Some(t) = ainfo(spectrum) else { continue };
                    if info.shape.len() != 2 || t.numel() > info.numel() {
                        problems.push(problem(file, &m.target, format!("shape mismatch: {} has {} frequencies, more than the {:?} base tensor holds", spectrum, t.numel(), info.shape)));
                        continue;
                    }
                    if !crate::torch_rng::randperm_supported(info.numel()) {
                        problems.push(problem(file, &m.target, format!("FourierFT locations for a tensor of {} elements come from a torch code path adapterkit does not reproduce", info.numel())));
                        continue;
                    }
                    OpSpec::Dense {
                        adapter: ai,
                        payload: m.payload.clone(),
                        fan_in_fan_out: *fan_in_fan_out,
                        weight,
                    }
                }
                Payload::ReplaceRows { tensor, indices } => {
                    let Some(t) = ainfo(tensor) else { continue };
                    let (rows, cols) = info.rows_cols();
                    if t.shape.len() != 2 || t.shape[1] != cols || info.shape.len() != 2 {
                        problems.push(problem(file, &m.target, format!("shape mismatch: rows {tensor} {:?} do not fit the base tensor {:?}", t.shape, info.shape)));
                        continue;
                    }
                    if let Some(bad) = indices.iter().find(|&&i| i >= rows) {
                        problems.push(problem(file, &m.target, format!("token index {bad} is out of range for a base tensor of {rows} rows")));
                        continue;
                    }
                    OpSpec::ReplaceRows {
                        adapter: ai,
                        tensor: tensor.clone(),
                        indices: indices.clone(),
                        weight,
                    }
                }
                Payload::Miss { block, mode } => {
                    let Some(t) = ainfo(block) else { continue };
                    let (out_dim, in_dim) = info.rows_cols();
                    let ok = info.shape.len() == 2
                        && match mode {
                            MissMode::Default => t.shape[1] == out_dim && t.shape[0] > 0,
                            MissMode::Mini => t.shape[1] > 0 && out_dim % t.shape[1] == 0,
                            MissMode::Bat => {
                                let r = t.shape[1];
                                t.shape[2] == r
                                    && r > 0
                                    && out_dim % r == 0
                                    && in_dim % r == 0
                                    && t.shape[0] == out_dim / r
                            }
                        };
                    if !ok {
                        problems.push(problem(file, &m.target, format!("shape mismatch: MiSS {mode:?} block {:?} does not fit the base tensor {:?}", t.shape, info.shape)));
                        continue;
                    }
                    if *mode == MissMode::Bat {
                        OpSpec::MissBat {
                            adapter: ai,
                            tensor: block.clone(),
                            weight,
                        }
                    } else {
                        OpSpec::Dense {
                            adapter: ai,
                            payload: m.payload.clone(),
                            fan_in_fan_out: false,
                            weight,
                        }
                    }
                }
                Payload::VbLora(v) => {
                    let (rows, cols) = info.rows_cols();
                    let (out_dim, in_dim) = if v.fan_in_fan_out {
                        (cols, rows)
                    } else {
                        (rows, cols)
                    };
                    let (Some(bank), Some(la), Some(lb)) = (
                        ainfo(&v.bank),
                        ainfo(match &v.a {
                            VbLogits::Full(x) | VbLogits::TopK { indices: x, .. } => x,
                        }),
                        ainfo(match &v.b {
                            VbLogits::Full(x) | VbLogits::TopK { indices: x, .. } => x,
                        }),
                    ) else {
                        continue;
                    };
                    let l = bank.shape.get(1).copied().unwrap_or(0);
                    let nv = bank.shape.first().copied().unwrap_or(0);
                    // Full logits end in num_vectors; saved top-k have indices (…, k) and the
                    // first k − 1 weights (…, k − 1) over the same leading dimensions.
                    let logits_ok = |lg: &VbLogits| -> bool {
                        match lg {
                            VbLogits::Full(x) => {
                                ainfo(x).is_some_and(|t| t.shape.last() == Some(&nv))
                            }
                            VbLogits::TopK { indices, weights } => {
                                match (ainfo(indices), ainfo(weights)) {
                                    (Some(i), Some(w)) => {
                                        let (ki, kw) = (
                                            i.shape.last().copied().unwrap_or(0),
                                            w.shape.last().copied().unwrap_or(0),
                                        );
                                        i.shape.len() == w.shape.len()
                                            && i.shape[..i.shape.len().saturating_sub(1)]
                                                == w.shape[..w.shape.len().saturating_sub(1)]
                                            && ki >= 1
                                            && kw + 1 == ki
                                    }
                                    _ => false,
                                }
                            }
                        }
                    };
                    // A logits (r, in/L, …), B logits (out/L, r, …).
                    let ok = bank.shape.len() == 2
                        && logits_ok(&v.a)
                        && logits_ok(&v.b)
                        && info.shape.len() == 2
                        && la.shape.len() == 3
                        && lb.shape.len() == 3
                        && la.shape[1] * l == in_dim
                        && lb.shape[0] * l == out_dim
                        && la.shape[0] == lb.shape[1];
                    if !ok {
                        problems.push(problem(file, &m.target, format!("shape mismatch: VB-LoRA logits A {:?}, B {:?} with vectors of length {l} do not fit the base tensor {:?}", la.shape, lb.shape, info.shape)));
                        continue;
                    }
                    OpSpec::Dense {
                        adapter: ai,
                        payload: m.payload.clone(),
                        fan_in_fan_out: v.fan_in_fan_out,
                        weight,
                    }
                }
                Payload::Tuner(t) => {
                    let dims = |role: &str| t.tensor(role).and_then(ainfo).map(|i| i.shape);
                    let (rows, cols) = info.rows_cols();
                    let (out_dim, in_dim) = if t.fan_in_fan_out {
                        (cols, rows)
                    } else {
                        (rows, cols)
                    };
                    let fits = match t.method.as_str() {
                        "BEFT" => dims("beft_bias")
                            .is_some_and(|d| d.iter().product::<u64>() == info.numel()),
                        "HIRA" => {
                            info.shape.len() >= 2
                                && tuner_shapes_fit(
                                    t,
                                    &dims,
                                    out_dim,
                                    info.numel() / out_dim.max(1),
                                )
                        }
                        "ROAD" => {
                            info.shape.len() == 2
                                && !t.fan_in_fan_out
                                && tuner_shapes_fit(t, &dims, out_dim, in_dim)
                        }
                        _ => info.shape.len() == 2 && tuner_shapes_fit(t, &dims, out_dim, in_dim),
                    };
                    if !fits {
                        problems.push(problem(
                            file,
                            &m.target,
                            format!(
                                "shape mismatch: the {} tensors do not fit the base tensor {:?}",
                                t.method, info.shape
                            ),
                        ));
                        continue;
                    }
                    match t.method.as_str() {
                        "BEFT" => OpSpec::Add {
                            adapter: ai,
                            tensor: t.tensor("beft_bias").unwrap_or_default().to_string(),
                            scale: 1.0,
                            weight,
                        },
                        "HIRA" => OpSpec::DenseMul {
                            adapter: ai,
                            payload: m.payload.clone(),
                            fan_in_fan_out: t.fan_in_fan_out,
                            weight,
                        },
                        "GLORA" => {
                            let bias = format!("{}.bias", m.module);
                            if base.info(&bias).is_some() {
                                ops.entry(bias).or_default().push(OpSpec::Glora {
                                    adapter: ai,
                                    payload: m.payload.clone(),
                                    bias: true,
                                    weight,
                                });
                            }
                            OpSpec::Glora {
                                adapter: ai,
                                payload: m.payload.clone(),
                                bias: false,
                                weight,
                            }
                        }
                        "ROAD" => {
                            let bias = format!("{}.bias", m.module);
                            if base.info(&bias).is_some_and(|b| b.numel() == out_dim) {
                                ops.entry(bias).or_default().push(OpSpec::RowMix {
                                    adapter: ai,
                                    payload: m.payload.clone(),
                                    weight,
                                });
                            }
                            OpSpec::RowMix {
                                adapter: ai,
                                payload: m.payload.clone(),
                                weight,
                            }
                        }
                        _ => OpSpec::Dense {
                            adapter: ai,
                            payload: m.payload.clone(),
                            fan_in_fan_out: t.fan_in_fan_out,
                            weight,
                        },
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
        o.sort_by_key(|op| !matches!(op, OpSpec::Replace { .. } | OpSpec::ReplaceRows { .. }));
        if direction == Direction::Unmerge {
            for op in &o {
                let (adapter, why) = match op {
                    OpSpec::Replace { adapter, .. } | OpSpec::ReplaceRows { adapter, .. } => {
                        (*adapter, "the adapter replaces this tensor (modules_to_save, saved embeddings, LN tuning, trainable tokens), so the original values are not in the merged file".to_string())
                    }
                    OpSpec::LowRank { adapter, magnitude: Some(_), .. } => (
                        *adapter,
                        "DoRA rescales each merged row to its magnitude vector, so the original row norms cannot be recovered from the merged weight".to_string(),
                    ),
                    OpSpec::RowMix { adapter, .. } => (*adapter, "RoAd's row rotations are not inverted by this version".to_string()),
                    OpSpec::Glora { adapter, .. } => (*adapter, "GLoRA's bias update depends on the weight; not inverted by this version".to_string()),
                    OpSpec::Dense { adapter, payload, .. } if crate::families::needs_base(payload) => (
                        *adapter,
                        "the update is a function of the original weight, which the merged file no longer holds".to_string(),
                    ),
                    OpSpec::Transform { adapter, weight, .. } | OpSpec::MissBat { adapter, weight, .. } if *weight != 1.0 => {
                        (*adapter, format!("a rotation merged at weight {weight} is not undone exactly by this version; unmerge it at weight 1"))
                    }
                    _ => continue,
                };
                problems.push(problem(
                    &adapters[adapter].adapter.path,
                    &t.name,
                    format!("cannot unmerge: {why}"),
                ));
            }
            o.reverse();
        }
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
    Ok(Plan {
        tensors,
        adapters,
        direction,
    })
}
