//! Family math beyond LoRA. Dense updates of the families whose `ΔW` has no low-rank form: LoHa
//! (Hadamard product of two low-rank products) and LoKr (Kronecker product); input-space
//! transforms of the multiplicative families: OFT (block-diagonal Cayley rotations) and HRA
//! (Householder reflections). Each returns `ΔW` as a row-major
//! `(out, in·k…)` matrix in PEFT's orientation, already scaled. Formulas: `formats/peft.md`.

use adapterkit_core::ir::{Cayley, KronFactor, MissMode, Payload, Tuner, VbLogits};
use adapterkit_core::TensorSource;

use crate::error::{Error, Result};

/// A VB-LoRA selection: bank vector indices and their weights.
type Selection = (Vec<usize>, Vec<f32>);

/// `dst[r, c] += v` for a `(2, nnz)` coordinate list `idx` (rows, then columns) and values `vals`,
/// checking every coordinate against `rows × cols`.
fn scatter_coo(
    dst: &mut [f32],
    rows: usize,
    cols: usize,
    idx: &[f32],
    vals: &[f32],
    what: &str,
) -> Result<()> {
    let nnz = vals.len();
    if idx.len() != 2 * nnz {
        return Err(Error::Options(format!(
            "{what}: {} indices for {nnz} values",
            idx.len()
        )));
    }
    for (k, v) in vals.iter().enumerate() {
        let (r, c) = (idx[k] as usize, idx[nnz + k] as usize);
        if r >= rows || c >= cols {
            return Err(Error::Options(format!(
                "{what}: index ({r}, {c}) is outside the {rows}×{cols} matrix"
            )));
        }
        dst[r * cols + c] += v;
    }
    Ok(())
}

/// `a (m×k) · b (k×n)`, row-major, through the register-tiled low-rank kernel.
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    crate::kernels::add_low_rank(&mut c, n, a, b, k);
    c
}

fn dims(src: &dyn TensorSource, name: &str) -> Result<Vec<usize>> {
    src.info(name)
        .map(|t| t.shape.iter().map(|&d| d as usize).collect())
        .ok_or_else(|| Error::Core(adapterkit_core::Error::TensorNotFound { name: name.into() }))
}

/// `Σ_ij t[i,j,s] · a[i,p] · b[j,q]` → `(p, q, s)` flattened to `(p, q·s)`: the CP/Tucker rebuild
/// both LoHa (`einsum("ijkl,jr,ip->prkl")`) and LoKr (`einsum("ijkl,ip,jr->prkl")`) use.
fn tucker(src: &dyn TensorSource, t: &str, a: &str, b: &str) -> Result<(Vec<f32>, usize, usize)> {
    let (td, ad, bd) = (dims(src, t)?, dims(src, a)?, dims(src, b)?);
    let (ri, rj) = (td[0], td[1]);
    let s: usize = td[2..].iter().product();
    let (p, q) = (ad[1], bd[1]);
    let (tv, av, bv) = (src.read_f32(t)?, src.read_f32(a)?, src.read_f32(b)?);
    // u[i, q, s] = Σ_j t[i,j,s] · b[j,q]
    let mut u = vec![0f32; ri * q * s];
    for i in 0..ri {
        for j in 0..rj {
            for qq in 0..q {
                let bj = bv[j * q + qq];
                for ss in 0..s {
                    u[(i * q + qq) * s + ss] += tv[(i * rj + j) * s + ss] * bj;
                }
            }
        }
    }
    // out[p, q, s] = Σ_i a[i,p] · u[i,q,s]
    let mut out = vec![0f32; p * q * s];
    for i in 0..ri {
        for pp in 0..p {
            let x = av[i * p + pp];
            for (o, y) in out[pp * q * s..(pp + 1) * q * s]
                .iter_mut()
                .zip(&u[i * q * s..(i + 1) * q * s])
            {
                *o += x * y;
            }
        }
    }
    Ok((out, p, q * s))
}

fn product(src: &dyn TensorSource, a: &str, b: &str) -> Result<(Vec<f32>, usize, usize)> {
    let (ad, bd) = (dims(src, a)?, dims(src, b)?);
    let (m, k) = (ad[0], ad[1]);
    let n: usize = bd[1..].iter().product();
    Ok((matmul(&src.read_f32(a)?, &src.read_f32(b)?, m, k, n), m, n))
}

fn factor(src: &dyn TensorSource, f: &KronFactor) -> Result<(Vec<f32>, usize, usize)> {
    match f {
        KronFactor::Full(x) => {
            let d = dims(src, x)?;
            Ok((src.read_f32(x)?, d[0], d[1..].iter().product()))
        }
        KronFactor::Product { a, b } => product(src, a, b),
        KronFactor::Tucker { t, a, b } => tucker(src, t, a, b),
    }
}

/// `ΔW` for a dense payload, `(out, in·k…)` row-major, scaled; `out_dim × in_dim` is the base
/// weight's shape in PEFT's orientation.
pub fn dense_delta(
    src: &dyn TensorSource,
    payload: &Payload,
    out_dim: usize,
    in_dim: usize,
) -> Result<Vec<f32>> {
    match payload {
        Payload::Tuner(t) => tuner_delta(src, t, out_dim, in_dim),
        Payload::Miss { block, mode } => {
            let d = dims(src, block)?;
            let bv = src.read_f32(block)?;
            let (r, width) = (d[0], d[1]);
            let mut delta = vec![0f32; out_dim * in_dim];
            for o in 0..out_dim {
                // Default: block (r, out); mini: block (r, mini_r) tiled over the outputs.
                let oc = if *mode == MissMode::Mini {
                    o % width
                } else {
                    o
                };
                for (c, x) in delta[o * in_dim..(o + 1) * in_dim].iter_mut().enumerate() {
                    *x = bv[(c % r) * width + oc];
                }
            }
            Ok(delta)
        }
        Payload::VbLora(v) => {
            let bank_d = dims(src, &v.bank)?;
            let (nv, l) = (bank_d[0], bank_d[1]);
            let bank = src.read_f32(&v.bank)?;
            let topk = v.topk as usize;
            // Each logits row selects topk bank vectors with softmax weights: (…, L) rows.
            let assemble = |logits: &VbLogits| -> Result<(Vec<f32>, Vec<usize>)> {
                let (sel, shape): (Vec<Selection>, Vec<usize>) = match logits {
                    VbLogits::Full(x) => {
                        let d = dims(src, x)?;
                        let lv = src.read_f32(x)?;
                        let rows = lv
                            .chunks_exact(nv)
                            .map(|row| {
                                let mut idx: Vec<usize> = (0..nv).collect();
                                // torch.topk: largest first.
                                idx.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
                                idx.truncate(topk);
                                let m = idx
                                    .iter()
                                    .map(|&i| row[i])
                                    .fold(f32::NEG_INFINITY, f32::max);
                                let e: Vec<f32> = idx.iter().map(|&i| (row[i] - m).exp()).collect();
                                let s: f32 = e.iter().sum();
                                (idx, e.iter().map(|x| x / s).collect())
                            })
                            .collect();
                        (rows, d[..d.len() - 1].to_vec())
                    }
                    VbLogits::TopK { indices, weights } => {
                        let d = dims(src, indices)?;
                        let k = d[d.len() - 1];
                        let iv = src.read_f32(indices)?;
                        let wv = src.read_f32(weights)?;
                        let rows = iv
                            .chunks_exact(k)
                            .zip(wv.chunks_exact(k.saturating_sub(1).max(1)))
                            .map(|(ix, ws)| {
                                // Only the first k − 1 weights are saved; the last is 1 − Σ.
                                let mut w: Vec<f32> = if k > 1 { ws.to_vec() } else { vec![] };
                                w.push(1.0 - w.iter().sum::<f32>());
                                (ix.iter().map(|&i| i as usize).collect(), w)
                            })
                            .collect();
                        (rows, d[..d.len() - 1].to_vec())
                    }
                };
                let mut out = vec![0f32; sel.len() * l];
                for (row, (idx, w)) in out.chunks_exact_mut(l).zip(&sel) {
                    for (&i, &wi) in idx.iter().zip(w) {
                        if i >= nv {
                            return Err(Error::Options(format!(
                                "VB-LoRA index {i} is outside the bank of {nv} vectors"
                            )));
                        }
                        for (o, b) in row.iter_mut().zip(&bank[i * l..(i + 1) * l]) {
                            *o += wi * b;
                        }
                    }
                }
                Ok((out, shape))
            };
            // A: (r, in/L, L) → (r, in). B: (out/L, r, L) → (out/L, L, r) → (out, r).
            let (a, ad) = assemble(&v.a)?;
            let (bt, bd) = assemble(&v.b)?;
            let r = ad[0];
            let (tiles, rb) = (bd[0], bd[1]);
            let mut b = vec![0f32; tiles * l * rb];
            for t in 0..tiles {
                for k in 0..rb {
                    for j in 0..l {
                        b[(t * l + j) * rb + k] = bt[(t * rb + k) * l + j];
                    }
                }
            }
            Ok(matmul(&b, &a, out_dim, r, in_dim))
        }
        Payload::Vera { .. } => {
            let (l, rm, r) =
                low_rank_factors(src, payload, out_dim, in_dim)?.expect("VeRA is low rank");
            Ok(matmul(&l, &rm, out_dim, r, in_dim))
        }
        Payload::Fourier {
            spectrum,
            seed,
            scaling,
            ..
        } => {
            let s = src.read_f32(spectrum)?;
            let n = s.len();
            let total = (out_dim * in_dim) as u64;
            let perm = crate::torch_rng::randperm_prefix(total, n, *seed).ok_or_else(|| {
                Error::Options(format!(
                    "{spectrum}: FourierFT locations for {total} elements are not reproducible"
                ))
            })?;
            Ok(sparse_ifft2_real(&perm[..n], &s, out_dim, in_dim, *scaling))
        }
        Payload::Hadamard(h) => {
            let ((p1, ..), (p2, ..)) = match &h.cp {
                None => (product(src, &h.w1a, &h.w1b)?, product(src, &h.w2a, &h.w2b)?),
                // CP form (effective conv): w?a is (r, out), w?b is (r, in), t? is (r, r, k…).
                Some((t1, t2)) => (
                    tucker(src, t1, &h.w1a, &h.w1b)?,
                    tucker(src, t2, &h.w2a, &h.w2b)?,
                ),
            };
            let s = h.scale as f32;
            Ok(p1.iter().zip(&p2).map(|(a, b)| a * b * s).collect())
        }
        Payload::Kronecker(k) => {
            let (a, ar, ac) = factor(src, &k.w1)?;
            let (b, br, bc) = factor(src, &k.w2)?;
            let (rows, cols) = (ar * br, ac * bc);
            let s = k.scale as f32;
            let mut out = vec![0f32; rows * cols];
            for i in 0..ar {
                for j in 0..ac {
                    let x = a[i * ac + j] * s;
                    for p in 0..br {
                        let dst = &mut out
                            [(i * br + p) * cols + j * bc..(i * br + p) * cols + (j + 1) * bc];
                        for (d, y) in dst.iter_mut().zip(&b[p * bc..(p + 1) * bc]) {
                            *d = x * y;
                        }
                    }
                }
            }
            Ok(out)
        }
        other => Err(Error::Options(format!(
            "payload {:?} has no dense form",
            other.kind()
        ))),
    }
}

/// An orthogonal transform of input-space vectors, applied to one vector at a time.
#[derive(Debug, Clone)]
pub enum RowTransform {
    /// Block-diagonal: each consecutive `b`-slice `x_k` (a row vector) becomes `x_k · M_k`
    /// (row-major `b×b` blocks). One block serves every slice when `shared`.
    Blocks {
        /// Block size.
        b: usize,
        /// `(blocks, b, b)`.
        blocks: Vec<f32>,
        /// A single block for every slice.
        shared: bool,
    },
    /// BOFT: for each factor in order, `x ← P · blockdiag(M) · Pᵀ` applied to the row vector `x`
    /// (each slice times its block), then the caller scales per output (see
    /// [`RowTransform::output_scale`]).
    Butterfly {
        /// Block size.
        b: usize,
        /// Per factor: the permutation (`(P·x)[i] = x[perm[i]]`, empty for the identity) and
        /// `(blocks, b, b)` matrices.
        factors: Vec<(Vec<usize>, Vec<f32>)>,
        /// Output scaling, one per output unit.
        scale: Vec<f32>,
    },
    /// A low-rank right update at every kernel position of a row laid out `(n, k)`:
    /// `x[:, p] ← x[:, p] + (x[:, p]·U)·V` for each `p < k` (LyCORIS GLoRA).
    LowRankRight {
        /// Channels.
        n: usize,
        /// Kernel positions.
        k: usize,
        /// Rank.
        r: usize,
        /// `U (n, r)`, row-major.
        u: Vec<f32>,
        /// `V (r, n)`, row-major.
        v: Vec<f32>,
    },
    /// Reflections in order: `x ← x − 2 (x·u) u` for each unit row `u` of `us` (`r × n`).
    Reflections {
        /// Vector length.
        n: usize,
        /// Unit vectors, row-major.
        us: Vec<f32>,
    },
}

impl RowTransform {
    /// The inverse transform: blocks inverted, reflections in reverse order, butterfly factors
    /// reversed and inverted, output scaling inverted.
    pub fn inverse(&self) -> RowTransform {
        // True inverses, not transposes: PEFT's default Cayley–Neumann series is only nearly
        // orthogonal. A singular block (impossible for a Cayley transform) falls back to the
        // transpose.
        let transpose_blocks = |blocks: &[f32], b: usize| -> Vec<f32> {
            blocks
                .chunks_exact(b * b)
                .flat_map(|blk| {
                    let m: Vec<f64> = blk.iter().map(|&x| x as f64).collect();
                    match invert_square(&m, b) {
                        Some(inv) => inv.into_iter().map(|x| x as f32).collect::<Vec<f32>>(),
                        None => (0..b * b).map(|k| blk[(k % b) * b + k / b]).collect(),
                    }
                })
                .collect()
        };
        match self {
            RowTransform::Blocks { b, blocks, shared } => RowTransform::Blocks {
                b: *b,
                blocks: transpose_blocks(blocks, *b),
                shared: *shared,
            },
            RowTransform::LowRankRight { n, k, r, u, v } => {
                // (I + UV)⁻¹ = I − U (I + VU)⁻¹ V (Woodbury): the same form with V' = −(I+VU)⁻¹V.
                let (n, r) = (*n, *r);
                let mut vu = vec![0f64; r * r];
                for a in 0..r {
                    for b in 0..r {
                        let dotp: f64 = (0..n)
                            .map(|i| f64::from(v[a * n + i]) * f64::from(u[i * r + b]))
                            .sum();
                        vu[a * r + b] = dotp + if a == b { 1.0 } else { 0.0 };
                    }
                }
                let inv = invert_square(&vu, r).unwrap_or_else(|| {
                    let mut eye = vec![0f64; r * r];
                    (0..r).for_each(|i| eye[i * r + i] = 1.0);
                    eye
                });
                let mut v2 = vec![0f32; r * n];
                for a in 0..r {
                    for j in 0..n {
                        let s: f64 = (0..r)
                            .map(|b| inv[a * r + b] * f64::from(v[b * n + j]))
                            .sum();
                        v2[a * n + j] = -s as f32;
                    }
                }
                RowTransform::LowRankRight {
                    n,
                    k: *k,
                    r,
                    u: u.clone(),
                    v: v2,
                }
            }
            RowTransform::Reflections { n, us } => RowTransform::Reflections {
                n: *n,
                us: us.chunks_exact(*n).rev().flatten().copied().collect(),
            },
            RowTransform::Butterfly { b, factors, scale } => RowTransform::Butterfly {
                b: *b,
                factors: factors
                    .iter()
                    .rev()
                    .map(|(p, blocks)| (p.clone(), transpose_blocks(blocks, *b)))
                    .collect(),
                scale: scale.iter().map(|s| 1.0 / s).collect(),
            },
        }
    }

    /// A per-output scaling applied after the transform (BOFT's `boft_s`).
    pub fn output_scale(&self) -> Option<&[f32]> {
        match self {
            RowTransform::Butterfly { scale, .. } if !scale.is_empty() => Some(scale),
            _ => None,
        }
    }

    /// Transform `x` in place; `tmp` is scratch.
    #[inline(always)]
    pub fn apply(&self, x: &mut [f32], tmp: &mut Vec<f32>) {
        match self {
            RowTransform::Blocks { b, blocks, shared } => {
                let b = *b;
                tmp.resize(b, 0.0);
                for (k, xs) in x.chunks_exact_mut(b).enumerate() {
                    let m = if *shared {
                        &blocks[..b * b]
                    } else {
                        &blocks[k * b * b..(k + 1) * b * b]
                    };
                    vec_mat(xs, m, &mut tmp[..b]);
                    xs.copy_from_slice(&tmp[..b]);
                }
            }
            RowTransform::Butterfly { b, factors, .. } => {
                let b = *b;
                tmp.resize(x.len() + b, 0.0);
                let (y, z) = tmp.split_at_mut(x.len());
                for (perm, blocks) in factors {
                    if perm.is_empty() {
                        // Identity permutation: transform the slices of x directly.
                        for (k, xs) in x.chunks_exact_mut(b).enumerate() {
                            vec_mat(xs, &blocks[k * b * b..(k + 1) * b * b], &mut z[..b]);
                            xs.copy_from_slice(&z[..b]);
                        }
                        continue;
                    }
                    // y = Pᵀ x: y[perm[i]] = x[i].
                    for (i, &p) in perm.iter().enumerate() {
                        y[p] = x[i];
                    }
                    // Each slice of y times its block.
                    for (k, ys) in y.chunks_exact_mut(b).enumerate() {
                        vec_mat(ys, &blocks[k * b * b..(k + 1) * b * b], &mut z[..b]);
                        ys.copy_from_slice(&z[..b]);
                    }
                    // x = P y: x[i] = y[perm[i]].
                    for (i, &p) in perm.iter().enumerate() {
                        x[i] = y[p];
                    }
                }
            }
            RowTransform::LowRankRight { n, k, r, u, v } => {
                let (n, k, r) = (*n, *k, *r);
                tmp.resize(r, 0.0);
                for p in 0..k {
                    tmp.fill(0.0);
                    for i in 0..n {
                        let xi = x[i * k + p];
                        for (t, uv) in tmp.iter_mut().zip(&u[i * r..(i + 1) * r]) {
                            *t += xi * uv;
                        }
                    }
                    for (a, &t) in tmp.iter().enumerate() {
                        for (j, vv) in v[a * n..(a + 1) * n].iter().enumerate() {
                            x[j * k + p] += t * vv;
                        }
                    }
                }
            }
            RowTransform::Reflections { n, us } => {
                for u in us.chunks_exact(*n) {
                    let d = dot(x, u);
                    for (a, b) in x.iter_mut().zip(u) {
                        *a -= 2.0 * d * b;
                    }
                }
            }
        }
    }
}

/// `a · b` for square `n×n` f64 matrices.
fn sq_mul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            let x = a[i * n + k];
            for j in 0..n {
                c[i * n + j] += x * b[k * n + j];
            }
        }
    }
    c
}

/// Solve `a · y = rhs` (square `n×n`, several right-hand sides as columns of `rhs`) by
/// Gauss–Jordan elimination with partial pivoting. `None` when singular.
fn solve(mut a: Vec<f64>, mut rhs: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))?;
        if a[p * n + c].abs() < 1e-300 {
            return None;
        }
        for j in 0..n {
            a.swap(c * n + j, p * n + j);
            rhs.swap(c * n + j, p * n + j);
        }
        let inv = 1.0 / a[c * n + c];
        for j in 0..n {
            a[c * n + j] *= inv;
            rhs[c * n + j] *= inv;
        }
        for i in 0..n {
            if i != c {
                let f = a[i * n + c];
                if f != 0.0 {
                    for j in 0..n {
                        a[i * n + j] -= f * a[c * n + j];
                        rhs[i * n + j] -= f * rhs[c * n + j];
                    }
                }
            }
        }
    }
    Some(rhs)
}

/// `out = x · m` for a row vector `x` of length `b` and a row-major `b×b` matrix: a sum of the
/// matrix's rows, which vectorises.
#[inline(always)]
fn vec_mat(x: &[f32], m: &[f32], out: &mut [f32]) {
    let b = x.len();
    out.fill(0.0);
    for (i, &xi) in x.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&m[i * b..(i + 1) * b]) {
            *o += xi * v;
        }
    }
}

/// A dot product with 16 independent partial sums, so it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Transform every row of `w` (`cols` wide) in place: `w ← w + weight·(T(w) − w)`, each row
/// then scaled by `T`'s output scale (rows `row0…`). Compiled for AVX-512 or AVX2 when the CPU
/// has them.
pub fn transform_rows(t: &RowTransform, w: &mut [f32], cols: usize, row0: usize, weight: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,fma")]
        fn avx512(t: &RowTransform, w: &mut [f32], cols: usize, row0: usize, weight: f32) {
            transform_rows_body(t, w, cols, row0, weight)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(t: &RowTransform, w: &mut [f32], cols: usize, row0: usize, weight: f32) {
            transform_rows_body(t, w, cols, row0, weight)
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
            return unsafe { avx512(t, w, cols, row0, weight) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { avx2(t, w, cols, row0, weight) };
        }
    }
    transform_rows_body(t, w, cols, row0, weight)
}

#[inline(always)]
fn transform_rows_body(t: &RowTransform, w: &mut [f32], cols: usize, row0: usize, weight: f32) {
    let mut v = Vec::with_capacity(cols);
    let mut tmp = Vec::new();
    for (i, row) in w.chunks_exact_mut(cols).enumerate() {
        v.clear();
        v.extend_from_slice(row);
        t.apply(&mut v, &mut tmp);
        if let Some(s) = t.output_scale() {
            let k = s[row0 + i];
            v.iter_mut().for_each(|x| *x *= k);
        }
        if weight == 1.0 {
            row.copy_from_slice(&v);
        } else {
            for (x, y) in row.iter_mut().zip(&v) {
                *x += weight * (y - *x);
            }
        }
    }
}

/// The inverse of a square `n×n` matrix, or `None` when singular.
pub fn invert_square(m: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut eye = vec![0f64; n * n];
    (0..n).for_each(|i| eye[i * n + i] = 1.0);
    solve(m.to_vec(), eye, n)
}

/// One OFT rotation from a packed strict upper triangle, as PEFT's `_cayley_batch` builds it.
pub fn cayley_block(packed: &[f32], b: usize, cayley: Cayley) -> Option<Vec<f64>> {
    let mut q = vec![0f64; b * b];
    let mut k = 0;
    for i in 0..b {
        for j in i + 1..b {
            q[i * b + j] = packed[k] as f64;
            q[j * b + i] = -(packed[k] as f64);
            k += 1;
        }
    }
    let eye = |n: usize| {
        let mut m = vec![0f64; n * n];
        (0..n).for_each(|i| m[i * n + i] = 1.0);
        m
    };
    match cayley {
        Cayley::Neumann(terms) => {
            let mut r = eye(b);
            let add = |r: &mut Vec<f64>, m: &[f64], s: f64| {
                r.iter_mut().zip(m).for_each(|(x, y)| *x += s * y)
            };
            if terms > 1 {
                add(&mut r, &q, 2.0);
                if terms > 2 {
                    let q2 = sq_mul(&q, &q, b);
                    add(&mut r, &q2, 2.0);
                    let mut p = q2;
                    for _ in 3..terms.saturating_sub(1) {
                        p = sq_mul(&p, &q, b);
                        add(&mut r, &p, 2.0);
                    }
                    p = sq_mul(&p, &q, b);
                    add(&mut r, &p, 1.0);
                }
            }
            Some(r)
        }
        Cayley::Exact => {
            // X = (I − Q)(I + Q)⁻¹; with Qᵀ = −Q, Xᵀ solves (I − Q) Xᵀ = (I + Q).
            let i = eye(b);
            let a: Vec<f64> = i.iter().zip(&q).map(|(x, y)| x - y).collect();
            let rhs: Vec<f64> = i.iter().zip(&q).map(|(x, y)| x + y).collect();
            let xt = solve(a, rhs, b)?;
            let mut x = vec![0f64; b * b];
            for r in 0..b {
                for c in 0..b {
                    x[r * b + c] = xt[c * b + r];
                }
            }
            Some(x)
        }
    }
}

/// The input-space transform of an OFT or HRA payload for vectors of length `n`.
pub fn row_transform(src: &dyn TensorSource, payload: &Payload, n: usize) -> Result<RowTransform> {
    match payload {
        Payload::Oft(o) => {
            let d = dims(src, &o.tensor)?;
            let (stored, packed_len) = (d[0], d[1]);
            let mut v = src.read_f32(&o.tensor)?;
            let b = o.block_size as usize;
            if let Some(eps) = o.coft_eps {
                // PEFT's _project_batch: clamp each generator's skew matrix to Frobenius norm
                // eps/√(number of stored generators).
                let limit = (eps / (stored as f64).sqrt()) as f32;
                for g in v.chunks_exact_mut(packed_len) {
                    let norm = (2.0 * g.iter().map(|x| x * x).sum::<f32>()).sqrt();
                    if norm > limit {
                        g.iter_mut().for_each(|x| *x *= limit / norm);
                    }
                }
            }
            // W' = W · Rᵀ: each input slice x_k becomes x_k · R_kᵀ; an embedding's rotation is
            // applied as W · R, so there x_k · R_k.
            let mut blocks = Vec::with_capacity(stored * b * b);
            for g in v.chunks_exact(packed_len) {
                let r = cayley_block(g, b, o.cayley).ok_or_else(|| {
                    Error::Options(format!(
                        "{}: an OFT block's Cayley transform is singular",
                        o.tensor
                    ))
                })?;
                if o.embedding {
                    blocks.extend(r.iter().map(|&x| x as f32));
                } else {
                    blocks.extend((0..b * b).map(|k| r[(k % b) * b + k / b] as f32));
                }
            }
            Ok(RowTransform::Blocks {
                b,
                blocks,
                shared: o.block_share,
            })
        }
        Payload::Butterfly { r, s, .. } => {
            let d = dims(src, r)?;
            let (m, nb, b) = (d[0], d[1], d[2]);
            let rv = src.read_f32(r)?;
            let mut factors = Vec::with_capacity(m);
            for i in 0..m {
                let perm = butterfly_perm(n, nb >> i, b / 2, m - 1);
                // An identity permutation is stored empty and skipped.
                let perm = if perm.iter().enumerate().all(|(k, &p)| k == p) {
                    Vec::new()
                } else {
                    perm
                };
                let mut blocks = Vec::with_capacity(nb * b * b);
                for k in 0..nb {
                    let g = &rv[(i * nb + k) * b * b..(i * nb + k + 1) * b * b];
                    // PEFT's cayley_batch: S = (G − Gᵀ)/2, Q = (I − S)(I + S)⁻¹.
                    let packed: Vec<f32> = (0..b)
                        .flat_map(|p| (p + 1..b).map(move |q| (p, q)))
                        .map(|(p, q)| 0.5 * (g[p * b + q] - g[q * b + p]))
                        .collect();
                    let q = cayley_block(&packed, b, Cayley::Exact).ok_or_else(|| {
                        Error::Options(format!("{r}: a BOFT block's Cayley transform is singular"))
                    })?;
                    // The column-vector block Q acts on the row vector as x · Qᵀ.
                    blocks.extend((0..b * b).map(|k| q[(k % b) * b + k / b] as f32));
                }
                factors.push((perm, blocks));
            }
            Ok(RowTransform::Butterfly {
                b,
                factors,
                scale: src.read_f32(s)?,
            })
        }
        Payload::Householder(h) => {
            let d = dims(src, &h.tensor)?;
            let (len, r) = (d[0], d[1]);
            debug_assert_eq!(len, n);
            let u = src.read_f32(&h.tensor)?;
            // Columns of the (n, r) tensor, as f64 rows.
            let mut cols: Vec<Vec<f64>> = (0..r)
                .map(|c| (0..len).map(|i| u[i * r + c] as f64).collect())
                .collect();
            if h.gram_schmidt {
                for i in 0..r {
                    for j in 0..i {
                        let d: f64 = cols[j].iter().zip(&cols[i]).map(|(a, b)| a * b).sum();
                        let uj = cols[j].clone();
                        cols[i].iter_mut().zip(&uj).for_each(|(x, y)| *x -= d * y);
                    }
                    let nrm = cols[i].iter().map(|x| x * x).sum::<f64>().sqrt();
                    cols[i].iter_mut().for_each(|x| *x /= nrm);
                }
            } else {
                for c in &mut cols {
                    let nrm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
                    c.iter_mut().for_each(|x| *x /= nrm);
                }
            }
            Ok(RowTransform::Reflections {
                n: len,
                us: cols.into_iter().flatten().map(|x| x as f32).collect(),
            })
        }
        Payload::Stages { blocks, perms, .. } => {
            let d = dims(src, blocks)?;
            let (m, nb, b) = (d[0], d[1], d[2]);
            if nb * b != n {
                return Err(Error::Options(format!(
                    "{blocks}: {d:?} does not transform {n}-wide vectors"
                )));
            }
            let bv = src.read_f32(blocks)?;
            let info = src
                .info(perms)
                .ok_or_else(|| adapterkit_core::Error::TensorNotFound {
                    name: perms.clone(),
                })?
                .clone();
            let mut raw = vec![0u8; info.len as usize];
            src.read_bytes(perms, 0, &mut raw)?;
            let idx: Vec<usize> = raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
                .collect();
            let mut factors = Vec::with_capacity(m);
            for i in 0..m {
                let perm = idx[i * n..(i + 1) * n].to_vec();
                let mut seen = vec![false; n];
                if perm
                    .iter()
                    .any(|&p| p >= n || std::mem::replace(&mut seen[p], true))
                {
                    return Err(Error::Options(format!(
                        "{perms}: stage {i} is not a permutation of 0..{n}"
                    )));
                }
                factors.push((perm, bv[i * nb * b * b..(i + 1) * nb * b * b].to_vec()));
            }
            Ok(RowTransform::Butterfly {
                b,
                factors,
                scale: Vec::new(),
            })
        }
        Payload::RightMultiply { u, v, kernel, .. } => {
            let (du, dv) = (dims(src, u)?, dims(src, v)?);
            let k = *kernel as usize;
            if du.len() != 2 || dv != [du[1], du[0]] || du[0] * k != n {
                return Err(Error::Options(format!(
                    "{u} {du:?} and {v} {dv:?} at {k} kernel positions do not update {n}-wide rows"
                )));
            }
            Ok(RowTransform::LowRankRight {
                n: du[0],
                k,
                r: du[1],
                u: src.read_f32(u)?,
                v: src.read_f32(v)?,
            })
        }
        other => Err(Error::Options(format!(
            "payload {:?} is not an input-space transform",
            other.kind()
        ))),
    }
}

/// PEFT's `block_butterfly_perm(n, blocks, r, n_butterfly_factor)`: within each run of
/// `n / blocks` indices, groups of `r` are reordered even groups first, then odd ones. The
/// identity when there is a single butterfly factor.
pub fn butterfly_perm(n: usize, blocks: usize, r: usize, n_butterfly_factor: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if n_butterfly_factor == 0 || blocks == 0 || r == 0 {
        return idx;
    }
    let size = n / blocks;
    let groups = size.div_ceil(r);
    let order: Vec<usize> = (0..groups)
        .step_by(2)
        .chain((1..groups).step_by(2))
        .collect();
    let mut sorted = Vec::with_capacity(size);
    for g in order {
        sorted.extend(g * r..(g * r + r).min(size));
    }
    for start in (0..n).step_by(size) {
        let chunk: Vec<usize> = idx[start..start + size].to_vec();
        for (i, &s) in sorted.iter().enumerate() {
            idx[start + i] = chunk[s];
        }
    }
    idx
}

fn role<'a>(t: &'a Tuner, role: &str) -> Result<&'a str> {
    t.tensor(role)
        .ok_or_else(|| Error::Options(format!("{}: tensor {role} missing", t.method)))
}

/// `ΔW` (or HiRA's `M`) of one of PEFT's newer tuners, `(out, in)` in PEFT's orientation.
fn tuner_delta(
    src: &dyn TensorSource,
    t: &Tuner,
    out_dim: usize,
    in_dim: usize,
) -> Result<Vec<f32>> {
    let read = |r: &str| -> Result<Vec<f32>> { src.read_f32(role(t, r)?).map_err(Error::from) };
    let shape = |r: &str| -> Result<Vec<usize>> { dims(src, role(t, r)?) };
    let mut delta = vec![0f32; out_dim * in_dim];
    match t.method.as_str() {
        "SHIRA" => {
            // W[rows, cols] += values (scaling 1).
            let w = read("shira_weight")?;
            let idx = read("shira_indices")?;
            scatter_coo(&mut delta, out_dim, in_dim, &idx, &w, "SHiRA")?;
        }
        "C3A" => {
            // Block-circulant: ΔW[p·b+n, q·b+k] = K[p, q, (k − n) mod b] / in.
            let d = shape("c3a_kernel")?;
            let kv = read("c3a_kernel")?;
            let (mo, ni, b) = (d[0], d[1], d[2]);
            for p in 0..mo {
                for q in 0..ni {
                    for n in 0..b {
                        for k in 0..b {
                            delta[(p * b + n) * in_dim + q * b + k] =
                                kv[(p * ni + q) * b + (k + b - n) % b] / in_dim as f32;
                        }
                    }
                }
            }
        }
        "DELORA" => {
            // ΔW = (B · diag(λ/r / (‖A_k‖·‖B_k‖)) · A) ⊙ w_norm[None, :], norms clamped at 1e-4.
            let (a, b) = (read("delora_A")?, read("delora_B")?);
            let lam = read("delora_lambda")?[0];
            let wn = read("delora_w_norm")?;
            let r = shape("delora_A")?[0];
            let mut bs = b.clone();
            for k in 0..r {
                let an = a[k * in_dim..(k + 1) * in_dim]
                    .iter()
                    .map(|x| x * x)
                    .sum::<f32>()
                    .sqrt()
                    .max(1e-4);
                let bn = (0..out_dim)
                    .map(|o| b[o * r + k] * b[o * r + k])
                    .sum::<f32>()
                    .sqrt()
                    .max(1e-4);
                let f = lam / r as f32 / (an * bn);
                (0..out_dim).for_each(|o| bs[o * r + k] *= f);
            }
            delta = matmul(&bs, &a, out_dim, r, in_dim);
            for row in delta.chunks_exact_mut(in_dim) {
                row.iter_mut().zip(&wn).for_each(|(x, n)| *x *= n);
            }
        }
        "GRALORA" => {
            // A (k, in/k, r), B (k, r, out/k): block (out j, in n) = (A[n][:, j·r/k..] · B[j][n·r/k.., :])ᵀ.
            let (a, b) = (read("gralora_A")?, read("gralora_B")?);
            let ad = shape("gralora_A")?;
            let k = ad[0];
            let r = ad[2];
            let (ib, ob, sr) = (in_dim / k, out_dim / k, r / k);
            for n in 0..k {
                for j in 0..k {
                    for x in 0..ib {
                        for y in 0..ob {
                            let v: f32 = (0..sr)
                                .map(|q| {
                                    a[(n * ib + x) * r + j * sr + q]
                                        * b[(j * r + n * sr + q) * ob + y]
                                })
                                .sum();
                            delta[(j * ob + y) * in_dim + n * ib + x] = v;
                        }
                    }
                }
            }
            if let (Some(ag), Some(bg)) = (
                t.tensor("gralora_A_general.weight"),
                t.tensor("gralora_B_general.weight"),
            ) {
                let hr = dims(src, ag)?[0];
                let g = matmul(&src.read_f32(bg)?, &src.read_f32(ag)?, out_dim, hr, in_dim);
                delta.iter_mut().zip(&g).for_each(|(x, y)| *x += y);
            }
            let s = t.param("scale").unwrap_or(1.0) as f32;
            delta.iter_mut().for_each(|x| *x *= s);
        }
        "PVERA" => {
            // Only the mean half: (λ_b ⊙ B[:out]) · (λ_d[:r] ⊙ A[:r, :in]).
            let r = t.param("r").unwrap_or(0.0) as usize;
            let (a, b) = (read("base_model.pvera_A")?, read("base_model.pvera_B")?);
            let (ad, bd) = (shape("base_model.pvera_A")?, shape("base_model.pvera_B")?);
            let (lb, ld) = (read("pvera_lambda_b")?, read("pvera_lambda_d")?);
            let l: Vec<f32> = (0..out_dim * r)
                .map(|x| lb[x / r] * b[(x / r) * bd[1] + x % r])
                .collect();
            let rm: Vec<f32> = (0..r * in_dim)
                .map(|x| ld[x / in_dim] * a[(x / in_dim) * ad[1] + x % in_dim])
                .collect();
            delta = matmul(&l, &rm, out_dim, r, in_dim);
        }
        "UNILORA" => {
            // A = θ[idx_A] ⊙ s_A (r×in), B = θ[idx_B] ⊙ s_B (out×r).
            let theta = read("base_model.unilora_theta_d")?;
            let gather = |i: &str, s: &str| -> Result<Vec<f32>> {
                let idx = read(i)?;
                let sc = read(s)?;
                idx.iter()
                    .zip(&sc)
                    .map(|(&k, &f)| {
                        theta.get(k as usize).map(|v| v * f).ok_or_else(|| {
                            Error::Options(format!("UniLoRA index {k} is outside theta_d"))
                        })
                    })
                    .collect()
            };
            let a = gather("unilora_indices_A", "unilora_scales_A")?;
            let b = gather("unilora_indices_B", "unilora_scales_B")?;
            let r = shape("unilora_indices_A")?[0];
            delta = matmul(&b, &a, out_dim, r, in_dim);
        }
        "HIRA" => {
            // M = B·A (linear; conv via the flattened kernel; embeddings (B_e·A_e)ᵀ).
            if let (Some(a), Some(b)) = (t.tensor("hira_embedding_A"), t.tensor("hira_embedding_B"))
            {
                let (av, bv) = (src.read_f32(a)?, src.read_f32(b)?);
                let r = dims(src, a)?[0];
                let m = matmul(&bv, &av, in_dim, r, out_dim);
                delta = crate::kernels::transpose(&m, in_dim, out_dim);
            } else {
                let (a, b) = (read("hira_A")?, read("hira_B")?);
                let r = shape("hira_A")?[0];
                delta = matmul(&b, &a, out_dim, r, in_dim);
            }
        }
        "RANDLORA" => {
            let a_name = t
                .tensor("randlora_A")
                .or(t.tensor("base_model.randlora_A"))
                .unwrap_or_default();
            let b_name = t
                .tensor("randlora_B")
                .or(t.tensor("base_model.randlora_B"))
                .unwrap_or_default();
            let (a, b) = (src.read_f32(a_name)?, src.read_f32(b_name)?);
            let (ad, bd) = (dims(src, a_name)?, dims(src, b_name)?);
            delta = randlora_product(src, t, (&a, &ad), (&b, &bd), out_dim, in_dim)?;
        }
        "WAVEFT" => {
            delta = waveft_delta(src, t, out_dim, in_dim)?;
        }
        "SUPERTUNING" => {
            let idx = read("supertuning_indices")?;
            delta = supertuning_delta(src, t, out_dim, in_dim, &idx)?;
        }
        other => return Err(Error::Options(format!("no dense form for {other}"))),
    }
    Ok(delta)
}

/// RandLoRA's update from its bases `A (r, 1, ≥mn)` and `B (≥mx, ≥nb, r)`:
/// `UA[j] = λ[j/nb, j%nb] · A[j/nb, 0, :mn] ⊙ γ[j%nb]`, `UB[:, j] = B[:mx, j/r, j%r]`,
/// `M = UB·UA (mx×mn)`, `ΔW = s·M`, transposed when `mn` is the output side.
fn randlora_product(
    src: &dyn TensorSource,
    t: &Tuner,
    (a, ad): (&[f32], &[usize]),
    (b, bd): (&[f32], &[usize]),
    out_dim: usize,
    in_dim: usize,
) -> Result<Vec<f32>> {
    let lam = src.read_f32(role(t, "randlora_lambda")?)?;
    let gam = src.read_f32(role(t, "randlora_gamma")?)?;
    let ld = dims(src, role(t, "randlora_lambda")?)?;
    let (r, nb) = (ld[0], ld[1]);
    let (mn, mx) = (out_dim.min(in_dim), out_dim.max(in_dim));
    if ad.len() != 3
        || bd.len() != 3
        || ad[0] < r
        || ad[2] < mn
        || bd[0] < mx
        || bd[1] < nb
        || bd[2] != r
    {
        return Err(Error::Options(format!(
            "RandLoRA bases {ad:?}, {bd:?} do not cover rank {r}, {nb} bases, {mx}×{mn}"
        )));
    }
    let mut m = vec![0f32; mx * mn];
    for j in 0..r * nb {
        let (ri, bi) = (j / nb, j % nb);
        let (bb, br) = (j / r, j % r);
        for c in 0..mn {
            let ua = lam[ri * nb + bi] * a[ri * ad[1] * ad[2] + c] * gam[bi * mn + c];
            if ua == 0.0 {
                continue;
            }
            for row in 0..mx {
                m[row * mn + c] += b[(row * bd[1] + bb) * bd[2] + br] * ua;
            }
        }
    }
    let s = t.param("scale").unwrap_or(1.0) as f32;
    Ok(if mn == in_dim {
        m.iter().map(|x| x * s).collect()
    } else {
        crate::kernels::transpose(&m, mx, mn)
            .iter()
            .map(|x| x * s)
            .collect()
    })
}

/// RandLoRA saved without its bases: regenerate them as PEFT does at load time — torch's CPU
/// generator seeded with `projection_prng_key`, `kaiming_uniform_(a=√5)` drawn in bf16 for
/// `A (r, 1, min_dim)` and then `ceil(min_dim/r)` pieces `(max_dim, 1, r)` concatenated into `B`,
/// each divided by its own (unbiased) standard deviation in bf16 — where `max_dim × min_dim` are the
/// largest output and input sizes over the adapter's targets.
pub fn randlora_regen_delta(
    src: &dyn TensorSource,
    payload: &Payload,
    out_dim: usize,
    in_dim: usize,
    max_dim: usize,
    min_dim: usize,
) -> Result<Vec<f32>> {
    let Payload::Tuner(t) = payload else {
        return Err(Error::Options("not a RandLoRA payload".into()));
    };
    let r = t.param("r").unwrap_or(0.0) as usize;
    if r == 0 {
        return Err(Error::Options("RandLoRA: r is 0".into()));
    }
    let mut g = crate::torch_rng::Mt19937::new(t.param("seed").unwrap_or(0.0) as u64);
    let nb = min_dim.div_ceil(r);
    let a = crate::torch_rng::kaiming_uniform_bf16(&mut g, r * min_dim, min_dim);
    let mut parts = Vec::with_capacity(nb);
    for _ in 0..nb {
        parts.push(crate::torch_rng::kaiming_uniform_bf16(
            &mut g,
            max_dim * r,
            r,
        ));
    }
    // cat along dim 1: B[m, b, k] = part_b[m, 0, k].
    let mut b = vec![0f32; max_dim * nb * r];
    for (bi, p) in parts.iter().enumerate() {
        for m in 0..max_dim {
            b[(m * nb + bi) * r..(m * nb + bi + 1) * r].copy_from_slice(&p[m * r..(m + 1) * r]);
        }
    }
    let (a, b) = (
        crate::torch_rng::div_std_bf16(&a),
        crate::torch_rng::div_std_bf16(&b),
    );
    randlora_product(
        src,
        t,
        (&a, &[r, 1, min_dim]),
        (&b, &[max_dim, nb, r]),
        out_dim,
        in_dim,
    )
}

/// `scaling · Re(ifft2(F))` for an `m × n` spectrum `F` that is zero but for `values` at the flat
/// positions `positions` (torch's `ifft2`: `e^{+2πi…}` and a `1/(mn)` normalisation). Row
/// transforms run only on the rows that hold a value, then one `m`-point transform per column;
/// f64 throughout, `O(mn log m)`.
pub fn sparse_ifft2_real(
    positions: &[u64],
    values: &[f32],
    m: usize,
    n: usize,
    scaling: f64,
) -> Vec<f32> {
    use rustfft::num_complex::Complex64;
    let mut planner = rustfft::FftPlanner::<f64>::new();
    let row_fft = planner.plan_fft_inverse(n);
    let col_fft = planner.plan_fft_inverse(m);
    let mut rows: std::collections::BTreeMap<usize, Vec<Complex64>> =
        std::collections::BTreeMap::new();
    for (&pos, &v) in positions.iter().zip(values) {
        let (u, w) = ((pos / n as u64) as usize, (pos % n as u64) as usize);
        rows.entry(u)
            .or_insert_with(|| vec![Complex64::new(0.0, 0.0); n])[w] += v as f64;
    }
    for row in rows.values_mut() {
        row_fft.process(row);
    }
    let c = scaling / (m * n) as f64;
    let mut out = vec![0f32; m * n];
    let mut col = vec![Complex64::new(0.0, 0.0); m];
    for q in 0..n {
        col.iter_mut().for_each(|x| *x = Complex64::new(0.0, 0.0));
        for (&u, row) in &rows {
            col[u] = row[q];
        }
        col_fft.process(&mut col);
        for (p, x) in col.iter().enumerate() {
            out[p * n + q] = (x.re * c) as f32;
        }
    }
    out
}

/// Daubechies scaling filters: db1 (Haar) and db2.
const DB1: [f64; 2] = [
    std::f64::consts::FRAC_1_SQRT_2,
    std::f64::consts::FRAC_1_SQRT_2,
];
const DB2: [f64; 4] = [
    0.482_962_913_144_534_1,
    0.836_516_303_737_807_9,
    0.224_143_868_042_013_4,
    -0.129_409_522_551_260_4,
];

/// WaveFT: the spectrum sits at `torch.randperm(out·in, seed)[:n]` of a grid padded for the
/// wavelet (db2 +2, rounded up to even, centred); the grid's quadrants are one level of
/// approximation/detail coefficients; a single-level inverse 2-D DWT (stride-2 transposed
/// convolution with the outer-product filters, cropped by `(2L−3)/2`) rebuilds the update, which
/// is scaled and cropped back to `out × in`. Without `use_idwt` the spectrum is the update.
fn waveft_delta(src: &dyn TensorSource, t: &Tuner, o: usize, i: usize) -> Result<Vec<f32>> {
    let spec = src.read_f32(role(t, "waveft_spectrum")?)?;
    let seed = t.param("seed").unwrap_or(777.0) as u64;
    let scaling = t.param("scaling").unwrap_or(1.0);
    let perm =
        crate::torch_rng::randperm_prefix((o * i) as u64, spec.len(), seed).ok_or_else(|| {
            Error::Options(format!(
                "WaveFT locations for {} elements are not reproducible",
                o * i
            ))
        })?;
    let mut delta = vec![0f32; o * i];
    if t.param("idwt").unwrap_or(1.0) == 0.0 {
        for (k, &idx) in perm[..spec.len()].iter().enumerate() {
            delta[idx as usize] = (spec[k] as f64 * scaling) as f32;
        }
        return Ok(delta);
    }
    let c: &[f64] = if t.param("taps").unwrap_or(2.0) as usize == 4 {
        &DB2
    } else {
        &DB1
    };
    let l = c.len();
    let red = if l == 4 { 2 } else { 0 };
    let (mut hp, mut wp) = (o + red, i + red);
    hp += hp % 2;
    wp += wp % 2;
    let (ro, co) = ((hp - o) / 2, (wp - i) / 2);
    let mut grid = vec![0f64; hp * wp];
    for (k, &idx) in perm[..spec.len()].iter().enumerate() {
        let (r, q) = (idx as usize / i, idx as usize % i);
        grid[(r + ro) * wp + q + co] = spec[k] as f64;
    }
    let (h2, w2) = (hp / 2, wp / 2);
    let hi: Vec<f64> = (0..l)
        .map(|k| {
            if k % 2 == 0 {
                c[l - 1 - k]
            } else {
                -c[l - 1 - k]
            }
        })
        .collect();
    let (oh, ow) = (2 * (h2 - 1) + l, 2 * (w2 - 1) + l);
    let mut out = vec![0f64; oh * ow];
    // (quadrant row offset, column offset, row filter, column filter): cA, cH, cV, cD.
    let quads: [(usize, usize, &[f64], &[f64]); 4] = [
        (0, 0, c, c),
        (0, w2, &hi, c),
        (h2, 0, c, &hi),
        (h2, w2, &hi, &hi),
    ];
    for (qr, qc, fa, fb) in quads {
        for y in 0..h2 {
            for x in 0..w2 {
                let v = grid[(qr + y) * wp + qc + x];
                if v == 0.0 {
                    continue;
                }
                for a in 0..l {
                    for b in 0..l {
                        out[(a + 2 * y) * ow + b + 2 * x] += v * fa[a] * fb[b];
                    }
                }
            }
        }
    }
    let pad = (2 * l).saturating_sub(3) / 2;
    let (rh, rw) = (oh - 2 * pad, ow - 2 * pad);
    let (sr, sc) = ((rh - o) / 2, (rw - i) / 2);
    for r in 0..o {
        for q in 0..i {
            delta[r * i + q] = (out[(pad + sr + r) * ow + pad + sc + q] * scaling) as f32;
        }
    }
    Ok(delta)
}

/// Low-rank factors `(L (out×k), R (k×in), k)`.
pub type LowRankFactors = (Vec<f32>, Vec<f32>, usize);

/// LoHa's flat factors `(w1a, w1b, w2a, w2b, r, scale)`.
pub type HadamardFactors = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, usize, f32);

/// Factors `(L (out×k), R (k×in), k)` with `ΔW = L·R`, for payloads whose update is low rank
/// (VeRA), so the executor can stream it instead of building `ΔW`.
pub fn low_rank_factors(
    src: &dyn TensorSource,
    payload: &Payload,
    out_dim: usize,
    in_dim: usize,
) -> Result<Option<LowRankFactors>> {
    match payload {
        Payload::Vera {
            a,
            b,
            lambda_b,
            lambda_d,
            ..
        } => {
            let (ad, bd) = (dims(src, a)?, dims(src, b)?);
            let (r, max_in) = (ad[0], ad[1]);
            let (av, bv) = (src.read_f32(a)?, src.read_f32(b)?);
            let (lb, ld) = (src.read_f32(lambda_b)?, src.read_f32(lambda_d)?);
            let l: Vec<f32> = (0..out_dim * r)
                .map(|x| lb[x / r] * bv[(x / r) * bd[1] + x % r])
                .collect();
            let rm: Vec<f32> = (0..r * in_dim)
                .map(|x| ld[x / in_dim] * av[(x / in_dim) * max_in + x % in_dim])
                .collect();
            Ok(Some((l, rm, r)))
        }
        _ => Ok(None),
    }
}

/// LoHa's factors `(w1a, w1b, w2a, w2b, r, scale)` in the flat (non-CP) form, for per-block
/// evaluation of `scale · (w1a·w1b) ⊙ (w2a·w2b)`.
pub fn hadamard_factors(
    src: &dyn TensorSource,
    payload: &Payload,
) -> Result<Option<HadamardFactors>> {
    match payload {
        Payload::Hadamard(h) if h.cp.is_none() => {
            let r = dims(src, &h.w1a)?[1];
            if dims(src, &h.w2a)?[1] != r {
                return Ok(None);
            }
            Ok(Some((
                src.read_f32(&h.w1a)?,
                src.read_f32(&h.w1b)?,
                src.read_f32(&h.w2a)?,
                src.read_f32(&h.w2b)?,
                r,
                h.scale as f32,
            )))
        }
        _ => Ok(None),
    }
}

/// Whether a payload's update depends on the base weight itself (so the executor must hand it
/// the original tensor).
pub fn needs_base(payload: &Payload) -> bool {
    matches!(payload, Payload::Tuner(t) if (t.method == "SUPERTUNING" && t.tensor("supertuning_indices").is_none()) || ["DEFT", "PEANUT", "FROD", "OSF"].contains(&t.method.as_str()))
}

/// [`dense_delta`] for updates that depend on the original base weight `w0` (`out × in`).
pub fn dense_delta_with_base(
    src: &dyn TensorSource,
    payload: &Payload,
    out_dim: usize,
    in_dim: usize,
    w0: &[f32],
) -> Result<Vec<f32>> {
    match payload {
        Payload::Tuner(t) if t.method == "SUPERTUNING" => {
            // Positions not saved: PEFT takes torch.topk(|W|.flatten(), k, largest=select_top),
            // sorted, and pairs the saved values with them in that order.
            let k = (w0.len() as f64 * (1.0 - t.param("sparsity").unwrap_or(0.9))) as usize;
            let largest = t.param("select_top").unwrap_or(1.0) != 0.0;
            let mut idx: Vec<usize> = (0..w0.len()).collect();
            let key = |i: &usize| w0[*i].abs();
            if largest {
                idx.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
            } else {
                idx.sort_by(|a, b| key(a).total_cmp(&key(b)).then(a.cmp(b)));
            }
            idx.truncate(k);
            let idx: Vec<f32> = idx.into_iter().map(|i| i as f32).collect();
            supertuning_delta(src, t, out_dim, in_dim, &idx)
        }
        Payload::Tuner(t) if t.method == "DEFT" => deft_delta(src, t, out_dim, in_dim, w0),
        Payload::Tuner(t) if t.method == "PEANUT" => peanut_delta(src, t, out_dim, in_dim, w0),
        Payload::Tuner(t) if t.method == "FROD" => frod_delta(src, t, out_dim, in_dim, w0),
        Payload::Tuner(t) if t.method == "OSF" => osf_delta(src, t, out_dim, in_dim, w0),
        other => dense_delta(src, other, out_dim, in_dim),
    }
}

/// OSF keeps the top `k = min(out, in) − len(S_low)` singular components of the base weight and
/// replaces the rest by the trained `U_low·diag(S_low)·V_low`: `ΔW = top_k(W) + U·S·V − W`.
/// The SVD is a one-sided Jacobi in f64; the result does not depend on singular-vector signs.
fn osf_delta(
    src: &dyn TensorSource,
    t: &Tuner,
    out_dim: usize,
    in_dim: usize,
    w0: &[f32],
) -> Result<Vec<f32>> {
    let s_low = src.read_f32(role(t, "osf_svd_params.S_low")?)?;
    let u_low = src.read_f32(role(t, "osf_svd_params.U_low")?)?;
    let v_low = src.read_f32(role(t, "osf_svd_params.V_low")?)?;
    let m = out_dim.min(in_dim);
    let k = m.checked_sub(s_low.len()).ok_or_else(|| {
        Error::Options(format!(
            "OSF: {} trained components exceed rank {m}",
            s_low.len()
        ))
    })?;
    let top = top_k_approx(w0, out_dim, in_dim, k);
    let mut us = u_low.clone();
    let r = s_low.len();
    for row in us.chunks_exact_mut(r.max(1)) {
        row.iter_mut().zip(&s_low).for_each(|(x, s)| *x *= s);
    }
    let low = matmul(&us, &v_low, out_dim, r, in_dim);
    Ok((0..out_dim * in_dim)
        .map(|i| (top[i] + low[i] as f64 - w0[i] as f64) as f32)
        .collect())
}

/// The best rank-`k` approximation of `w` (`rows × cols`), by one-sided Jacobi SVD in f64.
fn top_k_approx(w: &[f32], rows: usize, cols: usize, k: usize) -> Vec<f64> {
    // Work on the orientation with more rows than columns: A (m × n), m ≥ n, columns rotated.
    let tall = rows >= cols;
    let (m, n) = if tall { (rows, cols) } else { (cols, rows) };
    let mut a: Vec<f64> = if tall {
        w.iter().map(|&x| x as f64).collect()
    } else {
        (0..m * n)
            .map(|idx| w[(idx % n) * cols + idx / n] as f64)
            .collect()
    };
    let mut v = vec![0f64; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for i in 0..m {
                    let (x, y) = (a[i * n + p], a[i * n + q]);
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..m {
                    let (x, y) = (a[i * n + p], a[i * n + q]);
                    a[i * n + p] = c * x - s * y;
                    a[i * n + q] = s * x + c * y;
                }
                for i in 0..n {
                    let (x, y) = (v[i * n + p], v[i * n + q]);
                    v[i * n + p] = c * x - s * y;
                    v[i * n + q] = s * x + c * y;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    // Columns of A are σ_j·u_j; keep the k largest.
    let mut order: Vec<(f64, usize)> = (0..n)
        .map(|j| ((0..m).map(|i| a[i * n + j] * a[i * n + j]).sum::<f64>(), j))
        .collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut out = vec![0f64; m * n];
    for &(_, j) in order.iter().take(k) {
        for i in 0..m {
            let aij = a[i * n + j];
            if aij != 0.0 {
                for c in 0..n {
                    out[i * n + c] += aij * v[c * n + j];
                }
            }
        }
    }
    if tall {
        out
    } else {
        (0..rows * cols)
            .map(|idx| out[(idx % cols) * n + idx / cols])
            .collect()
    }
}

/// FRoD replaces the weight: `U = colnorm(W·V⁻ᵀ)` (float64), `W' = U·(S + diag(λ_l))·Vᵀ` with
/// the sparse `S` of its category; the update is `W' − W`.
fn frod_delta(
    src: &dyn TensorSource,
    t: &Tuner,
    out_dim: usize,
    in_dim: usize,
    w0: &[f32],
) -> Result<Vec<f32>> {
    let v = src.read_f32(role(t, "frod_V")?)?;
    let n = dims(src, role(t, "frod_V")?)?[0];
    if n != in_dim {
        return Err(Error::Options(format!(
            "FRoD: V is {n}×{n} for a weight with {in_dim} inputs"
        )));
    }
    // B = W·V⁻ᵀ: Vᵀ solves, row by row, Vᵀ·bᵢ… — as PEFT: solve(V, Wᵀ)ᵀ.
    let vm: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    let wt: Vec<f64> = (0..in_dim * out_dim)
        .map(|k| w0[(k % out_dim) * in_dim + k / out_dim] as f64)
        .collect();
    let x = solve_rect(vm, wt, n, out_dim)
        .ok_or_else(|| Error::Options("FRoD: V is singular".into()))?;
    // x is (in × out) = V⁻¹Wᵀ; B = xᵀ (out × in); U = B with unit columns.
    let mut u = vec![0f64; out_dim * in_dim];
    for c in 0..in_dim {
        let norm = (0..out_dim)
            .map(|o| x[c * out_dim + o] * x[c * out_dim + o])
            .sum::<f64>()
            .sqrt();
        for o in 0..out_dim {
            u[o * in_dim + c] = if norm > 1e-12 {
                x[c * out_dim + o] / norm
            } else {
                0.0
            };
        }
    }
    let u: Vec<f32> = u.into_iter().map(|x| x as f32).collect();
    // S + diag(λ_l), n × n.
    let size = src.read_f32(role(t, "frod_s_size")?)?;
    let m = size.first().copied().unwrap_or(0.0) as usize;
    let idx = src.read_f32(role(t, "frod_s_indices")?)?;
    let vals = src.read_f32(role(t, "frod_lambda_s_values")?)?;
    let lam = src.read_f32(role(t, "frod_lambda_l")?)?;
    let mut core = vec![0f32; m * m];
    scatter_coo(&mut core, m, m, &idx, &vals, "FRoD")?;
    for (i, l) in lam.iter().enumerate().take(m) {
        core[i * m + i] += l;
    }
    // W' = U·core·Vᵀ.
    let uc = matmul(&u, &core, out_dim, m, m);
    let vt = crate::kernels::transpose(&v, n, n);
    let w1 = matmul(&uc, &vt, out_dim, m, in_dim);
    Ok(w1.iter().zip(w0).map(|(a, b)| a - b).collect())
}

/// Solve `a · x = rhs` for a square `n×n` `a` and `k` right-hand sides (`rhs` is `n×k`), by
/// LU with partial pivoting in f64. `None` when singular.
fn solve_rect(mut a: Vec<f64>, mut rhs: Vec<f64>, n: usize, k: usize) -> Option<Vec<f64>> {
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))?;
        if a[p * n + c].abs() < 1e-300 {
            return None;
        }
        if p != c {
            for j in 0..n {
                a.swap(c * n + j, p * n + j);
            }
            for j in 0..k {
                rhs.swap(c * k + j, p * k + j);
            }
        }
        for i in c + 1..n {
            let f = a[i * n + c] / a[c * n + c];
            if f != 0.0 {
                for j in c..n {
                    a[i * n + j] -= f * a[c * n + j];
                }
                for j in 0..k {
                    rhs[i * k + j] -= f * rhs[c * k + j];
                }
            }
        }
    }
    for c in (0..n).rev() {
        for j in 0..k {
            let mut s = rhs[c * k + j];
            for q in c + 1..n {
                s -= a[c * n + q] * rhs[q * k + j];
            }
            rhs[c * k + j] = s / a[c * n + c];
        }
    }
    Some(rhs)
}

/// PEANuT: a small residual network of the base weight: `d = act(Wᵀ·Aᵀ)` (in × r), then per
/// depth an encoder `d ← act(d·E_jᵀ)` (inputs kept), then decoders `d ← act(d·D_jᵀ) + kept`,
/// and `ΔW = (s · d·Bᵀ)ᵀ`.
fn peanut_delta(
    src: &dyn TensorSource,
    t: &Tuner,
    out_dim: usize,
    in_dim: usize,
    w0: &[f32],
) -> Result<Vec<f32>> {
    let act = |x: f32| -> f32 {
        match t.param("act").unwrap_or(0.0) as u32 {
            0 => x.max(0.0),
            1 => {
                let x = x as f64;
                (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
            }
            2 => x / (1.0 + (-x).exp()),
            _ => x.tanh(),
        }
    };
    let a = src.read_f32(role(t, "peanut_A.weight")?)?;
    let r = dims(src, role(t, "peanut_A.weight")?)?[0];
    // d = act(Wᵀ · Aᵀ): (in × out) · (out × r).
    let wt = crate::kernels::transpose(w0, out_dim, in_dim);
    let at = crate::kernels::transpose(&a, r, out_dim);
    let mut d: Vec<f32> = matmul(&wt, &at, in_dim, out_dim, r)
        .into_iter()
        .map(act)
        .collect();
    let mut width = r;
    let depth = t.param("depth").unwrap_or(1.0) as usize;
    let mut kept = Vec::with_capacity(depth);
    let layer = |d: &[f32], width: usize, name: String| -> Result<(Vec<f32>, usize)> {
        let w = src.read_f32(role(t, &name)?)?;
        let wd = dims(src, role(t, &name)?)?;
        let (o, i) = (wd[0], wd[1]);
        if i != width {
            return Err(Error::Options(format!(
                "PEANuT {name} expects {i} inputs, the chain has {width}"
            )));
        }
        let wt = crate::kernels::transpose(&w, o, i);
        Ok((
            matmul(d, &wt, in_dim, i, o).into_iter().map(act).collect(),
            o,
        ))
    };
    for j in 0..depth {
        kept.push((d.clone(), width));
        (d, width) = layer(&d, width, format!("peanut_encoders.{j}.weight"))?;
    }
    for j in 0..depth {
        (d, width) = layer(&d, width, format!("peanut_decoders.{j}.weight"))?;
        let (res, rw) = &kept[depth - 1 - j];
        if *rw != width {
            return Err(Error::Options(format!(
                "PEANuT decoder {j} gives width {width}, the residual has {rw}"
            )));
        }
        d.iter_mut().zip(res).for_each(|(x, y)| *x += y);
    }
    // ΔW = (s · d · Bᵀ)ᵀ with B (out × r'): d·Bᵀ is (in × out).
    let b = src.read_f32(role(t, "peanut_B.weight")?)?;
    if b.len() != out_dim * width {
        return Err(Error::Options(format!(
            "PEANuT: peanut_B has {} values, expected {out_dim}×{width}",
            b.len()
        )));
    }
    let s = t.param("scale").unwrap_or(1.0) as f32;
    let bt = crate::kernels::transpose(&b, out_dim, width);
    let m = matmul(&d, &bt, in_dim, width, out_dim);
    Ok(crate::kernels::transpose(&m, in_dim, out_dim)
        .into_iter()
        .map(|x| x * s)
        .collect())
}

/// The error function, through the Chebyshev-fitted `erfc` approximation of Numerical Recipes
/// (fractional error below 1.2e-7, far under f32 rounding of the activations).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

/// DEFT: `ΔW = Q·(s·R − rightᵀ·W)` (PaRa: `−Q·rightᵀ·W`), with `Q = P`, `right = relu(P)` in relu
/// mode, or `Q = right =` the thin Q of a Householder QR of `P` with LAPACK's sign convention.
fn deft_delta(
    src: &dyn TensorSource,
    t: &Tuner,
    out_dim: usize,
    in_dim: usize,
    w0: &[f32],
) -> Result<Vec<f32>> {
    let p = src.read_f32(role(t, "deft_P")?)?;
    let r = dims(src, role(t, "deft_P")?)?[1];
    let (q, right) = if t.param("qr").unwrap_or(0.0) != 0.0 {
        let q = householder_thin_q(&p, out_dim, r);
        (q.clone(), q)
    } else {
        (p.clone(), p.iter().map(|x| x.max(0.0)).collect())
    };
    // fac = rightᵀ · W (r × in).
    let right_t = crate::kernels::transpose(&right, out_dim, r);
    let fac = matmul(&right_t, w0, r, out_dim, in_dim);
    let inner: Vec<f32> = if t.param("para").unwrap_or(0.0) != 0.0 {
        fac.iter().map(|x| -x).collect()
    } else {
        let rv = src.read_f32(role(t, "deft_R")?)?;
        let s = t.param("scale").unwrap_or(1.0) as f32;
        rv.iter().zip(&fac).map(|(a, b)| s * a - b).collect()
    };
    Ok(matmul(&q, &inner, out_dim, r, in_dim))
}

/// The thin `Q` (`m × n`) of a Householder QR of `a` (`m × n`, row-major), with LAPACK geqrf's
/// convention `β = −sign(α)·‖x‖`, in f64.
fn householder_thin_q(a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut r: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let mut q = vec![0f64; m * m];
    (0..m).for_each(|i| q[i * m + i] = 1.0);
    for j in 0..n.min(m) {
        let alpha = r[j * n + j];
        let xnorm = (j + 1..m)
            .map(|i| r[i * n + j] * r[i * n + j])
            .sum::<f64>()
            .sqrt();
        if xnorm == 0.0 {
            continue;
        }
        let beta = -alpha.signum() * alpha.hypot(xnorm);
        let beta = if alpha == 0.0 {
            -alpha.hypot(xnorm)
        } else {
            beta
        };
        let tau = (beta - alpha) / beta;
        // v = [1, x[1..] / (alpha − beta)].
        let mut v = vec![0f64; m - j];
        v[0] = 1.0;
        for i in j + 1..m {
            v[i - j] = r[i * n + j] / (alpha - beta);
        }
        // R ← H R on rows j.., H = I − τ v vᵀ.
        for c in 0..n {
            let d: f64 = (j..m).map(|i| v[i - j] * r[i * n + c]).sum();
            for i in j..m {
                r[i * n + c] -= tau * v[i - j] * d;
            }
        }
        // Q ← Q H on columns j...
        for row in 0..m {
            let d: f64 = (j..m).map(|i| q[row * m + i] * v[i - j]).sum();
            for i in j..m {
                q[row * m + i] -= tau * d * v[i - j];
            }
        }
    }
    (0..m)
        .flat_map(|row| (0..n).map(move |c| (row, c)))
        .map(|(row, c)| q[row * m + c] as f32)
        .collect()
}

/// SuperTuning: the values scatter-added at flat positions, plus `(α/r)·B·A` when it has LoRA
/// factors.
fn supertuning_delta(
    src: &dyn TensorSource,
    t: &Tuner,
    out_dim: usize,
    in_dim: usize,
    idx: &[f32],
) -> Result<Vec<f32>> {
    let vals = src.read_f32(role(t, "supertuning_values")?)?;
    if vals.len() != idx.len() {
        return Err(Error::Options(format!(
            "SuperTuning: {} values for {} positions",
            vals.len(),
            idx.len()
        )));
    }
    let mut delta = vec![0f32; out_dim * in_dim];
    for (&i, &v) in idx.iter().zip(&vals) {
        let i = i as usize;
        if i >= delta.len() {
            return Err(Error::Options(format!(
                "SuperTuning position {i} is outside the {out_dim}×{in_dim} weight"
            )));
        }
        delta[i] += v;
    }
    if let (Some(a), Some(b)) = (
        t.tensor("supertuning_lora_A.weight"),
        t.tensor("supertuning_lora_B.weight"),
    ) {
        let r = dims(src, a)?[0];
        let mut bv = src.read_f32(b)?;
        let s = t.param("scale").unwrap_or(1.0) as f32;
        bv.iter_mut().for_each(|x| *x *= s);
        crate::kernels::add_low_rank(&mut delta, in_dim, &bv, &src.read_f32(a)?, r);
    }
    Ok(delta)
}

/// One GLoRA path as a full `rows × cols` matrix: a low-rank `Xd·Xu`, a column vector `X (rows,1)`
/// broadcast along the row, a vector `X (rows,)`, a scalar `X (1,)`, or absent/zeros.
fn glora_path(
    src: &dyn TensorSource,
    t: &Tuner,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    if let (Some(d), Some(u)) = (
        t.tensor(&format!("{name}.Xd")),
        t.tensor(&format!("{name}.Xu")),
    ) {
        let r = dims(src, d)?[1];
        return Ok(matmul(&src.read_f32(d)?, &src.read_f32(u)?, rows, r, cols));
    }
    if let Some(x) = t.tensor(&format!("{name}.X")) {
        let v = src.read_f32(x)?;
        return Ok(match v.len() {
            1 => vec![v[0]; rows * cols],
            n if n == rows => (0..rows * cols).map(|k| v[k / cols]).collect(),
            n => {
                return Err(Error::Options(format!(
                    "GLoRA {name}.X has {n} values for a {rows}×{cols} path"
                )))
            }
        });
    }
    Ok(vec![0f32; rows * cols])
}

/// GLoRA on a weight: `(A, B)` with `W' = W + W⊙A + B`.
pub fn glora_weight(
    src: &dyn TensorSource,
    payload: &Payload,
    rows: usize,
    cols: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let Payload::Tuner(t) = payload else {
        return Err(Error::Options("not a GLoRA payload".into()));
    };
    Ok((
        glora_path(src, t, "glora_A", rows, cols)?,
        glora_path(src, t, "glora_B", rows, cols)?,
    ))
}

/// GLoRA on a bias: `(D, E + W·C)` with `b' = b + b⊙D + E + W·C`, `w0` the module's original
/// `out × in` weight.
pub fn glora_bias(
    src: &dyn TensorSource,
    payload: &Payload,
    w0: &[f32],
    out_dim: usize,
    in_dim: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let Payload::Tuner(t) = payload else {
        return Err(Error::Options("not a GLoRA payload".into()));
    };
    let d = glora_path(src, t, "glora_D", out_dim, 1)?;
    let e = glora_path(src, t, "glora_E", out_dim, 1)?;
    let c = glora_path(src, t, "glora_C", in_dim, 1)?;
    let has_c = t.tensor("glora_C.X").is_some() || t.tensor("glora_C.Xd").is_some();
    let add: Vec<f32> = (0..out_dim)
        .map(|o| {
            e[o] + if has_c {
                dot(&w0[o * in_dim..(o + 1) * in_dim], &c)
            } else {
                0.0
            }
        })
        .collect();
    Ok((d, add))
}

/// RoAd's rotation coefficients: `c1`, `c2` per output and the group size.
pub fn road_coefficients(
    src: &dyn TensorSource,
    payload: &Payload,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let Payload::Tuner(t) = payload else {
        return Err(Error::Options("not a RoAd payload".into()));
    };
    let theta = src.read_f32(role(t, "road_theta")?)?;
    let alpha = src.read_f32(role(t, "road_alpha")?)?;
    let gs = t.param("group_size").unwrap_or(64.0) as usize;
    let h = gs / 2;
    let (c1, c2): (Vec<f32>, Vec<f32>) = match t.param("variant").unwrap_or(1.0) as u32 {
        // road_1: one (θ, α) per pair, shared by both rows of the pair.
        1 => {
            let rep = |v: &[f32]| -> Vec<f32> {
                v.chunks(h.max(1))
                    .flat_map(|c| c.iter().chain(c.iter()).copied())
                    .collect()
            };
            let (t2, a2) = (rep(&theta), rep(&alpha));
            (
                t2.iter().zip(&a2).map(|(t, a)| a * t.cos()).collect(),
                t2.iter().zip(&a2).map(|(t, a)| a * t.sin()).collect(),
            )
        }
        2 => (
            theta.iter().zip(&alpha).map(|(t, a)| a * t.cos()).collect(),
            theta.iter().zip(&alpha).map(|(t, a)| a * t.sin()).collect(),
        ),
        _ => {
            // road_4: per group, the first half of θ/α gives c1, the second c2.
            let mut c1 = Vec::new();
            let mut c2 = Vec::new();
            for (tg, ag) in theta.chunks(2 * gs).zip(alpha.chunks(2 * gs)) {
                c1.extend((0..gs).map(|i| ag[i] * tg[i].cos()));
                c2.extend((0..gs).map(|i| ag[gs + i] * tg[gs + i].sin()));
            }
            (c1, c2)
        }
    };
    Ok((c1, c2, gs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn butterfly_permutations_match_peft() {
        // peft 0.21.2 BOFTLayer.block_butterfly_perm(n, b, r, n_butterfly_factor).
        assert_eq!(butterfly_perm(16, 4, 2, 1), (0..16).collect::<Vec<_>>());
        assert_eq!(butterfly_perm(32, 8, 2, 2), (0..32).collect::<Vec<_>>());
        assert_eq!(
            butterfly_perm(32, 4, 2, 2),
            vec![
                0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, 16, 17, 20, 21, 18, 19, 22,
                23, 24, 25, 28, 29, 26, 27, 30, 31
            ]
        );
        assert_eq!(butterfly_perm(8, 2, 2, 0), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn cayley_paths_are_orthogonal_and_transposed() {
        let packed = [0.03f32, -0.02, 0.05, 0.01, -0.04, 0.02];
        let b = 4;
        let exact = cayley_block(&packed, b, Cayley::Exact).unwrap();
        let series = cayley_block(&packed, b, Cayley::Neumann(30)).unwrap();
        for i in 0..b {
            for j in 0..b {
                // RᵀR = I.
                let d: f64 = (0..b).map(|k| exact[k * b + i] * exact[k * b + j]).sum();
                assert!((d - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
                // The series converges to the transpose of the exact path.
                assert!((series[i * b + j] - exact[j * b + i]).abs() < 1e-9);
            }
        }
    }
}
