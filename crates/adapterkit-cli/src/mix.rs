//! `merge --method` and `merge --recipe`: mergekit's model-merging methods over whole
//! checkpoints (and adapters, as the models they make).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use adapterkit_core::DType;
use adapterkit_formats::recipe::{Recipe, Setting};
use adapterkit_formats::Checkpoint;
use adapterkit_ops::model_merge::{self, ModelInput, ModelMergeOptions, ModelMethod, Params};
use adapterkit_ops::{ExecOptions, OutDType, Output, WeightedAdapter};
use anyhow::{bail, Context, Result};

use crate::lowrank::model_type;

/// The model-merging flags of `merge`.
#[derive(clap::Args, Debug, Default)]
pub struct MethodArgs {
    /// Merge whole models as task vectors against BASE: linear, task_arithmetic, ties,
    /// dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp,
    /// model_stock (mergekit's semantics). SOURCES are checkpoints, adapter directories (the
    /// base with the adapter merged) or `MODEL+ADAPTER`.
    #[arg(long)]
    pub method: Option<String>,
    /// Run a mergekit YAML recipe as it is (BASE and SOURCES come from the recipe).
    #[arg(long, conflicts_with = "method")]
    pub recipe: Option<PathBuf>,
    /// Fraction of each task vector kept (ties, dare_*, breadcrumbs*, della*).
    #[arg(long)]
    pub density: Option<f64>,
    /// Scale of the mixed task vector (mergekit's `lambda`).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// slerp: interpolation position, 0 = BASE, 1 = the other model.
    #[arg(long)]
    pub t: Option<f64>,
    /// breadcrumbs: fraction of the largest magnitudes dropped (default 0.01).
    #[arg(long)]
    pub gamma: Option<f64>,
    /// della: spread of the keep probabilities (default 0.15).
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// Divide by the sum of the (agreeing) weights: true or false (default per method).
    #[arg(long)]
    pub normalize: Option<bool>,
    /// Rescale each sparsified task vector to its L1 norm: true or false (default per method).
    #[arg(long)]
    pub rescale: Option<bool>,
    /// model_stock: one interpolation ratio per row instead of per tensor.
    #[arg(long)]
    pub filter_wise: bool,
    /// Seed of DARE's and DELLA's random masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl MethodArgs {
    /// Whether any model-merging flag was given.
    pub fn any(&self) -> bool {
        self.method.is_some()
            || self.recipe.is_some()
            || self.density.is_some()
            || self.lambda.is_some()
            || self.t.is_some()
            || self.gamma.is_some()
            || self.epsilon.is_some()
            || self.normalize.is_some()
            || self.rescale.is_some()
            || self.filter_wise
    }
}

/// Parameters from the command line: the same everywhere.
struct FlatParams<'a> {
    weights: Vec<f64>,
    a: &'a MethodArgs,
}

fn b(x: Option<bool>) -> Option<f64> {
    x.map(|v| f64::from(u8::from(v)))
}

impl Params for FlatParams<'_> {
    fn input(&self, i: usize, key: &str, _tensor: &str) -> Option<f64> {
        match key {
            "weight" => self.weights.get(i).copied(),
            "density" => self.a.density,
            "gamma" => self.a.gamma,
            "epsilon" => self.a.epsilon,
            _ => None,
        }
    }
    fn global(&self, key: &str, _tensor: &str) -> Option<f64> {
        match key {
            "lambda" => self.a.lambda,
            "t" => self.a.t,
            "normalize" => b(self.a.normalize),
            "rescale" => b(self.a.rescale),
            "filter_wise" => self.a.filter_wise.then_some(1.0),
            _ => None,
        }
    }
}

/// Parameters from a recipe: a model's own setting, else the global one, resolved per tensor
/// with its layer position.
struct RecipeParams {
    models: Vec<BTreeMap<String, Setting>>,
    global: BTreeMap<String, Setting>,
    layers: usize,
}

impl RecipeParams {
    /// mergekit's `t` for a tensor: `layer / (layers − 1)` inside the layers, 0 elsewhere.
    fn t(&self, tensor: &str) -> f64 {
        let layer = tensor
            .split('.')
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| matches!(w[0], "layers" | "h" | "layer" | "blocks"))
            .and_then(|w| w[1].parse::<usize>().ok());
        match layer {
            Some(l) if self.layers > 1 => l as f64 / (self.layers - 1) as f64,
            _ => 0.0,
        }
    }
}

impl Params for RecipeParams {
    fn input(&self, i: usize, key: &str, tensor: &str) -> Option<f64> {
        let t = self.t(tensor);
        self.models
            .get(i)
            .and_then(|m| m.get(key))
            .and_then(|s| s.evaluate(tensor, t))
            .or_else(|| self.global.get(key).and_then(|s| s.evaluate(tensor, t)))
            .and_then(|s| s.as_f64())
    }
    fn global(&self, key: &str, tensor: &str) -> Option<f64> {
        self.global
            .get(key)
            .and_then(|s| s.evaluate(tensor, self.t(tensor)))
            .and_then(|s| s.as_f64())
    }
}

fn open_checkpoint(p: &Path) -> Result<Checkpoint> {
    Checkpoint::open(p).with_context(|| format!("opening {}", p.display()))
}

/// A model input: `model`, with `adapter` applied when given.
fn input(model: &Path, adapter: Option<&Path>, label: String) -> Result<ModelInput> {
    let ckpt = open_checkpoint(model)?;
    let adapters = match adapter {
        None => None,
        Some(a) => {
            let names = adapterkit_formats::base_names::BaseNames::from_checkpoint(&ckpt);
            let pa =
                crate::open_adapters(&[a.to_path_buf()], model_type(&ckpt), None, Some(&names))?
                    .pop()
                    .expect("one adapter");
            let plan = adapterkit_ops::plan(
                ckpt.root(),
                &ckpt,
                ckpt.tensors(),
                vec![WeightedAdapter {
                    adapter: pa.adapter,
                    weight: 1.0,
                }],
                OutDType::Auto,
            )
            .with_context(|| format!("applying {} to {}", a.display(), model.display()))?;
            Some(plan)
        }
    };
    Ok(ModelInput {
        label,
        checkpoint: ckpt,
        adapters,
    })
}

/// A command-line SOURCE: a checkpoint, an adapter directory (on `base`), or `MODEL+ADAPTER`.
fn source(base: &Path, s: &Path) -> Result<ModelInput> {
    let label = s.display().to_string();
    if s.join("adapter_config.json").is_file() {
        return input(base, Some(s), label);
    }
    if !s.exists() {
        if let Some((m, a)) = label.split_once('+') {
            return input(Path::new(m), Some(Path::new(a)), label.clone());
        }
    }
    input(s, None, label)
}

fn recipe_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "float32" | "fp32" | "f32" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "fp16" | "f16" => DType::F16,
        other => bail!("dtype {other:?}: expected float32, bfloat16 or float16"),
    })
}

/// What `run` needs from `merge`'s own flags.
pub struct Common {
    /// Positional BASE.
    pub base: Option<PathBuf>,
    /// Positional SOURCES.
    pub sources: Vec<PathBuf>,
    /// `--weights`.
    pub weights: Option<Vec<f64>>,
    /// `--dtype`.
    pub out_dtype: OutDType,
    /// Output.
    pub output: Output,
    /// Execution options.
    pub exec: ExecOptions,
    /// `--json`.
    pub json: bool,
}

/// Run `merge --method …` or `merge --recipe …`.
pub fn run(m: MethodArgs, c: Common) -> Result<()> {
    let started = std::time::Instant::now();
    let mut work = None;
    let (base, inputs, method, params, out_dtype): (
        ModelInput,
        Vec<ModelInput>,
        ModelMethod,
        Box<dyn Params + '_>,
        Option<DType>,
    ) = if let Some(rp) = &m.recipe {
        if c.base.is_some() || !c.sources.is_empty() || c.weights.is_some() {
            bail!("--recipe names the base and the models itself; give no BASE, SOURCES or --weights with it");
        }
        let r = Recipe::open(rp)?;
        let method = ModelMethod::from_name(&r.merge_method).with_context(|| {
            format!(
                "recipe {}: merge_method {:?} is not supported (supported: {})",
                rp.display(),
                r.merge_method,
                ModelMethod::ALL
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let known = method.parameters();
        for (k, _) in r
            .parameters
            .iter()
            .chain(r.models.iter().flat_map(|x| x.parameters.iter()))
        {
            if !known.contains(&k.as_str()) {
                bail!(
                    "recipe {}: parameter `{k}` is not one {} takes ({})",
                    rp.display(),
                    method.name(),
                    known.join(", ")
                );
            }
        }
        let base_ref = match (&r.base_model, method) {
            (Some(b), _) => b.clone(),
            (None, ModelMethod::Linear) => r
                .models
                .first()
                .map(|x| x.model.clone())
                .with_context(|| format!("recipe {}: no models", rp.display()))?,
            (None, _) => bail!(
                "recipe {}: {} needs base_model",
                rp.display(),
                method.name()
            ),
        };
        let base = input(
            &base_ref.model,
            base_ref.lora.as_deref(),
            base_ref.text.clone(),
        )?;
        let mut inputs = Vec::new();
        let mut models = Vec::new();
        for x in &r.models {
            // Every method but linear merges against the base: a `models` entry naming the
            // base is the base, not an input.
            if method != ModelMethod::Linear && x.model == base_ref {
                continue;
            }
            inputs.push(input(
                &x.model.model,
                x.model.lora.as_deref(),
                x.model.text.clone(),
            )?);
            models.push(x.parameters.clone());
        }
        let layers = base
            .checkpoint
            .config()
            .and_then(|v| v.get("num_hidden_layers").or_else(|| v.get("n_layer")))
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize;
        let dt = match (&r.out_dtype, &r.dtype) {
            (Some(d), _) | (None, Some(d)) => Some(recipe_dtype(d)?),
            _ => None,
        };
        work = r
            .dtype
            .as_deref()
            .map(recipe_dtype)
            .transpose()?
            .filter(|d| *d != DType::F32);
        let params = RecipeParams {
            models,
            global: r.parameters.clone(),
            layers,
        };
        (base, inputs, method, Box::new(params), dt)
    } else {
        let name = m.method.as_deref().unwrap_or_default();
        let method = ModelMethod::from_name(name).with_context(|| {
            format!(
                "--method {name:?}: expected one of {}",
                ModelMethod::ALL
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let Some(bp) = &c.base else {
            bail!("merge --method needs BASE and at least one SOURCE");
        };
        let base = input(bp, None, bp.display().to_string())?;
        let inputs = c
            .sources
            .iter()
            .map(|s| source(bp, s))
            .collect::<Result<Vec<_>>>()?;
        let weights = match &c.weights {
            Some(w) if w.len() != inputs.len() => bail!(
                "--weights has {} value(s) but {} model(s) were given",
                w.len(),
                inputs.len()
            ),
            Some(w) => w.clone(),
            None => vec![1.0; inputs.len()],
        };
        let params = FlatParams { weights, a: &m };
        (base, inputs, method, Box::new(params), None)
    };
    for i in &inputs {
        if crate::lowrank::same(&c.output.path, i.checkpoint.root()) {
            bail!("{}: the output cannot be an input", c.output.path.display());
        }
    }
    let out_dtype = match c.out_dtype {
        OutDType::Fixed(d) => Some(d),
        OutDType::Auto => out_dtype,
    };
    let opts = ModelMergeOptions {
        method,
        params: params.as_ref(),
        seed: m.seed,
        out_dtype,
        work,
    };
    let total: u64 = base
        .checkpoint
        .tensors()
        .map(|t| {
            let d = match out_dtype {
                Some(d) if t.dtype.is_float() => d,
                _ => t.dtype,
            };
            d.byte_len(t.numel()).unwrap_or(0)
        })
        .sum();
    let report = crate::with_progress(!c.json, total, |progress| {
        let exec = ExecOptions {
            progress,
            ..c.exec.clone()
        };
        model_merge::merge_models(&base, &inputs, &opts, &c.output, &exec)
    })?;
    let secs = started.elapsed().as_secs_f64();
    if c.json {
        let v = serde_json::json!({
            "output": c.output.path,
            "method": method.name(),
            "models": inputs.iter().map(|i| i.label.clone()).collect::<Vec<_>>(),
            "files": report.files,
            "tensors": report.tensors,
            "merged": report.merged,
            "copied": report.copied,
            "bytes": report.bytes,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "merged {} model(s) by {} into {}: {} tensors ({} merged, {} copied), {} in {:.2}s",
            inputs.len(),
            method.name(),
            c.output.path.display(),
            report.tensors,
            report.merged,
            report.copied,
            crate::inspect::human_bytes(report.bytes),
            secs
        );
    }
    Ok(())
}
