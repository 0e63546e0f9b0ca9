//! Writing GGUF models with quantized tensors, streaming: each tensor is produced in row blocks
//! (read, merged or converted, then quantized) by a [`RowSource`], and every block goes straight
//! to its place in the output file. Memory is a few row blocks per thread, whatever the model size.
//!
//! [`quantize_gguf`] requantizes a GGUF model to a llama.cpp scheme (`q4_k_m`, `q8_0`, …) with
//! llama-quantize's type choices and tensor order; the HF → GGUF converter and the merge commands
//! write through the same [`write_gguf`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapterkit_formats::gguf::{self, GgmlType, GgufFile, GgufPending, GgufSpec, Value};
use adapterkit_formats::gguf_quant::{self, ModelFacts, Scheme, TensorFacts};
use adapterkit_formats::quants;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::non_finite;

/// Where the values of the output tensors come from.
pub trait RowSource: Sync {
    /// Fill `out` (a whole number of rows of tensor `index`) with rows `[row, row + out.len() /
    /// ne0)` as f32.
    fn rows(&self, index: usize, row: u64, out: &mut [f32]) -> Result<()>;

    /// When tensor `index` is stored in exactly its output type, its raw bytes at `offset`, to be
    /// copied without conversion: return `Ok(true)` after filling `buf`, `Ok(false)` if it must
    /// go through [`RowSource::rows`].
    fn raw(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let _ = (index, offset, buf);
        Ok(false)
    }

    /// Whether tensor `index` must be produced in one piece (its update needs whole columns).
    fn whole(&self, index: usize) -> bool {
        let _ = index;
        false
    }
}

/// One output tensor.
#[derive(Debug, Clone)]
pub struct OutTensor {
    /// Name, dimensions and type in the output file.
    pub spec: GgufSpec,
    /// Copy the source's raw bytes ([`RowSource::raw`]) instead of converting.
    pub copy: bool,
}

/// Options for [`write_gguf`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Target f32 elements per row block.
    pub block_elems: usize,
    /// Measure each quantized tensor's error (one dequantization per block).
    pub report_error: bool,
    /// Write tensors holding NaN or infinity instead of refusing.
    pub allow_nonfinite: bool,
    /// Flush to disk before renaming into place.
    pub fsync: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            threads: 0,
            block_elems: 1 << 20,
            report_error: false,
            allow_nonfinite: false,
            fsync: false,
        }
    }
}

/// How far one quantized tensor is from the values it was made from.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorError {
    /// Output tensor name.
    pub name: String,
    /// Its type.
    pub ggml_type: GgmlType,
    /// ‖x − q(x)‖ / ‖x‖ (0 when x = 0).
    pub rel_rmse: f64,
    /// max |x − q(x)|.
    pub max_abs: f64,
}

/// What [`write_gguf`] did.
#[derive(Debug, Clone, Default)]
pub struct WriteReport {
    /// Tensors written.
    pub tensors: usize,
    /// Of which copied as bytes.
    pub copied: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Per quantized (converted) tensor, when asked for.
    pub errors: Vec<TensorError>,
    /// The file written.
    pub file: PathBuf,
}

#[derive(Default, Clone, Copy)]
struct Acc {
    sse: f64,
    ssx: f64,
    max: f64,
}

/// Write a GGUF file: `metadata` in order, then `tensors` in order, each produced by `source`.
/// The file appears at `out` only when complete.
pub fn write_gguf(
    out: &Path,
    metadata: &[(String, Value)],
    tensors: &[OutTensor],
    source: &dyn RowSource,
    opts: &WriteOptions,
) -> Result<WriteReport> {
    let specs: Vec<GgufSpec> = tensors.iter().map(|t| t.spec.clone()).collect();
    for t in tensors {
        if !t.copy && !quants::can_quantize(t.spec.ggml_type) {
            return Err(Error::Options(format!(
                "tensor {:?}: writing {} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K)",
                t.spec.name, t.spec.ggml_type
            )));
        }
    }
    let layout = gguf::layout(out, metadata, &specs)?;
    let pending = GgufPending::create(out, layout)?;
    // Jobs: (tensor, first row, rows) for converted tensors; whole tensors for copies.
    let mut jobs: Vec<(usize, u64, u64)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let ne0 = t.spec.ne[0].max(1);
        let rows = t.spec.ne.iter().skip(1).product::<u64>();
        if t.copy {
            jobs.push((i, 0, rows));
            continue;
        }
        let step = if source.whole(i) {
            rows.max(1)
        } else {
            (opts.block_elems as u64 / ne0).max(1)
        };
        let mut r = 0;
        while r < rows {
            let n = step.min(rows - r);
            jobs.push((i, r, n));
            r += n;
        }
    }
    // Biggest tensors first keeps the threads busy to the end.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Options(format!("thread pool: {e}")))?;
    let results: Vec<Result<(usize, u64, Acc)>> = pool.install(|| {
        jobs.par_iter()
            .map(|&(i, r0, n)| -> Result<(usize, u64, Acc)> {
                let t = &tensors[i];
                let (_, _, len) = pending.tensors()[i];
                if t.copy {
                    let mut buf = vec![0u8; len.min(1 << 22) as usize];
                    let mut off = 0u64;
                    while off < len {
                        let m = (len - off).min(buf.len() as u64) as usize;
                        if !source.raw(i, off, &mut buf[..m])? {
                            return Err(Error::Options(format!(
                                "tensor {:?}: the source cannot be copied as bytes",
                                t.spec.name
                            )));
                        }
                        pending.write(i, off, &buf[..m])?;
                        off += m as u64;
                    }
                    return Ok((i, len, Acc::default()));
                }
                let ne0 = t.spec.ne[0];
                let ty = t.spec.ggml_type;
                let mut vals = vec![0f32; (n * ne0) as usize];
                source.rows(i, r0, &mut vals)?;
                if !opts.allow_nonfinite {
                    if let Some((count, first)) = non_finite(&vals) {
                        return Err(Error::NonFinite {
                            tensor: t.spec.name.clone(),
                            count,
                            first: first + (r0 * ne0) as usize,
                        });
                    }
                }
                let row_bytes = ty.byte_len(ne0).expect("layout checked") as usize;
                let mut q = vec![0u8; row_bytes * n as usize];
                quants::quantize(ty, &vals, &mut q).ok_or_else(|| {
                    Error::Options(format!("tensor {:?}: cannot quantize to {ty}", t.spec.name))
                })?;
                let mut acc = Acc::default();
                if opts.report_error {
                    let back = quants::dequantize(ty, &q, vals.len()).expect("just written");
                    for (x, y) in vals.iter().zip(&back) {
                        let (x, d) = (f64::from(*x), f64::from(*x) - f64::from(*y));
                        acc.sse += d * d;
                        acc.ssx += x * x;
                        acc.max = acc.max.max(d.abs());
                    }
                }
                pending.write(i, r0 * row_bytes as u64, &q)?;
                Ok((i, q.len() as u64, acc))
            })
            .collect()
    });
    let mut report = WriteReport {
        tensors: tensors.len(),
        copied: tensors.iter().filter(|t| t.copy).count(),
        file: out.to_path_buf(),
        ..Default::default()
    };
    let mut accs = vec![Acc::default(); tensors.len()];
    for r in results {
        let (i, bytes, a) = r?;
        report.bytes += bytes;
        let s = &mut accs[i];
        s.sse += a.sse;
        s.ssx += a.ssx;
        s.max = s.max.max(a.max);
    }
    pending.commit(opts.fsync)?;
    if opts.report_error {
        for (t, a) in tensors.iter().zip(&accs) {
            if t.copy {
                continue;
            }
            report.errors.push(TensorError {
                name: t.spec.name.clone(),
                ggml_type: t.spec.ggml_type,
                rel_rmse: if a.ssx > 0.0 {
                    (a.sse / a.ssx).sqrt()
                } else {
                    0.0
                },
                max_abs: a.max,
            });
        }
    }
    Ok(report)
}

/// The facts the type choice needs, read from a GGUF model's metadata.
pub fn model_facts(metadata: &[(String, Value)]) -> ModelFacts {
    let get = |k: &str| metadata.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let arch = get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let num = |suffix: &str| {
        get(&format!("{arch}.{suffix}"))
            .and_then(|v| match v {
                // head_count_kv may be a per-layer array; llama.cpp's n_gqa() reads layer 0.
                Value::Array(_, items) => items.first().and_then(|x| x.as_u64()),
                v => v.as_u64(),
            })
            .unwrap_or(0) as u32
    };
    let n_head = num("attention.head_count");
    let kv = num("attention.head_count_kv");
    ModelFacts {
        n_layer: num("block_count"),
        n_head,
        n_head_kv: if kv == 0 { n_head } else { kv },
        n_expert: num("expert_count"),
        arch,
    }
}

/// Every tensor of `file` as the type choice sees it.
pub fn tensor_facts(file: &GgufFile) -> Vec<TensorFacts<'_>> {
    file.tensors()
        .iter()
        .map(|t| TensorFacts {
            name: &t.name,
            ne: &t.ne,
            ggml_type: t.ggml_type,
        })
        .collect()
}

/// The metadata of a quantized model: the input's, with `general.quantization_version` and
/// `general.file_type` set last (as llama-quantize does) and split keys dropped.
pub fn quantized_metadata(metadata: &[(String, Value)], scheme: Scheme) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = metadata
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.quantization_version"
                    | "general.file_type"
                    | "split.no"
                    | "split.count"
                    | "split.tensors.count"
            )
        })
        .cloned()
        .collect();
    out.push(("general.quantization_version".into(), Value::U32(2)));
    out.push(("general.file_type".into(), Value::U32(scheme.file_type())));
    out
}

/// Reads rows of a GGUF file's tensors, dequantizing.
struct GgufRows<'a> {
    file: &'a GgufFile,
    /// Output index → input tensor index.
    map: Vec<usize>,
}

impl RowSource for GgufRows<'_> {
    fn rows(&self, index: usize, row: u64, out: &mut [f32]) -> Result<()> {
        read_gguf_rows(self.file, self.map[index], row, out)
    }

    fn raw(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let t = &self.file.tensors()[self.map[index]];
        self.file.read_raw(&t.name, offset, buf)?;
        Ok(true)
    }
}

/// Rows `[row, row + out.len()/ne0)` of GGUF tensor `index`, as f32.
pub fn read_gguf_rows(file: &GgufFile, index: usize, row: u64, out: &mut [f32]) -> Result<()> {
    let t = &file.tensors()[index];
    let ne0 = t.ne[0];
    let row_bytes = t.ggml_type.byte_len(ne0).expect("validated");
    let n = out.len() as u64 / ne0.max(1);
    let mut raw = vec![0u8; (row_bytes * n) as usize];
    file.read_raw(&t.name, row * row_bytes, &mut raw)?;
    quants::dequantize_into(t.ggml_type, &raw, out).ok_or_else(|| {
        Error::Format(adapterkit_formats::Error::Gguf {
            path: file.path().to_path_buf(),
            message: format!(
                "tensor {:?} is {}, which this version cannot read as values",
                t.name, t.ggml_type
            ),
        })
    })
}

/// Refuse one shard of a split GGUF model: its tensors are only part of the model.
pub fn refuse_split(file: &GgufFile) -> Result<()> {
    match file.get("split.count").and_then(|v| v.as_u64()) {
        Some(n) if n > 1 => Err(Error::Format(adapterkit_formats::Error::Gguf {
            path: file.path().to_path_buf(),
            message: format!(
                "is one shard of a model split in {n} files; join them first (llama-gguf-split --merge)"
            ),
        })),
        _ => Ok(()),
    }
}

/// Requantize the GGUF model `input` to `scheme`, writing `out`; `pure` gives every quantizable
/// tensor the scheme's default type. Tensors already in their target type are copied as bytes.
pub fn quantize_gguf(
    input: Arc<GgufFile>,
    out: &Path,
    scheme: Scheme,
    pure: bool,
    opts: &WriteOptions,
) -> Result<WriteReport> {
    refuse_split(&input)?;
    let facts = model_facts(input.metadata());
    let tfacts = tensor_facts(&input);
    let types = gguf_quant::choose_types(scheme, &facts, &tfacts, pure);
    let names: Vec<&str> = input.tensors().iter().map(|t| t.name.as_str()).collect();
    let order = gguf_quant::quantize_order(&names);
    let mut tensors = Vec::with_capacity(order.len());
    for &i in &order {
        let t = &input.tensors()[i];
        let ty = types[i];
        if ty != t.ggml_type && !quants::can_dequantize(t.ggml_type) {
            return Err(Error::Format(adapterkit_formats::Error::Gguf {
                path: input.path().to_path_buf(),
                message: format!(
                    "tensor {:?} is {}, which cannot be read as values to requantize",
                    t.name, t.ggml_type
                ),
            }));
        }
        tensors.push(OutTensor {
            spec: GgufSpec {
                name: t.name.clone(),
                ne: t.ne.clone(),
                ggml_type: ty,
            },
            copy: ty == t.ggml_type,
        });
    }
    let metadata = quantized_metadata(input.metadata(), scheme);
    let source = GgufRows {
        file: &input,
        map: order,
    };
    write_gguf(out, &metadata, &tensors, &source, opts)
}
