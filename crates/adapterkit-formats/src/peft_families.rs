//! PEFT families beyond LoRA: AdaLoRA, IA3, LoHa, LoKr, OFT, BOFT, HRA, VeRA, FourierFT, MiSS
//! (and Bone), VB-LoRA, LN tuning, trainable tokens. Key tables and formulas: `formats/peft.md`.
//!
//! Every family goes through the same grouping: keys are split into module path and a known
//! suffix; keys with no known suffix are full tensors that replace the base's (`modules_to_save`).
//! Problems are collected and reported together.

use std::collections::BTreeMap;
use std::path::Path;

use adapterkit_core::ir::{
    Cayley, Family, Hadamard, Householder, KronFactor, Kronecker, LayerKind, LowRank, MissMode,
    ModuleAdapter, Oft, Payload, ScaleAxis, VbLogits, VbLora,
};
use adapterkit_core::TensorInfo;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::peft::{replaced_target, shape_str, LoraConfig, ModuleSelector, KEY_PREFIX};
use crate::safetensors::SafetensorsFile;

/// Tensors grouped by module: suffix role → tensor.
type Groups<'a> = BTreeMap<String, BTreeMap<&'static str, &'a TensorInfo>>;

/// Split every key into (module, role) by the longest matching suffix of `roles`; keys matching
/// none are full tensors replacing a base tensor.
fn group<'a>(
    file: &'a SafetensorsFile,
    roles: &[&'static str],
    problems: &mut Vec<String>,
) -> (Groups<'a>, Vec<(&'a TensorInfo, String)>) {
    let mut groups: Groups = BTreeMap::new();
    let mut full = Vec::new();
    let mut sorted: Vec<&'static str> = roles.to_vec();
    sorted.sort_by_key(|r| std::cmp::Reverse(r.len()));
    for t in file.tensors() {
        // Index tensors (VB-LoRA's saved top-k) are integers; everything else is floating point.
        let index_tensor =
            (t.name.contains("indices") || t.name.contains("frod_s_size")) && t.dtype.is_integer();
        if !t.dtype.is_float() && !index_tensor {
            problems.push(format!(
                "tensor {:?}: dtype {} is not a floating-point type",
                t.name, t.dtype
            ));
            continue;
        }
        let key = t.name.strip_prefix(KEY_PREFIX).unwrap_or(&t.name);
        match sorted
            .iter()
            .find_map(|r| key.strip_suffix(&format!(".{r}")).map(|m| (m, *r)))
        {
            Some((module, role)) => {
                if t.shape.is_empty() {
                    problems.push(format!(
                        "tensor {:?}: a 0-dimensional {role}, where PEFT saves at least one dimension",
                        t.name
                    ));
                    continue;
                }
                groups
                    .entry(module.to_string())
                    .or_default()
                    .insert(role, t);
            }
            None => full.push((t, replaced_target(key))),
        }
    }
    (groups, full)
}

/// A module adapter on `<module>.weight`.
fn weight_module(module: String, family: Family, payload: Payload) -> ModuleAdapter {
    ModuleAdapter {
        target: format!("{module}.weight"),
        module,
        family,
        payload,
    }
}

fn replacements(full: Vec<(&TensorInfo, String)>, family: Family) -> Vec<ModuleAdapter> {
    full.into_iter()
        .map(|(t, target)| ModuleAdapter {
            module: target
                .rsplit_once('.')
                .map(|(m, _)| m.to_string())
                .unwrap_or_default(),
            target,
            family,
            payload: Payload::Replace {
                tensor: t.name.clone(),
            },
        })
        .collect()
}

/// Build the module adapters of a non-LoRA PEFT adapter.
pub fn build(
    family: Family,
    path: &Path,
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    notes: &mut Vec<String>,
) -> Result<Vec<ModuleAdapter>> {
    let mut problems = Vec::new();
    let mut out = match family {
        Family::Ia3 => ia3(cfg, json, file, &mut problems)?,
        Family::Loha => loha(cfg, file, &mut problems),
        Family::Lokr => lokr(cfg, file, &mut problems),
        Family::Oft => oft(cfg, json, file, &mut problems),
        Family::Hra => hra(cfg, json, file, &mut problems),
        Family::Vera => vera(path, cfg, json, file, &mut problems)?,
        Family::FourierFt => fourier(cfg, json, file, &mut problems),
        Family::Boft => boft(cfg, json, file, &mut problems, notes),
        Family::AdaLora => adalora(path, cfg, json, file, &mut problems)?,
        Family::Miss => miss(cfg, json, file, &mut problems),
        Family::VbLora => vblora(cfg, json, file, &mut problems),
        Family::LnTuning => ln_tuning(cfg, file, &mut problems),
        Family::TrainableTokens => trainable_tokens(path, json, file, &mut problems)?,
        Family::Tuner(name) => tuner(name, cfg, json, file, &mut problems),
        other => {
            return Err(Error::UnsupportedPeftType {
                path: path.to_path_buf(),
                peft_type: other.name().to_string(),
                reason: "no reader for this family".into(),
            })
        }
    };
    out.sort_by_key(|m| !matches!(m.payload, Payload::Replace { .. }));
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(Error::InvalidAdapter {
            path: path.to_path_buf(),
            problems,
        })
    }
}

fn selected(cfg: &LoraConfig, module: &str, problems: &mut Vec<String>) -> bool {
    if cfg.selects(module, true) {
        return true;
    }
    problems.push(format!(
        "module {module:?}: has adapter tensors but target_modules {:?} does not select it (PEFT would ignore these tensors)",
        cfg.target_modules
    ));
    false
}

fn ia3(
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Result<Vec<ModuleAdapter>> {
    let ff = match json.get("feedforward_modules") {
        None => None,
        Some(v) => ModuleSelector::from_value(v).ok_or_else(|| Error::InvalidConfig {
            path: file.path().to_path_buf(),
            message: format!(
                "feedforward_modules must be a list of names, a regex string or null, found {v}"
            ),
        })?,
    };
    let (groups, full) = group(file, &["ia3_l"], problems);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let l = parts["ia3_l"];
        if !selected(cfg, &module, problems) {
            continue;
        }
        // PEFT's IA3 feedforward test: a list matches by plain `endswith` (no dot boundary, unlike
        // target_modules), a string by full regex match.
        let feedforward = match ff.as_ref() {
            Some(ModuleSelector::List(l)) => l.iter().any(|t| module.ends_with(t.as_str())),
            Some(sel) => LoraConfig::selector_matches(sel, &module, true),
            None => false,
        };
        // A vector with one non-trivial dimension: (1, in) for feedforward linears, (out, 1)
        // otherwise; convs store (1, C, 1, 1) either way. The config says which axis it scales.
        if l.shape.len() < 2 || l.shape.iter().filter(|&&d| d != 1).count() > 1 {
            problems.push(format!(
                "tensor {:?}: shape {} is not an IA3 scaling vector (one dimension other than 1)",
                l.name,
                shape_str(l)
            ));
            continue;
        }
        out.push(weight_module(
            module,
            Family::Ia3,
            Payload::Scale {
                tensor: l.name.clone(),
                axis: if feedforward {
                    ScaleAxis::Input
                } else {
                    ScaleAxis::Output
                },
                fan_in_fan_out: cfg.fan_in_fan_out,
                bias: true,
            },
        ));
    }
    out.extend(replacements(full, Family::Ia3));
    Ok(out)
}

fn check_rank(
    cfg: &LoraConfig,
    module: &str,
    rank: u64,
    problems: &mut Vec<String>,
) -> Option<(f64, f64)> {
    let (cfg_rank, pattern) = cfg.rank_for(module);
    if cfg_rank != rank {
        problems.push(format!(
            "module {module:?}: the config gives r={cfg_rank} ({}) but the tensors have r={rank}",
            pattern
                .map(|k| format!("rank_pattern key {k:?}"))
                .unwrap_or_else(|| "r".into())
        ));
        return None;
    }
    let alpha = cfg.alpha_for(module);
    Some((alpha, alpha / rank as f64))
}

fn loha(
    cfg: &LoraConfig,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let roles = [
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "hada_t1",
        "hada_t2",
    ];
    let (groups, full) = group(file, &roles, problems);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
        if let Some(missing) = need.iter().find(|r| !parts.contains_key(*r)) {
            problems.push(format!(
                "module {module:?}: LoHa tensor {missing} is missing"
            ));
            continue;
        }
        let cp = match (parts.get("hada_t1"), parts.get("hada_t2")) {
            (Some(a), Some(b)) => Some((a.name.clone(), b.name.clone())),
            (None, None) => None,
            _ => {
                problems.push(format!(
                    "module {module:?}: only one of hada_t1/hada_t2 is present"
                ));
                continue;
            }
        };
        // Non-CP: w1_a (out, r), w1_b (r, in·k); CP: w1_a (r, out), w1_b (r, in).
        let rank = if cp.is_some() {
            parts["hada_w1_a"].shape[0]
        } else {
            parts["hada_w1_b"].shape[0]
        };
        if !selected(cfg, &module, problems) {
            continue;
        }
        let Some((alpha, scale)) = check_rank(cfg, &module, rank, problems) else {
            continue;
        };
        out.push(weight_module(
            module,
            Family::Loha,
            Payload::Hadamard(Hadamard {
                w1a: parts["hada_w1_a"].name.clone(),
                w1b: parts["hada_w1_b"].name.clone(),
                w2a: parts["hada_w2_a"].name.clone(),
                w2b: parts["hada_w2_b"].name.clone(),
                cp,
                rank,
                alpha,
                scale,
            }),
        ));
    }
    out.extend(replacements(full, Family::Loha));
    out
}

fn lokr(
    cfg: &LoraConfig,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let roles = [
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
    ];
    let (groups, full) = group(file, &roles, problems);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let (w1, w2) = match kron_factors(|r| parts.get(r).map(|t| t.name.clone())) {
            Ok(f) => f,
            Err(e) => {
                problems.push(format!("module {module:?}: {e}"));
                continue;
            }
        };
        if !selected(cfg, &module, problems) {
            continue;
        }
        // The rank shows in whichever factor is decomposed; a module with two full factors has
        // none, and PEFT still scales by alpha / r with the configured r.
        let rank_of = |r: &str, dim: usize| parts.get(r).map(|t| t.shape[dim]);
        let tensor_rank = rank_of("lokr_w1_b", 0).or_else(|| rank_of("lokr_w2_b", 0));
        let (cfg_rank, _) = cfg.rank_for(&module);
        let rank = tensor_rank.unwrap_or(cfg_rank);
        let Some((alpha, scale)) = check_rank(cfg, &module, rank, problems) else {
            continue;
        };
        out.push(weight_module(
            module,
            Family::Lokr,
            Payload::Kronecker(Kronecker {
                w1,
                w2,
                rank,
                alpha,
                scale,
            }),
        ));
    }
    out.extend(replacements(full, Family::Lokr));
    out
}

/// A LoKr module's two factors from its keys (`lokr_w1` or `lokr_w1_a`/`_b`; `lokr_w2`, or
/// `lokr_w2_a`/`_b` with an optional Tucker core `lokr_t2`), as PEFT and LyCORIS both save them.
pub(crate) fn kron_factors(
    name: impl Fn(&str) -> Option<String>,
) -> std::result::Result<(KronFactor, KronFactor), &'static str> {
    let w1 = match (name("lokr_w1"), name("lokr_w1_a"), name("lokr_w1_b")) {
        (Some(w), None, None) => KronFactor::Full(w),
        (None, Some(a), Some(b)) => KronFactor::Product { a, b },
        _ => return Err("LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b"),
    };
    let w2 = match (
        name("lokr_w2"),
        name("lokr_w2_a"),
        name("lokr_w2_b"),
        name("lokr_t2"),
    ) {
        (Some(w), None, None, None) => KronFactor::Full(w),
        (None, Some(a), Some(b), None) => KronFactor::Product { a, b },
        (None, Some(a), Some(b), Some(t)) => KronFactor::Tucker { t, a, b },
        _ => return Err("LoKr needs lokr_w2, lokr_w2_a and lokr_w2_b, or those with lokr_t2"),
    };
    Ok((w1, w2))
}

fn json_bool(json: &Value, key: &str, default: bool) -> bool {
    json.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn oft(
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let (groups, full) = group(file, &["oft_R.weight", "oft_embedding_R.weight"], problems);
    let block_share = json_bool(json, "block_share", false);
    let cayley = if json_bool(json, "use_cayley_neumann", true) {
        Cayley::Neumann(
            json.get("num_cayley_neumann_terms")
                .and_then(Value::as_u64)
                .unwrap_or(5) as u32,
        )
    } else {
        Cayley::Exact
    };
    let coft_eps = json_bool(json, "coft", false)
        .then(|| json.get("eps").and_then(Value::as_f64).unwrap_or(6e-5));
    let mut out = Vec::new();
    for (module, parts) in groups {
        let embedding = parts.contains_key("oft_embedding_R.weight");
        let t = parts
            .get("oft_R.weight")
            .or_else(|| parts.get("oft_embedding_R.weight"))
            .copied()
            .expect("grouped by these roles");
        if t.shape.len() != 2 {
            problems.push(format!(
                "tensor {:?}: OFT generators must be 2-D (blocks, b(b-1)/2), found {}",
                t.name,
                shape_str(t)
            ));
            continue;
        }
        // n = b(b-1)/2 → b.
        let n = t.shape[1];
        let b = ((1.0 + (1.0 + 8.0 * n as f64).sqrt()) / 2.0).round() as u64;
        if b * (b - 1) / 2 != n || b < 2 {
            problems.push(format!(
                "tensor {:?}: {n} is not the size b(b-1)/2 of a packed skew-symmetric block",
                t.name
            ));
            continue;
        }
        if block_share != (t.shape[0] == 1) && block_share {
            problems.push(format!(
                "tensor {:?}: block_share=true needs one generator, found {}",
                t.name, t.shape[0]
            ));
            continue;
        }
        if !selected(cfg, &module, problems) {
            continue;
        }
        out.push(weight_module(
            module,
            Family::Oft,
            Payload::Oft(Oft {
                tensor: t.name.clone(),
                block_size: b,
                block_share,
                cayley,
                coft_eps,
                fan_in_fan_out: cfg.fan_in_fan_out && !embedding,
                embedding,
            }),
        ));
    }
    out.extend(replacements(full, Family::Oft));
    out
}

fn hra(
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let (groups, full) = group(file, &["hra_u"], problems);
    let gram_schmidt = json_bool(json, "apply_GS", false);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let t = parts["hra_u"];
        if t.shape.len() != 2 {
            problems.push(format!(
                "tensor {:?}: HRA vectors must be 2-D (in, r), found {}",
                t.name,
                shape_str(t)
            ));
            continue;
        }
        if !selected(cfg, &module, problems) {
            continue;
        }
        let rank = t.shape[1];
        let (cfg_rank, _) = cfg.rank_for(&module);
        if cfg_rank != rank {
            problems.push(format!(
                "module {module:?}: the config gives r={cfg_rank} but hra_u has {rank} vectors"
            ));
            continue;
        }
        out.push(weight_module(
            module,
            Family::Hra,
            Payload::Householder(Householder {
                tensor: t.name.clone(),
                rank,
                gram_schmidt,
                fan_in_fan_out: cfg.fan_in_fan_out,
            }),
        ));
    }
    out.extend(replacements(full, Family::Hra));
    out
}

/// The tensors a family shares between modules (each must be used at least once).
pub fn shared_tensors(family: Family, file: &SafetensorsFile) -> Vec<String> {
    match family {
        Family::Tuner("frod") => file
            .tensors()
            .iter()
            .filter(|t| t.name.starts_with("base_model.frod_"))
            .map(|t| t.name.clone())
            .collect(),
        Family::Vera => vec!["base_model.vera_A".into(), "base_model.vera_B".into()],
        Family::VbLora => vec!["base_model.vblora_vector_bank".into()],
        Family::Tuner(name) => TUNERS
            .iter()
            .find(|t| t.family == name)
            .map(|t| t.shared.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default(),
        _ => vec![],
    }
}

fn vera(
    path: &Path,
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Result<Vec<ModuleAdapter>> {
    let (a, b) = ("base_model.vera_A", "base_model.vera_B");
    if file.tensors().iter().all(|t| t.name != a && t.name != b) {
        let seed = json
            .get("projection_prng_key")
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into());
        return Err(Error::UnsupportedPeftType {
            path: path.to_path_buf(),
            peft_type: "VERA with save_projection=false".into(),
            reason: format!(
                "the shared projections vera_A/vera_B were not saved (they are regenerated from projection_prng_key={seed} by torch's initialisers, which adapterkit does not reproduce); save the adapter again with save_projection=True"
            ),
        });
    }
    let (groups, full) = group(file, &["vera_lambda_b", "vera_lambda_d"], problems);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let (Some(lb), Some(ld)) = (parts.get("vera_lambda_b"), parts.get("vera_lambda_d")) else {
            problems.push(format!(
                "module {module:?}: VeRA needs both vera_lambda_b and vera_lambda_d"
            ));
            continue;
        };
        if !selected(cfg, &module, problems) {
            continue;
        }
        out.push(weight_module(
            module,
            Family::Vera,
            Payload::Vera {
                a: a.into(),
                b: b.into(),
                lambda_b: lb.name.clone(),
                lambda_d: ld.name.clone(),
                fan_in_fan_out: cfg.fan_in_fan_out,
            },
        ));
    }
    // The projections are not module tensors; everything else unmatched replaces base tensors.
    out.extend(replacements(
        full.into_iter()
            .filter(|(t, _)| t.name != a && t.name != b)
            .collect(),
        Family::Vera,
    ));
    Ok(out)
}

fn fourier(
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let (groups, full) = group(file, &["fourierft_spectrum"], problems);
    let seed = json
        .get("random_loc_seed")
        .and_then(Value::as_u64)
        .unwrap_or(777);
    let scaling = json.get("scaling").and_then(Value::as_f64).unwrap_or(150.0);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let t = parts["fourierft_spectrum"];
        if t.shape.len() != 1 {
            problems.push(format!(
                "tensor {:?}: a FourierFT spectrum is 1-D, found {}",
                t.name,
                shape_str(t)
            ));
            continue;
        }
        if !selected(cfg, &module, problems) {
            continue;
        }
        out.push(weight_module(
            module,
            Family::FourierFt,
            Payload::Fourier {
                spectrum: t.name.clone(),
                seed,
                scaling,
                fan_in_fan_out: cfg.fan_in_fan_out,
            },
        ));
    }
    out.extend(replacements(full, Family::FourierFt));
    out
}

fn boft(
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let (groups, full) = group(file, &["boft_R", "boft_s"], problems);
    let configured = json.get("boft_n_butterfly_factor").and_then(Value::as_u64);
    let (mut disagree, mut seen_factors) = (0, 0);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let (Some(r), Some(s)) = (parts.get("boft_R"), parts.get("boft_s")) else {
            problems.push(format!(
                "module {module:?}: BOFT needs both boft_R and boft_s"
            ));
            continue;
        };
        if r.shape.len() != 4 || r.shape[2] != r.shape[3] {
            problems.push(format!(
                "tensor {:?}: boft_R must be (factors, blocks, b, b), found {}",
                r.name,
                shape_str(r)
            ));
            continue;
        }
        // The tensors decide the number of butterfly factors: PEFT lowers the configured value
        // to 1 when its CUDA extension is missing but still saves the configured number.
        if let Some(c) = configured {
            if c.max(1) != r.shape[0] {
                disagree += 1;
                seen_factors = r.shape[0];
            }
        }
        if !selected(cfg, &module, problems) {
            continue;
        }
        out.push(weight_module(
            module,
            Family::Boft,
            Payload::Butterfly {
                r: r.name.clone(),
                s: s.name.clone(),
                fan_in_fan_out: cfg.fan_in_fan_out,
            },
        ));
    }
    if disagree > 0 {
        notes.push(format!(
            "boft_n_butterfly_factor is {} in the config but boft_R holds {seen_factors} factor(s) in {disagree} module(s) (PEFT without its CUDA extension trains with one factor but saves the configured value); following the tensors",
            configured.unwrap_or(0)
        ));
    }
    out.extend(replacements(full, Family::Boft));
    out
}

fn adalora(
    path: &Path,
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Result<Vec<ModuleAdapter>> {
    let init_r = json.get("init_r").and_then(Value::as_u64).unwrap_or(12);
    let alpha = json
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .unwrap_or(8.0);
    // rank_pattern: "<module>.lora_E" (or "<module>") → boolean mask over the init_r ranks.
    let mut masks: BTreeMap<String, u64> = BTreeMap::new();
    if let Some(Value::Object(m)) = json.get("rank_pattern") {
        for (k, v) in m {
            let Some(bits) = v.as_array() else {
                return Err(Error::InvalidConfig {
                    path: path.to_path_buf(),
                    message: format!("rank_pattern[{k:?}] must be a list of booleans"),
                });
            };
            let kept = bits.iter().filter(|b| b.as_bool() == Some(true)).count() as u64;
            let module = k.strip_suffix(".lora_E").unwrap_or(k).to_string();
            masks.insert(module, kept);
        }
    }
    let (groups, full) = group(file, &["lora_A", "lora_B", "lora_E"], problems);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let (Some(a), Some(b), Some(e)) = (
            parts.get("lora_A"),
            parts.get("lora_B"),
            parts.get("lora_E"),
        ) else {
            problems.push(format!(
                "module {module:?}: AdaLoRA needs lora_A, lora_B and lora_E"
            ));
            continue;
        };
        if a.shape.len() != 2
            || b.shape.len() != 2
            || e.shape.len() != 2
            || a.shape[0] != b.shape[1]
            || e.shape[0] != a.shape[0]
        {
            problems.push(format!(
                "module {module:?}: AdaLoRA shapes do not agree: lora_A {}, lora_B {}, lora_E {} (expected (r, in), (out, r), (r, 1))",
                shape_str(a),
                shape_str(b),
                shape_str(e)
            ));
            continue;
        }
        let rank = a.shape[0];
        let want = masks.get(&module).copied().unwrap_or(init_r);
        if rank != want {
            problems.push(format!(
                "module {module:?}: the config gives r={want} ({}) but the tensors have r={rank}",
                if masks.contains_key(&module) {
                    "rank_pattern mask"
                } else {
                    "init_r"
                }
            ));
            continue;
        }
        if !selected(cfg, &module, problems) {
            continue;
        }
        // PEFT: scaling = lora_alpha (or the rank when alpha ≤ 0), divided by ranknum + 1e-5 where
        // ranknum stays init_r after the rank pattern shrinks the module.
        let scaling = if alpha > 0.0 { alpha } else { rank as f64 };
        let scale = (scaling as f32 / (init_r as f32 + 1e-5)) as f64;
        out.push(weight_module(
            module,
            Family::AdaLora,
            Payload::LowRank(LowRank {
                layer: LayerKind::Linear {
                    fan_in_fan_out: cfg.fan_in_fan_out,
                },
                a: a.name.clone(),
                b: b.name.clone(),
                rank,
                alpha: scaling,
                rslora: false,
                scale,
                magnitude: None,
                singular_values: Some(e.name.clone()),
            }),
        ));
    }
    out.extend(replacements(full, Family::AdaLora));
    Ok(out)
}

fn miss(
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let mode = match json.get("init_weights") {
        Some(Value::String(s)) if s == "bat" => MissMode::Bat,
        Some(Value::String(s)) if s == "mini" => MissMode::Mini,
        _ => MissMode::Default,
    };
    // Bone, MiSS's predecessor, saved the same tensor as `bone_block`.
    let (groups, full) = group(file, &["miss_block", "bone_block"], problems);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let t = parts
            .get("miss_block")
            .or_else(|| parts.get("bone_block"))
            .copied()
            .expect("grouped by these roles");
        let want_dims = if mode == MissMode::Bat { 3 } else { 2 };
        if t.shape.len() != want_dims {
            problems.push(format!(
                "tensor {:?}: a MiSS {mode:?} block has {want_dims} dimensions, found {}",
                t.name,
                shape_str(t)
            ));
            continue;
        }
        if !selected(cfg, &module, problems) {
            continue;
        }
        out.push(weight_module(
            module,
            Family::Miss,
            Payload::Miss {
                block: t.name.clone(),
                mode,
            },
        ));
    }
    out.extend(replacements(full, Family::Miss));
    out
}

fn vblora(
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let bank = "base_model.vblora_vector_bank";
    let topk = json.get("topk").and_then(Value::as_u64).unwrap_or(2);
    let roles = [
        "vblora_logits_A",
        "vblora_logits_B",
        "vblora_logits_A_topk_indices",
        "vblora_logits_A_topk_weights",
        "vblora_logits_B_topk_indices",
        "vblora_logits_B_topk_weights",
    ];
    let (groups, full) = group(file, &roles, problems);
    if file.tensors().iter().all(|t| t.name != bank) {
        problems.push(format!("the shared vector bank {bank:?} is missing"));
    }
    let mut out = Vec::new();
    for (module, parts) in groups {
        let logits = |f: &str| -> Option<VbLogits> {
            match (
                parts.get(f),
                parts.get(format!("{f}_topk_indices").as_str()),
                parts.get(format!("{f}_topk_weights").as_str()),
            ) {
                (Some(l), None, None) => Some(VbLogits::Full(l.name.clone())),
                (None, Some(i), Some(w)) => Some(VbLogits::TopK {
                    indices: i.name.clone(),
                    weights: w.name.clone(),
                }),
                _ => None,
            }
        };
        let (Some(a), Some(b)) = (logits("vblora_logits_A"), logits("vblora_logits_B")) else {
            problems.push(format!("module {module:?}: VB-LoRA needs logits for A and B (full, or top-k indices and weights)"));
            continue;
        };
        if !selected(cfg, &module, problems) {
            continue;
        }
        out.push(weight_module(
            module,
            Family::VbLora,
            Payload::VbLora(VbLora {
                a,
                b,
                bank: bank.into(),
                topk,
                fan_in_fan_out: cfg.fan_in_fan_out,
            }),
        ));
    }
    out.extend(replacements(
        full.into_iter().filter(|(t, _)| t.name != bank).collect(),
        Family::VbLora,
    ));
    out
}

fn ln_tuning(
    cfg: &LoraConfig,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let (_, full) = group(file, &[], problems);
    let mut out = Vec::new();
    for (t, target) in full {
        let key = t.name.strip_prefix(KEY_PREFIX).unwrap_or(&t.name);
        let Some((module, _)) = key.split_once(".ln_tuning_layers.") else {
            problems.push(format!(
                "tensor {:?}: not an LN-tuning tensor (<module>.ln_tuning_layers.<param>)",
                t.name
            ));
            continue;
        };
        if !selected(cfg, module, problems) {
            continue;
        }
        out.push(ModuleAdapter {
            module: module.to_string(),
            target,
            family: Family::LnTuning,
            payload: Payload::Replace {
                tensor: t.name.clone(),
            },
        });
    }
    out
}

/// Token indices from a config value: a list (for the one target) or `{module: list}`.
pub fn token_indices(v: &Value, module: &str) -> Option<Vec<u64>> {
    match v {
        Value::Array(a) => a.iter().map(Value::as_u64).collect(),
        Value::Object(m) => m
            .iter()
            .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .and_then(|(_, v)| token_indices(v, module)),
        _ => None,
    }
}

fn trainable_tokens(
    path: &Path,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Result<Vec<ModuleAdapter>> {
    let indices = json.get("token_indices").cloned().unwrap_or(Value::Null);
    let (groups, full) = group(file, &["trainable_tokens_delta"], problems);
    let mut out = Vec::new();
    for (module, parts) in groups {
        let t = parts["trainable_tokens_delta"];
        let Some(idx) = token_indices(&indices, &module) else {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message: format!("token_indices gives no indices for {module:?}"),
            });
        };
        out.push(rows_module(
            module,
            t,
            idx,
            Family::TrainableTokens,
            problems,
        ));
    }
    out.extend(replacements(full, Family::TrainableTokens));
    Ok(out)
}

/// A `ReplaceRows` module adapter, checking the row count against the indices.
pub fn rows_module(
    module: String,
    t: &TensorInfo,
    indices: Vec<u64>,
    family: Family,
    problems: &mut Vec<String>,
) -> ModuleAdapter {
    if t.shape.first().copied() != Some(indices.len() as u64) || t.shape.len() != 2 {
        problems.push(format!(
            "tensor {:?}: {} holds {:?} rows but the config lists {} token indices",
            t.name,
            shape_str(t),
            t.shape.first(),
            indices.len()
        ));
    }
    ModuleAdapter {
        target: format!("{module}.weight"),
        module,
        family,
        payload: Payload::ReplaceRows {
            tensor: t.name.clone(),
            indices,
        },
    }
}

/// What the reader needs to know about one of PEFT's newer tuners.
struct TunerSpec {
    /// PEFT type.
    peft_type: &'static str,
    /// Family name.
    family: &'static str,
    /// Per-module key suffixes; the first is required and identifies a module.
    roles: &'static [&'static str],
    /// Model-level shared tensors (full key names).
    shared: &'static [&'static str],
    /// Whether the payload targets the module's bias instead of its weight.
    bias: bool,
}

const TUNERS: &[TunerSpec] = &[
    TunerSpec {
        peft_type: "RANDLORA",
        family: "randlora",
        roles: &[
            "randlora_lambda",
            "randlora_gamma",
            "randlora_A",
            "randlora_B",
        ],
        shared: &["base_model.randlora_A", "base_model.randlora_B"],
        bias: false,
    },
    TunerSpec {
        peft_type: "SHIRA",
        family: "shira",
        roles: &["shira_weight", "shira_indices"],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "C3A",
        family: "c3a",
        roles: &["c3a_kernel"],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "ROAD",
        family: "road",
        roles: &["road_theta", "road_alpha"],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "DELORA",
        family: "delora",
        roles: &["delora_A", "delora_B", "delora_lambda", "delora_w_norm"],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "GRALORA",
        family: "gralora",
        roles: &[
            "gralora_A",
            "gralora_B",
            "gralora_A_general.weight",
            "gralora_B_general.weight",
        ],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "PVERA",
        family: "pvera",
        roles: &["pvera_lambda_b", "pvera_lambda_d"],
        shared: &["base_model.pvera_A", "base_model.pvera_B"],
        bias: false,
    },
    TunerSpec {
        peft_type: "BEFT",
        family: "beft",
        roles: &["beft_bias"],
        shared: &[],
        bias: true,
    },
    TunerSpec {
        peft_type: "UNILORA",
        family: "unilora",
        roles: &[
            "unilora_indices_A",
            "unilora_indices_B",
            "unilora_scales_A",
            "unilora_scales_B",
        ],
        shared: &["base_model.unilora_theta_d"],
        bias: false,
    },
    TunerSpec {
        peft_type: "GLORA",
        family: "glora",
        roles: &[
            "glora_A.Xd",
            "glora_A.Xu",
            "glora_A.X",
            "glora_B.Xd",
            "glora_B.Xu",
            "glora_B.X",
            "glora_C.Xd",
            "glora_C.Xu",
            "glora_C.X",
            "glora_D.X",
            "glora_E.X",
            "glora_A.zeros",
            "glora_B.zeros",
            "glora_C.zeros",
            "glora_D.zeros",
            "glora_E.zeros",
        ],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "SUPERTUNING",
        family: "supertuning",
        roles: &[
            "supertuning_values",
            "supertuning_indices",
            "supertuning_lora_A.weight",
            "supertuning_lora_B.weight",
        ],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "DEFT",
        family: "deft",
        roles: &["deft_P", "deft_R"],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "PEANUT",
        family: "peanut",
        roles: &[
            "peanut_A.weight",
            "peanut_B.weight",
            "peanut_encoders.0.weight",
            "peanut_encoders.1.weight",
            "peanut_encoders.2.weight",
            "peanut_encoders.3.weight",
            "peanut_encoders.4.weight",
            "peanut_encoders.5.weight",
            "peanut_encoders.6.weight",
            "peanut_encoders.7.weight",
            "peanut_decoders.0.weight",
            "peanut_decoders.1.weight",
            "peanut_decoders.2.weight",
            "peanut_decoders.3.weight",
            "peanut_decoders.4.weight",
            "peanut_decoders.5.weight",
            "peanut_decoders.6.weight",
            "peanut_decoders.7.weight",
        ],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "FROD",
        family: "frod",
        roles: &["frod_lambda_l", "frod_lambda_s_values"],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "OSF",
        family: "osf",
        roles: &[
            "osf_svd_params.U_low",
            "osf_svd_params.S_low",
            "osf_svd_params.V_low",
        ],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "WAVEFT",
        family: "waveft",
        roles: &["waveft_spectrum"],
        shared: &[],
        bias: false,
    },
    TunerSpec {
        peft_type: "HIRA",
        family: "hira",
        roles: &["hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"],
        shared: &[],
        bias: false,
    },
];

/// The family of a newer PEFT tuner adapterkit merges, if it is one.
pub fn tuner_family(peft_type: &str) -> Option<Family> {
    TUNERS
        .iter()
        .find(|t| t.peft_type == peft_type)
        .map(|t| Family::Tuner(t.family))
}

/// Why adapterkit does not merge a PEFT type that PEFT itself can merge (or cannot), if known.
pub fn refusal_reason(peft_type: &str) -> Option<&'static str> {
    Some(match peft_type {
        "TINYLORA" => "TinyLoRA's layer-to-group mapping depends on the model's module order, which the files do not record",
        "PSOFT" => "PSOFT rebuilds its frame from an SVD of the base weight whose signs LAPACK chooses: the result is not reproducible",
        "ADAMSS" => "AdaMSS needs scikit-learn's clustering and its row-to-subspace assignment is not saved",
        "LILY" | "POLY" | "XLORA" => "the update depends on the input through a learned router, so it cannot be folded into the weights",
        "SHADOW" => "SHADOW adds a side network at run time and has no mergeable weights",
        "CARTRIDGE" => "a prompt-learning method (a trained KV cache): nothing to merge into the weights",
        _ => return None,
    })
}

fn tuner(
    name: &'static str,
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
    problems: &mut Vec<String>,
) -> Vec<ModuleAdapter> {
    let spec = TUNERS
        .iter()
        .find(|t| t.family == name)
        .expect("tuner families come from TUNERS");
    let (mut groups, full) = group(file, spec.roles, problems);
    // Model-level shared tensors (`base_model.randlora_A`) are not a module's.
    groups.retain(|_, parts| {
        !parts
            .values()
            .all(|t| spec.shared.contains(&t.name.as_str()))
    });
    // RandLoRA saved without its bases (dense variant): they are regenerated from torch's CPU
    // generator seeded with projection_prng_key, as PEFT does at load time.
    let shared_missing = spec
        .shared
        .iter()
        .any(|s| file.tensors().iter().all(|t| t.name != *s));
    let randlora_regen = spec.peft_type == "RANDLORA"
        && shared_missing
        && !json_bool(json, "sparse", false)
        && !json_bool(json, "very_sparse", false)
        && json
            .get("projection_prng_key")
            .and_then(Value::as_u64)
            .is_some();
    for s in spec.shared.iter().filter(|_| !randlora_regen) {
        if file.tensors().iter().all(|t| t.name != *s) {
            let why = if spec.peft_type == "RANDLORA" || spec.peft_type == "PVERA" {
                " (saved with save_projection=False: the random bases are not in the file; save it again with save_projection=True)"
            } else {
                ""
            };
            problems.push(format!("the shared tensor {s:?} is missing{why}"));
        }
    }
    let num = |k: &str| json.get(k).and_then(Value::as_f64);
    let mut out = Vec::new();
    for (module, parts) in groups {
        // HiRA saves embeddings under hira_embedding_*; everything else needs its first role.
        let first = if parts.contains_key("hira_embedding_A") {
            "hira_embedding_A"
        } else if spec.peft_type == "GLORA" {
            parts.keys().next().copied().unwrap_or(spec.roles[0])
        } else {
            spec.roles[0]
        };
        if !parts.contains_key(first) {
            problems.push(format!(
                "module {module:?}: {} tensor {first} is missing",
                spec.peft_type
            ));
            continue;
        }
        if spec.peft_type == "UNILORA" && !parts.contains_key("unilora_indices_A") {
            problems.push(format!("module {module:?}: UniLoRA saved without save_indices=True: its indices are drawn from numpy's PCG64 in the model's module order, which adapterkit does not reproduce"));
            continue;
        }
        if !selected(cfg, &module, problems) {
            continue;
        }
        let mut tensors: Vec<(String, String)> = parts
            .iter()
            .map(|(r, t)| (r.to_string(), t.name.clone()))
            .collect();
        if spec.peft_type == "FROD" {
            // The category's shared frame: base_model.frod_{V,s_indices,s_size}.<category>.
            let cat = frod_category(&module);
            for (role, prefix) in [
                ("frod_V", "base_model.frod_V."),
                ("frod_s_indices", "base_model.frod_s_indices."),
                ("frod_s_size", "base_model.frod_s_size."),
            ] {
                let name = format!("{prefix}{cat}");
                if file.tensors().iter().any(|t| t.name == name) {
                    tensors.push((role.to_string(), name));
                } else {
                    problems.push(format!(
                        "module {module:?}: FRoD's shared {name:?} is missing"
                    ));
                }
            }
        }
        if !randlora_regen {
            tensors.extend(spec.shared.iter().map(|s| (s.to_string(), s.to_string())));
        }
        let mut params = Vec::new();
        match spec.peft_type {
            "RANDLORA" => {
                params.push((
                    "scale".into(),
                    num("randlora_alpha").unwrap_or(640.0) / cfg.r.max(1) as f64,
                ));
                if randlora_regen {
                    params.push(("regen".into(), 1.0));
                    params.push(("seed".into(), num("projection_prng_key").unwrap_or(0.0)));
                    params.push(("r".into(), cfg.r as f64));
                }
            }
            "GRALORA" => {
                let hybrid = num("hybrid_r").unwrap_or(0.0);
                params.push((
                    "scale".into(),
                    num("alpha").unwrap_or(64.0) / (cfg.r as f64 + hybrid),
                ));
                params.push(("k".into(), num("gralora_k").unwrap_or(2.0)));
            }
            "PVERA" => params.push(("r".into(), cfg.r as f64)),
            "PEANUT" => {
                params.push(("scale".into(), num("scaling").unwrap_or(1.0)));
                let depth = num("depth").unwrap_or(1.0);
                let encoders = parts
                    .keys()
                    .filter(|r| r.starts_with("peanut_encoders."))
                    .count();
                let decoders = parts
                    .keys()
                    .filter(|r| r.starts_with("peanut_decoders."))
                    .count();
                if !(depth >= 0.0
                    && depth.fract() == 0.0
                    && depth as usize == encoders
                    && depth as usize == decoders)
                {
                    problems.push(format!(
                        "module {module:?}: PEANuT depth {depth} does not match the {encoders} encoder and {decoders} decoder tensors"
                    ));
                    continue;
                }
                params.push(("depth".into(), depth));
                let act = match json.get("act_fn").and_then(Value::as_str).unwrap_or("relu") {
                    "relu" => 0.0,
                    "gelu" => 1.0,
                    "silu" => 2.0,
                    "tanh" => 3.0,
                    other => {
                        problems.push(format!("module {module:?}: PEANuT activation {other:?} is not supported (relu, gelu, silu, tanh)"));
                        continue;
                    }
                };
                params.push(("act".into(), act));
            }
            "DEFT" => {
                let r = parts
                    .get("deft_P")
                    .and_then(|t| t.shape.get(1).copied())
                    .unwrap_or(1)
                    .max(1) as f64;
                params.push(("scale".into(), num("alpha").map(|a| a / r).unwrap_or(1.0)));
                params.push((
                    "qr".into(),
                    if json.get("decomposition_method").and_then(Value::as_str) == Some("qr") {
                        1.0
                    } else {
                        0.0
                    },
                ));
                params.push((
                    "para".into(),
                    if json_bool(json, "para", false) {
                        1.0
                    } else {
                        0.0
                    },
                ));
            }
            "SUPERTUNING" => {
                let scale = if cfg.r > 0 {
                    num("lora_alpha").unwrap_or(8.0) / cfg.r as f64
                } else {
                    0.0
                };
                params.push(("scale".into(), scale));
                params.push(("sparsity".into(), num("sparsity").unwrap_or(0.9)));
                params.push((
                    "select_top".into(),
                    if json_bool(json, "select_top", true) {
                        1.0
                    } else {
                        0.0
                    },
                ));
            }
            "WAVEFT" => {
                params.push(("scaling".into(), num("scaling").unwrap_or(25.0)));
                params.push(("seed".into(), num("random_loc_seed").unwrap_or(777.0)));
                params.push((
                    "idwt".into(),
                    if json_bool(json, "use_idwt", true) {
                        1.0
                    } else {
                        0.0
                    },
                ));
                let taps = match json
                    .get("wavelet_family")
                    .and_then(Value::as_str)
                    .unwrap_or("db1")
                {
                    "db1" | "haar" => 2.0,
                    "db2" => 4.0,
                    other => {
                        problems.push(format!("module {module:?}: WaveFT wavelet {other:?} is not supported (db1, db2)"));
                        continue;
                    }
                };
                params.push(("taps".into(), taps));
            }
            "ROAD" => {
                let gs = num("group_size").unwrap_or(64.0);
                if !(gs >= 2.0 && gs.fract() == 0.0 && (gs as u64) % 2 == 0 && gs < 1e9) {
                    problems.push(format!("module {module:?}: RoAd group_size must be a positive even integer, found {gs}"));
                    continue;
                }
                params.push(("group_size".into(), gs));
                let variant = match json
                    .get("variant")
                    .and_then(Value::as_str)
                    .unwrap_or("road_1")
                {
                    "road_1" => 1.0,
                    "road_2" => 2.0,
                    "road_4" => 4.0,
                    other => {
                        problems.push(format!("module {module:?}: unknown RoAd variant {other:?}"));
                        continue;
                    }
                };
                params.push(("variant".into(), variant));
            }
            _ => {}
        }
        let target = if spec.bias {
            format!("{module}.bias")
        } else {
            format!("{module}.weight")
        };
        out.push(ModuleAdapter {
            target,
            module,
            family: Family::Tuner(spec.family),
            payload: Payload::Tuner(adapterkit_core::ir::Tuner {
                method: spec.peft_type.to_string(),
                tensors,
                params,
                fan_in_fan_out: cfg.fan_in_fan_out,
            }),
        });
    }
    if spec.peft_type == "UNILORA" && out.is_empty() && problems.is_empty() {
        problems.push("UniLoRA saved without save_indices=True: its indices are drawn from numpy's PCG64 in the model's module order, which adapterkit does not reproduce; save it again with save_indices=True".into());
    }
    out.extend(replacements(
        full.into_iter()
            .filter(|(t, _)| {
                !spec.shared.contains(&t.name.as_str()) && !t.name.starts_with("base_model.frod_")
            })
            .collect(),
        Family::Tuner(spec.family),
    ));
    out
}

/// FRoD's category of a module path: the last component after a numeric one (`…layers.0.mlp` →
/// `mlp`), else the last two joined (`self_attn_q_proj`), with BERT's `attention.output.dense`
/// as `attention_output`.
pub fn frod_category(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.as_slice() {
        [one] => one.to_string(),
        [.., a, b] if a.chars().all(|c| c.is_ascii_digit()) => b.to_string(),
        [.., p, a, b] if *a == "output" && *b == "dense" && *p == "attention" => {
            "attention_output".into()
        }
        [.., a, b] => format!("{a}_{b}"),
        [] => String::new(),
    }
}
