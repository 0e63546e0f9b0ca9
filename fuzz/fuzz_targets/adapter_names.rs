//! Structured input → a *valid* safetensors file of up to 16 tensors with fuzzed names and small
//! shapes, plus an `adapter_config.json` whose peft_type, ranks, target_modules, rank_pattern,
//! alpha_pattern and flags come from the input → `peft::open` → a merge plan against the fixed
//! tiny Llama base → the checker with the base. This drives the key classification, PEFT's
//! module-selection regexes and the module→base-tensor mapping rather than the byte parser.
//!
//! Input layout (bytes, read in order; a missing byte reads as 0, so short inputs are valid):
//!
//! | byte | meaning |
//! |------|---------|
//! | 0 | peft_type: index into `PEFT_TYPES` (0 = LORA) |
//! | 1 | flags: 1 use_dora, 2 lora_bias, 4 use_rslora, 8 fan_in_fan_out, 16 layers_to_transform, 32 exclude_modules, 64 target_modules as one regex string, 128 `"all-linear"` |
//! | 2 | r = (b + 4) % 17 (0 → 4); b ≥ 0xF0: `BIG[b - 0xF0]` |
//! | 3 | lora_alpha = (b + 8) % 256 (0 → 8) |
//! | 4 | data: 0 = all zeros, 255 = one NaN, else a deterministic pattern |
//! | 5 | number of target_modules strings (% 5; 0 → `["q_proj","v_proj"]`), then one *string* each |
//! | … | number of rank_pattern entries (% 4), each a *string* and a rank byte (% 17; ≥ 0xF0: `BIG`) |
//! | … | number of alpha_pattern entries (% 3), each a *string* and an alpha byte |
//! | … | if flag 16: one layer byte (% 4); if flag 32: one *string* |
//! | … | number of tensors (% 17), each: name, dtype byte (% 3: F32, F16, BF16), shape |
//!
//! A *string* is a byte `s`: `s < 0xF0` picks `STRINGS[s % len]`, otherwise a length byte
//! (% 48) and that many raw bytes (lossy UTF-8) follow.
//!
//! A tensor name is a byte `k`: `k < 0xC0` builds `[base_model.model.]<module>.<suffix>` from
//! `k & 1` (prefix), then a module byte (index into `MODULES`, with the layer from its high bit)
//! and a suffix byte (index into `SUFFIXES`); `k >= 0xC0` reads a raw *string* as the whole name.
//! A shape is a byte `d`: 0 derives the shape PEFT would save from the module's base shape, the
//! suffix and `r`; `d < 0x80`: `d % 2 + 1` dimensions follow; `d ≥ 0x80`: `d % 5 + 1` (1–5, so
//! conv layouts are reachable). Each dimension is a byte: `< 0xF0` → byte % 65, else
//! `BIG[byte - 0xF0]`. A shape with a 0 dimension has no bytes whatever its other dimensions
//! are, so huge dimensions are legal there; tensors of more than 2²⁰ elements are dropped.
#![no_main]

use std::collections::BTreeSet;

use adapterkit_core::DType;
use adapterkit_formats::safetensors::{write_small, TensorSpec};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

const PEFT_TYPES: &[&str] = &[
    "LORA",
    "LORA",
    "LORA",
    "LORA",
    "LOHA",
    "LOKR",
    "IA3",
    "ADALORA",
    "VERA",
    "OFT",
    "HRA",
    "MISS",
    "BOFT",
    "FOURIERFT",
    "VBLORA",
    "LN_TUNING",
    "TRAINABLE_TOKENS",
    "DELORA",
    "HIRA",
    "C3A",
    "ROAD",
    "SHIRA",
];

/// Strings for target_modules, exclude_modules and pattern keys.
const STRINGS: &[&str] = &[
    "q_proj",
    "v_proj",
    "k_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "self_attn.q_proj",
    "layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "embed_tokens",
    "lm_head",
    "norm",
    ".*",
    ".*\\.(q|v)_proj",
    "model\\.layers\\.\\d+\\.self_attn\\..*",
    "(q|k|v)_proj",
    "",
    ".",
    "[",
    "(",
    "\\",
    "q_proj|",
    "^q_proj$",
    "(?i)Q_PROJ",
    // Refused by the regex crate (PEFT/Python accepts it). A size-limit pattern such as
    // "a{1000}{1000}" is refused too but costs ~0.3 s per compile under ASan, and adapterkit
    // compiles target_modules per module: it starved this target, so it is left out.
    "(?<=x)q",
    "(?=q)",
    "\\d",
    "all-linear",
    "mlp",
    "input_layernorm",
    "base_model.model.model.layers.0.self_attn.q_proj",
];

/// Modules of the base, with the shape of their `.weight` (rows, cols; cols 0 = 1-D).
const MODULES: &[(&str, u64, u64)] = &[
    ("self_attn.q_proj", 32, 32),
    ("self_attn.k_proj", 16, 32),
    ("self_attn.v_proj", 16, 32),
    ("self_attn.o_proj", 32, 32),
    ("mlp.gate_proj", 64, 32),
    ("mlp.up_proj", 64, 32),
    ("mlp.down_proj", 32, 64),
    ("input_layernorm", 32, 0),
    ("post_attention_layernorm", 32, 0),
    ("@model.embed_tokens", 128, 32),
    ("@lm_head", 128, 32),
    ("@model.norm", 32, 0),
    ("@model.layers.0", 0, 0),
    ("@model", 0, 0),
    ("@", 0, 0),
    ("self_attn.missing_proj", 8, 8),
];

const SUFFIXES: &[&str] = &[
    "lora_A.weight",
    "lora_B.weight",
    "lora_A.weight",
    "lora_B.weight",
    "lora_B.bias",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector.weight",
    "lora_magnitude_vector",
    "token_adapter.trainable_tokens_delta",
    "weight",
    "bias",
    "base_layer.weight",
    "modules_to_save.default.weight",
    "original_module.weight",
    "lora_A",
    "lora_E",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lokr_w1",
    "lokr_w2",
    "ia3_l",
    "vera_lambda_b",
    "vera_lambda_d",
    "oft_R.weight",
    "hra_u",
    "miss_block",
    "fourierft_spectrum",
    "delora_A",
    "hira_A",
    "c3a_kernel",
    "ln_tuning_layers.weight",
    "",
    "lora_A.weight.lora_B.weight",
    "boft_R",
    "boft_s",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "hada_t1",
    "hada_t2",
    "oft_embedding_R.weight",
    "vblora_logits_A",
    "vblora_logits_B",
    "road_theta",
    "road_alpha",
    "shira_weight",
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn string(&mut self) -> String {
        let s = self.byte();
        if s < 0xF0 {
            return STRINGS[s as usize % STRINGS.len()].to_string();
        }
        let n = (self.byte() % 48) as usize;
        let n = n.min(self.0.len());
        let (raw, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8_lossy(raw).into_owned()
    }
}

fn values(dtype: DType, n: usize, seed: u8) -> Vec<u8> {
    let f = |i: usize| -> f32 {
        match seed {
            0 => 0.0,
            255 if i == 0 => f32::NAN,
            _ => {
                ((i.wrapping_mul(2_654_435_761).wrapping_add(seed as usize) % 17) as f32 - 8.0)
                    * 0.01
            }
        }
    };
    let mut out = Vec::with_capacity(n * 4);
    for i in 0..n {
        match dtype {
            DType::F16 => out.extend(half_f16(f(i)).to_le_bytes()),
            DType::BF16 => out.extend(((f(i).to_bits() >> 16) as u16).to_le_bytes()),
            _ => out.extend(f(i).to_le_bytes()),
        }
    }
    out
}

/// f32 → IEEE half, for the small finite values (and NaN) this target writes.
fn half_f16(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7e00;
    }
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let man = bits & 0x7f_ffff;
    if v == 0.0 || exp <= 0 {
        return sign;
    }
    sign | ((exp as u16) << 10) | ((man >> 13) as u16)
}

/// Dimensions that only a tensor with another dimension 0 can have (it then holds no bytes).
const BIG: [u64; 16] = [
    u64::MAX,
    u64::MAX - 1,
    1 << 63,
    1 << 32,
    (1 << 32) - 1,
    1 << 40,
    3_037_000_500,
    6_074_001_000,
    4_294_967_297,
    1 << 31,
    65_536,
    65_537,
    1_000_000_007,
    i64::MAX as u64,
    128,
    127,
];

fn big_or(b: u8, small: u64) -> u64 {
    if b >= 0xF0 {
        BIG[(b - 0xF0) as usize]
    } else {
        small
    }
}

fn auto_shape(suffix: &str, rows: u64, cols: u64, r: u64) -> Vec<u64> {
    let inner = if cols == 0 { rows } else { cols };
    match suffix {
        "lora_A.weight" | "lora_A" | "delora_A" | "hira_A" | "hada_w1_b" | "hada_w2_b" => {
            vec![r, inner]
        }
        "lora_B.weight" | "hada_w1_a" | "hada_w2_a" => vec![rows, r],
        "lora_embedding_A" => vec![r, rows],
        "lora_embedding_B" => vec![inner, r],
        "lora_B.bias"
        | "lora_magnitude_vector"
        | "lora_magnitude_vector.weight"
        | "bias"
        | "ia3_l"
        | "vera_lambda_b" => vec![rows],
        "lora_E" | "vera_lambda_d" => vec![r],
        "token_adapter.trainable_tokens_delta" => vec![2, inner],
        "weight"
        | "base_layer.weight"
        | "modules_to_save.default.weight"
        | "original_module.weight"
        | "ln_tuning_layers.weight" => {
            if cols == 0 {
                vec![rows]
            } else {
                vec![rows, cols]
            }
        }
        _ => vec![r, inner],
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let peft_type = PEFT_TYPES[inp.byte() as usize % PEFT_TYPES.len()];
    let flags = inp.byte();
    let rb = inp.byte();
    let r = big_or(rb, ((rb as u64) + 4) % 17);
    let alpha = ((inp.byte() as u64) + 8) % 256;
    let seed = inp.byte();

    let mut cfg = Map::new();
    cfg.insert("peft_type".into(), json!(peft_type));
    cfg.insert(
        "base_model_name_or_path".into(),
        json!("fixtures/peft/bases/llama"),
    );
    cfg.insert("r".into(), json!(r));
    cfg.insert("lora_alpha".into(), json!(alpha));
    if matches!(peft_type, "LOHA" | "LOKR") {
        cfg.insert("alpha".into(), json!(alpha));
    }
    cfg.insert("use_dora".into(), json!(flags & 1 != 0));
    cfg.insert("lora_bias".into(), json!(flags & 2 != 0));
    cfg.insert("use_rslora".into(), json!(flags & 4 != 0));
    cfg.insert("fan_in_fan_out".into(), json!(flags & 8 != 0));
    cfg.insert("task_type".into(), json!("CAUSAL_LM"));
    let n_targets = inp.byte() % 5;
    let targets: Vec<String> = if n_targets == 0 {
        vec!["q_proj".into(), "v_proj".into()]
    } else {
        (0..n_targets).map(|_| inp.string()).collect()
    };
    let target_modules = if flags & 128 != 0 {
        json!("all-linear")
    } else if flags & 64 != 0 {
        json!(targets.join("|"))
    } else {
        json!(targets)
    };
    cfg.insert("target_modules".into(), target_modules);
    let mut rank_pattern = Map::new();
    for _ in 0..inp.byte() % 4 {
        let k = inp.string();
        let rb = inp.byte();
        rank_pattern.insert(k, json!(big_or(rb, (rb % 17) as u64)));
    }
    cfg.insert("rank_pattern".into(), Value::Object(rank_pattern));
    let mut alpha_pattern = Map::new();
    for _ in 0..inp.byte() % 3 {
        let k = inp.string();
        alpha_pattern.insert(k, json!(inp.byte()));
    }
    cfg.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
    if flags & 16 != 0 {
        cfg.insert("layers_to_transform".into(), json!([inp.byte() % 4]));
    }
    if flags & 32 != 0 {
        cfg.insert("exclude_modules".into(), json!([inp.string()]));
    }

    let mut names = BTreeSet::new();
    let mut tensors = Vec::new();
    for _ in 0..inp.byte() % 17 {
        let k = inp.byte();
        let (name, auto) = if k < 0xC0 {
            let prefix = if k & 1 == 0 { "base_model.model." } else { "" };
            let m = inp.byte();
            let (module, rows, cols) = MODULES[(m & 0x7f) as usize % MODULES.len()];
            let layer = m >> 7;
            let suffix = SUFFIXES[inp.byte() as usize % SUFFIXES.len()];
            let path = match module.strip_prefix('@') {
                Some(top) => top.to_string(),
                None => format!("model.layers.{layer}.{module}"),
            };
            let name = match (path.is_empty(), suffix.is_empty()) {
                (true, _) => format!("{prefix}{suffix}"),
                (false, true) => format!("{prefix}{path}"),
                (false, false) => format!("{prefix}{path}.{suffix}"),
            };
            (name, auto_shape(suffix, rows, cols, r))
        } else {
            (inp.string(), vec![r, 8])
        };
        let dtype = [DType::F32, DType::F16, DType::BF16][inp.byte() as usize % 3];
        let d = inp.byte();
        let shape = if d == 0 {
            auto
        } else {
            let dims = if d < 0x80 { d % 2 + 1 } else { d % 5 + 1 };
            (0..dims)
                .map(|_| {
                    let b = inp.byte();
                    big_or(b, (b % 65) as u64)
                })
                .collect()
        };
        // A file cannot hold two tensors of one name (the parser refuses it; the file target
        // covers that): keep the first.
        if !names.insert(name.clone()) {
            continue;
        }
        let numel = match shape.iter().try_fold(1u64, |a, &x| a.checked_mul(x)) {
            Some(n) if n <= 1 << 20 => n as usize,
            _ => continue,
        };
        let bytes = values(dtype, numel, seed);
        tensors.push((TensorSpec { name, dtype, shape }, bytes));
    }

    let dir = adapterkit_fuzz::scratch_sub("names");
    let st = dir.join("adapter_model.safetensors");
    write_small(
        &st,
        &tensors,
        Some(&[("format".to_string(), "pt".to_string())]),
    )
    .expect("a generated safetensors file is written");
    let cfg_bytes = serde_json::to_vec_pretty(&Value::Object(cfg)).expect("config serializes");
    adapterkit_fuzz::write(&dir.join("adapter_config.json"), &cfg_bytes);

    adapterkit_fuzz::open_plan_check(dir);
});
