//! bitsandbytes checkpoints as transformers saves them: reading NF4/FP4 (with or without double
//! quantization) and LLM.int8 weights back to values, so adapters trained on them (QLoRA) merge
//! into the dequantized base; and writing NF4.
//!
//! - 4-bit: `<m>.weight` (packed codes, first element in the high nibble), `<m>.weight.absmax` (f32
//!   per block, or 8-bit codes with `nested_absmax`/`nested_quant_map` and the JSON's
//!   `nested_offset`), `<m>.weight.quant_map` (the 16 code values) and
//!   `<m>.weight.quant_state.bitsandbytes__{nf4,fp4}` (JSON: type, block size, dtype, shape).
//!   Value = `quant_map[code] · absmax[block]` in f32; double-quantized absmax =
//!   `nested_quant_map[u8] · nested_absmax[i / nested_blocksize] + offset`.
//! - int8: `<m>.weight` (int8), `<m>.SCB` (row absmax), `<m>.weight_format`; value =
//!   `(q · SCB[row]) · f32(1/127)`.
//!
//! The writer follows bitsandbytes' CPU quantizer: per block of 64, `s = clamp(x · (1/absmax),
//! −1, 1)` (a division for a partial last block), the code whose interval holds `s` (a value on a
//! midpoint takes the lower code), no double quantization.

use std::collections::HashMap;
use std::sync::Arc;

use adapterkit_core::convert::decode_to_f32;
use adapterkit_core::{DType, TensorInfo, TensorSource};
use serde_json::Value as Json;

use crate::Checkpoint;

/// bitsandbytes' NF4 code values.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Quantize `x` (a whole tensor, row-major) to NF4 in blocks of `blocksize`: the packed bytes and
/// the per-block absmax.
pub fn nf4_quantize(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mids: Vec<f32> = NF4.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let code = |s: f32| mids.iter().filter(|&&m| m < s).count() as u8;
    let n = x.len();
    let nblocks = n.div_ceil(blocksize);
    let mut absmax = Vec::with_capacity(nblocks);
    let mut codes = vec![7u8; n + n % 2];
    for (b, blk) in x.chunks(blocksize).enumerate() {
        let a = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        let d = a.max(1e-38);
        let full = blk.len() == blocksize;
        let inv = 1.0 / d;
        for (k, &v) in blk.iter().enumerate() {
            let s = if full { v * inv } else { v / d };
            codes[b * blocksize + k] = code(s.clamp(-1.0, 1.0));
        }
    }
    let packed = codes.chunks_exact(2).map(|c| (c[0] << 4) | c[1]).collect();
    (packed, absmax)
}

/// Dequantize 4-bit codes: element `i` of `packed` with `absmax` per block.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    map: &[f32; 16],
    blocksize: usize,
    out: &mut [f32],
    start: usize,
) {
    for (k, o) in out.iter_mut().enumerate() {
        let i = start + k;
        let b = packed[i / 2];
        let c = if i % 2 == 0 { b >> 4 } else { b & 15 };
        *o = map[c as usize] * absmax[i / blocksize];
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Four {
        packed: String,
        absmax: Arc<Vec<f32>>,
        map: [f32; 16],
        blocksize: usize,
        dtype: DType,
    },
    Int8 {
        weight: String,
        scb: Arc<Vec<f32>>,
        dtype: DType,
    },
}

/// A bitsandbytes checkpoint seen as plain tensors: each quantized weight as the values
/// bitsandbytes dequantizes it to (computed in f32, returned in the dtype it was quantized from, as
/// `dequantize_4bit` returns them), with its original shape; the quantization state hidden.
pub struct BnbView<'a> {
    ck: &'a Checkpoint,
    infos: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    kinds: HashMap<String, Kind>,
}

impl std::fmt::Debug for BnbView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BnbView")
            .field("root", &self.ck.root())
            .field("quantized", &self.kinds.len())
            .finish()
    }
}

fn err(ck: &Checkpoint, tensor: &str, m: impl Into<String>) -> crate::Error {
    crate::Error::InvalidTensor {
        path: ck.root().to_path_buf(),
        tensor: tensor.to_string(),
        message: m.into(),
    }
}

fn read_f32(ck: &Checkpoint, name: &str) -> crate::Result<Vec<f32>> {
    let info = ck
        .info(name)
        .ok_or_else(|| err(ck, name, "missing"))?
        .clone();
    let mut raw = vec![0u8; info.len as usize];
    ck.read_bytes(name, 0, &mut raw)?;
    let mut v = vec![0f32; info.numel() as usize];
    decode_to_f32(info.dtype, &raw, &mut v).map_err(|e| err(ck, name, e.to_string()))?;
    Ok(v)
}

fn dtype_of(s: &str) -> Option<DType> {
    Some(match s {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        "float32" => DType::F32,
        _ => return None,
    })
}

/// Whether `ck` was saved by bitsandbytes (config.json's `quantization_config.quant_method`).
pub fn is_bnb(ck: &Checkpoint) -> bool {
    ck.config()
        .and_then(|c| c.get("quantization_config"))
        .and_then(|q| q.get("quant_method"))
        .and_then(Json::as_str)
        == Some("bitsandbytes")
}

impl<'a> BnbView<'a> {
    /// Read the quantization state of every quantized weight of `ck`.
    pub fn open(ck: &'a Checkpoint) -> crate::Result<Self> {
        let model_dtype = ck
            .config()
            .and_then(|c| c.get("dtype").or_else(|| c.get("torch_dtype")))
            .and_then(Json::as_str)
            .and_then(dtype_of)
            .unwrap_or(DType::BF16);
        let names: Vec<String> = ck.tensors().map(|t| t.name.clone()).collect();
        let mut hidden = std::collections::HashSet::new();
        let mut kinds = HashMap::new();
        let mut infos = Vec::new();
        for n in &names {
            let Some((w, kind)) = n
                .rsplit_once(".quant_state.bitsandbytes__")
                .map(|(w, k)| (w.to_string(), k.to_string()))
            else {
                continue;
            };
            let mut blob = vec![0u8; ck.info(n).map_or(0, |i| i.len) as usize];
            ck.read_bytes(n, 0, &mut blob)?;
            let state: Json = serde_json::from_slice(&blob)
                .map_err(|e| err(ck, n, format!("quant state is not JSON: {e}")))?;
            let shape: Vec<u64> = state
                .get("shape")
                .and_then(Json::as_array)
                .map(|a| a.iter().filter_map(Json::as_u64).collect())
                .ok_or_else(|| err(ck, n, "quant state has no shape"))?;
            let blocksize = state.get("blocksize").and_then(Json::as_u64).unwrap_or(64) as usize;
            if blocksize == 0 {
                return Err(err(ck, n, "quant state block size is 0"));
            }
            let dtype = state
                .get("dtype")
                .and_then(Json::as_str)
                .and_then(dtype_of)
                .unwrap_or(model_dtype);
            let numel = shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|n| *n < 1 << 48)
                .ok_or_else(|| err(ck, n, format!("quant state shape {shape:?} is too large")))?;
            let nblocks = (numel as usize).div_ceil(blocksize);
            let map_name = format!("{w}.quant_map");
            let map_v = read_f32(ck, &map_name)?;
            let map: [f32; 16] = map_v.as_slice().try_into().map_err(|_| {
                err(
                    ck,
                    &map_name,
                    format!("{} code values, expected 16", map_v.len()),
                )
            })?;
            let absmax_name = format!("{w}.absmax");
            let absmax_info = ck
                .info(&absmax_name)
                .ok_or_else(|| err(ck, &absmax_name, "missing"))?
                .clone();
            let absmax = if absmax_info.dtype == DType::U8 {
                let nb = state
                    .get("nested_blocksize")
                    .and_then(Json::as_u64)
                    .unwrap_or(256) as usize;
                let offset = state
                    .get("nested_offset")
                    .and_then(Json::as_f64)
                    .ok_or_else(|| err(ck, n, "double-quantized state without nested_offset"))?
                    as f32;
                let mut codes = vec![0u8; absmax_info.len as usize];
                ck.read_bytes(&absmax_name, 0, &mut codes)?;
                let nmap = read_f32(ck, &format!("{w}.nested_quant_map"))?;
                let nabs = read_f32(ck, &format!("{w}.nested_absmax"))?;
                if nmap.len() != 256 || nabs.len() < codes.len().div_ceil(nb.max(1)) {
                    return Err(err(
                        ck,
                        &absmax_name,
                        "nested quantization state has the wrong size",
                    ));
                }
                hidden.insert(format!("{w}.nested_quant_map"));
                hidden.insert(format!("{w}.nested_absmax"));
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| nmap[c as usize] * nabs[i / nb] + offset)
                    .collect()
            } else {
                read_f32(ck, &absmax_name)?
            };
            if absmax.len() != nblocks {
                return Err(err(
                    ck,
                    &absmax_name,
                    format!(
                        "{} blocks, expected {nblocks} for shape {shape:?}",
                        absmax.len()
                    ),
                ));
            }
            let packed_len = ck.info(&w).map(|i| i.len).unwrap_or(0);
            if packed_len != numel.div_ceil(2) {
                return Err(err(
                    ck,
                    &w,
                    format!(
                        "{packed_len} packed bytes, expected {} for shape {shape:?}",
                        numel.div_ceil(2)
                    ),
                ));
            }
            let _ = kind;
            for h in [n.clone(), map_name, absmax_name] {
                hidden.insert(h);
            }
            kinds.insert(
                w.clone(),
                (
                    shape,
                    Kind::Four {
                        packed: w.clone(),
                        absmax: Arc::new(absmax),
                        map,
                        blocksize,
                        dtype,
                    },
                ),
            );
        }
        for n in &names {
            if let Some(m) = n.strip_suffix(".SCB") {
                let w = format!("{m}.weight");
                let Some(info) = ck.info(&w) else { continue };
                if info.dtype != DType::I8 || info.shape.len() != 2 {
                    continue;
                }
                let scb = read_f32(ck, n)?;
                if scb.len() as u64 != info.shape[0] {
                    return Err(err(
                        ck,
                        n,
                        format!("{} row scales for {} rows", scb.len(), info.shape[0]),
                    ));
                }
                hidden.insert(n.clone());
                hidden.insert(format!("{m}.weight_format"));
                kinds.insert(
                    w.clone(),
                    (
                        info.shape.clone(),
                        Kind::Int8 {
                            weight: w,
                            scb: Arc::new(scb),
                            dtype: model_dtype,
                        },
                    ),
                );
            }
        }
        let mut out_kinds = HashMap::new();
        for t in ck.tensors() {
            if hidden.contains(&t.name) {
                continue;
            }
            let mut info = t.clone();
            if let Some((shape, k)) = kinds.remove(&t.name) {
                let dt = match &k {
                    Kind::Four { dtype, .. } | Kind::Int8 { dtype, .. } => *dtype,
                };
                info.dtype = dt;
                info.len = dt.byte_len(shape.iter().product::<u64>()).unwrap_or(0);
                info.shape = shape;
                out_kinds.insert(t.name.clone(), k);
            }
            infos.push(info);
        }
        let by_name = infos
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(BnbView {
            ck,
            infos,
            by_name,
            kinds: out_kinds,
        })
    }

    /// The tensors as plain values, in checkpoint order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// The dtype a dequantized weight had before quantization (`None` for plain tensors).
    pub fn original_dtype(&self, name: &str) -> Option<DType> {
        self.kinds.get(name).map(|k| match k {
            Kind::Four { dtype, .. } | Kind::Int8 { dtype, .. } => *dtype,
        })
    }

    /// Whether `name` is stored quantized.
    pub fn is_quantized(&self, name: &str) -> bool {
        self.kinds.contains_key(name)
    }
}

impl TensorSource for BnbView<'_> {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.infos[i])
    }

    fn read_bytes(&self, name: &str, offset: u64, buf: &mut [u8]) -> adapterkit_core::Result<()> {
        let Some(kind) = self.kinds.get(name) else {
            return self.ck.read_bytes(name, offset, buf);
        };
        let info = &self.infos[self.by_name[name]];
        let es = info.dtype.byte_len(1).unwrap_or(4) as usize;
        let (e0, e1) = (offset as usize / es, (offset as usize + buf.len()) / es);
        if offset as usize % es != 0 || buf.len() % es != 0 || e1 as u64 > info.numel() {
            return Err(adapterkit_core::Error::BufferLength {
                dtype: info.dtype,
                expected: (info.len.saturating_sub(offset)) as usize,
                found: buf.len(),
            });
        }
        let mut vals = vec![0f32; e1 - e0];
        match kind {
            Kind::Four {
                packed,
                absmax,
                map,
                blocksize,
                ..
            } => {
                let (b0, b1) = (e0 / 2, e1.div_ceil(2));
                let mut raw = vec![0u8; b1 - b0];
                self.ck.read_bytes(packed, b0 as u64, &mut raw)?;
                for (k, v) in vals.iter_mut().enumerate() {
                    let i = e0 + k;
                    let b = raw[i / 2 - b0];
                    let c = if i % 2 == 0 { b >> 4 } else { b & 15 };
                    *v = map[c as usize] * absmax[i / blocksize];
                }
            }
            Kind::Int8 { weight, scb, .. } => {
                let cols = info.shape[1] as usize;
                let mut raw = vec![0u8; e1 - e0];
                self.ck.read_bytes(weight, e0 as u64, &mut raw)?;
                let k127 = 7.874_016e-3_f32;
                for (k, v) in vals.iter_mut().enumerate() {
                    let row = (e0 + k) / cols;
                    *v = (f32::from(raw[k] as i8) * scb[row]) * k127;
                }
            }
        }
        adapterkit_core::convert::encode_from_f32(info.dtype, &vals, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_ties_go_to_the_lower_code() {
        let mid = (NF4[7] + NF4[8]) / 2.0;
        let mut x = vec![0f32; 64];
        x[0] = 1.0;
        x[1] = mid;
        x[2] = -1.0;
        let (packed, absmax) = nf4_quantize(&x, 64);
        assert_eq!(absmax, vec![1.0]);
        assert_eq!(packed[0], 0xf7);
        assert_eq!(packed[1] >> 4, 0);
    }
}
