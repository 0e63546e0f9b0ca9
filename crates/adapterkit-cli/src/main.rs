//! The `adapterkit` command-line tool: clap arguments → validated options → library calls.

mod check;
mod combine;
mod diff;
mod inspect;
mod lowrank;
mod mix;
mod plot;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use adapterkit_core::DType;
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
    /// PEFT adapter directories (adapter_config.json + adapter_model.safetensors); with
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
    let weights = match a.weights {
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
    let adapters: Vec<WeightedAdapter> = open_adapters(&a.adapters, model_type)?
        .into_iter()
        .zip(weights)
        .map(|(pa, weight)| WeightedAdapter {
            adapter: pa.adapter,
            weight,
        })
        .collect();
    let started = std::time::Instant::now();
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

/// Open PEFT adapters, reading GPT-2 `Conv1D` layouts for `model_type` as PEFT does and printing
/// each adapter's notes; every adapter that cannot be read is reported at once.
pub(crate) fn open_adapters(
    paths: &[PathBuf],
    model_type: Option<&str>,
) -> Result<Vec<peft::PeftAdapter>> {
    let mut opened = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        match peft::open(p) {
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

fn main() -> ExitCode {
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
