//! `adapterkit combine`: several adapters into one PEFT LoRA.

use std::path::PathBuf;

use adapterkit_core::{DType, TensorSource};
use adapterkit_formats::AdapterWriter;
use adapterkit_ops::combine::{
    self, CombineMethod, CombineOptions, PeftCombination, PeftCombineOptions,
};
use adapterkit_ops::deltas;
use adapterkit_ops::methods::Majority;
use adapterkit_ops::svd::SvdOptions;
use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::lowrank::{
    factor_dtype, model_type, open_base, print_table, report_json, same, summary,
};

/// `combine` arguments.
#[derive(clap::Args, Debug)]
pub struct CombineArgs {
    /// Adapter directories (any family adapterkit merges; LoRA for --compat peft).
    #[arg(required = true)]
    pub adapters: Vec<PathBuf>,
    /// Output adapter directory (PEFT LoRA).
    #[arg(short, long)]
    pub output: PathBuf,
    /// cat | linear | svd | ties | dare_linear | dare_ties | magnitude_prune | breadcrumbs |
    /// della; with --compat peft, PEFT's combination types (…, ties_svd, dare_linear_svd,
    /// dare_ties_svd, magnitude_prune_svd).
    #[arg(long, default_value = "linear")]
    pub method: String,
    /// Comma-separated weight per adapter (default 1.0 each); negative weights subtract.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub weights: Option<Vec<f64>>,
    /// Fraction of each update kept by the sparsifying methods.
    #[arg(long)]
    pub density: Option<f64>,
    /// Output rank of re-factorised modules (default: the largest input rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Seed of DARE's and DELLA's random masks and of the randomized SVD.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Majority sign of ties/dare_ties: total (sign of the sum) or frequency (count of signs).
    #[arg(long, default_value = "total")]
    pub majority: String,
    /// breadcrumbs: fraction of the largest magnitudes dropped.
    #[arg(long, default_value_t = 0.01)]
    pub gamma: f64,
    /// della: spread of the keep probabilities around the density.
    #[arg(long, default_value_t = 0.15)]
    pub epsilon: f64,
    /// `peft`: reproduce PEFT's add_weighted_adapter file for file (its A/B-stack arithmetic,
    /// rank rules and config), instead of the exact ΔW-space combination.
    #[arg(long)]
    pub compat: Option<String>,
    /// The base checkpoint: needed by families whose update depends on the base weight (DoRA,
    /// OFT, IA3, …) and to save vector updates that have no LoRA module.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// dtype of the written factors: f32 (default), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn majority(s: &str) -> Result<Majority> {
    Ok(match s {
        "total" | "sum" => Majority::Total,
        "frequency" | "count" => Majority::Frequency,
        other => bail!("--majority {other:?}: expected total or frequency"),
    })
}

/// `adapterkit combine`.
pub fn run(a: CombineArgs) -> Result<()> {
    let weights = match &a.weights {
        Some(w) if w.len() != a.adapters.len() => bail!(
            "--weights has {} value(s) but {} adapter(s) were given",
            w.len(),
            a.adapters.len()
        ),
        Some(w) => w.clone(),
        None => vec![1.0; a.adapters.len()],
    };
    if let Some(p) = a.adapters.iter().find(|p| same(&a.output, p)) {
        bail!(
            "{}: the output cannot be an input (adapter {})",
            a.output.display(),
            p.display()
        );
    }
    let majority = majority(&a.majority)?;
    let dtype = factor_dtype(&a.dtype)?.unwrap_or(DType::F32);
    let base = open_base(a.base.as_deref())?;
    let names = base
        .as_ref()
        .map(adapterkit_formats::base_names::BaseNames::from_checkpoint);
    let opened = crate::open_adapters(
        &a.adapters,
        base.as_ref().and_then(model_type),
        None,
        names.as_ref(),
    )?;
    let started = std::time::Instant::now();
    match a.compat.as_deref() {
        Some("peft") => {
            let combination = PeftCombination::from_name(&a.method).with_context(|| {
                format!("--method {:?}: not one of PEFT's combination types (cat, linear, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd)", a.method)
            })?;
            let inputs: Vec<_> = opened
                .iter()
                .map(|pa| (&pa.adapter, &pa.config_json))
                .collect();
            let opts = PeftCombineOptions {
                combination,
                weights,
                svd_rank: a.rank,
                density: a.density,
                majority,
                seed: a.seed,
            };
            let mut out = AdapterWriter::create(&a.output, a.force)?;
            let cfg = combine::combine_peft(&inputs, &opts, &mut out)?;
            out.finish(&cfg)?;
            let secs = started.elapsed().as_secs_f64();
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"output": a.output, "r": cfg["r"], "seconds": secs})
                    )?
                );
            } else {
                println!(
                    "combined {} adapter(s) as PEFT's add_weighted_adapter({}) into {}: r = lora_alpha = {} in {:.2}s",
                    a.adapters.len(),
                    a.method,
                    a.output.display(),
                    cfg["r"],
                    secs
                );
            }
            Ok(())
        }
        Some(other) => bail!("--compat {other:?}: the only compatibility mode is peft"),
        None => {
            let method = CombineMethod::from_name(&a.method).with_context(|| {
                format!("--method {:?}: expected cat, linear, svd, ties, dare_linear, dare_ties, magnitude_prune, breadcrumbs or della (PEFT's *_svd names need --compat peft)", a.method)
            })?;
            let src = base.as_ref().map(|b| (b.root(), b as &dyn TensorSource));
            let all: Vec<deltas::Deltas> = opened
                .iter()
                .zip(&a.adapters)
                .map(|(pa, p)| {
                    deltas::adapter_deltas(&combine::without_saved_layers(&pa.adapter), src, true)
                        .with_context(|| format!("reading the updates of {}", p.display()))
                })
                .collect::<Result<_>>()?;
            let inputs: Vec<_> = opened
                .iter()
                .map(|pa| &pa.adapter)
                .zip(all.iter())
                .collect();
            let opts = CombineOptions {
                method,
                weights,
                density: a.density,
                gamma: a.gamma,
                epsilon: a.epsilon,
                rank: a.rank,
                seed: a.seed,
                majority,
                svd: SvdOptions {
                    seed: a.seed,
                    ..SvdOptions::default()
                },
                dtype,
            };
            let base_model = opened[0]
                .adapter
                .base_model
                .clone()
                .or_else(|| a.base.as_ref().map(|p| p.display().to_string()));
            let mut out = AdapterWriter::create(&a.output, a.force)?;
            let (cfg, rep) = combine::combine(
                &inputs,
                base.as_ref().map(|b| b as &dyn TensorSource),
                base_model.as_deref(),
                &opts,
                &mut out,
            )?;
            out.finish(&cfg)?;
            let secs = started.elapsed().as_secs_f64();
            if a.json {
                let v = json!({"output": a.output, "method": a.method, "modules": report_json(&rep), "notes": rep.notes, "seconds": secs});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(&rep);
                for n in &rep.notes {
                    eprintln!("note: {n}");
                }
                println!(
                    "combined {} adapter(s) by {} into {}: {} in {:.2}s",
                    a.adapters.len(),
                    a.method,
                    a.output.display(),
                    summary(&rep),
                    secs
                );
            }
            Ok(())
        }
    }
}
