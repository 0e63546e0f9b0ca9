//! One entry point for every adapter format: detection from content, opening into the IR, and
//! writing the IR out as PEFT, kohya, LyCORIS, diffusers, GGUF or MLX.
//!
//! Writers keep factors byte for byte where the target can hold the source's scale (kohya's
//! `alpha`, PEFT's `lora_alpha`/patterns). Where it cannot (MLX's one scale, diffusers' files
//! without metadata, GGUF's one alpha), the module's scale is baked into `B` and a note says so.
//! What a target cannot represent at all is refused with the module and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use adapterkit_core::ir::{
    Adapter, Family, KronFactor, LayerKind, LowRank, ModuleAdapter, Payload, ScaleAxis,
};
use adapterkit_core::DType;
use serde_json::{json, Map, Value};

use crate::adapter_writer::AdapterWriter;
use crate::base_names::{flatten, BaseNames};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::memory::raw_tensor;
use crate::mlx::Factors;
use crate::peft::PeftAdapter;
use crate::safetensors::{write_small, SafetensorsFile, TensorSpec};
use crate::{diffusers, gguf_lora, kohya, mlx, peft};

/// The adapter formats adapterkit reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdapterFormat {
    /// Hugging Face PEFT directories.
    Peft,
    /// kohya-ss sd-scripts LoRA files.
    Kohya,
    /// LyCORIS files (kohya-style or `lycoris_` names).
    Lycoris,
    /// diffusers' `pytorch_lora_weights.safetensors`.
    Diffusers,
    /// llama.cpp GGUF LoRA adapters.
    Gguf,
    /// mlx-lm adapter directories.
    Mlx,
    /// AdapterHub `adapters` library directories.
    AdapterHub,
    /// Sparse weight differences (adapterkit's layout, LT-SFT's transcribed).
    Sparse,
}

impl AdapterFormat {
    /// Every format.
    pub const ALL: [AdapterFormat; 8] = [
        AdapterFormat::Peft,
        AdapterFormat::Kohya,
        AdapterFormat::Lycoris,
        AdapterFormat::Diffusers,
        AdapterFormat::Gguf,
        AdapterFormat::Mlx,
        AdapterFormat::AdapterHub,
        AdapterFormat::Sparse,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            AdapterFormat::Peft => "peft",
            AdapterFormat::Kohya => "kohya",
            AdapterFormat::Lycoris => "lycoris",
            AdapterFormat::Diffusers => "diffusers",
            AdapterFormat::Gguf => "gguf",
            AdapterFormat::Mlx => "mlx",
            AdapterFormat::AdapterHub => "adapterhub",
            AdapterFormat::Sparse => "sparse",
        }
    }

    /// The format named `s`.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == s)
    }
}

impl fmt::Display for AdapterFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decide the format of `path` from its content: a GGUF magic, an mlx-lm or PEFT directory, or a
/// safetensors file whose keys are kohya/LyCORIS or diffusers keys.
pub fn detect(path: &Path) -> Result<AdapterFormat> {
    if path.is_dir() {
        if mlx::sniff(path) {
            return Ok(AdapterFormat::Mlx);
        }
        if crate::adapterhub::sniff(path) || crate::adapterhub::is_setup(path) {
            return Ok(AdapterFormat::AdapterHub);
        }
        if path.join("adapter_config.json").is_file()
            || path.join("adapter_model.safetensors").is_file()
            || path.join("adapter_model.bin").is_file()
            || peft::resolve_dir(path).is_ok()
        {
            return Ok(AdapterFormat::Peft);
        }
        let d = path.join(diffusers::FILE_NAME);
        if d.is_file() {
            return Ok(AdapterFormat::Diffusers);
        }
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            message: format!("not a PEFT adapter directory (no adapter_config.json), nor an mlx-lm one (adapters.safetensors + adapter_config.json) or a diffusers one ({})", diffusers::FILE_NAME),
        });
    }
    if !path.is_file() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            message: "no such file or directory".into(),
        });
    }
    if GgufFile::sniff(path) {
        return Ok(AdapterFormat::Gguf);
    }
    let file = SafetensorsFile::open(path)?;
    if crate::sparse::sniff(&file) {
        return Ok(AdapterFormat::Sparse);
    }
    if let Some(f) = kohya::sniff(&file) {
        return Ok(if f == "lycoris" {
            AdapterFormat::Lycoris
        } else {
            AdapterFormat::Kohya
        });
    }
    if diffusers::sniff(&file) {
        return Ok(AdapterFormat::Diffusers);
    }
    Err(Error::Format {
        path: path.to_path_buf(),
        format: "adapter",
        message: "a safetensors file whose keys are neither kohya/LyCORIS (<prefix>_<module>.lora_down.weight, …) nor diffusers (unet./transformer./text_encoder.<module>.lora_A.weight); pass --from to say which format it is".into(),
    })
}

/// Open `path` as `from` (detected when `None`), resolving flattened or foreign names against
/// `base` where the format needs it.
pub fn open(
    path: &Path,
    from: Option<AdapterFormat>,
    base: Option<&BaseNames>,
) -> Result<PeftAdapter> {
    let f = match from {
        Some(f) => f,
        None => detect(path)?,
    };
    match f {
        AdapterFormat::Peft => peft::open(path),
        AdapterFormat::Kohya | AdapterFormat::Lycoris => kohya::open(path, base),
        AdapterFormat::Diffusers => diffusers::open(path, base),
        AdapterFormat::Gguf => gguf_lora::open(path, base),
        AdapterFormat::Mlx => mlx::open(path, base),
        AdapterFormat::AdapterHub => crate::adapterhub::open(path),
        AdapterFormat::Sparse => crate::sparse::open(path),
    }
}

/// Options for writing.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Replace an existing output.
    pub overwrite: bool,
    /// The base's names (GGUF needs the architecture and head counts; kohya maps names back).
    pub base: Option<BaseNames>,
    /// The architecture, when the base does not say (GGUF).
    pub arch: Option<String>,
}

/// What a writer did.
#[derive(Debug, Clone, Default)]
pub struct Written {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// What was baked or changed on the way, for stderr.
    pub notes: Vec<String>,
}

/// Write `adapter` in format `to` at `out`.
pub fn write(
    adapter: &Adapter,
    to: AdapterFormat,
    out: &Path,
    opts: &WriteOptions,
) -> Result<Written> {
    match to {
        AdapterFormat::Sparse => Err(fmt_err(
            out,
            "sparse",
            "sparse differences are written by `extract --sparse` from a fine-tune",
        )),
        AdapterFormat::AdapterHub => {
            crate::adapterhub::write(adapter, out, opts.base.as_ref(), opts.overwrite)
        }
        AdapterFormat::Peft => write_peft(adapter, out, opts),
        AdapterFormat::Kohya | AdapterFormat::Lycoris => kohya_write(adapter, to, out, opts),
        AdapterFormat::Diffusers => {
            check_names(adapter, out, "diffusers")?;
            diffusers::write(adapter, out, opts)
        }

        AdapterFormat::Gguf => {
            check_names(adapter, out, "gguf")?;
            gguf_lora::write(adapter, out, opts)
        }
        AdapterFormat::Mlx => {
            check_names(adapter, out, "mlx")?;
            let mut notes = Vec::new();
            all_factors(adapter, "mlx", out, &mut notes)?;
            // One scale for the file: the modules' own when they share one (factors copied as
            // they are), else 1 with every module's scale baked into lora_b.
            let scales: std::collections::BTreeSet<u64> = adapter
                .modules
                .iter()
                .filter_map(|m| match &m.payload {
                    Payload::LowRank(lr) => Some(lr.scale.to_bits()),
                    _ => None,
                })
                .collect();
            let common = match scales.len() {
                1 => f64::from_bits(*scales.iter().next().expect("one")),
                _ => {
                    notes.push("mlx-lm has one scale per adapter: each module's scale is baked into lora_b and scale is written as 1.0".into());
                    1.0
                }
            };
            let mut fs = Vec::new();
            for m in &adapter.modules {
                if let Payload::LowRank(lr) = &m.payload {
                    let ratio = if common == 1.0 {
                        lr.scale
                    } else {
                        lr.scale / common
                    };
                    fs.push(factors(
                        adapter,
                        m,
                        &LowRank {
                            scale: ratio,
                            ..lr.clone()
                        },
                    )?);
                }
            }
            let ranks: std::collections::BTreeSet<u64> = fs.iter().map(|f| f.rank).collect();
            if ranks.len() > 1 {
                notes.push(format!(
                    "mlx-lm has one rank per adapter: ranks {ranks:?} padded with zeros to {}",
                    ranks.last().copied().unwrap_or(0)
                ));
            }
            let files = mlx::write(
                out,
                &fs,
                common,
                adapter.base_model.as_deref(),
                opts.overwrite,
            )?;
            Ok(Written { files, notes })
        }
    }
}

pub(crate) fn fmt_err(path: &Path, format: &'static str, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        format,
        message: message.into(),
    }
}

/// Read a tensor of the adapter as f32.
pub(crate) fn read(adapter: &Adapter, name: &str) -> Result<(Vec<f32>, Vec<u64>, DType)> {
    let info = adapter
        .tensors
        .info(name)
        .ok_or_else(|| adapterkit_core::Error::TensorNotFound {
            name: name.to_string(),
        })?
        .clone();
    Ok((adapter.tensors.read_f32(name)?, info.shape, info.dtype))
}

/// One LoRA module as f32 factors with its scale baked into `B` (AdaLoRA's `E` folded into `A`).
pub fn factors(adapter: &Adapter, m: &ModuleAdapter, lr: &LowRank) -> Result<Factors> {
    let (mut a, a_shape, dtype) = read(adapter, &lr.a)?;
    let (mut b, b_shape, _) = read(adapter, &lr.b)?;
    if let Some(e) = &lr.singular_values {
        let (e, _, _) = read(adapter, e)?;
        let cols = a.len() / e.len().max(1);
        for (p, row) in a.chunks_mut(cols).enumerate() {
            row.iter_mut().for_each(|x| *x *= e[p]);
        }
    }
    let s = lr.scale as f32;
    b.iter_mut().for_each(|x| *x *= s);
    let magnitude = match &lr.magnitude {
        Some(n) => Some(read(adapter, n)?.0),
        None => None,
    };
    Ok(Factors {
        module: m.module.clone(),
        layer: lr.layer.clone(),
        a,
        a_shape,
        b,
        b_shape,
        rank: lr.rank,
        magnitude,
        dtype,
    })
}

/// Every module's factors, refusing what is not a LoRA (naming the module and family).
pub(crate) fn all_factors(
    adapter: &Adapter,
    target: &'static str,
    out: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<Factors>> {
    let _ = notes;
    let mut fs = Vec::new();
    let mut refused = Vec::new();
    for m in &adapter.modules {
        match &m.payload {
            Payload::LowRank(lr) => fs.push(factors(adapter, m, lr)?),
            p => refused.push(format!("{} ({})", m.module, p.kind())),
        }
    }
    if !refused.is_empty() {
        return Err(fmt_err(out, target, format!(
            "holds LoRA modules only; {} module(s) of other kinds cannot be written without losing them: {}",
            refused.len(),
            refused.join(", ")
        )));
    }
    Ok(fs)
}

/// The most frequent value (the smallest among equally frequent ones).
pub(crate) fn most_common<T: Ord + Clone>(v: impl IntoIterator<Item = T>) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for x in v {
        *counts.entry(x).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(k, _)| k)
}

/// A float for JSON that prints integers as integers (`8`, not `8.0`).
fn num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

fn copy(adapter: &Adapter, from: &str, to: &str, w: &mut AdapterWriter) -> Result<()> {
    let (info, bytes) = raw_tensor(adapter.tensors.as_ref(), from)?;
    w.add(to, info.dtype, info.shape, &bytes)
}

fn copy_shaped(
    adapter: &Adapter,
    from: &str,
    to: &str,
    shape: Vec<u64>,
    w: &mut AdapterWriter,
) -> Result<()> {
    let (info, bytes) = raw_tensor(adapter.tensors.as_ref(), from)?;
    w.add(to, info.dtype, shape, &bytes)
}

/// Names for PEFT: a pipeline's `unet.x` has no PEFT form as one adapter.
fn check_names(adapter: &Adapter, out: &Path, to: &'static str) -> Result<()> {
    if let Some(m) = adapter
        .modules
        .iter()
        .find(|m| kohya::split_prefix(&m.module).is_some() && !m.module.contains('.'))
    {
        return Err(fmt_err(out, to, format!(
            "module {} still has its flattened kohya name; pass --base (the model it was trained on) so names can be resolved against the base's real module names",
            m.module
        )));
    }
    Ok(())
}

/// Write a PEFT adapter directory: LoRA (incl. DoRA, conv, embedding), LoHa, LoKr or IA3.
/// Tensors are copied as stored; scales go to `lora_alpha`/`alpha` and the patterns.
pub fn write_peft(adapter: &Adapter, out: &Path, opts: &WriteOptions) -> Result<Written> {
    check_names(adapter, out, "peft")?;
    let mut notes = Vec::new();
    let fams: std::collections::BTreeSet<Family> =
        adapter.modules.iter().map(|m| m.family).collect();
    if fams.len() != 1 {
        return Err(fmt_err(
            out,
            "peft",
            format!(
                "a PEFT adapter has one type; this one mixes {}",
                fams.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let family = *fams.iter().next().expect("one");
    let mut w = AdapterWriter::create(out, opts.overwrite)?;
    let key = |m: &str| format!("base_model.model.{m}");
    let mut ranks: BTreeMap<String, u64> = BTreeMap::new();
    let mut alphas: BTreeMap<String, f64> = BTreeMap::new();
    let mut targets = Vec::new();
    let mut ff_modules = Vec::new();
    let mut dora = false;
    let mut fan_in_fan_out = false;
    let peft_type;
    match family {
        Family::Lora | Family::AdaLora => {
            peft_type = "LORA";
            for m in &adapter.modules {
                let Payload::LowRank(lr) = &m.payload else {
                    return Err(fmt_err(
                        out,
                        "peft",
                        format!(
                            "module {}: a {} payload in a LoRA adapter has no PEFT LoRA form",
                            m.module,
                            m.payload.kind()
                        ),
                    ));
                };
                if m.target != format!("{}.weight", m.module) {
                    return Err(fmt_err(
                        out,
                        "peft",
                        format!(
                            "module {}: a LoRA on {} (not the module's weight)",
                            m.module, m.target
                        ),
                    ));
                }
                let k = key(&m.module);
                if let Some(e) = &lr.singular_values {
                    let _ = e;
                    let f = factors(
                        adapter,
                        m,
                        &LowRank {
                            scale: 1.0,
                            ..lr.clone()
                        },
                    )?;
                    w.add_f32(
                        &format!("{k}.lora_A.weight"),
                        f.dtype,
                        f.a_shape.clone(),
                        &f.a,
                    )?;
                    copy(adapter, &lr.b, &format!("{k}.lora_B.weight"), &mut w)?;
                } else {
                    match lr.layer {
                        LayerKind::Embedding => {
                            copy(adapter, &lr.a, &format!("{k}.lora_embedding_A"), &mut w)?;
                            copy(adapter, &lr.b, &format!("{k}.lora_embedding_B"), &mut w)?;
                        }
                        _ => {
                            copy(adapter, &lr.a, &format!("{k}.lora_A.weight"), &mut w)?;
                            copy(adapter, &lr.b, &format!("{k}.lora_B.weight"), &mut w)?;
                        }
                    }
                }
                if let LayerKind::Linear {
                    fan_in_fan_out: true,
                } = lr.layer
                {
                    fan_in_fan_out = true;
                }
                if let Some(mag) = &lr.magnitude {
                    dora = true;
                    copy(adapter, mag, &format!("{k}.lora_magnitude_vector"), &mut w)?;
                }
                ranks.insert(m.module.clone(), lr.rank);
                alphas.insert(m.module.clone(), lr.scale * lr.rank as f64);
                targets.push(m.module.clone());
            }
            if dora
                && adapter
                    .modules
                    .iter()
                    .any(|m| matches!(&m.payload, Payload::LowRank(lr) if lr.magnitude.is_none()))
            {
                return Err(fmt_err(
                    out,
                    "peft",
                    "PEFT's use_dora is global; this adapter mixes DoRA and plain LoRA modules",
                ));
            }
        }
        Family::Loha => {
            peft_type = "LOHA";
            for m in &adapter.modules {
                let Payload::Hadamard(h) = &m.payload else {
                    unreachable!("family checked")
                };
                let k = key(&m.module);
                for (n, role) in [
                    (&h.w1a, "hada_w1_a"),
                    (&h.w1b, "hada_w1_b"),
                    (&h.w2a, "hada_w2_a"),
                    (&h.w2b, "hada_w2_b"),
                ] {
                    copy(adapter, n, &format!("{k}.{role}"), &mut w)?;
                }
                if let Some((t1, t2)) = &h.cp {
                    copy(adapter, t1, &format!("{k}.hada_t1"), &mut w)?;
                    copy(adapter, t2, &format!("{k}.hada_t2"), &mut w)?;
                }
                ranks.insert(m.module.clone(), h.rank);
                alphas.insert(m.module.clone(), h.scale * h.rank as f64);
                targets.push(m.module.clone());
            }
        }
        Family::Lokr => {
            peft_type = "LOKR";
            for m in &adapter.modules {
                let Payload::Kronecker(kr) = &m.payload else {
                    unreachable!("family checked")
                };
                let k = key(&m.module);
                for (f, i) in [(&kr.w1, 1), (&kr.w2, 2)] {
                    match f {
                        KronFactor::Full(n) => copy(adapter, n, &format!("{k}.lokr_w{i}"), &mut w)?,
                        KronFactor::Product { a, b } => {
                            copy(adapter, a, &format!("{k}.lokr_w{i}_a"), &mut w)?;
                            copy(adapter, b, &format!("{k}.lokr_w{i}_b"), &mut w)?;
                        }
                        KronFactor::Tucker { t, a, b } => {
                            copy(adapter, t, &format!("{k}.lokr_t{i}"), &mut w)?;
                            copy(adapter, a, &format!("{k}.lokr_w{i}_a"), &mut w)?;
                            copy(adapter, b, &format!("{k}.lokr_w{i}_b"), &mut w)?;
                        }
                    }
                }
                ranks.insert(m.module.clone(), kr.rank);
                alphas.insert(m.module.clone(), kr.scale * kr.rank as f64);
                targets.push(m.module.clone());
            }
        }
        Family::Ia3 => {
            peft_type = "IA3";
            for m in &adapter.modules {
                let Payload::Scale {
                    tensor, axis, bias, ..
                } = &m.payload
                else {
                    unreachable!("family checked")
                };
                let has_bias = opts.base.as_ref().map(|b| {
                    b.components
                        .iter()
                        .any(|(_, n)| n.has(&format!("{}.bias", m.module)))
                });
                if !*bias && *axis == ScaleAxis::Output && has_bias != Some(false) {
                    return Err(fmt_err(out, "peft", format!(
                        "module {}: this scaling leaves the bias alone (LyCORIS IA3), but PEFT's IA3 on outputs also scales the bias; {}",
                        m.module,
                        if has_bias.is_some() { "the layer has a bias, so converting would change it" } else { "pass --base so layers without a bias can be converted" }
                    )));
                }
                let info = adapter
                    .tensors
                    .info(tensor)
                    .ok_or_else(|| adapterkit_core::Error::TensorNotFound {
                        name: tensor.clone(),
                    })?
                    .clone();
                // PEFT stores ia3_l as (out, 1) for output scaling and (1, in) for input scaling.
                let shape = match axis {
                    ScaleAxis::Output => vec![info.numel(), 1],
                    ScaleAxis::Input => {
                        ff_modules.push(m.module.clone());
                        vec![1, info.numel()]
                    }
                };
                copy_shaped(
                    adapter,
                    tensor,
                    &format!("{}.ia3_l", key(&m.module)),
                    shape,
                    &mut w,
                )?;
                targets.push(m.module.clone());
            }
        }
        other => {
            return Err(fmt_err(
                out,
                "peft",
                format!("writing {other} adapters as PEFT is not supported by this version"),
            ));
        }
    }
    let r = most_common(ranks.values().copied()).unwrap_or(0);
    let alpha_bits = most_common(alphas.values().map(|a| a.to_bits())).unwrap_or(0);
    let alpha = f64::from_bits(alpha_bits);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for (m, rk) in &ranks {
        if *rk != r {
            rank_pattern.insert(m.clone(), json!(rk));
        }
        if alphas[m] != alpha {
            alpha_pattern.insert(m.clone(), num(alphas[m]));
        }
    }
    if !alpha_pattern.is_empty() {
        notes.push(format!(
            "{} module(s) carry their own alpha in alpha_pattern",
            alpha_pattern.len()
        ));
    }
    let mut cfg = json!({
        "base_model_name_or_path": adapter.base_model,
        "inference_mode": true,
        "peft_type": peft_type,
        "target_modules": targets,
        "task_type": null,
        "revision": null,
        "modules_to_save": null,
        "fan_in_fan_out": fan_in_fan_out,
        "layers_to_transform": null,
        "layers_pattern": null,
    });
    let o = cfg.as_object_mut().expect("object");
    match peft_type {
        "LORA" => {
            o.insert("r".into(), json!(r));
            o.insert("lora_alpha".into(), num(alpha));
            o.insert("rank_pattern".into(), Value::Object(rank_pattern));
            o.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
            o.insert("use_dora".into(), json!(dora));
            o.insert("use_rslora".into(), json!(false));
            o.insert("lora_dropout".into(), json!(0.0));
            o.insert("bias".into(), json!("none"));
            o.insert("lora_bias".into(), json!(false));
            o.insert("init_lora_weights".into(), json!(true));
        }
        "LOHA" | "LOKR" => {
            o.insert("r".into(), json!(r));
            o.insert("alpha".into(), num(alpha));
            o.insert("rank_pattern".into(), Value::Object(rank_pattern));
            o.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
            o.insert("rank_dropout".into(), json!(0.0));
            o.insert("module_dropout".into(), json!(0.0));
            o.insert("init_weights".into(), json!(true));
            let conv = adapter.modules.iter().any(|m| matches!(&m.payload, Payload::Hadamard(h) if h.cp.is_some()) || matches!(&m.payload, Payload::Kronecker(k) if matches!(k.w2, KronFactor::Tucker{..})));
            o.insert("use_effective_conv2d".into(), json!(conv));
            if peft_type == "LOKR" {
                let decompose_both = adapter.modules.iter().any(|m| matches!(&m.payload, Payload::Kronecker(k) if matches!(k.w1, KronFactor::Product{..})));
                o.insert("decompose_both".into(), json!(decompose_both));
                o.insert("decompose_factor".into(), json!(-1));
            }
        }
        _ => {
            o.insert("feedforward_modules".into(), json!(ff_modules));
            o.insert("init_ia3_weights".into(), json!(true));
        }
    }
    let files = w.finish(&cfg)?;
    Ok(Written { files, notes })
}

/// kohya's prefix for an IR module name; `(prefix, path)`.
fn kohya_name(module: &str, lycoris: bool, sdxl: bool) -> (String, String) {
    let comps = [
        ("unet.", "lora_unet_"),
        ("transformer.", "lora_unet_"),
        ("text_encoder_2.", "lora_te2_"),
        ("text_encoder_3.", "lora_te3_"),
        ("text_encoder.", if sdxl { "lora_te1_" } else { "lora_te_" }),
    ];
    for (c, p) in comps {
        if let Some(rest) = module.strip_prefix(c) {
            return (p.to_string(), rest.to_string());
        }
    }
    if kohya::split_prefix(module).is_some() && !module.contains('.') {
        return (String::new(), module.to_string());
    }
    (
        if lycoris { "lycoris_" } else { "lora_unet_" }.to_string(),
        module.to_string(),
    )
}

fn scalar_tensor(v: f64) -> (DType, Vec<u64>, Vec<u8>) {
    (DType::F32, vec![], (v as f32).to_le_bytes().to_vec())
}

/// Write a kohya (LoRA) or LyCORIS (every family it has) file.
fn kohya_write(
    adapter: &Adapter,
    to: AdapterFormat,
    out: &Path,
    opts: &WriteOptions,
) -> Result<Written> {
    let lycoris = to == AdapterFormat::Lycoris;
    let fmt = if lycoris { "lycoris" } else { "kohya" };
    let mut notes = Vec::new();
    let sdxl = adapter
        .modules
        .iter()
        .any(|m| m.module.starts_with("text_encoder_2."));
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    let raw = |name: &str| -> Result<(DType, Vec<u64>, Vec<u8>)> {
        let (info, b) = raw_tensor(adapter.tensors.as_ref(), name)?;
        Ok((info.dtype, info.shape, b))
    };
    let mut push = |name: String, (dtype, shape, bytes): (DType, Vec<u64>, Vec<u8>)| {
        tensors.push((TensorSpec { name, dtype, shape }, bytes));
    };
    let mut dims = Vec::new();
    let mut alphas = Vec::new();
    let mut algo = "lora";
    // Flux: diffusers' separate projections fuse back into BFL's qkv / linear1. Only for Flux (an
    // adapter or base with single_transformer_blocks): SD3 shares the double-block names.
    let is_flux = adapter.modules.iter().any(|m| {
        m.module
            .starts_with("transformer.single_transformer_blocks.")
    }) || opts.base.as_ref().is_some_and(|b| {
        b.components.iter().any(|(_, n)| {
            n.tensors
                .iter()
                .any(|(t, _)| t.starts_with("single_transformer_blocks."))
        })
    });
    let flux_module = |m: &str| {
        m.strip_prefix("transformer.")
            .filter(|_| is_flux)
            .map(str::to_string)
    };
    let mut fused: BTreeMap<String, Vec<(usize, usize, &ModuleAdapter)>> = BTreeMap::new();
    for m in &adapter.modules {
        if let Some(rest) = flux_module(&m.module).as_deref() {
            if let Some((flat, k, n)) = crate::flux::fused_for(rest) {
                if n > 1 || rest.starts_with("norm_out") {
                    fused.entry(flat).or_default().push((k, n, m));
                    continue;
                }
            }
        }
        let (prefix, path) = kohya_name(&m.module, lycoris, sdxl);
        let path = match flux_module(&m.module)
            .as_deref()
            .and_then(crate::flux::fused_for)
        {
            Some((flat, _, _)) => flat,
            None => path,
        };
        let name = format!("{prefix}{}", flatten(&path));
        let bias = m.target.ends_with(".bias");
        match &m.payload {
            Payload::LowRank(lr) => {
                if !matches!(
                    lr.layer,
                    LayerKind::Linear {
                        fan_in_fan_out: false
                    } | LayerKind::Conv { .. }
                ) {
                    return Err(fmt_err(out, fmt, format!("module {}: kohya/LyCORIS LoRA covers linear and conv layers ({:?} is not)", m.module, lr.layer)));
                }
                let a = if lr.singular_values.is_some() {
                    let f = factors(
                        adapter,
                        m,
                        &LowRank {
                            scale: 1.0,
                            ..lr.clone()
                        },
                    )?;
                    let mut b = vec![0u8; f.a.len() * 4];
                    adapterkit_core::convert::encode_from_f32(DType::F32, &f.a, &mut b)?;
                    (DType::F32, f.a_shape, b)
                } else {
                    raw(&lr.a)?
                };
                push(format!("{name}.lora_down.weight"), a);
                let mut b = raw(&lr.b)?;
                if let LayerKind::Conv { kernel } = &lr.layer {
                    if b.1.len() == 2 {
                        b.1.extend(kernel.iter().map(|_| 1));
                    }
                }
                push(format!("{name}.lora_up.weight"), b);
                let alpha = lr.scale * lr.rank as f64;
                push(format!("{name}.alpha"), scalar_tensor(alpha));
                dims.push(lr.rank);
                alphas.push(alpha);
                if let Some(mag) = &lr.magnitude {
                    if !lycoris {
                        return Err(fmt_err(out, fmt, format!("module {}: kohya's LoRA has no DoRA; write --to lycoris (dora_scale)", m.module)));
                    }
                    let (dt, shape, bytes) = raw(mag)?;
                    let mut s = vec![shape[0], 1];
                    if let LayerKind::Conv { kernel } = &lr.layer {
                        s.extend(kernel.iter().map(|_| 1));
                    }
                    let _ = dt;
                    push(format!("{name}.dora_scale"), (dt, s, bytes));
                }
            }
            Payload::Hadamard(h) if lycoris => {
                algo = "loha";
                for (n, r) in [
                    (&h.w1a, "hada_w1_a"),
                    (&h.w1b, "hada_w1_b"),
                    (&h.w2a, "hada_w2_a"),
                    (&h.w2b, "hada_w2_b"),
                ] {
                    push(format!("{name}.{r}"), raw(n)?);
                }
                if let Some((t1, t2)) = &h.cp {
                    push(format!("{name}.hada_t1"), raw(t1)?);
                    push(format!("{name}.hada_t2"), raw(t2)?);
                }
                push(
                    format!("{name}.alpha"),
                    scalar_tensor(h.scale * h.rank as f64),
                );
                dims.push(h.rank);
                alphas.push(h.scale * h.rank as f64);
            }
            Payload::Kronecker(k) if lycoris => {
                algo = "lokr";
                let full =
                    matches!(k.w1, KronFactor::Full(_)) && matches!(k.w2, KronFactor::Full(_));
                for (f, i) in [(&k.w1, 1), (&k.w2, 2)] {
                    match f {
                        KronFactor::Full(n) => {
                            let mut t = raw(n)?;
                            if full && i == 1 && k.scale != 1.0 {
                                // LyCORIS forces scale 1 when both factors are full: bake it.
                                let (_, shape, dtype) = read(adapter, n)?;
                                let mut v = adapter.tensors.read_f32(n)?;
                                v.iter_mut().for_each(|x| *x *= k.scale as f32);
                                let dt = if dtype.is_writable_float() {
                                    dtype
                                } else {
                                    DType::F32
                                };
                                let mut b =
                                    vec![0u8; dt.byte_len(v.len() as u64).unwrap_or(0) as usize];
                                adapterkit_core::convert::encode_from_f32(dt, &v, &mut b)?;
                                t = (dt, shape, b);
                                notes.push(format!("{}: scale {} baked into lokr_w1 (LyCORIS uses scale 1 when both factors are full)", m.module, k.scale));
                            }
                            push(format!("{name}.lokr_w{i}"), t);
                        }
                        KronFactor::Product { a, b } => {
                            push(format!("{name}.lokr_w{i}_a"), raw(a)?);
                            push(format!("{name}.lokr_w{i}_b"), raw(b)?);
                        }
                        KronFactor::Tucker { t, a, b } => {
                            push(format!("{name}.lokr_t{i}"), raw(t)?);
                            push(format!("{name}.lokr_w{i}_a"), raw(a)?);
                            push(format!("{name}.lokr_w{i}_b"), raw(b)?);
                        }
                    }
                }
                let alpha = if full {
                    k.rank as f64
                } else {
                    k.scale * k.rank as f64
                };
                push(format!("{name}.alpha"), scalar_tensor(alpha));
                dims.push(k.rank);
                alphas.push(alpha);
            }
            Payload::Scale {
                tensor,
                axis,
                fan_in_fan_out: false,
                bias,
            } if lycoris => {
                if *bias && *axis == ScaleAxis::Output {
                    return Err(fmt_err(out, fmt, format!("module {}: PEFT's IA3 on outputs also scales the layer's bias; LyCORIS's IA3 leaves it alone, so the bias update would be lost", m.module)));
                }
                algo = "ia3";
                let v: Vec<f32> = adapter
                    .tensors
                    .read_f32(tensor)?
                    .iter()
                    .map(|x| x - 1.0)
                    .collect();
                let mut b = vec![0u8; v.len() * 4];
                adapterkit_core::convert::encode_from_f32(DType::F32, &v, &mut b)?;
                push(
                    format!("{name}.weight"),
                    (DType::F32, vec![v.len() as u64], b),
                );
                push(
                    format!("{name}.on_input"),
                    (
                        DType::Bool,
                        vec![],
                        vec![u8::from(*axis == ScaleAxis::Input)],
                    ),
                );
            }
            Payload::Add { tensor, scale } if lycoris => {
                algo = "full";
                let mut t = raw(tensor)?;
                if *scale != 1.0 {
                    let mut v = adapter.tensors.read_f32(tensor)?;
                    v.iter_mut().for_each(|x| *x *= *scale as f32);
                    let mut b = vec![0u8; v.len() * 4];
                    adapterkit_core::convert::encode_from_f32(DType::F32, &v, &mut b)?;
                    t = (DType::F32, t.1, b);
                }
                push(
                    format!("{name}.{}", if bias { "diff_b" } else { "diff" }),
                    t,
                );
            }
            p => {
                return Err(fmt_err(
                    out,
                    fmt,
                    format!(
                        "module {}: a {} update has no {fmt} form{}",
                        m.module,
                        p.kind(),
                        if lycoris {
                            ""
                        } else {
                            " (kohya files hold LoRA only; try --to lycoris)"
                        }
                    ),
                ));
            }
        }
    }
    for (flat, mut parts) in fused {
        parts.sort_by_key(|p| p.0);
        let n = parts[0].1;
        let swap = flat.starts_with("final_layer_adaLN");
        if parts.len() != n && !swap {
            return Err(fmt_err(out, fmt, format!(
                "{flat}: BFL fuses {n} diffusers projections into one, but only {} of them are adapted ({}); a LoRA on part of a fused projection has no exact kohya form",
                parts.len(),
                parts.iter().map(|p| p.2.module.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        // ΔW_fused = [s₁B₁A₁; s₂B₂A₂; …] = blockdiag(s₁B₁, …) · [A₁; A₂; …]: rank Σrᵢ, scale 1.
        let mut fs = Vec::new();
        for (_, _, m) in &parts {
            let Payload::LowRank(lr) = &m.payload else {
                return Err(fmt_err(
                    out,
                    fmt,
                    format!("module {}: only LoRA can be fused into {flat}", m.module),
                ));
            };
            if lr.magnitude.is_some() {
                return Err(fmt_err(
                    out,
                    fmt,
                    format!(
                        "module {}: DoRA cannot be fused into {flat} exactly",
                        m.module
                    ),
                ));
            }
            fs.push(factors(adapter, m, lr)?);
        }
        let inp = fs[0].a_shape[1] as usize;
        let rank: usize = fs.iter().map(|f| f.rank as usize).sum();
        let rows: usize = fs.iter().map(|f| f.b_shape[0] as usize).sum();
        let mut down = Vec::with_capacity(rank * inp);
        let mut up = vec![0f32; rows * rank];
        let (mut r0, mut o0) = (0usize, 0usize);
        for f in &fs {
            if f.a_shape[1] as usize != inp {
                return Err(fmt_err(
                    out,
                    fmt,
                    format!("{flat}: parts have different input sizes"),
                ));
            }
            down.extend_from_slice(&f.a);
            let (o, r) = (f.b_shape[0] as usize, f.rank as usize);
            for i in 0..o {
                for p in 0..r {
                    up[(o0 + i) * rank + r0 + p] = f.b[i * r + p];
                }
            }
            r0 += r;
            o0 += o;
        }
        if swap {
            let half = rows / 2 * rank;
            up.rotate_left(half);
        }
        let name = format!("lora_unet_{flat}");
        let enc = |v: &[f32]| {
            let mut b = vec![0u8; v.len() * 4];
            adapterkit_core::convert::encode_from_f32(DType::F32, v, &mut b).map(|_| b)
        };
        push(
            format!("{name}.lora_down.weight"),
            (DType::F32, vec![rank as u64, inp as u64], enc(&down)?),
        );
        push(
            format!("{name}.lora_up.weight"),
            (DType::F32, vec![rows as u64, rank as u64], enc(&up)?),
        );
        push(format!("{name}.alpha"), scalar_tensor(rank as f64));
        dims.push(rank as u64);
        alphas.push(rank as f64);
        notes.push(format!("{flat}: {} diffusers projections fused into one LoRA of rank {rank} (down projections stacked, up projections block-diagonal, scales baked)", parts.len()));
    }
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let dim = most_common(dims.iter().copied()).unwrap_or(0);
    let alpha = most_common(alphas.iter().map(|a| a.to_bits()))
        .map(f64::from_bits)
        .unwrap_or(0.0);
    let mut meta = vec![
        (
            "ss_network_module".to_string(),
            if lycoris {
                "lycoris.kohya"
            } else {
                "networks.lora"
            }
            .to_string(),
        ),
        ("ss_network_dim".to_string(), dim.to_string()),
        ("ss_network_alpha".to_string(), format!("{alpha}")),
    ];
    if lycoris {
        meta.push((
            "ss_network_args".to_string(),
            json!({"algo": algo}).to_string(),
        ));
    }
    if let Some(b) = &adapter.base_model {
        meta.push(("ss_sd_model_name".to_string(), b.clone()));
    }
    meta.push((
        "adapterkit_source_format".to_string(),
        adapter.format.to_string(),
    ));
    let _ = opts;
    if out.exists() && !opts.overwrite {
        return Err(fmt_err(out, fmt, "exists; pass --force to replace it"));
    }
    write_small(out, &tensors, Some(&meta))?;
    Ok(Written {
        files: vec![out.to_path_buf()],
        notes,
    })
}
