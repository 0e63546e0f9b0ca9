//! ggml block dequantization for the types a GGUF adapter or the simple GGUF bases hold: F32,
//! F16, BF16 and the 32-element legacy blocks Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, as ggml's reference
//! `dequantize_row_*` computes them (f16 scales widened to f32, one multiply-add per element).

use adapterkit_core::convert::decode_to_f32;
use adapterkit_core::DType;

use crate::gguf::GgmlType;

fn f16(b: &[u8]) -> f32 {
    let mut v = [0f32];
    decode_to_f32(DType::F16, &b[..2], &mut v).expect("two bytes");
    v[0]
}

/// Dequantize `n` elements of `ty` from `raw`; `None` for a type this version cannot read or a
/// length that does not match.
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Option<Vec<f32>> {
    if ty.byte_len(n as u64)? != raw.len() as u64 {
        return None;
    }
    let mut out = vec![0f32; n];
    if let Some(dt) = ty.dtype() {
        // Integer tensors are not values to dequantize.
        if !dt.is_float() {
            return None;
        }
        decode_to_f32(dt, raw, &mut out).ok()?;
        return Some(out);
    }
    let bs = ty.type_size() as usize;
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
    Some(out)
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
