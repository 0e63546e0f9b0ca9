//! mlx-lm adapters: `adapters.safetensors` + `adapter_config.json` (spec: `formats/mlx.md`).
//!
//! Keys are `<module>.lora_a` `(in, r)`, `.lora_b` `(r, out)` and DoRA's `.m` `(out,)`; the
//! update is `scale · (lora_a·lora_b)ᵀ` with one absolute `scale` and one `rank` for the whole
//! adapter. For an embedding, `lora_a` is `(vocab, r)` and `lora_b` `(r, dim)`: the same
//! transposes give PEFT's `lora_embedding_A`/`B`. Which modules are adapted is read from the
//! tensors, not from `num_layers`/`keys` (mlx-lm matches `keys` both per block and as full paths).
//! `fine_tune_type: full` adapters are replacement tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapterkit_core::ir::{Adapter, Family, LayerKind, LowRank, ModuleAdapter, Payload};
use adapterkit_core::{DType, TensorInfo, TensorSource};
use serde_json::{json, Value};

use crate::base_names::BaseNames;
use crate::checkpoint::read_json;
use crate::error::{Error, Result};
use crate::memory::MemorySource;
use crate::peft::PeftAdapter;
use crate::safetensors::{write_small, SafetensorsFile, TensorSpec};

fn err(path: &Path, message: impl Into<String>) -> Error {
    crate::convert::fmt_err(path, "mlx", message)
}

/// Whether `dir` is an mlx-lm adapter directory.
pub fn sniff(dir: &Path) -> bool {
    dir.join("adapters.safetensors").is_file() && dir.join("adapter_config.json").is_file()
}

/// A 2-D tensor's bytes transposed (any element size).
pub fn transpose_bytes(src: &dyn TensorSource, t: &TensorInfo) -> Result<Vec<u8>> {
    let (rows, cols) = (t.shape[0] as usize, t.shape[1] as usize);
    let mut b = vec![0u8; t.len as usize];
    src.read_bytes(&t.name, 0, &mut b)?;
    let es = b.len() / (rows * cols).max(1);
    let mut out = vec![0u8; b.len()];
    for r in 0..rows {
        for c in 0..cols {
            let from = (r * cols + c) * es;
            let to = (c * rows + r) * es;
            out[to..to + es].copy_from_slice(&b[from..from + es]);
        }
    }
    Ok(out)
}

fn is_embedding(module: &str, a: &TensorInfo, base: Option<&BaseNames>) -> bool {
    if let Some(shape) = base
        .and_then(|b| b.components.first())
        .and_then(|(_, m)| m.shape(&format!("{module}.weight")))
    {
        // An embedding (vocab, dim) has lora_a (vocab, r); a linear (out, in) has lora_a (in, r).
        return shape.len() == 2 && shape[0] == a.shape[0] && shape[1] != a.shape[0]
            || module.ends_with("embed_tokens") && shape[0] == a.shape[0];
    }
    module.ends_with("embed_tokens") || module.ends_with("wte") || module.ends_with("embeddings")
}

/// Open an mlx-lm adapter directory.
pub fn open(dir: &Path, base: Option<&BaseNames>) -> Result<PeftAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg = read_json(&cfg_path)?;
    let st = dir.join("adapters.safetensors");
    let file = Arc::new(SafetensorsFile::open_mapped(&st)?);
    let kind = cfg
        .get("fine_tune_type")
        .and_then(Value::as_str)
        .unwrap_or("lora")
        .to_string();
    let mut mem = MemorySource::over(file.clone());
    let mut modules = Vec::new();
    if kind == "full" {
        for t in file.tensors() {
            let module = t
                .name
                .rsplit_once('.')
                .map_or(String::new(), |(m, _)| m.to_string());
            modules.push(ModuleAdapter {
                module,
                target: t.name.clone(),
                family: Family::Full,
                payload: Payload::Replace {
                    tensor: t.name.clone(),
                },
            });
        }
    } else {
        let params = cfg.get("lora_parameters").ok_or_else(|| {
            err(
                &cfg_path,
                "lora_parameters is missing (mlx-lm needs rank and scale)",
            )
        })?;
        let scale = params.get("scale").and_then(Value::as_f64).ok_or_else(|| {
            err(
                &cfg_path,
                "lora_parameters.scale is missing or not a number",
            )
        })?;
        let rank = params
            .get("rank")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| {
                err(
                    &cfg_path,
                    "lora_parameters.rank is missing or not a positive integer",
                )
            })?;
        let mut groups: BTreeMap<&str, BTreeMap<&str, &TensorInfo>> = BTreeMap::new();
        for t in file.tensors() {
            let Some((m, role)) = t.name.rsplit_once('.') else {
                return Err(err(
                    &st,
                    format!("tensor {:?} has no .lora_a/.lora_b/.m suffix", t.name),
                ));
            };
            if !matches!(role, "lora_a" | "lora_b" | "m") {
                return Err(err(
                    &st,
                    format!(
                        "tensor {:?}: suffix .{role} is not lora_a, lora_b or m",
                        t.name
                    ),
                ));
            }
            if t.shape.len() != 2 && role != "m" {
                return Err(err(&st, format!("tensor {:?}: shape {:?}, expected 2-D (mlx-lm's MoE switch layers are not supported)", t.name, t.shape)));
            }
            groups.entry(m).or_default().insert(role, t);
        }
        let dora = kind == "dora";
        for (module, parts) in groups {
            let (Some(a), Some(b)) = (parts.get("lora_a"), parts.get("lora_b")) else {
                return Err(err(
                    &st,
                    format!("module {module}: lora_a and lora_b must both be present"),
                ));
            };
            if a.shape[1] != rank || b.shape[0] != rank {
                return Err(err(&st, format!(
                    "module {module}: lora_a {:?} and lora_b {:?} do not have the configured rank {rank}",
                    a.shape, b.shape
                )));
            }
            let emb = is_embedding(module, a, base);
            let magnitude = match (parts.get("m"), dora) {
                (Some(_), true) if emb => {
                    return Err(err(&st, format!("module {module}: mlx-lm's DoRA on an embedding normalises per vocabulary row, which PEFT's DoRA (per embedding column) cannot express; refusing rather than changing its meaning")))
                }
                (Some(m), true) => Some(m.name.clone()),
                (None, true) => return Err(err(&st, format!("module {module}: DoRA adapter without .m"))),
                (Some(m), false) => {
                    return Err(err(&st, format!("tensor {:?}: a DoRA magnitude in an adapter whose fine_tune_type is {kind}", m.name)))
                }
                (None, false) => None,
            };
            let an = format!("{module}.lora_A");
            let bn = format!("{module}.lora_B");
            mem.insert(
                &an,
                a.dtype,
                vec![a.shape[1], a.shape[0]],
                transpose_bytes(&*file, a)?,
            );
            mem.insert(
                &bn,
                b.dtype,
                vec![b.shape[1], b.shape[0]],
                transpose_bytes(&*file, b)?,
            );
            let layer = if emb {
                LayerKind::Embedding
            } else {
                LayerKind::Linear {
                    fan_in_fan_out: false,
                }
            };
            modules.push(ModuleAdapter {
                module: module.to_string(),
                target: format!("{module}.weight"),
                family: Family::Lora,
                payload: Payload::LowRank(LowRank {
                    layer,
                    a: an,
                    b: bn,
                    rank,
                    alpha: scale * rank as f64,
                    rslora: false,
                    scale,
                    magnitude,
                    singular_values: None,
                }),
            });
        }
    }
    let tensor_names = modules
        .iter()
        .flat_map(|m| m.payload.tensors().into_iter().map(str::to_string))
        .collect();
    let family = if kind == "full" {
        Family::Full
    } else {
        Family::Lora
    };
    Ok(PeftAdapter {
        dir: dir.to_path_buf(),
        config_json: cfg.clone(),
        adapter: Adapter {
            path: st,
            format: "mlx",
            method: kind.to_uppercase(),
            family,
            base_model: cfg.get("model").and_then(Value::as_str).map(str::to_string),
            modules,
            tensors: Arc::new(mem),
            tensor_names,
            shared_tensors: Vec::new(),
            notes: Vec::new(),
        },
    })
}

/// One module's LoRA in the IR's orientation, ready for a writer: `A (r, in)`, `B (out, r)`
/// with the module's scale baked into `B`, as f32.
#[derive(Debug, Clone)]
pub struct Factors {
    /// Module path.
    pub module: String,
    /// Layer kind.
    pub layer: LayerKind,
    /// `A`, row-major.
    pub a: Vec<f32>,
    /// `A`'s shape.
    pub a_shape: Vec<u64>,
    /// `B·scale`, row-major.
    pub b: Vec<f32>,
    /// `B`'s shape.
    pub b_shape: Vec<u64>,
    /// Rank.
    pub rank: u64,
    /// DoRA magnitude, when present.
    pub magnitude: Option<Vec<f32>>,
    /// The dtype the factors were stored in.
    pub dtype: DType,
}

/// Write `factors` as an mlx-lm adapter directory: one rank (the largest; smaller ones are padded
/// with zeros, which changes nothing) and the one `scale` the file declares (what each module's
/// `B` does not already carry).
pub fn write(
    out: &Path,
    factors: &[Factors],
    scale: f64,
    base_model: Option<&str>,
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    let rank = factors.iter().map(|f| f.rank).max().unwrap_or(0);
    let dora = factors.iter().any(|f| f.magnitude.is_some());
    if dora && factors.iter().any(|f| f.magnitude.is_none()) {
        return Err(err(out, "mlx-lm's DoRA is all-or-nothing (fine_tune_type dora); this adapter mixes DoRA and plain LoRA modules"));
    }
    let mut tensors = Vec::new();
    let mut keys = std::collections::BTreeSet::new();
    let mut max_layer: Option<u64> = None;
    for f in factors {
        if !matches!(
            f.layer,
            LayerKind::Linear {
                fan_in_fan_out: false
            } | LayerKind::Embedding
        ) {
            return Err(err(
                out,
                format!(
                    "module {}: mlx-lm adapts linear and embedding layers only ({:?})",
                    f.module, f.layer
                ),
            ));
        }
        if matches!(f.layer, LayerKind::Embedding) && f.magnitude.is_some() {
            return Err(err(out, format!("module {}: PEFT's DoRA on an embedding has no mlx-lm equivalent (mlx-lm normalises per vocabulary row)", f.module)));
        }
        let (r, inp) = (f.a_shape[0] as usize, f.a_shape[1] as usize);
        let outd = f.b_shape[0] as usize;
        let rk = rank as usize;
        // lora_a = Aᵀ padded: (in, rank); lora_b = Bᵀ padded: (rank, out).
        let mut la = vec![0f32; inp * rk];
        for p in 0..r {
            for i in 0..inp {
                la[i * rk + p] = f.a[p * inp + i];
            }
        }
        let mut lb = vec![0f32; rk * outd];
        for o in 0..outd {
            for p in 0..r {
                lb[p * outd + o] = f.b[o * r + p];
            }
        }
        let dt = if f.dtype.is_writable_float() {
            f.dtype
        } else {
            DType::F32
        };
        let enc = |v: &[f32]| -> Result<Vec<u8>> {
            let mut b = vec![0u8; dt.byte_len(v.len() as u64).unwrap_or(0) as usize];
            adapterkit_core::convert::encode_from_f32(dt, v, &mut b)?;
            Ok(b)
        };
        tensors.push((
            TensorSpec {
                name: format!("{}.lora_a", f.module),
                dtype: dt,
                shape: vec![inp as u64, rank],
            },
            enc(&la)?,
        ));
        tensors.push((
            TensorSpec {
                name: format!("{}.lora_b", f.module),
                dtype: dt,
                shape: vec![rank, outd as u64],
            },
            enc(&lb)?,
        ));
        if let Some(m) = &f.magnitude {
            tensors.push((
                TensorSpec {
                    name: format!("{}.m", f.module),
                    dtype: dt,
                    shape: vec![m.len() as u64],
                },
                enc(m)?,
            ));
        }
        match layer_of(&f.module) {
            Some((i, rel)) => {
                keys.insert(rel.to_string());
                max_layer = Some(max_layer.map_or(i, |m: u64| m.max(i)));
            }
            None => {
                keys.insert(f.module.clone());
            }
        }
    }
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    if out.exists() && !overwrite {
        return Err(err(out, "exists; pass --force to replace it"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let st = out.join("adapters.safetensors");
    write_small(&st, &tensors, None)?;
    // num_layers = -1 adapts every block (mlx-lm: layers[-max(n, 0):]); blocks without tensors
    // keep lora_b = 0 and stay unchanged.
    let cfg = json!({
        "fine_tune_type": if dora { "dora" } else { "lora" },
        "num_layers": if max_layer.is_some() { -1 } else { 0 },
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys.into_iter().collect::<Vec<_>>()},
        "model": base_model,
    });
    let cfg_path = out.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&cfg).expect("json");
    let tmp = out.join(".adapter_config.json.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    Ok(vec![st, cfg_path])
}

/// `model.layers.3.self_attn.q_proj` → `(3, "self_attn.q_proj")`.
fn layer_of(module: &str) -> Option<(u64, &str)> {
    let (_, after) = module.split_once(".layers.")?;
    let (i, rel) = after.split_once('.')?;
    Some((i.parse().ok()?, rel))
}
