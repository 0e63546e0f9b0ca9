//! Which ggml type each tensor of a GGUF model gets for a quantization scheme, decided as
//! llama.cpp's `llama-quantize` decides it without an importance matrix.
//!
//! A scheme ("file type") has a default type; the mixes (`Q4_K_M`, `Q5_K_M`, `Q3_K_*`, `Q2_K`, …)
//! then give some tensors more bits: the output (and tied token embedding), every other
//! `attn_v` and `ffn_down` in a pattern over the layers, attention output. Rows whose length is not
//! a multiple of the type's block fall back to a 32-block type (or F16). Only weights of two or
//! more dimensions whose name ends in `weight` (and not `_norm.weight`) are quantized; the rest
//! keep their type.

use crate::gguf::GgmlType;

/// A target for `quantize`: one of llama.cpp's file types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Everything F32.
    F32,
    /// 2-D weights F16.
    F16,
    /// 2-D weights BF16.
    BF16,
    /// Q4_0.
    Q4_0,
    /// Q4_1.
    Q4_1,
    /// Q5_0.
    Q5_0,
    /// Q5_1.
    Q5_1,
    /// Q8_0.
    Q8_0,
    /// Q2_K mix.
    Q2K,
    /// Q3_K_S.
    Q3KS,
    /// Q3_K_M mix (`q3_k`).
    Q3KM,
    /// Q3_K_L mix.
    Q3KL,
    /// Q4_K_S mix.
    Q4KS,
    /// Q4_K_M mix (`q4_k`).
    Q4KM,
    /// Q5_K_S.
    Q5KS,
    /// Q5_K_M mix (`q5_k`).
    Q5KM,
    /// Q6_K.
    Q6K,
}

/// `(scheme, names, llama_ftype id, default type)`.
const SCHEMES: &[(Scheme, &[&str], u32, GgmlType)] = &[
    (Scheme::F32, &["f32"], 0, GgmlType::F32),
    (Scheme::F16, &["f16"], 1, GgmlType::F16),
    (Scheme::BF16, &["bf16"], 32, GgmlType::BF16),
    (Scheme::Q4_0, &["q4_0"], 2, GgmlType::Q4_0),
    (Scheme::Q4_1, &["q4_1"], 3, GgmlType::Q4_1),
    (Scheme::Q5_0, &["q5_0"], 8, GgmlType::Q5_0),
    (Scheme::Q5_1, &["q5_1"], 9, GgmlType::Q5_1),
    (Scheme::Q8_0, &["q8_0"], 7, GgmlType::Q8_0),
    (Scheme::Q2K, &["q2_k"], 10, GgmlType::Q2_K),
    (Scheme::Q3KS, &["q3_k_s"], 11, GgmlType::Q3_K),
    (Scheme::Q3KM, &["q3_k_m", "q3_k"], 12, GgmlType::Q3_K),
    (Scheme::Q3KL, &["q3_k_l"], 13, GgmlType::Q3_K),
    (Scheme::Q4KS, &["q4_k_s"], 14, GgmlType::Q4_K),
    (Scheme::Q4KM, &["q4_k_m", "q4_k"], 15, GgmlType::Q4_K),
    (Scheme::Q5KS, &["q5_k_s"], 16, GgmlType::Q5_K),
    (Scheme::Q5KM, &["q5_k_m", "q5_k"], 17, GgmlType::Q5_K),
    (Scheme::Q6K, &["q6_k"], 18, GgmlType::Q6_K),
];

impl Scheme {
    /// Parse a scheme name (case-insensitive; `q4_k` is `q4_k_m`, as in llama-quantize).
    pub fn parse(name: &str) -> Option<Scheme> {
        let lower = name.to_ascii_lowercase();
        SCHEMES
            .iter()
            .find(|(_, names, _, _)| names.contains(&lower.as_str()))
            .map(|s| s.0)
    }

    /// Every accepted name, for messages.
    pub fn names() -> Vec<&'static str> {
        SCHEMES.iter().flat_map(|s| s.1.iter().copied()).collect()
    }

    fn row(self) -> &'static (Scheme, &'static [&'static str], u32, GgmlType) {
        SCHEMES
            .iter()
            .find(|s| s.0 == self)
            .expect("every scheme is listed")
    }

    /// The canonical name (`q4_k_m`).
    pub fn name(self) -> &'static str {
        self.row().1[0]
    }

    /// The `general.file_type` value (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        self.row().2
    }

    /// The type most weights get.
    pub fn default_type(self) -> GgmlType {
        self.row().3
    }
}

/// What the type choice needs to know about the model.
#[derive(Debug, Clone, Default)]
pub struct ModelFacts {
    /// `general.architecture`.
    pub arch: String,
    /// `{arch}.block_count`.
    pub n_layer: u32,
    /// `{arch}.attention.head_count`.
    pub n_head: u32,
    /// `{arch}.attention.head_count_kv`.
    pub n_head_kv: u32,
    /// `{arch}.expert_count` (0 when dense).
    pub n_expert: u32,
}

impl ModelFacts {
    fn n_gqa(&self) -> u32 {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(0)
    }

    /// llama.cpp singles out 70B-class models (80 layers with grouped attention) for attn_v.
    fn is_70b(&self) -> bool {
        self.n_layer == 80
            && match self.arch.as_str() {
                "llama" => self.n_head != self.n_head_kv,
                "qwen2" | "olmo" | "deci" => true,
                _ => false,
            }
    }
}

/// One tensor as the choice sees it.
#[derive(Debug, Clone)]
pub struct TensorFacts<'a> {
    /// GGUF name.
    pub name: &'a str,
    /// ggml dimensions (`ne[0]` is the row length).
    pub ne: &'a [u64],
    /// Its type now.
    pub ggml_type: GgmlType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cat {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Cat {
    if name == "output.weight" {
        return Cat::Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return Cat::TokenEmbd;
    }
    for (pat, cat) in [
        ("attn_qkv.weight", Cat::AttnQkv),
        ("attn_kv_b.weight", Cat::AttnKvB),
        ("attn_v.weight", Cat::AttnV),
        ("attn_k.weight", Cat::AttnK),
        ("attn_q.weight", Cat::AttnQ),
        ("attn_output.weight", Cat::AttnOutput),
        ("ffn_up", Cat::FfnUp),
        ("ffn_gate", Cat::FfnGate),
        ("ffn_down", Cat::FfnDown),
    ] {
        if name.contains(pat) {
            return cat;
        }
    }
    Cat::Other
}

fn is_attn_v(c: Cat) -> bool {
    matches!(c, Cat::AttnV | Cat::AttnQkv | Cat::AttnKvB)
}

/// Whether llama-quantize would quantize this tensor at all (`tensor_allows_quantization` for the
/// names a text model has).
pub fn allows_quantization(name: &str, n_dims: usize) -> bool {
    if n_dims < 2 || !name.ends_with("weight") || name.contains("_norm.weight") {
        return false;
    }
    const KEEP: &[&str] = &[
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        ".rel_pos",
        ".patch_embd",
    ];
    !(KEEP.iter().any(|k| name.contains(k))
        || name == "position_embd.weight"
        || name == "token_types.weight")
}

/// The layer a `blk.N.` name belongs to (-1 otherwise), llama.cpp's `sscanf("blk.%d.")`.
pub fn layer_of(name: &str) -> i64 {
    name.strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

/// Order tensors the way llama-quantize writes them: by layer (non-layer tensors first), then by
/// name.
pub fn quantize_order(names: &[&str]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..names.len()).collect();
    idx.sort_by(|&a, &b| (layer_of(names[a]), names[a]).cmp(&(layer_of(names[b]), names[b])));
    idx
}

fn block(t: GgmlType) -> u64 {
    t.block_size()
}

/// When the row length does not fit the type's block: llama.cpp's fallback.
fn fallback(ne0: u64, target: GgmlType) -> GgmlType {
    if ne0 % block(target) == 0 {
        return target;
    }
    let t = match target {
        GgmlType::IQ1_S
        | GgmlType::IQ1_M
        | GgmlType::IQ2_XXS
        | GgmlType::IQ2_XS
        | GgmlType::IQ2_S
        | GgmlType::IQ3_XXS
        | GgmlType::IQ3_S
        | GgmlType::IQ4_XS => GgmlType::IQ4_NL,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::TQ1_0 | GgmlType::TQ2_0 => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if ne0 % block(t) != 0 {
        GgmlType::F16
    } else {
        t
    }
}

/// The target type of every tensor (same order as `tensors`), walking them in llama-quantize's
/// order (`quantize_order`) because the attn_v/ffn_down counters depend on it. `pure` gives every
/// quantizable tensor the default type (llama-quantize `--pure`), still with the row fallback.
pub fn choose_types(
    scheme: Scheme,
    model: &ModelFacts,
    tensors: &[TensorFacts<'_>],
    pure: bool,
) -> Vec<GgmlType> {
    use GgmlType as T;
    use Scheme as S;
    let default_type = scheme.default_type();
    let cats: Vec<Cat> = tensors.iter().map(|t| category(t.name)).collect();
    let n_attention_wv = cats.iter().filter(|c| is_attn_v(**c)).count() as i64;
    let tied = !cats.contains(&Cat::Output);
    let n_layer = i64::from(model.n_layer);
    let falcon = model.arch == "falcon";
    let experts8 = model.n_expert == 8;
    // llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between.
    let more_bits = |i: i64, n: i64| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
    let (mut i_wv, mut i_down) = (0i64, 0i64);
    let mut out = vec![T::F32; tensors.len()];
    let names: Vec<&str> = tensors.iter().map(|t| t.name).collect();
    for i in quantize_order(&names) {
        let t = &tensors[i];
        if !allows_quantization(t.name, t.ne.len()) {
            out[i] = t.ggml_type;
            continue;
        }
        let mut new = default_type;
        if !default_type.is_quantized() || pure {
            out[i] = if default_type.is_quantized() {
                fallback(t.ne[0], new)
            } else {
                new
            };
            continue;
        }
        let cat = cats[i];
        // With more than one expert the layer comes from the name; otherwise from the counter.
        let layer = |counter: i64| {
            if model.n_expert > 1 {
                layer_of(t.name)
            } else {
                counter
            }
        };
        if cat == Cat::Output || (tied && cat == Cat::TokenEmbd) {
            if falcon || t.ne[0] % block(new) != 0 {
                new = T::Q8_0;
            } else if new != T::Q8_0 {
                new = T::Q6_K;
            }
        } else if cat == Cat::TokenEmbd {
            // The non-i-quant schemes keep the default type.
        } else if is_attn_v(cat) {
            let gqa4 = model.n_gqa() >= 4;
            match scheme {
                S::Q2K => new = if gqa4 { T::Q4_K } else { T::Q3_K },
                S::Q3KM => new = if i_wv < 2 { T::Q5_K } else { T::Q4_K },
                S::Q3KL => new = T::Q5_K,
                S::Q4KM | S::Q5KM if more_bits(i_wv, n_attention_wv) => new = T::Q6_K,
                S::Q4KS if i_wv < 4 => new = T::Q5_K,
                _ => {}
            }
            if model.is_70b() && (new == T::Q3_K || new == T::Q4_K) {
                new = T::Q5_K;
            }
            if experts8 {
                new = T::Q8_0;
            }
            i_wv += 1;
        } else if cat == Cat::AttnK {
            if experts8 {
                new = T::Q8_0;
            }
        } else if cat == Cat::FfnDown {
            let (il, nl) = (layer(i_down), n_layer);
            match scheme {
                S::Q2K => new = T::Q3_K,
                S::Q3KM => {
                    new = if il < nl / 16 {
                        T::Q5_K
                    } else if !falcon || more_bits(il, nl) {
                        T::Q4_K
                    } else {
                        T::Q3_K
                    }
                }
                S::Q3KL => new = if falcon { T::Q4_K } else { T::Q5_K },
                S::Q4KM => {
                    if falcon {
                        new = if il < nl / 16 {
                            T::Q6_K
                        } else if more_bits(il, nl) {
                            T::Q5_K
                        } else {
                            T::Q4_K
                        }
                    } else if more_bits(il, nl) {
                        new = T::Q6_K
                    }
                }
                S::Q5KM if more_bits(il, nl) => new = T::Q6_K,
                S::Q4KS if !falcon && il < nl / 8 => new = T::Q5_K,
                _ => {}
            }
            i_down += 1;
        } else if cat == Cat::AttnOutput {
            if !falcon {
                if experts8 {
                    if matches!(scheme, S::Q2K | S::Q3KS | S::Q3KM | S::Q4KS | S::Q4KM) {
                        new = T::Q5_K;
                    }
                } else {
                    match scheme {
                        S::Q2K => new = T::Q3_K,
                        S::Q3KM => new = T::Q4_K,
                        S::Q3KL => new = T::Q5_K,
                        _ => {}
                    }
                }
            } else if scheme == S::Q3KL {
                new = T::Q4_K;
            }
        } else if cat == Cat::AttnQkv {
            match scheme {
                S::Q3KM | S::Q3KL => new = T::Q4_K,
                S::Q4KM => new = T::Q5_K,
                S::Q5KM => new = T::Q6_K,
                _ => {}
            }
        }
        out[i] = fallback(t.ne[0], new);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_pattern_matches_llama_cpp() {
        // use_more_bits(i, 22): i < 2, i >= 19, or (i - 2) % 3 == 2.
        let scheme = Scheme::Q4KM;
        let model = ModelFacts {
            arch: "llama".into(),
            n_layer: 22,
            n_head: 32,
            n_head_kv: 4,
            n_expert: 0,
        };
        let names: Vec<String> = (0..22)
            .map(|i| format!("blk.{i}.ffn_down.weight"))
            .collect();
        let ne = [5632u64, 2048];
        let tensors: Vec<TensorFacts> = names
            .iter()
            .map(|n| TensorFacts {
                name: n,
                ne: &ne,
                ggml_type: GgmlType::F16,
            })
            .collect();
        let types = choose_types(scheme, &model, &tensors, false);
        let six: Vec<usize> = (0..22).filter(|&i| types[i] == GgmlType::Q6_K).collect();
        assert_eq!(six, vec![0, 1, 4, 7, 10, 13, 16, 19, 20, 21]);
    }

    #[test]
    fn fallbacks() {
        assert_eq!(fallback(64, GgmlType::Q4_K), GgmlType::Q5_0);
        assert_eq!(fallback(64, GgmlType::Q6_K), GgmlType::Q8_0);
        assert_eq!(fallback(48, GgmlType::Q6_K), GgmlType::F16);
        assert_eq!(fallback(256, GgmlType::Q6_K), GgmlType::Q6_K);
    }
}
