//! Row-oriented f32 kernels for low-rank updates. Every LoRA-family delta on a stored tensor is
//! `L·R` with `L` (rows×r) and `R` (r×cols), so a block of rows is updated in place without ever
//! materialising the full `ΔW`: `W[i,:] += Σ_k L[i,k]·R[k,:]` is a short sequence of axpys over a
//! row that stays in cache, which the compiler vectorises.

/// Columns processed per register tile in [`add_low_rank`].
const TILE: usize = 16;

/// `w[i,:] += Σ_k l[i,k] · r[k,:]` for the `rows` rows of `w` (row-major, `cols` wide).
///
/// Each row is walked in tiles of [`TILE`] columns held in registers while all `rank` terms are
/// accumulated, so `w` is loaded and stored once per element whatever the rank. On x86-64 CPUs
/// with AVX-512 or AVX2 and FMA (detected at run time) the same code is compiled for 512- or
/// 256-bit vectors with fused multiply-adds.
pub fn add_low_rank(w: &mut [f32], cols: usize, l: &[f32], r: &[f32], rank: usize) {
    if cols == 0 || rank == 0 {
        return;
    }
    debug_assert_eq!(r.len(), rank * cols);
    debug_assert_eq!(w.len() / cols, l.len() / rank);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
        unsafe {
            add_low_rank_avx512_fma(w, cols, l, r, rank)
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        unsafe {
            add_low_rank_avx2_fma(w, cols, l, r, rank)
        };
        return;
    }
    add_low_rank_body::<false>(w, cols, l, r, rank);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn add_low_rank_avx512_fma(w: &mut [f32], cols: usize, l: &[f32], r: &[f32], rank: usize) {
    add_low_rank_body::<true>(w, cols, l, r, rank);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_low_rank_avx2_fma(w: &mut [f32], cols: usize, l: &[f32], r: &[f32], rank: usize) {
    add_low_rank_body::<true>(w, cols, l, r, rank);
}

/// Rows swept together in [`add_low_rank`].
const ROWS: usize = 4;

/// Rank terms whose tile of `r` is held at once in [`add_low_rank`] (16×16 f32 = 1 KiB, in L1).
const KT: usize = 16;

/// The kernel body, inlined into each feature-specific wrapper. `FMA` selects fused
/// multiply-adds, which are only fast where the target has them.
///
/// Column tiles are the outer loop: a [`KT`]×[`TILE`] tile of `r` is copied out once and then
/// swept down every row of `w`, so each row costs one load and one store of [`TILE`] outputs and
/// `rank` multiply-adds from L1 — compute-bound, rather than waiting on strided rows of `r`.
#[inline(always)]
fn add_low_rank_body<const FMA: bool>(
    w: &mut [f32],
    cols: usize,
    l: &[f32],
    r: &[f32],
    rank: usize,
) {
    #[inline(always)]
    fn madd<const FMA: bool>(a: f32, x: f32, y: f32) -> f32 {
        if FMA {
            a.mul_add(x, y)
        } else {
            y + a * x
        }
    }
    let rows = w.len() / cols;
    let full = cols / TILE * TILE;
    let mut tile = [[0f32; TILE]; KT];
    let mut j = 0;
    while j < full {
        let mut k0 = 0;
        while k0 < rank {
            let kn = KT.min(rank - k0);
            for (k, t) in tile.iter_mut().enumerate().take(kn) {
                t.copy_from_slice(&r[(k0 + k) * cols + j..(k0 + k) * cols + j + TILE]);
            }
            // ROWS rows at a time: independent accumulators keep the FMA units busy instead of
            // waiting on one dependency chain.
            let mut i = 0;
            while i + ROWS <= rows {
                let mut acc = [[0f32; TILE]; ROWS];
                for (q, a) in acc.iter_mut().enumerate() {
                    a.copy_from_slice(&w[(i + q) * cols + j..(i + q) * cols + j + TILE]);
                }
                for (k, t) in tile.iter().enumerate().take(kn) {
                    for (q, a) in acc.iter_mut().enumerate() {
                        let c = l[(i + q) * rank + k0 + k];
                        for x in 0..TILE {
                            a[x] = madd::<FMA>(c, t[x], a[x]);
                        }
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    w[(i + q) * cols + j..(i + q) * cols + j + TILE].copy_from_slice(a);
                }
                i += ROWS;
            }
            for i in i..rows {
                let out: &mut [f32; TILE] = (&mut w[i * cols + j..i * cols + j + TILE])
                    .try_into()
                    .expect("tile");
                let coef = &l[i * rank + k0..i * rank + k0 + kn];
                let mut acc = *out;
                for (c, t) in coef.iter().zip(&tile) {
                    for x in 0..TILE {
                        acc[x] = madd::<FMA>(*c, t[x], acc[x]);
                    }
                }
                *out = acc;
            }
            k0 += kn;
        }
        j += TILE;
    }
    if full < cols {
        for i in 0..rows {
            let row = &mut w[i * cols + full..(i + 1) * cols];
            for k in 0..rank {
                let c = l[i * rank + k];
                for (y, x) in row.iter_mut().zip(&r[k * cols + full..(k + 1) * cols]) {
                    *y = madd::<FMA>(c, *x, *y);
                }
            }
        }
    }
}

/// `y += a·x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

/// Write row `Σ_k l_row[k] · r[k,:]` into `out`.
pub fn low_rank_row(out: &mut [f32], l_row: &[f32], r: &[f32]) {
    out.fill(0.0);
    let cols = out.len();
    for (k, &a) in l_row.iter().enumerate() {
        if a != 0.0 {
            axpy(out, a, &r[k * cols..(k + 1) * cols]);
        }
    }
}

/// Transpose a row-major `rows×cols` matrix.
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// Count non-finite values and the index of the first. The common all-finite case is one
/// vectorised pass.
pub fn non_finite(v: &[f32]) -> Option<(usize, usize)> {
    if adapterkit_core::convert::all_finite(v) {
        return None;
    }
    let mut first = None;
    let mut count = 0;
    for (i, x) in v.iter().enumerate() {
        if !x.is_finite() {
            count += 1;
            first.get_or_insert(i);
        }
    }
    first.map(|f| (count, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_rank_matches_naive_product() {
        for (m, n, r) in [
            (5, 7, 3),
            (3, 40, 16),
            (2, 33, 1),
            (4, 16, 5),
            (9, 50, 16),
            (8, 64, 2),
        ] {
            check_low_rank(m, n, r);
            // The portable body too, whatever this CPU dispatches to.
            let l: Vec<f32> = (0..m * r).map(|i| (i as f32 * 0.37).sin()).collect();
            let rr: Vec<f32> = (0..r * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut a: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
            let mut b = a.clone();
            add_low_rank(&mut a, n, &l, &rr, r);
            add_low_rank_body::<false>(&mut b, n, &l, &rr, r);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()));
            }
        }
    }

    fn check_low_rank(m: usize, n: usize, r: usize) {
        let l: Vec<f32> = (0..m * r).map(|i| (i as f32 * 0.37).sin()).collect();
        let rr: Vec<f32> = (0..r * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut w: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        let orig = w.clone();
        add_low_rank(&mut w, n, &l, &rr, r);
        for i in 0..m {
            for j in 0..n {
                let d: f32 = (0..r).map(|k| l[i * r + k] * rr[k * n + j]).sum();
                let want = orig[i * n + j] + d;
                assert!(
                    (w[i * n + j] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{m}x{n} r={r} ({i},{j})"
                );
            }
        }
        let mut row = vec![0f32; n];
        low_rank_row(&mut row, &l[r..2 * r], &rr);
        let d2: f32 = (0..r).map(|k| l[r + k] * rr[k * n + 2]).sum();
        assert!((row[2] - d2).abs() < 1e-5);
    }

    #[test]
    fn transpose_and_nonfinite() {
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
        assert_eq!(
            non_finite(&[1.0, f32::NAN, 2.0, f32::INFINITY]),
            Some((2, 1))
        );
        assert_eq!(non_finite(&[1.0]), None);
    }
}
