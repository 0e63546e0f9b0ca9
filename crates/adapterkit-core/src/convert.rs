//! Bulk conversions between stored element types and f32, the type all arithmetic runs in.
//!
//! Decoding is exact for every float type (f64 is rounded to nearest). Encoding rounds once, to
//! nearest-even, as `half` and IEEE casts do; NaN stays NaN.

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::dtype::DType;
use crate::error::{Error, Result};

fn check_len(dtype: DType, bytes: usize, numel: usize) -> Result<()> {
    let expected = dtype
        .byte_len(numel as u64)
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(usize::MAX);
    if expected != bytes {
        return Err(Error::BufferLength {
            dtype,
            expected,
            found: bytes,
        });
    }
    Ok(())
}

/// Decode little-endian `bytes` of `dtype` into `out` (one f32 per element).
pub fn decode_to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    check_len(dtype, bytes.len(), out.len())?;
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(src) => out.copy_from_slice(src),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
        DType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            Ok(src) => bf16_to_f32(src, out),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(src) => src.convert_to_f32_slice(out),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        },
        DType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                *o = f64::from_le_bytes(a) as f32;
            }
        }
        DType::F8E4M3 | DType::F8E5M2 | DType::F8E4M3Fnuz | DType::F8E5M2Fnuz => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = decode_f8(dtype, b);
            }
        }
        DType::U8 => out.iter_mut().zip(bytes).for_each(|(o, &b)| *o = b as f32),
        DType::I8 => out
            .iter_mut()
            .zip(bytes)
            .for_each(|(o, &b)| *o = b as i8 as f32),
        DType::I16 | DType::U16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                let v = u16::from_le_bytes([c[0], c[1]]);
                *o = if dtype == DType::I16 {
                    v as i16 as f32
                } else {
                    v as f32
                };
            }
        }
        DType::I32 | DType::U32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                *o = if dtype == DType::I32 {
                    v as i32 as f32
                } else {
                    v as f32
                };
            }
        }
        DType::I64 | DType::U64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                let v = u64::from_le_bytes(a);
                *o = if dtype == DType::I64 {
                    v as i64 as f32
                } else {
                    v as f32
                };
            }
        }
        _ => {
            return Err(Error::UnsupportedConversion {
                dtype,
                op: "decode to f32",
            })
        }
    }
    Ok(())
}

/// Encode `src` into little-endian `out` bytes of `dtype`, rounding to nearest-even once.
pub fn encode_from_f32(dtype: DType, src: &[f32], out: &mut [u8]) -> Result<()> {
    check_len(dtype, out.len(), src.len())?;
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(out) {
            Ok(dst) => dst.copy_from_slice(src),
            Err(_) => {
                for (c, v) in out.chunks_exact_mut(4).zip(src) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
        },
        DType::BF16 => match bytemuck::try_cast_slice_mut::<u8, u16>(out) {
            Ok(dst) => f32_to_bf16(src, dst),
            Err(_) => {
                for (c, v) in out.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(out) {
            Ok(dst) => dst.convert_from_f32_slice(src),
            Err(_) => {
                for (c, v) in out.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        },
        DType::F64 => {
            for (c, v) in out.chunks_exact_mut(8).zip(src) {
                c.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        _ => {
            return Err(Error::UnsupportedConversion {
                dtype,
                op: "encode from f32",
            })
        }
    }
    Ok(())
}

/// Run `$body` compiled for the best instruction set this CPU has (AVX-512, AVX2, or the
/// portable baseline), chosen at run time. The body is written once as plain loops that the
/// compiler vectorises for each target.
macro_rules! simd_dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        simd_dispatch!($name($($arg: $ty),*) -> () $body)
    };
    ($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw")]
            fn avx512($($arg: $ty),*) -> $ret $body
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) -> $ret $body
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                #[allow(unsafe_code)]
                // SAFETY: the CPU supports AVX-512F/BW, checked just above.
                return unsafe { avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                #[allow(unsafe_code)]
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { avx2($($arg),*) };
            }
        }
        fn portable($($arg: $ty),*) -> $ret $body
        portable($($arg),*)
    }};
}

/// bf16 bit patterns to f32 (exact: a bf16 is the top half of an f32).
pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    simd_dispatch!(run(src: &[u16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((*s as u32) << 16);
        }
    })
}

/// f32 to bf16 bit patterns, rounding to nearest-even; NaN stays a (quiet) NaN. Bit-identical to
/// `half::bf16::from_f32`.
pub fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    simd_dispatch!(run(src: &[f32], dst: &mut [u16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let b = s.to_bits();
            let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
            let nan = (b >> 16) | 0x40;
            *d = if b & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded } as u16;
        }
    })
}

/// Whether every value is finite (no NaN, no infinity): one vectorised pass over the exponent
/// bits.
pub fn all_finite(v: &[f32]) -> bool {
    simd_dispatch!(run(v: &[f32]) -> bool {
        const EXP: u32 = 0x7f80_0000;
        v.iter().fold(0u32, |m, x| m.max(x.to_bits() & EXP)) != EXP
    })
}

/// Decode one 8-bit float. E4M3 is the OCP "fn" flavour (no infinities, NaN = S.1111.111); the
/// FNUZ flavours have one NaN (0x80), no negative zero and an exponent bias one higher.
pub fn decode_f8(dtype: DType, b: u8) -> f32 {
    let (exp_bits, man_bits, bias, fnuz) = match dtype {
        DType::F8E4M3 => (4u32, 3u32, 7i32, false),
        DType::F8E5M2 => (5, 2, 15, false),
        DType::F8E4M3Fnuz => (4, 3, 8, true),
        DType::F8E5M2Fnuz => (5, 2, 16, true),
        _ => return f32::NAN,
    };
    if fnuz && b == 0x80 {
        return f32::NAN;
    }
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> man_bits) as u32) & ((1 << exp_bits) - 1);
    let man = (b as u32) & ((1 << man_bits) - 1);
    let exp_max = (1u32 << exp_bits) - 1;
    if !fnuz {
        if dtype == DType::F8E5M2 && exp == exp_max {
            return if man == 0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            };
        }
        if dtype == DType::F8E4M3 && exp == exp_max && man == (1 << man_bits) - 1 {
            return f32::NAN;
        }
    }
    let m = man as f32 / (1u32 << man_bits) as f32;
    if exp == 0 {
        sign * m * 2f32.powi(1 - bias)
    } else {
        sign * (1.0 + m) * 2f32.powi(exp as i32 - bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_and_rounding() {
        let src = [1.0f32, -2.5, 3.0e-3, 1.0 + 1.0 / 256.0, f32::NAN];
        let mut bytes = vec![0u8; 10];
        encode_from_f32(DType::BF16, &src, &mut bytes).unwrap();
        let mut back = [0f32; 5];
        decode_to_f32(DType::BF16, &bytes, &mut back).unwrap();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -2.5);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: nearest-even gives 1.
        assert_eq!(back[3], 1.0);
        assert!(back[4].is_nan());
    }

    #[test]
    fn unaligned_buffers_decode() {
        let mut raw = [0u8; 9];
        raw[1..5].copy_from_slice(&1.5f32.to_le_bytes());
        raw[5..9].copy_from_slice(&(-4.0f32).to_le_bytes());
        let mut out = [0f32; 2];
        decode_to_f32(DType::F32, &raw[1..], &mut out).unwrap();
        assert_eq!(out, [1.5, -4.0]);
    }

    #[test]
    fn bf16_kernels_match_half_bit_for_bit() {
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x7f7f_ffff),
        ];
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            vals.push(f32::from_bits(x));
        }
        let mut ours = vec![0u16; vals.len()];
        f32_to_bf16(&vals, &mut ours);
        for (v, o) in vals.iter().zip(&ours) {
            assert_eq!(
                *o,
                bf16::from_f32(*v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
        let mut back = vec![0f32; ours.len()];
        bf16_to_f32(&ours, &mut back);
        for (b, o) in back.iter().zip(&ours) {
            assert_eq!(b.to_bits(), bf16::from_bits(*o).to_f32().to_bits());
        }
    }

    #[test]
    fn f8_values() {
        assert_eq!(decode_f8(DType::F8E4M3, 0x38), 1.0);
        assert_eq!(decode_f8(DType::F8E4M3, 0x7E), 448.0);
        assert!(decode_f8(DType::F8E4M3, 0x7F).is_nan());
        assert_eq!(decode_f8(DType::F8E5M2, 0x3C), 1.0);
        assert_eq!(decode_f8(DType::F8E5M2, 0x7C), f32::INFINITY);
        assert_eq!(decode_f8(DType::F8E4M3, 0x01), 2f32.powi(-9));
        assert!(decode_f8(DType::F8E4M3Fnuz, 0x80).is_nan());
        assert_eq!(decode_f8(DType::F8E4M3Fnuz, 0x40), 1.0);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut out = [0f32; 3];
        assert!(matches!(
            decode_to_f32(DType::F16, &[0u8; 4], &mut out),
            Err(Error::BufferLength { .. })
        ));
        assert!(matches!(
            encode_from_f32(DType::I32, &[0.0], &mut [0u8; 4]),
            Err(Error::UnsupportedConversion { .. })
        ));
    }
}
