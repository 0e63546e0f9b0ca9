//! ggml's k-quants (256-element super-blocks): the reference quantizers llama.cpp uses when it has
//! no importance matrix (`quantize_row_q{2..6}_K_ref`, what `llama-quantize` runs without
//! `--imatrix`) and the matching dequantizers.
//!
//! The output is bit-exact with ggml because every float operation happens in the same order and
//! in the same precision: ggml-base is built for the baseline ISA, so nothing is fused into an FMA,
//! and rounding goes through the same `+ 1.5·2²³` trick (`nearest_int`), which rounds halves to
//! even. Keep both properties when touching this file: no `mul_add`, no reassociation.

use half::f16;

/// Elements per super-block.
pub const QK_K: usize = 256;
const GROUP_MAX_EPS: f32 = 1e-15;

/// Bytes per super-block of each k-quant.
pub const Q2_K_SIZE: usize = 84;
/// See [`Q2_K_SIZE`].
pub const Q3_K_SIZE: usize = 110;
/// See [`Q2_K_SIZE`].
pub const Q4_K_SIZE: usize = 144;
/// See [`Q2_K_SIZE`].
pub const Q5_K_SIZE: usize = 176;
/// See [`Q2_K_SIZE`].
pub const Q6_K_SIZE: usize = 210;

/// Round to the nearest integer, halves to even, as ggml does it: add 1.5·2²³ and read the
/// mantissa. Valid for |x| < 2²²; larger values give what ggml gives, which is garbage either way.
#[inline]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

#[inline]
fn to_f16(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

#[inline]
fn from_f16(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// The first element of largest magnitude, and that magnitude (ggml's scan: strictly greater).
#[inline]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (max, amax)
}

#[cfg(test)]
/// Symmetric quantization of a group to `[-nmax, nmax-1]` with ggml's 19-step scale search,
/// weighting each element by x² (`make_qx_quants`, rmse_type 1, no importance). `l` receives the
/// levels shifted by `nmax`; the return value is the scale.
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let clamp = |q: i32| q.clamp(-nmax, nmax - 1);
    let mut iscale = (-nmax) as f32 / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        let q = clamp(nearest_int(iscale * v));
        *li = (q + nmax) as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1f32 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let q = clamp(nearest_int(iscale * v));
            let w = v * v;
            sumlx += w * v * q as f32;
            suml2 += w * q as f32 * q as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (li, &v) in l.iter_mut().zip(x) {
                *li = (nmax + clamp(nearest_int(iscale * v))) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q3_K's symmetric group quantizer with coordinate-descent refinement (`make_q3_quants`,
/// `do_rmse`). `l` receives levels shifted by `nmax`.
fn make_q3_quants(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let clamp = |q: i32| q.clamp(-nmax, nmax - 1);
    let iscale = (-nmax) as f32 / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        let q = clamp(nearest_int(iscale * v));
        *li = q as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for (li, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let old = *li as f32;
            let mut slx = sumlx - w * v * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new_l = clamp(nearest_int(v * sl2 / slx));
                if new_l != i32::from(*li) {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for li in l.iter_mut() {
        *li += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Asymmetric group quantization to `[0, nmax]` with a min, searching `nstep + 1` scales
/// (`make_qkx2_quants`). Returns `(scale, -min)`.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l: &mut [u8],
    aux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * f32::from(l[i]) + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let w = weights[i];
            let qf = q as f32;
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(aux[i]) + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// [`make_qkx2_quants`] for `L` groups of `N` at once: lane `j` is group `j`, and every lane runs
/// exactly the scalar sequence of operations (same order, same rounding), so the result is the
/// same bits; the compiler turns the inner lane loops into vector instructions. `xt[i][j]` is
/// element `i` of group `j`.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
fn qkx2_lanes<const L: usize, const N: usize>(
    xt: &[[f32; L]; N],
    wt: &[[f32; L]; N],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
    lq: &mut [[u8; L]; N],
    scale_out: &mut [f32; L],
    min_out: &mut [f32; L],
) {
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; L];
    for j in 0..L {
        sum_x[j] = sum_w[j] * xt[0][j];
    }
    for i in 1..N {
        for j in 0..L {
            let x = xt[i][j];
            if x < min[j] {
                min[j] = x;
            }
            if x > max[j] {
                max[j] = x;
            }
            sum_w[j] += wt[i][j];
            sum_x[j] += wt[i][j] * x;
        }
    }
    let mut degenerate = [false; L];
    let mut scale = [0f32; L];
    let mut best = [0f32; L];
    let mut iscale = [0f32; L];
    for j in 0..L {
        if min[j] > 0.0 {
            min[j] = 0.0;
        }
        degenerate[j] = max[j] == min[j];
        iscale[j] = nmax as f32 / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }
    for i in 0..N {
        for j in 0..L {
            let q = nearest_int(iscale[j] * (xt[i][j] - min[j])).clamp(0, nmax);
            lq[i][j] = q as u8;
            let diff = scale[j] * q as f32 + min[j] - xt[i][j];
            best[j] += wt[i][j] * err(diff);
        }
    }
    let mut aux = [[0u8; L]; N];
    for is in 0..=nstep {
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; L], [0f32; L], [0f32; L]);
        for j in 0..L {
            iscale[j] = (rmin + rdelta * is as f32 + nmax as f32) / (max[j] - min[j]);
        }
        for i in 0..N {
            for j in 0..L {
                let q = nearest_int(iscale[j] * (xt[i][j] - min[j])).clamp(0, nmax);
                aux[i][j] = q as u8;
                let (w, qf) = (wt[i][j], q as f32);
                sum_l[j] += w * qf;
                sum_l2[j] += w * qf * qf;
                sum_xl[j] += w * qf * xt[i][j];
            }
        }
        let (mut this_scale, mut this_min, mut ok) = ([0f32; L], [0f32; L], [false; L]);
        for j in 0..L {
            let d = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            ok[j] = d > 0.0;
            this_scale[j] = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / d;
            this_min[j] = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / d;
            if this_min[j] > 0.0 {
                this_min[j] = 0.0;
                this_scale[j] = sum_xl[j] / sum_l2[j];
            }
        }
        let mut cur = [0f32; L];
        for i in 0..N {
            for j in 0..L {
                let diff = this_scale[j] * aux[i][j] as f32 + this_min[j] - xt[i][j];
                cur[j] += wt[i][j] * err(diff);
            }
        }
        let mut upd = [false; L];
        for j in 0..L {
            upd[j] = ok[j] && cur[j] < best[j];
            if upd[j] {
                best[j] = cur[j];
                scale[j] = this_scale[j];
                min[j] = this_min[j];
            }
        }
        for i in 0..N {
            for j in 0..L {
                if upd[j] {
                    lq[i][j] = aux[i][j];
                }
            }
        }
    }
    for j in 0..L {
        if degenerate[j] {
            for row in lq.iter_mut() {
                row[j] = 0;
            }
            scale_out[j] = 0.0;
        } else {
            scale_out[j] = scale[j];
        }
        min_out[j] = -min[j];
    }
}

/// [`make_qx_quants`] (rmse_type 1, no importance) for `L` groups of `N` at once, lane by lane as
/// [`qkx2_lanes`]. `lq` receives the levels shifted by `nmax`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn qx_lanes<const L: usize, const N: usize>(
    xt: &[[f32; L]; N],
    nmax: i32,
    lq: &mut [[i8; L]; N],
    scale_out: &mut [f32; L],
) {
    let (mut max, mut amax) = ([0f32; L], [0f32; L]);
    for i in 0..N {
        for j in 0..L {
            let ax = xt[i][j].abs();
            if ax > amax[j] {
                amax[j] = ax;
                max[j] = xt[i][j];
            }
        }
    }
    let clamp = |q: i32| q.clamp(-nmax, nmax - 1);
    let mut iscale = [0f32; L];
    let (mut sumlx, mut suml2) = ([0f32; L], [0f32; L]);
    for j in 0..L {
        iscale[j] = (-nmax) as f32 / max[j];
    }
    for i in 0..N {
        for j in 0..L {
            let v = xt[i][j];
            let q = clamp(nearest_int(iscale[j] * v));
            lq[i][j] = (q + nmax) as i8;
            let w = v * v;
            sumlx[j] += w * v * q as f32;
            suml2[j] += w * q as f32 * q as f32;
        }
    }
    let (mut scale, mut best) = ([0f32; L], [0f32; L]);
    for j in 0..L {
        scale[j] = if suml2[j] != 0.0 {
            sumlx[j] / suml2[j]
        } else {
            0.0
        };
        best[j] = scale[j] * sumlx[j];
    }
    let mut aux = [[0i8; L]; N];
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        for j in 0..L {
            iscale[j] = -(nmax as f32 + 0.1f32 * is as f32) / max[j];
            sumlx[j] = 0.0;
            suml2[j] = 0.0;
        }
        for i in 0..N {
            for j in 0..L {
                let v = xt[i][j];
                let q = clamp(nearest_int(iscale[j] * v));
                aux[i][j] = (q + nmax) as i8;
                let w = v * v;
                sumlx[j] += w * v * q as f32;
                suml2[j] += w * q as f32 * q as f32;
            }
        }
        let mut upd = [false; L];
        for j in 0..L {
            upd[j] = suml2[j] > 0.0 && sumlx[j] * sumlx[j] > best[j] * suml2[j];
            if upd[j] {
                scale[j] = sumlx[j] / suml2[j];
                best[j] = scale[j] * sumlx[j];
            }
        }
        for i in 0..N {
            for j in 0..L {
                if upd[j] {
                    lq[i][j] = aux[i][j];
                }
            }
        }
    }
    for j in 0..L {
        if amax[j] < GROUP_MAX_EPS {
            for row in lq.iter_mut() {
                row[j] = 0;
            }
            scale_out[j] = 0.0;
        } else {
            scale_out[j] = scale[j];
        }
    }
}

/// Lane-major levels back to element order (group `j` holds elements `N·j..N·j+N`), and the
/// largest scale and min, scanned in group order as ggml does.
#[inline(always)]
fn gather<const L: usize, const N: usize>(
    lq: &[[u8; L]; N],
    scales: &[f32; L],
    mins: &[f32; L],
    l: &mut [u8],
) -> (f32, f32) {
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..L {
        for (i, row) in lq.iter().enumerate() {
            l[N * j + i] = row[j];
        }
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    (max_scale, max_min)
}

/// The 6-bit scale and min of sub-block `j` packed in Q4_K/Q5_K's 12 scale bytes.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Pack 8 six-bit scales and mins into 12 bytes (Q4_K/Q5_K layout).
fn pack_scale_min_k4(scales: &[f32; 8], mins: &[f32; 8], max_scale: f32, max_min: f32) -> [u8; 12] {
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut out = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            out[j] = ls;
            out[j + 4] = lm;
        } else {
            out[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            out[j - 4] |= (ls >> 4) << 6;
            out[j] |= (lm >> 4) << 6;
        }
    }
    out
}

/// Quantize whole super-blocks `x` into `y` (`type_size` bytes each) for `kind` ∈ 2..=6,
/// compiled for AVX-512 or AVX2 when the CPU has them (chosen at run time; the lane loops
/// vectorise, the arithmetic per element is unchanged, so the bytes are the same everywhere).
pub(crate) fn quantize_blocks(kind: u8, x: &[f32], y: &mut [u8]) {
    #[inline(always)]
    fn run(kind: u8, x: &[f32], y: &mut [u8]) {
        let size = y.len() / (x.len() / QK_K).max(1);
        for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(size)) {
            quantize_block(kind, xb, yb);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        fn avx512(kind: u8, x: &[f32], y: &mut [u8]) {
            run(kind, x, y)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(kind: u8, x: &[f32], y: &mut [u8]) {
            run(kind, x, y)
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX-512F/BW/VL, checked just above.
            return unsafe { avx512(kind, x, y) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(kind, x, y) };
        }
    }
    run(kind, x, y)
}

/// Quantize one 256-element super-block `x` into `y` (`type_size` bytes) for `kind` ∈ 2..=6.
#[inline(always)]
pub(crate) fn quantize_block(kind: u8, x: &[f32], y: &mut [u8]) {
    match kind {
        2 => q2_k(x, y),
        3 => q3_k(x, y),
        4 => q45_k(x, y, false),
        5 => q45_k(x, y, true),
        6 => q6_k(x, y),
        _ => unreachable!("k-quant kind {kind}"),
    }
}

#[inline(always)]
fn q2_k(x: &[f32], y: &mut [u8]) {
    // Layout: scales[16] | qs[64] | d f16 | dmin f16.
    let mut l = [0u8; QK_K];
    let mut mins = [0f32; 16];
    let mut scales = [0f32; 16];
    let q4scale = 15f32;
    let mut xt = [[0f32; 16]; 16];
    let mut wt = [[0f32; 16]; 16];
    for j in 0..16 {
        for i in 0..16 {
            xt[i][j] = x[16 * j + i];
            wt[i][j] = x[16 * j + i].abs();
        }
    }
    let mut lq = [[0u8; 16]; 16];
    qkx2_lanes::<16, 16>(
        &xt,
        &wt,
        3,
        -0.5,
        0.1,
        15,
        true,
        &mut lq,
        &mut scales,
        &mut mins,
    );
    let (max_scale, max_min) = gather(&lq, &scales, &mins, &mut l);
    let (sc, rest) = y.split_at_mut(16);
    let (qs, dd) = rest.split_at_mut(64);
    if max_scale > 0.0 {
        let iscale = q4scale / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        dd[..2].copy_from_slice(&to_f16(max_scale / q4scale));
    } else {
        sc.fill(0);
        dd[..2].copy_from_slice(&to_f16(0.0));
    }
    if max_min > 0.0 {
        let iscale = q4scale / max_min;
        for j in 0..16 {
            let q = nearest_int(iscale * mins[j]);
            sc[j] |= (q << 4) as u8;
        }
        dd[2..4].copy_from_slice(&to_f16(max_min / q4scale));
    } else {
        dd[2..4].copy_from_slice(&to_f16(0.0));
    }
    let d_all = from_f16(&dd[..2]);
    let dmin_all = from_f16(&dd[2..4]);
    for j in 0..16 {
        let d = d_all * f32::from(sc[j] & 0xF);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(sc[j] >> 4);
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + dm) / d);
            l[16 * j + ii] = q.clamp(0, 3) as u8;
        }
    }
    for j in (0..QK_K).step_by(128) {
        for k in 0..32 {
            qs[j / 4 + k] =
                l[j + k] | (l[j + k + 32] << 2) | (l[j + k + 64] << 4) | (l[j + k + 96] << 6);
        }
    }
}

#[inline(always)]
fn q3_k(x: &[f32], y: &mut [u8]) {
    // Layout: hmask[32] | qs[64] | scales[12] | d f16.
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut amax) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(&x[16 * j..16 * j + 16], 4, &mut l[16 * j..16 * j + 16]);
        let s = scales[j].abs();
        if s > amax {
            amax = s;
            max_scale = scales[j];
        }
    }
    let (hmask, rest) = y.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (sc, d) = rest.split_at_mut(12);
    sc.fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            let q = nearest_int(iscale * scales[j]) as i8;
            let q = (q.clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = q & 0xF;
            } else {
                sc[j - 8] |= (q & 0xF) << 4;
            }
            sc[j % 4 + 8] |= (q >> 4) << (2 * (j / 4));
        }
        d.copy_from_slice(&to_f16(1.0 / iscale));
    } else {
        d.copy_from_slice(&to_f16(0.0));
    }
    let d_all = from_f16(d);
    for j in 0..16 {
        let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
        let s = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 - 32;
        let dj = d_all * f32::from(s);
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj);
            l[16 * j + ii] = (q.clamp(-4, 3) + 4) as i8;
        }
    }
    hmask.fill(0);
    let (mut m, mut hm) = (0usize, 1u8);
    for lj in l.iter_mut() {
        if *lj > 3 {
            hmask[m] |= hm;
            *lj -= 4;
        }
        m += 1;
        if m == QK_K / 8 {
            m = 0;
            hm <<= 1;
        }
    }
    for j in (0..QK_K).step_by(128) {
        for k in 0..32 {
            qs[j / 4 + k] =
                (l[j + k] | (l[j + k + 32] << 2) | (l[j + k + 64] << 4) | (l[j + k + 96] << 6))
                    as u8;
        }
    }
}

#[inline(always)]
fn q45_k(x: &[f32], y: &mut [u8], five: bool) {
    // Layout: d f16 | dmin f16 | scales[12] | (Q5_K: qh[32]) | qs[128].
    let nmax: i32 = if five { 31 } else { 15 };
    let (rmin, nstep) = if five { (-0.5f32, 15) } else { (-1.0f32, 20) };
    let mut l = [0u8; QK_K];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let mut xt = [[0f32; 8]; 32];
    let mut wt = [[0f32; 8]; 32];
    let mut sum_x2 = [0f32; 8];
    for i in 0..32 {
        for j in 0..8 {
            let v = x[32 * j + i];
            xt[i][j] = v;
            sum_x2[j] += v * v;
        }
    }
    for j in 0..8 {
        let av_x = (sum_x2[j] / 32.0).sqrt();
        for i in 0..32 {
            wt[i][j] = av_x + xt[i][j].abs();
        }
    }
    let mut lq = [[0u8; 8]; 32];
    qkx2_lanes::<8, 32>(
        &xt,
        &wt,
        nmax,
        rmin,
        0.1,
        nstep,
        false,
        &mut lq,
        &mut scales,
        &mut mins,
    );
    let (max_scale, max_min) = gather(&lq, &scales, &mins, &mut l);
    let packed = pack_scale_min_k4(&scales, &mins, max_scale, max_min);
    y[..2].copy_from_slice(&to_f16(max_scale / 63.0));
    y[2..4].copy_from_slice(&to_f16(max_min / 63.0));
    y[4..16].copy_from_slice(&packed);
    let d_all = from_f16(&y[..2]);
    let dmin_all = from_f16(&y[2..4]);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d);
            l[32 * j + ii] = q.clamp(0, nmax) as u8;
        }
    }
    if five {
        let (qh, ql) = y[16..].split_at_mut(32);
        qh.fill(0);
        let (mut m1, mut m2) = (1u8, 2u8);
        for (n, ql) in (0..QK_K).step_by(64).zip(ql.chunks_exact_mut(32)) {
            for j in 0..32 {
                let mut l1 = l[n + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = l[n + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    } else {
        for (j, q) in (0..QK_K).step_by(64).zip(y[16..].chunks_exact_mut(32)) {
            for k in 0..32 {
                q[k] = l[j + k] | (l[j + k + 32] << 4);
            }
        }
    }
}

#[inline(always)]
fn q6_k(x: &[f32], y: &mut [u8]) {
    // Layout: ql[128] | qh[64] | scales[16] (i8) | d f16.
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut xt = [[0f32; 16]; 16];
    for ib in 0..16 {
        for i in 0..16 {
            xt[i][ib] = x[16 * ib + i];
        }
    }
    let mut lq = [[0i8; 16]; 16];
    qx_lanes::<16, 16>(&xt, 32, &mut lq, &mut scales);
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        for i in 0..16 {
            l[16 * ib + i] = lq[i][ib];
        }
        let s = scales[ib];
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    y[208..210].copy_from_slice(&to_f16(1.0 / iscale));
    let d_all = from_f16(&y[208..210]);
    for ib in 0..16 {
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    for j in 0..16 {
        let d = d_all * f32::from(y[192 + j] as i8);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d);
            l[16 * j + ii] = (q.clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for (h, j) in (0..QK_K).step_by(128).enumerate() {
        let ql = &mut ql[64 * h..64 * h + 64];
        let qh = &mut qh[32 * h..32 * h + 32];
        for k in 0..32 {
            let lv = |o: usize| l[j + k + o] as u8;
            ql[k] = (lv(0) & 0xF) | ((lv(64) & 0xF) << 4);
            ql[k + 32] = (lv(32) & 0xF) | ((lv(96) & 0xF) << 4);
            qh[k] =
                (lv(0) >> 4) | ((lv(32) >> 4) << 2) | ((lv(64) >> 4) << 4) | ((lv(96) >> 4) << 6);
        }
    }
}

/// Dequantize one super-block of k-quant `kind` ∈ 2..=6 from `x` into 256 floats.
pub(crate) fn dequantize_block(kind: u8, x: &[u8], y: &mut [f32]) {
    match kind {
        2 => {
            let (sc, rest) = x.split_at(16);
            let (qs, dd) = rest.split_at(64);
            let (d, min) = (from_f16(dd), from_f16(&dd[2..]));
            let mut is = 0;
            let mut o = 0;
            for q in qs.chunks_exact(32) {
                for shift in (0..8).step_by(2) {
                    for half in 0..2 {
                        let s = sc[is];
                        is += 1;
                        let (dl, ml) = (d * f32::from(s & 0xF), min * f32::from(s >> 4));
                        for k in 0..16 {
                            y[o] = dl * f32::from((q[16 * half + k] >> shift) & 3) - ml;
                            o += 1;
                        }
                    }
                }
            }
        }
        3 => {
            let (hm, rest) = x.split_at(32);
            let (qs, rest) = rest.split_at(64);
            let (sc, d) = rest.split_at(12);
            let d_all = from_f16(d);
            let scale = |j: usize| {
                let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
                i32::from(lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32
            };
            let (mut is, mut o, mut m) = (0, 0, 1u8);
            for q in qs.chunks_exact(32) {
                for shift in (0..8).step_by(2) {
                    for half in 0..2 {
                        let dl = d_all * scale(is) as f32;
                        is += 1;
                        for k in 0..16 {
                            let i = 16 * half + k;
                            let v =
                                i32::from((q[i] >> shift) & 3) - if hm[i] & m != 0 { 0 } else { 4 };
                            y[o] = dl * v as f32;
                            o += 1;
                        }
                    }
                    m <<= 1;
                }
            }
        }
        4 | 5 => {
            let five = kind == 5;
            let (d, min) = (from_f16(x), from_f16(&x[2..]));
            let sc = &x[4..16];
            let (qh, qs) = if five {
                x[16..].split_at(32)
            } else {
                (&x[..0], &x[16..])
            };
            let (mut u1, mut u2) = (1u8, 2u8);
            for (blk, q) in qs.chunks_exact(32).enumerate() {
                let (s1, m1) = scale_min_k4(2 * blk, sc);
                let (s2, m2) = scale_min_k4(2 * blk + 1, sc);
                let (d1, m1) = (d * f32::from(s1), min * f32::from(m1));
                let (d2, m2) = (d * f32::from(s2), min * f32::from(m2));
                let y = &mut y[64 * blk..64 * blk + 64];
                for k in 0..32 {
                    let (mut lo, mut hi) = (q[k] & 0xF, q[k] >> 4);
                    if five {
                        if qh[k] & u1 != 0 {
                            lo += 16;
                        }
                        if qh[k] & u2 != 0 {
                            hi += 16;
                        }
                    }
                    y[k] = d1 * f32::from(lo) - m1;
                    y[k + 32] = d2 * f32::from(hi) - m2;
                }
                u1 <<= 2;
                u2 <<= 2;
            }
        }
        6 => {
            let d = from_f16(&x[208..]);
            for h in 0..2 {
                let ql = &x[64 * h..64 * h + 64];
                let qh = &x[128 + 32 * h..128 + 32 * h + 32];
                let sc = &x[192 + 8 * h..192 + 8 * h + 8];
                let y = &mut y[128 * h..128 * h + 128];
                for k in 0..32 {
                    let is = k / 16;
                    let q = |lo: u8, sh: u8| i32::from(lo | (((qh[k] >> sh) & 3) << 4)) - 32;
                    let s = |i: usize| d * f32::from(sc[i] as i8);
                    y[k] = s(is) * q(ql[k] & 0xF, 0) as f32;
                    y[k + 32] = s(is + 2) * q(ql[k + 32] & 0xF, 2) as f32;
                    y[k + 64] = s(is + 4) * q(ql[k] >> 4, 4) as f32;
                    y[k + 96] = s(is + 6) * q(ql[k + 32] >> 4, 6) as f32;
                }
            }
        }
        _ => unreachable!("k-quant kind {kind}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(3.49), 3);
        assert_eq!(nearest_int(-7.6), -8);
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x: Vec<f32> = (0..QK_K).map(|i| ((i as f32) * 0.37).sin()).collect();
        for (kind, size, tol) in [
            (2u8, Q2_K_SIZE, 0.4f32),
            (3, Q3_K_SIZE, 0.3),
            (4, Q4_K_SIZE, 0.1),
            (5, Q5_K_SIZE, 0.05),
            (6, Q6_K_SIZE, 0.03),
        ] {
            let mut q = vec![0u8; size];
            quantize_blocks(kind, &x, &mut q);
            let mut y = vec![0f32; QK_K];
            dequantize_block(kind, &q, &mut y);
            let worst = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < tol, "Q{kind}_K worst error {worst}");
        }
    }

    /// The lane-parallel searches give the scalar transcription's bits, on data with ties,
    /// zero groups, constant groups and outliers.
    #[test]
    fn lanes_equal_the_scalar_searches() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for round in 0..200 {
            let mut x = [0f32; 256];
            for (i, v) in x.iter_mut().enumerate() {
                *v = match round % 5 {
                    0 => rnd(),
                    1 => (rnd() * 8.0).round() / 8.0,
                    2 if i < 64 => 0.0,
                    3 if i % 32 < 16 => 0.25,
                    _ => rnd() * if i % 37 == 0 { 40.0 } else { 0.01 },
                };
            }
            // Q4_K/Q5_K search: 8 groups of 32.
            let mut xt = [[0f32; 8]; 32];
            let mut wt = [[0f32; 8]; 32];
            for j in 0..8 {
                for i in 0..32 {
                    xt[i][j] = x[32 * j + i];
                    wt[i][j] = 0.5 + x[32 * j + i].abs();
                }
            }
            let (mut lq, mut sc, mut mn) = ([[0u8; 8]; 32], [0f32; 8], [0f32; 8]);
            qkx2_lanes::<8, 32>(
                &xt, &wt, 15, -1.0, 0.1, 20, false, &mut lq, &mut sc, &mut mn,
            );
            for j in 0..8 {
                let xs = &x[32 * j..32 * j + 32];
                let ws: Vec<f32> = xs.iter().map(|v| 0.5 + v.abs()).collect();
                let (mut l, mut aux) = ([0u8; 32], [0u8; 32]);
                let (s, m) = make_qkx2_quants(xs, &ws, 15, &mut l, &mut aux, -1.0, 0.1, 20, false);
                assert_eq!(
                    (s.to_bits(), m.to_bits()),
                    (sc[j].to_bits(), mn[j].to_bits()),
                    "round {round} group {j}"
                );
                for i in 0..32 {
                    assert_eq!(l[i], lq[i][j]);
                }
            }
            // Q6_K search: 16 groups of 16.
            let mut xt = [[0f32; 16]; 16];
            for j in 0..16 {
                for i in 0..16 {
                    xt[i][j] = x[16 * j + i];
                }
            }
            let (mut lq, mut sc) = ([[0i8; 16]; 16], [0f32; 16]);
            qx_lanes::<16, 16>(&xt, 32, &mut lq, &mut sc);
            for j in 0..16 {
                let mut l = [0i8; 16];
                let s = make_qx_quants(&x[16 * j..16 * j + 16], 32, &mut l);
                assert_eq!(s.to_bits(), sc[j].to_bits(), "round {round} group {j}");
                for i in 0..16 {
                    assert_eq!(l[i], lq[i][j]);
                }
            }
        }
    }

    #[test]
    fn zeros_stay_zero() {
        let x = vec![0f32; QK_K];
        for (kind, size) in [
            (2u8, Q2_K_SIZE),
            (3, Q3_K_SIZE),
            (4, Q4_K_SIZE),
            (5, Q5_K_SIZE),
            (6, Q6_K_SIZE),
        ] {
            let mut q = vec![0xAAu8; size];
            quantize_block(kind, &x, &mut q);
            let mut y = vec![1f32; QK_K];
            dequantize_block(kind, &q, &mut y);
            assert!(y.iter().all(|v| *v == 0.0), "Q{kind}_K");
        }
    }
}
