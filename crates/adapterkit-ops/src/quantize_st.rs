//! Quantized safetensors checkpoints, streaming: every Linear weight of a (possibly merged)
//! model written as FP8, int8 or int4 in the compressed-tensors layout (vLLM, transformers), or as
//! bitsandbytes NF4; and bitsandbytes bases read back to values ([`adapterkit_formats::bnb`]),
//! so a QLoRA adapter merges into the dequantized base and comes out in bf16 or NF4 again.
//!
//! Which weights: two-dimensional `*.weight` tensors of Linear layers, i.e. every 2-D weight but
//! embeddings (`embed`, `wte`, `wpe`), norms and the output head (`lm_head`), which both tools
//! leave in full precision.

use adapterkit_core::convert::encode_from_f32;
use adapterkit_core::{DType, TensorSource};
use adapterkit_formats::bnb::{self, NF4};
use adapterkit_formats::compressed::{self, round_to, CtScheme};
use adapterkit_formats::Checkpoint;
use rayon::prelude::*;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::execute::{ExecOptions, OutTensor, Output, Staging};
use crate::kernels::non_finite;
use crate::merged_rows::MergedRows;
use crate::plan::Plan;
use crate::quantize::TensorError;

/// A quantized safetensors format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StFormat {
    /// compressed-tensors FP8 E4M3, per output channel.
    Fp8,
    /// compressed-tensors int8, per output channel.
    Int8,
    /// compressed-tensors int4, groups of 32.
    Int4,
    /// bitsandbytes NF4, blocks of 64.
    Nf4,
}

impl StFormat {
    /// Parse `fp8`, `int8`, `int4`, `nf4`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "fp8" | "fp8_e4m3" => StFormat::Fp8,
            "int8" | "w8a16" => StFormat::Int8,
            "int4" | "w4a16" => StFormat::Int4,
            "nf4" => StFormat::Nf4,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            StFormat::Fp8 => "fp8",
            StFormat::Int8 => "int8",
            StFormat::Int4 => "int4",
            StFormat::Nf4 => "nf4",
        }
    }

    fn ct(self) -> Option<CtScheme> {
        match self {
            StFormat::Fp8 => Some(CtScheme::Fp8),
            StFormat::Int8 => Some(CtScheme::Int8),
            StFormat::Int4 => Some(CtScheme::Int4),
            StFormat::Nf4 => None,
        }
    }

    /// config.json's `quantization_config` for this format; `compute` is the model's dtype.
    pub fn quantization_config(self, compute: DType) -> Json {
        match self.ct() {
            Some(s) => s.quantization_config(),
            None => serde_json::json!({
                "_load_in_4bit": true,
                "_load_in_8bit": false,
                "bnb_4bit_compute_dtype": torch_name(compute),
                "bnb_4bit_quant_storage": "uint8",
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": false,
                "llm_int8_enable_fp32_cpu_offload": false,
                "llm_int8_has_fp16_weight": false,
                "llm_int8_skip_modules": null,
                "llm_int8_threshold": 6.0,
                "load_in_4bit": true,
                "load_in_8bit": false,
                "quant_method": "bitsandbytes",
            }),
        }
    }
}

fn torch_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Whether the tensor is a Linear layer's weight (what compressed-tensors' `Linear` target and
/// bitsandbytes quantize).
pub fn is_linear_weight(name: &str, shape: &[u64]) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    shape.len() == 2
        && !["embed", "wte", "wpe", "lm_head", "norm"]
            .iter()
            .any(|k| module.contains(k))
}

/// What [`write_st`] did.
#[derive(Debug, Clone, Default)]
pub struct StReport {
    /// Files written.
    pub files: Vec<std::path::PathBuf>,
    /// Tensors in the input.
    pub tensors: usize,
    /// Weights quantized.
    pub quantized: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Per quantized weight, when asked for.
    pub errors: Vec<TensorError>,
}

/// How one input tensor is written.
enum Plan1 {
    /// As values of `dtype` (index of its output tensor).
    Plain { out: usize, dtype: DType },
    /// Quantized: its output tensors start at `out`; `t` is the dtype its values are rounded to.
    Quant { out: usize, t: DType },
}

/// Write `view` merged by `plan` (over `view`) as a safetensors checkpoint laid out like
/// `template`, quantizing Linear weights to `format` (or none: every tensor as values).
/// `dtype_of(name, view dtype)` gives each tensor's dtype in the merged model.
#[allow(clippy::too_many_arguments)]
pub fn write_st(
    template: &Checkpoint,
    view: &dyn TensorSource,
    plan: &Plan,
    output: &Output,
    format: Option<StFormat>,
    dtype_of: &(dyn Fn(&str, DType) -> DType + Sync),
    config: Option<Json>,
    report_error: bool,
    opts: &ExecOptions,
) -> Result<StReport> {
    let rows = MergedRows::new(view, plan);
    let infos: Vec<adapterkit_core::TensorInfo> = rows.tensors().cloned().collect();
    let mut outs: Vec<OutTensor> = Vec::new();
    let mut how = Vec::with_capacity(infos.len());
    let mut compute = DType::BF16;
    for t in &infos {
        let dt = dtype_of(&t.name, t.dtype);
        let quant = format.filter(|_| is_linear_weight(&t.name, &t.shape));
        let Some(f) = quant else {
            how.push(Plan1::Plain {
                out: outs.len(),
                dtype: dt,
            });
            outs.push(OutTensor {
                name: t.name.clone(),
                dtype: dt,
                shape: t.shape.clone(),
            });
            continue;
        };
        if !dt.is_float() {
            return Err(Error::Options(format!(
                "tensor {:?} is {dt}; only floating-point weights are quantized",
                t.name
            )));
        }
        compute = dt;
        let (rows_n, cols) = (t.shape[0], t.shape[1]);
        let module = t.name.strip_suffix(".weight").expect("checked");
        how.push(Plan1::Quant {
            out: outs.len(),
            t: dt,
        });
        let mut push = |name: String, dtype: DType, shape: Vec<u64>| {
            outs.push(OutTensor { name, dtype, shape })
        };
        match f.ct() {
            Some(s) => {
                if let Some(g) = s.group() {
                    if cols % g as u64 != 0 {
                        return Err(Error::Options(format!(
                            "tensor {:?}: {cols} inputs are not whole groups of {g} ({} needs them)",
                            t.name,
                            f.name()
                        )));
                    }
                }
                let groups = s.group().map_or(1, |g| cols / g as u64);
                if s == CtScheme::Fp8 {
                    push(t.name.clone(), DType::F8E4M3, vec![rows_n, cols]);
                } else {
                    let words = compressed::row_bytes(s, cols as usize) as u64 / 4;
                    push(
                        format!("{module}.weight_packed"),
                        DType::I32,
                        vec![rows_n, words],
                    );
                }
                push(format!("{module}.weight_scale"), dt, vec![rows_n, groups]);
                if s != CtScheme::Fp8 {
                    push(format!("{module}.weight_shape"), DType::I64, vec![2]);
                }
            }
            None => {
                let n = rows_n * cols;
                push(t.name.clone(), DType::U8, vec![n.div_ceil(2), 1]);
                push(
                    format!("{}.absmax", t.name),
                    DType::F32,
                    vec![n.div_ceil(64)],
                );
                push(format!("{}.quant_map", t.name), DType::F32, vec![16]);
                let state = nf4_state(dt, &t.shape);
                push(
                    format!("{}.quant_state.bitsandbytes__nf4", t.name),
                    DType::U8,
                    vec![state.len() as u64],
                );
            }
        }
    }
    let mut staging = Staging::create(template, outs.clone(), output)?;
    if let Some(mut cfg) = config {
        if let Some(obj) = cfg.as_object_mut() {
            obj.remove("quantization_config");
            if let Some(f) = format {
                obj.insert("quantization_config".into(), f.quantization_config(compute));
            }
        }
        let text = serde_json::to_string_pretty(&cfg).expect("JSON") + "\n";
        staging.replace_file("config.json", text.into_bytes());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Options(format!("thread pool: {e}")))?;
    let block = opts.block_elems.max(1) as u64;
    let results: Vec<Result<(u64, Option<TensorError>)>> = pool.install(|| {
        infos
            .par_iter()
            .zip(&how)
            .map(|(t, h)| -> Result<(u64, Option<TensorError>)> {
                let (r_all, cols) = t.rows_cols();
                // Rows per block: the whole tensor when its update needs whole columns.
                let step = if rows.needs_whole(&t.name) {
                    r_all
                } else {
                    (block / cols.max(1)).max(1)
                };
                match *h {
                    Plan1::Plain { out, dtype } => {
                        let mut written = 0u64;
                        if !rows.is_changed(&t.name) && dtype == t.dtype {
                            let mut buf = vec![0u8; t.len.min(1 << 22) as usize];
                            let mut off = 0;
                            while off < t.len {
                                let n = (t.len - off).min(buf.len() as u64) as usize;
                                view.read_bytes(&t.name, off, &mut buf[..n])?;
                                staging.write(out, off, &buf[..n])?;
                                off += n as u64;
                            }
                            return Ok((t.len, None));
                        }
                        let mut r = 0;
                        while r < r_all {
                            let n = step.min(r_all - r);
                            let mut v = vec![0f32; (n * cols) as usize];
                            rows.elements(&t.name, r * cols, &mut v)?;
                            check_finite(&t.name, &v, r * cols, opts)?;
                            let mut b = vec![0u8; dtype.byte_len(n * cols).unwrap_or(0) as usize];
                            encode_from_f32(dtype, &v, &mut b)?;
                            staging.write(out, dtype.byte_len(r * cols).unwrap_or(0), &b)?;
                            written += b.len() as u64;
                            r += n;
                        }
                        Ok((written, None))
                    }
                    Plan1::Quant { out, t: dt } => {
                        let f = format.expect("quantized only with a format");
                        // NF4 blocks of 64 run across rows: chunks hold whole blocks.
                        let align = 64 / gcd(cols, 64);
                        let step = if f == StFormat::Nf4 {
                            step.div_ceil(align) * align
                        } else {
                            step
                        };
                        let (mut sse, mut ssx, mut max) = (0f64, 0f64, 0f64);
                        let mut written = 0u64;
                        let mut r = 0;
                        while r < r_all {
                            let n = step.min(r_all - r);
                            let mut v = vec![0f32; (n * cols) as usize];
                            rows.elements(&t.name, r * cols, &mut v)?;
                            check_finite(&t.name, &v, r * cols, opts)?;
                            for x in v.iter_mut() {
                                *x = round_to(dt, *x);
                            }
                            let deq: Vec<f32> = match f.ct() {
                                Some(s) => {
                                    let q = compressed::quantize_rows(
                                        s,
                                        dt,
                                        &v,
                                        cols as usize,
                                        report_error,
                                    );
                                    let rb = compressed::row_bytes(s, cols as usize) as u64;
                                    staging.write(out, r * rb, &q.weight)?;
                                    let groups = q.scales.len() as u64 / n;
                                    let mut sb = vec![
                                        0u8;
                                        dt.byte_len(q.scales.len() as u64).unwrap_or(0)
                                            as usize
                                    ];
                                    encode_from_f32(dt, &q.scales, &mut sb)?;
                                    staging.write(
                                        out + 1,
                                        dt.byte_len(r * groups).unwrap_or(0),
                                        &sb,
                                    )?;
                                    written += (q.weight.len() + sb.len()) as u64;
                                    q.dequantized
                                }
                                None => {
                                    let (packed, absmax) = bnb::nf4_quantize(&v, 64);
                                    let e0 = r * cols;
                                    staging.write(
                                        out,
                                        e0 / 2,
                                        &packed[..((n * cols) as usize).div_ceil(2)],
                                    )?;
                                    let ab: Vec<u8> =
                                        absmax.iter().flat_map(|a| a.to_le_bytes()).collect();
                                    staging.write(out + 1, e0 / 64 * 4, &ab)?;
                                    written += (packed.len() + ab.len()) as u64;
                                    if report_error {
                                        let mut d = vec![0f32; v.len()];
                                        bnb::dequantize_4bit(&packed, &absmax, &NF4, 64, &mut d, 0);
                                        d
                                    } else {
                                        Vec::new()
                                    }
                                }
                            };
                            for (x, y) in v.iter().zip(&deq) {
                                let d = f64::from(*x) - f64::from(*y);
                                sse += d * d;
                                ssx += f64::from(*x) * f64::from(*x);
                                max = max.max(d.abs());
                            }
                            r += n;
                        }
                        // The fixed parts: shape, code table, state.
                        match f.ct() {
                            Some(CtScheme::Fp8) => {}
                            Some(_) => {
                                let shape: Vec<u8> = t
                                    .shape
                                    .iter()
                                    .flat_map(|d| (*d as i64).to_le_bytes())
                                    .collect();
                                staging.write(out + 2, 0, &shape)?;
                            }
                            None => {
                                let map: Vec<u8> =
                                    NF4.iter().flat_map(|a| a.to_le_bytes()).collect();
                                staging.write(out + 2, 0, &map)?;
                                staging.write(out + 3, 0, &nf4_state(dt, &t.shape))?;
                            }
                        }
                        let err = report_error.then(|| TensorError {
                            name: t.name.clone(),
                            ggml_type: adapterkit_formats::gguf::GgmlType::F32,
                            rel_rmse: if ssx > 0.0 { (sse / ssx).sqrt() } else { 0.0 },
                            max_abs: max,
                        });
                        Ok((written, err))
                    }
                }
            })
            .collect()
    });
    let mut report = StReport {
        tensors: infos.len(),
        quantized: how
            .iter()
            .filter(|h| matches!(h, Plan1::Quant { .. }))
            .count(),
        ..Default::default()
    };
    for r in results {
        let (b, e) = r?;
        report.bytes += b;
        report.errors.extend(e);
    }
    report.files = staging.commit(opts.fsync)?;
    Ok(report)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

fn check_finite(name: &str, v: &[f32], start: u64, opts: &ExecOptions) -> Result<()> {
    if opts.allow_nonfinite {
        return Ok(());
    }
    if let Some((count, first)) = non_finite(v) {
        return Err(Error::NonFinite {
            tensor: name.to_string(),
            count,
            first: first + start as usize,
        });
    }
    Ok(())
}

/// The JSON blob bitsandbytes stores beside an NF4 weight.
fn nf4_state(dt: DType, shape: &[u64]) -> Vec<u8> {
    let s = serde_json::json!({
        "quant_type": "nf4", "blocksize": 64, "dtype": torch_name(dt), "shape": shape,
    });
    // Python's json.dumps separators: ", " and ": ".
    let text = serde_json::to_string(&s).expect("JSON");
    python_json(&text).into_bytes()
}

/// serde_json's compact text with Python's default separators (`", "`, `": "`), outside strings.
fn python_json(compact: &str) -> String {
    let mut out = String::with_capacity(compact.len() + 16);
    let mut in_str = false;
    let mut escaped = false;
    for c in compact.chars() {
        out.push(c);
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if c == ',' || c == ':' {
            out.push(' ');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_weights() {
        assert!(is_linear_weight(
            "model.layers.0.self_attn.q_proj.weight",
            &[8, 8]
        ));
        assert!(!is_linear_weight("model.embed_tokens.weight", &[8, 8]));
        assert!(!is_linear_weight("lm_head.weight", &[8, 8]));
        assert!(!is_linear_weight("model.norm.weight", &[8]));
        assert!(!is_linear_weight(
            "model.layers.0.self_attn.q_proj.bias",
            &[8]
        ));
    }

    #[test]
    fn state_blob_is_pythons() {
        let s = String::from_utf8(nf4_state(DType::BF16, &[64, 64])).unwrap();
        assert_eq!(
            s,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 64]}"#
        );
    }
}
