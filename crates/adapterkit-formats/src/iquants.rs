//! ggml's grid, non-linear, ternary and microscaling block types (spec: `formats/gguf.md`):
//! IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and MXFP4,
//! dequantized bit for bit as ggml's reference `dequantize_row_*` (llama.cpp 0c1e570,
//! `ggml/src/ggml-quants.c`) computes them in ggml-base, which is built without FMA: every
//! product and sum is rounded on its own, in C's left-to-right order.
//!
//! The lookup tables are data, `data/iq_tables.bin`, extracted from `ggml-common.h` by
//! `data/extract_iq_tables.py` and decoded once on first use.

use std::sync::OnceLock;

use adapterkit_core::convert::decode_to_f32;
use adapterkit_core::DType;

use crate::gguf::GgmlType;

/// The offset IQ1_S and IQ1_M add to every ternary grid value (`IQ1S_DELTA`; ggml's IQ1_M
/// dequantizer uses the same constant, not its own `IQ1M_DELTA`, which is also 0.125).
const IQ1_DELTA: f32 = 0.125;

static TABLE_BYTES: &[u8] = include_bytes!("../data/iq_tables.bin");

/// ggml's lookup tables. A grid row is the little-endian bytes of ggml's `uint64_t`/`uint32_t`
/// entry, which is what ggml reads through its `(const uint8_t *)` casts.
struct Tables {
    kmask: [u8; 8],
    ksigns: [u8; 128],
    iq2xxs: Vec<[u8; 8]>,
    iq2xs: Vec<[u8; 8]>,
    iq2s: Vec<[u8; 8]>,
    iq3xxs: Vec<[u8; 4]>,
    iq3s: Vec<[u8; 4]>,
    iq1s: Vec<[i8; 8]>,
    iq4nl: [i8; 16],
    fp4: [i8; 16],
}

/// One table of the data file: its element width, signedness and raw little-endian bytes.
struct RawTable<'a> {
    name: &'a str,
    width: u8,
    signed: bool,
    count: usize,
    data: &'a [u8],
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err(format!("truncated: {n} bytes wanted, {} left", buf.len()));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn parse_raw(mut buf: &[u8]) -> Result<Vec<RawTable<'_>>, String> {
    if take(&mut buf, 8)? != b"AKIQTAB1" {
        return Err("bad magic".into());
    }
    let n = u32::from_le_bytes(take(&mut buf, 4)?.try_into().expect("four bytes"));
    let mut tables = Vec::new();
    for _ in 0..n {
        let len = take(&mut buf, 1)?[0] as usize;
        let name = std::str::from_utf8(take(&mut buf, len)?).map_err(|e| e.to_string())?;
        let head = take(&mut buf, 6)?;
        let (width, signed) = (head[0], head[1] != 0);
        let count = u32::from_le_bytes(head[2..6].try_into().expect("four bytes")) as usize;
        let data = take(&mut buf, count * width as usize)?;
        tables.push(RawTable {
            name,
            width,
            signed,
            count,
            data,
        });
    }
    if !buf.is_empty() {
        return Err(format!("{} trailing bytes", buf.len()));
    }
    Ok(tables)
}

fn table<'a>(
    raw: &'a [RawTable<'a>],
    name: &str,
    width: u8,
    signed: bool,
    count: usize,
) -> Result<&'a [u8], String> {
    let t = raw
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("{name}: missing"))?;
    if (t.width, t.signed, t.count) != (width, signed, count) {
        return Err(format!(
            "{name}: width {} signed {} count {}, expected {width} {signed} {count}",
            t.width, t.signed, t.count
        ));
    }
    Ok(t.data)
}

fn rows<const N: usize>(data: &[u8]) -> Vec<[u8; N]> {
    data.chunks_exact(N)
        .map(|c| c.try_into().expect("N bytes"))
        .collect()
}

fn signed_bytes<const N: usize>(data: &[u8]) -> [i8; N] {
    std::array::from_fn(|i| data[i] as i8)
}

fn parse_tables(bytes: &[u8]) -> Result<Tables, String> {
    let raw = parse_raw(bytes)?;
    let t = |name, width, signed, count| table(&raw, name, width, signed, count);
    Ok(Tables {
        kmask: t("kmask_iq2xs", 1, false, 8)?.try_into().expect("8 bytes"),
        ksigns: t("ksigns_iq2xs", 1, false, 128)?
            .try_into()
            .expect("128 bytes"),
        iq2xxs: rows(t("iq2xxs_grid", 8, false, 256)?),
        iq2xs: rows(t("iq2xs_grid", 8, false, 512)?),
        iq2s: rows(t("iq2s_grid", 8, false, 1024)?),
        iq3xxs: rows(t("iq3xxs_grid", 4, false, 256)?),
        iq3s: rows(t("iq3s_grid", 4, false, 512)?),
        iq1s: rows::<8>(t("iq1s_grid", 8, false, 2048)?)
            .into_iter()
            .map(|r| r.map(|b| b as i8))
            .collect(),
        iq4nl: signed_bytes(t("kvalues_iq4nl", 1, true, 16)?),
        fp4: signed_bytes(t("kvalues_fp4", 1, true, 16)?),
    })
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        parse_tables(TABLE_BYTES).unwrap_or_else(|e| panic!("data/iq_tables.bin: {e}"))
    })
}

fn f16(b: &[u8]) -> f32 {
    let mut v = [0f32];
    decode_to_f32(DType::F16, &b[..2], &mut v).expect("two bytes");
    v[0]
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// ggml's `x * (neg ? -1.f : 1.f)`: a real multiply, so a NaN keeps its sign as the hardware
/// multiply leaves it.
#[inline]
fn sign(x: f32, neg: bool) -> f32 {
    x * if neg { -1.0 } else { 1.0 }
}

/// ggml's `GGML_E8M0_TO_FP32_HALF`: `2^(e-128)`, the two smallest as subnormals, 255 finite.
fn e8m0_half(e: u8) -> f32 {
    f32::from_bits(if e < 2 {
        0x0020_0000 << e
    } else {
        u32::from(e - 1) << 23
    })
}

/// Eight grid values of an IQ2 type: `(db * grid[j]) * ±1`, sign bit j of `signs`.
fn grid8(t: &Tables, y: &mut [f32], db: f32, grid: &[u8; 8], signs: u8) {
    for j in 0..8 {
        y[j] = sign(db * f32::from(grid[j]), signs & t.kmask[j] != 0);
    }
}

fn iq2_xxs(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    let qs = &b[2..66];
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let aux1 = u32_at(qs, 8 * ib + 4);
        let db = d * (0.5 + (aux1 >> 28) as f32) * 0.25;
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let grid = &t.iq2xxs[qs[8 * ib + l] as usize];
            let signs = t.ksigns[((aux1 >> (7 * l)) & 127) as usize];
            grid8(t, y, db, grid, signs);
        }
    }
}

fn iq2_xs(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    let scales = &b[66..74];
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let db = [
            d * (0.5 + f32::from(scales[ib] & 0xf)) * 0.25,
            d * (0.5 + f32::from(scales[ib] >> 4)) * 0.25,
        ];
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let q = u16_at(b, 2 + 2 * (4 * ib + l));
            let grid = &t.iq2xs[(q & 511) as usize];
            grid8(t, y, db[l / 2], grid, t.ksigns[(q >> 9) as usize]);
        }
    }
}

fn iq2_s(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    let (qs, signs) = (&b[2..34], &b[34..66]);
    let (qh, scales) = (&b[66..74], &b[74..82]);
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let db = [
            d * (0.5 + f32::from(scales[ib] & 0xf)) * 0.25,
            d * (0.5 + f32::from(scales[ib] >> 4)) * 0.25,
        ];
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let hi = (u32::from(qh[ib]) << (8 - 2 * l)) & 0x300;
            let grid = &t.iq2s[(u32::from(qs[4 * ib + l]) | hi) as usize];
            grid8(t, y, db[l / 2], grid, signs[4 * ib + l]);
        }
    }
}

/// Two four-value IQ3 grid rows under one sign byte: `(db * grid[j]) * ±1`.
fn grid4x2(t: &Tables, y: &mut [f32], db: f32, g1: &[u8; 4], g2: &[u8; 4], signs: u8) {
    for j in 0..4 {
        y[j] = sign(db * f32::from(g1[j]), signs & t.kmask[j] != 0);
        y[j + 4] = sign(db * f32::from(g2[j]), signs & t.kmask[j + 4] != 0);
    }
}

fn iq3_xxs(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    let (qs, scales_signs) = (&b[2..66], &b[66..98]);
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let aux = u32_at(scales_signs, 4 * ib);
        let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let signs = t.ksigns[((aux >> (7 * l)) & 127) as usize];
            let g1 = &t.iq3xxs[qs[8 * ib + 2 * l] as usize];
            let g2 = &t.iq3xxs[qs[8 * ib + 2 * l + 1] as usize];
            grid4x2(t, y, db, g1, g2, signs);
        }
    }
}

fn iq3_s(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    let (qs, qh) = (&b[2..66], &b[66..74]);
    let (signs, scales) = (&b[74..106], &b[106..110]);
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let nibble = (scales[ib / 2] >> (4 * (ib % 2))) & 0xf;
        let db = d * (1 + 2 * i32::from(nibble)) as f32;
        let h = u32::from(qh[ib]);
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let i1 = u32::from(qs[8 * ib + 2 * l]) | ((h << (8 - 2 * l)) & 256);
            let i2 = u32::from(qs[8 * ib + 2 * l + 1]) | ((h << (7 - 2 * l)) & 256);
            let (g1, g2) = (&t.iq3s[i1 as usize], &t.iq3s[i2 as usize]);
            grid4x2(t, y, db, g1, g2, signs[4 * ib + l]);
        }
    }
}

fn delta(neg: bool) -> f32 {
    if neg {
        -IQ1_DELTA
    } else {
        IQ1_DELTA
    }
}

/// Eight IQ1 values: `dl * (grid[j] + delta)`.
fn iq1_row(y: &mut [f32], dl: f32, grid: &[i8; 8], delta: f32) {
    for j in 0..8 {
        y[j] = dl * (f32::from(grid[j]) + delta);
    }
}

fn iq1_s(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    let qs = &b[2..34];
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let qh = u16_at(b, 34 + 2 * ib);
        let dl = d * (2 * i32::from((qh >> 12) & 7) + 1) as f32;
        let delta = delta(qh & 0x8000 != 0);
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let idx = usize::from(qs[4 * ib + l]) | (usize::from((qh >> (3 * l)) & 7) << 8);
            iq1_row(y, dl, &t.iq1s[idx], delta);
        }
    }
}

fn iq1_m(t: &Tables, b: &[u8], y: &mut [f32]) {
    let (qs, qh) = (&b[0..32], &b[32..48]);
    let sc: [u16; 4] = std::array::from_fn(|i| u16_at(b, 48 + 2 * i));
    let scale =
        (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000);
    let d = f16(&scale.to_le_bytes());
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let s = sc[ib / 2] >> (6 * (ib % 2));
        let dl = [
            d * (2 * i32::from(s & 7) + 1) as f32,
            d * (2 * i32::from((s >> 3) & 7) + 1) as f32,
        ];
        let (h0, h1) = (u16::from(qh[2 * ib]), u16::from(qh[2 * ib + 1]));
        let hs = [h0, h0 >> 4, h1, h1 >> 4];
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let idx = u16::from(qs[4 * ib + l]) | ((hs[l] << 8) & 0x700);
            iq1_row(
                y,
                dl[l / 2],
                &t.iq1s[idx as usize],
                delta(hs[l] & 0x08 != 0),
            );
        }
    }
}

fn iq4_nl(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    for (j, q) in b[2..18].iter().enumerate() {
        y[j] = d * f32::from(t.iq4nl[(q & 0xf) as usize]);
        y[j + 16] = d * f32::from(t.iq4nl[(q >> 4) as usize]);
    }
}

fn iq4_xs(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    let scales_h = u32::from(u16_at(b, 2));
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let lo = (u32::from(scales_l[ib / 2]) >> (4 * (ib % 2))) & 0xf;
        let ls = lo | (((scales_h >> (2 * ib)) & 3) << 4);
        let dl = d * (ls as i32 - 32) as f32;
        for (j, q) in qs[16 * ib..16 * ib + 16].iter().enumerate() {
            y[j] = dl * f32::from(t.iq4nl[(q & 0xf) as usize]);
            y[j + 16] = dl * f32::from(t.iq4nl[(q >> 4) as usize]);
        }
    }
}

/// The base-3 digit `n` of a TQ1_0 byte, as ggml extracts it: the byte times `3^n` (wrapping), then
/// the top of that fraction times 3.
fn trit(q: u8, n: u32) -> f32 {
    let q = q.wrapping_mul(3u8.pow(n));
    let xi = (i32::from(q) * 3) >> 8;
    (xi - 1) as f32
}

fn tq1_0(b: &[u8], y: &mut [f32]) {
    let d = f16(&b[52..54]);
    let mut y = y.iter_mut();
    // 48 bytes of five trits: one run of 32 bytes, one of 16, each digit by digit.
    for run in [&b[0..32], &b[32..48]] {
        for n in 0..5 {
            for &q in run {
                *y.next().expect("256 outputs") = trit(q, n) * d;
            }
        }
    }
    // 4 bytes of four trits.
    for n in 0..4 {
        for &q in &b[48..52] {
            *y.next().expect("256 outputs") = trit(q, n) * d;
        }
    }
}

fn tq2_0(b: &[u8], y: &mut [f32]) {
    let d = f16(&b[64..66]);
    for (half, y) in b[0..64].chunks_exact(32).zip(y.chunks_exact_mut(128)) {
        for (l, y) in y.chunks_exact_mut(32).enumerate() {
            for (o, q) in y.iter_mut().zip(half) {
                *o = (i32::from((q >> (2 * l)) & 3) - 1) as f32 * d;
            }
        }
    }
}

fn mxfp4(t: &Tables, b: &[u8], y: &mut [f32]) {
    let d = e8m0_half(b[0]);
    for (j, q) in b[1..17].iter().enumerate() {
        y[j] = f32::from(t.fp4[(q & 0xf) as usize]) * d;
        y[j + 16] = f32::from(t.fp4[(q >> 4) as usize]) * d;
    }
}

/// ggml's unsigned E4M3 sub-block scale, halved (`ggml_ue4m3_to_fp32`).
fn ue4m3_half(x: u8) -> f32 {
    if x == 0 || x == 0x7f {
        return 0.0;
    }
    let (exp, man) = (i32::from((x >> 3) & 0xf), f32::from(x & 7));
    let raw = if exp == 0 {
        man * 2f32.powi(-9)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    raw * 0.5
}

fn nvfp4(t: &Tables, b: &[u8], y: &mut [f32]) {
    for s in 0..4 {
        let d = ue4m3_half(b[s]);
        let (qs, yb) = (&b[4 + 8 * s..12 + 8 * s], &mut y[16 * s..16 * s + 16]);
        for (j, q) in qs.iter().enumerate() {
            yb[j] = f32::from(t.fp4[(q & 0xf) as usize]) * d;
            yb[j + 8] = f32::from(t.fp4[(q >> 4) as usize]) * d;
        }
    }
}

/// Q1_0: one sign bit per element, ±d.
fn q1_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    for (j, v) in y.iter_mut().enumerate() {
        *v = if (b[2 + j / 8] >> (j % 8)) & 1 != 0 {
            d
        } else {
            -d
        };
    }
}

/// Q2_0: two bits per element, levels −1, 0, 1, 2 times d.
fn q2_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b);
    for (j, v) in y.iter_mut().enumerate() {
        let q = (b[2 + j / 4] >> ((j % 4) * 2)) & 3;
        *v = (i32::from(q) - 1) as f32 * d;
    }
}

/// Dequantize whole blocks of `ty` from `raw` into `out` (`out.len()` = elements); `None` when
/// `ty` is not one of the types handled here or the lengths do not match.
pub(crate) fn dequantize_other(ty: GgmlType, raw: &[u8], out: &mut [f32]) -> Option<()> {
    use GgmlType as G;
    let kernel: fn(&Tables, &[u8], &mut [f32]) = match ty {
        G::IQ2_XXS => iq2_xxs,
        G::IQ2_XS => iq2_xs,
        G::IQ2_S => iq2_s,
        G::IQ3_XXS => iq3_xxs,
        G::IQ3_S => iq3_s,
        G::IQ1_S => iq1_s,
        G::IQ1_M => iq1_m,
        G::IQ4_NL => iq4_nl,
        G::IQ4_XS => iq4_xs,
        G::TQ1_0 => |_, b, y| tq1_0(b, y),
        G::TQ2_0 => |_, b, y| tq2_0(b, y),
        G::MXFP4 => mxfp4,
        G::NVFP4 => nvfp4,
        G::Q1_0 => |_, b, y| q1_0(b, y),
        G::Q2_0 => |_, b, y| q2_0(b, y),
        _ => return None,
    };
    let (bs, ts) = (ty.block_size() as usize, ty.type_size() as usize);
    if out.len() % bs != 0 || (out.len() / bs).checked_mul(ts)? != raw.len() {
        return None;
    }
    let t = tables();
    for (blk, y) in raw.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
        kernel(t, blk, y);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const TYPES: [GgmlType; 15] = [
        GgmlType::NVFP4,
        GgmlType::Q1_0,
        GgmlType::Q2_0,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ2_S,
        GgmlType::IQ3_XXS,
        GgmlType::IQ3_S,
        GgmlType::IQ1_S,
        GgmlType::IQ1_M,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
    ];

    #[test]
    fn tables_decode() {
        let t = parse_tables(TABLE_BYTES).unwrap();
        assert_eq!(t.kmask, [1, 2, 4, 8, 16, 32, 64, 128]);
        // ksigns: seven sign bits plus an eighth that makes the count of set bits even.
        for (i, s) in t.ksigns.iter().enumerate() {
            assert_eq!(*s as usize & 127, i);
            assert_eq!(s.count_ones() % 2, 0);
        }
        assert_eq!(
            t.iq4nl,
            [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
        );
        assert_eq!(
            t.fp4,
            [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]
        );
        // First and last entries as written in ggml-common.h (little-endian rows).
        assert_eq!(u64::from_le_bytes(t.iq2xxs[1]), 0x080808080808082b);
        assert_eq!(u32::from_le_bytes(t.iq3xxs[1]), 0x04040414);
        assert_eq!(t.iq1s[0], [-1; 8]);
        assert_eq!(t.iq1s[2047], [1; 8]);
        assert!(t.iq1s.iter().flatten().all(|v| (-1..=1).contains(v)));
    }

    #[test]
    fn tables_reject_damage() {
        assert!(parse_tables(&TABLE_BYTES[..TABLE_BYTES.len() - 1]).is_err());
        let mut extra = TABLE_BYTES.to_vec();
        extra.push(0);
        assert!(parse_tables(&extra).is_err());
        let mut magic = TABLE_BYTES.to_vec();
        magic[0] = b'X';
        assert!(parse_tables(&magic).is_err());
    }

    #[test]
    fn e8m0_half_matches_ggml() {
        assert_eq!(e8m0_half(0).to_bits(), 0x0020_0000);
        assert_eq!(e8m0_half(1).to_bits(), 0x0040_0000);
        assert_eq!(e8m0_half(127), 0.5);
        assert_eq!(e8m0_half(128), 1.0);
        assert_eq!(e8m0_half(255), 2f32.powi(127));
        for e in 2..=255u8 {
            assert_eq!(e8m0_half(e), 2f32.powi(i32::from(e) - 128));
        }
    }

    #[test]
    fn lengths_and_types() {
        for ty in TYPES {
            let (bs, ts) = (ty.block_size() as usize, ty.type_size() as usize);
            let raw = vec![0u8; 2 * ts];
            let mut out = vec![1f32; 2 * bs];
            assert_eq!(dequantize_other(ty, &raw, &mut out), Some(()), "{ty}");
            assert!(dequantize_other(ty, &raw[1..], &mut out).is_none(), "{ty}");
            assert!(dequantize_other(ty, &raw, &mut out[1..]).is_none(), "{ty}");
            assert!(dequantize_other(ty, &raw, &mut out[bs..]).is_none(), "{ty}");
            assert_eq!(dequantize_other(ty, &[], &mut []), Some(()), "{ty}");
        }
        for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F32] {
            assert!(dequantize_other(ty, &[0; 34], &mut [0.0; 32]).is_none());
        }
    }

    #[test]
    fn mxfp4_block() {
        let mut blk = [0u8; 17];
        blk[0] = 127; // 2^0: the doubled e2m1 table times one half
        blk[1] = 0xf7; // low nibble 7 -> 6.0, high nibble 15 -> -6.0
        let mut y = [0f32; 32];
        dequantize_other(GgmlType::MXFP4, &blk, &mut y).unwrap();
        assert_eq!((y[0], y[16], y[1]), (6.0, -6.0, 0.0));
    }

    #[test]
    fn tq2_0_block() {
        let mut blk = [0u8; 66];
        blk[64..].copy_from_slice(&0x3c00u16.to_le_bytes()); // d = 1
        blk[0] = 0b00_01_10_00; // element 0: -1, 32: 1, 64: 0, 96: -1
        let mut y = [9f32; 256];
        dequantize_other(GgmlType::TQ2_0, &blk, &mut y).unwrap();
        assert_eq!(
            (y[0], y[32], y[64], y[96], y[1]),
            (-1.0, 1.0, 0.0, -1.0, -1.0)
        );
    }

    /// Equal bit patterns, or both NaN.
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Our dequantization of the `.q` file at `q` against ggml's `.deq` at `deq`, bit for bit
    /// (any NaN matching any NaN unless `strict`).
    fn check_pair(ty: GgmlType, q: &Path, deq: &Path, strict: bool) -> Result<(), String> {
        let raw = std::fs::read(q).map_err(|e| format!("{}: {e}", q.display()))?;
        let deq = std::fs::read(deq).map_err(|e| format!("{}: {e}", deq.display()))?;
        let want: Vec<f32> = deq
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize_other(ty, &raw, &mut got)
            .ok_or_else(|| format!("{}: lengths refused", q.display()))?;
        let eq = |a: f32, b: f32| {
            if strict {
                a.to_bits() == b.to_bits()
            } else {
                same(a, b)
            }
        };
        match (0..want.len()).find(|&i| !eq(got[i], want[i])) {
            Some(i) => Err(format!(
                "{}: element {i}: {:#010x} != ggml {:#010x}",
                q.display(),
                got[i].to_bits(),
                want[i].to_bits()
            )),
            None => Ok(()),
        }
    }

    /// Every handled type against every case of ggml's golden output in
    /// `fixtures/quants/manifest.json` (`fixtures/quants/generate.py`), bit for bit.
    #[test]
    fn golden_fixtures() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/quants");
        let text = std::fs::read(dir.join("manifest.json")).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let cases = manifest["cases"].as_array().expect("cases");
        assert!(!cases.is_empty());
        let mut checked: Vec<(GgmlType, usize)> = TYPES.iter().map(|&t| (t, 0)).collect();
        let mut fails = Vec::new();
        for case in cases {
            for out in case["outputs"].as_array().expect("outputs") {
                let Some(ty) = out["type"].as_str().and_then(GgmlType::from_name) else {
                    continue;
                };
                let Some(n) = checked.iter_mut().find(|(t, _)| *t == ty) else {
                    continue;
                };
                let q = dir.join(out["q"]["path"].as_str().expect("q path"));
                let deq = dir.join(out["deq"]["path"].as_str().expect("deq path"));
                if let Err(e) = check_pair(ty, &q, &deq, false) {
                    fails.push(e);
                }
                n.1 += 1;
            }
        }
        assert!(fails.is_empty(), "{fails:#?}");
        let absent: Vec<_> = checked.iter().filter(|c| c.1 == 0).map(|c| c.0).collect();
        assert!(
            absent.is_empty(),
            "types absent from the fixtures: {absent:?}"
        );
    }
}
