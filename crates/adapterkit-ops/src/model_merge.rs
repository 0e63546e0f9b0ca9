//! Merging whole models: mergekit's methods (linear, task arithmetic, TIES, DARE, breadcrumbs,
//! DELLA, SLERP, Model Stock) over full checkpoints, streamed.
//!
//! Every output tensor is computed from the same tensor of the base and of each input, read in
//! row chunks (see [`crate::methods`]): a method that needs a whole-tensor statistic (a top-k
//! cut, an L1 norm, a cosine) makes extra passes over the chunks instead of holding the tensor.
//! Tensors are processed in parallel, largest first; memory is a few chunks per worker. An input
//! may be a checkpoint with adapters applied on the fly (mergekit's `model+lora`), so adapters
//! take part as the models they make. The output goes through the merge executor's staging:
//! temporary files renamed into place only when everything succeeded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use adapterkit_core::convert::{decode_to_f32, encode_from_f32};
use adapterkit_core::{DType, TensorInfo, TensorSource};
use adapterkit_formats::Checkpoint;

use crate::apply::{apply_ops, prepare, Prepared};
use crate::deltas::looks_like_embedding;
use crate::error::{Error, Problem, Result};
use crate::execute::{
    bytes_of, run_parallel, ExecOptions, MergeReport, OutTensor, Output, Staging,
};
use crate::kernels::non_finite;
use crate::methods::{self, InputParams, Majority, Rows, Sparsify, TaskSpec};
use crate::plan::{OpSpec, Plan};

/// A merge method for whole models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelMethod {
    /// `Σ wᵢ xᵢ` over the inputs (normalised by `Σ wᵢ` by default).
    Linear,
    /// `b + λ Σ wᵢ δᵢ`.
    TaskArithmetic,
    /// Magnitude top-k, sign consensus, normalised.
    Ties,
    /// Random drop with L1 rescale.
    DareLinear,
    /// Random drop with L1 rescale and sign consensus.
    DareTies,
    /// Outlier-trimmed magnitude selection.
    Breadcrumbs,
    /// Breadcrumbs with sign consensus.
    BreadcrumbsTies,
    /// Rank-dependent random drop, sign consensus, normalised, rescaled.
    Della,
    /// DELLA without consensus or normalisation.
    DellaLinear,
    /// Spherical interpolation from the base to one input.
    Slerp,
    /// Model Stock.
    ModelStock,
}

impl ModelMethod {
    /// Every method, by its mergekit name.
    pub const ALL: [(&'static str, ModelMethod); 11] = [
        ("linear", ModelMethod::Linear),
        ("task_arithmetic", ModelMethod::TaskArithmetic),
        ("ties", ModelMethod::Ties),
        ("dare_linear", ModelMethod::DareLinear),
        ("dare_ties", ModelMethod::DareTies),
        ("breadcrumbs", ModelMethod::Breadcrumbs),
        ("breadcrumbs_ties", ModelMethod::BreadcrumbsTies),
        ("della", ModelMethod::Della),
        ("della_linear", ModelMethod::DellaLinear),
        ("slerp", ModelMethod::Slerp),
        ("model_stock", ModelMethod::ModelStock),
    ];

    /// The method called `name` (mergekit's spelling).
    pub fn from_name(name: &str) -> Option<Self> {
        methods::by_name(&Self::ALL, name)
    }

    /// mergekit's name.
    pub fn name(self) -> &'static str {
        methods::name_in(&Self::ALL, &self)
    }

    /// The generalized-task-arithmetic shape of the method: sparsifier, consensus, and the
    /// defaults of `normalize` and `rescale`.
    fn task(self) -> Option<(Option<Sparsify>, bool, bool, bool)> {
        use ModelMethod::*;
        Some(match self {
            TaskArithmetic => (None, false, false, false),
            Ties => (Some(Sparsify::Magnitude), true, true, false),
            DareTies => (Some(Sparsify::Random), true, false, true),
            DareLinear => (Some(Sparsify::Random), false, false, true),
            Breadcrumbs => (Some(Sparsify::Outliers), false, false, false),
            BreadcrumbsTies => (Some(Sparsify::Outliers), true, false, false),
            Della => (Some(Sparsify::Della), true, true, true),
            DellaLinear => (Some(Sparsify::Della), false, false, true),
            Linear | Slerp | ModelStock => return None,
        })
    }

    /// Parameters the method reads (for refusing unknown ones).
    pub fn parameters(self) -> &'static [&'static str] {
        use ModelMethod::*;
        match self {
            Linear => &["weight", "normalize"],
            TaskArithmetic => &[
                "weight",
                "lambda",
                "normalize",
                "rescale",
                "density",
                "int8_mask",
            ],
            Ties | DareLinear | DareTies => &[
                "weight",
                "density",
                "lambda",
                "normalize",
                "rescale",
                "int8_mask",
            ],
            Breadcrumbs | BreadcrumbsTies => &[
                "weight",
                "density",
                "gamma",
                "lambda",
                "normalize",
                "rescale",
                "int8_mask",
            ],
            Della | DellaLinear => &[
                "weight",
                "density",
                "epsilon",
                "lambda",
                "normalize",
                "rescale",
                "int8_mask",
            ],
            Slerp => &["t"],
            ModelStock => &["filter_wise"],
        }
    }
}

/// Where a method's parameters come from, resolved per tensor (a recipe's filters and layer
/// gradients, or the command line's flat values).
pub trait Params: Sync {
    /// Input `i`'s value of `key` for tensor `tensor`, if set.
    fn input(&self, i: usize, key: &str, tensor: &str) -> Option<f64>;
    /// The global value of `key` for `tensor`, if set.
    fn global(&self, key: &str, tensor: &str) -> Option<f64>;
}

/// One model taking part: a checkpoint, and optionally adapters applied to it on the fly.
pub struct ModelInput {
    /// How the input is named in messages (its path, `model+lora`).
    pub label: String,
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// Adapters planned against `checkpoint`, applied when its tensors are read.
    pub adapters: Option<Plan>,
}

impl ModelInput {
    /// A plain checkpoint.
    pub fn new(checkpoint: Checkpoint) -> Self {
        ModelInput {
            label: checkpoint.root().display().to_string(),
            checkpoint,
            adapters: None,
        }
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.checkpoint.info(name)
    }

    fn path(&self) -> PathBuf {
        self.checkpoint.root().to_path_buf()
    }
}

/// Options of a model merge.
pub struct ModelMergeOptions<'a> {
    /// The method.
    pub method: ModelMethod,
    /// Its parameters.
    pub params: &'a dyn Params,
    /// Seed of DARE's and DELLA's masks.
    pub seed: u64,
    /// Output dtype of floating-point tensors (`None`: the base's).
    pub out_dtype: Option<DType>,
    /// mergekit's `dtype`: inputs are cast to it when read and the arithmetic is rounded to it
    /// (`None`: f32 arithmetic on the stored values).
    pub work: Option<DType>,
}

/// One tensor's reader for one model: rows decoded to f32 with the model's adapters applied.
struct Reader<'a> {
    /// Byte and f32 scratch reused across reads (one thread reads a tensor; the lock is
    /// uncontended).
    scratch: Mutex<(Vec<u64>, Vec<f32>)>,
    work: Option<DType>,
    src: &'a dyn TensorSource,
    info: &'a TensorInfo,
    ops: Option<Vec<Prepared>>,
    /// The whole tensor, when an adapter's operation needs it whole.
    whole: Option<Vec<f32>>,
}

impl<'a> Reader<'a> {
    fn new(
        m: &'a ModelInput,
        name: &str,
        index: Option<&HashMap<&str, usize>>,
        work: Option<DType>,
    ) -> Result<Self> {
        let info = m.info(name).expect("validated");
        let mut r = Reader {
            scratch: Mutex::default(),
            work,
            src: &m.checkpoint,
            info,
            ops: None,
            whole: None,
        };
        if let (Some(plan), Some(index)) = (&m.adapters, index) {
            if let Some(&t) = index.get(name) {
                let pt = &plan.tensors[t];
                if !pt.ops.is_empty() {
                    let ops = prepare(plan, &m.checkpoint, pt)?;
                    if pt.ops.iter().any(OpSpec::needs_whole_tensor) || info.shape.len() < 2 {
                        let (_, cols) = info.rows_cols();
                        let mut w = m.checkpoint.read_f32(name)?;
                        apply_ops(&mut w, 0, cols as usize, &ops, &mut Vec::new());
                        r.whole = Some(w);
                    } else {
                        r.ops = Some(ops);
                    }
                }
            }
        }
        Ok(r)
    }

    fn read(&self, row0: usize, n: usize, cols: usize, out: &mut [f32]) -> Result<()> {
        if let Some(w) = &self.whole {
            out.copy_from_slice(&w[row0 * cols..(row0 + n) * cols]);
            methods::round_to(self.work, out);
            return Ok(());
        }
        let dt = self.info.dtype;
        let len = dt.byte_len((n * cols) as u64).expect("validated") as usize;
        let off = dt.byte_len((row0 * cols) as u64).expect("validated");
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, tmp) = &mut *scratch;
        let buf = bytes_of(bytes, len);
        self.src.read_bytes(&self.info.name, off, buf)?;
        decode_to_f32(dt, buf, out)?;
        if let Some(ops) = &self.ops {
            apply_ops(out, row0, cols, ops, tmp);
        }
        methods::round_to(self.work, out);
        Ok(())
    }
}

struct TensorRows<'a> {
    base: Reader<'a>,
    inputs: Vec<Reader<'a>>,
    rows: usize,
    cols: usize,
}

impl Rows for TensorRows<'_> {
    fn inputs(&self) -> usize {
        self.inputs.len()
    }
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn base(&self, row0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        self.base.read(row0, n, self.cols, out)
    }
    fn input(&self, i: usize, row0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        self.inputs[i].read(row0, n, self.cols, out)
    }
}

/// An embedding table or output head: where differing vocabularies show.
fn is_embedding_like(name: &str) -> bool {
    looks_like_embedding(name.strip_suffix(".weight").unwrap_or(name)) || name.contains("lm_head")
}

/// Check that every input has every base tensor with the base's shape, and nothing more.
fn validate(base: &ModelInput, inputs: &[ModelInput], method: ModelMethod) -> Result<()> {
    let mut problems = Vec::new();
    match method {
        ModelMethod::Slerp if inputs.len() != 1 => problems.push(Problem {
            file: base.path(),
            tensor: "(inputs)".into(),
            message: format!(
                "slerp interpolates between the base and exactly one model, got {} models",
                inputs.len()
            ),
        }),
        ModelMethod::ModelStock if inputs.len() < 2 => problems.push(Problem {
            file: base.path(),
            tensor: "(inputs)".into(),
            message: format!(
                "model_stock needs at least two fine-tuned models besides the base, got {}",
                inputs.len()
            ),
        }),
        _ if inputs.is_empty() => problems.push(Problem {
            file: base.path(),
            tensor: "(inputs)".into(),
            message: "no models to merge".into(),
        }),
        _ => {}
    }
    for m in inputs {
        for t in base.checkpoint.tensors() {
            match m.info(&t.name) {
                None => problems.push(Problem {
                    file: m.path(),
                    tensor: t.name.clone(),
                    message: format!("missing: the base has it with shape {:?}{}", t.shape,
                        if t.name.contains("lm_head") { " (is one model saved with tied embeddings, tie_word_embeddings, and the other not?)" } else { "" }),
                }),
                Some(i) if i.shape != t.shape => problems.push(Problem {
                    file: m.path(),
                    tensor: t.name.clone(),
                    message: format!(
                        "shape {:?}, base has {:?}{}",
                        i.shape,
                        t.shape,
                        if is_embedding_like(&t.name) {
                            " (the vocabularies differ; adapterkit neither truncates nor pads embeddings: align the tokenizers and resize the embeddings first)"
                        } else {
                            ""
                        }
                    ),
                }),
                Some(i) if t.dtype.is_float() != i.dtype.is_float() => problems.push(Problem {
                    file: m.path(),
                    tensor: t.name.clone(),
                    message: format!("dtype {}, base has {}", i.dtype, t.dtype),
                }),
                _ => {}
            }
        }
        for t in m.checkpoint.tensors() {
            if base.info(&t.name).is_none() {
                problems.push(Problem {
                    file: m.path(),
                    tensor: t.name.clone(),
                    message: format!("not in the base {}{}", base.label,
                        if t.name.contains("lm_head") { " (is the base saved with tied embeddings, tie_word_embeddings, and this model not?)" } else { "" }),
                });
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Validation(problems))
    }
}

fn flag(params: &dyn Params, key: &str, tensor: &str, default: bool) -> bool {
    params.global(key, tensor).map_or(default, |v| v != 0.0)
}

fn required(params: &dyn Params, i: usize, key: &str, tensor: &str, label: &str) -> Result<f64> {
    params.input(i, key, tensor).ok_or_else(|| {
        Error::Options(format!(
            "{label}: no `{key}` for tensor {tensor} (the method needs one per model)"
        ))
    })
}

/// Merge `inputs` with `base` by `opts.method`, writing `output`.
pub fn merge_models(
    base: &ModelInput,
    inputs: &[ModelInput],
    opts: &ModelMergeOptions,
    output: &Output,
    exec: &ExecOptions,
) -> Result<MergeReport> {
    validate(base, inputs, opts.method)?;
    let infos: Vec<&TensorInfo> = base.checkpoint.tensors().collect();
    let out: Vec<OutTensor> = infos
        .iter()
        .map(|t| OutTensor {
            name: t.name.clone(),
            dtype: match opts.out_dtype {
                Some(d) if t.dtype.is_float() => d,
                // Mixed input dtypes promote to f32, as torch's arithmetic does.
                None if t.dtype.is_float()
                    && inputs
                        .iter()
                        .any(|m| m.info(&t.name).is_some_and(|i| i.dtype != t.dtype)) =>
                {
                    DType::F32
                }
                _ => t.dtype,
            },
            shape: t.shape.clone(),
        })
        .collect();
    // Resolve every tensor's parameters up front, so a missing one is reported before writing.
    let specs: Vec<Option<Job>> = infos
        .iter()
        .map(|t| job(base, inputs, opts, t))
        .collect::<Result<_>>()?;
    let indexes: Vec<Option<HashMap<&str, usize>>> = inputs
        .iter()
        .map(|m| {
            m.adapters.as_ref().map(|p| {
                p.tensors
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.source.name.as_str(), i))
                    .collect()
            })
        })
        .collect();
    let staging = Staging::create(&base.checkpoint, out.clone(), output)?;
    let mut order: Vec<usize> = (0..infos.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(infos[i].numel()));
    let merged = Mutex::new(0usize);
    let work = |_: &mut (), &t: &usize| -> Result<()> {
        let info = infos[t];
        let odt = out[t].dtype;
        let Some(job) = &specs[t] else {
            // Not floating point: the base's bytes.
            let mut buf = vec![0u8; info.len as usize];
            base.checkpoint.read_bytes(&info.name, 0, &mut buf)?;
            staging.write(t, 0, &buf)?;
            if let Some(p) = &exec.progress {
                p.fetch_add(info.len, Ordering::Relaxed);
            }
            return Ok(());
        };
        let (rows, cols) = info.rows_cols();
        let (rows, cols) = if info.shape.len() < 2 {
            (1, info.numel() as usize)
        } else {
            (rows as usize, cols as usize)
        };
        let src = TensorRows {
            base: Reader::new(base, &info.name, None, opts.work)?,
            inputs: inputs
                .iter()
                .zip(&indexes)
                .map(|(m, ix)| Reader::new(m, &info.name, ix.as_ref(), opts.work))
                .collect::<Result<_>>()?,
            rows,
            cols,
        };
        let mut bytes = Vec::new();
        let mut rounded = Vec::new();
        let mut emit = |row0: usize, vals: &[f32]| -> Result<()> {
            let vals = if opts.work.is_some() {
                // mergekit's result is a tensor of its working dtype before out_dtype.
                rounded.clear();
                rounded.extend_from_slice(vals);
                methods::round_to(opts.work, &mut rounded);
                &rounded[..]
            } else {
                vals
            };
            if !exec.allow_nonfinite {
                if let Some((count, first)) = non_finite(vals) {
                    return Err(Error::NonFinite {
                        tensor: info.name.clone(),
                        count,
                        first: first + row0 * cols,
                    });
                }
            }
            let len = odt.byte_len(vals.len() as u64).expect("validated") as usize;
            let off = odt.byte_len((row0 * cols) as u64).expect("validated");
            let buf = bytes_of(&mut bytes, len);
            encode_from_f32(odt, vals, buf)?;
            staging.write(t, off, buf)?;
            if let Some(p) = &exec.progress {
                p.fetch_add(len as u64, Ordering::Relaxed);
            }
            Ok(())
        };
        match job {
            Job::Linear { weights, normalize } => {
                methods::linear(&src, weights, *normalize, &mut emit)?
            }
            Job::Task(spec) => methods::task_arithmetic(&src, spec, &mut emit)?,
            Job::Slerp { t } => methods::slerp(&src, *t, &mut emit)?,
            Job::ModelStock { filter_wise } => methods::model_stock(&src, *filter_wise, &mut emit)?,
        }
        *merged.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(())
    };
    run_parallel(exec.threads, &order, work)?;
    let mut report = MergeReport {
        tensors: infos.len(),
        merged: merged.into_inner().unwrap_or_else(|e| e.into_inner()),
        skipped_files: base.checkpoint.skipped_files().to_vec(),
        bytes: staging.bytes(),
        ..Default::default()
    };
    report.copied = report.tensors - report.merged;
    report.files = staging.commit(exec.fsync)?;
    Ok(report)
}

/// What to compute for one tensor.
enum Job {
    Linear { weights: Vec<f64>, normalize: bool },
    Task(TaskSpec),
    Slerp { t: f64 },
    ModelStock { filter_wise: bool },
}

fn job(
    base: &ModelInput,
    inputs: &[ModelInput],
    opts: &ModelMergeOptions,
    t: &TensorInfo,
) -> Result<Option<Job>> {
    if !t.dtype.is_float() {
        return Ok(None);
    }
    let p = opts.params;
    let name = t.name.as_str();
    Ok(Some(match opts.method {
        ModelMethod::Linear => {
            let weights = (0..inputs.len())
                .map(|i| required(p, i, "weight", name, &inputs[i].label))
                .collect::<Result<Vec<_>>>()?;
            let normalize = flag(p, "normalize", name, true);
            if normalize && weights.iter().sum::<f64>() == 0.0 {
                return Err(Error::Options(format!("{name}: the weights sum to zero, so `normalize` would divide by zero; set normalize: false")));
            }
            Job::Linear { weights, normalize }
        }
        ModelMethod::Slerp => {
            let t = p.global("t", name).ok_or_else(|| {
                Error::Options(format!("{}: slerp needs `t` for tensor {name}", base.label))
            })?;
            Job::Slerp { t }
        }
        ModelMethod::ModelStock => Job::ModelStock {
            filter_wise: flag(p, "filter_wise", name, false),
        },
        m => {
            let (sparsify, consensus, normalize, rescale) = m.task().expect("task method");
            let params = (0..inputs.len())
                .map(|i| {
                    Ok(InputParams {
                        weight: required(p, i, "weight", name, &inputs[i].label)?,
                        density: p.input(i, "density", name).unwrap_or(1.0),
                        gamma: p.input(i, "gamma", name).unwrap_or(0.01),
                        epsilon: p.input(i, "epsilon", name).unwrap_or(0.15),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if sparsify == Some(Sparsify::Della) && t.shape.len() > 2 {
                return Err(Error::Options(format!(
                    "{name}: della ranks magnitudes along rows; this {}-D tensor is not supported",
                    t.shape.len()
                )));
            }
            Job::Task(TaskSpec {
                sparsify,
                consensus: consensus.then_some(Majority::Total),
                normalize: flag(p, "normalize", name, normalize),
                rescale: flag(p, "rescale", name, rescale),
                lambda: p.global("lambda", name).unwrap_or(1.0),
                params,
                seed: opts.seed,
                tensor: name.to_string(),
                work: opts.work,
            })
        }
    }))
}
