//! The `adapterkit` command-line tool: clap arguments → validated options → library calls.

mod check;
mod combine;
mod diff;
mod inspect;
mod lowrank;
mod mix;
mod plot;
mod quant;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use adapterkit_core::DType;
use adapterkit_formats::base_names::BaseNames;
use adapterkit_formats::convert::{self, AdapterFormat};
use adapterkit_formats::{peft, Checkpoint};
use adapterkit_ops::{Direction, ExecOptions, OutDType, Output, Sharding, WeightedAdapter};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// mimalloc returns freed memory to the system promptly; glibc's per-thread arenas kept up to 2×
/// the live set of the SVD commands' transient buffers resident.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load, validate, inspect and merge parameter-efficient fine-tuning adapters.
#[derive(Parser, Debug)]
#[command(name = "adapterkit", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Merge one or more adapters into a base checkpoint, streaming, in one pass.
    Merge(MergeArgs),
    /// Take adapters back out of a merged checkpoint (the exact inverse of `merge`).
    Unmerge(MergeArgs),
    /// Describe a base checkpoint, an adapter or a safetensors file.
    Inspect(InspectArgs),
    /// Compare two checkpoints tensor by tensor (names, shapes, dtypes, largest differences).
    Diff(DiffArgs),
    /// Re-factorise a LoRA adapter to a lower rank (optimal truncated SVD, per module).
    Compress(lowrank::CompressArgs),
    /// Extract a LoRA adapter from a fine-tuned checkpoint: SVD of W_finetuned − W_base.
    Extract(lowrank::ExtractArgs),
    /// Convert an adapter: `--to-family lora` turns any family into a LoRA by an SVD of its
    /// update.
    Convert(lowrank::ConvertArgs),
    /// Combine several adapters into one PEFT LoRA: exact in ΔW space (cat, linear, svd, and
    /// ties/dare/magnitude_prune/breadcrumbs/della re-factorised to a rank), or PEFT's
    /// add_weighted_adapter file for file with --compat peft.
    Combine(combine::CombineArgs),
    /// Check adapters and safetensors files against a catalogue of rules (a CI gate): exit 0
    /// clean, 1 findings, 2 usage or I/O errors.
    Check(check::CheckArgs),
    /// Quantize a model: a GGUF model to a llama.cpp scheme (q4_k_m, q8_0, …), or a Hugging
    /// Face checkpoint to a GGUF model (converted as llama.cpp's convert_hf_to_gguf.py does).
    Quantize(quant::QuantizeArgs),
}

#[derive(clap::Args, Debug)]
struct DiffArgs {
    /// First checkpoint (directory or .safetensors file).
    a: PathBuf,
    /// Second checkpoint.
    b: PathBuf,
    /// Fail (exit 1) when a tensor's largest difference exceeds this fraction of its largest
    /// magnitude.
    #[arg(long)]
    tolerance: Option<f64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct MergeArgs {
    /// Base checkpoint (for `unmerge`: the merged checkpoint): a Hugging Face model directory or
    /// a .safetensors file.
    base: Option<PathBuf>,
    /// Adapters in any supported format (PEFT directories, kohya/LyCORIS/diffusers .safetensors,
    /// GGUF LoRA files, mlx-lm directories; detected from content); with
    /// --method, the models to merge (checkpoints, adapters, or MODEL+ADAPTER).
    adapters: Vec<PathBuf>,
    /// Output: a directory laid out like the base, or a single file ending in .safetensors.
    #[arg(short, long)]
    output: PathBuf,
    /// Comma-separated weight per adapter (default 1.0 each); negative weights subtract.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    weights: Option<Vec<f64>>,
    /// Output dtype: auto keeps each tensor's dtype; f32, bf16, f16 convert every float tensor.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Re-shard the output into files of at most this size (e.g. 5GB, 500MB, 2GiB).
    #[arg(long)]
    shard_size: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Allow the output to be the base itself; its files are replaced atomically.
    #[arg(long)]
    in_place: bool,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Write merged tensors even if they contain NaN or infinity.
    #[arg(long)]
    allow_nonfinite: bool,
    /// Elements per row block (tuning; the default suits common caches).
    #[arg(long, hide = true)]
    block_elems: Option<usize>,
    /// Flush the output to disk (fsync) before renaming it into place.
    #[arg(long)]
    fsync: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Read every adapter as this format instead of detecting it (peft, kohya, lycoris,
    /// diffusers, gguf, mlx).
    #[arg(long)]
    from: Option<String>,
    /// Merge only the modules of this pipeline component (unet, transformer, text_encoder,
    /// text_encoder_2, text_encoder_3) of adapters that cover several, into a base that is that
    /// component alone.
    #[arg(long)]
    component: Option<String>,
    /// Quantize the merged model: a llama.cpp scheme (q4_k_m, q5_k_m, q8_0, q6_k, f16, …) for
    /// GGUF output. Into a GGUF base without --quant, merged tensors keep their own types
    /// (quantized ones are requantized).
    #[arg(long)]
    quant: Option<String>,
    /// With GGUF output: llama-quantize --pure (every quantizable tensor gets the scheme's type).
    #[arg(long)]
    pure: bool,
    /// With GGUF output: print each written tensor's quantization error.
    #[arg(long)]
    report_error: bool,
    /// Merge the parts of an AdapterHub union that fold into the weights (LoRA, IA3, …) and leave
    /// the others out, naming them, as the adapters library's merge_adapter does.
    #[arg(long)]
    mergeable_parts: bool,
    #[command(flatten)]
    methods: mix::MethodArgs,
}

#[derive(clap::Args, Debug)]
struct InspectArgs {
    /// A model directory, an adapter directory or a .safetensors file.
    path: PathBuf,
    /// Print each module's singular values, effective rank and energy curve (adapters).
    #[arg(long)]
    spectrum: bool,
    /// With --spectrum: the base checkpoint, for families whose update depends on the base
    /// weight.
    #[arg(long, requires = "spectrum")]
    base: Option<PathBuf>,
    /// With --spectrum: write a PNG chart of energy kept against rank, one line per module type.
    #[arg(long, requires = "spectrum")]
    plot: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_dtype(s: &str) -> Result<OutDType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "auto" => OutDType::Auto,
        "f32" | "float32" | "fp32" => OutDType::Fixed(DType::F32),
        "bf16" | "bfloat16" => OutDType::Fixed(DType::BF16),
        "f16" | "float16" | "fp16" => OutDType::Fixed(DType::F16),
        other => bail!("--dtype {other:?}: expected auto, f32, bf16 or f16"),
    })
}

/// Parse a size such as `5GB`, `500MB`, `2GiB` or a plain number of bytes.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("--shard-size {s:?}: not a size"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        "TIB" => 1024f64.powi(4),
        u => bail!("--shard-size {s:?}: unknown unit {u:?} (use B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let v = n * mult;
    if !(v >= 1.0 && v < u64::MAX as f64) {
        bail!("--shard-size {s:?}: must be at least one byte");
    }
    Ok(v as u64)
}

fn run_merge(mut a: MergeArgs, direction: Direction) -> Result<()> {
    let out_dtype = parse_dtype(&a.dtype)?;
    let sharding = match &a.shard_size {
        Some(s) => Sharding::MaxBytes(parse_size(s)?),
        None => Sharding::Preserve,
    };
    let output = Output {
        path: a.output.clone(),
        sharding,
        in_place: a.in_place,
        overwrite: a.force || a.in_place,
    };
    let opts = ExecOptions {
        threads: a.threads,
        allow_nonfinite: a.allow_nonfinite,
        fsync: a.fsync,
        progress: None,
        block_elems: a
            .block_elems
            .unwrap_or(ExecOptions::default().block_elems)
            .max(1),
    };
    if a.methods.any() {
        if direction == Direction::Unmerge {
            bail!("unmerge takes adapters out again; --method and --recipe belong to merge");
        }
        let methods = std::mem::take(&mut a.methods);
        return mix::run(
            methods,
            mix::Common {
                base: a.base,
                sources: a.adapters,
                weights: a.weights,
                out_dtype,
                output,
                exec: opts,
                json: a.json,
            },
        );
    }
    let Some(base_path) = a.base.clone() else {
        bail!("give BASE and at least one adapter (or --recipe)");
    };
    if a.adapters.is_empty() {
        bail!(
            "give at least one adapter to {}",
            if direction == Direction::Merge {
                "merge"
            } else {
                "unmerge"
            }
        );
    }
    let weights = match a.weights.clone() {
        Some(w) if w.len() != a.adapters.len() => {
            bail!(
                "--weights has {} value(s) but {} adapter(s) were given",
                w.len(),
                a.adapters.len()
            )
        }
        Some(w) => w,
        None => vec![1.0; a.adapters.len()],
    };
    if let Some(p) = a.adapters.iter().find(|p| lowrank::same(&a.output, p)) {
        bail!(
            "{}: the output cannot be an input (adapter {})",
            a.output.display(),
            p.display()
        );
    }
    if base_path.is_file() && adapterkit_formats::gguf::GgufFile::sniff(&base_path) {
        return merge_into_gguf(&a, &base_path, weights, direction);
    }
    let gguf_out = a.output.extension().is_some_and(|e| e == "gguf");
    let target = a.quant.as_deref().map(quant::parse_target).transpose()?;
    if let Some(quant::Target::Gguf(_)) = target {
        if !gguf_out {
            bail!(
                "--quant {} writes a GGUF model; name the output *.gguf ({} is not)",
                a.quant.as_deref().unwrap_or(""),
                a.output.display()
            );
        }
    }
    if base_path.is_dir() {
        let names = BaseNames::open(&base_path)?;
        if names.is_pipeline() {
            return merge_pipeline(&a, &base_path, names, weights, direction, out_dtype, &opts);
        }
    }
    let base = Checkpoint::open(&base_path)
        .with_context(|| format!("opening base {}", base_path.display()))?;
    if let Some(p) = a.adapters.iter().find(|p| lowrank::same(&a.output, p)) {
        bail!(
            "{}: the output cannot be an input (adapter {})",
            a.output.display(),
            p.display()
        );
    }
    let model_type = base
        .config()
        .and_then(|c| c.get("model_type"))
        .and_then(|v| v.as_str());
    let mut names = BaseNames::from_checkpoint(&base);
    names.path = base_path.clone();
    names.only = a.component.clone();
    let adapters: Vec<WeightedAdapter> = open_adapters_parts(
        &a.adapters,
        model_type,
        parse_format(a.from.as_deref())?,
        Some(&names),
        a.mergeable_parts,
    )?
    .into_iter()
    .zip(weights)
    .map(|(pa, weight)| WeightedAdapter {
        adapter: pa.adapter,
        weight,
    })
    .collect();
    let started = std::time::Instant::now();
    if gguf_out {
        if direction == Direction::Unmerge {
            bail!("unmerge writes safetensors checkpoints, not GGUF");
        }
        let scheme = match target {
            Some(quant::Target::Gguf(s)) => s,
            Some(quant::Target::St(f)) => bail!(
                "--quant {}: quantized safetensors go to a directory, not a .gguf file",
                f.name()
            ),
            None => adapterkit_formats::gguf_quant::Scheme::F16,
        };
        let wopts = quant::write_options(a.threads, a.report_error, a.allow_nonfinite);
        let r = quant::hf_to_gguf(&base_path, adapters, &a.output, scheme, a.pure, &wopts)?;
        let secs = started.elapsed().as_secs_f64();
        return report_gguf_write(&a, &r, scheme.name(), secs, &[], &[]);
    }
    let st_format = match target {
        Some(quant::Target::St(f)) => Some(f),
        _ => None,
    };
    if st_format.is_some() || adapterkit_formats::bnb::is_bnb(&base) {
        if direction == Direction::Unmerge {
            bail!("unmerge works on unquantized checkpoints");
        }
        let r = quant::to_safetensors(
            &base,
            adapters,
            &output,
            st_format,
            out_dtype,
            a.report_error,
            &opts,
        )?;
        let what = st_format.map_or("dequantized", |f| f.name());
        return quant::print_st(&a.output, what, &r, started.elapsed().as_secs_f64(), a.json);
    }
    let plan = adapterkit_ops::plan_direction(
        base.root(),
        &base,
        base.tensors(),
        adapters,
        out_dtype,
        direction,
    )?;
    let report = with_progress(!a.json, plan.out_bytes(), |progress| {
        let opts = ExecOptions { progress, ..opts };
        adapterkit_ops::execute(&base, &plan, &output, &opts)
    })?;
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "output": a.output,
            "files": report.files,
            "tensors": report.tensors,
            "merged": report.merged,
            "converted": report.converted,
            "copied": report.copied,
            "bytes": report.bytes,
            "seconds": secs,
            "skipped_files": report.skipped_files,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} {} adapter(s) {} {}: {} tensors ({} changed, {} converted, {} copied), {} in {:.2}s",
            if direction == Direction::Merge { "merged" } else { "unmerged" },
            a.adapters.len(),
            if direction == Direction::Merge { "into" } else { "out of" },
            a.output.display(),
            report.tensors,
            report.merged,
            report.converted,
            report.copied,
            inspect::human_bytes(report.bytes),
            secs
        );
        for f in &report.skipped_files {
            eprintln!("note: not carried over from the base: {f} (weights in another format would hold the unmerged values)");
        }
    }
    Ok(())
}

/// The part of `adapter` that lands in pipeline component `comp`, with the component prefix
/// taken off the module names.
fn restrict(adapter: &adapterkit_core::ir::Adapter, comp: &str) -> adapterkit_core::ir::Adapter {
    let prefix = format!("{comp}.");
    let mut out = adapter.clone();
    out.modules = adapter
        .modules
        .iter()
        .filter_map(|m| {
            let module = m.module.strip_prefix(&prefix)?.to_string();
            let target = m.target.strip_prefix(&prefix)?.to_string();
            Some(adapterkit_core::ir::ModuleAdapter {
                module,
                target,
                ..m.clone()
            })
        })
        .collect();
    // The reader checked that every tensor of the file is understood; each component's plan
    // checks its own modules' tensors.
    let used: std::collections::BTreeSet<&str> = out
        .modules
        .iter()
        .flat_map(|m| m.payload.tensors())
        .collect();
    out.tensor_names = used.iter().map(|s| s.to_string()).collect();
    out
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)
                .with_context(|| format!("copying {} to {}", e.path().display(), dst.display()))?;
        }
    }
    Ok(())
}

/// `merge` into a diffusers pipeline directory: each component an adapter touches (`unet/`,
/// `transformer/`, `text_encoder/`, …) is merged like a checkpoint; everything else is copied.
#[allow(clippy::too_many_arguments)]
fn merge_pipeline(
    a: &MergeArgs,
    base_path: &std::path::Path,
    names: BaseNames,
    weights: Vec<f64>,
    direction: Direction,
    out_dtype: OutDType,
    opts: &ExecOptions,
) -> Result<()> {
    if a.output.exists() && !a.force {
        bail!("{}: exists; pass --force to replace it", a.output.display());
    }
    let opened = open_adapters(
        &a.adapters,
        None,
        parse_format(a.from.as_deref())?,
        Some(&names),
    )?;
    let parent = a
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".adapterkit-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .tempdir_in(parent)?;
    let mut touched = 0;
    let mut changed = 0;
    for e in std::fs::read_dir(base_path)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let dst = staging.path().join(&name);
        let is_comp = names.component(&name).is_some();
        let parts: Vec<WeightedAdapter> = if is_comp {
            opened
                .iter()
                .zip(&weights)
                .map(|(pa, w)| WeightedAdapter {
                    adapter: restrict(&pa.adapter, &name),
                    weight: *w,
                })
                .filter(|wa| !wa.adapter.modules.is_empty())
                .collect()
        } else {
            Vec::new()
        };
        if parts.is_empty() {
            if e.file_type()?.is_dir() {
                copy_tree(&e.path(), &dst)?;
            } else {
                std::fs::copy(e.path(), &dst)?;
            }
            continue;
        }
        let ck = Checkpoint::open(e.path())?;
        let plan = adapterkit_ops::plan_direction(
            ck.root(),
            &ck,
            ck.tensors(),
            parts,
            out_dtype,
            direction,
        )?;
        let output = Output {
            path: dst,
            sharding: Sharding::Preserve,
            in_place: false,
            overwrite: false,
        };
        let rep = adapterkit_ops::execute(&ck, &plan, &output, opts)?;
        touched += 1;
        changed += rep.merged;
    }
    let total: usize = opened.iter().map(|pa| pa.adapter.modules.len()).sum();
    if a.output.exists() {
        std::fs::remove_dir_all(&a.output)?;
    }
    let kept = staging.keep();
    std::fs::rename(&kept, &a.output)
        .with_context(|| format!("moving the result into {}", a.output.display()))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "output": a.output, "components_merged": touched, "tensors_changed": changed, "modules": total,
            }))?
        );
    } else {
        println!(
            "merged {} adapter(s) ({total} modules) into {}: {touched} component(s), {changed} tensors changed",
            a.adapters.len(),
            a.output.display()
        );
    }
    Ok(())
}

/// `merge` into a GGUF model: adapters (GGUF LoRA files keep their GGUF names; others are
/// mapped through the architecture's table) merged into a GGUF file.
fn merge_into_gguf(
    a: &MergeArgs,
    base_path: &std::path::Path,
    weights: Vec<f64>,
    direction: Direction,
) -> Result<()> {
    if direction == Direction::Unmerge {
        bail!(
            "unmerge works on safetensors checkpoints; {} is GGUF",
            base_path.display()
        );
    }
    if a.output.extension().is_none_or(|e| e != "gguf") {
        bail!(
            "{}: a GGUF base is merged into a GGUF file; name the output *.gguf",
            a.output.display()
        );
    }
    let file = Arc::new(
        adapterkit_formats::gguf::GgufFile::open(base_path)
            .with_context(|| format!("opening base {}", base_path.display()))?,
    );
    if adapterkit_formats::gguf_lora::is_adapter(&file) {
        bail!("{}: is a GGUF adapter, not a model", base_path.display());
    }
    let names = BaseNames::open(base_path)?;
    let opened = open_adapters(
        &a.adapters,
        None,
        parse_format(a.from.as_deref())?,
        Some(&names),
    )?;
    let arch = file
        .get_str("general.architecture")
        .unwrap_or("")
        .to_string();
    let mut adapters = Vec::new();
    for (mut pa, weight) in opened.into_iter().zip(weights) {
        adapterkit_formats::gguf_lora::to_gguf_names(&mut pa.adapter, &arch, &names)?;
        adapters.push(WeightedAdapter {
            adapter: pa.adapter,
            weight,
        });
    }
    let scheme = match a.quant.as_deref().map(quant::parse_target).transpose()? {
        Some(quant::Target::Gguf(s)) => Some(s),
        Some(quant::Target::St(f)) => bail!(
            "--quant {}: a GGUF base is merged into GGUF; quantized safetensors come from Hugging Face checkpoints",
            f.name()
        ),
        None => None,
    };
    let wopts = quant::write_options(a.threads, a.report_error, a.allow_nonfinite);
    let started = std::time::Instant::now();
    let rep = adapterkit_ops::gguf_merge::merge_gguf(
        file, adapters, &a.output, a.force, scheme, a.pure, &wopts,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let w = adapterkit_ops::quantize::WriteReport {
        tensors: rep.report.tensors,
        copied: rep.report.copied,
        bytes: rep.report.bytes,
        errors: rep.errors.clone(),
        file: a.output.clone(),
    };
    let what = scheme.map_or("own types", |s| s.name());
    report_gguf_write(a, &w, what, secs, &rep.requantized, &rep.widened)
}

/// Print what a merge into a GGUF file wrote.
fn report_gguf_write(
    a: &MergeArgs,
    r: &adapterkit_ops::quantize::WriteReport,
    what: &str,
    secs: f64,
    requantized: &[String],
    widened: &[String],
) -> Result<()> {
    for w in widened {
        eprintln!("note: {w}: this version has no quantizer for its type (i-quants, ternary and FP4 types); merged and written as F16");
    }
    if a.json {
        let v = serde_json::json!({
            "output": a.output, "types": what, "tensors": r.tensors, "copied": r.copied,
            "bytes": r.bytes, "seconds": secs, "requantized": requantized,
            "widened_to_f16": widened, "errors": quant::errors_json(&r.errors),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "merged {} adapter(s) into {} ({what}): {} tensors ({} copied{}), {} in {secs:.2}s",
            a.adapters.len(),
            a.output.display(),
            r.tensors,
            r.copied,
            if requantized.is_empty() {
                String::new()
            } else {
                format!(", {} requantized", requantized.len())
            },
            inspect::human_bytes(r.bytes),
        );
        quant::print_errors(&r.errors, true)?;
    }
    Ok(())
}

/// Open PEFT adapters, reading GPT-2 `Conv1D` layouts for `model_type` as PEFT does and printing
/// each adapter's notes; every adapter that cannot be read is reported at once.
pub(crate) fn open_adapters(
    paths: &[PathBuf],
    model_type: Option<&str>,
    from: Option<AdapterFormat>,
    base: Option<&BaseNames>,
) -> Result<Vec<peft::PeftAdapter>> {
    open_adapters_parts(paths, model_type, from, base, false)
}

/// [`open_adapters`], with `partial`: AdapterHub unions give their mergeable parts only.
pub(crate) fn open_adapters_parts(
    paths: &[PathBuf],
    model_type: Option<&str>,
    from: Option<AdapterFormat>,
    base: Option<&BaseNames>,
    partial: bool,
) -> Result<Vec<peft::PeftAdapter>> {
    let mut opened = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        let hub = partial
            && from.is_none_or(|f| f == AdapterFormat::AdapterHub)
            && adapterkit_formats::adapterhub::sniff(p);
        let result = if hub {
            adapterkit_formats::adapterhub::open_parts(p, true)
        } else {
            convert::open(p, from, base)
        };
        match result {
            Ok(mut pa) => {
                let fixed = adapterkit_ops::plan::conv1d_layout(&mut pa.adapter, model_type);
                pa.adapter.notes.extend(fixed);
                for n in &pa.adapter.notes {
                    eprintln!("note: {}: {n}", p.display());
                }
                opened.push(pa);
            }
            Err(e) => errors.push(format!("{}: {e}", p.display())),
        }
    }
    if !errors.is_empty() {
        bail!(
            "cannot read {} adapter(s), nothing written:\n{}",
            errors.len(),
            errors.join("\n")
        );
    }
    Ok(opened)
}

/// `--from FORMAT`: force an adapter format instead of detecting it.
pub(crate) fn parse_format(s: Option<&str>) -> Result<Option<AdapterFormat>> {
    s.map(|f| {
        AdapterFormat::from_name(f).with_context(|| {
            format!(
                "--from {f:?}: expected one of {}",
                AdapterFormat::ALL.map(|f| f.name()).join(", ")
            )
        })
    })
    .transpose()
}

/// Run `work` with a progress line on stderr (when it is a terminal and `show` is set), fed by the
/// byte counter handed to `work`.
pub(crate) fn with_progress<T>(
    show: bool,
    total: u64,
    work: impl FnOnce(Option<Arc<AtomicU64>>) -> T,
) -> T {
    if !show || !std::io::stderr().is_terminal() {
        return work(None);
    }
    let counter = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let printer = {
        let (counter, done) = (counter.clone(), done.clone());
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let n = counter.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64().max(1e-3);
                eprint!(
                    "\r{:>5.1}%  {} of {}  {:.0} MB/s   ",
                    100.0 * n as f64 / total.max(1) as f64,
                    inspect::human_bytes(n),
                    inspect::human_bytes(total),
                    n as f64 / secs / 1e6
                );
            }
            eprint!("\r{:60}\r", "");
        })
    };
    let out = work(Some(counter));
    done.store(true, Ordering::Relaxed);
    let _ = printer.join();
    out
}

/// Die quietly on a closed stdout (`adapterkit inspect … | head`), as Unix tools do, instead of
/// panicking in `println!`: Rust starts programs with SIGPIPE ignored.
fn default_sigpipe() {
    #[cfg(unix)]
    #[allow(unsafe_code)]
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    let cli = Cli::parse();
    let json = match &cli.command {
        Command::Merge(a) | Command::Unmerge(a) => a.json,
        Command::Inspect(a) => a.json,
        Command::Diff(a) => a.json,
        Command::Compress(a) => a.json,
        Command::Extract(a) => a.json,
        Command::Convert(a) => a.json,
        Command::Check(a) => a.format == "json",
        Command::Combine(a) => a.json,
        Command::Quantize(a) => a.json,
    };
    let result = match cli.command {
        // check has its own exit codes: 1 for findings, 2 for usage and I/O errors.
        Command::Check(a) => {
            return match check::run(a) {
                Ok(check::Outcome::Clean) => ExitCode::SUCCESS,
                Ok(check::Outcome::Failed) => ExitCode::from(1),
                Err(e) => {
                    report_error(&e, json);
                    ExitCode::from(2)
                }
            }
        }
        Command::Merge(a) => run_merge(a, Direction::Merge),
        Command::Unmerge(a) => run_merge(a, Direction::Unmerge),
        Command::Inspect(a) if a.spectrum => {
            lowrank::run_spectrum(&a.path, a.base.as_deref(), a.plot.as_deref(), a.json)
        }
        Command::Inspect(a) => inspect::run(&a.path, a.json),
        Command::Diff(a) => diff::run(&a.a, &a.b, a.tolerance, a.json),
        Command::Compress(a) => lowrank::run_compress(a),
        Command::Extract(a) => lowrank::run_extract(a),
        Command::Convert(a) => lowrank::run_convert(a),
        Command::Combine(a) => combine::run(a),
        Command::Quantize(a) => quant::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            report_error(&e, json);
            ExitCode::FAILURE
        }
    }
}

/// Print an error (and, with `json`, its machine-readable form on stdout).
fn report_error(e: &anyhow::Error, json: bool) {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if json {
        // Machines get the error on stdout too, with each validation problem apart.
        let problems: Vec<serde_json::Value> = e
            .chain()
            .find_map(|c| match c.downcast_ref::<adapterkit_ops::Error>() {
                Some(adapterkit_ops::Error::Validation(p)) => Some(
                    p.iter()
                        .map(|p| serde_json::json!({"file": p.file, "tensor": p.tensor, "message": p.message}))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        println!(
            "{}",
            serde_json::json!({"error": e.to_string(), "chain": chain, "problems": problems})
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn dtypes() {
        assert_eq!(parse_dtype("bf16").unwrap(), OutDType::Fixed(DType::BF16));
        assert!(parse_dtype("q4").is_err());
    }
}
