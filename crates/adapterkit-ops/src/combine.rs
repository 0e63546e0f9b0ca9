//! Combining several adapters into one PEFT LoRA.
//!
//! [`combine`] is exact in `ΔW` space: `cat`/`linear` write the weighted sum as concatenated
//! factors (rank `Σ rᵢ`, no approximation); `svd` re-factorises the sum to a rank; the
//! sparsifying methods act on each module's `ΔWᵢ` (PEFT's `merge_utils` arithmetic for
//! ties/dare/magnitude_prune, mergekit's for breadcrumbs/della) and the result is re-factorised
//! to `--rank`, with the approximation error reported per module. Adapters of any family take
//! part through their `ΔW` ([`crate::deltas`]); a module missing from an adapter contributes
//! nothing there.
//!
//! [`combine_peft`] reproduces PEFT's `add_weighted_adapter` file for file, including what it
//! does that is not `Σ wᵢ ΔWᵢ`: linear/ties/dare/magnitude_prune mix the `A`s and the `B`s
//! separately with `√|w·s|` weights (cross terms `Bᵢ·Aⱼ`), `cat` pads with zero rows at the end,
//! and the result copies the first adapter's config with `r = lora_alpha = new rank`.

use std::collections::BTreeMap;

use adapterkit_core::ir::{Adapter, LayerKind, LowRank, Payload};
use adapterkit_core::{DType, TensorSource};
use adapterkit_formats::AdapterWriter;
use serde_json::{json, Value};

use crate::compress::{
    copy_tensor, finish_lora, peft_key, save_whole, write_factors, write_lora, LowRankReport,
    ModuleReport,
};
use crate::deltas::{lora_product, DeltaData, Deltas, ModuleDelta};
use crate::error::{Error, Result};
use crate::methods::{
    self, DenseRows, InputParams, Majority, PeftKind, Sparsify, TaskSpec, Uniforms,
};
use crate::svd::{self, Factored, SvdOptions};

/// A way of combining adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CombineMethod {
    /// Concatenate the factors (exact).
    Cat,
    /// The weighted sum (exact; the same file as `cat` in exact mode).
    Linear,
    /// The weighted sum, re-factorised to a rank.
    Svd,
    /// TIES on each `ΔWᵢ`.
    Ties,
    /// DARE, then the weighted sum.
    DareLinear,
    /// DARE, then TIES's sign election.
    DareTies,
    /// Magnitude pruning, then the weighted sum.
    MagnitudePrune,
    /// Model Breadcrumbs (mergekit).
    Breadcrumbs,
    /// DELLA (mergekit).
    Della,
}

impl CombineMethod {
    /// Every method by name.
    pub const ALL: [(&'static str, CombineMethod); 9] = [
        ("cat", CombineMethod::Cat),
        ("linear", CombineMethod::Linear),
        ("svd", CombineMethod::Svd),
        ("ties", CombineMethod::Ties),
        ("dare_linear", CombineMethod::DareLinear),
        ("dare_ties", CombineMethod::DareTies),
        ("magnitude_prune", CombineMethod::MagnitudePrune),
        ("breadcrumbs", CombineMethod::Breadcrumbs),
        ("della", CombineMethod::Della),
    ];

    /// The method called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        methods::by_name(&Self::ALL, name)
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        methods::name_in(&Self::ALL, &self)
    }

    fn peft_kind(self) -> Option<PeftKind> {
        Some(match self {
            CombineMethod::Cat | CombineMethod::Linear | CombineMethod::Svd => PeftKind::Linear,
            CombineMethod::Ties => PeftKind::Ties,
            CombineMethod::DareLinear => PeftKind::DareLinear,
            CombineMethod::DareTies => PeftKind::DareTies,
            CombineMethod::MagnitudePrune => PeftKind::MagnitudePrune,
            CombineMethod::Breadcrumbs | CombineMethod::Della => return None,
        })
    }

    fn needs_density(self) -> bool {
        !matches!(
            self,
            CombineMethod::Cat | CombineMethod::Linear | CombineMethod::Svd
        )
    }
}

/// Options of a combination.
#[derive(Debug, Clone)]
pub struct CombineOptions {
    /// The method.
    pub method: CombineMethod,
    /// One weight per adapter.
    pub weights: Vec<f64>,
    /// Fraction kept by the sparsifying methods.
    pub density: Option<f64>,
    /// Breadcrumbs: fraction of the largest magnitudes dropped.
    pub gamma: f64,
    /// DELLA: spread of the keep probabilities.
    pub epsilon: f64,
    /// Output rank of re-factorised modules (default: the largest input rank).
    pub rank: Option<usize>,
    /// Seed of random masks.
    pub seed: u64,
    /// Majority sign rule of ties/dare_ties.
    pub majority: Majority,
    /// SVD options.
    pub svd: SvdOptions,
    /// dtype of the written factors.
    pub dtype: DType,
}

fn density(opts: &CombineOptions) -> Result<f64> {
    let d = opts.density.ok_or_else(|| {
        Error::Options(format!(
            "combine --method {} needs --density (the fraction of each update kept, in [0, 1])",
            opts.method.name()
        ))
    })?;
    if !(0.0..=1.0).contains(&d) {
        return Err(Error::Options(format!("--density {d} is outside [0, 1]")));
    }
    Ok(d)
}

/// Mix dense task tensors (flat, one per input) by `opts.method`, input `i` of `inputs` being
/// adapter `idx[i]`. `what` names the tensor (random streams and messages).
fn mix(
    opts: &CombineOptions,
    what: &str,
    idx: &[usize],
    tensors: Vec<Vec<f32>>,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let weights: Vec<f64> = idx.iter().map(|&i| opts.weights[i]).collect();
    let d = if opts.method.needs_density() {
        density(opts)?
    } else {
        1.0
    };
    if let Some(kind) = opts.method.peft_kind() {
        let streams: Vec<Uniforms> = idx
            .iter()
            .map(|&i| Uniforms::new(opts.seed, i, what))
            .collect();
        return Ok(methods::peft_mix(
            kind,
            tensors,
            &weights,
            d,
            opts.majority,
            &|i, j| streams[i].at(j as u64),
        ));
    }
    let della = opts.method == CombineMethod::Della;
    let spec = TaskSpec {
        sparsify: Some(if della {
            Sparsify::Della
        } else {
            Sparsify::Outliers
        }),
        consensus: della.then_some(opts.majority),
        normalize: della,
        rescale: della,
        lambda: 1.0,
        params: weights
            .iter()
            .map(|&w| InputParams {
                weight: w,
                density: d,
                gamma: opts.gamma,
                epsilon: opts.epsilon,
            })
            .collect(),
        seed: opts.seed,
        tensor: what.to_string(),
        work: None,
    };
    // Random streams follow each input's position among the adapters that have this tensor.
    let src = DenseRows {
        tensors: &tensors,
        rows,
        cols,
    };
    let mut out = Vec::with_capacity(rows * cols);
    methods::task_arithmetic(&src, &spec, &mut |_, o| {
        out.extend_from_slice(o);
        Ok(())
    })?;
    Ok(out)
}

/// Whether an adapter tensor is PEFT's saved copy of a targeted embedding layer
/// (`save_embedding_layers`): the base layer's weight, not an update.
fn is_saved_layer(tensor: &str) -> bool {
    tensor.contains(".base_layer.")
}

/// `adapter` without PEFT's saved embedding-layer copies (see [`combine`]): what its updates are
/// computed from.
pub fn without_saved_layers(adapter: &Adapter) -> Adapter {
    let mut a = adapter.clone();
    a.modules
        .retain(|m| !matches!(&m.payload, Payload::Replace { tensor } if is_saved_layer(tensor)));
    a.tensor_names.retain(|t| !is_saved_layer(t));
    a
}

/// `Σ wᵢ·Lᵢ·Rᵢ` of low-rank updates (adapter `i`, its update) as one product
/// `[w₁L₁ | w₂L₂ | …]·[R₁; R₂; …]`: the left factor, the right factor and the inner dimension.
fn concat_products(
    entries: &[(usize, &ModuleDelta)],
    weights: &[f64],
    rows: usize,
    cols: usize,
) -> (Vec<f64>, Vec<f64>, usize) {
    let ks: Vec<usize> = entries
        .iter()
        .map(|(_, md)| match &md.data {
            DeltaData::Product { k, .. } => *k,
            DeltaData::Dense(_) => 0,
        })
        .collect();
    let k: usize = ks.iter().sum();
    let mut l = vec![0f64; rows * k];
    let mut r = Vec::with_capacity(k * cols);
    let mut col = 0;
    for ((i, md), &ki) in entries.iter().zip(&ks) {
        if let DeltaData::Product { l: li, r: ri, .. } = &md.data {
            for row in 0..rows {
                for t in 0..ki {
                    l[row * k + col + t] = weights[*i] * li[row * ki + t];
                }
            }
            r.extend_from_slice(ri);
        }
        col += ki;
    }
    (l, r, k)
}

/// Combine adapters (`inputs`: each adapter with its updates) into one PEFT LoRA written to
/// `out`. `base` is needed only to save a combined vector update that has no LoRA module to
/// ride on. Returns the config and the per-module report.
pub fn combine(
    inputs: &[(&Adapter, &Deltas)],
    base: Option<&dyn TensorSource>,
    base_model: Option<&str>,
    opts: &CombineOptions,
    out: &mut AdapterWriter,
) -> Result<(Value, LowRankReport)> {
    if opts.weights.len() != inputs.len() {
        return Err(Error::Options(format!(
            "{} weight(s) for {} adapter(s)",
            opts.weights.len(),
            inputs.len()
        )));
    }
    if opts.method.needs_density() {
        density(opts)?;
    }
    // Modules in order of first appearance, with every adapter's update of each.
    let mut order: Vec<String> = Vec::new();
    let mut by_module: BTreeMap<String, Vec<(usize, &ModuleDelta)>> = BTreeMap::new();
    // PEFT's saved embedding layers (copies of the base layer, `*.base_layer.weight`) are not
    // updates: carried over as PEFT carries them (the last loaded adapter's copy).
    let mut saved_layers: BTreeMap<String, (&Adapter, String)> = BTreeMap::new();
    for (adapter, _) in inputs {
        for t in adapter.tensor_names.iter().filter(|t| is_saved_layer(t)) {
            saved_layers.insert(t.clone(), (*adapter, t.clone()));
        }
    }
    for (i, (adapter, deltas)) in inputs.iter().enumerate() {
        for v in &deltas.vectors {
            if v.replacement.as_deref().is_some_and(is_saved_layer) {
                continue;
            }
            if v.replacement.is_some() {
                return Err(Error::Options(format!(
                    "{}: {} is replaced whole (modules_to_save / trainable tokens); a replacement cannot be weighted or summed with other adapters",
                    adapter.path.display(),
                    v.target
                )));
            }
        }
        for md in &deltas.matrices {
            if md.lora.as_ref().is_some_and(|l| l.magnitude.is_some()) {
                return Err(Error::Options(format!(
                    "{}: module {} is DoRA; pass --base so its whole update W′ − W is combined",
                    adapter.path.display(),
                    md.module
                )));
            }
            let e = by_module.entry(md.module.clone()).or_default();
            if e.is_empty() {
                order.push(md.module.clone());
            }
            e.push((i, md));
        }
    }
    if order.is_empty() {
        return Err(Error::Options(
            "the adapters change no weight matrix, so there is no LoRA to write".into(),
        ));
    }
    let input_rank = |md: &ModuleDelta| match &md.data {
        DeltaData::Product { k, .. } => Some(*k),
        DeltaData::Dense(_) => None,
    };
    let default_rank = inputs
        .iter()
        .flat_map(|(_, d)| d.matrices.iter().filter_map(input_rank))
        .max();

    let mut rep = LowRankReport::default();
    let mut targets = Vec::new();
    let mut fan_in_fan_out: Option<bool> = None;
    let mut out_dims: BTreeMap<String, usize> = BTreeMap::new();
    for module in &order {
        let entries = &by_module[module];
        let first = entries[0].1;
        for (i, md) in entries {
            if (md.rows, md.cols) != (first.rows, first.cols) || md.layer != first.layer {
                return Err(Error::Options(format!(
                    "module {module}: {} has a {}×{} update ({:?}) but {} has {}×{} ({:?})",
                    inputs[entries[0].0].0.path.display(),
                    first.rows,
                    first.cols,
                    first.layer,
                    inputs[*i].0.path.display(),
                    md.rows,
                    md.cols,
                    md.layer
                )));
            }
        }
        if let LayerKind::Linear { fan_in_fan_out: t } = first.layer {
            match fan_in_fan_out {
                None => fan_in_fan_out = Some(t),
                Some(p) if p != t => {
                    return Err(Error::Options(
                        "some linear modules store their weight (in, out) and others (out, in); PEFT's fan_in_fan_out is one flag for the whole adapter".into(),
                    ))
                }
                _ => {}
            }
        }
        let (rows, cols) = (first.rows, first.cols);
        let before = entries.iter().filter_map(|(_, md)| input_rank(md)).max();
        let all_products = entries.iter().all(|(_, md)| input_rank(md).is_some());
        let exact = matches!(opts.method, CombineMethod::Cat | CombineMethod::Linear);
        if exact && all_products {
            // Σ wᵢ·Lᵢ·Rᵢ = [w₁L₁ | w₂L₂ | …]·[R₁; R₂; …].
            let (l, r, k) = concat_products(entries, &opts.weights, rows, cols);
            write_factors(out, module, &first.layer, &l, &r, rows, k, cols, opts.dtype)?;
            rep.modules.push(ModuleReport {
                module: module.clone(),
                rows,
                cols,
                rank_before: before,
                rank: k,
                error: 0.0,
                energy: 1.0,
                method: "exact",
            });
        } else {
            let f: Factored = if opts.method == CombineMethod::Svd && all_products {
                // The weighted sum as one product, factorised exactly.
                let (l, r, k) = concat_products(entries, &opts.weights, rows, cols);
                svd::factor_product(module, &l, &r, rows, k, cols)?
            } else {
                let idx: Vec<usize> = entries.iter().map(|(i, _)| *i).collect();
                let tensors: Vec<Vec<f32>> = entries.iter().map(|(_, md)| md.dense()).collect();
                let mixed = mix(opts, module, &idx, tensors, rows, cols)?;
                let needed = if exact {
                    None
                } else {
                    opts.rank.or(default_rank)
                };
                svd::factor_dense(module, &mixed, rows, cols, needed, &opts.svd)?
            };
            let rank = if exact {
                // Lossless: every non-negligible triplet.
                let tol = f.svd.s.first().copied().unwrap_or(0.0) * 1e-7;
                f.svd.s.iter().take_while(|&&x| x > tol).count()
            } else {
                let r = opts.rank.or(default_rank).ok_or_else(|| {
                    Error::Options(format!(
                        "module {module}: no input is low-rank, so there is no default output rank; pass --rank"
                    ))
                })?;
                r.min(rows.min(cols))
            }
            .max(1);
            write_lora(out, module, &first.layer, &f.svd, rank, opts.dtype)?;
            rep.modules.push(ModuleReport {
                module: module.clone(),
                rows,
                cols,
                rank_before: before,
                rank,
                error: f.error_at(rank),
                energy: f.energy_at(rank),
                method: f.kind.name(),
            });
        }
        targets.push(module.clone());
        out_dims.insert(module.clone(), rows);
    }

    // Vector updates (biases, norms): combined by the same rule.
    let mut vec_targets: Vec<String> = Vec::new();
    let mut vec_entries: BTreeMap<String, Vec<(usize, &crate::deltas::VectorDelta)>> =
        BTreeMap::new();
    for (i, (_, deltas)) in inputs.iter().enumerate() {
        for v in &deltas.vectors {
            if v.delta.is_some() {
                let e = vec_entries.entry(v.target.clone()).or_default();
                if e.is_empty() {
                    vec_targets.push(v.target.clone());
                }
                e.push((i, v));
            }
        }
    }
    let mut biases: BTreeMap<String, (DType, Vec<f32>)> = BTreeMap::new();
    let mut modules_to_save = Vec::new();
    for target in &vec_targets {
        let entries = &vec_entries[target];
        let v0 = entries[0].1;
        let n = v0.delta.as_ref().map_or(0, Vec::len);
        let idx: Vec<usize> = entries.iter().map(|(i, _)| *i).collect();
        let tensors: Vec<Vec<f32>> = entries
            .iter()
            .map(|(_, v)| v.delta.clone().unwrap_or_default())
            .collect();
        if tensors.iter().any(|t| t.len() != n) {
            return Err(Error::Options(format!(
                "{target}: the adapters' updates differ in length"
            )));
        }
        let mixed = mix(opts, target, &idx, tensors, 1, n)?;
        if target.ends_with(".bias") && out_dims.get(&v0.module) == Some(&n) {
            biases.insert(v0.module.clone(), (opts.dtype, mixed));
            continue;
        }
        let Some(base) = base else {
            return Err(Error::Options(format!(
                "the combined update of {target} (module {}) has no LoRA form; pass --base to save the updated tensor whole (modules_to_save)",
                v0.module
            )));
        };
        save_whole(base, target, &v0.shape, &mixed, out)?;
        if !modules_to_save.contains(&v0.module) {
            modules_to_save.push(v0.module.clone());
        }
        rep.notes.push(format!(
            "{target}: not the bias of a LoRA module, saved whole (modules_to_save)"
        ));
    }
    for (name, (adapter, tensor)) in &saved_layers {
        copy_tensor(adapter, tensor, name, out)?;
    }
    let cfg = finish_lora(
        out_dims.iter().map(|(m, n)| (m.clone(), (*n, opts.dtype))),
        biases,
        base_model,
        &mut rep,
        targets,
        modules_to_save,
        fan_in_fan_out.unwrap_or(false),
        false,
        out,
    )?;
    Ok((cfg, rep))
}

/// PEFT's combination types, by `add_weighted_adapter`'s names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftCombination {
    /// `cat`.
    Cat,
    /// `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the `A`s and `B`s
    /// mixed separately.
    Factors(PeftKind),
    /// `svd`, `ties_svd`, …: the `ΔWᵢ` mixed, then a truncated SVD.
    Svd(PeftKind),
}

impl PeftCombination {
    /// `combination_type` as PEFT spells it.
    pub fn from_name(name: &str) -> Option<Self> {
        use PeftKind::*;
        Some(match name {
            "cat" => PeftCombination::Cat,
            "linear" => PeftCombination::Factors(Linear),
            "ties" => PeftCombination::Factors(Ties),
            "dare_linear" => PeftCombination::Factors(DareLinear),
            "dare_ties" => PeftCombination::Factors(DareTies),
            "magnitude_prune" => PeftCombination::Factors(MagnitudePrune),
            "svd" => PeftCombination::Svd(Linear),
            "ties_svd" => PeftCombination::Svd(Ties),
            "dare_linear_svd" => PeftCombination::Svd(DareLinear),
            "dare_ties_svd" => PeftCombination::Svd(DareTies),
            "magnitude_prune_svd" => PeftCombination::Svd(MagnitudePrune),
            _ => return None,
        })
    }
}

/// Options of [`combine_peft`].
#[derive(Debug, Clone)]
pub struct PeftCombineOptions {
    /// The combination type.
    pub combination: PeftCombination,
    /// One weight per adapter.
    pub weights: Vec<f64>,
    /// `svd_rank`.
    pub svd_rank: Option<usize>,
    /// `density`.
    pub density: Option<f64>,
    /// `majority_sign_method`.
    pub majority: Majority,
    /// `torch.manual_seed` before the call: DARE's masks are drawn from torch's CPU generator as
    /// PEFT draws them (see [`torch_draws`]).
    pub seed: u64,
}

fn config_rank(cfg: &Value) -> u64 {
    let r = cfg.get("r").and_then(Value::as_u64).unwrap_or(8);
    cfg.get("rank_pattern")
        .and_then(Value::as_object)
        .map(|p| p.values().filter_map(Value::as_u64).fold(r, u64::max))
        .unwrap_or(r)
}

struct Factor {
    values: Vec<f32>,
    shape: Vec<u64>,
    dtype: DType,
}

fn read(adapter: &Adapter, name: &str) -> Result<Factor> {
    let info = adapter
        .tensors
        .info(name)
        .ok_or_else(|| adapterkit_core::Error::TensorNotFound {
            name: name.to_string(),
        })?
        .clone();
    Ok(Factor {
        values: adapter.tensors.read_f32(name)?,
        shape: info.shape,
        dtype: info.dtype,
    })
}

/// Where a Llama- or GPT-2-style module sits in `model.named_modules()`: (layer, position), or
/// `None` for a name outside those layouts.
fn model_order(module: &str) -> Option<(u64, usize)> {
    const ORDER: [&str; 11] = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    ];
    let parts: Vec<&str> = module.split('.').collect();
    let at = parts.iter().position(|p| *p == "layers" || *p == "h")?;
    let layer = parts.get(at + 1)?.parse().ok()?;
    let sub = parts.get(at + 2..)?.join(".");
    Some((layer, ORDER.iter().position(|o| *o == sub)?))
}

/// torch's CPU draws for PEFT's DARE, when they can be replayed: after
/// `torch.manual_seed(seed)`, `add_weighted_adapter` first creates the new adapter's layers in
/// model order (`nn.Linear(in, r)` and `nn.Linear(r, out)` each draw one uniform per weight, then
/// `kaiming_uniform_` redraws `A`), then, module by module, `torch.bernoulli` draws one uniform
/// (`(u & 0xFFFFFF)·2⁻²⁴`) per element of each pruned tensor in order. `modules` are
/// (name, in, out) in model order; `sizes[m]` the element counts pruned in module `m`, in order.
/// Returns the uniforms per module and tensor.
fn torch_draws(
    seed: u64,
    r: usize,
    modules: &[(&str, usize, usize)],
    sizes: &[Vec<usize>],
) -> Vec<Vec<Vec<f64>>> {
    let mut g = crate::torch_rng::Mt19937::new(seed);
    for &(_, inp, out) in modules {
        for _ in 0..(2 * r * inp + out * r) {
            g.next_u32();
        }
    }
    sizes
        .iter()
        .map(|per| {
            per.iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| (g.next_u32() & 0xff_ffff) as f64 / (1u64 << 24) as f64)
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Reproduce PEFT's `add_weighted_adapter(adapters, weights, combination_type, svd_rank,
/// density, majority_sign_method)` on LoRA adapters (each with its `adapter_config.json`),
/// writing the adapter PEFT would save. Returns its config.
pub fn combine_peft(
    inputs: &[(&Adapter, &Value)],
    opts: &PeftCombineOptions,
    out: &mut AdapterWriter,
) -> Result<Value> {
    if opts.weights.len() != inputs.len() || inputs.is_empty() {
        return Err(Error::Options(format!(
            "{} weight(s) for {} adapter(s)",
            opts.weights.len(),
            inputs.len()
        )));
    }
    // Only plain LoRA modules: PEFT's LoraModel method.
    let mut modules: Vec<Vec<(&str, &LowRank)>> = Vec::new();
    let mut saved_layers: BTreeMap<String, (&Adapter, String)> = BTreeMap::new();
    for (adapter, cfg) in inputs {
        if adapter.method != "LORA" {
            return Err(Error::Options(format!(
                "{}: --compat peft reproduces LoraModel.add_weighted_adapter, which takes LoRA adapters; this is {}",
                adapter.path.display(),
                adapter.method
            )));
        }
        if cfg
            .get("target_parameters")
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(Error::Options(format!(
                "{}: add_weighted_adapter does not support targeting nn.Parameter (target_parameters)",
                adapter.path.display()
            )));
        }
        let mut ms = Vec::new();
        for m in &adapter.modules {
            match &m.payload {
                // PEFT saves the embedding layers of an adapter that targets them
                // (`save_embedding_layers="auto"`) and loads them into the model: the combined
                // adapter is saved with the model's copy, which is the last loaded adapter's.
                Payload::Replace { tensor } if is_saved_layer(tensor) => {
                    saved_layers.insert(tensor.clone(), (adapter, tensor.clone()));
                }
                Payload::LowRank(lr) if lr.magnitude.is_none() && lr.singular_values.is_none() => {
                    ms.push((m.module.as_str(), lr))
                }
                Payload::LowRank(_) => {
                    return Err(Error::Options(format!(
                        "{}: module {} is DoRA; PEFT's add_weighted_adapter would give the result a fresh magnitude from the base weight, which --compat peft does not reproduce",
                        adapter.path.display(),
                        m.module
                    )))
                }
                other => {
                    return Err(Error::Options(format!(
                        "{}: {} ({}) is not a LoRA module; --compat peft combines LoRA factors only (modules_to_save, lora_bias and trainable tokens are not carried by add_weighted_adapter)",
                        adapter.path.display(),
                        m.module,
                        other.kind()
                    )))
                }
            }
        }
        modules.push(ms);
    }

    let single = inputs.len() == 1;
    let combination = if single {
        PeftCombination::Factors(PeftKind::Linear)
    } else {
        opts.combination
    };
    let ranks: Vec<u64> = inputs.iter().map(|(_, c)| config_rank(c)).collect();
    let new_rank = match combination {
        PeftCombination::Factors(_) => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(Error::Options(format!(
                    "all adapters must have the same r for combination types linear, ties, dare_ties, dare_linear and magnitude_prune (PEFT's rule), got {ranks:?}; use cat or an svd type"
                )));
            }
            ranks[0]
        }
        PeftCombination::Cat => ranks.iter().sum(),
        PeftCombination::Svd(_) => opts
            .svd_rank
            .map_or_else(|| ranks.iter().copied().max().unwrap_or(0), |r| r as u64),
    };
    let needs_density = !matches!(
        combination,
        PeftCombination::Cat
            | PeftCombination::Factors(PeftKind::Linear)
            | PeftCombination::Svd(PeftKind::Linear)
    );
    let d = if needs_density {
        let d = opts.density.ok_or_else(|| {
            Error::Options(
                "this combination type needs --density (PEFT fails with a TypeError without one)"
                    .into(),
            )
        })?;
        if d < 0.0 {
            return Err(Error::Options(format!("Density should be >= 0, got {d}")));
        }
        d
    } else {
        1.0
    };

    // target_modules: the union of the lists, or the alternation of the regexes.
    let tm: Vec<&Value> = inputs
        .iter()
        .map(|(_, c)| c.get("target_modules").unwrap_or(&Value::Null))
        .collect();
    let new_targets = if tm.iter().all(|v| v.is_string()) {
        json!(tm
            .iter()
            .map(|v| format!("({})", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("|"))
    } else if tm.iter().all(|v| v.is_array()) {
        let mut all: Vec<String> = tm
            .iter()
            .flat_map(|v| v.as_array().into_iter().flatten())
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect();
        all.sort();
        all.dedup();
        json!(all)
    } else {
        return Err(Error::Options(
            "all adapter configs should follow the same target modules type; combining adapters whose target_modules mix a list and a regex string is not supported (PEFT's rule)".into(),
        ));
    };

    // Modules in order of first appearance.
    let mut order: Vec<&str> = Vec::new();
    for ms in &modules {
        for (m, _) in ms {
            if !order.contains(m) {
                order.push(m);
            }
        }
    }
    let known = order.iter().all(|m| model_order(m).is_some())
        && modules
            .iter()
            .flatten()
            .all(|(_, lr)| matches!(lr.layer, LayerKind::Linear { .. }));
    if known {
        order.sort_by_key(|m| model_order(m));
    }
    let k = new_rank as usize;
    let random_prune = d < 1.0
        && matches!(
            combination,
            PeftCombination::Factors(PeftKind::DareLinear | PeftKind::DareTies)
                | PeftCombination::Svd(PeftKind::DareLinear | PeftKind::DareTies)
        );
    // torch's draws, module by module (None: not replayable, our own stream is used).
    let mut draws: Option<std::collections::VecDeque<Vec<Vec<f64>>>> = None;
    if random_prune && known {
        let shape = |a: &Adapter, n: &str| {
            a.tensors
                .info(n)
                .map(|i| i.shape.clone())
                .unwrap_or_default()
        };
        let mut dims = Vec::new();
        let mut sizes = Vec::new();
        for module in &order {
            let lrs: Vec<(&Adapter, &LowRank)> = modules
                .iter()
                .zip(inputs)
                .filter_map(|(ms, (a, _))| {
                    ms.iter()
                        .find(|(m, _)| m == module)
                        .map(|(_, lr)| (*a, *lr))
                })
                .collect();
            let (a0, lr0) = lrs[0];
            let inp = shape(a0, &lr0.a).get(1).copied().unwrap_or(0) as usize;
            let outp = shape(a0, &lr0.b).first().copied().unwrap_or(0) as usize;
            dims.push((*module, inp, outp));
            let numel = |a: &Adapter, n: &str| shape(a, n).iter().product::<u64>() as usize;
            sizes.push(match combination {
                PeftCombination::Svd(_) => vec![inp * outp; lrs.len()],
                _ => lrs
                    .iter()
                    .map(|(a, lr)| numel(a, &lr.a))
                    .chain(lrs.iter().map(|(a, lr)| numel(a, &lr.b)))
                    .collect(),
            });
        }
        draws = Some(torch_draws(opts.seed, k, &dims, &sizes).into());
    }
    for module in order {
        let module_draws = draws.as_mut().and_then(|d| d.pop_front());
        let entries: Vec<(usize, &LowRank)> = modules
            .iter()
            .enumerate()
            .filter_map(|(i, ms)| {
                ms.iter()
                    .find(|(m, _)| *m == module)
                    .map(|(_, lr)| (i, *lr))
            })
            .collect();
        let layer = entries[0].1.layer.clone();
        let (an, bn) = match layer {
            LayerKind::Embedding => (
                format!("{}.lora_embedding_A", peft_key(module)),
                format!("{}.lora_embedding_B", peft_key(module)),
            ),
            _ => (
                format!("{}.lora_A.weight", peft_key(module)),
                format!("{}.lora_B.weight", peft_key(module)),
            ),
        };
        let facts: Vec<(Factor, Factor)> = entries
            .iter()
            .map(|(i, lr)| Ok((read(inputs[*i].0, &lr.a)?, read(inputs[*i].0, &lr.b)?)))
            .collect::<Result<_>>()?;
        let a_rest: Vec<u64> = facts[0].0.shape[1..].to_vec();
        let b_trail: Vec<u64> = facts[0].1.shape[2..].to_vec();
        let rows = facts[0].1.shape[0] as usize;
        let a_width: usize = a_rest.iter().product::<u64>() as usize;
        let dtype = facts[0].0.dtype;
        for ((a, b), (i, _)) in facts.iter().zip(&entries) {
            if a.shape[1..] != a_rest[..]
                || b.shape[0] as usize != rows
                || b.shape[2..] != b_trail[..]
            {
                return Err(Error::Options(format!(
                    "module {module}: {} has A {:?} and B {:?}, the first adapter A {:?} and B {:?}",
                    inputs[*i].0.path.display(),
                    a.shape,
                    b.shape,
                    facts[0].0.shape,
                    facts[0].1.shape
                )));
            }
        }
        let mut a_shape = vec![new_rank];
        a_shape.extend(&a_rest);
        let mut b_shape = vec![rows as u64, new_rank];
        b_shape.extend(&b_trail);
        match combination {
            PeftCombination::Cat => {
                let mut a_out = vec![0f32; k * a_width];
                let mut b_out = vec![0f32; rows * k];
                let mut at = 0;
                for ((a, b), (i, lr)) in facts.iter().zip(&entries) {
                    let ri = a.shape[0] as usize;
                    let (w, s) = (opts.weights[*i] as f32, lr.scale as f32);
                    for (o, x) in a_out[at * a_width..(at + ri) * a_width]
                        .iter_mut()
                        .zip(&a.values)
                    {
                        *o = *x * w * s;
                    }
                    for row in 0..rows {
                        b_out[row * k + at..row * k + at + ri]
                            .copy_from_slice(&b.values[row * ri..(row + 1) * ri]);
                    }
                    at += ri;
                }
                out.add_f32(&an, dtype, a_shape, &a_out)?;
                out.add_f32(&bn, dtype, b_shape, &b_out)?;
            }
            PeftCombination::Factors(kind) => {
                let mut wa = Vec::new();
                let mut wb = Vec::new();
                for (i, lr) in &entries {
                    let ws = opts.weights[*i] * lr.scale;
                    let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
                    wa.push(ws.abs().sqrt() * sign);
                    wb.push(ws.abs().sqrt());
                }
                let ranks: Vec<u64> = facts.iter().map(|(a, _)| a.shape[0]).collect();
                if ranks.iter().any(|&r| r != new_rank) {
                    return Err(Error::Options(format!(
                        "module {module}: the adapters' ranks here are {ranks:?} but the combined r is {new_rank}; PEFT's {} stacks the factors, which needs them equal (its file would be unloadable or it fails)",
                        match kind { PeftKind::Linear => "linear", PeftKind::Ties => "ties", PeftKind::DareLinear => "dare_linear", PeftKind::DareTies => "dare_ties", PeftKind::MagnitudePrune => "magnitude_prune" }
                    )));
                }
                let idx: Vec<usize> = entries.iter().map(|(i, _)| *i).collect();
                let sa: Vec<Uniforms> = idx
                    .iter()
                    .map(|&i| Uniforms::new(opts.seed, i, &an))
                    .collect();
                let sb: Vec<Uniforms> = idx
                    .iter()
                    .map(|&i| Uniforms::new(opts.seed, i, &bn))
                    .collect();
                let n = idx.len();
                let torch = module_draws.as_ref();
                let ra = |i: usize, j: usize| torch.map_or_else(|| sa[i].at(j as u64), |t| t[i][j]);
                let rb =
                    |i: usize, j: usize| torch.map_or_else(|| sb[i].at(j as u64), |t| t[n + i][j]);
                let a_out = methods::peft_mix(
                    kind,
                    facts.iter().map(|(a, _)| a.values.clone()).collect(),
                    &wa,
                    d,
                    opts.majority,
                    &ra,
                );
                let b_out = methods::peft_mix(
                    kind,
                    facts.iter().map(|(_, b)| b.values.clone()).collect(),
                    &wb,
                    d,
                    opts.majority,
                    &rb,
                );
                out.add_f32(&an, dtype, a_shape, &a_out)?;
                out.add_f32(&bn, dtype, b_shape, &b_out)?;
            }
            PeftCombination::Svd(kind) => {
                let cols = a_width;
                if k > rows.min(cols) {
                    return Err(Error::Options(format!(
                        "module {module}: svd rank {k} exceeds min(out, in) = {}; PEFT writes factors it cannot load back in that case",
                        rows.min(cols)
                    )));
                }
                // get_delta_weight: s·B·A per adapter, in (out, in·k) orientation.
                let deltas = entries
                    .iter()
                    .map(|(i, lr)| {
                        Ok(lora_product(inputs[*i].0, module, module, Vec::new(), lr)?.dense())
                    })
                    .collect::<Result<Vec<_>>>()?;
                let idx: Vec<usize> = entries.iter().map(|(i, _)| *i).collect();
                let ws: Vec<f64> = idx.iter().map(|&i| opts.weights[i]).collect();
                let streams: Vec<Uniforms> = idx
                    .iter()
                    .map(|&i| Uniforms::new(opts.seed, i, module))
                    .collect();
                let torch = module_draws.as_ref();
                let rd =
                    |i: usize, j: usize| torch.map_or_else(|| streams[i].at(j as u64), |t| t[i][j]);
                let mixed = methods::peft_mix(kind, deltas, &ws, d, opts.majority, &rd);
                let f =
                    svd::factor_dense(module, &mixed, rows, cols, None, &SvdOptions::default())?;
                let sv = &f.svd;
                let n = sv.s.len();
                let mut b_out = vec![0f32; rows * k];
                for row in 0..rows {
                    for t in 0..k.min(n) {
                        b_out[row * k + t] = (sv.u[row * n + t] * sv.s[t]) as f32;
                    }
                }
                let mut a_out = vec![0f32; k * cols];
                for t in 0..k.min(n) {
                    for c in 0..cols {
                        a_out[t * cols + c] = sv.vt[t * cols + c] as f32;
                    }
                }
                out.add_f32(&an, dtype, a_shape, &a_out)?;
                out.add_f32(&bn, dtype, b_shape, &b_out)?;
            }
        }
    }
    for (name, (adapter, tensor)) in &saved_layers {
        copy_tensor(adapter, tensor, name, out)?;
    }
    let mut cfg = inputs[0].1.clone();
    if let Some(o) = cfg.as_object_mut() {
        o.insert("r".into(), json!(new_rank));
        o.insert("lora_alpha".into(), json!(new_rank));
        o.insert("target_modules".into(), new_targets);
        o.insert("alpha_pattern".into(), json!({}));
        o.insert("rank_pattern".into(), json!({}));
        o.insert("inference_mode".into(), json!(true));
    }
    Ok(cfg)
}
