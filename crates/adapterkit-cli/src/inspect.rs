//! `adapterkit inspect`: what a file or directory is, for people and (with `--json`) machines.

use std::collections::BTreeMap;
use std::path::Path;

use adapterkit_core::ir::{LayerKind, Payload};
use adapterkit_core::TensorInfo;
use adapterkit_formats::convert;
use adapterkit_formats::gguf::GgufFile;
use adapterkit_formats::{peft, safetensors::SafetensorsFile, Checkpoint};
use anyhow::{Context, Result};
use serde_json::{json, Value};

/// `1234567` → `1.23 MB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn dtype_summary<'a>(
    tensors: impl Iterator<Item = &'a TensorInfo>,
) -> (BTreeMap<String, (u64, u64)>, u64, u64) {
    let mut by = BTreeMap::new();
    let (mut params, mut bytes) = (0, 0);
    for t in tensors {
        let e = by.entry(t.dtype.name().to_string()).or_insert((0u64, 0u64));
        e.0 += 1;
        e.1 += t.numel();
        params += t.numel();
        bytes += t.len;
    }
    (by, params, bytes)
}

fn is_adapter_dir(path: &Path) -> bool {
    if path.is_dir() {
        return peft::resolve_dir(path).is_ok() || convert::detect(path).is_ok();
    }
    if GgufFile::sniff(path) {
        return GgufFile::open(path).is_ok_and(|g| adapterkit_formats::gguf_lora::is_adapter(&g));
    }
    path.is_file() && convert::detect(path).is_ok()
}

/// A GGUF model: architecture, metadata and tensors by type.
fn describe_gguf(path: &Path) -> Result<Value> {
    let g = GgufFile::open(path)?;
    let mut types: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for t in g.tensors() {
        let e = types.entry(t.ggml_type.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.len;
    }
    Ok(json!({
        "kind": "model",
        "path": path,
        "format": "gguf",
        "gguf_version": g.version(),
        "architecture": g.get_str("general.architecture"),
        "name": g.get_str("general.name"),
        "metadata_count": g.metadata().len(),
        "alignment": g.alignment(),
        "tensor_count": g.tensors().len(),
        "parameters": g.tensors().iter().map(|t| t.numel()).sum::<u64>(),
        "size_bytes": g.tensors().iter().map(|t| t.len).sum::<u64>(),
        "ggml_types": types.iter().map(|(k, (n, b))| (k.clone(), json!({"tensors": n, "bytes": b}))).collect::<BTreeMap<_, _>>(),
    }))
}

/// Run `inspect` on `path`.
pub fn run(path: &Path, as_json: bool) -> Result<()> {
    let v = if is_adapter_dir(path) {
        describe_adapter(path)?
    } else if path.is_file() && GgufFile::sniff(path) {
        describe_gguf(path)?
    } else {
        describe_base(path)?
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_text(&v);
    }
    Ok(())
}

/// An AdapterHub composition setup: the block tree, its adapters and fusion layers.
fn describe_setup(path: &Path) -> Result<Value> {
    let s = adapterkit_formats::adapterhub::describe_setup(path)?;
    let mut notes = vec![format!("composition: {}", s.tree)];
    for (name, d) in &s.adapters {
        notes.push(format!(
            "adapter {name}: {}",
            d.parts
                .iter()
                .map(|p| p.kind.name())
                .collect::<Vec<_>>()
                .join("+")
        ));
    }
    for f in &s.fusions {
        notes.push(format!(
            "fusion layer {f} (attention over its adapters' outputs; not mergeable)"
        ));
    }
    Ok(json!({
        "kind": "adapter",
        "path": path,
        "format": "adapterhub",
        "peft_type": "composition setup",
        "composition": s.tree,
        "adapter_setup": s.json,
        "adapters": s.adapters.iter().map(|(n, d)| json!({"name": n, "parts": d.parts.iter().map(|p| p.kind.name()).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "fusions": s.fusions,
        "mergeable": false,
        "notes": notes,
    }))
}

/// An AdapterHub adapter: every part, mergeable or not, with its tensors.
fn describe_adapterhub(path: &Path) -> Result<Value> {
    if adapterkit_formats::adapterhub::is_setup(path) {
        return describe_setup(path);
    }
    let (d, file) = adapterkit_formats::adapterhub::describe(path)?;
    let (dtypes, params, bytes) = dtype_summary(file.tensors().iter());
    let parts: Vec<Value> = d
        .parts
        .iter()
        .map(|p| {
            json!({"part": p.kind.name(), "mergeable": p.kind.mergeable(),
                "why_not": (!p.kind.mergeable()).then(|| p.kind.why_not()),
                "tensors": p.tensors.len(), "config": p.config})
        })
        .collect();
    let notes: Vec<String> = d
        .parts
        .iter()
        .map(|p| {
            format!(
                "{} ({} tensors): {}",
                p.kind.name(),
                p.tensors.len(),
                if p.kind.mergeable() {
                    "mergeable".to_string()
                } else {
                    format!("not mergeable, {}", p.kind.why_not())
                }
            )
        })
        .collect();
    Ok(json!({
        "kind": "adapter",
        "path": path,
        "format": "adapterhub",
        "peft_type": d.parts.iter().map(|p| p.kind.name()).collect::<Vec<_>>().join("+"),
        "name": d.name,
        "model_class": d.model_class,
        "version": d.version,
        "base_model": d.config_json.get("model_name"),
        "mergeable": d.parts.iter().all(|p| p.kind.mergeable()),
        "parts": parts,
        "head": d.head,
        "notes": notes,
        "tensor_count": file.tensors().len(),
        "dtypes": dtypes,
        "parameters": params,
        "size_bytes": bytes,
    }))
}

fn describe_adapter(path: &Path) -> Result<Value> {
    let format = convert::detect(path)?;
    if format == convert::AdapterFormat::AdapterHub {
        return describe_adapterhub(path);
    }
    let (dir, opened) = if format == convert::AdapterFormat::Peft {
        let dir = peft::resolve_dir(path)?;
        let o = peft::open(&dir);
        (dir, o)
    } else {
        (path.to_path_buf(), convert::open(path, Some(format), None))
    };
    match opened {
        Ok(pa) => {
            let ad = &pa.adapter;
            let infos: Vec<TensorInfo> = if format == convert::AdapterFormat::Peft {
                SafetensorsFile::open(&ad.path)?.tensors().to_vec()
            } else {
                ad.tensor_names
                    .iter()
                    .filter_map(|n| ad.tensors.info(n).cloned())
                    .collect()
            };
            let (dtypes, params, bytes) = dtype_summary(infos.iter());
            let mut modules = Vec::new();
            let mut groups: BTreeMap<String, BTreeMap<&str, BTreeMap<String, u64>>> =
                BTreeMap::new();
            for m in &ad.modules {
                let mut entry =
                    json!({"module": m.module, "target": m.target, "kind": m.payload.kind()});
                let leaf = m.module.rsplit('.').next().unwrap_or(&m.module).to_string();
                let g = groups
                    .entry(format!("{leaf} ({})", m.payload.kind()))
                    .or_default();
                *g.entry("count")
                    .or_default()
                    .entry(String::new())
                    .or_default() += 1;
                if let Payload::LowRank(lr) = &m.payload {
                    let layer = match &lr.layer {
                        LayerKind::Linear {
                            fan_in_fan_out: false,
                        } => "linear".to_string(),
                        LayerKind::Linear {
                            fan_in_fan_out: true,
                        } => "linear (fan_in_fan_out)".to_string(),
                        LayerKind::Embedding => "embedding".to_string(),
                        LayerKind::Conv { kernel } => format!(
                            "conv {}",
                            kernel
                                .iter()
                                .map(|k| k.to_string())
                                .collect::<Vec<_>>()
                                .join("×")
                        ),
                    };
                    entry["layer"] = json!(layer);
                    entry["rank"] = json!(lr.rank);
                    entry["alpha"] = json!(lr.alpha);
                    entry["scale"] = json!(lr.scale);
                    entry["rslora"] = json!(lr.rslora);
                    entry["dora"] = json!(lr.magnitude.is_some());
                    *g.entry("rank")
                        .or_default()
                        .entry(lr.rank.to_string())
                        .or_default() += 1;
                    *g.entry("alpha")
                        .or_default()
                        .entry(lr.alpha.to_string())
                        .or_default() += 1;
                    *g.entry("scale")
                        .or_default()
                        .entry(format!("{:.4}", lr.scale))
                        .or_default() += 1;
                    *g.entry("layer").or_default().entry(layer).or_default() += 1;
                }
                modules.push(entry);
            }
            let group_json: BTreeMap<String, Value> = groups
                .into_iter()
                .map(|(k, g)| {
                    let mut o = serde_json::Map::new();
                    for (field, vals) in g {
                        if field == "count" {
                            o.insert("count".into(), json!(vals.values().sum::<u64>()));
                        } else {
                            o.insert(
                                field.to_string(),
                                json!(vals.keys().cloned().collect::<Vec<_>>()),
                            );
                        }
                    }
                    (k, Value::Object(o))
                })
                .collect();
            Ok(json!({
                "kind": "adapter",
                "path": dir,
                "format": ad.format,
                "peft_type": ad.method,
                "family": ad.family.name(),
                "base_model": ad.base_model,
                "task_type": pa.config_json.get("task_type"),
                "use_rslora": pa.config_json.get("use_rslora"),
                "use_dora": pa.config_json.get("use_dora"),
                "target_modules": pa.config_json.get("target_modules"),
                "modules_to_save": pa.config_json.get("modules_to_save"),
                "module_count": ad.modules.len(),
                "notes": ad.notes,
                "groups": group_json,
                "modules": modules,
                "tensor_count": infos.len(),
                "parameters": params,
                "size_bytes": bytes,
                "dtypes": dtypes.iter().map(|(k, (n, _))| (k.clone(), *n)).collect::<BTreeMap<_, _>>(),
            }))
        }
        Err(e @ adapterkit_formats::Error::UnsupportedPeftType { .. }) => {
            // Still say what it is: config and tensors, with the reason it cannot be read further.
            let cfg = adapterkit_formats::checkpoint::read_json(&dir.join("adapter_config.json"))?;
            let st = dir.join("adapter_model.safetensors");
            let (dtypes, params, bytes, count, tensors) = if st.is_file() {
                let f = SafetensorsFile::open(&st)?;
                let (d, p, b) = dtype_summary(f.tensors().iter());
                let t: BTreeMap<String, Value> = f
                    .tensors()
                    .iter()
                    .map(|t| (t.name.clone(), json!(t.shape)))
                    .collect();
                (d, p, b, f.tensors().len(), t)
            } else {
                (BTreeMap::new(), 0, 0, 0, BTreeMap::new())
            };
            Ok(json!({
                "kind": "adapter",
                "path": dir,
                "format": "peft",
                "peft_type": cfg.get("peft_type"),
                "base_model": cfg.get("base_model_name_or_path"),
                "task_type": cfg.get("task_type"),
                "num_virtual_tokens": cfg.get("num_virtual_tokens"),
                "token_dim": cfg.get("token_dim"),
                "num_layers": cfg.get("num_layers"),
                "num_attention_heads": cfg.get("num_attention_heads"),
                "num_transformer_submodules": cfg.get("num_transformer_submodules"),
                "adapter_len": cfg.get("adapter_len"),
                "adapter_layers": cfg.get("adapter_layers"),
                "tensors": tensors,
                "supported": false,
                "reason": e.to_string(),
                "tensor_count": count,
                "parameters": params,
                "size_bytes": bytes,
                "dtypes": dtypes.iter().map(|(k, (n, _))| (k.clone(), *n)).collect::<BTreeMap<_, _>>(),
            }))
        }
        Err(e) => Err(e).with_context(|| format!("reading adapter {}", dir.display())),
    }
}

fn describe_base(path: &Path) -> Result<Value> {
    let ck = Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (dtypes, params, bytes) = dtype_summary(ck.tensors());
    let looks_like_adapter = ck
        .tensors()
        .any(|t| t.name.contains(".lora_A.") || t.name.contains(".lora_embedding_A"));
    let layout = match ck.layout() {
        adapterkit_formats::checkpoint::Layout::File => "file".to_string(),
        adapterkit_formats::checkpoint::Layout::Directory => "directory".to_string(),
        adapterkit_formats::checkpoint::Layout::Sharded { index } => format!("sharded ({index})"),
    };
    Ok(json!({
        "kind": if looks_like_adapter { "safetensors (LoRA tensors without an adapter_config.json)" } else { "base" },
        "path": path,
        "format": "safetensors",
        "layout": layout,
        "architecture": ck.architecture(),
        "model_type": ck.config().and_then(|c| c.get("model_type")).cloned(),
        "shards": ck.shard_names(),
        "tensor_count": ck.len(),
        "parameters": params,
        "size_bytes": bytes,
        "dtypes": dtypes.iter().map(|(k, (n, p))| (k.clone(), json!({"tensors": n, "parameters": p}))).collect::<BTreeMap<_, _>>(),
        "metadata": ck.metadata().map(|m| m.iter().cloned().collect::<BTreeMap<_, _>>()),
        "other_files": ck.extra_files(),
        "not_carried_over": ck.skipped_files(),
    }))
}

fn print_text(v: &Value) {
    let s = |k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    };
    let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    println!("{}", s("path"));
    println!("  kind:        {}", s("kind"));
    println!("  format:      {}", s("format"));
    if s("kind") == "adapter" {
        println!("  peft_type:   {}", s("peft_type"));
        if let Some(r) = v.get("reason") {
            println!("  note:        {}", r.as_str().unwrap_or_default());
        }
        for (key, label) in [
            ("num_virtual_tokens", "tokens"),
            ("token_dim", "token dim"),
            ("num_layers", "layers"),
            ("adapter_len", "adapter len"),
        ] {
            if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
                println!("  {:<13}{x}", format!("{label}:"));
            }
        }
        println!("  base model:  {}", s("base_model"));
        if let Some(Value::Array(notes)) = v.get("notes") {
            for n in notes {
                println!("  note:        {}", n.as_str().unwrap_or_default());
            }
        }
        if v.get("module_count").is_some() {
            println!("  modules:     {}", num("module_count"));
            if let Some(Value::Object(groups)) = v.get("groups") {
                for (name, g) in groups {
                    let field = |f: &str| {
                        g.get(f).and_then(Value::as_array).map(|a| {
                            a.iter()
                                .map(|x| x.as_str().unwrap_or_default().to_string())
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                    };
                    let mut line = format!(
                        "    {name:<28} ×{}",
                        g.get("count").and_then(Value::as_u64).unwrap_or(0)
                    );
                    for f in ["layer", "rank", "alpha", "scale"] {
                        if let Some(x) = field(f) {
                            line.push_str(&format!("  {f} {x}"));
                        }
                    }
                    println!("{line}");
                }
            }
        }
    } else {
        println!("  layout:      {}", s("layout"));
        println!("  arch:        {}", s("architecture"));
        println!("  tensors:     {}", num("tensor_count"));
    }
    println!("  parameters:  {}", num("parameters"));
    println!("  size:        {}", human_bytes(num("size_bytes")));
    if let Some(Value::Object(d)) = v.get("dtypes") {
        let parts: Vec<String> = d
            .iter()
            .map(|(k, x)| match x {
                Value::Object(o) => format!(
                    "{k} ×{}",
                    o.get("tensors").and_then(Value::as_u64).unwrap_or(0)
                ),
                other => format!("{k} ×{other}"),
            })
            .collect();
        println!("  dtypes:      {}", parts.join(", "));
    }
}
