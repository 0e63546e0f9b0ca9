//! diffusers' LoRA files (`pytorch_lora_weights.safetensors`): PEFT's keys under a component
//! prefix (`unet.`, `transformer.`, `text_encoder.`, `text_encoder_2.`, …), no `base_model.model.`,
//! and the LoRA configs as JSON under the `lora_adapter_metadata` metadata key (spec:
//! `formats/diffusers.md`). Without that metadata diffusers takes `lora_alpha = r` unless the file
//! carries `<module>.alpha` scalars (what its kohya conversion produces).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use adapterkit_core::ir::{Adapter, Family, LayerKind, LowRank, ModuleAdapter, Payload};
use adapterkit_core::TensorInfo;
use serde_json::{json, Map, Value};

use crate::base_names::{BaseNames, COMPONENTS};
use crate::convert::{fmt_err, most_common, WriteOptions, Written};
use crate::error::Result;
use crate::memory::{raw_tensor, scalar, MemorySource};
use crate::peft::LoraConfig;
use crate::peft::PeftAdapter;
use crate::safetensors::{write_small, SafetensorsFile, TensorSpec};

/// The file name diffusers saves LoRAs under.
pub const FILE_NAME: &str = "pytorch_lora_weights.safetensors";
/// The safetensors metadata key holding the LoRA configs.
pub const METADATA_KEY: &str = "lora_adapter_metadata";

const ROLES: &[&str] = &[
    "lora_A.weight",
    "lora_B.weight",
    "lora.down.weight",
    "lora.up.weight",
    "lora_linear_layer.down.weight",
    "lora_linear_layer.up.weight",
    "lora_B.bias",
    "lora_magnitude_vector",
    "lora_magnitude_vector.weight",
    "alpha",
];

fn split(name: &str) -> Option<(&'static str, &str, &'static str)> {
    let comp = COMPONENTS
        .iter()
        .find(|c| name.starts_with(&format!("{c}.")))?;
    let rest = &name[comp.len() + 1..];
    let role = ROLES
        .iter()
        .filter(|r| rest.ends_with(&format!(".{r}")))
        .max_by_key(|r| r.len())?;
    Some((comp, &rest[..rest.len() - role.len() - 1], role))
}

/// Whether every key is a diffusers LoRA key.
pub fn sniff(file: &SafetensorsFile) -> bool {
    !file.tensors().is_empty() && file.tensors().iter().all(|t| split(&t.name).is_some())
}

/// One component's LoraConfig: diffusers packs each as `"<component>.<field>"`. `None` when the
/// file has no config for it (diffusers then takes `lora_alpha = r`).
fn config_for(path: &Path, meta: &Map<String, Value>, comp: &str) -> Result<Option<LoraConfig>> {
    let mut out = Map::new();
    for (k, v) in meta {
        if let Some(f) = k.strip_prefix(&format!("{comp}.")) {
            out.insert(f.to_string(), v.clone());
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    out.entry("peft_type").or_insert(json!("LORA"));
    LoraConfig::from_json(path, &Value::Object(out)).map(Some)
}

/// Open a diffusers LoRA file (or the directory holding `pytorch_lora_weights.safetensors`).
pub fn open(path: &Path, base: Option<&BaseNames>) -> Result<PeftAdapter> {
    let file_path = if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_path_buf()
    };
    let file = Arc::new(SafetensorsFile::open_mapped(&file_path)?);
    let meta: Map<String, Value> = match file
        .metadata()
        .and_then(|m| m.iter().find(|(k, _)| k == METADATA_KEY))
    {
        Some((_, text)) => serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .ok_or_else(|| {
                fmt_err(
                    &file_path,
                    "diffusers",
                    format!("metadata {METADATA_KEY} is not a JSON object"),
                )
            })?,
        None => Map::new(),
    };
    let mut groups: BTreeMap<(String, String), BTreeMap<&str, &TensorInfo>> = BTreeMap::new();
    for t in file.tensors() {
        let (c, m, r) = split(&t.name).ok_or_else(|| {
            fmt_err(
                &file_path,
                "diffusers",
                format!(
                    "tensor {:?} is not <component>.<module>.lora_A.weight/lora_B.weight/…",
                    t.name
                ),
            )
        })?;
        groups
            .entry((c.to_string(), m.to_string()))
            .or_default()
            .insert(r, t);
    }
    let mut mem = MemorySource::over(file.clone());
    let mut modules = Vec::new();
    let mut unresolved = Vec::new();
    let mut left_out = 0usize;
    for ((comp, module), parts) in &groups {
        if base
            .and_then(|b| b.only.as_deref())
            .is_some_and(|o| o != comp)
        {
            left_out += 1;
            continue;
        }
        // diffusers' training scripts save attention modules as `.lora.down/.lora.up` (its older
        // naming) and everything else as PEFT's `.lora_A/.lora_B`, in one file.
        let a = parts
            .get("lora_A.weight")
            .or_else(|| parts.get("lora.down.weight"))
            .or_else(|| parts.get("lora_linear_layer.down.weight"));
        let b = parts
            .get("lora_B.weight")
            .or_else(|| parts.get("lora.up.weight"))
            .or_else(|| parts.get("lora_linear_layer.up.weight"));
        let (Some(a), Some(b)) = (a, b) else {
            return Err(fmt_err(
                &file_path,
                "diffusers",
                format!("{comp}.{module}: lora_A and lora_B must both be present"),
            ));
        };
        if parts.contains_key("lora_B.bias") {
            return Err(fmt_err(&file_path, "diffusers", format!("{comp}.{module}: lora_B.bias (lora_bias) is not supported in diffusers files by this version")));
        }
        if a.shape.len() < 2 || b.shape.len() < 2 || a.shape[0] == 0 || b.shape[1] != a.shape[0] {
            return Err(fmt_err(&file_path, "diffusers", format!(
                "{comp}.{module}: lora_A {:?} and lora_B {:?} are not a rank-r pair (A (r, in…), B (out, r…))",
                a.shape, b.shape
            )));
        }
        let rank = a.shape[0];
        let cfg = config_for(&file_path, &meta, comp)?;
        let alpha = match (parts.get("alpha"), &cfg) {
            (Some(t), _) => scalar(&*file, &t.name)?,
            (None, Some(c)) => c.alpha_for(module),
            (None, None) => rank as f64,
        };
        let rslora = cfg.as_ref().is_some_and(|c| c.use_rslora);
        let scale = match &cfg {
            Some(c) => c.scale(alpha, rank),
            None => alpha / rank as f64,
        };
        let layer = if a.shape.len() > 2 {
            LayerKind::Conv {
                kernel: a.shape[2..].to_vec(),
            }
        } else {
            LayerKind::Linear {
                fan_in_fan_out: false,
            }
        };
        let magnitude = match parts
            .get("lora_magnitude_vector")
            .or_else(|| parts.get("lora_magnitude_vector.weight"))
        {
            Some(m) => {
                let n = format!("{}.flat", m.name);
                mem.alias(&n, &m.name, vec![m.numel()]);
                Some(n)
            }
            None => None,
        };
        // transformers 5 saves CLIP without `text_model.`: accept either layout on either side.
        let module = &match base.and_then(|b| {
            if b.is_pipeline() {
                b.component(comp)
            } else {
                Some(&b.components[0].1)
            }
        }) {
            Some(n) if comp.starts_with("text_encoder") && !n.has(&format!("{module}.weight")) => {
                let alt = match module.strip_prefix("text_model.") {
                    Some(m) => m.to_string(),
                    None => format!("text_model.{module}"),
                };
                if n.has(&format!("{alt}.weight")) {
                    alt
                } else {
                    module.clone()
                }
            }
            _ => module.clone(),
        };
        let name = match base {
            None => format!("{comp}.{module}"),
            Some(b) if b.is_pipeline() => {
                if !b
                    .component(comp)
                    .is_some_and(|n| n.has(&format!("{module}.weight")))
                {
                    unresolved.push(format!("{comp}.{module}"));
                }
                format!("{comp}.{module}")
            }
            Some(b) => {
                let names = &b.components[0].1;
                if names.has(&format!("{module}.weight")) {
                    module.to_string()
                } else if names.has(&format!("{comp}.{module}.weight")) {
                    format!("{comp}.{module}")
                } else {
                    unresolved.push(format!("{comp}.{module}"));
                    module.to_string()
                }
            }
        };
        modules.push(ModuleAdapter {
            target: format!("{name}.weight"),
            module: name,
            family: Family::Lora,
            payload: Payload::LowRank(LowRank {
                layer,
                a: a.name.clone(),
                b: b.name.clone(),
                rank,
                alpha,
                rslora,
                scale,
                magnitude,
                singular_values: None,
            }),
        });
    }
    if let (Some(b), false) = (base, unresolved.is_empty()) {
        return Err(crate::base_names::unresolved(
            &file_path,
            "diffusers",
            &unresolved,
            &b.path,
        ));
    }
    let kept: std::collections::BTreeSet<&str> =
        modules.iter().flat_map(|m| m.payload.tensors()).collect();
    let tensor_names = modules
        .iter()
        .flat_map(|m| m.payload.tensors().into_iter().map(str::to_string))
        .chain(groups.values().filter_map(|p| {
            let a = p.get("alpha")?;
            let partner = p.get("lora_A.weight")?;
            kept.contains(partner.name.as_str()).then(|| a.name.clone())
        }))
        .collect();
    let mut notes = Vec::new();
    if left_out > 0 {
        notes.push(format!(
            "{left_out} module(s) of other components left out (--component)"
        ));
    }
    Ok(PeftAdapter {
        dir: file_path.clone(),
        config_json: json!({"format": "diffusers", "metadata": meta}),
        adapter: Adapter {
            path: file_path,
            format: "diffusers",
            method: "LORA".into(),
            family: Family::Lora,
            base_model: None,
            modules,
            tensors: Arc::new(mem),
            tensor_names,
            shared_tensors: Vec::new(),
            notes,
        },
    })
}

/// Write a diffusers LoRA file: PEFT keys under the component prefix, factors as stored, and per
/// component a LoraConfig (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_dora`,
/// `target_modules`) in `lora_adapter_metadata`, so every module keeps its exact scale. Modules
/// without a component prefix go under `unet.` unless `--arch transformer` says otherwise.
pub fn write(adapter: &Adapter, out: &Path, opts: &WriteOptions) -> Result<Written> {
    let mut notes = Vec::new();
    let out_file = if out.extension().is_some_and(|e| e == "safetensors") {
        out.to_path_buf()
    } else {
        std::fs::create_dir_all(out).map_err(|e| crate::error::Error::Io {
            path: out.to_path_buf(),
            source: e,
        })?;
        out.join(FILE_NAME)
    };
    if out_file.exists() && !opts.overwrite {
        return Err(fmt_err(
            &out_file,
            "diffusers",
            "exists; pass --force to replace it",
        ));
    }
    // Modules without a component: a transformer's (Flux, SD3: top-level `transformer_blocks`)
    // or a UNet's.
    let transformer_like = adapter.modules.iter().any(|m| {
        m.module.starts_with("transformer_blocks.")
            || m.module.starts_with("single_transformer_blocks.")
    });
    let default_comp = match opts.arch.as_deref() {
        Some(c) if COMPONENTS.contains(&c) => c.to_string(),
        _ if transformer_like => "transformer".to_string(),
        _ => "unet".to_string(),
    };
    let mut tensors = Vec::new();
    let mut per_comp: BTreeMap<String, Vec<(String, u64, f64, bool)>> = BTreeMap::new();
    let mut bare = 0;
    for m in &adapter.modules {
        let Payload::LowRank(lr) = &m.payload else {
            return Err(fmt_err(
                out,
                "diffusers",
                format!(
                    "module {}: diffusers LoRA files hold LoRA only; a {} update cannot be written",
                    m.module,
                    m.payload.kind()
                ),
            ));
        };
        if matches!(
            lr.layer,
            LayerKind::Embedding
                | LayerKind::Linear {
                    fan_in_fan_out: true
                }
        ) || lr.singular_values.is_some()
        {
            return Err(fmt_err(
                out,
                "diffusers",
                format!(
                    "module {}: {:?} LoRA has no diffusers form",
                    m.module, lr.layer
                ),
            ));
        }
        let (comp, module) = match COMPONENTS.iter().find_map(|c| {
            m.module
                .strip_prefix(&format!("{c}."))
                .map(|r| (c.to_string(), r.to_string()))
        }) {
            Some(x) => x,
            None => {
                bare += 1;
                (default_comp.clone(), m.module.clone())
            }
        };
        let key = format!("{comp}.{module}");
        for (n, role) in [(&lr.a, "lora_A.weight"), (&lr.b, "lora_B.weight")] {
            let (info, bytes) = raw_tensor(adapter.tensors.as_ref(), n)?;
            tensors.push((
                TensorSpec {
                    name: format!("{key}.{role}"),
                    dtype: info.dtype,
                    shape: info.shape,
                },
                bytes,
            ));
        }
        if let Some(mag) = &lr.magnitude {
            let (info, bytes) = raw_tensor(adapter.tensors.as_ref(), mag)?;
            tensors.push((
                TensorSpec {
                    name: format!("{key}.lora_magnitude_vector"),
                    dtype: info.dtype,
                    shape: vec![info.numel()],
                },
                bytes,
            ));
        }
        per_comp.entry(comp).or_default().push((
            module,
            lr.rank,
            lr.scale * lr.rank as f64,
            lr.magnitude.is_some(),
        ));
    }
    if bare > 0 {
        notes.push(format!(
            "{bare} module(s) without a component prefix written under {default_comp}."
        ));
    }
    let mut meta = Map::new();
    for (comp, mods) in &per_comp {
        let r = most_common(mods.iter().map(|m| m.1)).unwrap_or(0);
        let alpha = f64::from_bits(most_common(mods.iter().map(|m| m.2.to_bits())).unwrap_or(0));
        let mut rp = Map::new();
        let mut ap = Map::new();
        for (m, rk, a, _) in mods {
            if *rk != r {
                rp.insert(m.clone(), json!(rk));
            }
            if *a != alpha {
                ap.insert(m.clone(), json!(a));
            }
        }
        let fields = json!({
            "r": r, "lora_alpha": alpha, "rank_pattern": rp, "alpha_pattern": ap,
            "use_dora": mods.iter().any(|m| m.3), "use_rslora": false, "lora_bias": false,
            "target_modules": mods.iter().map(|m| m.0.clone()).collect::<Vec<_>>(),
        });
        for (k, v) in fields.as_object().expect("object") {
            meta.insert(format!("{comp}.{k}"), v.clone());
        }
    }
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let md = vec![
        ("format".to_string(), "pt".to_string()),
        (
            METADATA_KEY.to_string(),
            serde_json::to_string(&Value::Object(meta)).expect("json"),
        ),
    ];
    write_small(&out_file, &tensors, Some(&md))?;
    Ok(Written {
        files: vec![out_file],
        notes,
    })
}
