//! adapterkit's dense linear algebra, on row-major slices: thin SVD, singular values, the SVD of
//! a product `L·R` through two QRs, and a seeded randomized SVD (Halko, Martinsson & Tropp 2011).
//!
//! Every entry point is a plain function over `&[f32]`/`&[f64]` so that faer's generic code is
//! instantiated (and optimised) once, in this crate.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// What can go wrong in a decomposition.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LinalgError {
    /// The iterative SVD did not converge (typically NaN or Inf in the input).
    #[error("the SVD of a {rows}×{cols} matrix did not converge (does it hold NaN or Inf?)")]
    NoConvergence {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A slice's length does not match the dimensions given.
    #[error("a {rows}×{cols} matrix needs {} values, got {len}", rows * cols)]
    Dimensions {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Values given.
        len: usize,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, LinalgError>;

/// A (truncated) SVD `A ≈ U·diag(s)·Vᵀ`, singular values non-increasing.
#[derive(Debug, Clone, PartialEq)]
pub struct Svd {
    /// Rows of `A`.
    pub rows: usize,
    /// Columns of `A`.
    pub cols: usize,
    /// `U`, `rows × s.len()`, row-major.
    pub u: Vec<f64>,
    /// Singular values.
    pub s: Vec<f64>,
    /// `Vᵀ`, `s.len() × cols`, row-major.
    pub vt: Vec<f64>,
}

impl Svd {
    /// The SVD of an empty (or rank-0) `rows × cols` matrix: no triplets.
    pub fn empty(rows: usize, cols: usize) -> Self {
        Svd {
            rows,
            cols,
            u: Vec::new(),
            s: Vec::new(),
            vt: Vec::new(),
        }
    }

    /// Number of singular triplets held.
    pub fn len(&self) -> usize {
        self.s.len()
    }

    /// Whether no triplet is held.
    pub fn is_empty(&self) -> bool {
        self.s.is_empty()
    }
}

fn check(len: usize, rows: usize, cols: usize) -> Result<()> {
    if rows.checked_mul(cols) != Some(len) {
        return Err(LinalgError::Dimensions { rows, cols, len });
    }
    Ok(())
}

fn par() -> Par {
    Par::rayon(0)
}

fn to_row_major<T: Copy>(m: MatRef<'_, T>) -> Vec<T> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// `A·B` into a new matrix, on the rayon pool.
fn mul(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut c = Mat::<f64>::zeros(a.nrows(), b.ncols());
    matmul(c.as_mut(), Accum::Replace, a, b, 1.0, par());
    c
}

fn svd_of(a: MatRef<'_, f64>) -> Result<Svd> {
    let (rows, cols) = (a.nrows(), a.ncols());
    if rows == 0 || cols == 0 {
        return Ok(Svd::empty(rows, cols));
    }
    let svd = a
        .thin_svd()
        .map_err(|_| LinalgError::NoConvergence { rows, cols })?;
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    Ok(Svd {
        rows,
        cols,
        u: to_row_major(svd.U()),
        vt: to_row_major(svd.V().transpose()),
        s,
    })
}

/// Thin SVD of a row-major `rows × cols` matrix, in f64: `min(rows, cols)` triplets.
pub fn thin_svd(a: &[f64], rows: usize, cols: usize) -> Result<Svd> {
    check(a.len(), rows, cols)?;
    svd_of(MatRef::from_row_major_slice(a, rows, cols))
}

/// All `min(rows, cols)` singular values of a row-major matrix, non-increasing, in f64.
pub fn singular_values(a: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
    check(a.len(), rows, cols)?;
    if rows == 0 || cols == 0 {
        return Ok(Vec::new());
    }
    MatRef::from_row_major_slice(a, rows, cols)
        .singular_values()
        .map_err(|_| LinalgError::NoConvergence { rows, cols })
}

/// Orthonormal basis of the column space of `y` (its thin `Q`).
fn thin_q(y: MatRef<'_, f64>) -> Mat<f64> {
    y.qr().compute_thin_Q()
}

/// SVD of the product `L·R` (`L` is `rows × k`, `R` is `k × cols`, both row-major) without
/// forming it: `L = Q₁R₁`, `Rᵀ = Q₂R₂`, `R₁R₂ᵀ = U·S·Vᵀ`, so `L·R = (Q₁U)·S·(Q₂V)ᵀ`. The cost is
/// `O((rows + cols)·k²)`: milliseconds where a dense SVD of the product takes seconds. Returns
/// `min(rows, cols, k)` triplets.
pub fn product_svd(l: &[f64], r: &[f64], rows: usize, k: usize, cols: usize) -> Result<Svd> {
    check(l.len(), rows, k)?;
    check(r.len(), k, cols)?;
    if rows == 0 || cols == 0 || k == 0 {
        return Ok(Svd::empty(rows, cols));
    }
    let l = MatRef::from_row_major_slice(l, rows, k);
    let rt = MatRef::from_row_major_slice(r, k, cols).transpose();
    let ql = l.qr();
    let qr = rt.qr();
    let (q1, r1) = (ql.compute_thin_Q(), ql.thin_R().to_owned());
    let (q2, r2) = (qr.compute_thin_Q(), qr.thin_R().to_owned());
    // M = R₁·R₂ᵀ, (min(rows,k) × min(cols,k)).
    let mut m = Mat::<f64>::zeros(r1.nrows(), r2.nrows());
    matmul(
        m.as_mut(),
        Accum::Replace,
        r1.as_ref(),
        r2.transpose(),
        1.0,
        Par::Seq,
    );
    let small = m
        .thin_svd()
        .map_err(|_| LinalgError::NoConvergence { rows, cols })?;
    let u = mul(q1.as_ref(), small.U());
    let v = mul(q2.as_ref(), small.V());
    Ok(Svd {
        rows,
        cols,
        u: to_row_major(u.as_ref()),
        s: small.S().column_vector().iter().copied().collect(),
        vt: to_row_major(v.transpose()),
    })
}

/// Options of [`randomized_svd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomizedOptions {
    /// Triplets wanted.
    pub rank: usize,
    /// Extra random directions sampled beyond `rank` (Halko et al. suggest 5–10).
    pub oversample: usize,
    /// Power (subspace) iterations; each sharpens a slowly decaying spectrum.
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix.
    pub seed: u64,
}

fn f32_to_f64(m: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}

fn f64_to_f32(m: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
}

/// Randomized SVD of a row-major f32 matrix: a Gaussian range finder with `oversample` extra
/// columns and `power_iters` re-orthonormalised power iterations, then an exact SVD of the
/// projected `(rank + oversample) × cols` matrix. The products with `A` run in f32 (they are the
/// cost: `2·(1 + 2q)` passes over `A`), the orthonormalisations and the small SVD in f64.
/// Returns `min(rank + oversample, rows, cols)` triplets; the first `rank` are the estimate.
/// The same seed gives the same result on the same machine and thread count.
pub fn randomized_svd(a: &[f32], rows: usize, cols: usize, opts: RandomizedOptions) -> Result<Svd> {
    check(a.len(), rows, cols)?;
    let k = (opts.rank + opts.oversample).min(rows).min(cols);
    if k == 0 {
        return Ok(Svd::empty(rows, cols));
    }
    let am = MatRef::from_row_major_slice(a, rows, cols);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let omega = Mat::<f32>::from_fn(cols, k, |_, _| {
        let x: f64 = StandardNormal.sample(&mut rng);
        x as f32
    });
    let mut y = Mat::<f32>::zeros(rows, k);
    matmul(y.as_mut(), Accum::Replace, am, omega.as_ref(), 1.0, par());
    let mut q = f64_to_f32(thin_q(f32_to_f64(y.as_ref()).as_ref()).as_ref());
    let mut z = Mat::<f32>::zeros(cols, k);
    for _ in 0..opts.power_iters {
        matmul(
            z.as_mut(),
            Accum::Replace,
            am.transpose(),
            q.as_ref(),
            1.0,
            par(),
        );
        let qz = f64_to_f32(thin_q(f32_to_f64(z.as_ref()).as_ref()).as_ref());
        matmul(y.as_mut(), Accum::Replace, am, qz.as_ref(), 1.0, par());
        q = f64_to_f32(thin_q(f32_to_f64(y.as_ref()).as_ref()).as_ref());
    }
    // B = Qᵀ·A, k × cols; computed as (Aᵀ·Q)ᵀ.
    let mut bt = Mat::<f32>::zeros(cols, q.ncols());
    matmul(
        bt.as_mut(),
        Accum::Replace,
        am.transpose(),
        q.as_ref(),
        1.0,
        par(),
    );
    let b = f32_to_f64(bt.transpose());
    let small = b.thin_svd().map_err(|_| LinalgError::NoConvergence {
        rows: b.nrows(),
        cols,
    })?;
    let q64 = f32_to_f64(q.as_ref());
    let u = mul(q64.as_ref(), small.U());
    Ok(Svd {
        rows,
        cols,
        u: to_row_major(u.as_ref()),
        s: small.S().column_vector().iter().copied().collect(),
        vt: to_row_major(small.V().transpose()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `C = A·B` for row-major f64 matrices (`A` is `m × k`, `B` is `k × n`).
    pub fn matmul_f64(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Result<Vec<f64>> {
        check(a.len(), m, k)?;
        check(b.len(), k, n)?;
        let mut c = Mat::<f64>::zeros(m, n);
        matmul(
            c.as_mut(),
            Accum::Replace,
            MatRef::from_row_major_slice(a, m, k),
            MatRef::from_row_major_slice(b, k, n),
            1.0,
            par(),
        );
        Ok(to_row_major(c.as_ref()))
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..rows * cols).map(|_| lcg(&mut s)).collect()
    }

    fn reconstruct(svd: &Svd) -> Vec<f64> {
        let k = svd.s.len();
        let mut out = vec![0.0; svd.rows * svd.cols];
        for i in 0..svd.rows {
            for t in 0..k {
                let c = svd.u[i * k + t] * svd.s[t];
                for j in 0..svd.cols {
                    out[i * svd.cols + j] += c * svd.vt[t * svd.cols + j];
                }
            }
        }
        out
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn thin_svd_reconstructs_and_sorts() {
        for (m, n) in [(7, 5), (5, 7), (1, 4), (6, 6)] {
            let a = random(m, n, (m * 31 + n) as u64);
            let svd = thin_svd(&a, m, n).unwrap();
            assert_eq!(svd.s.len(), m.min(n));
            assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
            assert!(max_diff(&reconstruct(&svd), &a) < 1e-12);
        }
        assert!(matches!(
            thin_svd(&[1.0; 5], 2, 3),
            Err(LinalgError::Dimensions { .. })
        ));
    }

    #[test]
    fn product_svd_equals_dense_svd() {
        for (m, k, n) in [(40, 6, 30), (8, 12, 5), (3, 2, 50)] {
            let l = random(m, k, 1 + m as u64);
            let r = random(k, n, 2 + n as u64);
            let dense = matmul_f64(&l, &r, m, k, n).unwrap();
            let svd = product_svd(&l, &r, m, k, n).unwrap();
            let exact = singular_values(&dense, m, n).unwrap();
            assert_eq!(svd.s.len(), m.min(n).min(k));
            for (x, y) in svd.s.iter().zip(&exact) {
                assert!((x - y).abs() < 1e-12 * exact[0], "{x} vs {y}");
            }
            assert!(max_diff(&reconstruct(&svd), &dense) < 1e-12);
        }
    }

    #[test]
    fn randomized_svd_finds_a_decaying_spectrum() {
        let (m, n) = (120, 90);
        // A = U·diag(0.8^i)·Vᵀ from the exact SVD of a random matrix.
        let base = thin_svd(&random(m, n, 7), m, n).unwrap();
        let mut scaled = base.clone();
        for (i, s) in scaled.s.iter_mut().enumerate() {
            *s = 0.8f64.powi(i as i32);
        }
        let a = reconstruct(&scaled);
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let opts = RandomizedOptions {
            rank: 10,
            oversample: 10,
            power_iters: 2,
            seed: 3,
        };
        let r = randomized_svd(&a32, m, n, opts).unwrap();
        assert_eq!(r.s.len(), 20);
        for i in 0..10 {
            let want = 0.8f64.powi(i as i32);
            assert!(
                (r.s[i] - want).abs() < 1e-4 * want.max(0.1),
                "σ{i} {}",
                r.s[i]
            );
        }
        // Reproducible.
        assert_eq!(randomized_svd(&a32, m, n, opts).unwrap(), r);
        let other = randomized_svd(&a32, m, n, RandomizedOptions { seed: 4, ..opts }).unwrap();
        assert_ne!(other.u, r.u);
    }
}
