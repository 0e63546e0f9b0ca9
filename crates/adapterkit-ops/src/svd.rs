//! Rank choice and truncated SVDs of adapter updates.
//!
//! A module's update is either a product `L·R` of thin factors (LoRA and its kin), factorised
//! exactly through two QRs and a `k×k` SVD, or a dense matrix, factorised by an exact thin SVD or
//! a seeded randomized SVD. [`RankPolicy`] turns a spectrum into a rank; [`Factored`] reports
//! what a truncation keeps and loses.

use adapterkit_linalg::{self as linalg, RandomizedOptions, Svd};

use crate::error::{Error, Result};

/// How to choose a rank from a spectrum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// A fixed rank (capped at the matrix's own rank).
    Rank(usize),
    /// The smallest rank that keeps this fraction of the energy `Σσ²` (0 < e ≤ 1).
    Energy(f64),
    /// The smallest rank whose relative Frobenius error `‖ΔW − ΔW_r‖/‖ΔW‖` is at most this.
    MaxError(f64),
}

/// A rank rule and an optional cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankPolicy {
    /// The rule.
    pub rule: RankRule,
    /// Never more than this rank.
    pub max_rank: Option<usize>,
}

impl RankPolicy {
    /// Check the numbers a user gave.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Options(m));
        match self.rule {
            RankRule::Rank(0) => return bad("--rank must be at least 1".into()),
            RankRule::Energy(e) if !(e > 0.0 && e <= 1.0) => {
                return bad(format!("--energy must be in (0, 1], got {e}"))
            }
            RankRule::MaxError(e) if !(0.0..1.0).contains(&e) => {
                return bad(format!("--max-error must be in [0, 1), got {e}"))
            }
            _ => {}
        }
        if self.max_rank == Some(0) {
            return bad("--max-rank must be at least 1".into());
        }
        Ok(())
    }

    /// The most triplets a factorisation must deliver for this policy, when that is known
    /// before the spectrum is (a fixed rank, or a cap).
    pub fn needed(&self) -> Option<usize> {
        match (self.rule, self.max_rank) {
            (RankRule::Rank(r), Some(m)) => Some(r.min(m)),
            (RankRule::Rank(r), None) => Some(r),
            (_, m) => m,
        }
    }

    /// The rank for singular values `s` (non-increasing) of a matrix whose squared Frobenius
    /// norm is `total_sq` (at least `Σs²`; more when `s` is a truncated spectrum). Always at
    /// least 1 when `s` has a non-zero value.
    pub fn choose(&self, s: &[f64], total_sq: f64) -> usize {
        let nonzero = s.iter().take_while(|&&x| x > 0.0).count();
        let r = match self.rule {
            RankRule::Rank(r) => r,
            RankRule::Energy(e) => {
                let want = e * total_sq;
                let mut acc = 0.0;
                let mut r = s.len();
                for (i, x) in s.iter().enumerate() {
                    acc += x * x;
                    if acc >= want * (1.0 - 1e-12) {
                        r = i + 1;
                        break;
                    }
                }
                r
            }
            RankRule::MaxError(e) => {
                let mut r = s.len();
                for k in 0..=s.len() {
                    if relative_error(s, total_sq, k) <= e {
                        r = k;
                        break;
                    }
                }
                r
            }
        };
        let r = r.min(nonzero).max(usize::from(nonzero > 0));
        match self.max_rank {
            Some(m) => r.min(m),
            None => r,
        }
    }
}

/// Relative Frobenius error of keeping the first `r` of singular values `s` of a matrix whose
/// squared norm is `total_sq`. When `s` is the whole spectrum, the tail is summed directly (no
/// cancellation); otherwise the kept energy is subtracted from the total.
pub fn relative_error(s: &[f64], total_sq: f64, r: usize) -> f64 {
    if total_sq <= 0.0 {
        return 0.0;
    }
    let all: f64 = s.iter().map(|x| x * x).sum();
    let tail: f64 = if (all - total_sq).abs() <= 1e-9 * total_sq {
        s.iter().skip(r).map(|x| x * x).sum()
    } else {
        let kept: f64 = s.iter().take(r).map(|x| x * x).sum();
        (total_sq - kept).max(0.0)
    };
    (tail / total_sq).sqrt() + 0.0
}

/// Fraction of the energy `Σσ²` kept by the first `r` values.
pub fn energy_kept(s: &[f64], total_sq: f64, r: usize) -> f64 {
    if total_sq <= 0.0 {
        return 1.0;
    }
    let kept: f64 = s.iter().take(r).map(|x| x * x).sum();
    (kept / total_sq).min(1.0)
}

/// Effective rank (Roy & Vetterli 2007): `exp(H)` of the distribution `pᵢ = σᵢ/Σσ`.
pub fn effective_rank(s: &[f64]) -> f64 {
    let sum: f64 = s.iter().sum();
    if sum <= 0.0 {
        return 0.0;
    }
    let h: f64 = s
        .iter()
        .map(|x| x / sum)
        .filter(|p| *p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

/// Which SVD a dense update gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SvdMethod {
    /// Exact for small matrices or when the rank is not known in advance, randomized when the
    /// rank wanted is far below the matrix's smaller side.
    #[default]
    Auto,
    /// Always the exact thin SVD.
    Exact,
    /// Always the randomized SVD (needs a rank or `--max-rank`).
    Randomized,
}

/// SVD options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvdOptions {
    /// Exact or randomized.
    pub method: SvdMethod,
    /// Randomized SVD: extra sampled directions.
    pub oversample: usize,
    /// Randomized SVD: power iterations.
    pub power_iters: usize,
    /// Randomized SVD: seed.
    pub seed: u64,
}

impl Default for SvdOptions {
    fn default() -> Self {
        SvdOptions {
            method: SvdMethod::Auto,
            oversample: 10,
            power_iters: 2,
            seed: 0,
        }
    }
}

/// How a factorisation was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvdKind {
    /// From thin factors `L·R` (exact).
    Product,
    /// Exact thin SVD of the dense update.
    Exact,
    /// Randomized SVD of the dense update.
    Randomized,
}

impl SvdKind {
    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            SvdKind::Product => "product",
            SvdKind::Exact => "exact",
            SvdKind::Randomized => "randomized",
        }
    }
}

/// A factorised update: its SVD (possibly truncated) and its total energy.
#[derive(Debug, Clone)]
pub struct Factored {
    /// The SVD.
    pub svd: Svd,
    /// `‖ΔW‖²_F`.
    pub total_sq: f64,
    /// How it was computed.
    pub kind: SvdKind,
}

impl Factored {
    /// Relative Frobenius error of truncating to rank `r`.
    pub fn error_at(&self, r: usize) -> f64 {
        relative_error(&self.svd.s, self.total_sq, r)
    }

    /// Fraction of the energy kept at rank `r`.
    pub fn energy_at(&self, r: usize) -> f64 {
        energy_kept(&self.svd.s, self.total_sq, r)
    }
}

fn linalg_err(what: &str, e: linalg::LinalgError) -> Error {
    Error::Decomposition {
        what: what.to_string(),
        message: e.to_string(),
    }
}

fn finite(what: &str, values: impl Iterator<Item = f64>) -> Result<()> {
    let count = values.filter(|x| !x.is_finite()).count();
    if count > 0 {
        return Err(Error::NonFiniteUpdate {
            what: what.to_string(),
            count,
        });
    }
    Ok(())
}

/// Factorise `L·R` (`L` is `rows×k`, `R` is `k×cols`, row-major) exactly.
pub fn factor_product(
    what: &str,
    l: &[f64],
    r: &[f64],
    rows: usize,
    k: usize,
    cols: usize,
) -> Result<Factored> {
    finite(what, l.iter().chain(r).copied())?;
    let svd = linalg::product_svd(l, r, rows, k, cols).map_err(|e| linalg_err(what, e))?;
    let total_sq = svd.s.iter().map(|x| x * x).sum();
    Ok(Factored {
        svd,
        total_sq,
        kind: SvdKind::Product,
    })
}

/// Every singular value of a dense row-major `rows × cols` matrix (exact, f64).
pub fn singular_values(what: &str, a: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
    finite(what, a.iter().copied())?;
    linalg::singular_values(a, rows, cols).map_err(|e| linalg_err(what, e))
}

/// Whether `opts` factorises a `rows × cols` matrix with the randomized SVD when the policy
/// needs `needed` triplets.
pub fn use_randomized(opts: &SvdOptions, rows: usize, cols: usize, needed: Option<usize>) -> bool {
    match (opts.method, needed) {
        (SvdMethod::Exact, _) | (_, None) => false,
        (SvdMethod::Randomized, Some(_)) => true,
        (SvdMethod::Auto, Some(k)) => {
            let small = rows.min(cols);
            // The range finder's passes cost about 2(1+2q)(k+p)·m·n flops against roughly
            // 4·m·n·min(m,n) for a thin SVD: worth it when k+p is well below min(m,n)/3.
            rows * cols >= 1 << 16 && 3 * (k + opts.oversample) * (1 + opts.power_iters) < small
        }
    }
}

/// Factorise a dense row-major `rows × cols` f32 update. `needed` is how many triplets the
/// caller will keep at most (see [`RankPolicy::needed`]); the randomized SVD needs it.
pub fn factor_dense(
    what: &str,
    delta: &[f32],
    rows: usize,
    cols: usize,
    needed: Option<usize>,
    opts: &SvdOptions,
) -> Result<Factored> {
    if let Some((count, _)) = crate::kernels::non_finite(delta) {
        return Err(Error::NonFiniteUpdate {
            what: what.to_string(),
            count,
        });
    }
    let total_sq: f64 = delta.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if use_randomized(opts, rows, cols, needed) {
        let rank = needed.unwrap_or(rows.min(cols));
        let svd = linalg::randomized_svd(
            delta,
            rows,
            cols,
            RandomizedOptions {
                rank,
                oversample: opts.oversample,
                power_iters: opts.power_iters,
                seed: opts.seed,
            },
        )
        .map_err(|e| linalg_err(what, e))?;
        return Ok(Factored {
            svd,
            total_sq,
            kind: SvdKind::Randomized,
        });
    }
    let a: Vec<f64> = delta.iter().map(|&x| x as f64).collect();
    let svd = linalg::thin_svd(&a, rows, cols).map_err(|e| linalg_err(what, e))?;
    Ok(Factored {
        svd,
        total_sq,
        kind: SvdKind::Exact,
    })
}

/// LoRA factors of the rank-`r` truncation, for a layer that multiplies `B·A` by `scale`:
/// `B = U√Σ/√scale` (`rows × r`) and `A = √Σ·Vᵀ/√scale` (`r × cols`), so `scale·B·A = U_rΣ_rV_rᵀ`
/// and both factors carry the same energy.
pub fn lora_factors(svd: &Svd, r: usize, scale: f64) -> (Vec<f32>, Vec<f32>) {
    let k = svd.s.len();
    let r = r.min(k);
    let (rows, cols) = (svd.rows, svd.cols);
    let root: Vec<f64> = svd.s[..r]
        .iter()
        .map(|s| (s / scale.abs()).sqrt())
        .collect();
    let sign = if scale < 0.0 { -1.0 } else { 1.0 };
    let mut b = Vec::with_capacity(rows * r);
    for i in 0..rows {
        for (t, q) in root.iter().enumerate() {
            b.push((sign * svd.u[i * k + t] * q) as f32);
        }
    }
    let mut a = Vec::with_capacity(r * cols);
    for (t, q) in root.iter().enumerate() {
        a.extend(
            svd.vt[t * cols..(t + 1) * cols]
                .iter()
                .map(|v| (v * q) as f32),
        );
    }
    (b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_rules() {
        let s = [4.0, 2.0, 1.0, 0.0];
        let total = 21.0;
        let p = |rule| RankPolicy {
            rule,
            max_rank: None,
        };
        assert_eq!(p(RankRule::Rank(2)).choose(&s, total), 2);
        assert_eq!(p(RankRule::Rank(9)).choose(&s, total), 3);
        assert_eq!(p(RankRule::Energy(16.0 / 21.0)).choose(&s, total), 1);
        assert_eq!(p(RankRule::Energy(0.9)).choose(&s, total), 2);
        assert_eq!(p(RankRule::Energy(1.0)).choose(&s, total), 3);
        assert_eq!(p(RankRule::MaxError(0.0)).choose(&s, total), 3);
        assert_eq!(
            p(RankRule::MaxError((1.0f64 / 21.0).sqrt())).choose(&s, total),
            2
        );
        let capped = RankPolicy {
            rule: RankRule::Energy(1.0),
            max_rank: Some(1),
        };
        assert_eq!(capped.choose(&s, total), 1);
        assert_eq!(p(RankRule::Rank(3)).choose(&[0.0, 0.0], 0.0), 0);
        assert!((relative_error(&s, total, 1) - (5.0f64 / 21.0).sqrt()).abs() < 1e-15);
        // A truncated spectrum: the rest of the energy is unseen.
        assert!((relative_error(&[4.0], 21.0, 1) - (5.0f64 / 21.0).sqrt()).abs() < 1e-15);
        assert!((effective_rank(&[1.0, 1.0, 0.0]) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn lora_factors_rebuild_the_truncation() {
        let svd = Svd {
            rows: 2,
            cols: 3,
            u: vec![1.0, 0.0, 0.0, 1.0],
            s: vec![3.0, 2.0],
            vt: vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0],
        };
        for scale in [0.5, -2.0] {
            let (b, a) = lora_factors(&svd, 1, scale);
            assert_eq!((b.len(), a.len()), (2, 3));
            let w: Vec<f64> = (0..6)
                .map(|x| scale * (b[x / 3] as f64) * (a[x % 3] as f64))
                .collect();
            let want = [0.0, 3.0, 0.0, 0.0, 0.0, 0.0];
            assert!(
                w.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-6),
                "{w:?}"
            );
        }
    }
}
