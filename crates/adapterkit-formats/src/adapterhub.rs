//! AdapterHub's `adapters` library: directories written by `model.save_adapter(dir, name)`
//! (`adapter_config.json` with `config`, and `adapter.safetensors`).
//!
//! Every part of an adapter is recognised from its tensor names and its config:
//! - LoRA (`<module>.loras.<name>.lora_A [r, in]`, `.lora_B [out, r]`): `W + (B·A)·α/r`;
//! - IA3 (`composition_mode: "scale"`, only `lora_B [out, 1]`): `W·diag(lora_B·α)` row by row,
//!   the bias untouched (the library's merge; its forward also scales the bias);
//! - DoRA (`use_dora`, `m.weight [out, 1]`): `m·V/‖V‖` per row with `V = W + B·A` (the library
//!   merges without α/r);
//! - parts that add computation by construction and cannot be folded into the weights:
//!   bottleneck adapters (Pfeiffer, Houlsby, parallel, Compacter's PHM layers), prefix tuning,
//!   prompt tuning, ReFT interventions, invertible adapters;
//! - VeRA (`vera_B [out, out]`, `vera_D [r, r]` per layer, shared `lora_A`/`lora_B`):
//!   `W + (vera_B·B·vera_D·A)·α/r`, read as a LoRA with `B' = vera_B·B·vera_D` (computed in f64);
//! - gated LoRA, which the library's own merge refuses.
//!
//! [`describe`] lists the parts (for `inspect`); [`open`] gives the IR of an adapter whose every
//! part can be merged, and otherwise refuses, naming each part that cannot and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapterkit_core::ir::{Adapter, Family, LayerKind, LowRank, ModuleAdapter, Payload, ScaleAxis};
use adapterkit_core::{DType, TensorSource};
use serde_json::Value;

use crate::memory::MemorySource;
use crate::peft::PeftAdapter;
use crate::safetensors::SafetensorsFile;
use crate::{Error, Result};

/// The config file.
pub const CONFIG: &str = "adapter_config.json";
/// The weights the library writes with `use_safetensors=True`.
pub const WEIGHTS: &str = "adapter.safetensors";
/// The pickled weights it writes by default.
pub const PICKLE: &str = "pytorch_adapter.bin";

fn err(path: &Path, message: impl Into<String>) -> Error {
    crate::convert::fmt_err(path, "adapterhub", message)
}

fn read_config(dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(CONFIG)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The composition file `save_adapter_setup` writes.
pub const SETUP: &str = "adapter_setup.json";

/// Whether `dir` is a composition setup (`adapter_setup.json` beside one directory per adapter).
pub fn is_setup(dir: &Path) -> bool {
    dir.join(SETUP).is_file()
}

/// A composition setup: the block tree (`Stack`, `Fuse`, `Parallel`, `BatchSplit`, …) rendered as
/// text, and the adapter and fusion directories beside it.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The tree, e.g. `Stack(c, Fuse(a, b))`.
    pub tree: String,
    /// `adapter_setup.json` as written.
    pub json: Value,
    /// Adapter directories (name → description).
    pub adapters: Vec<(String, Description)>,
    /// Fusion layers (`adapter_fusion_config.json` directories, named `a,b`).
    pub fusions: Vec<String>,
}

fn render(v: &Value) -> String {
    let ty = v.get("type").and_then(Value::as_str).unwrap_or("?");
    let kids: Vec<String> = v
        .get("children")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|c| match c {
                    Value::String(s) => s.clone(),
                    other => render(other),
                })
                .collect()
        })
        .unwrap_or_default();
    if ty == "single" && kids.len() == 1 {
        kids[0].clone()
    } else {
        format!("{ty}({})", kids.join(", "))
    }
}

/// Read a composition setup.
pub fn describe_setup(dir: &Path) -> Result<Setup> {
    let path = dir.join(SETUP);
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| err(&path, format!("not valid JSON: {e}")))?;
    let tree = json
        .get("adapter_setup")
        .filter(|v| !v.is_null())
        .map(render)
        .ok_or_else(|| err(&path, "no adapter_setup"))?;
    let mut adapters = Vec::new();
    let mut fusions = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for e in entries {
        let name = e
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if e.join("adapter_fusion_config.json").is_file() {
            fusions.push(name);
        } else if sniff(&e) {
            adapters.push((name, describe(&e)?.0));
        }
    }
    Ok(Setup {
        tree,
        json,
        adapters,
        fusions,
    })
}

/// Whether `dir` holds an `adapters` library adapter (its config has `config` and an
/// `adapters.` version or a `model_class`, and no PEFT `peft_type`).
pub fn sniff(dir: &Path) -> bool {
    read_config(dir).is_some_and(|c| {
        c.get("config").is_some_and(Value::is_object)
            && c.get("peft_type").is_none()
            && (c
                .get("version")
                .and_then(Value::as_str)
                .is_some_and(|v| v.starts_with("adapters."))
                || c.get("model_class").is_some())
    })
}

/// What a part of an adapter is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartKind {
    /// LoRA: `W + (B·A)·α/r`.
    Lora,
    /// IA3: rows scaled by `lora_B·α`.
    Ia3,
    /// DoRA.
    Dora,
    /// VeRA (not read by this version).
    Vera,
    /// Gated LoRA (the library cannot merge it).
    GatedLora,
    /// A bottleneck adapter (`kind`: sequential, parallel, Compacter …).
    Bottleneck(String),
    /// Prefix tuning.
    Prefix,
    /// Prompt tuning.
    Prompt,
    /// A ReFT intervention.
    Reft,
    /// An invertible adapter on the embeddings.
    Invertible,
}

impl PartKind {
    /// Whether the part folds into the weights.
    pub fn mergeable(&self) -> bool {
        matches!(
            self,
            PartKind::Lora | PartKind::Ia3 | PartKind::Dora | PartKind::Vera
        )
    }

    /// A short name.
    pub fn name(&self) -> String {
        match self {
            PartKind::Lora => "LoRA".into(),
            PartKind::Ia3 => "IA3".into(),
            PartKind::Dora => "DoRA".into(),
            PartKind::Vera => "VeRA".into(),
            PartKind::GatedLora => "gated LoRA".into(),
            PartKind::Bottleneck(k) => format!("{k} bottleneck adapter"),
            PartKind::Prefix => "prefix tuning".into(),
            PartKind::Prompt => "prompt tuning".into(),
            PartKind::Reft => "ReFT intervention".into(),
            PartKind::Invertible => "invertible adapter".into(),
        }
    }

    /// Why it cannot be merged (for the parts that cannot).
    pub fn why_not(&self) -> &'static str {
        match self {
            PartKind::Bottleneck(_) => "it inserts a down-projection, a non-linearity and an up-projection into the forward pass; a non-linear function of the activations is not a change of any weight",
            PartKind::Prefix => "it prepends trained key/value vectors to every attention layer; they change the attention's inputs, not its weights",
            PartKind::Prompt => "it prepends trained embeddings to the input sequence; no weight holds them",
            PartKind::Reft => "it edits hidden representations with a learned projection at given positions; that is not a weight update",
            PartKind::Invertible => "it applies an invertible network to the embeddings' outputs, non-linearly",
            PartKind::GatedLora => "its update is scaled by a gate computed from the input; the library itself refuses to merge it",
            _ => "",
        }
    }
}

/// One part of an adapter (one entry of a union, or the whole config).
#[derive(Debug, Clone)]
pub struct Part {
    /// What it is.
    pub kind: PartKind,
    /// Its config.
    pub config: Value,
    /// Its tensors.
    pub tensors: Vec<String>,
}

/// An adapter as the library saved it.
#[derive(Debug, Clone)]
pub struct Description {
    /// The adapter's name.
    pub name: String,
    /// The model class it was saved from.
    pub model_class: Option<String>,
    /// The library version that wrote it.
    pub version: Option<String>,
    /// Its parts.
    pub parts: Vec<Part>,
    /// A prediction head saved beside it (`head_config.json`).
    pub head: Option<Value>,
    /// The config file as written.
    pub config_json: Value,
}

fn config_parts(c: &Value) -> Vec<Value> {
    if c.get("architecture").and_then(Value::as_str) == Some("union") {
        c.get("configs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    } else {
        vec![c.clone()]
    }
}

fn kind_of(c: &Value) -> PartKind {
    let arch = c.get("architecture").and_then(Value::as_str);
    let flag = |k: &str| c.get(k).and_then(Value::as_bool) == Some(true);
    match arch {
        Some("lora") => {
            if flag("use_gating") {
                PartKind::GatedLora
            } else if !c.get("vera_d").is_none_or(Value::is_null)
                || !c.get("vera_b").is_none_or(Value::is_null)
            {
                PartKind::Vera
            } else if flag("use_dora") {
                PartKind::Dora
            } else if c.get("composition_mode").and_then(Value::as_str) == Some("scale") {
                PartKind::Ia3
            } else {
                PartKind::Lora
            }
        }
        Some("prefix_tuning") => PartKind::Prefix,
        Some("prompt_tuning") => PartKind::Prompt,
        Some(a) if a.contains("reft") => PartKind::Reft,
        _ => {
            let k = if flag("phm_layer") {
                "Compacter (PHM)"
            } else if flag("is_parallel") {
                "parallel"
            } else if flag("mh_adapter") && flag("output_adapter") {
                "Houlsby (double sequential)"
            } else {
                "sequential (Pfeiffer)"
            };
            PartKind::Bottleneck(k.into())
        }
    }
}

/// Which part a tensor belongs to, by the library's module names.
fn tensor_kind(name: &str) -> &'static str {
    if name.contains(".loras.")
        || name.contains("shared_parameters")
            && (name.ends_with("lora_A") || name.ends_with("lora_B"))
    {
        "lora"
    } else if name.contains("prefix_tunings") || name.contains("prefix_tuning") {
        "prefix"
    } else if name.contains("prompt_tunings") || name.contains("prompt_embedding") {
        "prompt"
    } else if name.contains(".refts.") {
        "reft"
    } else if name.contains("invertible_adapters") {
        "invertible"
    } else {
        "bottleneck"
    }
}

/// Read an adapter's config and list its parts.
pub fn describe(dir: &Path) -> Result<(Description, Arc<SafetensorsFile>)> {
    let cfg_path = dir.join(CONFIG);
    if !dir.join(WEIGHTS).is_file() && dir.join(PICKLE).is_file() {
        return Err(err(
            &dir.join(PICKLE),
            "the weights are a pickle (torch.save), which adapterkit does not load: pickles can run code. Save the adapter again with model.save_adapter(dir, name, use_safetensors=True)",
        ));
    }
    let cfg = read_config(dir).ok_or_else(|| err(&cfg_path, "missing or not JSON"))?;
    let c = cfg
        .get("config")
        .filter(|c| c.is_object())
        .ok_or_else(|| err(&cfg_path, "no \"config\" object"))?;
    let file = Arc::new(SafetensorsFile::open_mapped(dir.join(WEIGHTS))?);
    let configs = config_parts(c);
    let mut parts: Vec<Part> = configs
        .iter()
        .map(|c| Part {
            kind: kind_of(c),
            config: c.clone(),
            tensors: Vec::new(),
        })
        .collect();
    // Tensors go to the first part of their kind (a union has at most one part per kind here).
    let mut orphans = Vec::new();
    for t in file.tensors() {
        let tk = tensor_kind(&t.name);
        let fits = |k: &PartKind| match tk {
            "lora" => matches!(
                k,
                PartKind::Lora
                    | PartKind::Ia3
                    | PartKind::Dora
                    | PartKind::Vera
                    | PartKind::GatedLora
            ),
            "prefix" => *k == PartKind::Prefix,
            "prompt" => *k == PartKind::Prompt,
            "reft" => *k == PartKind::Reft,
            "invertible" => true,
            _ => matches!(k, PartKind::Bottleneck(_)),
        };
        if tk == "invertible" {
            orphans.push(t.name.clone());
            continue;
        }
        match parts.iter_mut().find(|p| fits(&p.kind)) {
            Some(p) => p.tensors.push(t.name.clone()),
            None => orphans.push(t.name.clone()),
        }
    }
    if !orphans.is_empty() {
        if orphans.iter().all(|o| tensor_kind(o) == "invertible") {
            parts.push(Part {
                kind: PartKind::Invertible,
                config: Value::Null,
                tensors: orphans,
            });
        } else {
            return Err(err(
                &dir.join(WEIGHTS),
                format!(
                    "{} tensor(s) belong to no part of the config: {}",
                    orphans.len(),
                    orphans
                        .iter()
                        .take(4)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    let head = std::fs::read_to_string(dir.join("head_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    Ok((
        Description {
            name: cfg
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            model_class: cfg
                .get("model_class")
                .and_then(Value::as_str)
                .map(str::to_string),
            version: cfg
                .get("version")
                .and_then(Value::as_str)
                .map(str::to_string),
            parts,
            head,
            config_json: cfg.clone(),
        },
        file,
    ))
}

/// Open an adapter whose every part merges into the weights, as IR; refuse one with parts that
/// add computation, naming each and why (and which parts would merge).
pub fn open(dir: &Path) -> Result<PeftAdapter> {
    open_parts(dir, false)
}

/// [`open`], or with `partial` the parts that merge only (as the library's `merge_adapter` does
/// for a union), each part left out named in a note: the merged model then needs those parts at
/// inference, through the library.
pub fn open_parts(dir: &Path, partial: bool) -> Result<PeftAdapter> {
    if is_setup(dir) {
        let s = describe_setup(dir)?;
        return Err(err(
            dir,
            format!(
                "a composition setup, {}: its adapters act together in the forward pass (stacked, fused by learned attention, or in parallel), which is not one weight update; merge its adapters one by one ({})",
                s.tree,
                s.adapters.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let (mut d, file) = describe(dir)?;
    let st = dir.join(WEIGHTS);
    let blocked: Vec<&Part> = d.parts.iter().filter(|p| !p.kind.mergeable()).collect();
    let mut left_out = Vec::new();
    if partial && blocked.len() < d.parts.len() {
        for p in &blocked {
            left_out.push(format!(
                "{} ({} tensors) not merged: {}; the merged model still needs it at inference, through the adapters library",
                p.kind.name(),
                p.tensors.len(),
                p.kind.why_not()
            ));
        }
        d.parts.retain(|p| p.kind.mergeable());
    } else if !blocked.is_empty() {
        let ok: Vec<String> = d
            .parts
            .iter()
            .filter(|p| p.kind.mergeable())
            .map(|p| format!("{} ({} tensors)", p.kind.name(), p.tensors.len()))
            .collect();
        let mut msg = format!(
            "adapter {:?} cannot be folded into the weights: {}",
            d.name,
            blocked
                .iter()
                .map(|p| format!("{}: {}", p.kind.name(), p.kind.why_not()))
                .collect::<Vec<_>>()
                .join("; ")
        );
        if ok.is_empty() {
            msg.push_str(". No part of it is a weight update.");
        } else {
            msg.push_str(&format!(
                ". Its mergeable part{} ({}) would merge on {} own, but merging only part of the adapter would not be the model it was trained as, so nothing is written (--mergeable-parts merges {} anyway, as the library's merge_adapter does).",
                if ok.len() > 1 { "s" } else { "" },
                ok.join(", "),
                if ok.len() > 1 { "their" } else { "its" },
                if ok.len() > 1 { "them" } else { "it" }
            ));
        }
        return Err(err(dir, msg));
    }
    let mut mem = MemorySource::over(file.clone());
    let mut modules = Vec::new();
    let mut notes = left_out;
    for p in &d.parts {
        let c = &p.config;
        let r = c.get("r").and_then(Value::as_u64).unwrap_or(0);
        let alpha = c.get("alpha").and_then(Value::as_f64).ok_or_else(|| {
            err(
                &dir.join(CONFIG),
                format!("{}: alpha is missing", p.kind.name()),
            )
        })?;
        // Group the part's tensors by module; VeRA's shared projections apart.
        let mut by_module: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut shared: BTreeMap<String, String> = BTreeMap::new();
        for t in &p.tensors {
            if t.contains("shared_parameters") {
                let role = t.rsplit('.').next().unwrap_or(t).to_string();
                shared.insert(role, t.clone());
                continue;
            }
            let Some((module, rest)) = t.split_once(".loras.") else {
                return Err(err(
                    &st,
                    format!("tensor {t:?}: not under <module>.loras.<name>"),
                ));
            };
            let role = rest.split_once('.').map_or(rest, |(_, r)| r);
            by_module
                .entry(module.to_string())
                .or_default()
                .insert(role.to_string(), t.clone());
        }
        for (module, roles) in by_module {
            let get = |role: &str| -> Result<&String> {
                roles.get(role).ok_or_else(|| {
                    err(
                        &st,
                        format!("module {module}: {} without its {role}", p.kind.name()),
                    )
                })
            };
            let target = format!("{module}.weight");
            match p.kind {
                PartKind::Ia3 => {
                    let b = get("lora_B")?;
                    let info = file
                        .info(b)
                        .ok_or_else(|| err(&st, format!("{b}: missing")))?
                        .clone();
                    if info.shape.len() != 2 || info.shape[1] != 1 {
                        return Err(err(
                            &st,
                            format!("{b}: shape {:?}, IA3 expects [out, 1]", info.shape),
                        ));
                    }
                    let v: Vec<f32> = file
                        .read_f32(b)?
                        .iter()
                        .map(|x| (f64::from(*x) * alpha) as f32)
                        .collect();
                    let name = format!("{b}·alpha");
                    mem.insert_f32(&name, DType::F32, vec![info.shape[0]], &v)?;
                    modules.push(ModuleAdapter {
                        module: module.clone(),
                        target,
                        family: Family::Ia3,
                        payload: Payload::Scale {
                            tensor: name,
                            axis: ScaleAxis::Output,
                            fan_in_fan_out: false,
                            bias: false,
                        },
                    });
                }
                PartKind::Lora | PartKind::Dora => {
                    let (a, b) = (get("lora_A")?, get("lora_B")?);
                    let dora = p.kind == PartKind::Dora;
                    let magnitude = if dora {
                        let m = get("m.weight")?;
                        // The library stores m as [out, 1]; the IR reads a vector.
                        let v = file.read_f32(m)?;
                        let name = format!("{m}·vector");
                        mem.insert_f32(&name, DType::F32, vec![v.len() as u64], &v)?;
                        Some(name)
                    } else {
                        None
                    };
                    if r == 0 {
                        return Err(err(&dir.join(CONFIG), "LoRA with r = 0"));
                    }
                    // The library merges DoRA without α/r (methods/lora.py), LoRA with it.
                    let scale = if dora { 1.0 } else { alpha / r as f64 };
                    modules.push(ModuleAdapter {
                        module: module.clone(),
                        target,
                        family: Family::Lora,
                        payload: Payload::LowRank(LowRank {
                            layer: LayerKind::Linear {
                                fan_in_fan_out: false,
                            },
                            a: a.clone(),
                            b: b.clone(),
                            rank: r,
                            alpha,
                            rslora: false,
                            scale,
                            magnitude,
                            singular_values: None,
                        }),
                    });
                }
                PartKind::Vera => {
                    let (vb, vd) = (get("vera_B")?, get("vera_D")?);
                    let (sa, sb) = match (shared.get("lora_A"), shared.get("lora_B")) {
                        (Some(a), Some(b)) => (a.clone(), b.clone()),
                        _ => {
                            return Err(err(
                                &st,
                                "VeRA without its shared lora_A/lora_B (shared_parameters)",
                            ))
                        }
                    };
                    let shape = |n: &str| file.info(n).map(|i| i.shape.clone()).unwrap_or_default();
                    let (sbv, vbs, vds, sas) = (shape(&sb), shape(vb), shape(vd), shape(&sa));
                    let out = vbs.first().copied().unwrap_or(0);
                    let ok = sas.len() == 2
                        && sas[0] == r
                        && sbv == vec![out, r]
                        && vbs == vec![out, out]
                        && vds == vec![r, r];
                    if !ok {
                        return Err(err(&st, format!("module {module}: VeRA shapes vera_B {vbs:?}, vera_D {vds:?}, shared lora_B {sbv:?}, lora_A {sas:?} do not chain for r = {r}")));
                    }
                    // B' = vera_B · B · vera_D (out × r), in f64.
                    let (o, rr) = (out as usize, r as usize);
                    let (mb, b, md) = (file.read_f32(vb)?, file.read_f32(&sb)?, file.read_f32(vd)?);
                    let mut t1 = vec![0f64; o * rr];
                    for i in 0..o {
                        for k in 0..o {
                            let m = f64::from(mb[i * o + k]);
                            if m != 0.0 {
                                for j in 0..rr {
                                    t1[i * rr + j] += m * f64::from(b[k * rr + j]);
                                }
                            }
                        }
                    }
                    let mut beff = vec![0f32; o * rr];
                    for i in 0..o {
                        for j in 0..rr {
                            let v: f64 = (0..rr)
                                .map(|k| t1[i * rr + k] * f64::from(md[k * rr + j]))
                                .sum();
                            beff[i * rr + j] = v as f32;
                        }
                    }
                    let name = format!("{vb}·B");
                    mem.insert_f32(&name, DType::F32, vec![out, r], &beff)?;
                    modules.push(ModuleAdapter {
                        module: module.clone(),
                        target,
                        family: Family::Vera,
                        payload: Payload::LowRank(LowRank {
                            layer: LayerKind::Linear {
                                fan_in_fan_out: false,
                            },
                            a: sa,
                            b: name,
                            rank: r,
                            alpha,
                            rslora: false,
                            scale: alpha / r as f64,
                            magnitude: None,
                            singular_values: None,
                        }),
                    });
                }
                _ => unreachable!("only mergeable parts reach here"),
            }
        }
        if p.kind == PartKind::Dora && (alpha - r as f64).abs() > 0.0 {
            notes.push(format!(
                "DoRA merged as the adapters library merges it, without alpha/r = {}: its forward pass scales the update, so the merged model differs from the unmerged one",
                alpha / r as f64
            ));
        }
        if p.kind == PartKind::Ia3 {
            notes.push("IA3 merged as the adapters library merges it: the bias is not scaled (its forward pass scales the bias too)".into());
        }
    }
    let mut tensor_names: Vec<String> = modules
        .iter()
        .flat_map(|m| m.payload.tensors().into_iter().map(str::to_string))
        .collect();
    tensor_names.sort();
    tensor_names.dedup();
    // VeRA's shared A serves every module.
    let shared_tensors: Vec<String> = d
        .parts
        .iter()
        .filter(|p| p.kind == PartKind::Vera)
        .flat_map(|p| {
            p.tensors
                .iter()
                .filter(|t| t.contains("shared_parameters"))
                .cloned()
        })
        .collect();
    let family = if modules.iter().all(|m| m.family == Family::Ia3) {
        Family::Ia3
    } else {
        Family::Lora
    };
    let mem: Arc<dyn TensorSource> = Arc::new(mem);
    Ok(PeftAdapter {
        dir: PathBuf::from(dir),
        config_json: d.config_json.clone(),
        adapter: Adapter {
            path: st,
            format: "adapterhub",
            method: d
                .parts
                .iter()
                .map(|p| p.kind.name())
                .collect::<Vec<_>>()
                .join("+"),
            family,
            base_model: d
                .config_json
                .get("model_name")
                .and_then(Value::as_str)
                .map(str::to_string),
            modules,
            tensors: mem,
            tensor_names,
            shared_tensors,
            notes,
        },
    })
}

/// A module's place in the library's config: its layer and its role (`q`, `k`, `v`,
/// `intermediate`, `output`), for the Llama and BERT layouts.
fn role_of(module: &str) -> Option<(u64, &'static str)> {
    let layer_after = |key: &str| -> Option<(u64, &str)> {
        let (_, rest) = module.split_once(key)?;
        let (i, tail) = rest.split_once('.')?;
        Some((i.parse().ok()?, tail))
    };
    if let Some((i, tail)) = layer_after("layers.") {
        let role = match tail {
            "self_attn.q_proj" => "q",
            "self_attn.k_proj" => "k",
            "self_attn.v_proj" => "v",
            // The library's Llama mapping: intermediate → down_proj, output → up_proj.
            "mlp.down_proj" => "intermediate",
            "mlp.up_proj" => "output",
            _ => return None,
        };
        return Some((i, role));
    }
    if let Some((i, tail)) = layer_after("encoder.layer.") {
        let role = match tail {
            "attention.self.query" => "q",
            "attention.self.key" => "k",
            "attention.self.value" => "v",
            "intermediate.dense" => "intermediate",
            "output.dense" => "output",
            _ => return None,
        };
        return Some((i, role));
    }
    None
}

/// Write a LoRA or IA3 adapter in the library's layout (`adapter_config.json` +
/// `adapter.safetensors`), named after the output directory. The library places its modules by
/// role and layer, so every layer must hold the same roles (layers without any are `leave_out`);
/// different scales are baked into `lora_B` with `alpha = r`.
pub fn write(
    adapter: &Adapter,
    out: &Path,
    base: Option<&crate::base_names::BaseNames>,
    overwrite: bool,
) -> Result<crate::convert::Written> {
    use adapterkit_core::ir::ScaleAxis as Axis;
    let fail = |m: String| err(out, m);
    if out.exists() && !overwrite {
        return Err(fail("exists; pass --force to replace it".into()));
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| fail("the output directory names the adapter; give it a name".into()))?;
    enum Kind {
        Lora,
        Ia3,
    }
    let kind = if adapter.modules.iter().all(|m| matches!(&m.payload, Payload::Scale { axis: Axis::Output, .. })) {
        Kind::Ia3
    } else if adapter.modules.iter().all(|m| matches!(&m.payload, Payload::LowRank(lr) if lr.magnitude.is_none() && lr.singular_values.is_none() && matches!(lr.layer, LayerKind::Linear { fan_in_fan_out: false }))) {
        Kind::Lora
    } else {
        return Err(fail("the adapters library's LoRA layout holds plain LoRA (no DoRA, embeddings, convs or Conv1D) or output-side IA3; this adapter is neither".into()));
    };
    // Layers and roles.
    let mut layers: BTreeMap<u64, Vec<&'static str>> = BTreeMap::new();
    for m in &adapter.modules {
        let (i, role) = role_of(&m.module).ok_or_else(|| {
            fail(format!("module {}: the library cannot target it (it places LoRA on q/k/v, intermediate and output layers only)", m.module))
        })?;
        layers.entry(i).or_default().push(role);
    }
    let mut roles: Vec<&str> = layers.values().next().cloned().unwrap_or_default();
    roles.sort();
    for (i, r) in &layers {
        let mut r = r.clone();
        r.sort();
        if r != roles {
            return Err(fail(format!("layer {i} holds {r:?} but another layer {roles:?}: the library's config gives every layer the same targets")));
        }
    }
    let n_layers = base
        .and_then(|b| b.config.as_ref())
        .and_then(|c| c.get("num_hidden_layers"))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| layers.keys().max().map_or(0, |m| m + 1));
    let leave_out: Vec<u64> = (0..n_layers).filter(|i| !layers.contains_key(i)).collect();
    let attn: Vec<&str> = ["q", "k", "v"]
        .into_iter()
        .filter(|x| roles.contains(x))
        .collect();
    // Tensors and the scale.
    let mut notes = Vec::new();
    let mut tensors: Vec<(crate::safetensors::TensorSpec, Vec<u8>)> = Vec::new();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (r, alpha) = match kind {
        Kind::Lora => {
            let scales: Vec<(u64, f64)> = adapter
                .modules
                .iter()
                .filter_map(|m| match &m.payload {
                    Payload::LowRank(lr) => Some((lr.rank, lr.scale)),
                    _ => None,
                })
                .collect();
            let r = scales[0].0;
            if scales.iter().any(|(rr, _)| *rr != r) {
                return Err(fail(
                    "the library's config has one rank; this adapter's modules differ".into(),
                ));
            }
            let uniform = scales.iter().all(|(_, s)| *s == scales[0].1);
            let alpha = if uniform {
                scales[0].1 * r as f64
            } else {
                r as f64
            };
            if !uniform {
                notes.push(format!(
                    "module scales differ; baked into lora_B with alpha = r = {r}"
                ));
            }
            for m in &adapter.modules {
                let Payload::LowRank(lr) = &m.payload else {
                    continue;
                };
                let a = adapter.tensors.read_f32(&lr.a)?;
                let mut b = adapter.tensors.read_f32(&lr.b)?;
                if !uniform {
                    for x in b.iter_mut() {
                        *x = (f64::from(*x) * lr.scale) as f32;
                    }
                }
                let ia = adapter.tensors.info(&lr.a).expect("read").shape.clone();
                let ib = adapter.tensors.info(&lr.b).expect("read").shape.clone();
                tensors.push((
                    crate::safetensors::TensorSpec {
                        name: format!("{}.loras.{name}.lora_A", m.module),
                        dtype: DType::F32,
                        shape: ia,
                    },
                    f32s(&a),
                ));
                tensors.push((
                    crate::safetensors::TensorSpec {
                        name: format!("{}.loras.{name}.lora_B", m.module),
                        dtype: DType::F32,
                        shape: ib,
                    },
                    f32s(&b),
                ));
            }
            (r, alpha)
        }
        Kind::Ia3 => {
            for m in &adapter.modules {
                let Payload::Scale { tensor, .. } = &m.payload else {
                    continue;
                };
                let v = adapter.tensors.read_f32(tensor)?;
                tensors.push((
                    crate::safetensors::TensorSpec {
                        name: format!("{}.loras.{name}.lora_B", m.module),
                        dtype: DType::F32,
                        shape: vec![v.len() as u64, 1],
                    },
                    f32s(&v),
                ));
            }
            (1, 1.0)
        }
    };
    let ia3 = matches!(kind, Kind::Ia3);
    let num = |x: f64| {
        if x.fract() == 0.0 {
            Value::from(x as i64)
        } else {
            Value::from(x)
        }
    };
    let config = serde_json::json!({
        "alpha": num(alpha),
        "architecture": "lora",
        "attn_matrices": attn,
        "composition_mode": if ia3 { "scale" } else { "add" },
        "dropout": 0.0,
        "dtype": null,
        "init_weights": if ia3 { "ia3" } else { "lora" },
        "init_weights_seed": null,
        "intermediate_lora": roles.contains(&"intermediate"),
        "leave_out": leave_out,
        "output_lora": roles.contains(&"output"),
        "r": r,
        "selfattn_lora": !attn.is_empty(),
        "use_dora": false,
        "use_gating": false,
        "vera_b": null,
        "vera_d": null,
    });
    let bcfg = base.and_then(|b| b.config.as_ref());
    let top = serde_json::json!({
        "config": config,
        "hidden_size": bcfg.and_then(|c| c.get("hidden_size")).cloned().unwrap_or(Value::Null),
        "model_class": bcfg.and_then(|c| c.get("architectures")).and_then(|a| a.get(0)).cloned().unwrap_or(Value::Null),
        "model_name": adapter.base_model.clone(),
        "model_type": bcfg.and_then(|c| c.get("model_type")).cloned().unwrap_or(Value::Null),
        "name": name,
        "version": "adapters.1.3.0",
    });
    // Built in a fresh directory beside the output and renamed into place whole.
    let io = |path: &Path, source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let stage = tempfile::Builder::new()
        .prefix(".adapterkit-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .tempdir_in(parent)
        .map_err(|e| io(parent, e))?;
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    crate::safetensors::write_small(&stage.path().join(WEIGHTS), &tensors, None)?;
    let text = serde_json::to_string_pretty(&top).expect("JSON") + "\n";
    let cfg_tmp = stage.path().join(CONFIG);
    std::fs::write(&cfg_tmp, text).map_err(|e| io(&cfg_tmp, e))?;
    std::fs::set_permissions(
        &cfg_tmp,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .map_err(|e| io(&cfg_tmp, e))?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| io(out, e))?;
    }
    let kept = stage.keep();
    std::fs::rename(&kept, out).map_err(|e| io(out, e))?;
    Ok(crate::convert::Written {
        files: vec![out.join(CONFIG), out.join(WEIGHTS)],
        notes,
    })
}
