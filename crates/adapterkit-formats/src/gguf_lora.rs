//! llama.cpp GGUF LoRA adapters, as `convert_lora_to_gguf.py` writes them and llama.cpp reads
//! them (spec: `formats/gguf.md`).
//!
//! - KV: `general.architecture` (the base's), `general.type = "adapter"`, `adapter.type = "lora"`,
//!   `adapter.lora.alpha` (F32). llama.cpp applies `scale · alpha / rank` with `rank = lora_b.ne[0]`
//!   (`scale` alone when alpha is 0).
//! - Tensors `<gguf module>.weight.lora_a` (`A (r, in)`, ne `[in, r]`) and `.lora_b` (`B (out, r)`),
//!   named through the architecture's HF → GGUF table (`data/gguf_tensor_map.tsv`).
//! - `token_embd`'s `lora_a` is stored transposed (`(vocab, r)`: llama.cpp gathers its rows).
//! - Llama-family `attn_q`/`attn_k`: `lora_b`'s rows carry the rotary permute convert_hf_to_gguf
//!   applies to the base's q/k weights.
//!
//! One alpha holds for the whole file, so a module whose scale differs (rank/alpha patterns,
//! rsLoRA, DoRA's direction) gets the ratio baked into `B`; llama.cpp's own converter drops it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use adapterkit_core::ir::{Adapter, Family, LayerKind, LowRank, ModuleAdapter, Payload};
use adapterkit_core::DType;
use serde_json::{json, Value};

use crate::base_names::BaseNames;
use crate::convert::{factors, fmt_err, WriteOptions, Written};
use crate::error::Result;
use crate::gguf::{self, GgmlType, GgufFile, GgufSpec, Value as GValue};
use crate::memory::{transpose_f32, MemorySource};
use crate::peft::PeftAdapter;

const TABLE: &str = include_str!("../data/gguf_tensor_map.tsv");

/// One architecture's naming.
#[derive(Debug, Clone)]
pub struct ArchMap {
    /// llama.cpp's architecture name.
    pub arch: String,
    /// The HF `architectures` entries that convert to it.
    pub hf: Vec<String>,
    /// Whether q/k rows carry the Llama rotary permute.
    pub permute_qk: bool,
    /// `(gguf pattern, hf pattern)`.
    pub names: Vec<(String, String)>,
}

/// Every architecture in the table.
pub fn arch_maps() -> Vec<ArchMap> {
    let mut maps: Vec<ArchMap> = Vec::new();
    for line in TABLE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        if f[0] == "arch" {
            maps.push(ArchMap {
                arch: f[1].to_string(),
                hf: f[2].split(',').map(str::to_string).collect(),
                permute_qk: f[3] == "permute_qk",
                names: Vec::new(),
            });
        } else if let Some(m) = maps.iter_mut().find(|m| m.arch == f[0]) {
            m.names.push((f[1].to_string(), f[2].to_string()));
        }
    }
    maps
}

fn subst(from: &str, to: &str, name: &str) -> Option<String> {
    match from.split_once("{}") {
        None => (from == name).then(|| to.to_string()),
        Some((pre, post)) => {
            let mid = name.strip_prefix(pre)?.strip_suffix(post)?;
            (!mid.is_empty() && mid.bytes().all(|b| b.is_ascii_digit()))
                .then(|| to.replace("{}", mid))
        }
    }
}

impl ArchMap {
    /// The map for llama.cpp architecture `arch`.
    pub fn for_arch(arch: &str) -> Option<Self> {
        arch_maps().into_iter().find(|m| m.arch == arch)
    }

    /// The map for an HF `architectures` entry.
    pub fn for_hf(hf: &str) -> Option<Self> {
        arch_maps()
            .into_iter()
            .find(|m| m.hf.iter().any(|h| h == hf))
    }

    /// HF module → GGUF module.
    pub fn to_gguf(&self, hf: &str) -> Option<String> {
        self.names.iter().find_map(|(g, h)| subst(h, g, hf))
    }

    /// GGUF module → HF module.
    pub fn to_hf(&self, g: &str) -> Option<String> {
        self.names.iter().find_map(|(gp, h)| subst(gp, h, g))
    }
}

/// Rows of a q/k projection under convert_hf_to_gguf's Llama permute: HF row `(h, half, j)` (a
/// head, which half of the rotary pair, index in the half) lands at `(h, j, half)`. Returns, for
/// every GGUF row, the HF row it holds.
pub fn permute_rows(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = Vec::with_capacity(rows);
    for h in 0..n_head {
        for j in 0..half {
            for s in 0..2 {
                out.push(h * hd + s * half + j);
            }
        }
    }
    out
}

/// The rows of `v` (`rows` of them) in GGUF order: row `g` is HF row `permute_rows(…)[g]`.
pub fn permute(v: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let w = v.len() / rows.max(1);
    let mut out = vec![0f32; v.len()];
    for (g, &h) in permute_rows(rows, n_head).iter().enumerate() {
        out[g * w..(g + 1) * w].copy_from_slice(&v[h * w..(h + 1) * w]);
    }
    out
}

/// The inverse of [`permute`]: GGUF rows back in HF order.
pub fn unpermute(v: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let w = v.len() / rows.max(1);
    let mut out = vec![0f32; v.len()];
    for (g, &h) in permute_rows(rows, n_head).iter().enumerate() {
        out[h * w..(h + 1) * w].copy_from_slice(&v[g * w..(g + 1) * w]);
    }
    out
}

/// Head counts from an HF config: `(n_head, n_head_kv)`.
fn heads(cfg: &Value) -> Option<(usize, usize)> {
    let n = cfg.get("num_attention_heads")?.as_u64()? as usize;
    let kv = cfg
        .get("num_key_value_heads")
        .and_then(Value::as_u64)
        .map_or(n, |v| v as usize);
    Some((n, kv))
}

fn dequantize(file: &GgufFile, t: &gguf::GgufTensor) -> Result<Vec<f32>> {
    let mut raw = vec![0u8; t.len as usize];
    file.read_raw(&t.name, 0, &mut raw)?;
    crate::quants::dequantize(t.ggml_type, &raw, t.numel() as usize).ok_or_else(|| {
        fmt_err(
            file.path(),
            "gguf",
            format!(
                "tensor {}: {} tensors cannot be read by this version",
                t.name, t.ggml_type
            ),
        )
    })
}

/// Open a GGUF LoRA adapter. Module names stay GGUF's (`blk.0.attn_q`) unless `base` is a
/// Hugging Face checkpoint, when they are mapped to its names and the q/k permute is undone.
pub fn open(path: &Path, base: Option<&BaseNames>) -> Result<PeftAdapter> {
    let file = Arc::new(GgufFile::open(path)?);
    let err = |m: String| fmt_err(path, "gguf", m);
    if let Some(t) = file.get_str("general.type") {
        if t != "adapter" {
            return Err(err(format!("general.type is {t:?}: a model, not an adapter (a GGUF model is a base for merge, not an adapter)")));
        }
    }
    match file.get_str("adapter.type") {
        Some("lora") => {}
        Some(other) => return Err(err(format!("adapter.type is {other:?}; only \"lora\" adapters are supported (control vectors are not weights)"))),
        None => return Err(err("no adapter.type key: not a GGUF adapter".into())),
    }
    let alpha = match file.get("adapter.lora.alpha") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| err(format!("adapter.lora.alpha is {v}, not a number")))?,
    };
    let arch = file.get_str("general.architecture").map(str::to_string);
    let hf_base = base.filter(|b| !b.is_pipeline() && b.config.is_some());
    let map = match (&arch, hf_base) {
        (Some(a), Some(_)) => Some(ArchMap::for_arch(a).ok_or_else(|| err(format!("architecture {a:?} is not in adapterkit's GGUF name table; it can be merged into a GGUF base, but not mapped to Hugging Face names")))?),
        _ => None,
    };
    let mut pairs: BTreeMap<String, (Option<&gguf::GgufTensor>, Option<&gguf::GgufTensor>)> =
        BTreeMap::new();
    let mut notes = Vec::new();
    for t in file.tensors() {
        if let Some(m) = t.name.strip_suffix(".lora_a") {
            pairs.entry(m.to_string()).or_default().0 = Some(t);
        } else if let Some(m) = t.name.strip_suffix(".lora_b") {
            pairs.entry(m.to_string()).or_default().1 = Some(t);
        } else if t.name.contains("_norm") {
            notes.push(format!("{}: a plain norm tensor in a LoRA adapter (mergekit-extract-lora writes them); llama.cpp discards it, and so does adapterkit", t.name));
        } else {
            return Err(err(format!(
                "tensor {}: neither .lora_a nor .lora_b",
                t.name
            )));
        }
    }
    let mut mem = MemorySource::new();
    let mut modules = Vec::new();
    for (target, (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(err(format!(
                "{target}: lora_a and lora_b must both be present"
            )));
        };
        if a.ne.len() != 2 || b.ne.len() != 2 {
            return Err(err(format!(
                "{target}: lora tensors must be 2-D (found ne {:?} and {:?})",
                a.ne, b.ne
            )));
        }
        let Some(gmod) = target.strip_suffix(".weight") else {
            return Err(err(format!("{target}: adapted tensors end in .weight")));
        };
        let rank = b.ne[0];
        let emb = gmod == "token_embd";
        let mut av = dequantize(&file, a)?;
        let mut bv = dequantize(&file, b)?;
        let (mut a_shape, b_shape) = (a.shape(), b.shape());
        if emb {
            // Stored (vocab, r); the IR's embedding A is (r, vocab).
            av = transpose_f32(&av, a_shape[0] as usize, a_shape[1] as usize);
            a_shape = vec![a_shape[1], a_shape[0]];
        } else if a_shape[0] != rank {
            return Err(err(format!(
                "{target}: lora_a ne {:?} and lora_b ne {:?} do not share a rank",
                a.ne, b.ne
            )));
        }
        let module = match (&map, hf_base) {
            (Some(map), Some(base)) => {
                let hf = map.to_hf(gmod).ok_or_else(|| {
                    err(format!(
                        "{gmod}: no Hugging Face name for it in the {} table",
                        map.arch
                    ))
                })?;
                let is_q = gmod.ends_with(".attn_q");
                let is_k = gmod.ends_with(".attn_k");
                if map.permute_qk && (is_q || is_k) {
                    let cfg = base.config.as_ref().expect("filtered");
                    let (n, kv) = heads(cfg).ok_or_else(|| err(format!("{gmod}: undoing llama.cpp's q/k permute needs num_attention_heads in the base's config.json")))?;
                    let rows = b_shape[0] as usize;
                    bv = unpermute(&bv, rows, if is_q { n } else { kv });
                }
                hf
            }
            _ => gmod.to_string(),
        };
        let dt = |t: &gguf::GgufTensor| {
            t.ggml_type
                .dtype()
                .filter(|d| d.is_writable_float())
                .unwrap_or(DType::F32)
        };
        let an = format!("{module}.lora_A");
        let bn = format!("{module}.lora_B");
        mem.insert_f32(&an, dt(a), a_shape, &av)?;
        mem.insert_f32(&bn, dt(b), b_shape, &bv)?;
        let scale = if alpha == 0.0 {
            1.0
        } else {
            alpha / rank as f64
        };
        modules.push(ModuleAdapter {
            target: format!("{module}.weight"),
            module,
            family: Family::Lora,
            payload: Payload::LowRank(LowRank {
                layer: if emb {
                    LayerKind::Embedding
                } else {
                    LayerKind::Linear {
                        fan_in_fan_out: false,
                    }
                },
                a: an,
                b: bn,
                rank,
                alpha: if alpha == 0.0 { rank as f64 } else { alpha },
                rslora: false,
                scale,
                magnitude: None,
                singular_values: None,
            }),
        });
    }
    let tensor_names = mem.names().map(str::to_string).collect();
    let meta: serde_json::Map<String, Value> = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.to_json()))
        .collect();
    Ok(PeftAdapter {
        dir: path.to_path_buf(),
        config_json: json!({"format": "gguf", "metadata": meta}),
        adapter: Adapter {
            path: path.to_path_buf(),
            format: "gguf",
            method: "LORA".into(),
            family: Family::Lora,
            base_model: file.get_str("general.name").map(str::to_string),
            modules,
            tensors: Arc::new(mem),
            tensor_names,
            shared_tensors: Vec::new(),
            notes,
        },
    })
}

/// Write a GGUF LoRA adapter the way `convert_lora_to_gguf.py` does (F32 tensors, names through
/// the table, `token_embd.lora_a` transposed, the q/k permute on `lora_b`), with every module's
/// own scale kept: `adapter.lora.alpha` is the most common `scale·rank`, and a module whose scale
/// differs has the ratio baked into its `lora_b`.
pub fn write(adapter: &Adapter, out: &Path, opts: &WriteOptions) -> Result<Written> {
    let err = |m: String| fmt_err(out, "gguf", m);
    if out.exists() && !opts.overwrite {
        return Err(err("exists; pass --force to replace it".into()));
    }
    let base = opts.base.as_ref();
    let hf_arch = base.and_then(|b| b.architecture.clone());
    let map = match (&opts.arch, &hf_arch) {
        (Some(a), _) => ArchMap::for_arch(a).or_else(|| ArchMap::for_hf(a)),
        (None, Some(h)) => ArchMap::for_hf(h).or_else(|| ArchMap::for_arch(h)),
        (None, None) => None,
    }
    .ok_or_else(|| err(format!(
        "the GGUF architecture is unknown ({}); pass --base (the Hugging Face model, whose config.json names it) or --arch (one of {})",
        opts.arch.clone().or(hf_arch.clone()).unwrap_or_else(|| "none given".into()),
        arch_maps().iter().map(|m| m.arch.clone()).collect::<Vec<_>>().join(", ")
    )))?;
    let head_counts = base.and_then(|b| b.config.as_ref()).and_then(heads);
    let mut notes = Vec::new();
    let mut fs = Vec::new();
    for m in &adapter.modules {
        // PEFT's saved copy of a targeted embedding/head (`*.base_layer.weight`): the base's own
        // weights unless the vocabulary was changed. convert_lora_to_gguf drops it silently; we
        // drop it only after checking it equals the base.
        if let Payload::Replace { tensor } = &m.payload {
            if tensor.contains(".base_layer.") {
                saved_layer_unchanged(adapter, m, tensor, base, out)?;
                notes.push(format!("{}: PEFT's saved copy of the base layer equals the base; not written (llama.cpp adapters hold LoRA only)", m.target));
                continue;
            }
        }
        let Payload::LowRank(lr) = &m.payload else {
            return Err(err(format!(
                "module {}: llama.cpp's adapters hold LoRA factors only; its {} cannot be written into one (merge the adapter into the model instead)",
                m.module,
                describe(m)
            )));
        };
        if lr.magnitude.is_some() {
            return Err(err(format!("module {}: llama.cpp has no DoRA; its magnitude would be lost (merge the adapter, or convert the merged model)", m.module)));
        }
        if let LayerKind::Conv { .. }
        | LayerKind::Linear {
            fan_in_fan_out: true,
        } = lr.layer
        {
            return Err(err(format!(
                "module {}: {:?} layers have no GGUF LoRA form",
                m.module, lr.layer
            )));
        }
        fs.push((m, lr.clone()));
    }
    let alpha = crate::convert::most_common(
        fs.iter()
            .map(|(_, lr)| (lr.scale * lr.rank as f64).to_bits()),
    )
    .map_or(0.0, f64::from_bits);
    let alpha32 = alpha as f32;
    let mut tensors: Vec<(GgufSpec, Vec<u8>)> = Vec::new();
    let mut baked = 0;
    for (m, lr) in &fs {
        let gmod =
            if m.module.starts_with("blk.") || m.module == "token_embd" || m.module == "output" {
                m.module.clone()
            } else {
                map.to_gguf(&m.module).ok_or_else(|| {
                    err(format!(
                        "module {}: no GGUF name in the {} table",
                        m.module, map.arch
                    ))
                })?
            };
        // llama.cpp's scale is alpha/rank with the file's (f32) alpha: bake what differs.
        let applied = f64::from(alpha32) / lr.rank as f64;
        let mut f = factors(
            adapter,
            m,
            &LowRank {
                scale: 1.0,
                ..lr.clone()
            },
        )?;
        let ratio = lr.scale / applied;
        if ratio != 1.0 {
            baked += 1;
            f.b.iter_mut()
                .for_each(|x| *x = (f64::from(*x) * ratio) as f32);
        }
        let is_q = gmod.ends_with(".attn_q");
        let is_k = gmod.ends_with(".attn_k");
        if map.permute_qk && (is_q || is_k) && !m.module.starts_with("blk.") {
            let (n, kv) = head_counts.ok_or_else(|| err(format!("module {}: the Llama q/k permute needs the head counts; pass --base (the Hugging Face model)", m.module)))?;
            let rows = f.b_shape[0] as usize;
            f.b = permute(&f.b, rows, if is_q { n } else { kv });
        }
        let mut a_shape = f.a_shape.clone();
        if matches!(lr.layer, LayerKind::Embedding) {
            f.a = transpose_f32(&f.a, a_shape[0] as usize, a_shape[1] as usize);
            a_shape = vec![a_shape[1], a_shape[0]];
        }
        let enc = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        tensors.push((
            GgufSpec::from_shape(format!("{gmod}.weight.lora_a"), &a_shape, GgmlType::F32),
            enc(&f.a),
        ));
        tensors.push((
            GgufSpec::from_shape(format!("{gmod}.weight.lora_b"), &f.b_shape, GgmlType::F32),
            enc(&f.b),
        ));
    }
    if baked > 0 {
        notes.push(format!("{baked} module(s) have a scale other than adapter.lora.alpha/rank ({alpha}/r): the ratio is baked into their lora_b so llama.cpp applies them right"));
    }
    let metadata = vec![
        (
            "general.architecture".to_string(),
            GValue::String(map.arch.clone()),
        ),
        ("general.type".to_string(), GValue::String("adapter".into())),
        ("adapter.type".to_string(), GValue::String("lora".into())),
        ("adapter.lora.alpha".to_string(), GValue::F32(alpha32)),
    ];
    gguf::write_small(out, &metadata, &tensors)?;
    Ok(Written {
        files: vec![out.to_path_buf()],
        notes,
    })
}

/// Rename an adapter's modules (Hugging Face names, from any format) to the GGUF model's names
/// for merging into it, permuting Llama q/k `B` rows as convert_hf_to_gguf permuted the weights.
/// Modules already named as GGUF tensors are left alone.
pub fn to_gguf_names(adapter: &mut Adapter, arch: &str, base: &BaseNames) -> Result<()> {
    let names = &base.components[0].1;
    if adapter.modules.iter().all(|m| names.has(&m.target)) {
        return Ok(());
    }
    let map = ArchMap::for_arch(arch).ok_or_else(|| fmt_err(&adapter.path, "gguf", format!("the GGUF base's architecture {arch:?} is not in adapterkit's name table; only adapters named as its GGUF tensors can be merged into it")))?;
    let n_head = base_u64(base, &format!("{arch}.attention.head_count"));
    let n_kv = base_u64(base, &format!("{arch}.attention.head_count_kv")).or(n_head);
    let mut mem = MemorySource::over(adapter.tensors.clone());
    let mut modules = Vec::new();
    for m in &adapter.modules {
        let mut m = m.clone();
        if !names.has(&m.target) {
            let g = map.to_gguf(&m.module).ok_or_else(|| {
                fmt_err(
                    &adapter.path,
                    "gguf",
                    format!("module {}: no GGUF name in the {arch} table", m.module),
                )
            })?;
            let is_q = g.ends_with(".attn_q");
            let is_k = g.ends_with(".attn_k");
            if let Payload::LowRank(lr) = &mut m.payload {
                if map.permute_qk && (is_q || is_k) {
                    let heads = if is_q { n_head } else { n_kv }.ok_or_else(|| fmt_err(&adapter.path, "gguf", format!("{g}: the base has no {arch}.attention.head_count for the q/k permute")))?;
                    let (bv, shape, dtype) = crate::convert::read(adapter, &lr.b)?;
                    let p = permute(&bv, shape[0] as usize, heads as usize);
                    let name = format!("{}.gguf_permuted", lr.b);
                    mem.insert_f32(
                        &name,
                        if dtype.is_writable_float() {
                            dtype
                        } else {
                            DType::F32
                        },
                        shape,
                        &p,
                    )?;
                    lr.b = name;
                    // DoRA's magnitude is one value per output row: its rows move too.
                    if let Some(mag) = &lr.magnitude {
                        let (mv, mshape, mdt) = crate::convert::read(adapter, mag)?;
                        let pm = permute(&mv, mv.len(), heads as usize);
                        let name = format!("{mag}.gguf_permuted");
                        let mdt = if mdt.is_writable_float() {
                            mdt
                        } else {
                            DType::F32
                        };
                        mem.insert_f32(&name, mdt, mshape, &pm)?;
                        lr.magnitude = Some(name);
                    }
                }
            } else if map.permute_qk && (is_q || is_k) {
                // A bias update, full difference or replacement: its rows move like the weight's.
                let heads = if is_q { n_head } else { n_kv }.ok_or_else(|| {
                    fmt_err(
                        &adapter.path,
                        "gguf",
                        format!(
                            "{g}: the base has no {arch}.attention.head_count for the q/k permute"
                        ),
                    )
                })?;
                let tensor = match &mut m.payload {
                    Payload::Add { tensor, .. } | Payload::Replace { tensor } => tensor,
                    other => return Err(fmt_err(&adapter.path, "gguf", format!("module {}: a {} update cannot be carried through llama.cpp's q/k permute", m.module, other.kind()))),
                };
                let (v, shape, dtype) = crate::convert::read(adapter, tensor)?;
                let rows = shape.first().copied().unwrap_or(1) as usize;
                let p = permute(&v, rows, heads as usize);
                let name = format!("{tensor}.gguf_permuted");
                mem.insert_f32(
                    &name,
                    if dtype.is_writable_float() {
                        dtype
                    } else {
                        DType::F32
                    },
                    shape,
                    &p,
                )?;
                *tensor = name;
            }
            let suffix = m
                .target
                .strip_prefix(&m.module)
                .unwrap_or(".weight")
                .to_string();
            m.target = format!("{g}{suffix}");
            m.module = g;
        }
        modules.push(m);
    }
    let mut names_used: Vec<String> = adapter.tensor_names.clone();
    names_used.extend(mem.names().map(str::to_string));
    // Permuted copies replace their originals.
    let replaced: std::collections::HashSet<String> = mem
        .names()
        .filter_map(|n| n.strip_suffix(".gguf_permuted"))
        .map(str::to_string)
        .collect();
    names_used.retain(|n| !replaced.contains(n));
    adapter.modules = modules;
    adapter.tensor_names = names_used;
    adapter.tensors = Arc::new(mem);
    Ok(())
}

fn base_u64(base: &BaseNames, key: &str) -> Option<u64> {
    let f = GgufFile::open(&base.path).ok()?;
    f.get(key)?.as_u64()
}

/// Check a saved layer copy against the base: equal, or an error naming what would be lost.
fn saved_layer_unchanged(
    adapter: &Adapter,
    m: &ModuleAdapter,
    tensor: &str,
    base: Option<&BaseNames>,
    out: &Path,
) -> Result<()> {
    let err = |msg: String| fmt_err(out, "gguf", msg);
    let base = base.ok_or_else(|| err(format!("{}: PEFT saved a copy of this layer; pass --base so it can be checked against the base (a changed vocabulary cannot go into a llama.cpp adapter)", m.target)))?;
    let ck = crate::checkpoint::Checkpoint::open(&base.path)?;
    use adapterkit_core::TensorSource as _;
    let theirs = ck
        .read_f32(&m.target)
        .map_err(|e| err(format!("{}: {e}", m.target)))?;
    let ours = adapter.tensors.read_f32(tensor)?;
    if theirs != ours {
        return Err(err(format!("{}: PEFT's saved copy differs from the base (a resized or retrained embedding); a llama.cpp adapter cannot carry it — merge the adapter instead", m.target)));
    }
    Ok(())
}

/// What a module's update is, in words, for messages.
fn describe(m: &ModuleAdapter) -> String {
    match &m.payload {
        Payload::Add { .. } if m.target.ends_with(".bias") => "bias update (lora_B.bias)".into(),
        Payload::Add { .. } => "full weight difference".into(),
        Payload::Replace { .. } => "replacement tensor (modules_to_save)".into(),
        p => format!("{} update", p.kind()),
    }
}

/// Whether a GGUF file is an adapter (vs a model).
pub fn is_adapter(file: &GgufFile) -> bool {
    file.get_str("general.type") == Some("adapter") || file.get("adapter.type").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_maps_both_ways() {
        let m = ArchMap::for_hf("LlamaForCausalLM").unwrap();
        assert_eq!(
            m.to_gguf("model.layers.11.self_attn.q_proj").as_deref(),
            Some("blk.11.attn_q")
        );
        assert_eq!(
            m.to_hf("blk.3.ffn_down").as_deref(),
            Some("model.layers.3.mlp.down_proj")
        );
        assert!(m.permute_qk);
        assert!(!ArchMap::for_arch("qwen2").unwrap().permute_qk);
    }

    #[test]
    fn permute_matches_convert_hf_to_gguf() {
        // reshape(n_head, 2, hd/2).swapaxes(1, 2): head 0 with hd 4 → rows 0, 2, 1, 3.
        assert_eq!(permute_rows(8, 2), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }
}
