//! kohya-ss sd-scripts and LyCORIS adapter files: one `.safetensors` of
//! `<prefix><flattened module>.<suffix>` keys (spec: `formats/kohya.md`, `formats/lycoris.md`).
//!
//! Module names are resolved against the base's real names ([`BaseNames`]); without a base they
//! stay flattened, which is enough to inspect, check, and convert between kohya and LyCORIS.
//! Every key must be understood: an unknown suffix, a missing partner or an algorithm this
//! version cannot reproduce is an error naming the key, never a skipped tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use adapterkit_core::ir::{
    Adapter, Family, Hadamard, KronFactor, Kronecker, LayerKind, LowRank, ModuleAdapter, Payload,
    ScaleAxis,
};
use adapterkit_core::{DType, TensorInfo, TensorSource};
use serde_json::{json, Value};

use crate::base_names::{flatten, unresolved, BaseNames, ModelNames};
use crate::convert::fmt_err;
use crate::error::Result;
use crate::flux;
use crate::memory::{scalar, MemorySource};
use crate::peft::PeftAdapter;
use crate::safetensors::SafetensorsFile;

/// kohya / LyCORIS prefixes and the diffusers components they belong to, in lookup order.
/// `lora_te3_` is SD3's third encoder, and Flux's T5 (its pipeline's `text_encoder_2`).
pub const PREFIXES: &[(&str, &[&str])] = &[
    ("lora_unet_", &["unet", "transformer"]),
    ("lora_transformer_", &["transformer"]),
    ("lora_te1_", &["text_encoder"]),
    ("lora_te2_", &["text_encoder_2"]),
    ("lora_te3_", &["text_encoder_3", "text_encoder_2"]),
    ("lora_te_", &["text_encoder"]),
    ("lycoris_", &[""]),
];

/// Prefixes single-file (original layout) checkpoints put in front of a component's names.
const SINGLE_FILE_PREFIXES: &[(&str, &[&str])] = &[
    ("lora_unet_", &["model.diffusion_model."]),
    (
        "lora_te_",
        &[
            "cond_stage_model.transformer.",
            "text_encoders.clip_l.transformer.",
        ],
    ),
    (
        "lora_te1_",
        &[
            "conditioner.embedders.0.transformer.",
            "text_encoders.clip_l.transformer.",
        ],
    ),
];

/// Every suffix a kohya or LyCORIS file uses, longest first where one ends another.
const SUFFIXES: &[&str] = &[
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "alpha",
    "dora_scale",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w1",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_w2",
    "lokr_t1",
    "lokr_t2",
    "on_input",
    "diff_b",
    "diff",
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
    "bm.weight",
    "oft_blocks",
    "oft_diag",
    "rescale",
    "w_norm",
    "b_norm",
    "q_layer.weight",
    "p_layer.weight",
    "lambda_layer",
    "weight",
    "bias",
];

/// Whether the keys of a safetensors file look like kohya or LyCORIS (flattened module names with
/// their suffixes). Returns the format name.
pub fn sniff(file: &SafetensorsFile) -> Option<&'static str> {
    let mut kohya = false;
    let mut lycoris = false;
    for t in file.tensors() {
        let (module, suffix) = t.name.split_once('.')?;
        if !SUFFIXES.contains(&suffix) {
            return None;
        }
        if module.starts_with("lycoris_") {
            lycoris = true;
        } else if !PREFIXES.iter().any(|(p, _)| module.starts_with(p)) {
            return None;
        }
        match suffix {
            "lora_down.weight" | "lora_up.weight" | "alpha" => kohya = true,
            _ => lycoris = true,
        }
    }
    let algo = file
        .metadata()
        .and_then(|m| m.iter().find(|(k, _)| k == "ss_network_module"))
        .map(|(_, v)| v.as_str());
    match (kohya, lycoris, algo) {
        (_, _, Some(m)) if m.starts_with("lycoris") => Some("lycoris"),
        (_, true, _) => Some("lycoris"),
        (true, false, _) => Some("kohya"),
        _ => None,
    }
}

/// Split a flattened module name into its prefix and the rest.
pub fn split_prefix(module: &str) -> Option<(&'static str, &str)> {
    PREFIXES
        .iter()
        .find_map(|(p, _)| module.strip_prefix(p).map(|rest| (*p, rest)))
}

/// Where a flattened module lands in the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// One module: the IR name (`unet.down_blocks.0…` in a pipeline, the bare path otherwise).
    One(String),
    /// A fused BFL Flux module split over several diffusers modules: `(IR name, rows)` in order.
    Split(Vec<(String, u64)>),
}

fn join(component: &str, module: &str) -> String {
    if component.is_empty() {
        module.to_string()
    } else {
        format!("{component}.{module}")
    }
}

/// Resolve a flattened `prefix + rest` against the base.
pub(crate) fn resolve(
    base: &BaseNames,
    prefix: &str,
    rest: &str,
) -> std::result::Result<Resolved, String> {
    let comps: Vec<(&str, &ModelNames)> = if base.is_pipeline() {
        let wanted = PREFIXES
            .iter()
            .find(|(p, _)| *p == prefix)
            .map_or(&[][..], |(_, c)| *c);
        wanted
            .iter()
            .filter_map(|c| base.component(c).map(|m| (*c, m)))
            .collect()
    } else {
        base.components
            .iter()
            .map(|(c, m)| (c.as_str(), m))
            .collect()
    };
    // transformers 5 saves CLIP without its `text_model.` level, so kohya names of either layout
    // meet bases of either layout.
    let alt = if prefix.starts_with("lora_te") {
        match rest.strip_prefix("text_model_") {
            Some(r) => Some(r.to_string()),
            None => Some(format!("text_model_{rest}")),
        }
    } else {
        None
    };
    for (c, names) in &comps {
        for other in alt.iter() {
            if names.unflatten(rest).is_empty() {
                if let [one] = names.unflatten(other) {
                    return Ok(Resolved::One(join(c, one)));
                }
            }
        }
        match names.unflatten(rest) {
            [one] => return Ok(Resolved::One(join(c, one))),
            [] => {}
            many => {
                return Err(format!(
                    "{prefix}{rest} is ambiguous in the base: {}",
                    many.join(", ")
                ))
            }
        }
        if c.is_empty() {
            for (p, stems) in SINGLE_FILE_PREFIXES {
                if *p != prefix {
                    continue;
                }
                for stem in *stems {
                    if let [one] = names.unflatten(&format!("{}{rest}", flatten(stem))) {
                        return Ok(Resolved::One(one.clone()));
                    }
                }
            }
        }
        if prefix == "lora_unet_" {
            if let Some(m) = crate::sgm::to_diffusers(rest, names) {
                return Ok(Resolved::One(join(c, &m)));
            }
        }
        if let Some(parts) = flux::split_for(rest, names) {
            if let [(m, _)] = parts.as_slice() {
                if !m.starts_with('~') {
                    return Ok(Resolved::One(join(c, m)));
                }
            }
            return Ok(Resolved::Split(
                parts
                    .into_iter()
                    .map(|(m, r)| match m.strip_prefix('~') {
                        Some(m) => (format!("~{}", join(c, m)), r),
                        None => (join(c, &m), r),
                    })
                    .collect(),
            ));
        }
    }
    Err(format!("{prefix}{rest}"))
}

type Parts<'a> = BTreeMap<&'static str, &'a TensorInfo>;

/// Open a kohya or LyCORIS `.safetensors` adapter, resolving names against `base` when given.
pub fn open(path: &Path, base: Option<&BaseNames>) -> Result<PeftAdapter> {
    let file = Arc::new(SafetensorsFile::open_mapped(path)?);
    let format = sniff(&file).ok_or_else(|| {
        fmt_err(
            path,
            "kohya",
            "not a kohya or LyCORIS file: every key must be <prefix><flattened module>.<lora_down.weight|lora_up.weight|alpha|hada_*|lokr_*|…>",
        )
    })?;
    let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
    for t in file.tensors() {
        let (module, suffix) = t.name.split_once('.').expect("sniffed");
        let suffix = SUFFIXES
            .iter()
            .find(|s| **s == suffix)
            .copied()
            .expect("sniffed");
        groups
            .entry(module.to_string())
            .or_default()
            .insert(suffix, t);
    }
    let mut mem = MemorySource::over(file.clone());
    let mut modules = Vec::new();
    let mut problems = Vec::new();
    let mut unresolved_names = Vec::new();
    let mut shared = Vec::new();
    let mut notes = Vec::new();
    let mut left_out = 0usize;
    for (flat, parts) in &groups {
        if let (Some(only), Some((prefix, _))) =
            (base.and_then(|b| b.only.as_deref()), split_prefix(flat))
        {
            let comps = PREFIXES
                .iter()
                .find(|(p, _)| *p == prefix)
                .map_or(&[][..], |(_, c)| *c);
            if !comps.contains(&only) && prefix != "lycoris_" {
                left_out += 1;
                continue;
            }
        }
        let built = match build(path, format, flat, parts, &*file, &mut mem) {
            Ok(b) => b,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let Some(base) = base else {
            for (suffix, family, payload) in built {
                modules.push(ModuleAdapter {
                    module: flat.clone(),
                    target: format!("{flat}.{suffix}"),
                    family,
                    payload,
                });
            }
            continue;
        };
        let (prefix, rest) = split_prefix(flat).expect("sniffed");
        match resolve(base, prefix, rest) {
            Ok(Resolved::One(m)) => {
                for (suffix, family, payload) in built {
                    modules.push(ModuleAdapter {
                        module: m.clone(),
                        target: format!("{m}.{suffix}"),
                        family,
                        payload,
                    });
                }
            }
            Ok(Resolved::Split(parts_out)) => {
                match split_lowrank(flat, built, &parts_out, &mut mem) {
                    Ok(ms) => {
                        if let Some(ModuleAdapter {
                            payload: Payload::LowRank(lr),
                            ..
                        }) = ms.first()
                        {
                            shared.push(lr.a.clone());
                        }
                        notes.push(format!(
                            "{flat}: fused module split over {}",
                            parts_out
                                .iter()
                                .map(|(m, _)| m.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                        modules.extend(ms);
                    }
                    Err(e) => problems.push(e),
                }
            }
            Err(name) if name.contains("ambiguous") => problems.push(name),
            Err(name) => unresolved_names.push(name),
        }
    }
    if !problems.is_empty() {
        return Err(fmt_err(path, format, problems.join("; ")));
    }
    if left_out > 0 {
        notes.push(format!(
            "{left_out} module(s) of other components left out (--component {})",
            base.and_then(|b| b.only.as_deref()).unwrap_or("")
        ));
    }
    if let Some(base) = base {
        if !unresolved_names.is_empty() {
            return Err(unresolved(path, format, &unresolved_names, &base.path));
        }
    } else {
        notes.push("module names left flattened (no base given to resolve them against)".into());
    }
    let metadata: serde_json::Map<String, Value> = file
        .metadata()
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let family = family_of(&modules);
    let used: BTreeSet<String> = modules
        .iter()
        .flat_map(|m| m.payload.tensors().into_iter().map(str::to_string))
        .collect();
    let base_model = metadata
        .get("ss_sd_model_name")
        .and_then(Value::as_str)
        .map(str::to_string);
    shared.sort();
    shared.dedup();
    Ok(PeftAdapter {
        dir: path.to_path_buf(),
        config_json: json!({ "format": format, "metadata": metadata }),
        adapter: Adapter {
            path: path.to_path_buf(),
            format,
            method: algo_name(family).to_string(),
            family,
            base_model,
            modules,
            tensors: Arc::new(mem),
            tensor_names: used.into_iter().collect(),
            shared_tensors: shared,
            notes,
        },
    })
}

fn family_of(modules: &[ModuleAdapter]) -> Family {
    let fams: BTreeSet<Family> = modules.iter().map(|m| m.family).collect();
    if fams.len() == 1 {
        *fams.iter().next().expect("one")
    } else {
        Family::Lora
    }
}

/// LyCORIS's name for a family (`ss_network_args.algo`).
pub fn algo_name(f: Family) -> &'static str {
    match f {
        Family::Loha => "loha",
        Family::Lokr => "lokr",
        Family::Ia3 => "ia3",
        Family::Full => "full",
        _ => "lora",
    }
}

fn layer_kind(t: &TensorInfo) -> LayerKind {
    if t.shape.len() > 2 {
        LayerKind::Conv {
            kernel: t.shape[2..].to_vec(),
        }
    } else {
        LayerKind::Linear {
            fan_in_fan_out: false,
        }
    }
}

/// `alpha`, with kohya's rule that a missing or zero alpha means `alpha = rank`.
fn alpha_of(src: &dyn TensorSource, parts: &Parts, rank: u64) -> std::result::Result<f64, String> {
    match parts.get("alpha") {
        None => Ok(rank as f64),
        Some(t) => {
            let a = scalar(src, &t.name).map_err(|e| format!("{}: {e}", t.name))?;
            if !a.is_finite() {
                return Err(format!("{}: alpha is {a}", t.name));
            }
            Ok(if a == 0.0 { rank as f64 } else { a })
        }
    }
}

fn expect_keys(flat: &str, parts: &Parts, allowed: &[&str]) -> std::result::Result<(), String> {
    for k in parts.keys() {
        if !allowed.contains(k) {
            return Err(format!(
                "{flat}.{k}: not part of a {} module",
                allowed.first().copied().unwrap_or("")
            ));
        }
    }
    Ok(())
}

/// Build a module's payloads: `(target suffix, family, payload)`.
fn build(
    path: &Path,
    format: &'static str,
    flat: &str,
    parts: &Parts,
    src: &dyn TensorSource,
    mem: &mut MemorySource,
) -> std::result::Result<Vec<(&'static str, Family, Payload)>, String> {
    let _ = (path, format);
    // Only scalars may be 0-dimensional; every factor's first dimension is read below.
    for (k, t) in parts {
        if t.shape.is_empty() && !matches!(*k, "alpha" | "on_input") {
            return Err(format!(
                "{flat}.{k}: a 0-dimensional tensor where a factor belongs"
            ));
        }
    }
    let has = |k: &str| parts.contains_key(k);
    if has("lora_down.weight") || has("lora_up.weight") {
        expect_keys(
            flat,
            parts,
            &[
                "lora_down.weight",
                "lora_up.weight",
                "lora_mid.weight",
                "alpha",
                "dora_scale",
            ],
        )?;
        let (Some(down), Some(up)) = (parts.get("lora_down.weight"), parts.get("lora_up.weight"))
        else {
            return Err(format!(
                "{flat}: lora_down and lora_up must both be present"
            ));
        };
        let rank = down.shape.first().copied().unwrap_or(0);
        if rank == 0 || up.shape.len() < 2 || up.shape[1] != rank {
            return Err(format!(
                "{flat}: lora_down {:?} and lora_up {:?} do not share a rank",
                down.shape, up.shape
            ));
        }
        let alpha = alpha_of(src, parts, rank)?;
        let mut a = down.name.clone();
        let mut layer = layer_kind(down);
        if let Some(mid) = parts.get("lora_mid.weight") {
            // Tucker LoCon: ΔW = up ×₁ mid ×₂ down. Folding the core into the down projection
            // gives an ordinary conv LoRA of the same rank: A'[p,i,…] = Σ_q mid[p,q,…]·down[q,i].
            if mid.shape.len() != 4 || mid.shape[0] != rank || mid.shape[1] != rank {
                return Err(format!(
                    "{flat}.lora_mid.weight: shape {:?}, expected ({rank}, {rank}, kh, kw)",
                    mid.shape
                ));
            }
            let inp = down.shape.get(1).copied().unwrap_or(0) as usize;
            let k: usize = mid.shape[2..].iter().product::<u64>() as usize;
            // Sizes checked against the stored elements, so the product below is bounded by the
            // file.
            if down.numel() != rank * inp as u64 || mid.numel() != rank * rank * k as u64 {
                return Err(format!(
                    "{flat}: Tucker lora_down {:?} and lora_mid {:?} do not fit (down (r, in, 1, 1), mid (r, r, kh, kw))",
                    down.shape, mid.shape
                ));
            }
            let m = src.read_f32(&mid.name).map_err(|e| e.to_string())?;
            let d = src.read_f32(&down.name).map_err(|e| e.to_string())?;
            let r = rank as usize;
            let mut out = vec![0f32; r * inp * k];
            for p in 0..r {
                for q in 0..r {
                    for i in 0..inp {
                        let dv = d[q * inp + i];
                        for s in 0..k {
                            out[(p * inp + i) * k + s] += m[(p * r + q) * k + s] * dv;
                        }
                    }
                }
            }
            a = format!("{flat}.lora_down.tucker");
            let shape = vec![rank, inp as u64, mid.shape[2], mid.shape[3]];
            mem.insert_f32(&a, DType::F32, shape, &out)
                .map_err(|e| e.to_string())?;
            layer = LayerKind::Conv {
                kernel: mid.shape[2..].to_vec(),
            };
        }
        let magnitude = match parts.get("dora_scale") {
            None => None,
            Some(m) => {
                let out_dim = up.shape[0];
                if m.shape.first() != Some(&out_dim) || m.numel() != out_dim {
                    return Err(format!(
                        "{flat}.dora_scale: shape {:?}; only the output-wise form ({out_dim}, 1, …) (LyCORIS wd_on_out = true, PEFT's DoRA) is supported",
                        m.shape
                    ));
                }
                let name = format!("{flat}.dora_scale.flat");
                mem.alias(&name, &m.name, vec![out_dim]);
                Some(name)
            }
        };
        return Ok(vec![(
            "weight",
            Family::Lora,
            Payload::LowRank(LowRank {
                layer,
                a,
                b: up.name.clone(),
                rank,
                alpha,
                rslora: false,
                scale: alpha / rank as f64,
                magnitude,
                singular_values: None,
            }),
        )]);
    }
    if has("dora_scale") && (has("hada_w1_a") || has("lokr_w1") || has("lokr_w1_a")) {
        return Err(format!(
            "{flat}.dora_scale: DoRA on a LoHa/LoKr module (LyCORIS dora_wd) is not supported by this version; refusing rather than merging it without its re-normalisation"
        ));
    }
    if has("hada_w1_a") {
        expect_keys(
            flat,
            parts,
            &[
                "hada_w1_a",
                "hada_w1_b",
                "hada_w2_a",
                "hada_w2_b",
                "hada_t1",
                "hada_t2",
                "alpha",
            ],
        )?;
        let need = ["hada_w1_b", "hada_w2_a", "hada_w2_b"];
        if let Some(m) = need.iter().find(|k| !has(k)) {
            return Err(format!("{flat}: LoHa tensor {m} is missing"));
        }
        let cp = match (parts.get("hada_t1"), parts.get("hada_t2")) {
            (Some(a), Some(b)) => Some((a.name.clone(), b.name.clone())),
            (None, None) => None,
            _ => return Err(format!("{flat}: only one of hada_t1/hada_t2 is present")),
        };
        let rank = parts["hada_w1_b"].shape[0];
        let alpha = alpha_of(src, parts, rank)?;
        return Ok(vec![(
            "weight",
            Family::Loha,
            Payload::Hadamard(Hadamard {
                w1a: parts["hada_w1_a"].name.clone(),
                w1b: parts["hada_w1_b"].name.clone(),
                w2a: parts["hada_w2_a"].name.clone(),
                w2b: parts["hada_w2_b"].name.clone(),
                cp,
                rank,
                alpha,
                scale: alpha / rank as f64,
            }),
        )]);
    }
    if has("lokr_w1") || has("lokr_w1_a") || has("lokr_w2") || has("lokr_w2_a") {
        expect_keys(
            flat,
            parts,
            &[
                "lokr_w1",
                "lokr_w1_a",
                "lokr_w1_b",
                "lokr_w2",
                "lokr_w2_a",
                "lokr_w2_b",
                "lokr_t2",
                "alpha",
            ],
        )?;
        let (w1, w2) = crate::peft_families::kron_factors(|k| parts.get(k).map(|t| t.name.clone()))
            .map_err(|e| format!("{flat}: {e}"))?;
        let full = matches!(w1, KronFactor::Full(_)) && matches!(w2, KronFactor::Full(_));
        let rank = parts
            .get("lokr_w1_b")
            .or_else(|| parts.get("lokr_w2_b"))
            .map_or(1, |t| t.shape[0]);
        let alpha = alpha_of(src, parts, rank)?;
        // LyCORIS: with both factors full there is no rank, and the scale is 1 whatever alpha says.
        let scale = if full { 1.0 } else { alpha / rank as f64 };
        return Ok(vec![(
            "weight",
            Family::Lokr,
            Payload::Kronecker(Kronecker {
                w1,
                w2,
                rank,
                alpha,
                scale,
            }),
        )]);
    }
    if has("on_input") {
        expect_keys(flat, parts, &["weight", "on_input"])?;
        let Some(w) = parts.get("weight") else {
            return Err(format!("{flat}: IA3 module without weight"));
        };
        let on_input = scalar(src, &parts["on_input"].name).map_err(|e| e.to_string())? != 0.0;
        // LyCORIS IA3 scales by (1 + weight) (its weight is zero-initialised).
        let v = src.read_f32(&w.name).map_err(|e| e.to_string())?;
        let one_plus: Vec<f32> = v.iter().map(|x| 1.0 + x).collect();
        let name = format!("{flat}.ia3_scale");
        mem.insert_f32(&name, DType::F32, vec![v.len() as u64], &one_plus)
            .map_err(|e| e.to_string())?;
        return Ok(vec![(
            "weight",
            Family::Ia3,
            Payload::Scale {
                tensor: name,
                axis: if on_input {
                    ScaleAxis::Input
                } else {
                    ScaleAxis::Output
                },
                fan_in_fan_out: false,
                bias: false,
            },
        )]);
    }
    if has("diff") || has("diff_b") {
        expect_keys(flat, parts, &["diff", "diff_b", "alpha"])?;
        let mut out = Vec::new();
        if let Some(d) = parts.get("diff") {
            out.push((
                "weight",
                Family::Full,
                Payload::Add {
                    tensor: d.name.clone(),
                    scale: 1.0,
                },
            ));
        }
        if let Some(d) = parts.get("diff_b") {
            out.push((
                "bias",
                Family::Full,
                Payload::Add {
                    tensor: d.name.clone(),
                    scale: 1.0,
                },
            ));
        }
        return Ok(out);
    }
    if has("w_norm") || has("b_norm") {
        // LyCORIS's norm tuning (train_norm): w' = w + w_norm, b' = b + b_norm.
        expect_keys(flat, parts, &["w_norm", "b_norm"])?;
        let mut out = Vec::new();
        for (k, suffix) in [("w_norm", "weight"), ("b_norm", "bias")] {
            if let Some(t) = parts.get(k) {
                out.push((
                    suffix,
                    Family::Full,
                    Payload::Add {
                        tensor: t.name.clone(),
                        scale: 1.0,
                    },
                ));
            }
        }
        return Ok(out);
    }
    if has("a1.weight") || has("b1.weight") {
        return glora(flat, parts, src, mem);
    }
    if has("oft_blocks") && parts["oft_blocks"].shape.len() == 3 {
        return diag_oft(flat, parts, src, mem);
    }
    if has("oft_blocks") && parts["oft_blocks"].shape.len() == 4 {
        return boft(flat, parts, src, mem);
    }
    let algo = if has("q_layer.weight") || has("lambda_layer") {
        "TLoRA (its file omits the base-SVD terms base_q/base_p/base_lambda its forward subtracts)"
    } else if has("oft_blocks") || has("oft_diag") {
        "Diag-OFT / BOFT (oft_blocks)"
    } else if has("a1.weight") || has("b1.weight") {
        "GLoRA (a1/a2/b1/b2)"
    } else {
        return Err(format!(
            "{flat}: keys {} form no known LyCORIS module",
            parts.keys().copied().collect::<Vec<_>>().join(", ")
        ));
    };
    Err(format!(
        "{flat}: LyCORIS {algo} modules are not supported by this version; refusing rather than dropping them"
    ))
}

/// Skew generators `Q = B − Bᵀ` of every `b×b` block of `v`, clamped together to Frobenius norm
/// `limit` (when positive) as LyCORIS's constraint does; returned as full matrices.
fn skew_clamped(v: &[f32], b: usize, limit: f64) -> Vec<f64> {
    let mut q: Vec<f64> = Vec::with_capacity(v.len());
    for blk in v.chunks_exact(b * b) {
        for p in 0..b {
            for r in 0..b {
                q.push(f64::from(blk[p * b + r]) - f64::from(blk[r * b + p]));
            }
        }
    }
    if limit > 0.0 {
        let norm = q.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm + 1e-8 > limit {
            let f = limit / (norm + 1e-8);
            q.iter_mut().for_each(|x| *x *= f);
        }
    }
    q
}

/// The norm constraint of a LyCORIS OFT module (`alpha`; 0 or absent: none). The effective
/// bound is `alpha·out` over all blocks together.
fn oft_constraint(parts: &Parts, src: &dyn TensorSource) -> std::result::Result<f64, String> {
    match parts.get("alpha") {
        Some(a) => scalar(src, &a.name).map_err(|e| e.to_string()),
        None => Ok(0.0),
    }
}

/// LyCORIS OFT's optional `rescale (out, 1…)`: an output scaling that leaves the bias alone.
fn oft_rescale(
    flat: &str,
    parts: &Parts,
    out: usize,
    family: Family,
    mem: &mut MemorySource,
) -> std::result::Result<Option<(&'static str, Family, Payload)>, String> {
    let Some(r) = parts.get("rescale") else {
        return Ok(None);
    };
    if r.numel() != out as u64 {
        return Err(format!(
            "{flat}.rescale: shape {:?}, expected {out} values",
            r.shape
        ));
    }
    let name = format!("{flat}.rescale.flat");
    mem.alias(&name, &r.name, vec![r.numel()]);
    Ok(Some((
        "weight",
        family,
        Payload::Scale {
            tensor: name,
            axis: ScaleAxis::Output,
            fan_in_fan_out: false,
            bias: false,
        },
    )))
}

/// `(I − Q)(I + Q)⁻¹` for a skew `b×b` `Q`: the transpose of LyCORIS's `R = (I+Q)(I−Q)⁻¹`.
fn cayley_transpose(q: &[f64], b: usize) -> Option<Vec<f64>> {
    // Solve X·(I + Q) = (I − Q)  ⇔  (I + Q)ᵀ·Xᵀ = (I − Q)ᵀ by Gauss–Jordan on the transposes.
    let mut a: Vec<f64> = (0..b * b)
        .map(|k| q[(k % b) * b + k / b] + if k / b == k % b { 1.0 } else { 0.0 })
        .collect();
    let mut rhs: Vec<f64> = (0..b * b)
        .map(|k| -q[(k % b) * b + k / b] + if k / b == k % b { 1.0 } else { 0.0 })
        .collect();
    for c in 0..b {
        let piv = (c..b).max_by(|&i, &j| a[i * b + c].abs().total_cmp(&a[j * b + c].abs()))?;
        if a[piv * b + c].abs() < 1e-300 {
            return None;
        }
        for k in 0..b {
            a.swap(c * b + k, piv * b + k);
            rhs.swap(c * b + k, piv * b + k);
        }
        let d = a[c * b + c];
        for k in 0..b {
            a[c * b + k] /= d;
            rhs[c * b + k] /= d;
        }
        for i in 0..b {
            if i != c {
                let f = a[i * b + c];
                if f != 0.0 {
                    for k in 0..b {
                        a[i * b + k] -= f * a[c * b + k];
                        rhs[i * b + k] -= f * rhs[c * b + k];
                    }
                }
            }
        }
    }
    // rhs = Xᵀ.
    Some((0..b * b).map(|k| rhs[(k % b) * b + k / b]).collect())
}

/// LyCORIS BOFT: `oft_blocks (m, n, b, b)`, the Cayley map and constraint of Diag-OFT, then for
/// every stage `i` (`k = 2ⁱ·b/2`) the output rows are permuted (`(g, t, j) → (g, j, t)` over
/// groups of `2k`), rotated block by block (`R·W`) and permuted back; then `⊙ rescale`. In the
/// IR: the same stages as a transform of the output-space vectors (`Payload::Stages`, each block
/// `Rᵀ` acting on row vectors) and an output scaling.
fn boft(
    flat: &str,
    parts: &Parts,
    src: &dyn TensorSource,
    mem: &mut MemorySource,
) -> std::result::Result<Vec<(&'static str, Family, Payload)>, String> {
    expect_keys(flat, parts, &["oft_blocks", "rescale", "alpha"])?;
    let t = parts["oft_blocks"];
    let (m, n, b) = (
        t.shape[0] as usize,
        t.shape[1] as usize,
        t.shape[2] as usize,
    );
    if n == 0 || m == 0 || m > 32 {
        return Err(format!(
            "{flat}.oft_blocks: shape {:?}: BOFT needs 1 to 32 stages of at least one block",
            t.shape
        ));
    }
    if t.shape[3] as usize != b || b < 2 || b % 2 != 0 {
        return Err(format!(
            "{flat}.oft_blocks: shape {:?}, expected (stages, blocks, b, b) with even b",
            t.shape
        ));
    }
    let out = n * b;
    let v = src.read_f32(&t.name).map_err(|e| e.to_string())?;
    let alpha = oft_constraint(parts, src)?;
    let q = skew_clamped(&v, b, alpha * out as f64);
    let mut blocks = Vec::with_capacity(m * n * b * b);
    for (i, qb) in q.chunks_exact(b * b).enumerate() {
        let rt = cayley_transpose(qb, b)
            .ok_or_else(|| format!("{flat}: BOFT block {i} has a singular Cayley transform"))?;
        // Row-vector form: the slice y_k becomes y_k·(Rᵀ)ᵀ… i.e. (R·y_kᵀ)ᵀ = y_k·Rᵀ: store Rᵀ.
        blocks.extend(rt.iter().map(|&x| x as f32));
    }
    let mut perms: Vec<u8> = Vec::with_capacity(m * out * 8);
    for i in 0..m {
        let k = (1usize << i).saturating_mul(b) / 2;
        if out % (2 * k) != 0 {
            return Err(format!(
                "{flat}: BOFT stage {i} groups of {} do not divide {out} outputs",
                2 * k
            ));
        }
        for src_row in 0..out {
            let (g, rest) = (src_row / (2 * k), src_row % (2 * k));
            let (tt, j) = (rest / k, rest % k);
            let dst = g * 2 * k + 2 * j + tt;
            perms.extend_from_slice(&(dst as i64).to_le_bytes());
        }
    }
    let bn = format!("{flat}.boft_blocks");
    mem.insert_f32(
        &bn,
        DType::F32,
        vec![m as u64, n as u64, b as u64, b as u64],
        &blocks,
    )
    .map_err(|e| e.to_string())?;
    let pn = format!("{flat}.boft_perms");
    mem.insert(&pn, DType::I64, vec![m as u64, out as u64], perms);
    let mut res = vec![(
        "weight",
        Family::Boft,
        Payload::Stages {
            blocks: bn,
            perms: pn,
            fan_in_fan_out: true,
        },
    )];
    res.extend(oft_rescale(flat, parts, out, Family::Boft, mem)?);
    Ok(res)
}

/// LyCORIS Diag-OFT: `oft_blocks (n, b, b)`, `Q = B − Bᵀ` clamped to Frobenius norm
/// `alpha·out` over all blocks together, `R = (I+Q)(I−Q)⁻¹`, every block of `b` output rows
/// `W_k ← R_kᵀ·W_k`, then `W ← W ⊙ rescale` per output. In the IR: an exact-Cayley OFT over the
/// output rows (`(I−Q)(I+Q)⁻¹ = Rᵀ` for skew `Q`) and an output scaling.
fn diag_oft(
    flat: &str,
    parts: &Parts,
    src: &dyn TensorSource,
    mem: &mut MemorySource,
) -> std::result::Result<Vec<(&'static str, Family, Payload)>, String> {
    expect_keys(flat, parts, &["oft_blocks", "rescale", "alpha"])?;
    let t = parts["oft_blocks"];
    let (n, b) = (t.shape[0] as usize, t.shape[1] as usize);
    if t.shape[2] as usize != b || b == 0 {
        return Err(format!(
            "{flat}.oft_blocks: shape {:?}, expected (blocks, b, b)",
            t.shape
        ));
    }
    let v = src.read_f32(&t.name).map_err(|e| e.to_string())?;
    let tri = b * (b - 1) / 2;
    let alpha = oft_constraint(parts, src)?;
    let q = skew_clamped(&v, b, alpha * (n * b) as f64);
    let mut packed = Vec::with_capacity(n * tri);
    for blk in q.chunks_exact(b * b) {
        for p in 0..b {
            for r in p + 1..b {
                packed.push(blk[p * b + r] as f32);
            }
        }
    }
    let name = format!("{flat}.oft_generators");
    mem.insert_f32(&name, DType::F32, vec![n as u64, tri as u64], &packed)
        .map_err(|e| e.to_string())?;
    let mut out = vec![(
        "weight",
        Family::Oft,
        Payload::Oft(adapterkit_core::ir::Oft {
            tensor: name,
            block_size: b as u64,
            block_share: false,
            cayley: adapterkit_core::ir::Cayley::Exact,
            coft_eps: None,
            fan_in_fan_out: true,
            embedding: false,
        }),
    )];
    out.extend(oft_rescale(flat, parts, n * b, Family::Oft, mem)?);
    Ok(out)
}

/// LyCORIS GLoRA: `W' = W + s·(b1·b2 + W·a1·a2)`, `s = alpha / r` (`r = a2.shape[0]`), the bias
/// unchanged. In the IR: `W ← W·M` with `M = I + s·a1·a2` (for a conv, contracting the input
/// channel at every kernel position: `M ⊗ I`), then the low-rank `s·b1·b2`.
fn glora(
    flat: &str,
    parts: &Parts,
    src: &dyn TensorSource,
    mem: &mut MemorySource,
) -> std::result::Result<Vec<(&'static str, Family, Payload)>, String> {
    expect_keys(
        flat,
        parts,
        &[
            "a1.weight",
            "a2.weight",
            "b1.weight",
            "b2.weight",
            "alpha",
            "bm.weight",
        ],
    )?;
    if parts.contains_key("bm.weight") {
        return Err(format!(
            "{flat}.bm.weight: GLoRA's bm term is not supported (LyCORIS 4.1.3 cannot create it)"
        ));
    }
    let need = ["a1.weight", "a2.weight", "b1.weight", "b2.weight"];
    if let Some(m) = need.iter().find(|k| !parts.contains_key(*k)) {
        return Err(format!("{flat}: GLoRA tensor {m} is missing"));
    }
    let (a1, a2, b1, b2) = (
        parts["a1.weight"],
        parts["a2.weight"],
        parts["b1.weight"],
        parts["b2.weight"],
    );
    if [a1, a2, b1, b2].iter().any(|t| t.shape.len() < 2) {
        return Err(format!(
            "{flat}: GLoRA tensors must be at least 2-D (a1 {:?}, a2 {:?}, b1 {:?}, b2 {:?})",
            a1.shape, a2.shape, b1.shape, b2.shape
        ));
    }
    let r = a2.shape[0] as usize;
    let inp = a1.shape[0] as usize;
    if r == 0
        || a1.shape[1] as usize != r
        || a2.shape[1] as usize != inp
        || b1.shape[1] as usize != r
        || b2.shape[0] as usize != r
        || b2.shape[1] as usize != inp
    {
        return Err(format!(
            "{flat}: GLoRA shapes a1 {:?}, a2 {:?}, b1 {:?}, b2 {:?} do not fit together",
            a1.shape, a2.shape, b1.shape, b2.shape
        ));
    }
    let alpha = alpha_of(src, parts, r as u64)?;
    let s = alpha / r as f64;
    // W·a1·a2 contracts the input channels: U = a1 (in, r), V = s·a2 (r, in).
    let va2: Vec<f32> = src
        .read_f32(&a2.name)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|x| (f64::from(*x) * s) as f32)
        .collect();
    let kernel: u64 = b2.shape[2..].iter().product();
    let u = format!("{flat}.glora_u");
    mem.alias(&u, &a1.name, vec![inp as u64, r as u64]);
    let v = format!("{flat}.glora_v");
    mem.insert_f32(&v, DType::F32, vec![r as u64, inp as u64], &va2)
        .map_err(|e| e.to_string())?;
    let layer = if b2.shape.len() > 2 {
        LayerKind::Conv {
            kernel: b2.shape[2..].to_vec(),
        }
    } else {
        LayerKind::Linear {
            fan_in_fan_out: false,
        }
    };
    Ok(vec![
        (
            "weight",
            Family::Tuner("glora"),
            Payload::RightMultiply {
                u,
                v,
                kernel,
                fan_in_fan_out: false,
            },
        ),
        (
            "weight",
            Family::Tuner("glora"),
            Payload::LowRank(LowRank {
                layer,
                a: b2.name.clone(),
                b: b1.name.clone(),
                rank: r as u64,
                alpha,
                rslora: false,
                scale: s,
                magnitude: None,
                singular_values: None,
            }),
        ),
    ])
}

/// Split a fused module's LoRA over its parts: `A` is shared, `B`'s rows are cut.
fn split_lowrank(
    flat: &str,
    built: Vec<(&'static str, Family, Payload)>,
    parts: &[(String, u64)],
    mem: &mut MemorySource,
) -> std::result::Result<Vec<ModuleAdapter>, String> {
    let mut out = Vec::new();
    for (suffix, family, payload) in built {
        let Payload::LowRank(lr) = payload else {
            return Err(format!(
                "{flat}: only LoRA modules can be split over the base's separate projections"
            ));
        };
        if lr.magnitude.is_some() || suffix != "weight" {
            return Err(format!(
                "{flat}: a DoRA or bias update on a fused module cannot be split exactly"
            ));
        }
        let info = mem
            .info(&lr.b)
            .ok_or_else(|| format!("{flat}: missing {}", lr.b))?
            .clone();
        let rows: u64 = parts.iter().map(|(_, r)| r).sum();
        if info.shape.first() != Some(&rows) {
            return Err(format!(
                "{flat}: lora_up has {:?} rows, the base's parts {rows}",
                info.shape.first()
            ));
        }
        let per_row = info.len / rows;
        let mut offset = 0u64;
        for (i, (module, r)) in parts.iter().enumerate() {
            let mut bytes = vec![0u8; (per_row * r) as usize];
            mem.read_bytes(&lr.b, offset, &mut bytes)
                .map_err(|e| e.to_string())?;
            offset += per_row * r;
            // diffusers stores this module's two halves swapped relative to BFL.
            let module = match module.strip_prefix('~') {
                Some(m) => {
                    let half = bytes.len() / 2;
                    bytes.rotate_left(half);
                    m
                }
                None => module.as_str(),
            };
            let name = format!("{}.part{i}", lr.b);
            let mut shape = info.shape.clone();
            shape[0] = *r;
            mem.insert(&name, info.dtype, shape, bytes);
            out.push(ModuleAdapter {
                module: module.to_string(),
                target: format!("{module}.weight"),
                family,
                payload: Payload::LowRank(LowRank {
                    b: name,
                    ..lr.clone()
                }),
            });
        }
    }
    Ok(out)
}
