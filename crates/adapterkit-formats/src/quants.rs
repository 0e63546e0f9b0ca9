//! ggml block quantization and dequantization, bit-exact with ggml's reference code.
//!
//! - [`quantize`] writes F32, F16, BF16, the 32-element legacy blocks (Q8_0, Q4_0, Q4_1, Q5_0,
//!   Q5_1) and the k-quants (Q2_K … Q6_K) as `quantize_row_*_ref` does: the path `llama-quantize`
//!   takes without an importance matrix.
//! - [`dequantize`] reads every type llama.cpp writes: the above, plus the i-quants, the ternary
//!   types and MXFP4 (`iquants`).
//!
//! Operation order and precision follow ggml's C exactly (no fused multiply-adds, ggml's own
//! round-half-to-even); see `kquants` for why that matters.

use adapterkit_core::convert::{decode_to_f32, encode_from_f32};
use adapterkit_core::DType;

use crate::gguf::GgmlType;
use crate::kquants::{self, QK_K};

fn f16(b: &[u8]) -> f32 {
    let mut v = [0f32];
    decode_to_f32(DType::F16, &b[..2], &mut v).expect("two bytes");
    v[0]
}

/// Dequantize `n` elements of `ty` from `raw`; `None` for a type this version cannot read or a
/// length that does not match.
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Option<Vec<f32>> {
    let mut out = vec![0f32; n];
    dequantize_into(ty, raw, &mut out)?;
    Some(out)
}

/// The k-quant kind (2..=6) of a type, if it is one.
fn k_kind(ty: GgmlType) -> Option<u8> {
    Some(match ty {
        GgmlType::Q2_K => 2,
        GgmlType::Q3_K => 3,
        GgmlType::Q4_K => 4,
        GgmlType::Q5_K => 5,
        GgmlType::Q6_K => 6,
        _ => return None,
    })
}

/// Dequantize `raw` (whole blocks of `ty`) into `out`; `None` for a type this version cannot read
/// (integer tensors, Q8_1/Q8_K scratch types) or lengths that do not match.
pub fn dequantize_into(ty: GgmlType, raw: &[u8], out: &mut [f32]) -> Option<()> {
    if ty.byte_len(out.len() as u64)? != raw.len() as u64 {
        return None;
    }
    if let Some(dt) = ty.dtype() {
        // Integer tensors are not values to dequantize.
        if !dt.is_float() {
            return None;
        }
        return decode_to_f32(dt, raw, out).ok();
    }
    let bs = ty.type_size() as usize;
    if let Some(kind) = k_kind(ty) {
        for (blk, y) in raw.chunks_exact(bs).zip(out.chunks_exact_mut(QK_K)) {
            kquants::dequantize_block(kind, blk, y);
        }
        return Some(());
    }
    if !matches!(
        ty,
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1
    ) {
        return crate::iquants::dequantize_other(ty, raw, out);
    }
    for (blk, y) in raw.chunks_exact(bs).zip(out.chunks_exact_mut(32)) {
        match ty {
            GgmlType::Q8_0 => {
                let d = f16(blk);
                for (j, q) in blk[2..34].iter().enumerate() {
                    y[j] = f32::from(*q as i8) * d;
                }
            }
            GgmlType::Q4_0 => {
                let d = f16(blk);
                for (j, q) in blk[2..18].iter().enumerate() {
                    y[j] = (i32::from(q & 0x0f) - 8) as f32 * d;
                    y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(blk), f16(&blk[2..]));
                for (j, q) in blk[4..20].iter().enumerate() {
                    y[j] = f32::from(q & 0x0f) * d + m;
                    y[j + 16] = f32::from(q >> 4) * d + m;
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let one = ty == GgmlType::Q5_1;
                let d = f16(blk);
                let m = if one { f16(&blk[2..]) } else { 0.0 };
                let o = if one { 4 } else { 2 };
                let qh = u32::from_le_bytes(blk[o..o + 4].try_into().ok()?);
                for (j, q) in blk[o + 4..o + 20].iter().enumerate() {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    let x0 = (u32::from(q & 0x0f) | h0) as i32;
                    let x1 = (u32::from(q >> 4) | h1) as i32;
                    if one {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 16) as f32 * d;
                        y[j + 16] = (x1 - 16) as f32 * d;
                    }
                }
            }
            _ => return None,
        }
    }
    Some(())
}

/// Whether [`dequantize`] can read `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    dequantize(ty, &[], 0).is_some()
}

/// Whether [`quantize`] can write `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
    ) || k_kind(ty).is_some()
}

/// Quantize `x` into `out` (exactly `ty.byte_len(x.len())` bytes) as ggml's reference quantizer
/// does; `None` when `ty` cannot be written ([`can_quantize`]) or the lengths do not fit whole
/// blocks.
pub fn quantize(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Option<()> {
    if !can_quantize(ty) || ty.byte_len(x.len() as u64)? != out.len() as u64 {
        return None;
    }
    if let Some(dt) = ty.dtype() {
        return encode_from_f32(dt, x, out).ok();
    }
    let bs = ty.type_size() as usize;
    if let Some(kind) = k_kind(ty) {
        kquants::quantize_blocks(kind, x, out);
        return Some(());
    }
    for (xb, yb) in x.chunks_exact(32).zip(out.chunks_exact_mut(bs)) {
        legacy_block(ty, xb, yb);
    }
    Some(())
}

/// C's float → integer conversion as x86-64 performs it (`cvttss2si`): truncation, with NaN and
/// out-of-range values giving `i32::MIN`. Narrowing that to a byte gives 0, which is what ggml's
/// quantizers store for blocks whose inverse scale overflowed.
#[inline]
fn c_f2i(x: f32) -> i32 {
    if x.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&x) {
        i32::MIN
    } else {
        x as i32
    }
}

fn put_f16(dst: &mut [u8], v: f32) {
    dst[..2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// One 32-element block of a legacy type (`quantize_row_q*_ref`).
fn legacy_block(ty: GgmlType, x: &[f32], y: &mut [u8]) {
    match ty {
        GgmlType::Q8_0 => {
            let mut amax = 0f32;
            for v in x {
                amax = amax.max(v.abs());
            }
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(y, d);
            for (q, v) in y[2..].iter_mut().zip(x) {
                *q = c_f2i((v * id).round()) as u8;
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let five = ty == GgmlType::Q5_0;
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in x {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let (div, off, top) = if five {
                (-16.0, 16.5f32, 31u8)
            } else {
                (-8.0, 8.5f32, 15u8)
            };
            let d = max / div;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(y, d);
            let q = |v: f32| (c_f2i(v * id + off) as i8 as u8).min(top);
            pack_nibbles(ty, x, y, q);
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let five = ty == GgmlType::Q5_1;
            let (mut min, mut max) = (f32::MAX, -f32::MAX);
            for &v in x {
                if v < min {
                    min = v;
                }
                if v > max {
                    max = v;
                }
            }
            let d = (max - min) / if five { 31.0 } else { 15.0 };
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(y, d);
            put_f16(&mut y[2..], min);
            if five {
                pack_nibbles(ty, x, y, |v| c_f2i((v - min) * id + 0.5) as u8);
            } else {
                pack_nibbles(ty, x, y, |v| {
                    (c_f2i((v - min) * id + 0.5) as i8 as u8).min(15)
                });
            }
        }
        _ => unreachable!("not a legacy type: {ty:?}"),
    }
}

/// Store levels as low/high nibbles (element j and j+16), with the fifth bits in a 32-bit `qh`
/// for the Q5 types.
fn pack_nibbles(ty: GgmlType, x: &[f32], y: &mut [u8], q: impl Fn(f32) -> u8) {
    let (qh_at, qs_at) = match ty {
        GgmlType::Q4_0 => (None, 2),
        GgmlType::Q4_1 => (None, 4),
        GgmlType::Q5_0 => (Some(2), 6),
        _ => (Some(4), 8),
    };
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (q(x[j]), q(x[j + 16]));
        y[qs_at + j] = (a & 0x0F) | ((b & 0x0F) << 4);
        qh |= u32::from((a & 0x10) >> 4) << j;
        qh |= u32::from((b & 0x10) >> 4) << (j + 16);
    }
    if let Some(at) = qh_at {
        y[at..at + 4].copy_from_slice(&qh.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block() {
        let mut blk = vec![0u8; 34];
        blk[..2].copy_from_slice(&0x3800u16.to_le_bytes()); // 0.5
        for j in 0..32 {
            blk[2 + j] = (j as i8 - 16) as u8;
        }
        let y = dequantize(GgmlType::Q8_0, &blk, 32).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);
        assert!(dequantize(GgmlType::Q8_0, &blk, 64).is_none());
    }
}
