//! `adapterkit quantize`: GGUF models to llama.cpp schemes, Hugging Face checkpoints to GGUF, and
//! Hugging Face checkpoints to quantized safetensors (FP8, int8, int4, NF4).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapterkit_core::DType;
use adapterkit_formats::bnb::{self, BnbView};
use adapterkit_formats::gguf::GgufFile;
use adapterkit_formats::gguf_quant::Scheme;
use adapterkit_formats::Checkpoint;
use adapterkit_ops::quantize::{TensorError, WriteOptions, WriteReport};
use adapterkit_ops::quantize_st::{StFormat, StReport};
use adapterkit_ops::{Direction, ExecOptions, OutDType, Output, Sharding, WeightedAdapter};
use anyhow::{bail, Context, Result};

use crate::inspect::human_bytes;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// A GGUF model, or a Hugging Face model directory.
    pub input: PathBuf,
    /// Output: a .gguf file, or (for fp8, int8, int4, nf4) a directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Target: a llama.cpp scheme (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s,
    /// q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k; q3_k, q4_k and q5_k mean the _m
    /// mixes) for GGUF output, or fp8, int8, int4, nf4 for quantized safetensors.
    #[arg(long = "type", short = 't')]
    pub qtype: String,
    /// Give every quantizable tensor the scheme's base type (llama-quantize --pure).
    #[arg(long)]
    pub pure: bool,
    /// Print each quantized tensor's error (RMSE relative to the weights, and the largest).
    #[arg(long)]
    pub report_error: bool,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Write tensors that hold NaN or infinity instead of refusing.
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A `--type`/`--quant` value: a GGUF scheme or a safetensors format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A llama.cpp scheme, written as GGUF.
    Gguf(Scheme),
    /// A quantized safetensors format.
    St(StFormat),
}

/// Parse `--type`/`--quant`.
pub fn parse_target(s: &str) -> Result<Target> {
    if let Some(s) = Scheme::parse(s) {
        return Ok(Target::Gguf(s));
    }
    if let Some(f) = StFormat::parse(s) {
        return Ok(Target::St(f));
    }
    bail!(
        "--type {s:?}: expected one of {} (GGUF), or fp8, int8, int4, nf4 (safetensors)",
        Scheme::names().join(", ")
    )
}

/// A checkpoint seen as plain values (a bitsandbytes base dequantized as bitsandbytes does).
fn bnb_view(ck: &Checkpoint) -> Result<Option<BnbView<'_>>> {
    if !bnb::is_bnb(ck) {
        return Ok(None);
    }
    Ok(Some(BnbView::open(ck).with_context(|| {
        format!("reading the bitsandbytes state of {}", ck.root().display())
    })?))
}

/// The merge of `adapters` into `ck` (through `view` when it is a bitsandbytes base).
fn merge_plan<'a>(
    ck: &'a Checkpoint,
    view: Option<&'a BnbView<'a>>,
    adapters: Vec<WeightedAdapter>,
) -> Result<(&'a dyn adapterkit_core::TensorSource, adapterkit_ops::Plan)> {
    let (src, infos): (
        &dyn adapterkit_core::TensorSource,
        Vec<adapterkit_core::TensorInfo>,
    ) = match view {
        Some(v) => (v, v.tensors().to_vec()),
        None => (ck, ck.tensors().cloned().collect()),
    };
    let plan = adapterkit_ops::plan_direction(
        ck.root(),
        src,
        infos.iter(),
        adapters,
        OutDType::Auto,
        Direction::Merge,
    )?;
    Ok((src, plan))
}

/// Merge `adapters` into the checkpoint `base` (a bitsandbytes base is dequantized first) and
/// write safetensors to `output`: Linear weights quantized to `format`, or every tensor as values
/// (`out_dtype`; a dequantized weight gets the dtype it had before quantization).
#[allow(clippy::too_many_arguments)]
pub fn to_safetensors(
    ck: &Checkpoint,
    adapters: Vec<WeightedAdapter>,
    output: &Output,
    format: Option<StFormat>,
    out_dtype: OutDType,
    report_error: bool,
    opts: &ExecOptions,
) -> Result<StReport> {
    let bnb_view = bnb_view(ck)?;
    let (view, plan) = merge_plan(ck, bnb_view.as_ref(), adapters)?;
    let dtype_of = |name: &str, dt: DType| -> DType {
        match out_dtype {
            OutDType::Fixed(d) if dt.is_float() => d,
            _ => bnb_view
                .as_ref()
                .and_then(|v| v.original_dtype(name))
                .unwrap_or(dt),
        }
    };
    Ok(adapterkit_ops::quantize_st::write_st(
        ck,
        view,
        &plan,
        output,
        format,
        &dtype_of,
        ck.config().cloned(),
        report_error,
        opts,
    )?)
}

pub fn write_options(threads: usize, report_error: bool, allow_nonfinite: bool) -> WriteOptions {
    WriteOptions {
        threads,
        report_error,
        allow_nonfinite,
        ..Default::default()
    }
}

/// Print per-tensor errors, worst first (with the GGUF type when `with_type`).
pub fn print_errors(errors: &[TensorError], with_type: bool) -> Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    let mut e: Vec<&TensorError> = errors.iter().collect();
    e.sort_by(|a, b| b.rel_rmse.total_cmp(&a.rel_rmse));
    let mut out = std::io::stdout().lock();
    let ty = |s: &str| {
        if with_type {
            format!(" {s:>8}")
        } else {
            String::new()
        }
    };
    writeln!(
        out,
        "{:<56}{} {:>12} {:>12}",
        "tensor",
        ty("type"),
        "rel. RMSE",
        "max |err|"
    )?;
    for t in e {
        writeln!(
            out,
            "{:<56}{} {:>12.3e} {:>12.3e}",
            t.name,
            ty(&t.ggml_type.to_string()),
            t.rel_rmse,
            t.max_abs
        )?;
    }
    Ok(())
}

/// The errors as JSON.
pub fn errors_json(errors: &[TensorError]) -> serde_json::Value {
    serde_json::Value::Array(
        errors
            .iter()
            .map(|t| {
                serde_json::json!({"tensor": t.name, "type": t.ggml_type.to_string(),
                    "rel_rmse": t.rel_rmse, "max_abs": t.max_abs})
            })
            .collect(),
    )
}

/// Convert (and merge `adapters` into) the Hugging Face checkpoint `base` to a GGUF model.
pub fn hf_to_gguf(
    base: &Path,
    adapters: Vec<WeightedAdapter>,
    out: &Path,
    scheme: Scheme,
    pure: bool,
    opts: &WriteOptions,
) -> Result<WriteReport> {
    if out.extension().is_none_or(|e| e != "gguf") {
        bail!("{}: GGUF output is a file; name it *.gguf", out.display());
    }
    let ck = Checkpoint::open(base).with_context(|| format!("opening {}", base.display()))?;
    let config = ck.config().cloned().with_context(|| {
        format!(
            "{}: no config.json; GGUF conversion needs the model's hyperparameters",
            base.display()
        )
    })?;
    let bnb_view = bnb_view(&ck)?;
    let (view, plan) = merge_plan(&ck, bnb_view.as_ref(), adapters)?;
    Ok(adapterkit_ops::gguf_convert::hf_to_gguf(
        ck.root(),
        &config,
        view,
        &plan,
        out,
        scheme,
        pure,
        opts,
    )?)
}

/// Print what a quantized safetensors write did.
pub fn print_st(out: &Path, what: &str, r: &StReport, secs: f64, json: bool) -> Result<()> {
    if json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "output": out, "type": what, "files": r.files, "tensors": r.tensors,
                "quantized": r.quantized, "bytes": r.bytes, "seconds": secs,
                "errors": errors_json(&r.errors),
            }))?
        )?;
    } else {
        writeln!(
            std::io::stdout(),
            "wrote {} ({what}): {} tensors, {} weights quantized, {} in {secs:.2}s",
            out.display(),
            r.tensors,
            r.quantized,
            human_bytes(r.bytes)
        )?;
        print_errors(&r.errors, false)?;
    }
    Ok(())
}

fn check_output(out: &Path, input: &Path, force: bool) -> Result<()> {
    if crate::lowrank::same(out, input) {
        bail!("{}: the output cannot be the input", out.display());
    }
    if out.exists() && !force {
        bail!("{}: exists; pass --force to replace it", out.display());
    }
    Ok(())
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let target = parse_target(&a.qtype)?;
    check_output(&a.output, &a.input, a.force)?;
    let opts = write_options(a.threads, a.report_error, a.allow_nonfinite);
    let started = std::time::Instant::now();
    let is_gguf = a.input.is_file() && GgufFile::sniff(&a.input);
    let (report, what) = match target {
        Target::Gguf(scheme) if is_gguf => {
            let file = Arc::new(
                GgufFile::open(&a.input)
                    .with_context(|| format!("opening {}", a.input.display()))?,
            );
            if adapterkit_formats::gguf_lora::is_adapter(&file) {
                bail!(
                    "{}: is a GGUF LoRA adapter; quantize works on models",
                    a.input.display()
                );
            }
            let r =
                adapterkit_ops::quantize::quantize_gguf(file, &a.output, scheme, a.pure, &opts)?;
            (r, scheme.name())
        }
        Target::Gguf(scheme) => {
            let r = hf_to_gguf(&a.input, Vec::new(), &a.output, scheme, a.pure, &opts)?;
            (r, scheme.name())
        }
        Target::St(f) => {
            if is_gguf {
                bail!(
                    "{}: {} output is quantized safetensors, made from a Hugging Face checkpoint, not from GGUF",
                    a.input.display(),
                    f.name()
                );
            }
            let ck = Checkpoint::open(&a.input)
                .with_context(|| format!("opening {}", a.input.display()))?;
            let output = Output {
                path: a.output.clone(),
                sharding: Sharding::Preserve,
                in_place: false,
                overwrite: a.force,
            };
            let exec = ExecOptions {
                threads: a.threads,
                allow_nonfinite: a.allow_nonfinite,
                ..Default::default()
            };
            let r = to_safetensors(
                &ck,
                Vec::new(),
                &output,
                Some(f),
                OutDType::Auto,
                a.report_error,
                &exec,
            )?;
            print_st(
                &a.output,
                f.name(),
                &r,
                started.elapsed().as_secs_f64(),
                a.json,
            )?;
            return Ok(());
        }
    };
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "output": report.file, "type": what, "tensors": report.tensors,
                "copied": report.copied, "bytes": report.bytes, "seconds": secs,
                "errors": errors_json(&report.errors),
            }))?
        )?;
    } else {
        writeln!(
            std::io::stdout(),
            "quantized {} to {what}: {} tensors ({} copied), {} in {secs:.2}s",
            a.output.display(),
            report.tensors,
            report.copied,
            human_bytes(report.bytes)
        )?;
        print_errors(&report.errors, true)?;
    }
    Ok(())
}
