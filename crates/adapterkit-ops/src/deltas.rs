//! The update each adapter module makes to its weight, in PEFT's `(out, in·k…)` orientation, as
//! thin factors `L·R` where the family is low-rank and as a dense matrix otherwise. This is what
//! compression, conversion to LoRA and spectra factorise.
//!
//! Dense updates are computed by the merge code itself (the same prepared operations the
//! executor applies), so every family the merge supports has a delta: additive families are
//! applied to a zero matrix (exact), multiplicative ones (OFT, BOFT, HRA, IA3, DoRA, …) to the
//! real base weight, `ΔW = W′ − W`.

use std::collections::HashMap;
use std::path::Path;

use adapterkit_core::ir::{Adapter, LayerKind, LowRank, Payload};
use adapterkit_core::{DType, TensorInfo, TensorSource};

use crate::apply::{apply_ops, prepare};
use crate::error::{Error, Result};
use crate::families::needs_base;
use crate::kernels::transpose;
use crate::plan::{self, OpSpec, OutDType, WeightedAdapter};

/// A module's update.
#[derive(Debug, Clone)]
pub enum DeltaData {
    /// `ΔW = L·R`, `L` is `rows × k`, `R` is `k × cols`, row-major, the scale folded into `L`.
    Product {
        /// Left factor.
        l: Vec<f64>,
        /// Right factor.
        r: Vec<f64>,
        /// Inner dimension.
        k: usize,
    },
    /// `ΔW`, `rows × cols` row-major.
    Dense(Vec<f32>),
}

/// One module's update of one weight tensor.
#[derive(Debug, Clone)]
pub struct ModuleDelta {
    /// Module path (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The base tensor changed.
    pub target: String,
    /// Its stored shape.
    pub target_shape: Vec<u64>,
    /// How a LoRA of this update is laid out on the layer.
    pub layer: LayerKind,
    /// Rows of `ΔW` in PEFT's orientation (output features; an embedding's dimension).
    pub rows: usize,
    /// Columns (input features × kernel; an embedding's vocabulary).
    pub cols: usize,
    /// The update.
    pub data: DeltaData,
    /// The module's LoRA payload, when the update is exactly one (possibly DoRA) LoRA.
    pub lora: Option<adapterkit_core::ir::LowRank>,
}

impl ModuleDelta {
    /// The dense update, row-major `rows × cols` (built from the factors in f64 if need be).
    pub fn dense(&self) -> Vec<f32> {
        match &self.data {
            DeltaData::Dense(d) => d.clone(),
            DeltaData::Product { l, r, k } => {
                let (rows, cols, k) = (self.rows, self.cols, *k);
                let mut out = vec![0f32; rows * cols];
                let mut acc = vec![0f64; cols];
                for (i, row) in out.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    for t in 0..k {
                        let c = l[i * k + t];
                        if c != 0.0 {
                            for (a, y) in acc.iter_mut().zip(&r[t * cols..(t + 1) * cols]) {
                                *a += c * y;
                            }
                        }
                    }
                    for (o, a) in row.iter_mut().zip(&acc) {
                        *o = *a as f32;
                    }
                }
                out
            }
        }
    }
}

/// A tensor an adapter changes that is not a weight matrix (a bias, a norm): its update cannot
/// be a LoRA. `delta` is `None` for replacements (`replacement` names the adapter tensor).
#[derive(Debug, Clone)]
pub struct VectorDelta {
    /// Module path.
    pub module: String,
    /// The base tensor.
    pub target: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// `W′ − W`, when computable.
    pub delta: Option<Vec<f32>>,
    /// The adapter tensor that replaces it, for a plain replacement.
    pub replacement: Option<String>,
}

/// Everything an adapter changes.
#[derive(Debug, Default)]
pub struct Deltas {
    /// Weight matrices (2-D, or convolution kernels flattened to 2-D).
    pub matrices: Vec<ModuleDelta>,
    /// Everything else.
    pub vectors: Vec<VectorDelta>,
}

/// Whether a payload stores its weight `(in, out)`.
fn payload_transposed(p: &Payload) -> bool {
    match p {
        Payload::LowRank(lr) => matches!(
            lr.layer,
            LayerKind::Linear {
                fan_in_fan_out: true
            } | LayerKind::Embedding
        ),
        Payload::Scale { fan_in_fan_out, .. }
        | Payload::Vera { fan_in_fan_out, .. }
        | Payload::Fourier { fan_in_fan_out, .. }
        | Payload::Butterfly { fan_in_fan_out, .. } => *fan_in_fan_out,
        Payload::Oft(o) => o.fan_in_fan_out || o.embedding,
        Payload::Householder(h) => h.fan_in_fan_out,
        Payload::VbLora(v) => v.fan_in_fan_out,
        Payload::Tuner(t) => t.fan_in_fan_out,
        _ => false,
    }
}

/// The names an embedding table goes by in the architectures adapterkit has seen.
pub fn looks_like_embedding(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    matches!(
        last,
        "embed_tokens" | "wte" | "word_embeddings" | "embed_in" | "tok_embeddings" | "shared"
    ) || last.ends_with("embedding")
        || last.ends_with("embeddings")
}

fn layer_for(payload: &Payload, module: &str, shape: &[u64]) -> LayerKind {
    if let Payload::LowRank(lr) = payload {
        return lr.layer.clone();
    }
    if let Payload::Oft(o) = payload {
        if o.embedding {
            return LayerKind::Embedding;
        }
    }
    if shape.len() > 2 {
        return LayerKind::Conv {
            kernel: shape[2..].to_vec(),
        };
    }
    if looks_like_embedding(module) {
        return LayerKind::Embedding;
    }
    LayerKind::Linear {
        fan_in_fan_out: payload_transposed(payload),
    }
}

/// A stand-in base of zeros, for additive updates when no base checkpoint is given: it knows the
/// shapes LoRA and full-diff payloads record.
struct ZeroBase {
    infos: HashMap<String, TensorInfo>,
}

impl TensorSource for ZeroBase {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.infos.get(name)
    }

    fn read_bytes(&self, _name: &str, _offset: u64, out: &mut [u8]) -> adapterkit_core::Result<()> {
        out.fill(0);
        Ok(())
    }
}

fn info(name: &str, shape: Vec<u64>) -> TensorInfo {
    let numel: u64 = shape.iter().product();
    TensorInfo {
        name: name.to_string(),
        dtype: DType::F32,
        shape,
        offset: 0,
        len: numel * 4,
    }
}

/// Whether an operation adds something that does not depend on the weight it is added to.
fn additive(op: &OpSpec, adapter: &Adapter) -> bool {
    match op {
        OpSpec::LowRank { magnitude, .. } => magnitude.is_none(),
        OpSpec::Add { .. } => true,
        OpSpec::Dense { payload, .. } => !needs_base(payload),
        _ => {
            let _ = adapter;
            false
        }
    }
}

fn shape_without_base(adapter: &Adapter, payload: &Payload) -> Option<Vec<u64>> {
    let dims = |n: &str| adapter.tensors.info(n).map(|t| t.shape.clone());
    match payload {
        Payload::LowRank(lr) if lr.magnitude.is_none() => {
            let (a, b) = (dims(&lr.a)?, dims(&lr.b)?);
            match &lr.layer {
                LayerKind::Linear {
                    fan_in_fan_out: false,
                } => Some(vec![*b.first()?, *a.get(1)?]),
                LayerKind::Linear {
                    fan_in_fan_out: true,
                }
                | LayerKind::Embedding => Some(vec![*a.get(1)?, *b.first()?]),
                LayerKind::Conv { kernel } => {
                    let mut s = vec![*b.first()?, *a.get(1)?];
                    s.extend(kernel);
                    Some(s)
                }
            }
        }
        Payload::Add { tensor, .. } | Payload::Replace { tensor } => dims(tensor),
        _ => None,
    }
}

/// The thin factors of one LoRA module: `L = scale·B`, `R = A` (AdaLoRA's `E` folded into `A`'s
/// rows), in PEFT's orientation for every layer kind.
pub fn lora_product(
    adapter: &Adapter,
    module: &str,
    target: &str,
    target_shape: Vec<u64>,
    lr: &LowRank,
) -> Result<ModuleDelta> {
    let a = adapter.tensors.read_f32(&lr.a)?;
    let b = adapter.tensors.read_f32(&lr.b)?;
    let k = lr.rank as usize;
    if (k == 0 && !(a.is_empty() && b.is_empty()))
        || (k > 0 && (a.len() % k != 0 || b.len() % k != 0))
    {
        return Err(Error::Options(format!(
            "{}: module {module}: {} and {} do not hold rank {k} factors",
            adapter.path.display(),
            lr.a,
            lr.b
        )));
    }
    let mut r: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    if let (Some(e), true) = (&lr.singular_values, k > 0) {
        let e = adapter.tensors.read_f32(e)?;
        let width = r.len() / k;
        for (row, s) in r.chunks_exact_mut(width).zip(&e) {
            row.iter_mut().for_each(|x| *x *= *s as f64);
        }
    }
    let l: Vec<f64> = b.iter().map(|&x| x as f64 * lr.scale).collect();
    // Rows from B's first dimension, columns from A's others: right for every layer kind, and
    // for a rank-0 (fully pruned AdaLoRA) module too.
    let dims = |n: &str| {
        adapter
            .tensors
            .info(n)
            .map(|i| i.shape.clone())
            .unwrap_or_default()
    };
    let rows = dims(&lr.b).first().copied().unwrap_or(0) as usize;
    let cols = dims(&lr.a).iter().skip(1).product::<u64>() as usize;
    Ok(ModuleDelta {
        module: module.to_string(),
        target: target.to_string(),
        target_shape,
        layer: lr.layer.clone(),
        rows,
        cols,
        data: DeltaData::Product { l, r, k },
        lora: Some(lr.clone()),
    })
}

/// The thin factors of every LoRA-family module of `adapter` (no base needed).
pub fn lora_products(adapter: &Adapter) -> Result<Vec<ModuleDelta>> {
    let mut out = Vec::new();
    for m in &adapter.modules {
        if let Payload::LowRank(lr) = &m.payload {
            let plain = LowRank {
                magnitude: None,
                ..lr.clone()
            };
            let shape = shape_without_base(adapter, &Payload::LowRank(plain)).unwrap_or_default();
            out.push(lora_product(adapter, &m.module, &m.target, shape, lr)?);
        }
    }
    Ok(out)
}

/// Compute every update `adapter` makes. `base` is needed for updates that depend on the base
/// weight and for families whose files do not record the layer's shape; without it, such a
/// module is an error that names it. A DoRA module's update is its LoRA direction `B·A` (what a
/// DoRA adapter stores), or with `dora_whole` and a base, the whole `W′ − W`.
pub fn adapter_deltas(
    adapter: &Adapter,
    base: Option<(&Path, &dyn TensorSource)>,
    dora_whole: bool,
) -> Result<Deltas> {
    let zero;
    let (base_path, src): (&Path, &dyn TensorSource) = match base {
        Some(b) => b,
        None => {
            let mut infos = HashMap::new();
            let mut missing = Vec::new();
            for m in &adapter.modules {
                match shape_without_base(adapter, &m.payload) {
                    Some(s) => {
                        infos.insert(m.target.clone(), info(&m.target, s));
                    }
                    None => missing.push(format!("{} ({})", m.module, m.payload.kind())),
                }
            }
            if !missing.is_empty() {
                return Err(Error::Options(format!(
                    "{}: {} module(s) need the base checkpoint (pass --base): their update depends on the base weight or the file does not record the layer's shape: {}{}",
                    adapter.path.display(),
                    missing.len(),
                    missing.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    if missing.len() > 5 { ", …" } else { "" }
                )));
            }
            zero = ZeroBase { infos };
            (Path::new("(no base)"), &zero as &dyn TensorSource)
        }
    };
    let mut targets: Vec<TensorInfo> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for m in &adapter.modules {
        // Some families also change the module's bias (IA3, RoAd, GLoRA): the planner adds
        // those operations when the base has the bias.
        for name in [m.target.clone(), format!("{}.bias", m.module)] {
            if seen.insert(name.clone()) {
                if let Some(i) = src.info(&name) {
                    targets.push(i.clone());
                }
            }
        }
    }
    let p = plan::plan(
        base_path,
        src,
        targets.iter(),
        vec![WeightedAdapter {
            adapter: adapter.clone(),
            weight: 1.0,
        }],
        OutDType::Auto,
    )?;
    let mut out = Deltas::default();
    let mut tmp = Vec::new();
    for t in &p.tensors {
        if t.ops.is_empty() {
            continue;
        }
        let name = &t.source.name;
        let shape = t.source.shape.clone();
        let Some(first) = adapter.modules.iter().find(|m| &m.target == name) else {
            // A bias changed along with its module's weight.
            let (rows, cols) = t.source.rows_cols();
            let w0 = src.read_f32(name)?;
            let prepared = prepare(&p, src, t)?;
            let mut w = w0.clone();
            apply_ops(&mut w, 0, (rows * cols) as usize, &prepared, &mut tmp);
            for (x, y) in w.iter_mut().zip(&w0) {
                *x -= y;
            }
            out.vectors.push(VectorDelta {
                module: name.strip_suffix(".bias").unwrap_or(name).to_string(),
                target: name.clone(),
                shape,
                delta: Some(w),
                replacement: None,
            });
            continue;
        };
        let (rows, cols) = t.source.rows_cols();
        let (srows, scols) = (rows as usize, cols as usize);
        let matrix = shape.len() >= 2;
        // A single LoRA (DoRA's directional part included): thin factors.
        if let ([OpSpec::LowRank { .. }], Payload::LowRank(lr), true) =
            (t.ops.as_slice(), &first.payload, matrix)
        {
            if !(dora_whole && lr.magnitude.is_some() && base.is_some()) {
                out.matrices
                    .push(lora_product(adapter, &first.module, name, shape, lr)?);
                continue;
            }
        }
        let all_additive = t.ops.iter().all(|op| additive(op, adapter));
        let replacement = match (t.ops.as_slice(), &first.payload) {
            ([OpSpec::Replace { .. }], Payload::Replace { tensor }) => Some(tensor.clone()),
            _ => None,
        };
        if !matrix && replacement.is_some() {
            out.vectors.push(VectorDelta {
                module: first.module.clone(),
                target: name.clone(),
                shape,
                delta: None,
                replacement,
            });
            continue;
        }
        let w0: Vec<f32> = if all_additive {
            vec![0.0; srows * scols]
        } else if base.is_some() {
            src.read_f32(name)?
        } else {
            return Err(Error::Options(format!(
                "{}: module {} ({}) changes {name} multiplicatively: pass --base to compute its update",
                adapter.path.display(),
                first.module,
                first.payload.kind()
            )));
        };
        let prepared = prepare(&p, src, t)?;
        let mut w = w0.clone();
        apply_ops(&mut w, 0, scols, &prepared, &mut tmp);
        for (x, y) in w.iter_mut().zip(&w0) {
            *x -= y;
        }
        if !matrix {
            out.vectors.push(VectorDelta {
                module: first.module.clone(),
                target: name.clone(),
                shape,
                delta: Some(w),
                replacement,
            });
            continue;
        }
        let layer = layer_for(&first.payload, &first.module, &shape);
        let transposed = matches!(
            layer,
            LayerKind::Embedding
                | LayerKind::Linear {
                    fan_in_fan_out: true
                }
        );
        let (rows, cols, data) = if transposed {
            (scols, srows, transpose(&w, srows, scols))
        } else {
            (srows, scols, w)
        };
        out.matrices.push(ModuleDelta {
            module: first.module.clone(),
            target: name.clone(),
            target_shape: shape,
            layer,
            rows,
            cols,
            data: DeltaData::Dense(data),
            lora: None,
        });
    }
    Ok(out)
}
