//! Weight quantization in the compressed-tensors layout that vLLM and transformers load: FP8 E4M3
//! per output channel (`naive-quantized`), int8 per channel and int4 in groups of 32
//! (`pack-quantized`), all symmetric and weight-only, computed as compressed-tensors 0.20 computes
//! them so the bytes match.
//!
//! Arithmetic happens in the weight's dtype `T` (bf16, f16 or f32) the way torch does it on the
//! CPU: each operation in f32, rounded to `T`. Per channel (or group): `scale = T(absmax / h)` with
//! `h` = 448, 127.5 or 7.5 (half the integer range), an all-zero group gets `T`'s epsilon;
//! `q = T(w / scale)`, clamped to the range, then rounded half to even (integers) or to nearest
//! E4M3. Integers are stored offset by 2^(bits−1) and packed little-endian into int32 words.

use adapterkit_core::DType;
use half::{bf16, f16};

/// A compressed-tensors weight scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtScheme {
    /// FP8 E4M3, one scale per output channel.
    Fp8,
    /// int8, one scale per output channel.
    Int8,
    /// int4, one scale per group of 32 inputs.
    Int4,
}

impl CtScheme {
    /// Inputs per scale (`None`: the whole row).
    pub fn group(self) -> Option<usize> {
        match self {
            CtScheme::Int4 => Some(32),
            _ => None,
        }
    }

    fn range(self) -> (f32, f32, f32) {
        // (q_min, q_max, bit_range / 2)
        match self {
            CtScheme::Fp8 => (-448.0, 448.0, 448.0),
            CtScheme::Int8 => (-128.0, 127.0, 127.5),
            CtScheme::Int4 => (-8.0, 7.0, 7.5),
        }
    }

    /// The `config_groups.group_0.weights` and `format` of config.json's `quantization_config`.
    pub fn quantization_config(self) -> serde_json::Value {
        let (format, bits, ty, strategy, group) = match self {
            CtScheme::Fp8 => ("naive-quantized", 8, "float", "channel", None),
            CtScheme::Int8 => ("pack-quantized", 8, "int", "channel", None),
            CtScheme::Int4 => ("pack-quantized", 4, "int", "group", Some(32)),
        };
        serde_json::json!({
            "config_groups": {
                "group_0": {
                    "format": format,
                    "input_activations": null,
                    "output_activations": null,
                    "targets": ["Linear"],
                    "weights": {
                        "dynamic": false,
                        "group_size": group,
                        "num_bits": bits,
                        "strategy": strategy,
                        "symmetric": true,
                        "type": ty,
                    }
                }
            },
            "format": format,
            "global_compression_ratio": null,
            "ignore": ["lm_head"],
            "kv_cache_scheme": null,
            "moe_sparsity_config": null,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": "0.20.0",
        })
    }
}

/// Round `x` to `dt` and back (`T(x)`); f32 and anything else unchanged.
#[inline]
pub fn round_to(dt: DType, x: f32) -> f32 {
    match dt {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// torch's `finfo(T).eps`, the scale of an all-zero group.
fn eps(dt: DType) -> f32 {
    match dt {
        DType::BF16 => 2f32.powi(-7),
        DType::F16 => 2f32.powi(-10),
        _ => f32::EPSILON,
    }
}

/// f32 → FP8 E4M3 (fn: no infinities, 0x7f NaN, max 448), rounding to nearest even; values beyond
/// ±448 saturate.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    if x.is_nan() {
        return 0x7f | sign;
    }
    let a = x.abs();
    if a >= 448.0 {
        return 0x7e | sign;
    }
    if a < 2f32.powi(-6) {
        // Subnormal: multiples of 2^-9 (q = 8 is the smallest normal, 0x08).
        return (a * 512.0).round_ties_even() as u8 | sign;
    }
    let bits = a.to_bits();
    let mut exp = ((bits >> 23) & 0xff) as i32 - 127;
    let mant = bits & 0x007f_ffff;
    let mut m = mant >> 20;
    let rem = mant & 0x000f_ffff;
    if rem > 0x80000 || (rem == 0x80000 && m & 1 == 1) {
        m += 1;
        if m == 8 {
            m = 0;
            exp += 1;
        }
    }
    let e = (exp + 7) as u32;
    if e > 15 || (e == 15 && m == 7) {
        return 0x7e | sign;
    }
    ((e << 3) | m) as u8 | sign
}

/// Quantized rows: the stored weight bytes (FP8 codes, or the packed int32 words as bytes) and
/// the scales (rows × groups, `T` values).
#[derive(Debug, Clone, Default)]
pub struct CtRows {
    /// Weight bytes for these rows.
    pub weight: Vec<u8>,
    /// Scales, row-major.
    pub scales: Vec<f32>,
    /// The values the stored weight stands for (`T(q · scale)`), when asked for.
    pub dequantized: Vec<f32>,
}

/// Bytes per stored row of `cols` inputs (packed int32 words for the integer schemes).
pub fn row_bytes(scheme: CtScheme, cols: usize) -> usize {
    match scheme {
        CtScheme::Fp8 => cols,
        CtScheme::Int8 => cols.div_ceil(4) * 4,
        CtScheme::Int4 => cols.div_ceil(8) * 4,
    }
}

/// Quantize `w` (whole rows of `cols`, values already representable in `dt`).
pub fn quantize_rows(
    scheme: CtScheme,
    dt: DType,
    w: &[f32],
    cols: usize,
    dequantize: bool,
) -> CtRows {
    let t = |x: f32| round_to(dt, x);
    let (qmin, qmax, half) = scheme.range();
    let half = t(half);
    let g = scheme.group().unwrap_or(cols).min(cols).max(1);
    let rb = row_bytes(scheme, cols);
    let rows = w.len() / cols.max(1);
    let mut out = CtRows {
        weight: vec![0u8; rows * rb],
        scales: Vec::with_capacity(rows * cols.div_ceil(g)),
        dequantized: if dequantize {
            vec![0f32; w.len()]
        } else {
            Vec::new()
        },
    };
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let dst = &mut out.weight[r * rb..(r + 1) * rb];
        for (gi, grp) in row.chunks(g).enumerate() {
            let (mut mn, mut mx) = (0f32, 0f32);
            for &v in grp {
                mn = mn.min(v);
                mx = mx.max(v);
            }
            let absmax = mn.abs().max(mx.abs());
            let mut scale = t(absmax / half);
            if scale == 0.0 {
                scale = eps(dt);
            }
            out.scales.push(scale);
            for (k, &v) in grp.iter().enumerate() {
                let j = gi * g + k;
                let x = t(v / scale).clamp(qmin, qmax);
                let deq;
                match scheme {
                    CtScheme::Fp8 => {
                        let c = f32_to_e4m3(x);
                        dst[j] = c;
                        deq = adapterkit_core::convert::decode_f8(DType::F8E4M3, c);
                    }
                    CtScheme::Int8 => {
                        let q = x.round_ties_even();
                        dst[j] = (q as i32 + 128) as u8;
                        deq = q;
                    }
                    CtScheme::Int4 => {
                        let q = x.round_ties_even();
                        let u = (q as i32 + 8) as u8;
                        dst[j / 2] |= if j % 2 == 0 { u } else { u << 4 };
                        deq = q;
                    }
                }
                if dequantize {
                    out.dequantized[r * cols + j] = t(deq * scale);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_code() {
        for c in 0u8..=255 {
            if c & 0x7f == 0x7f {
                continue;
            }
            let v = adapterkit_core::convert::decode_f8(DType::F8E4M3, c);
            assert_eq!(f32_to_e4m3(v), c, "code {c:#04x} = {v}");
        }
        // Ties to even: halfway between 1.0 (0x38) and 1.125 (0x39) goes to 1.0.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1000.0), 0x7e);
    }

    #[test]
    fn ties_clamp_then_round() {
        // absmax 127.5 · scale 1 → +127.5 clamps to 127, −127.5 rounds to −128.
        let w = [127.5f32, -127.5, 0.0, 1.0];
        let r = quantize_rows(CtScheme::Int8, DType::F32, &w, 4, true);
        assert_eq!(r.scales, vec![1.0]);
        assert_eq!(r.weight, vec![255, 0, 128, 129]);
    }
}
