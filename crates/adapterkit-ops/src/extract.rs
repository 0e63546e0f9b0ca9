//! LoRA extraction from a fine-tune: `ΔW = W_ft − W_base` per module, streamed one tensor at a
//! time, factorised (exact thin SVD for small matrices, seeded randomized SVD for large ones)
//! and written as a PEFT LoRA adapter. Unchanged tensors are skipped; embeddings and the output
//! head go to `modules_to_save` unless asked for as LoRAs; norms and other modules whose change
//! is not a weight matrix are saved whole (`modules_to_save`, exact); changed biases of LoRA
//! modules become `lora_bias`.

use std::collections::BTreeMap;

use adapterkit_core::ir::LayerKind;
use adapterkit_core::{convert, DType, TensorInfo, TensorSource};
use adapterkit_formats::{AdapterWriter, Checkpoint};
use serde_json::Value;

use crate::compress::{
    lora_config, peft_key, write_lora, write_lora_biases, LowRankOptions, LowRankReport,
    ModuleReport,
};
use crate::deltas::looks_like_embedding;
use crate::error::{Error, Problem, Result};
use crate::kernels::transpose;
use crate::svd::{self, RankRule};

/// Options of [`extract`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtractOptions {
    /// Rank policy and SVD options. A fixed rank applies to every module; energy and error
    /// targets pick a rank per module.
    pub lowrank: LowRankOptions,
    /// Extract LoRAs for embeddings and the output head too, instead of saving them whole.
    pub embed_lora: bool,
    /// Dtype of the written factors (default: each fine-tuned tensor's own float type).
    pub dtype: Option<DType>,
}

/// What an extraction did.
#[derive(Debug, Clone, Default)]
pub struct ExtractReport {
    /// Factorised modules, with their truncation errors.
    pub lowrank: LowRankReport,
    /// Modules saved whole.
    pub modules_to_save: Vec<String>,
    /// Biases written as `lora_bias`.
    pub lora_biases: usize,
    /// Tensors identical in both checkpoints.
    pub unchanged: usize,
}

fn module_of(name: &str) -> (&str, &str) {
    match name.rsplit_once('.') {
        Some((m, p)) => (m, p),
        None => ("", name),
    }
}

fn is_head(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    matches!(last, "lm_head" | "embed_out" | "output_layer")
}

/// One module as read: its changed tensors (with `ΔW` for float ones) and how many were equal.
struct Loaded {
    module: String,
    changed: Vec<(TensorInfo, Option<Vec<f32>>)>,
    unchanged: usize,
}

/// Bytes compared or converted at a time: whole tensors are only held when they changed.
const CHUNK: usize = 4 << 20;

/// Whether two tensors hold the same values, read chunk by chunk.
fn same_values(
    base: &dyn TensorSource,
    b: &TensorInfo,
    finetuned: &dyn TensorSource,
    t: &TensorInfo,
) -> Result<bool> {
    if b.dtype == t.dtype {
        let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let mut off = 0u64;
        while off < t.len {
            let n = ((t.len - off) as usize).min(CHUNK);
            base.read_bytes(&b.name, off, &mut x[..n])?;
            finetuned.read_bytes(&t.name, off, &mut y[..n])?;
            if x[..n] != y[..n] {
                return Ok(false);
            }
            off += n as u64;
        }
        return Ok(true);
    }
    Ok(base.read_f32(&b.name)? == finetuned.read_f32(&t.name)?)
}

/// `W_ft − W_base` in f32, decoding the base chunk by chunk into the fine-tune's values.
fn difference(
    base: &dyn TensorSource,
    b: &TensorInfo,
    finetuned: &dyn TensorSource,
    t: &TensorInfo,
) -> Result<Vec<f32>> {
    let mut d = finetuned.read_f32(&t.name)?;
    let width = b.dtype.byte_len(1).unwrap_or(4).max(1) as usize;
    let per = (CHUNK / width).max(1);
    let (mut raw, mut vals) = (vec![0u8; per * width], vec![0f32; per]);
    for (k, out) in d.chunks_mut(per).enumerate() {
        let bytes = &mut raw[..out.len() * width];
        base.read_bytes(&b.name, (k * per * width) as u64, bytes)?;
        convert::decode_to_f32(b.dtype, bytes, &mut vals[..out.len()])?;
        for (x, y) in out.iter_mut().zip(&vals) {
            *x -= y;
        }
    }
    Ok(d)
}

fn load_module(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    module: &str,
    tensors: &[TensorInfo],
) -> Result<Loaded> {
    let mut changed = Vec::new();
    let mut unchanged = 0;
    for t in tensors {
        let b = base.info(&t.name).expect("validated").clone();
        if same_values(base, &b, finetuned, t)? {
            unchanged += 1;
            continue;
        }
        // Sub-byte and packed dtypes have no per-element width: compare whole values.
        let delta = if t.dtype.is_float() && b.dtype.byte_len(1).is_some() {
            Some(difference(base, &b, finetuned, t)?)
        } else {
            None
        };
        changed.push((t.clone(), delta));
    }
    Ok(Loaded {
        module: module.to_string(),
        changed,
        unchanged,
    })
}

/// Extract a LoRA adapter that turns `base` into `finetuned`, writing it to `out`. `progress`
/// is called with (tensors done, tensors total).
pub fn extract(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    opts: &ExtractOptions,
    out: &mut AdapterWriter,
    progress: &dyn Fn(usize, usize),
) -> Result<(Value, ExtractReport)> {
    opts.lowrank.policy.validate()?;
    if let RankRule::Rank(_) = opts.lowrank.policy.rule {
    } else if opts.lowrank.svd.method == svd::SvdMethod::Randomized
        && opts.lowrank.policy.max_rank.is_none()
    {
        return Err(Error::Options(
            "--randomized with --energy or --max-error needs --max-rank (how many triplets to compute)".into(),
        ));
    }
    // Validate the pairing before any work.
    let mut problems = Vec::new();
    let ft_root = finetuned.root().to_path_buf();
    for t in finetuned.tensors() {
        match base.info(&t.name) {
            None => problems.push(Problem {
                file: ft_root.clone(),
                tensor: t.name.clone(),
                message: format!("not in the base {}: a new tensor cannot be an update (was the vocabulary or the architecture changed?)", base.root().display()),
            }),
            Some(b) if b.shape != t.shape => problems.push(Problem {
                file: ft_root.clone(),
                tensor: t.name.clone(),
                message: format!(
                    "shape {:?} but the base has {:?}: resized tensors (e.g. a grown vocabulary) cannot be expressed as an update",
                    t.shape, b.shape
                ),
            }),
            Some(b) if b.dtype.is_float() != t.dtype.is_float() => problems.push(Problem {
                file: ft_root.clone(),
                tensor: t.name.clone(),
                message: format!("dtype {} but the base has {}", t.dtype, b.dtype),
            }),
            _ => {}
        }
    }
    for t in base.tensors() {
        if finetuned.info(&t.name).is_none() {
            problems.push(Problem {
                file: ft_root.clone(),
                tensor: t.name.clone(),
                message: format!(
                    "missing: the base {} has it (tied or dropped weights must match)",
                    base.root().display()
                ),
            });
        }
    }
    if !problems.is_empty() {
        return Err(Error::Validation(problems));
    }
    let gpt2_like = finetuned
        .config()
        .and_then(|c| c.get("model_type"))
        .and_then(Value::as_str)
        .is_some_and(|m| m == "gpt2");

    // Modules in file order, each with its tensors.
    let mut order: Vec<String> = Vec::new();
    let mut members: BTreeMap<String, Vec<TensorInfo>> = BTreeMap::new();
    for t in finetuned.tensors() {
        let (m, _) = module_of(&t.name);
        if !members.contains_key(m) {
            order.push(m.to_string());
        }
        members.entry(m.to_string()).or_default().push(t.clone());
    }
    let total = finetuned.len();
    let mut done = 0usize;
    let mut rep = ExtractReport::default();
    let mut targets = Vec::new();
    let mut bias_deltas: BTreeMap<String, (DType, Vec<f32>)> = BTreeMap::new();
    let mut lora_rows: BTreeMap<String, (usize, DType)> = BTreeMap::new();
    let needed = opts.lowrank.policy.needed();
    // A reader thread loads the next module (reads, comparison, ΔW in f32) while this one
    // factorises the current: at most three modules' deltas are alive at once (one being
    // factorised, one queued, one being read).
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Loaded>>(1);
        let (order, members) = (&order, &members);
        scope.spawn(move || {
            for module in order {
                let loaded = load_module(base, finetuned, module, &members[module]);
                let failed = loaded.is_err();
                if tx.send(loaded).is_err() || failed {
                    break;
                }
            }
        });
        for loaded in rx {
            let Loaded {
                module,
                changed,
                unchanged,
            } = loaded?;
            let module = &module;
            let tensors = &members[module];
            done += tensors.len();
            rep.unchanged += unchanged;
            progress(done, total);
            if changed.is_empty() {
                continue;
            }
            let weight = changed.iter().position(|(t, d)| {
                d.is_some() && t.shape.len() >= 2 && t.name.ends_with(".weight")
            });
            let embedding = looks_like_embedding(module);
            let lora_ok = weight.is_some()
                && (opts.embed_lora || !(embedding || is_head(module)))
                && changed.iter().enumerate().all(|(i, (t, d))| {
                    Some(i) == weight
                        || (d.is_some() && t.name.ends_with(".bias") && t.shape.len() == 1)
                });
            if !lora_ok {
                // Saved whole: every tensor of the module, from the fine-tune.
                for t in tensors {
                    out.add_from(
                        &peft_key(&t.name),
                        t.dtype,
                        t.shape.clone(),
                        t.len,
                        &mut |off, buf| Ok(finetuned.read_bytes(&t.name, off, buf)?),
                    )?;
                }
                rep.modules_to_save.push(module.clone());
                continue;
            }
            let wi = weight.expect("checked");
            let (info, delta) = (&changed[wi].0, changed[wi].1.as_ref().expect("float"));
            let (srows, scols) = info.rows_cols();
            let (srows, scols) = (srows as usize, scols as usize);
            let layer = if info.shape.len() > 2 {
                LayerKind::Conv {
                    kernel: info.shape[2..].to_vec(),
                }
            } else if embedding {
                LayerKind::Embedding
            } else {
                LayerKind::Linear {
                    fan_in_fan_out: gpt2_like,
                }
            };
            let transposed = matches!(
                layer,
                LayerKind::Embedding
                    | LayerKind::Linear {
                        fan_in_fan_out: true
                    }
            );
            let (rows, cols, owned);
            let dense: &[f32] = if transposed {
                owned = transpose(delta, srows, scols);
                (rows, cols) = (scols, srows);
                &owned
            } else {
                (rows, cols) = (srows, scols);
                delta
            };
            let f = svd::factor_dense(module, dense, rows, cols, needed, &opts.lowrank.svd)?;
            let rank = opts.lowrank.policy.choose(&f.svd.s, f.total_sq).max(1);
            let dtype = opts.dtype.unwrap_or(if info.dtype.is_writable_float() {
                info.dtype
            } else {
                DType::F32
            });
            write_lora(out, module, &layer, &f.svd, rank, dtype)?;
            rep.lowrank.modules.push(ModuleReport {
                module: module.clone(),
                rows,
                cols,
                rank_before: None,
                rank,
                error: f.error_at(rank),
                energy: f.energy_at(rank),
                method: f.kind.name(),
            });
            targets.push(module.clone());
            // Bias deltas of this module.
            let out_len = info.shape[0] as usize;
            lora_rows.insert(module.clone(), (out_len, dtype));
            for (i, (t, d)) in changed.iter().enumerate() {
                if i != wi {
                    let d = d.clone().expect("float bias");
                    if d.len() != out_len {
                        return Err(Error::Options(format!(
                            "{}: {} has {} values but {} has {out_len} outputs",
                            finetuned.root().display(),
                            t.name,
                            d.len(),
                            info.name
                        )));
                    }
                    bias_deltas.insert(module.clone(), (dtype, d));
                }
            }
        }
        Ok(())
    })?;
    progress(total, total);
    let lora_bias = !bias_deltas.is_empty();
    if lora_bias {
        rep.lora_biases = write_lora_biases(lora_rows, bias_deltas, out)?;
    }
    let base_name = base.root().display().to_string();
    let cfg = lora_config(
        Some(&base_name),
        &rep.lowrank.modules,
        targets,
        rep.modules_to_save.clone(),
        gpt2_like,
        lora_bias,
        false,
    );
    Ok((cfg, rep))
}
