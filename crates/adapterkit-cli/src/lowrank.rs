//! `compress`, `extract`, `convert --to-family lora` and `inspect --spectrum`: the SVD commands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use adapterkit_core::DType;
use adapterkit_formats::{peft, AdapterWriter, Checkpoint};
use adapterkit_ops::compress::{self, LowRankOptions, LowRankReport};
use adapterkit_ops::deltas::{self, DeltaData};
use adapterkit_ops::extract::{self, ExtractOptions};
use adapterkit_ops::svd::{self, RankPolicy, RankRule, SvdMethod, SvdOptions};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::plot;

/// How ranks are chosen.
#[derive(clap::Args, Debug, Clone)]
pub struct RankArgs {
    /// Keep this rank (capped at each module's own rank).
    #[arg(long, group = "rule")]
    pub rank: Option<usize>,
    /// Keep the smallest rank that retains this fraction of the energy Σσ² (e.g. 0.99).
    #[arg(long, group = "rule")]
    pub energy: Option<f64>,
    /// Keep the smallest rank whose relative Frobenius error ‖ΔW − ΔW_r‖/‖ΔW‖ is at most this.
    #[arg(long, group = "rule")]
    pub max_error: Option<f64>,
    /// Never keep more than this rank.
    #[arg(long)]
    pub max_rank: Option<usize>,
}

impl RankArgs {
    fn policy(&self, default: Option<RankRule>) -> Result<RankPolicy> {
        let rule = match (self.rank, self.energy, self.max_error, default) {
            (Some(r), _, _, _) => RankRule::Rank(r),
            (_, Some(e), _, _) => RankRule::Energy(e),
            (_, _, Some(e), _) => RankRule::MaxError(e),
            (_, _, _, Some(d)) => d,
            _ => bail!("choose a rank: --rank R, --energy E or --max-error E"),
        };
        let p = RankPolicy {
            rule,
            max_rank: self.max_rank,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Which SVD dense updates get.
#[derive(clap::Args, Debug, Clone)]
pub struct SvdArgs {
    /// Use the randomized SVD for every matrix (default: exact for small matrices, randomized
    /// when the rank is known and far below the matrix's smaller side).
    #[arg(long, conflicts_with = "exact")]
    pub randomized: bool,
    /// Use the exact thin SVD for every matrix.
    #[arg(long)]
    pub exact: bool,
    /// Randomized SVD: extra random directions beyond the rank.
    #[arg(long, default_value_t = 10)]
    pub oversample: usize,
    /// Randomized SVD: power iterations.
    #[arg(long, default_value_t = 2)]
    pub power_iters: usize,
    /// Randomized SVD: seed of the Gaussian test matrix.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SvdArgs {
    pub(crate) fn options(&self) -> SvdOptions {
        SvdOptions {
            method: if self.randomized {
                SvdMethod::Randomized
            } else if self.exact {
                SvdMethod::Exact
            } else {
                SvdMethod::Auto
            },
            oversample: self.oversample,
            power_iters: self.power_iters,
            seed: self.seed,
        }
    }
}

/// `compress` arguments.
#[derive(clap::Args, Debug)]
pub struct CompressArgs {
    /// A PEFT LoRA adapter directory.
    pub adapter: PathBuf,
    /// Output adapter directory.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub rank: RankArgs,
    /// Give each module its own rank (written to rank_pattern); otherwise every module gets the
    /// largest rank the rule picks for any module.
    #[arg(long)]
    pub per_module: bool,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `extract` arguments.
#[derive(clap::Args, Debug)]
pub struct ExtractArgs {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The fine-tuned checkpoint (same architecture and tensor names).
    pub finetuned: PathBuf,
    /// Output adapter directory.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub rank: RankArgs,
    #[command(flatten)]
    pub svd: SvdArgs,
    /// Extract LoRAs for the embeddings and the output head instead of saving them whole
    /// (modules_to_save).
    #[arg(long)]
    pub embed_lora: bool,
    /// Store the largest differences instead of a LoRA: per tensor, the top --density fraction
    /// of |W_ft − W_base| as (index, value) pairs, in one .safetensors file.
    #[arg(long, requires = "density")]
    pub sparse: bool,
    /// With --sparse: the fraction of each tensor's entries to keep (0 < d ≤ 1).
    #[arg(long, requires = "sparse")]
    pub density: Option<f64>,
    /// Dtype of the factors: auto (each fine-tuned tensor's own), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `convert` arguments.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The adapter to convert (any supported format).
    pub adapter: PathBuf,
    /// Output: a directory (peft, mlx, diffusers) or a file (kohya, lycoris: .safetensors;
    /// gguf: .gguf; diffusers also takes a .safetensors file).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write the adapter in this format.
    #[arg(long, value_parser = ["peft", "kohya", "lycoris", "diffusers", "gguf", "mlx", "adapterhub"], conflicts_with = "to_family", required_unless_present = "to_family")]
    pub to: Option<String>,
    /// Read the input as this format instead of detecting it.
    #[arg(long, value_parser = ["peft", "kohya", "lycoris", "diffusers", "gguf", "mlx", "adapterhub", "sparse"])]
    pub from: Option<String>,
    /// With --to gguf: the llama.cpp architecture (llama, qwen2, …) when --base does not say;
    /// with --to diffusers: the component for modules without one (unet, transformer, …).
    #[arg(long)]
    pub arch: Option<String>,
    /// With --to and --base: convert only the modules of this pipeline component (unet,
    /// transformer, text_encoder, …).
    #[arg(long, requires = "base")]
    pub component: Option<String>,
    /// Turn the adapter into this family (by an SVD of each module's update).
    #[arg(long, value_parser = ["lora"])]
    pub to_family: Option<String>,
    /// The base model. With --to: the model the adapter was trained on, whose module names
    /// resolve kohya/LyCORIS flattened names and Flux's fused projections, and whose config gives
    /// GGUF's architecture and head counts (a model directory, a diffusers pipeline directory, a
    /// .safetensors or a .gguf file). With --to-family: needed when a module's update depends on
    /// the base weight (OFT, BOFT, HRA, IA3, DoRA in other families…) or its shape is not
    /// recorded.
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[command(flatten)]
    pub rank: RankArgs,
    #[command(flatten)]
    pub svd: SvdArgs,
    /// Give each module its own rank (the default keeps each module's numerical rank).
    #[arg(long)]
    pub per_module: bool,
    /// Dtype of the factors: f32 (default), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn factor_dtype(s: &str) -> Result<Option<DType>> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "auto" => None,
        "f32" | "float32" | "fp32" => Some(DType::F32),
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "float16" | "fp16" => Some(DType::F16),
        other => bail!("--dtype {other:?}: expected auto, f32, bf16 or f16"),
    })
}

pub(crate) fn report_json(rep: &LowRankReport) -> Value {
    json!(rep
        .modules
        .iter()
        .map(|m| json!({
            "module": m.module,
            "shape": [m.rows, m.cols],
            "rank_before": m.rank_before,
            "rank": m.rank,
            "relative_error": m.error,
            "energy_kept": m.energy,
            "svd": m.method,
        }))
        .collect::<Vec<_>>())
}

pub(crate) fn print_table(rep: &LowRankReport) {
    if rep.modules.is_empty() {
        return;
    }
    let width = rep
        .modules
        .iter()
        .map(|m| m.module.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:width$}  {:>11}  {:>6}  {:>11}  {:>9}  svd",
        "module", "shape", "rank", "rel. error", "energy"
    );
    for m in &rep.modules {
        let rank = match m.rank_before {
            Some(b) => format!("{b}→{}", m.rank),
            None => m.rank.to_string(),
        };
        println!(
            "{:width$}  {:>11}  {:>6}  {:>11.3e}  {:>8.4}%  {}",
            m.module,
            format!("{}×{}", m.rows, m.cols),
            rank,
            m.error,
            100.0 * m.energy,
            m.method
        );
    }
}

pub(crate) fn summary(rep: &LowRankReport) -> String {
    let n = rep.modules.len();
    if n == 0 {
        return "no module factorised".into();
    }
    let (lo, hi) = rep.modules.iter().fold((usize::MAX, 0), |(lo, hi), m| {
        (lo.min(m.rank), hi.max(m.rank))
    });
    let mean = rep.modules.iter().map(|m| m.error).sum::<f64>() / n as f64;
    let ranks = if lo == hi {
        format!("rank {lo}")
    } else {
        format!("ranks {lo}–{hi}")
    };
    format!(
        "{n} module(s), {ranks}, relative error max {:.3e}, mean {:.3e}",
        rep.max_error(),
        mean
    )
}

/// `adapterkit compress`.
pub fn run_compress(a: CompressArgs) -> Result<()> {
    let policy = a.rank.policy(None)?;
    let pa = peft::open(&a.adapter).with_context(|| format!("opening {}", a.adapter.display()))?;
    if same(&a.output, &a.adapter) {
        bail!("{}: the output cannot be the input", a.output.display());
    }
    let mut out = AdapterWriter::create(&a.output, a.force)?;
    let opts = LowRankOptions {
        policy,
        per_module: a.per_module,
        svd: SvdOptions::default(),
    };
    let started = std::time::Instant::now();
    let (cfg, rep) = compress::compress(&pa.adapter, &pa.config_json, &opts, &mut out)?;
    out.finish(&cfg)?;
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = json!({"output": a.output, "modules": report_json(&rep), "seconds": secs});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_table(&rep);
        println!(
            "compressed {} into {}: {} in {:.2}s",
            a.adapter.display(),
            a.output.display(),
            summary(&rep),
            secs
        );
    }
    Ok(())
}

/// `adapterkit extract`.
/// The base and fine-tuned checkpoints of `extract`, neither of them the output.
fn open_pair(a: &ExtractArgs) -> Result<(Checkpoint, Checkpoint)> {
    let base =
        Checkpoint::open(&a.base).with_context(|| format!("opening base {}", a.base.display()))?;
    let ft = Checkpoint::open(&a.finetuned)
        .with_context(|| format!("opening fine-tune {}", a.finetuned.display()))?;
    if same(&a.output, &a.base) || same(&a.output, &a.finetuned) {
        bail!("{}: the output cannot be an input", a.output.display());
    }
    Ok((base, ft))
}

/// `extract --sparse`.
fn run_extract_sparse(a: &ExtractArgs, density: f64) -> Result<()> {
    if a.output.extension().is_none_or(|e| e != "safetensors") {
        bail!(
            "{}: a sparse difference is one file; name it *.safetensors",
            a.output.display()
        );
    }
    let (base, ft) = open_pair(a)?;
    let started = std::time::Instant::now();
    let rep =
        adapterkit_ops::sparse_extract::extract_sparse(&base, &ft, density, &a.output, a.force)?;
    let secs = started.elapsed().as_secs_f64();
    let stored: u64 = rep.tensors.iter().map(|t| t.nnz).sum();
    if a.json {
        let v = json!({
            "output": a.output, "density": density, "stored": stored,
            "total_rel_error": rep.total_rel_error, "unchanged_tensors": rep.unchanged,
            "tensors": rep.tensors.iter().map(|t| json!({"tensor": t.name, "numel": t.numel,
                "k": t.k, "nnz": t.nnz, "rel_error": t.rel_error})).collect::<Vec<_>>(),
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<56} {:>10} {:>10} {:>10}",
            "tensor", "elements", "stored", "rel. error"
        );
        for t in &rep.tensors {
            println!(
                "{:<56} {:>10} {:>10} {:>10.4}",
                t.name, t.numel, t.nnz, t.rel_error
            );
        }
        println!(
            "extracted {stored} entries of {} changed tensor(s) (density {density}) into {}: relative error {:.4} over the model; {} tensor(s) unchanged; {secs:.2}s",
            rep.tensors.len(),
            a.output.display(),
            rep.total_rel_error,
            rep.unchanged
        );
    }
    Ok(())
}

pub fn run_extract(a: ExtractArgs) -> Result<()> {
    if a.sparse {
        let d = a.density.context("--sparse needs --density")?;
        return run_extract_sparse(&a, d);
    }
    let policy = a.rank.policy(None)?;
    let dtype = factor_dtype(&a.dtype)?;
    let (base, ft) = open_pair(&a)?;
    let svd_opts = a.svd.options();
    if matches!(policy.rule, RankRule::Energy(_) | RankRule::MaxError(_))
        && policy.max_rank.is_none()
        && svd_opts.method == SvdMethod::Auto
        && !a.json
    {
        eprintln!("note: without --max-rank, --energy/--max-error need every singular value: exact SVDs throughout (slow on large models; add --max-rank R to allow the randomized SVD)");
    }
    let mut out = AdapterWriter::create(&a.output, a.force)?;
    let opts = ExtractOptions {
        lowrank: LowRankOptions {
            policy,
            per_module: true,
            svd: svd_opts,
        },
        embed_lora: a.embed_lora,
        dtype,
    };
    let started = std::time::Instant::now();
    let show = !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = |done: usize, total: usize| {
        if show {
            eprint!("\r{done}/{total} tensors   ");
        }
    };
    let (cfg, rep) = extract::extract(&base, &ft, &opts, &mut out, &progress)?;
    if show {
        eprint!("\r{:40}\r", "");
    }
    out.finish(&cfg)?;
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = json!({
            "output": a.output,
            "modules": report_json(&rep.lowrank),
            "modules_to_save": rep.modules_to_save,
            "lora_biases": rep.lora_biases,
            "unchanged_tensors": rep.unchanged,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_table(&rep.lowrank);
        if !rep.modules_to_save.is_empty() {
            println!(
                "saved whole (modules_to_save): {}",
                rep.modules_to_save.join(", ")
            );
        }
        println!(
            "extracted {} into {}: {}; {} bias(es) as lora_bias, {} module(s) saved whole, {} tensor(s) unchanged; {:.2}s",
            a.finetuned.display(),
            a.output.display(),
            summary(&rep.lowrank),
            rep.lora_biases,
            rep.modules_to_save.len(),
            rep.unchanged,
            secs
        );
    }
    Ok(())
}

pub(crate) fn open_base(path: Option<&Path>) -> Result<Option<Checkpoint>> {
    path.map(|p| Checkpoint::open(p).with_context(|| format!("opening base {}", p.display())))
        .transpose()
}

pub(crate) fn model_type(b: &Checkpoint) -> Option<&str> {
    b.config()
        .and_then(|c| c.get("model_type"))
        .and_then(Value::as_str)
}

/// Whether two paths name the same existing file or directory.
pub fn same(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `adapterkit convert --to-family lora`.
pub fn run_convert(a: ConvertArgs) -> Result<()> {
    if let Some(to) = a.to.clone() {
        return run_convert_format(a, &to);
    }
    let policy = a.rank.policy(Some(RankRule::MaxError(1e-6)))?;
    let dtype = factor_dtype(&a.dtype)?.unwrap_or(DType::F32);
    let mut pa =
        peft::open(&a.adapter).with_context(|| format!("opening {}", a.adapter.display()))?;
    let base = open_base(a.base.as_deref())?;
    if let Some(b) = &base {
        let fixed = adapterkit_ops::plan::conv1d_layout(&mut pa.adapter, model_type(b));
        pa.adapter.notes.extend(fixed);
    }
    for n in &pa.adapter.notes {
        eprintln!("note: {}: {n}", a.adapter.display());
    }
    if same(&a.output, &a.adapter) {
        bail!("{}: the output cannot be the input", a.output.display());
    }
    let ds = deltas::adapter_deltas(
        &pa.adapter,
        base.as_ref()
            .map(|b| (b.root(), b as &dyn adapterkit_core::TensorSource)),
        false,
    )?;
    let mut out = AdapterWriter::create(&a.output, a.force)?;
    let opts = LowRankOptions {
        policy,
        per_module: a.per_module || a.rank.rank.is_none(),
        svd: a.svd.options(),
    };
    let base_model = pa
        .adapter
        .base_model
        .clone()
        .or_else(|| a.base.as_ref().map(|p| p.display().to_string()));
    let started = std::time::Instant::now();
    let (cfg, rep) = compress::to_lora(
        &pa.adapter,
        &ds,
        base.as_ref()
            .map(|b| b as &dyn adapterkit_core::TensorSource),
        base_model.as_deref(),
        dtype,
        &opts,
        &mut out,
    )?;
    out.finish(&cfg)?;
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = json!({"output": a.output, "modules": report_json(&rep), "notes": rep.notes, "seconds": secs});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_table(&rep);
        for n in &rep.notes {
            eprintln!("note: {n}");
        }
        println!(
            "converted {} ({}) to LoRA in {}: {} in {:.2}s",
            a.adapter.display(),
            pa.adapter.method,
            a.output.display(),
            summary(&rep),
            secs
        );
    }
    Ok(())
}

/// The numerical rank: values above `σ₁ · max(m, n) · ε_f32` (updates are computed in f32).
fn numerical_rank(s: &[f64], rows: usize, cols: usize) -> usize {
    let tol = s.first().copied().unwrap_or(0.0) * rows.max(cols) as f64 * f32::EPSILON as f64;
    s.iter().filter(|&&x| x > tol).count()
}

/// `adapterkit inspect ADAPTER --spectrum`.
pub fn run_spectrum(
    path: &Path,
    base: Option<&Path>,
    plot_path: Option<&Path>,
    as_json: bool,
) -> Result<()> {
    let mut pa = peft::open(path).with_context(|| format!("opening {}", path.display()))?;
    let base = open_base(base)?;
    if let Some(b) = &base {
        adapterkit_ops::plan::conv1d_layout(&mut pa.adapter, model_type(b));
    }
    let ds = deltas::adapter_deltas(
        &pa.adapter,
        base.as_ref()
            .map(|b| (b.root(), b as &dyn adapterkit_core::TensorSource)),
        true,
    )?;
    let mut rows_out = Vec::new();
    let mut curves: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    for md in &ds.matrices {
        let (s, total_sq) = match &md.data {
            DeltaData::Product { l, r, k } => {
                let f = svd::factor_product(&md.module, l, r, md.rows, *k, md.cols)?;
                (f.svd.s, f.total_sq)
            }
            DeltaData::Dense(d) => {
                let a: Vec<f64> = d.iter().map(|&x| x as f64).collect();
                let s = svd::singular_values(&md.module, &a, md.rows, md.cols)?;
                let t = a.iter().map(|x| x * x).sum();
                (s, t)
            }
        };
        let rank = numerical_rank(&s, md.rows, md.cols);
        let energy: Vec<f64> = (1..=s.len())
            .map(|k| svd::energy_kept(&s, total_sq, k))
            .collect();
        let at = |e: f64| {
            svd::RankPolicy {
                rule: RankRule::Energy(e),
                max_rank: None,
            }
            .choose(&s, total_sq)
        };
        let kind = md
            .module
            .rsplit('.')
            .next()
            .unwrap_or(&md.module)
            .to_string();
        curves.entry(kind).or_default().push(energy.clone());
        rows_out.push(json!({
            "module": md.module,
            "target": md.target,
            "shape": [md.rows, md.cols],
            // Without a base, a DoRA module's spectrum is that of its direction B·A only.
            "dora_direction_only": md.lora.as_ref().is_some_and(|l| l.magnitude.is_some()),
            "frobenius": total_sq.sqrt(),
            "numerical_rank": rank,
            "effective_rank": svd::effective_rank(&s),
            "rank_at_energy": {"0.9": at(0.9), "0.99": at(0.99), "0.999": at(0.999)},
            "singular_values": s,
            "energy": energy,
        }));
    }
    if let Some(p) = plot_path {
        let series: Vec<plot::Series> = curves
            .iter()
            .map(|(kind, cs)| {
                let len = cs.iter().map(Vec::len).max().unwrap_or(0);
                // Mean over the modules of this type; a shorter curve has reached 1.
                let energy = (0..len)
                    .map(|k| {
                        cs.iter().map(|c| *c.get(k).unwrap_or(&1.0)).sum::<f64>() / cs.len() as f64
                    })
                    .collect();
                plot::Series {
                    label: format!("{kind} ({})", cs.len()),
                    energy,
                }
            })
            .collect();
        // The path as given, its last 70 characters.
        let shown = path.display().to_string();
        let tail: String = {
            let chars: Vec<char> = shown.chars().collect();
            chars[chars.len().saturating_sub(70)..].iter().collect()
        };
        let title = format!("energy kept vs rank: {tail}");
        plot::energy_chart(p, &title, &series)?;
    }
    if as_json {
        let v = json!({"adapter": path, "method": pa.adapter.method, "modules": rows_out});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let width = rows_out
        .iter()
        .map(|r| r["module"].as_str().unwrap_or("").len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:width$}  {:>11}  {:>5}  {:>7}  {:>5}  {:>5}  top singular values",
        "module", "shape", "rank", "eff.", "90%", "99%"
    );
    for r in &rows_out {
        let s: Vec<String> = r["singular_values"]
            .as_array()
            .map(|a| {
                a.iter()
                    .take(4)
                    .map(|x| format!("{:.4e}", x.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:width$}  {:>11}  {:>5}  {:>7.2}  {:>5}  {:>5}  {}",
            r["module"].as_str().unwrap_or(""),
            format!("{}×{}", r["shape"][0], r["shape"][1]),
            r["numerical_rank"],
            r["effective_rank"].as_f64().unwrap_or(0.0),
            r["rank_at_energy"]["0.9"],
            r["rank_at_energy"]["0.99"],
            s.join(" ")
        );
    }
    if let Some(p) = plot_path {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// `convert --to FORMAT`: read any format into the IR and write it as another.
fn run_convert_format(a: ConvertArgs, to: &str) -> Result<()> {
    use adapterkit_formats::base_names::BaseNames;
    use adapterkit_formats::convert::{self, AdapterFormat, WriteOptions};
    let to = AdapterFormat::from_name(to).expect("clap checked");
    let from = crate::parse_format(a.from.as_deref())?;
    if same(&a.output, &a.adapter) {
        bail!("{}: the output cannot be the input", a.output.display());
    }
    let mut names = a
        .base
        .as_deref()
        .map(|p| BaseNames::open(p).with_context(|| format!("opening base {}", p.display())))
        .transpose()?;
    if let (Some(n), Some(c)) = (names.as_mut(), &a.component) {
        n.only = Some(c.clone());
    }
    let pa = convert::open(&a.adapter, from, names.as_ref())
        .with_context(|| format!("opening {}", a.adapter.display()))?;
    for n in &pa.adapter.notes {
        eprintln!("note: {}: {n}", a.adapter.display());
    }
    let written = convert::write(
        &pa.adapter,
        to,
        &a.output,
        &WriteOptions {
            overwrite: a.force,
            base: names,
            arch: a.arch.clone(),
        },
    )?;
    for n in &written.notes {
        eprintln!("note: {n}");
    }
    if a.json {
        let v = serde_json::json!({
            "from": pa.adapter.format,
            "to": to.name(),
            "modules": pa.adapter.modules.len(),
            "files": written.files,
            "notes": written.notes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "converted {} ({}, {} modules) to {} {}",
            a.adapter.display(),
            pa.adapter.format,
            pa.adapter.modules.len(),
            to,
            a.output.display()
        );
    }
    Ok(())
}
