//! Row-oriented f32 kernels for low-rank updates. Every LoRA-family delta on a stored tensor is
//! `L·R` with `L` (rows×r) and `R` (r×cols), so a block of rows is updated in place without ever
//! materialising the full `ΔW`: `W[i,:] += Σ_k L[i,k]·R[k,:]` is a short sequence of axpys over a
//! row that stays in cache, which the compiler vectorises.

/// `w[i,:] += Σ_k l[i,k] · r[k,:]` for the `rows` rows of `w` (row-major, `cols` wide).
pub fn add_low_rank(w: &mut [f32], cols: usize, l: &[f32], r: &[f32], rank: usize) {
    debug_assert_eq!(r.len(), rank * cols);
    debug_assert_eq!(w.len() / cols.max(1), l.len() / rank.max(1));
    if cols == 0 || rank == 0 {
        return;
    }
    for (row, lrow) in w.chunks_exact_mut(cols).zip(l.chunks_exact(rank)) {
        for (k, &a) in lrow.iter().enumerate() {
            if a != 0.0 {
                axpy(row, a, &r[k * cols..(k + 1) * cols]);
            }
        }
    }
}

/// `y += a·x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = a.mul_add(*x, *y);
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

/// Count non-finite values and the index of the first.
pub fn non_finite(v: &[f32]) -> Option<(usize, usize)> {
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
        let (m, n, r) = (5, 7, 3);
        let l: Vec<f32> = (0..m * r).map(|i| (i as f32 * 0.37).sin()).collect();
        let rr: Vec<f32> = (0..r * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut w: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        let orig = w.clone();
        add_low_rank(&mut w, n, &l, &rr, r);
        for i in 0..m {
            for j in 0..n {
                let d: f32 = (0..r).map(|k| l[i * r + k] * rr[k * n + j]).sum();
                assert!((w[i * n + j] - orig[i * n + j] - d).abs() < 1e-5);
            }
        }
        let mut row = vec![0f32; n];
        low_rank_row(&mut row, &l[r..2 * r], &rr);
        assert!((row[2] - (w[n + 2] - orig[n + 2])).abs() < 1e-5);
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
