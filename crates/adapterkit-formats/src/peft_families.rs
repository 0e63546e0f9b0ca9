//! PEFT families beyond LoRA: IA3, LoHa, LoKr, OFT, BOFT, HRA, VeRA, FourierFT. Key tables and formulas: `formats/peft.md`.
//!
//! Every family goes through the same grouping: keys are split into module path and a known
//! suffix; keys with no known suffix are full tensors that replace the base's (`modules_to_save`).
//! Problems are collected and reported together.

use std::collections::BTreeMap;
use std::path::Path;

use adapterkit_core::ir::{
    Cayley, Family, Hadamard, Householder, KronFactor, Kronecker, ModuleAdapter, Oft, Payload,
    ScaleAxis,
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
        if !t.dtype.is_float() {
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
        Family::Loha => loha(cfg, json, file, &mut problems),
        Family::Lokr => lokr(cfg, file, &mut problems),
        Family::Oft => oft(cfg, json, file, &mut problems),
        Family::Hra => hra(cfg, json, file, &mut problems),
        Family::Vera => vera(path, cfg, json, file, &mut problems)?,
        Family::FourierFt => fourier(cfg, json, file, &mut problems),
        Family::Boft => boft(cfg, json, file, &mut problems, notes),
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
        let feedforward = ff
            .as_ref()
            .is_some_and(|s| LoraConfig::selector_matches(s, &module, true));
        // (1, in[, 1…]) for feedforward modules, (out, 1[, 1…]) otherwise.
        let ok = l.shape.len() >= 2
            && if feedforward {
                l.shape[0] == 1
            } else {
                l.shape[1..].iter().all(|&d| d == 1)
            };
        if !ok {
            problems.push(format!(
                "tensor {:?}: shape {} does not fit a {} IA3 vector ({})",
                l.name,
                shape_str(l),
                if feedforward {
                    "feedforward (input-scaling)"
                } else {
                    "output-scaling"
                },
                if feedforward { "(1, in)" } else { "(out, 1)" }
            ));
            continue;
        }
        out.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::Ia3,
            payload: Payload::Scale {
                tensor: l.name.clone(),
                axis: if feedforward {
                    ScaleAxis::Input
                } else {
                    ScaleAxis::Output
                },
                fan_in_fan_out: cfg.fan_in_fan_out,
            },
        });
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
    _json: &Value,
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
        out.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::Loha,
            payload: Payload::Hadamard(Hadamard {
                w1a: parts["hada_w1_a"].name.clone(),
                w1b: parts["hada_w1_b"].name.clone(),
                w2a: parts["hada_w2_a"].name.clone(),
                w2b: parts["hada_w2_b"].name.clone(),
                cp,
                rank,
                alpha,
                scale,
            }),
        });
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
        let name = |r: &str| parts.get(r).map(|t| t.name.clone());
        let w1 = match (name("lokr_w1"), name("lokr_w1_a"), name("lokr_w1_b")) {
            (Some(w), None, None) => KronFactor::Full(w),
            (None, Some(a), Some(b)) => KronFactor::Product { a, b },
            _ => {
                problems.push(format!(
                    "module {module:?}: LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b"
                ));
                continue;
            }
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
            _ => {
                problems.push(format!("module {module:?}: LoKr needs lokr_w2, lokr_w2_a and lokr_w2_b, or those with lokr_t2"));
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
        out.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::Lokr,
            payload: Payload::Kronecker(Kronecker {
                w1,
                w2,
                rank,
                alpha,
                scale,
            }),
        });
    }
    out.extend(replacements(full, Family::Lokr));
    out
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
    let (groups, full) = group(file, &["oft_R.weight"], problems);
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
        let t = parts["oft_R.weight"];
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
        out.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::Oft,
            payload: Payload::Oft(Oft {
                tensor: t.name.clone(),
                block_size: b,
                block_share,
                cayley,
                coft_eps,
                fan_in_fan_out: cfg.fan_in_fan_out,
            }),
        });
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
        out.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::Hra,
            payload: Payload::Householder(Householder {
                tensor: t.name.clone(),
                rank,
                gram_schmidt,
                fan_in_fan_out: cfg.fan_in_fan_out,
            }),
        });
    }
    out.extend(replacements(full, Family::Hra));
    out
}

/// The tensors a family shares between modules (each must be used at least once).
pub fn shared_tensors(family: Family) -> Vec<String> {
    match family {
        Family::Vera => vec!["base_model.vera_A".into(), "base_model.vera_B".into()],
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
        out.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::Vera,
            payload: Payload::Vera {
                a: a.into(),
                b: b.into(),
                lambda_b: lb.name.clone(),
                lambda_d: ld.name.clone(),
                fan_in_fan_out: cfg.fan_in_fan_out,
            },
        });
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
        out.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::FourierFt,
            payload: Payload::Fourier {
                spectrum: t.name.clone(),
                seed,
                scaling,
                fan_in_fan_out: cfg.fan_in_fan_out,
            },
        });
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
        out.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::Boft,
            payload: Payload::Butterfly {
                r: r.name.clone(),
                s: s.name.clone(),
                fan_in_fan_out: cfg.fan_in_fan_out,
            },
        });
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
