//! Hugging Face PEFT adapters: `adapter_config.json` + `adapter_model.safetensors` into the
//! adapter IR. Spec, key tables and the matching rules reproduced here: `formats/peft.md`.
//!
//! Every tensor in the file must be claimed by exactly one module adapter; every module must be
//! selected by the config (PEFT ignores tensors of modules its config does not inject, so such a
//! file would merge differently in PEFT than it reads); ranks in the tensors must agree with `r`
//! and `rank_pattern`. All problems are collected and reported together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapterkit_core::ir::{Adapter, Family, LayerKind, LowRank, ModuleAdapter, Payload};
use adapterkit_core::TensorInfo;
use regex::Regex;
use serde_json::Value;

use crate::checkpoint::read_json;
use crate::error::{Error, Result};
use crate::safetensors::SafetensorsFile;

/// Every `peft_type` of PEFT 0.21, so an unknown one is told apart from one not supported yet.
pub const KNOWN_PEFT_TYPES: &[&str] = &[
    "PROMPT_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "LORA",
    "ADALORA",
    "ADAMSS",
    "BOFT",
    "ADAPTION_PROMPT",
    "IA3",
    "BEFT",
    "LILY",
    "LOHA",
    "LOKR",
    "OFT",
    "POLY",
    "LN_TUNING",
    "VERA",
    "FROD",
    "PVERA",
    "FOURIERFT",
    "GLORA",
    "XLORA",
    "HRA",
    "VBLORA",
    "UNILORA",
    "CPT",
    "BONE",
    "MISS",
    "RANDLORA",
    "ROAD",
    "TRAINABLE_TOKENS",
    "HIRA",
    "SHIRA",
    "C3A",
    "WAVEFT",
    "OSF",
    "DELORA",
    "GRALORA",
    "CARTRIDGE",
    "TINYLORA",
    "PSOFT",
    "PEANUT",
    "SHADOW",
    "SUPERTUNING",
    "DEFT",
];

/// Prompt-learning methods: they add virtual tokens at run time and have no weights to merge.
pub const PROMPT_LEARNING_TYPES: &[&str] = &[
    "PROMPT_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "ADAPTION_PROMPT",
    "CPT",
];

/// The prefix PEFT puts before module paths in saved keys.
pub const KEY_PREFIX: &str = "base_model.model.";

/// `target_modules` / `exclude_modules` as PEFT accepts them.
#[derive(Debug, Clone, PartialEq)]
pub enum ModuleSelector {
    /// A list of names: a module matches when its path equals a name or ends with `.name`.
    List(Vec<String>),
    /// A regular expression that must match the whole module path.
    Regex(String),
    /// `"all-linear"`: every linear layer but the output head.
    AllLinear,
}

impl ModuleSelector {
    /// Parse a JSON value (`null`, a string or a list of strings).
    pub fn from_value(v: &Value) -> Option<Option<Self>> {
        match v {
            Value::Null => Some(None),
            Value::String(s) if s == "all-linear" => Some(Some(ModuleSelector::AllLinear)),
            Value::String(s) => Some(Some(ModuleSelector::Regex(s.clone()))),
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(|l| Some(ModuleSelector::List(l))),
            _ => None,
        }
    }
}

/// The parts of a LoRA `adapter_config.json` that decide what the tensors mean.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `peft_type`.
    pub peft_type: String,
    /// `base_model_name_or_path`.
    pub base_model: Option<String>,
    /// `r` (default 8).
    pub r: u64,
    /// `lora_alpha` (default 8).
    pub lora_alpha: f64,
    /// `use_rslora`.
    pub use_rslora: bool,
    /// `use_dora`.
    pub use_dora: bool,
    /// `lora_bias`.
    pub lora_bias: bool,
    /// `fan_in_fan_out`.
    pub fan_in_fan_out: bool,
    /// `target_modules`.
    pub target_modules: Option<ModuleSelector>,
    /// `exclude_modules`.
    pub exclude_modules: Option<ModuleSelector>,
    /// `modules_to_save`.
    pub modules_to_save: Vec<String>,
    /// `rank_pattern`, in file order.
    pub rank_pattern: Vec<(String, u64)>,
    /// `alpha_pattern`, in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    /// `layers_to_transform`.
    pub layers_to_transform: Option<Vec<u64>>,
    /// `layers_pattern`.
    pub layers_pattern: Vec<String>,
}

pub(crate) fn cfg_err(path: &Path, message: impl Into<String>) -> Error {
    Error::InvalidConfig {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn get_bool(path: &Path, v: &Value, key: &str) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(cfg_err(
            path,
            format!("{key} must be true or false, found {other}"),
        )),
    }
}

fn pattern_regex(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:.*\\.)?(?:{key})$"))
}

impl LoraConfig {
    /// Parse the LoRA fields of a config object, checking each field's type.
    pub fn from_json(path: &Path, v: &Value) -> Result<Self> {
        Self::from_json_keyed(path, v, "lora_alpha")
    }

    /// Like [`LoraConfig::from_json`], with the alpha read from `alpha_key` (LoHa and LoKr
    /// call it `alpha`).
    pub fn from_json_keyed(path: &Path, v: &Value, alpha_key: &str) -> Result<Self> {
        let peft_type = v
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let r = match v.get("r") {
            None | Some(Value::Null) => 8,
            // OFT configs set r = 0 when oft_block_size fixes the blocks instead.
            Some(x) => x.as_u64().ok_or_else(|| {
                cfg_err(path, format!("r must be a non-negative integer, found {x}"))
            })?,
        };
        let lora_alpha = match v.get(alpha_key) {
            None | Some(Value::Null) => 8.0,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| cfg_err(path, format!("{alpha_key} must be a number, found {x}")))?,
        };
        let selector = |key: &str| -> Result<Option<ModuleSelector>> {
            match v.get(key) {
                None => Ok(None),
                Some(x) => ModuleSelector::from_value(x).ok_or_else(|| {
                    cfg_err(
                        path,
                        format!("{key} must be a list of names, a regex string or null, found {x}"),
                    )
                }),
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::String(s)) => Ok(vec![s.clone()]),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| cfg_err(path, format!("{key} must be a list of strings"))),
                Some(x) => Err(cfg_err(
                    path,
                    format!("{key} must be a list of strings, found {x}"),
                )),
            }
        };
        let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, x)| {
                        x.as_f64().map(|f| (k.clone(), f)).ok_or_else(|| {
                            cfg_err(path, format!("{key}[{k:?}] must be a number, found {x}"))
                        })
                    })
                    .collect(),
                Some(x) => Err(cfg_err(path, format!("{key} must be an object, found {x}"))),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, f)| {
                if f >= 1.0 && f.fract() == 0.0 {
                    Ok((k, f as u64))
                } else {
                    Err(cfg_err(
                        path,
                        format!("rank_pattern[{k:?}] must be a positive integer, found {f}"),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let layers_to_transform = match v.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(x) => Some(match x {
                Value::Number(n) => vec![n
                    .as_u64()
                    .ok_or_else(|| cfg_err(path, "layers_to_transform must be non-negative"))?],
                Value::Array(a) => a
                    .iter()
                    .map(Value::as_u64)
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        cfg_err(
                            path,
                            "layers_to_transform must be a list of non-negative integers",
                        )
                    })?,
                other => {
                    return Err(cfg_err(
                        path,
                        format!("layers_to_transform must be an integer or list, found {other}"),
                    ))
                }
            }),
        };
        let cfg = LoraConfig {
            peft_type,
            base_model: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            r,
            lora_alpha,
            use_rslora: get_bool(path, v, "use_rslora")?,
            use_dora: get_bool(path, v, "use_dora")?,
            lora_bias: get_bool(path, v, "lora_bias")?,
            fan_in_fan_out: get_bool(path, v, "fan_in_fan_out")?,
            target_modules: selector("target_modules")?,
            exclude_modules: selector("exclude_modules")?,
            modules_to_save: strings("modules_to_save")?,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
            layers_to_transform,
            layers_pattern: strings("layers_pattern")?,
        };
        for (k, _) in cfg
            .rank_pattern
            .iter()
            .map(|(k, r)| (k, *r as f64))
            .chain(cfg.alpha_pattern.iter().map(|(k, a)| (k, *a)))
        {
            pattern_regex(k).map_err(|e| {
                cfg_err(
                    path,
                    format!("pattern key {k:?} is not a regex adapterkit can evaluate: {e}"),
                )
            })?;
        }
        // Fields that change what the saved tensors mean. Initialisation-only options (loftq,
        // eva, corda, lora_ga configs) do not, and are accepted.
        for key in [
            "target_parameters",
            "layer_replication",
            "alora_invocation_tokens",
            "arrow_config",
            "kasa_config",
            "monteclora_config",
            "velora_config",
            "use_bdlora",
            "use_qalora",
            "megatron_config",
        ] {
            if v.get(key)
                .is_some_and(|x| !x.is_null() && *x != Value::Bool(false))
            {
                return Err(Error::UnsupportedPeftType {
                    path: path.to_path_buf(),
                    peft_type: format!("LORA with {key}"),
                    reason: format!("`{key}` is not supported by this version of adapterkit"),
                });
            }
        }
        Ok(cfg)
    }

    /// The rank for `module` (`rank_pattern`, first matching key in file order, else `r`).
    pub fn rank_for(&self, module: &str) -> (u64, Option<&str>) {
        for (k, r) in &self.rank_pattern {
            if pattern_regex(k).is_ok_and(|re| re.is_match(module)) {
                return (*r, Some(k));
            }
        }
        (self.r, None)
    }

    /// The alpha for `module` (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_for(&self, module: &str) -> f64 {
        for (k, a) in &self.alpha_pattern {
            if pattern_regex(k).is_ok_and(|re| re.is_match(module)) {
                return *a;
            }
        }
        self.lora_alpha
    }

    /// The scale PEFT applies to `B·A`: `α/r`, or `α/√r` with rsLoRA.
    pub fn scale(&self, alpha: f64, rank: u64) -> f64 {
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }

    /// Whether `sel` matches `module` with PEFT's semantics (list: exact or `.name` suffix;
    /// string: full regex match; `all-linear`: linear layers but the head).
    pub fn selector_matches(sel: &ModuleSelector, module: &str, linear: bool) -> bool {
        match sel {
            ModuleSelector::List(l) => l
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            ModuleSelector::Regex(r) => {
                Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(module))
            }
            ModuleSelector::AllLinear => linear && module.rsplit('.').next() != Some("lm_head"),
        }
    }

    fn layer_index(&self, module: &str) -> Option<u64> {
        let patterns: Vec<String> = if self.layers_pattern.is_empty() {
            vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()]
        } else {
            self.layers_pattern
                .iter()
                .map(|p| format!(r"^(?:|.*?\.){p}\.(\d+)\."))
                .collect()
        };
        patterns.iter().find_map(|p| {
            Regex::new(p)
                .ok()?
                .captures(module)
                .and_then(|c| c.get(1)?.as_str().parse().ok())
        })
    }

    /// Whether PEFT would inject an adapter into `module` (PEFT's `check_target_module_exists`).
    /// `linear` says whether the module is a linear layer (for `"all-linear"`).
    pub fn selects(&self, module: &str, linear: bool) -> bool {
        if let Some(ex) = &self.exclude_modules {
            if Self::selector_matches(ex, module, linear) {
                return false;
            }
        }
        let Some(sel) = &self.target_modules else {
            return false;
        };
        let found = Self::selector_matches(sel, module, linear);
        match (&self.layers_to_transform, sel) {
            (Some(layers), ModuleSelector::List(_)) if found => self
                .layer_index(module)
                .is_some_and(|i| layers.contains(&i)),
            _ => found,
        }
    }
}

/// Find the adapter directory: `path` itself, or its single sub-directory holding an
/// `adapter_config.json` (PEFT saves a named adapter to `<dir>/<name>/`).
pub fn resolve_dir(path: &Path) -> Result<PathBuf> {
    if path.join("adapter_config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            message: "not a PEFT adapter directory (no adapter_config.json)".into(),
        });
    }
    let mut subs = Vec::new();
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let e = e.map_err(|e| Error::io(path, e))?;
        if e.path().join("adapter_config.json").is_file() {
            subs.push(e.path());
        }
    }
    subs.sort();
    match subs.len() {
        1 => Ok(subs.remove(0)),
        0 => Err(Error::NotFound {
            path: path.to_path_buf(),
            message: "not a PEFT adapter directory (no adapter_config.json)".into(),
        }),
        _ => Err(Error::NotFound {
            path: path.to_path_buf(),
            message: format!(
                "holds several named adapters ({}); pass one of them",
                subs.iter()
                    .filter_map(|p| p.file_name()?.to_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// What one saved key is, after the prefix is stripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    A,
    B,
    BBias,
    EmbA,
    EmbB,
    Magnitude,
    Tokens,
    Full,
}

fn classify(key: &str) -> (String, Role) {
    const SUFFIXES: &[(&str, Role)] = &[
        (".lora_A.weight", Role::A),
        (".lora_B.weight", Role::B),
        (".lora_B.bias", Role::BBias),
        (".lora_embedding_A", Role::EmbA),
        (".lora_embedding_B", Role::EmbB),
        (".lora_magnitude_vector.weight", Role::Magnitude),
        (".lora_magnitude_vector", Role::Magnitude),
        (".token_adapter.trainable_tokens_delta", Role::Tokens),
    ];
    for (s, role) in SUFFIXES {
        if let Some(m) = key.strip_suffix(s) {
            return (m.to_string(), *role);
        }
    }
    (key.to_string(), Role::Full)
}

/// The base tensor a full saved tensor replaces: the key with PEFT's wrapper infixes removed.
pub(crate) fn replaced_target(module_key: &str) -> String {
    module_key
        .replace(".base_layer.", ".")
        .replace(".modules_to_save.", ".")
        .replace(".original_module.", ".")
        .replace(".ln_tuning_layers.", ".")
}

#[derive(Default)]
struct Parts<'a> {
    a: Option<&'a TensorInfo>,
    b: Option<&'a TensorInfo>,
    bias: Option<&'a TensorInfo>,
    emb_a: Option<&'a TensorInfo>,
    emb_b: Option<&'a TensorInfo>,
    magnitude: Option<&'a TensorInfo>,
}

/// An opened PEFT adapter: its parsed config object and the IR.
#[derive(Debug)]
pub struct PeftAdapter {
    /// The directory read.
    pub dir: PathBuf,
    /// `adapter_config.json` as written.
    pub config_json: Value,
    /// The IR.
    pub adapter: Adapter,
}

/// Open a PEFT adapter directory (or a named-adapter sub-directory).
pub fn open(path: &Path) -> Result<PeftAdapter> {
    let dir = resolve_dir(path)?;
    let cfg_path = dir.join("adapter_config.json");
    let json = read_json(&cfg_path)?;
    if !json.is_object() {
        return Err(cfg_err(&cfg_path, "not a JSON object"));
    }
    let peft_type = match json.get("peft_type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(cfg_err(
                &cfg_path,
                format!("peft_type must be a string, found {other}"),
            ))
        }
        None => return Err(cfg_err(&cfg_path, "missing required field peft_type")),
    };
    if !KNOWN_PEFT_TYPES.contains(&peft_type.as_str()) {
        return Err(Error::UnknownPeftType {
            path: cfg_path,
            peft_type,
            known: KNOWN_PEFT_TYPES.join(", "),
        });
    }
    let family = match peft_type.as_str() {
        "LORA" => Family::Lora,
        "IA3" => Family::Ia3,
        "LOHA" => Family::Loha,
        "LOKR" => Family::Lokr,
        "OFT" => Family::Oft,
        "HRA" => Family::Hra,
        "VERA" => Family::Vera,
        "FOURIERFT" => Family::FourierFt,
        "BOFT" => Family::Boft,
        "ADALORA" => Family::AdaLora,
        "MISS" | "BONE" => Family::Miss,
        "VBLORA" => Family::VbLora,
        "LN_TUNING" => Family::LnTuning,
        "TRAINABLE_TOKENS" => Family::TrainableTokens,
        t if crate::peft_families::tuner_family(t).is_some() => {
            crate::peft_families::tuner_family(t).expect("checked")
        }
        _ => {
            let reason = if let Some(why) = crate::peft_families::refusal_reason(&peft_type) {
                why.to_string()
            } else if PROMPT_LEARNING_TYPES.contains(&peft_type.as_str()) {
                "a prompt-learning method: it adds virtual tokens at run time and has no weights that can be merged".to_string()
            } else {
                "not implemented in this version (the README lists what is supported)".to_string()
            };
            return Err(Error::UnsupportedPeftType {
                path: cfg_path,
                peft_type,
                reason,
            });
        }
    };
    let alpha_key = match family {
        Family::Loha | Family::Lokr => "alpha",
        _ => "lora_alpha",
    };
    // AdaLoRA's rank_pattern holds rank masks, not ranks; its reader interprets it.
    // Newer tuners give their patterns other meanings (OSF: fractions); they read what they
    // need from the config themselves.
    let cfg = if family == Family::AdaLora || matches!(family, Family::Tuner(_)) {
        let mut j = json.clone();
        if let Some(o) = j.as_object_mut() {
            o.remove("rank_pattern");
            o.remove("alpha_pattern");
        }
        LoraConfig::from_json_keyed(&cfg_path, &j, alpha_key)?
    } else {
        LoraConfig::from_json_keyed(&cfg_path, &json, alpha_key)?
    };

    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.is_file() {
        for pickled in ["adapter_model.bin", "adapter_model.pt", "adapter_model.pth"] {
            if dir.join(pickled).is_file() {
                return Err(Error::PickleRefused {
                    path: dir.join(pickled),
                });
            }
        }
        return Err(Error::NotFound {
            path: st_path,
            message: "missing: a PEFT adapter needs adapter_model.safetensors".into(),
        });
    }
    let file = SafetensorsFile::open_mapped(&st_path)?;
    let mut notes = Vec::new();
    let modules = match family {
        Family::Lora => build_modules(&st_path, &cfg, &json, &file)?,
        _ => crate::peft_families::build(family, &st_path, &cfg, &json, &file, &mut notes)?,
    };
    let tensor_names = file.tensors().iter().map(|t| t.name.clone()).collect();
    let shared_tensors = crate::peft_families::shared_tensors(family, &file);
    Ok(PeftAdapter {
        dir,
        config_json: json,
        adapter: Adapter {
            path: st_path,
            format: "peft",
            method: cfg.peft_type.clone(),
            family,
            base_model: cfg.base_model.clone(),
            modules,
            tensors: Arc::new(file),
            tensor_names,
            shared_tensors,
            notes,
        },
    })
}

pub(crate) fn shape_str(t: &TensorInfo) -> String {
    format!("{:?}", t.shape)
}

fn build_modules(
    path: &Path,
    cfg: &LoraConfig,
    json: &Value,
    file: &SafetensorsFile,
) -> Result<Vec<ModuleAdapter>> {
    let mut problems = Vec::new();
    let mut tokens: Vec<(String, &TensorInfo)> = Vec::new();
    let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut full: Vec<(&TensorInfo, String)> = Vec::new();
    for t in file.tensors() {
        if !t.dtype.is_float() {
            problems.push(format!(
                "tensor {:?}: dtype {} is not a floating-point type",
                t.name, t.dtype
            ));
            continue;
        }
        let key = t.name.strip_prefix(KEY_PREFIX).unwrap_or(&t.name);
        let (module, role) = classify(key);
        if role == Role::Full {
            full.push((t, replaced_target(key)));
            continue;
        }
        if role == Role::Tokens {
            tokens.push((module, t));
            continue;
        }
        if !groups.contains_key(&module) {
            order.push(module.clone());
        }
        let p = groups.entry(module).or_default();
        let slot = match role {
            Role::A => &mut p.a,
            Role::B => &mut p.b,
            Role::BBias => &mut p.bias,
            Role::EmbA => &mut p.emb_a,
            Role::EmbB => &mut p.emb_b,
            Role::Magnitude => &mut p.magnitude,
            Role::Full | Role::Tokens => unreachable!("handled above"),
        };
        *slot = Some(t);
    }

    let mut out = Vec::new();
    for module in &order {
        let p = &groups[module];
        let (a, b, layer) = match (p.a, p.b, p.emb_a, p.emb_b) {
            (Some(a), Some(b), None, None) => {
                let layer = match a.shape.len() {
                    2 => LayerKind::Linear {
                        fan_in_fan_out: cfg.fan_in_fan_out,
                    },
                    3..=5 => LayerKind::Conv {
                        kernel: a.shape[2..].to_vec(),
                    },
                    _ => {
                        problems.push(format!("tensor {:?}: lora_A must be 2-D (linear) or 3- to 5-D (conv), found shape {}", a.name, shape_str(a)));
                        continue;
                    }
                };
                (a, b, layer)
            }
            (None, None, Some(a), Some(b)) => (a, b, LayerKind::Embedding),
            _ => {
                let have: Vec<&str> = [
                    (p.a, "lora_A"),
                    (p.b, "lora_B"),
                    (p.emb_a, "lora_embedding_A"),
                    (p.emb_b, "lora_embedding_B"),
                ]
                .iter()
                .filter_map(|(t, n)| t.map(|_| *n))
                .collect();
                problems.push(format!("module {module:?}: incomplete LoRA pair: found only {} (expected lora_A + lora_B, or lora_embedding_A + lora_embedding_B)", have.join(" + ")));
                continue;
            }
        };
        let is_linear = matches!(layer, LayerKind::Linear { .. });
        // Shapes: A is (r, in, k…), B is (out, r, 1…) for linear/conv; embedding A (r, n), B (d, r).
        let b_rank_dim = 1;
        if b.shape.len() < 2
            || (matches!(layer, LayerKind::Conv { .. }) && b.shape.len() != a.shape.len())
            || (!matches!(layer, LayerKind::Conv { .. })
                && (a.shape.len() != 2 || b.shape.len() != 2))
        {
            problems.push(format!(
                "module {module:?}: lora_A {} and lora_B {} do not have matching dimensionality",
                shape_str(a),
                shape_str(b)
            ));
            continue;
        }
        if let LayerKind::Conv { .. } = &layer {
            if b.shape[2..].iter().any(|&d| d != 1) {
                problems.push(format!(
                    "tensor {:?}: a conv lora_B must have a 1×1 kernel, found shape {}",
                    b.name,
                    shape_str(b)
                ));
                continue;
            }
        }
        let rank = a.shape[0];
        if b.shape[b_rank_dim] != rank {
            problems.push(format!(
                "module {module:?}: rank mismatch: {} has r={} (shape {}) but {} has r={} (shape {})",
                a.name, rank, shape_str(a), b.name, b.shape[b_rank_dim], shape_str(b)
            ));
            continue;
        }
        let (cfg_rank, pattern) = cfg.rank_for(module);
        if cfg_rank != rank {
            problems.push(format!(
                "module {module:?}: the config gives r={cfg_rank} ({}) but the tensors have r={rank}",
                pattern.map(|k| format!("rank_pattern key {k:?}")).unwrap_or_else(|| "r".into())
            ));
            continue;
        }
        if !cfg.selects(module, is_linear) {
            problems.push(format!(
                "module {module:?}: has LoRA tensors but target_modules {:?} does not select it (PEFT would ignore these tensors)",
                cfg.target_modules
            ));
            continue;
        }
        let out_dim = match &layer {
            LayerKind::Embedding => b.shape[0],
            _ => b.shape[0],
        };
        let magnitude = match (p.magnitude, cfg.use_dora) {
            (Some(m), true) => {
                let want: Vec<u64> = match &layer {
                    LayerKind::Conv { kernel } => {
                        let mut s = vec![1, out_dim];
                        s.extend(std::iter::repeat_n(1, kernel.len()));
                        s
                    }
                    _ => vec![out_dim],
                };
                if m.numel() != out_dim || (m.shape != want && m.shape != vec![out_dim]) {
                    problems.push(format!(
                        "tensor {:?}: DoRA magnitude should have shape {want:?}, found {}",
                        m.name,
                        shape_str(m)
                    ));
                    continue;
                }
                Some(m.name.clone())
            }
            (Some(m), false) => {
                problems.push(format!(
                    "tensor {:?}: a DoRA magnitude vector but the config has use_dora=false",
                    m.name
                ));
                continue;
            }
            (None, true) => {
                problems.push(format!(
                    "module {module:?}: use_dora=true but there is no lora_magnitude_vector"
                ));
                continue;
            }
            (None, false) => None,
        };
        let alpha = cfg.alpha_for(module);
        let scale = cfg.scale(alpha, rank);
        out.push(ModuleAdapter {
            module: module.clone(),
            target: format!("{module}.weight"),
            family: Family::Lora,
            payload: Payload::LowRank(LowRank {
                layer,
                a: a.name.clone(),
                b: b.name.clone(),
                rank,
                alpha,
                rslora: cfg.use_rslora,
                scale,
                magnitude,
                singular_values: None,
            }),
        });
        if let Some(bias) = p.bias {
            if !cfg.lora_bias {
                problems.push(format!(
                    "tensor {:?}: a lora_B bias but the config has lora_bias=false",
                    bias.name
                ));
            } else if bias.shape != vec![out_dim] {
                problems.push(format!(
                    "tensor {:?}: lora_B bias should have shape [{out_dim}], found {}",
                    bias.name,
                    shape_str(bias)
                ));
            } else {
                out.push(ModuleAdapter {
                    module: module.clone(),
                    target: format!("{module}.bias"),
                    family: Family::Lora,
                    payload: Payload::Add {
                        tensor: bias.name.clone(),
                        scale,
                    },
                });
            }
        }
    }
    // Trainable tokens alongside LoRA (`trainable_token_indices`): new rows of an embedding.
    for (module, t) in tokens {
        match json.get("trainable_token_indices").and_then(|v| crate::peft_families::token_indices(v, &module)) {
            Some(idx) => out.push(crate::peft_families::rows_module(module, t, idx, Family::TrainableTokens, &mut problems)),
            None => problems.push(format!("tensor {:?}: trainable tokens but trainable_token_indices gives no indices for {module:?}", t.name)),
        }
    }
    for (t, target) in full {
        let module = target
            .rsplit_once('.')
            .map(|(m, _)| m.to_string())
            .unwrap_or_default();
        out.push(ModuleAdapter {
            module,
            target,
            family: Family::Lora,
            payload: Payload::Replace {
                tensor: t.name.clone(),
            },
        });
    }
    // Replacements come first so that LoRA updates apply to the saved base layer, as in PEFT.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> LoraConfig {
        LoraConfig::from_json(Path::new("adapter_config.json"), &v).unwrap()
    }

    #[test]
    fn rank_and_alpha_patterns_follow_peft() {
        let c = cfg(json!({"peft_type":"LORA","r":8,"lora_alpha":16,
            "rank_pattern":{"q_proj":4,"model.layers.1.self_attn.v_proj":2},"alpha_pattern":{"down_proj":32}}));
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj").0, 4);
        assert_eq!(c.rank_for("model.layers.1.self_attn.v_proj").0, 2);
        assert_eq!(c.rank_for("model.layers.0.self_attn.v_proj").0, 8);
        // `(.*\.)?` anchors on a dot: "xq_proj" is not "q_proj".
        assert_eq!(c.rank_for("model.layers.0.xq_proj").0, 8);
        assert_eq!(c.alpha_for("model.layers.0.mlp.down_proj"), 32.0);
        assert_eq!(c.scale(16.0, 8), 2.0);
    }

    #[test]
    fn rslora_scale() {
        let c = cfg(json!({"peft_type":"LORA","use_rslora":true}));
        assert!((c.scale(8.0, 16) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn target_module_selection() {
        let c = cfg(json!({"peft_type":"LORA","target_modules":["q_proj","v_proj"]}));
        assert!(c.selects("model.layers.0.self_attn.q_proj", true));
        assert!(!c.selects("model.layers.0.self_attn.k_proj", true));
        let c = cfg(json!({"peft_type":"LORA","target_modules":".*\\.(q|v)_proj"}));
        assert!(c.selects("model.layers.0.self_attn.v_proj", true));
        assert!(!c.selects("model.layers.0.self_attn.o_proj", true));
        let c = cfg(json!({"peft_type":"LORA","target_modules":"all-linear"}));
        assert!(c.selects("model.layers.0.mlp.up_proj", true));
        assert!(!c.selects("lm_head", true));
        let c =
            cfg(json!({"peft_type":"LORA","target_modules":["q_proj"],"layers_to_transform":[1]}));
        assert!(c.selects("model.layers.1.self_attn.q_proj", true));
        assert!(!c.selects("model.layers.0.self_attn.q_proj", true));
        let c = cfg(
            json!({"peft_type":"LORA","target_modules":["q_proj"],"exclude_modules":["model.layers.0.self_attn.q_proj"]}),
        );
        assert!(!c.selects("model.layers.0.self_attn.q_proj", true));
    }

    #[test]
    fn config_type_errors_are_specific() {
        let e = LoraConfig::from_json(Path::new("c.json"), &json!({"peft_type":"LORA","r":"8"}))
            .unwrap_err();
        assert!(
            e.to_string().contains("r must be a non-negative integer"),
            "{e}"
        );
        let e = LoraConfig::from_json(
            Path::new("c.json"),
            &json!({"peft_type":"LORA","rank_pattern":{"(?<=x)q":4}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a regex"), "{e}");
    }

    #[test]
    fn classify_keys() {
        assert_eq!(classify("m.q.lora_A.weight"), ("m.q".into(), Role::A));
        assert_eq!(classify("m.e.lora_embedding_B"), ("m.e".into(), Role::EmbB));
        assert_eq!(
            classify("m.q.lora_magnitude_vector"),
            ("m.q".into(), Role::Magnitude)
        );
        assert_eq!(
            replaced_target("model.embed_tokens.base_layer.weight"),
            "model.embed_tokens.weight"
        );
    }
}
