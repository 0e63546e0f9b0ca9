//! SVD re-factorisation of adapters: `compress` (a LoRA to a lower rank, optimal by
//! Eckart–Young, without forming `ΔW`) and `to_lora` (any family's `ΔW` to a LoRA).

use std::collections::BTreeMap;

use adapterkit_core::ir::{Adapter, LayerKind};
use adapterkit_core::{DType, TensorSource};
use adapterkit_formats::AdapterWriter;
use serde_json::{json, Map, Value};

use crate::deltas::{DeltaData, Deltas, ModuleDelta};
use crate::error::{Error, Result};
use crate::svd::{self, Factored, RankPolicy, SvdOptions};

/// What happened to one module.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleReport {
    /// Module path.
    pub module: String,
    /// `ΔW` shape in PEFT's orientation.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The input rank (LoRA rank, or the dense update's numerical rank when it was computed).
    pub rank_before: Option<usize>,
    /// The rank written.
    pub rank: usize,
    /// Relative Frobenius error `‖ΔW − ΔW_r‖/‖ΔW‖` of the truncation.
    pub error: f64,
    /// Fraction of `Σσ²` kept.
    pub energy: f64,
    /// How the SVD was computed.
    pub method: &'static str,
}

/// What a re-factorisation did.
#[derive(Debug, Clone, Default)]
pub struct LowRankReport {
    /// One entry per factorised module.
    pub modules: Vec<ModuleReport>,
    /// Things the user should know (what was carried over or baked).
    pub notes: Vec<String>,
}

impl LowRankReport {
    /// The largest relative error over the modules.
    pub fn max_error(&self) -> f64 {
        self.modules.iter().map(|m| m.error).fold(0.0, f64::max)
    }
}

/// Options of a re-factorisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowRankOptions {
    /// How ranks are chosen.
    pub policy: RankPolicy,
    /// Give each module its own rank (written to `rank_pattern`); otherwise every module gets the
    /// largest rank the policy picks for any module.
    pub per_module: bool,
    /// SVD options for dense updates.
    pub svd: SvdOptions,
}

/// PEFT's key prefix for a module of a `PeftModel`.
pub fn peft_key(module: &str) -> String {
    format!("base_model.model.{module}")
}

/// Choose ranks for factorised modules: per module, or one uniform rank (capped per module by
/// what the module can hold).
fn choose_ranks(fs: &[&Factored], opts: &LowRankOptions) -> Vec<usize> {
    let own: Vec<usize> = fs
        .iter()
        .map(|f| opts.policy.choose(&f.svd.s, f.total_sq))
        .collect();
    if opts.per_module {
        return own;
    }
    let uniform = own.iter().copied().max().unwrap_or(0);
    fs.iter()
        .map(|f| {
            let nonzero = f.svd.s.iter().take_while(|&&x| x > 0.0).count();
            uniform.min(nonzero).max(usize::from(nonzero > 0))
        })
        .collect()
}

/// The most common value (ties: the largest), PEFT's `r` when ranks differ per module.
fn common_rank(ranks: &[usize]) -> usize {
    let mut count: BTreeMap<usize, usize> = BTreeMap::new();
    for &r in ranks {
        *count.entry(r).or_default() += 1;
    }
    count
        .into_iter()
        .max_by_key(|&(r, c)| (c, r))
        .map(|(r, _)| r)
        .unwrap_or(1)
}

fn rank_f64(x: u64) -> Value {
    json!(x)
}

fn factor(md: &ModuleDelta, needed: Option<usize>, opts: &SvdOptions) -> Result<Factored> {
    match &md.data {
        DeltaData::Product { l, r, k } => {
            svd::factor_product(&md.module, l, r, md.rows, *k, md.cols)
        }
        DeltaData::Dense(d) => svd::factor_dense(&md.module, d, md.rows, md.cols, needed, opts),
    }
}

fn report(md: &ModuleDelta, f: &Factored, rank: usize, before: Option<usize>) -> ModuleReport {
    ModuleReport {
        module: md.module.clone(),
        rows: md.rows,
        cols: md.cols,
        rank_before: before,
        rank,
        error: f.error_at(rank),
        energy: f.energy_at(rank),
        method: f.kind.name(),
    }
}

/// Shapes of a LoRA's `A` and `B` for a layer, rank `r`, `ΔW` `rows × cols` (PEFT orientation).
fn lora_shapes(layer: &LayerKind, r: usize, rows: usize, cols: usize) -> (Vec<u64>, Vec<u64>) {
    let (r, rows, cols) = (r as u64, rows as u64, cols as u64);
    match layer {
        LayerKind::Conv { kernel } => {
            let kprod: u64 = kernel.iter().product::<u64>().max(1);
            let mut a = vec![r, cols / kprod];
            a.extend(kernel);
            let mut b = vec![rows, r];
            b.extend(kernel.iter().map(|_| 1u64));
            (a, b)
        }
        _ => (vec![r, cols], vec![rows, r]),
    }
}

/// Tensor names of a LoRA module's `A` and `B`.
fn lora_names(module: &str, layer: &LayerKind) -> (String, String) {
    let p = peft_key(module);
    match layer {
        LayerKind::Embedding => (
            format!("{p}.lora_embedding_A"),
            format!("{p}.lora_embedding_B"),
        ),
        _ => (format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight")),
    }
}

/// Write the rank-`rank` truncation of `svd` (a `ΔW` in PEFT's orientation) as `module`'s LoRA
/// `A`/`B` for `layer` at scale 1, in `dtype`; a factor is padded with zeros where the update has
/// fewer non-zero triplets than the rank.
pub(crate) fn write_lora(
    out: &mut AdapterWriter,
    module: &str,
    layer: &LayerKind,
    svd: &adapterkit_linalg::Svd,
    rank: usize,
    dtype: DType,
) -> Result<()> {
    let (b, a) = svd::lora_factors(svd, rank, 1.0);
    let (a_shape, b_shape) = lora_shapes(layer, rank, svd.rows, svd.cols);
    let a = pad(a, a_shape.iter().product::<u64>() as usize);
    let b = pad_cols(b, svd.rows, svd.s.len().min(rank), rank);
    let (an, bn) = lora_names(module, layer);
    out.add_f32(&an, dtype, a_shape, &a)?;
    out.add_f32(&bn, dtype, b_shape, &b)?;
    Ok(())
}

/// Write exact factors `ΔW = L·R` (`L` is `rows × k`, `R` is `k × cols`, row-major, the scale
/// folded in) as `module`'s LoRA `B = L`, `A = R` for `layer` at scale 1, in `dtype`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_factors(
    out: &mut AdapterWriter,
    module: &str,
    layer: &LayerKind,
    l: &[f64],
    r: &[f64],
    rows: usize,
    k: usize,
    cols: usize,
    dtype: DType,
) -> Result<()> {
    let (a_shape, b_shape) = lora_shapes(layer, k, rows, cols);
    let a: Vec<f32> = r.iter().map(|&x| x as f32).collect();
    let b: Vec<f32> = l.iter().map(|&x| x as f32).collect();
    let (an, bn) = lora_names(module, layer);
    out.add_f32(&an, dtype, a_shape, &a)?;
    out.add_f32(&bn, dtype, b_shape, &b)?;
    Ok(())
}

/// Re-factorise every LoRA module of a PEFT LoRA adapter (`config` is its
/// `adapter_config.json`) to the ranks `opts` picks, writing the result to `out`. Every other
/// tensor (DoRA magnitudes, `lora_bias`, `modules_to_save`, trainable tokens) is copied byte for
/// byte and every config field but `r` and `rank_pattern` is kept; each module keeps its alpha, so
/// `B·A` absorbs the new `α/r`. Returns the new config and the report.
pub fn compress(
    adapter: &Adapter,
    config: &Value,
    opts: &LowRankOptions,
    out: &mut AdapterWriter,
) -> Result<(Value, LowRankReport)> {
    opts.policy.validate()?;
    if adapter.method != "LORA" {
        return Err(Error::Options(format!(
            "{}: compress re-factorises LoRA adapters and this is a {} adapter; use `adapterkit convert --to-family lora` to turn it into one",
            adapter.path.display(),
            adapter.method
        )));
    }
    let deltas = crate::deltas::lora_products(adapter)?;
    let fs: Vec<Factored> = deltas
        .iter()
        .map(|md| factor(md, None, &opts.svd))
        .collect::<Result<_>>()?;
    let ranks = choose_ranks(&fs.iter().collect::<Vec<_>>(), opts);
    let mut rep = LowRankReport::default();
    let mut replaced: BTreeMap<String, (DType, Vec<u64>, Vec<f32>)> = BTreeMap::new();
    for ((md, f), &rank) in deltas.iter().zip(&fs).zip(&ranks) {
        let lr = md.lora.as_ref().expect("lora_products sets lora");
        let rank = rank.max(1);
        let scale = if lr.rslora {
            lr.alpha / (rank as f64).sqrt()
        } else {
            lr.alpha / rank as f64
        };
        let (b, a) = svd::lora_factors(&f.svd, rank, scale);
        let (a_shape, b_shape) = lora_shapes(&md.layer, rank, md.rows, md.cols);
        // Pad a factor when the module's update has fewer non-zero triplets than the rank.
        let a = pad(a, a_shape.iter().product::<u64>() as usize);
        let b = pad_cols(b, md.rows, f.svd.s.len().min(rank), rank);
        let dt = |n: &str| {
            adapter
                .tensors
                .info(n)
                .map(|i| i.dtype)
                .unwrap_or(DType::F32)
        };
        replaced.insert(lr.a.clone(), (dt(&lr.a), a_shape, a));
        replaced.insert(lr.b.clone(), (dt(&lr.b), b_shape, b));
        rep.modules
            .push(report(md, f, rank, Some(lr.rank as usize)));
    }
    for name in &adapter.tensor_names {
        match replaced.remove(name) {
            Some((dtype, shape, v)) => {
                let dtype = if dtype.is_writable_float() {
                    dtype
                } else {
                    DType::F32
                };
                out.add_f32(name, dtype, shape, &v)?;
            }
            None => {
                let info = adapter
                    .tensors
                    .info(name)
                    .ok_or_else(|| adapterkit_core::Error::TensorNotFound { name: name.clone() })?
                    .clone();
                let mut bytes = vec![0u8; info.len as usize];
                adapter.tensors.read_bytes(name, 0, &mut bytes)?;
                out.add(name, info.dtype, info.shape.clone(), &bytes)?;
            }
        }
    }
    let r = common_rank(&rep.modules.iter().map(|m| m.rank).collect::<Vec<_>>());
    let mut cfg = config.clone();
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| Error::Options("adapter_config.json is not an object".into()))?;
    obj.insert("r".into(), json!(r));
    let pattern: Map<String, Value> = rep
        .modules
        .iter()
        .filter(|m| m.rank != r)
        .map(|m| (m.module.clone(), rank_f64(m.rank as u64)))
        .collect();
    obj.insert("rank_pattern".into(), Value::Object(pattern));
    Ok((cfg, rep))
}

fn pad(mut v: Vec<f32>, len: usize) -> Vec<f32> {
    v.resize(len, 0.0);
    v
}

/// Widen a `rows × have` row-major matrix to `rows × want` with zero columns.
fn pad_cols(v: Vec<f32>, rows: usize, have: usize, want: usize) -> Vec<f32> {
    if have == want {
        return v;
    }
    let mut out = vec![0f32; rows * want];
    for i in 0..rows {
        out[i * want..i * want + have].copy_from_slice(&v[i * have..(i + 1) * have]);
    }
    out
}

/// Turn every update of an adapter into a PEFT LoRA: each weight's `ΔW` (see
/// [`crate::deltas::adapter_deltas`]) is factorised and truncated by `opts`; DoRA modules stay DoRA
/// (their magnitudes are copied); whole-tensor replacements become `modules_to_save`; other
/// vector updates become `lora_bias` on their module's LoRA, or, for a module without one, the
/// updated tensor saved whole (which needs `base`). Written with `α = r` per
/// module (scale 1), factors in `dtype`. `adapter` supplies the tensors that are carried over.
pub fn to_lora(
    adapter: &Adapter,
    deltas: &Deltas,
    base: Option<&dyn TensorSource>,
    base_model: Option<&str>,
    dtype: DType,
    opts: &LowRankOptions,
    out: &mut AdapterWriter,
) -> Result<(Value, LowRankReport)> {
    opts.policy.validate()?;
    if deltas.matrices.is_empty() {
        return Err(Error::Options(format!(
            "{}: this {} adapter changes no weight matrix (only vectors such as biases or norms), so it has no LoRA form (PEFT refuses a LoRA without target modules); merge it as it is",
            adapter.path.display(),
            adapter.method
        )));
    }
    let needed = opts.policy.needed();
    let fs: Vec<Factored> = deltas
        .matrices
        .iter()
        .map(|md| factor(md, needed, &opts.svd))
        .collect::<Result<_>>()?;
    let ranks = choose_ranks(&fs.iter().collect::<Vec<_>>(), opts);
    let mut rep = LowRankReport::default();
    let mut targets = Vec::new();
    let mut fan_in_fan_out = None;
    let mut dora = false;
    // Modules whose bias gets a LoRA bias, and the bias length.
    let mut lora_out_dims: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for ((md, f), &rank) in deltas.matrices.iter().zip(&fs).zip(&ranks) {
        let rank = rank.max(1);
        if let LayerKind::Linear { fan_in_fan_out: t } = md.layer {
            match fan_in_fan_out {
                None => fan_in_fan_out = Some(t),
                Some(prev) if prev != t => {
                    return Err(Error::Options(format!(
                        "{}: some linear modules store their weight (in, out) and others (out, in); PEFT's fan_in_fan_out is one flag for the whole adapter",
                        adapter.path.display()
                    )))
                }
                _ => {}
            }
        }
        write_lora(out, &md.module, &md.layer, &f.svd, rank, dtype)?;
        if let Some(m) = md.lora.as_ref().and_then(|lr| lr.magnitude.as_ref()) {
            dora = true;
            copy_tensor(
                adapter,
                m,
                &format!("{}.lora_magnitude_vector", peft_key(&md.module)),
                out,
            )?;
        }
        let before = md.lora.as_ref().map(|lr| lr.rank as usize);
        rep.modules.push(report(md, f, rank, before));
        targets.push(md.module.clone());
        lora_out_dims.insert(md.module.clone(), (md.rows, 1.0));
    }
    if dora
        && rep.modules.len()
            != deltas
                .matrices
                .iter()
                .filter(|m| m.lora.as_ref().is_some_and(|l| l.magnitude.is_some()))
                .count()
    {
        return Err(Error::Options(format!(
            "{}: DoRA and non-DoRA modules cannot share one PEFT LoRA config (use_dora is global)",
            adapter.path.display()
        )));
    }
    let mut modules_to_save = Vec::new();
    let mut biases: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for v in &deltas.vectors {
        if let Some(rep_tensor) = &v.replacement {
            copy_tensor(adapter, rep_tensor, &peft_key(&v.target), out)?;
            if !modules_to_save.contains(&v.module) {
                modules_to_save.push(v.module.clone());
            }
            rep.notes.push(format!(
                "{}: replaced whole, kept as modules_to_save",
                v.target
            ));
            continue;
        }
        let Some(delta) = &v.delta else { continue };
        if v.target.ends_with(".bias")
            && lora_out_dims
                .get(&v.module)
                .is_some_and(|(n, _)| *n == delta.len())
        {
            biases.insert(v.module.clone(), delta.clone());
            continue;
        }
        // No LoRA on this module: save the updated tensor whole.
        let Some(base) = base else {
            return Err(Error::Options(format!(
                "{}: the update of {} (a {}-element vector of module {}) has no LoRA form; pass --base to save the updated tensor whole (modules_to_save)",
                adapter.path.display(),
                v.target,
                delta.len(),
                v.module
            )));
        };
        save_whole(base, &v.target, &v.shape, delta, out)?;
        if !modules_to_save.contains(&v.module) {
            modules_to_save.push(v.module.clone());
        }
        rep.notes.push(format!(
            "{}: not the bias of a LoRA module, saved whole (modules_to_save)",
            v.target
        ));
    }
    let outs = lora_out_dims
        .iter()
        .map(|(m, (n, _))| (m.clone(), (*n, dtype)));
    let biases = biases.into_iter().map(|(m, b)| (m, (dtype, b))).collect();
    let cfg = finish_lora(
        outs,
        biases,
        base_model,
        &mut rep,
        targets,
        modules_to_save,
        fan_in_fan_out.unwrap_or(false),
        dora,
        out,
    )?;
    Ok((cfg, rep))
}

/// Save `base[target] + delta` whole (for `modules_to_save`) under PEFT's key, in the base
/// tensor's dtype.
pub(crate) fn save_whole(
    base: &dyn TensorSource,
    target: &str,
    shape: &[u64],
    delta: &[f32],
    out: &mut AdapterWriter,
) -> Result<()> {
    let info = base
        .info(target)
        .ok_or_else(|| adapterkit_core::Error::TensorNotFound {
            name: target.to_string(),
        })?
        .clone();
    let mut w = base.read_f32(target)?;
    for (x, d) in w.iter_mut().zip(delta) {
        *x += d;
    }
    let dt = if info.dtype.is_writable_float() {
        info.dtype
    } else {
        DType::F32
    };
    out.add_f32(&peft_key(target), dt, shape.to_vec(), &w)
        .map_err(Into::into)
}

/// The end of writing a LoRA: `lora_bias` for every module when any bias changed, and the
/// config, which it returns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_lora(
    lora_modules: impl IntoIterator<Item = (String, (usize, DType))>,
    biases: BTreeMap<String, (DType, Vec<f32>)>,
    base_model: Option<&str>,
    rep: &mut LowRankReport,
    targets: Vec<String>,
    modules_to_save: Vec<String>,
    fan_in_fan_out: bool,
    dora: bool,
    out: &mut AdapterWriter,
) -> Result<Value> {
    let lora_bias = !biases.is_empty();
    if lora_bias {
        write_lora_biases(lora_modules, biases, out)?;
        rep.notes.push(
            "bias updates written as lora_bias (zero for modules whose bias did not change)".into(),
        );
    }
    let cfg = lora_config(
        base_model,
        &rep.modules,
        targets,
        modules_to_save,
        fan_in_fan_out,
        lora_bias,
        dora,
    );
    Ok(cfg)
}

/// PEFT's `lora_bias` is global: every LoRA module (`modules`: name → (outputs, dtype)) gets a
/// `lora_B.bias`, its update from `biases` or zero. Returns how many were written.
pub(crate) fn write_lora_biases(
    modules: impl IntoIterator<Item = (String, (usize, DType))>,
    mut biases: BTreeMap<String, (DType, Vec<f32>)>,
    out: &mut AdapterWriter,
) -> Result<usize> {
    let mut written = 0;
    for (module, (n, dtype)) in modules {
        let (dtype, b) = biases
            .remove(&module)
            .unwrap_or_else(|| (dtype, vec![0.0; n]));
        out.add_f32(
            &format!("{}.lora_B.bias", peft_key(&module)),
            dtype,
            vec![n as u64],
            &b,
        )?;
        written += 1;
    }
    Ok(written)
}

/// Copy tensor `from` of `adapter` byte for byte to `to` in `out`.
pub(crate) fn copy_tensor(
    adapter: &Adapter,
    from: &str,
    to: &str,
    out: &mut AdapterWriter,
) -> Result<()> {
    let info = adapter
        .tensors
        .info(from)
        .ok_or_else(|| adapterkit_core::Error::TensorNotFound {
            name: from.to_string(),
        })?
        .clone();
    let mut bytes = vec![0u8; info.len as usize];
    adapter.tensors.read_bytes(from, 0, &mut bytes)?;
    out.add(to, info.dtype, info.shape, &bytes)?;
    Ok(())
}

/// A PEFT `LoraConfig` for modules written with `α = r` (scale 1): `r` is the most common rank,
/// `rank_pattern`/`alpha_pattern` name every module whose rank differs.
pub fn lora_config(
    base_model: Option<&str>,
    modules: &[ModuleReport],
    mut targets: Vec<String>,
    mut modules_to_save: Vec<String>,
    fan_in_fan_out: bool,
    lora_bias: bool,
    use_dora: bool,
) -> Value {
    let r = common_rank(&modules.iter().map(|m| m.rank).collect::<Vec<_>>());
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for m in modules.iter().filter(|m| m.rank != r) {
        rank_pattern.insert(m.module.clone(), json!(m.rank));
        alpha_pattern.insert(m.module.clone(), json!(m.rank));
    }
    targets.sort();
    targets.dedup();
    modules_to_save.sort();
    json!({
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": r,
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "modules_to_save": if modules_to_save.is_empty() { Value::Null } else { json!(modules_to_save) },
        "peft_type": "LORA",
        "r": r,
        "alpha_pattern": alpha_pattern,
        "rank_pattern": rank_pattern,
        "revision": null,
        "target_modules": targets,
        "task_type": null,
        "use_dora": use_dora,
        "use_rslora": false,
    })
}
