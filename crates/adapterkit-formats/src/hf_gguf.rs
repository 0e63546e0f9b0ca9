//! A Hugging Face checkpoint of the Llama family as a GGUF model: what llama.cpp's
//! `convert_hf_to_gguf.py` writes for `LlamaForCausalLM`/`MistralForCausalLM` (`llama`, with the
//! rotary permute on q/k rows), `Qwen2ForCausalLM` (`qwen2`) and `Qwen3ForCausalLM` (`qwen3`):
//! the architecture metadata, tensor names, the permute, and the tokenizer ([`crate::gguf_vocab`]).
//!
//! Only the plan is made here (names, shapes, metadata); the values stream through the writer in
//! `adapterkit-ops`. Architectures, tensors or settings the converter does not know are refused
//! with what is missing, never skipped.

use std::path::Path;

use serde_json::Value as Json;

use crate::gguf::Value;
use crate::gguf_lora::ArchMap;
use crate::{Error, Result};

/// The architectures [`plan`] converts, as `(HF architectures entry, llama.cpp name)`.
pub const SUPPORTED: &[(&str, &str)] = &[
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "llama"),
    ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"),
];

/// One tensor of the converted model.
#[derive(Debug, Clone)]
pub struct ConvTensor {
    /// GGUF name.
    pub name: String,
    /// The HF tensor it comes from (`None` for generated tensors).
    pub hf: Option<String>,
    /// ggml dimensions (`ne[0]` is the row length).
    pub ne: Vec<u64>,
    /// Apply the Llama rotary permute to the rows, over this many heads.
    pub permute_heads: Option<usize>,
    /// Values of a generated tensor (llama3 `rope_freqs`).
    pub values: Option<Vec<f32>>,
}

/// The converted model, before its values.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// llama.cpp architecture.
    pub arch: String,
    /// Metadata in convert_hf_to_gguf's order, `general.file_type` holding 0 (set it with
    /// [`Conversion::metadata_for`]).
    pub metadata: Vec<(String, Value)>,
    /// Tensors in the checkpoint's order.
    pub tensors: Vec<ConvTensor>,
}

impl Conversion {
    /// The metadata with `general.file_type` = `file_type`.
    pub fn metadata_for(&self, file_type: u32) -> Vec<(String, Value)> {
        self.metadata
            .iter()
            .map(|(k, v)| {
                if k == "general.file_type" {
                    (k.clone(), Value::U32(file_type))
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect()
    }
}

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Gguf {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `str.title()` of the directory name, which is what convert_hf_to_gguf ends up naming a model
/// without a model card.
fn title(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut prev_alpha = false;
    for c in name.chars() {
        if c.is_alphabetic() {
            if prev_alpha {
                out.extend(c.to_lowercase());
            } else {
                out.extend(c.to_uppercase());
            }
            prev_alpha = true;
        } else {
            out.push(c);
            prev_alpha = false;
        }
    }
    out
}

/// gguf-py's parameter-count label (`27K`, `1.1B`).
pub fn size_label(params: u64) -> String {
    let p = params as f64;
    let (scaled, suffix) = if p > 1e12 {
        (p * 1e-12, "T")
    } else if p > 1e9 {
        (p * 1e-9, "B")
    } else if p > 1e6 {
        (p * 1e-6, "M")
    } else {
        (p * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round_ties_even() as u64);
    let len = digits.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(len);
    format!("{scaled:.fix$}{suffix}")
}

/// Plan the conversion of the checkpoint in `dir` (its `config.json` is `config`), whose tensors
/// are `tensors` (HF name, row-major shape), to GGUF.
pub fn plan(dir: &Path, config: &Json, tensors: &[(String, Vec<u64>)]) -> Result<Conversion> {
    let cfg_path = dir.join("config.json");
    let hf_arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .ok_or_else(|| {
            err(
                &cfg_path,
                "no \"architectures\" entry: cannot tell the model's architecture",
            )
        })?;
    let Some(&(_, arch)) = SUPPORTED.iter().find(|(h, _)| *h == hf_arch) else {
        return Err(err(
            &cfg_path,
            format!(
                "architecture {hf_arch}: adapterkit converts {} to GGUF; {hf_arch} needs its own tensor names, hyperparameter keys and tensor transforms, which this version does not have",
                SUPPORTED.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
            ),
        ));
    };
    let map = ArchMap::for_arch(arch).expect("table has every supported arch");
    let num = |k: &str| config.get(k).and_then(Json::as_u64);
    let need = |k: &str| num(k).ok_or_else(|| err(&cfg_path, format!("{k} is missing")));
    let n_layer = need("num_hidden_layers")?;
    let hidden = need("hidden_size")?;
    let n_head = need("num_attention_heads")?;
    let n_head_kv = num("num_key_value_heads");
    let vocab = need("vocab_size")?;
    for k in ["num_local_experts", "num_experts", "n_routed_experts"] {
        if num(k).is_some_and(|n| n > 0) {
            return Err(err(
                &cfg_path,
                format!("{k}: mixture-of-experts models are not converted by this version"),
            ));
        }
    }
    let rope: Json = config
        .get("rope_parameters")
        .or_else(|| config.get("rope_scaling"))
        .cloned()
        .filter(|v| !v.is_null())
        .unwrap_or(Json::Object(Default::default()));
    let rope_theta = rope
        .get("rope_theta")
        .or_else(|| config.get("rope_theta"))
        .and_then(Json::as_f64);
    let rope_type = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("default")
        .to_string();

    // Tensors, in the converter's order: sorted by HF name (so blk.10 comes before blk.2).
    let mut sorted: Vec<&(String, Vec<u64>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    let mut unknown = Vec::new();
    let mut params = 0u64;
    for (name, shape) in sorted {
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let (module, suffix) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
        let Some(g) = map.to_gguf(module) else {
            unknown.push(name.clone());
            continue;
        };
        let permute_heads = if map.permute_qk {
            if module.ends_with("q_proj") {
                Some(n_head as usize)
            } else if module.ends_with("k_proj") {
                Some(n_head_kv.unwrap_or(n_head) as usize)
            } else {
                None
            }
        } else {
            None
        };
        params += shape.iter().product::<u64>();
        out.push(ConvTensor {
            name: format!("{g}.{suffix}"),
            hf: Some(name.clone()),
            ne: shape.iter().rev().copied().collect(),
            permute_heads,
            values: None,
        });
    }
    if !unknown.is_empty() {
        return Err(err(
            dir,
            format!(
                "{} tensor(s) have no GGUF name for {arch}: {}",
                unknown.len(),
                unknown
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }

    // Metadata, in convert_hf_to_gguf's order.
    let a = |k: &str| format!("{arch}.{k}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
    ];
    let dir_name = std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().to_string()))
        .unwrap_or_default();
    md.extend(sampling(dir)?);
    if !dir_name.is_empty() {
        md.push(("general.name".into(), Value::String(title(&dir_name))));
    }
    // rope_freqs is generated below and counts too.
    let head_dim = num("head_dim").unwrap_or(hidden / n_head.max(1));
    let mut rope_freqs = None;
    let mut rope_md: Vec<(String, Value)> = Vec::new();
    match rope_type.as_str() {
        "default" => {}
        "linear" => {
            let f = rope
                .get("factor")
                .and_then(Json::as_f64)
                .ok_or_else(|| err(&cfg_path, "linear rope scaling without a factor"))?;
            rope_md.push((a("rope.scaling.type"), Value::String("linear".into())));
            rope_md.push((a("rope.scaling.factor"), Value::F32(f as f32)));
        }
        "llama3" if arch == "llama" => {
            // convert_hf_to_gguf's defaults for missing keys.
            let g = |k: &str, d: f64| rope.get(k).and_then(Json::as_f64).unwrap_or(d);
            let base = rope_theta.unwrap_or(10000.0);
            let (factor, low, high, old) = (
                g("factor", 8.0),
                g("low_freq_factor", 1.0),
                g("high_freq_factor", 4.0),
                g("original_max_position_embeddings", 8192.0),
            );
            rope_freqs = Some(llama3_rope_factors(base, head_dim, factor, low, high, old));
        }
        other => {
            return Err(err(
                &cfg_path,
                format!("rope scaling {other:?} is not converted by this version (default, linear and llama3 are)"),
            ))
        }
    }
    if let Some(f) = &rope_freqs {
        params += f.len() as u64;
    }
    md.push((
        "general.size_label".into(),
        Value::String(size_label(params)),
    ));
    md.push((a("block_count"), Value::U32(n_layer as u32)));
    if let Some(c) = num("max_position_embeddings") {
        md.push((a("context_length"), Value::U32(c as u32)));
    }
    md.push((a("embedding_length"), Value::U32(hidden as u32)));
    if let Some(f) = num("intermediate_size") {
        md.push((a("feed_forward_length"), Value::U32(f as u32)));
    }
    md.push((a("attention.head_count"), Value::U32(n_head as u32)));
    if let Some(kv) = n_head_kv {
        md.push((a("attention.head_count_kv"), Value::U32(kv as u32)));
    }
    md.extend(rope_md);
    if let Some(t) = rope_theta {
        md.push((a("rope.freq_base"), Value::F32(t as f32)));
    }
    if let Some(e) = config.get("rms_norm_eps").and_then(Json::as_f64) {
        md.push((a("attention.layer_norm_rms_epsilon"), Value::F32(e as f32)));
    }
    if let Some(h) = num("head_dim") {
        md.push((a("attention.key_length"), Value::U32(h as u32)));
        md.push((a("attention.value_length"), Value::U32(h as u32)));
    }
    md.push(("general.file_type".into(), Value::U32(0)));
    if arch == "llama" {
        md.push((a("vocab_size"), Value::U32(vocab as u32)));
        md.push((a("rope.dimension_count"), Value::U32(head_dim as u32)));
    }
    md.push(("general.quantization_version".into(), Value::U32(2)));
    md.extend(crate::gguf_vocab::tokenizer_metadata(
        dir,
        vocab as usize,
        arch,
    )?);
    if let Some(f) = rope_freqs {
        out.insert(
            0,
            ConvTensor {
                name: "rope_freqs.weight".into(),
                hf: None,
                ne: vec![f.len() as u64],
                permute_heads: None,
                values: Some(f),
            },
        );
    }
    Ok(Conversion {
        arch: arch.into(),
        metadata: md,
        tensors: out,
    })
}

/// `general.sampling.*` from generation_config.json, as gguf-py's metadata reader takes them.
fn sampling(dir: &Path) -> Result<Vec<(String, Value)>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let g: Json =
        serde_json::from_str(&text).map_err(|e| err(&path, format!("not valid JSON: {e}")))?;
    // (key, generation_config names in priority order, integer?)
    const KEYS: &[(&str, &[&str], Option<bool>)] = &[
        ("sequence", &["sequence"], None),
        ("top_k", &["top_k"], Some(true)),
        ("top_p", &["top_p"], Some(false)),
        ("min_p", &["min_p"], Some(false)),
        ("xtc_probability", &["xtc_probability"], Some(false)),
        ("xtc_threshold", &["xtc_threshold"], Some(false)),
        ("temp", &["temperature"], Some(false)),
        ("penalty_last_n", &["penalty_last_n"], Some(true)),
        (
            "penalty_repeat",
            &["penalty_repeat", "repetition_penalty"],
            Some(false),
        ),
        ("mirostat", &["mirostat"], Some(true)),
        ("mirostat_tau", &["mirostat_tau"], Some(false)),
        ("mirostat_eta", &["mirostat_eta"], Some(false)),
    ];
    let mut out = Vec::new();
    for (key, names, int) in KEYS {
        let Some(v) = names
            .iter()
            .find_map(|n| g.get(*n))
            .filter(|v| !v.is_null())
        else {
            continue;
        };
        let value = match int {
            None => v.as_str().map(|s| Value::String(s.to_string())),
            Some(true) => v.as_i64().map(|i| Value::I32(i as i32)),
            Some(false) => v.as_f64().map(|f| Value::F32(f as f32)),
        };
        if let Some(value) = value {
            out.push((format!("general.sampling.{key}"), value));
        }
    }
    Ok(out)
}

/// Llama 3's per-frequency rope factors (`rope_freqs.weight`), as convert_hf_to_gguf computes
/// them (the frequencies in f32, as torch does).
fn llama3_rope_factors(
    base: f64,
    dim: u64,
    factor: f64,
    low: f64,
    high: f64,
    old_ctx: f64,
) -> Vec<f32> {
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / (base as f32).powf(i as f32 / dim as f32);
            let wavelen = f64::from(2.0 * std::f32::consts::PI / freq);
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(size_label(27_000), "27K");
        assert_eq!(size_label(1_100_048_384), "1.1B");
        assert_eq!(size_label(7_241_732_096), "7.2B");
        assert_eq!(size_label(135_000_000), "135M");
        assert_eq!(title("base_hf"), "Base_Hf");
        assert_eq!(title("tinyllama-1.1b"), "Tinyllama-1.1B");
    }
}
