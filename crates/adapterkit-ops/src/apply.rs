//! Operations with their adapter tensors loaded (`Prepared`), and their application to a block of
//! rows in f32. Every family compiles to these few primitives: a low-rank update (with DoRA), a
//! dense addition, a scaling along an axis, a replacement.

use adapterkit_core::ir::Payload;
use adapterkit_core::TensorSource;

use crate::error::Error;
use crate::error::Result;
use crate::families;
use crate::kernels::{add_low_rank, transpose};
use crate::plan::{Direction, NormAxis, OpSpec, Orientation, Plan, PlannedTensor};

/// An operation with its adapter tensors loaded as f32.
pub(crate) enum Prepared {
    LowRank {
        l: Vec<f32>,
        r: Vec<f32>,
        rank: usize,
        weight: f32,
        dora: Option<(Vec<f32>, NormAxis)>,
    },
    Add {
        delta: Vec<f32>,
        factor: f32,
    },
    Replace {
        data: Vec<f32>,
        weight: f32,
    },
    Scale {
        s: Vec<f32>,
        axis: NormAxis,
        repeat: usize,
        weight: f32,
    },
    Transform {
        t: families::RowTransform,
        transposed: bool,
        weight: f32,
    },
    ReplaceRows {
        indices: Vec<usize>,
        rows: Vec<f32>,
        weight: f32,
    },
    MissBat {
        blocks: Vec<f32>,
        r: usize,
        weight: f32,
    },
    /// `W += factor · (L₁·R₁) ⊙ (L₂·R₂)` (LoHa), computed per block.
    Hadamard {
        l1: Vec<f32>,
        r1: Vec<f32>,
        l2: Vec<f32>,
        r2: Vec<f32>,
        rank: usize,
        factor: f32,
    },
    /// `W ← W + weight·(W ⊙ M + D)` (GLoRA).
    MulAdd {
        m: Vec<f32>,
        d: Vec<f32>,
        weight: f32,
    },
    /// `W ← W + weight·(W ⊙ M)`.
    Mul {
        m: Vec<f32>,
        weight: f32,
    },
    /// `W ← W + weight·(R·W − W)`, `R[i,i] = c1[i]`, `R[i, i±h] = ∓c2[i]` within groups.
    RowMix {
        c1: Vec<f32>,
        c2: Vec<f32>,
        group: usize,
        weight: f32,
    },
    /// The inverse of a MiSS "bat" merge: `T = (T' − B_a)·(I + B_a)⁻¹` per tile.
    MissBatInverse {
        blocks: Vec<f32>,
        inverses: Vec<f32>,
        r: usize,
    },
}

/// The inverse of one merge operation (the planner refused the ones that have none).
fn invert(p: Prepared, tensor: &str) -> Result<Prepared> {
    Ok(match p {
        Prepared::LowRank {
            mut l,
            r,
            rank,
            weight,
            dora: None,
        } => {
            l.iter_mut().for_each(|x| *x = -*x);
            Prepared::LowRank {
                l,
                r,
                rank,
                weight,
                dora: None,
            }
        }
        Prepared::Add { delta, factor } => Prepared::Add {
            delta,
            factor: -factor,
        },
        Prepared::Hadamard {
            l1,
            r1,
            l2,
            r2,
            rank,
            factor,
        } => Prepared::Hadamard {
            l1,
            r1,
            l2,
            r2,
            rank,
            factor: -factor,
        },
        Prepared::Scale {
            s,
            axis,
            repeat,
            weight,
        } => {
            let mut inv = Vec::with_capacity(s.len());
            for (i, v) in s.iter().enumerate() {
                let f = 1.0 + weight * (v - 1.0);
                if f.is_nan() || f.abs() <= 1e-6 {
                    return Err(Error::IllConditioned {
                        tensor: tensor.to_string(),
                        message: format!(
                            "the IA3 scale of element {i} is {f}: the merge zeroed that row or column and it cannot be recovered"
                        ),
                    });
                }
                inv.push(1.0 / f);
            }
            Prepared::Scale {
                s: inv,
                axis,
                repeat,
                weight: 1.0,
            }
        }
        Prepared::Transform {
            t,
            transposed,
            weight,
        } => Prepared::Transform {
            t: t.inverse(),
            transposed,
            weight,
        },
        Prepared::MissBat { blocks, r, .. } => {
            let mut inverses = Vec::with_capacity(blocks.len());
            for (a, b) in blocks.chunks_exact(r * r).enumerate() {
                let m: Vec<f64> = (0..r * r)
                    .map(|k| b[k] as f64 + if k / r == k % r { 1.0 } else { 0.0 })
                    .collect();
                let inv = families::invert_square(&m, r).ok_or_else(|| Error::IllConditioned {
                    tensor: tensor.to_string(),
                    message: format!("I + B for MiSS block {a} is singular"),
                })?;
                inverses.extend(inv.iter().map(|&x| x as f32));
            }
            Prepared::MissBatInverse {
                blocks,
                inverses,
                r,
            }
        }
        Prepared::Mul { m, weight } => {
            // W' = W ⊙ (1 + w·M)  ⇒  W = W' ⊙ (1 / (1 + w·M)) = W' + W' ⊙ m'.
            let mut inv = Vec::with_capacity(m.len());
            for (i, v) in m.iter().enumerate() {
                let f = 1.0 + weight * v;
                if f.is_nan() || f.abs() <= 1e-6 {
                    return Err(Error::IllConditioned {
                        tensor: tensor.to_string(),
                        message: format!(
                            "the multiplicative factor of element {i} is {f}: the merge zeroed it"
                        ),
                    });
                }
                inv.push(1.0 / f - 1.0);
            }
            Prepared::Mul {
                m: inv,
                weight: 1.0,
            }
        }
        Prepared::LowRank { dora: Some(_), .. }
        | Prepared::Replace { .. }
        | Prepared::ReplaceRows { .. }
        | Prepared::RowMix { .. }
        | Prepared::MulAdd { .. }
        | Prepared::MissBatInverse { .. } => {
            return Err(Error::IllConditioned {
                tensor: tensor.to_string(),
                message: "this update has no inverse in this version".into(),
            })
        }
    })
}

pub(crate) fn prepare(
    plan: &Plan,
    base: &dyn TensorSource,
    t: &PlannedTensor,
) -> Result<Vec<Prepared>> {
    let (rows, cols) = t.source.rows_cols();
    let (rows, cols) = (rows as usize, cols as usize);
    let mut out = Vec::with_capacity(t.ops.len());
    for op in &t.ops {
        out.push(match op {
            OpSpec::LowRank {
                adapter,
                a,
                b,
                rank,
                orientation,
                scale,
                weight,
                magnitude,
                singular_values,
            } => {
                let src = &plan.adapters[*adapter].adapter.tensors;
                let mut a = src.read_f32(a)?;
                let b = src.read_f32(b)?;
                if let Some(e) = singular_values {
                    // AdaLoRA: A ⊙ E, E one value per rank.
                    let e = src.read_f32(e)?;
                    let width = a.len() / (*rank).max(1);
                    for (row, k) in a.chunks_exact_mut(width.max(1)).zip(&e) {
                        row.iter_mut().for_each(|x| *x *= k);
                    }
                }
                let (mut l, r) = match orientation {
                    // B is (rows × r), A is (r × cols).
                    Orientation::Normal => (b, a),
                    // A is (r × rows), B is (cols × r).
                    Orientation::Transposed => {
                        (transpose(&a, *rank, rows), transpose(&b, cols, *rank))
                    }
                };
                let dora = match magnitude {
                    Some((m, axis)) => Some((src.read_f32(m)?, *axis)),
                    None => None,
                };
                // Fold the scale into L; for plain LoRA the weight too.
                let fold = if dora.is_some() {
                    *scale
                } else {
                    scale * weight
                };
                l.iter_mut().for_each(|x| *x *= fold);
                Prepared::LowRank {
                    l,
                    r,
                    rank: *rank,
                    weight: *weight,
                    dora,
                }
            }
            OpSpec::Add {
                adapter,
                tensor,
                scale,
                weight,
            } => Prepared::Add {
                delta: plan.adapters[*adapter].adapter.tensors.read_f32(tensor)?,
                factor: scale * weight,
            },
            OpSpec::Scale {
                adapter,
                tensor,
                axis,
                repeat,
                weight,
            } => Prepared::Scale {
                s: plan.adapters[*adapter].adapter.tensors.read_f32(tensor)?,
                axis: *axis,
                repeat: *repeat,
                weight: *weight,
            },
            OpSpec::Dense {
                adapter,
                payload,
                fan_in_fan_out,
                weight,
            } => {
                let src = plan.adapters[*adapter].adapter.tensors.as_ref();
                let (out_dim, in_dim) = if *fan_in_fan_out {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                // Low-rank and Hadamard-of-low-rank updates stream through the tiled kernel
                // block by block instead of materialising ΔW.
                if let Some((mut l, mut r, k)) =
                    families::low_rank_factors(src, payload, out_dim, in_dim)?
                {
                    if *fan_in_fan_out {
                        let (lt, rt) = (transpose(&r, k, in_dim), transpose(&l, out_dim, k));
                        l = lt;
                        r = rt;
                    }
                    l.iter_mut().for_each(|x| *x *= *weight);
                    out.push(Prepared::LowRank {
                        l,
                        r,
                        rank: k,
                        weight: *weight,
                        dora: None,
                    });
                    continue;
                }
                if !*fan_in_fan_out {
                    if let Some((l1, r1, l2, r2, k, scale)) =
                        families::hadamard_factors(src, payload)?
                    {
                        out.push(Prepared::Hadamard {
                            l1,
                            r1,
                            l2,
                            r2,
                            rank: k,
                            factor: scale * *weight,
                        });
                        continue;
                    }
                }
                // A few updates depend on the base weight itself (SuperTuning's positions when
                // not saved): they get the original tensor. RandLoRA without saved bases needs the
                // largest target sizes of its adapter to regenerate them.
                let regen = matches!(payload, Payload::Tuner(tn) if tn.method == "RANDLORA" && tn.param("regen").is_some());
                let delta = if regen {
                    let (mut mo, mut mi) = (0usize, 0usize);
                    for pt in &plan.tensors {
                        for op in &pt.ops {
                            if let OpSpec::Dense { adapter: a2, payload: Payload::Tuner(t2), fan_in_fan_out: f2, .. } = op {
                                if a2 == adapter && t2.method == "RANDLORA" {
                                    let (r2, c2) = pt.source.rows_cols();
                                    let (o2, i2) = if *f2 { (c2, r2) } else { (r2, c2) };
                                    mo = mo.max(o2 as usize);
                                    mi = mi.max(i2 as usize);
                                }
                            }
                        }
                    }
                    families::randlora_regen_delta(src, payload, out_dim, in_dim, mo.max(mi), mo.min(mi))?
                } else if families::needs_base(payload) {
                    let w0 = base.read_f32(&t.source.name)?;
                    families::dense_delta_with_base(src, payload, out_dim, in_dim, &w0)?
                } else {
                    families::dense_delta(src, payload, out_dim, in_dim)?
                };
                let delta = if *fan_in_fan_out {
                    transpose(&delta, cols, rows)
                } else {
                    delta
                };
                Prepared::Add {
                    delta,
                    factor: *weight,
                }
            }
            OpSpec::Transform {
                adapter,
                payload,
                transposed,
                weight,
            } => Prepared::Transform {
                t: families::row_transform(
                    plan.adapters[*adapter].adapter.tensors.as_ref(),
                    payload,
                    if *transposed { rows } else { cols },
                )?,
                transposed: *transposed,
                weight: *weight,
            },
            OpSpec::DenseMul {
                adapter,
                payload,
                fan_in_fan_out,
                weight,
            } => {
                let src = plan.adapters[*adapter].adapter.tensors.as_ref();
                let (out_dim, in_dim) = if *fan_in_fan_out {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                let m = families::dense_delta(src, payload, out_dim, in_dim)?;
                Prepared::Mul {
                    m: if *fan_in_fan_out {
                        transpose(&m, cols, rows)
                    } else {
                        m
                    },
                    weight: *weight,
                }
            }
            OpSpec::Glora {
                adapter,
                payload,
                bias,
                weight,
            } => {
                let src = plan.adapters[*adapter].adapter.tensors.as_ref();
                let (m, d) = if *bias {
                    // The bias's W·C uses the module's original weight.
                    let weight_name = t
                        .source
                        .name
                        .strip_suffix(".bias")
                        .map(|m| format!("{m}.weight"))
                        .unwrap_or_default();
                    let winfo = base.info(&weight_name).ok_or_else(|| {
                        Error::Options(format!("GLoRA: {weight_name} not in the base"))
                    })?;
                    let (o, i) = winfo.rows_cols();
                    let w0 = base.read_f32(&weight_name)?;
                    families::glora_bias(src, payload, &w0, o as usize, i as usize)?
                } else {
                    families::glora_weight(src, payload, rows, cols)?
                };
                Prepared::MulAdd {
                    m,
                    d,
                    weight: *weight,
                }
            }
            OpSpec::RowMix {
                adapter,
                payload,
                weight,
            } => {
                let src = plan.adapters[*adapter].adapter.tensors.as_ref();
                let (c1, c2, group) = families::road_coefficients(src, payload)?;
                Prepared::RowMix {
                    c1,
                    c2,
                    group,
                    weight: *weight,
                }
            }
            OpSpec::ReplaceRows {
                adapter,
                tensor,
                indices,
                weight,
            } => Prepared::ReplaceRows {
                indices: indices.iter().map(|&i| i as usize).collect(),
                rows: in_base_dtype(
                    plan.adapters[*adapter].adapter.tensors.read_f32(tensor)?,
                    t.source.dtype,
                ),
                weight: *weight,
            },
            OpSpec::MissBat {
                adapter,
                tensor,
                weight,
            } => {
                let src = plan.adapters[*adapter].adapter.tensors.as_ref();
                let r = src.info(tensor).map(|t| t.shape[1] as usize).unwrap_or(1);
                Prepared::MissBat {
                    blocks: src.read_f32(tensor)?,
                    r,
                    weight: *weight,
                }
            }
            OpSpec::Replace {
                adapter,
                tensor,
                weight,
            } => Prepared::Replace {
                data: in_base_dtype(
                    plan.adapters[*adapter].adapter.tensors.read_f32(tensor)?,
                    t.source.dtype,
                ),
                weight: *weight,
            },
        });
    }
    if plan.direction == Direction::Unmerge {
        return out.into_iter().map(|p| invert(p, &t.source.name)).collect();
    }
    Ok(out)
}

/// Replacement values as the model holds them once loaded: rounded to the base tensor's dtype
/// (PEFT loads an adapter's saved f32 copy of a layer into the bf16/f16 model before merging).
fn in_base_dtype(mut v: Vec<f32>, dt: adapterkit_core::DType) -> Vec<f32> {
    use adapterkit_core::DType;
    match dt {
        DType::BF16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        DType::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        _ => {}
    }
    v
}

/// Apply `ops` to rows `row0..row0 + w.len()/cols` of a tensor `cols` wide. When a DoRA op needs
/// column norms, `w` must be the whole tensor.
pub(crate) fn apply_ops(
    w: &mut [f32],
    row0: usize,
    cols: usize,
    ops: &[Prepared],
    tmp: &mut Vec<f32>,
) {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    tmp.resize(cols, 0.0);
    for op in ops {
        if let Prepared::ReplaceRows {
            indices,
            rows: new_rows,
            weight,
        } = op
        {
            for (k, &i) in indices.iter().enumerate() {
                if i >= row0 && i < row0 + rows {
                    let dst = &mut w[(i - row0) * cols..(i - row0 + 1) * cols];
                    for (x, n) in dst.iter_mut().zip(&new_rows[k * cols..(k + 1) * cols]) {
                        *x += weight * (n - *x);
                    }
                }
            }
        }
        if let Prepared::Replace { data, weight } = op {
            let src = &data[row0 * cols..(row0 + rows) * cols];
            if *weight == 1.0 {
                w.copy_from_slice(src);
            } else {
                for (x, n) in w.iter_mut().zip(src) {
                    *x += weight * (n - *x);
                }
            }
        }
    }
    // DoRA norms are taken on the weight the adapters were trained on (after replacements,
    // before any update), as PEFT does when it merges several adapters into one layer.
    // V = W₀ + ΔW through the tiled kernel on a copy, then its row or column norms.
    let any_dora = ops
        .iter()
        .any(|op| matches!(op, Prepared::LowRank { dora: Some(_), .. }));
    let snapshot: Vec<f32> = if any_dora { w.to_vec() } else { Vec::new() };
    let mut norms: Vec<Option<Vec<f32>>> = Vec::with_capacity(ops.len());
    for op in ops {
        norms.push(match op {
            Prepared::LowRank {
                l,
                r,
                rank,
                dora: Some((_, axis)),
                ..
            } => {
                let mut v = snapshot.clone();
                add_low_rank(
                    &mut v,
                    cols,
                    &l[row0 * rank..(row0 + rows) * rank],
                    r,
                    *rank,
                );
                let mut acc = vec![0f64; if *axis == NormAxis::Rows { rows } else { cols }];
                for (i, row) in v.chunks_exact(cols).enumerate() {
                    match axis {
                        NormAxis::Rows => {
                            acc[i] = row.iter().map(|&a| (a as f64) * (a as f64)).sum()
                        }
                        NormAxis::Cols => {
                            for (s, &a) in acc.iter_mut().zip(row) {
                                *s += (a as f64) * (a as f64);
                            }
                        }
                    }
                }
                Some(acc.into_iter().map(|s| s.sqrt() as f32).collect())
            }
            _ => None,
        });
    }
    for (op, norm) in ops.iter().zip(&norms) {
        match op {
            Prepared::Replace { .. } | Prepared::ReplaceRows { .. } => {}
            Prepared::Hadamard {
                l1,
                r1,
                l2,
                r2,
                rank,
                factor,
            } => {
                let mut p1 = vec![0f32; rows * cols];
                let mut p2 = vec![0f32; rows * cols];
                add_low_rank(
                    &mut p1,
                    cols,
                    &l1[row0 * rank..(row0 + rows) * rank],
                    r1,
                    *rank,
                );
                add_low_rank(
                    &mut p2,
                    cols,
                    &l2[row0 * rank..(row0 + rows) * rank],
                    r2,
                    *rank,
                );
                for ((x, a), b) in w.iter_mut().zip(&p1).zip(&p2) {
                    *x += factor * a * b;
                }
            }
            Prepared::Mul { m, weight } => {
                for (x, f) in w.iter_mut().zip(&m[row0 * cols..(row0 + rows) * cols]) {
                    *x += weight * *x * f;
                }
            }
            Prepared::MulAdd { m, d, weight } => {
                let range = row0 * cols..(row0 + rows) * cols;
                for ((x, f), a) in w.iter_mut().zip(&m[range.clone()]).zip(&d[range]) {
                    *x += weight * (*x * f + a);
                }
            }
            Prepared::RowMix {
                c1,
                c2,
                group,
                weight,
            } => {
                // A vector (the bias) mixes its elements; a matrix mixes its rows.
                let (n, width) = if rows == 1 { (cols, 1) } else { (rows, cols) };
                let h = group / 2;
                let old = w.to_vec();
                for i in 0..n {
                    let p = i % group;
                    let j = if p < h { i + h } else { i - h };
                    let s = if p < h { -c2[i] } else { c2[i] };
                    for k in 0..width {
                        let mixed = c1[i] * old[i * width + k] + s * old[j * width + k];
                        w[i * width + k] =
                            old[i * width + k] + weight * (mixed - old[i * width + k]);
                    }
                }
            }
            Prepared::MissBatInverse {
                blocks,
                inverses,
                r,
            } => {
                let r = *r;
                let mut t = vec![0f32; r * r];
                for a in 0..rows / r {
                    let b = &blocks[a * r * r..(a + 1) * r * r];
                    let inv = &inverses[a * r * r..(a + 1) * r * r];
                    for c in 0..cols / r {
                        for i in 0..r {
                            for j in 0..r {
                                t[i * r + j] = w[(a * r + i) * cols + c * r + j] - b[i * r + j];
                            }
                        }
                        for i in 0..r {
                            for j in 0..r {
                                w[(a * r + i) * cols + c * r + j] =
                                    (0..r).map(|k| t[i * r + k] * inv[k * r + j]).sum();
                            }
                        }
                    }
                }
            }
            Prepared::MissBat { blocks, r, weight } => {
                // Whole tensor: tile (a, c) of size r×r becomes T + w·(T·B_a + B_a).
                let r = *r;
                let mut t = vec![0f32; r * r];
                for a in 0..rows / r {
                    let b = &blocks[a * r * r..(a + 1) * r * r];
                    for c in 0..cols / r {
                        for i in 0..r {
                            t[i * r..(i + 1) * r].copy_from_slice(
                                &w[(a * r + i) * cols + c * r..(a * r + i) * cols + c * r + r],
                            );
                        }
                        for i in 0..r {
                            for j in 0..r {
                                let tb: f32 = (0..r).map(|k| t[i * r + k] * b[k * r + j]).sum();
                                w[(a * r + i) * cols + c * r + j] += weight * (tb + b[i * r + j]);
                            }
                        }
                    }
                }
            }
            Prepared::Transform {
                t,
                transposed,
                weight,
            } => {
                let mut v = Vec::new();
                if *transposed {
                    // Columns of the whole (in, out) tensor are the input-space vectors.
                    v.resize(rows, 0.0);
                    for j in 0..cols {
                        for (i, x) in v.iter_mut().enumerate() {
                            *x = w[i * cols + j];
                        }
                        t.apply(&mut v, tmp);
                        if let Some(s) = t.output_scale() {
                            v.iter_mut().for_each(|x| *x *= s[j]);
                        }
                        for (i, x) in v.iter().enumerate() {
                            let old = w[i * cols + j];
                            w[i * cols + j] = if *weight == 1.0 {
                                *x
                            } else {
                                old + weight * (x - old)
                            };
                        }
                    }
                } else {
                    families::transform_rows(t, w, cols, row0, *weight);
                }
            }
            Prepared::Scale {
                s,
                axis,
                repeat,
                weight,
            } => {
                let f = |v: f32| 1.0 + weight * (v - 1.0);
                match axis {
                    NormAxis::Rows => {
                        for (i, row) in w.chunks_exact_mut(cols).enumerate() {
                            let k = f(s[row0 + i]);
                            row.iter_mut().for_each(|x| *x *= k);
                        }
                    }
                    NormAxis::Cols => {
                        let factors: Vec<f32> = (0..cols).map(|j| f(s[j / repeat])).collect();
                        for row in w.chunks_exact_mut(cols) {
                            for (x, k) in row.iter_mut().zip(&factors) {
                                *x *= k;
                            }
                        }
                    }
                }
            }
            Prepared::Add { delta, factor } => {
                for (x, d) in w.iter_mut().zip(&delta[row0 * cols..(row0 + rows) * cols]) {
                    *x += factor * *d;
                }
            }
            Prepared::LowRank {
                l,
                r,
                rank,
                dora: None,
                ..
            } => {
                add_low_rank(w, cols, &l[row0 * rank..(row0 + rows) * rank], r, *rank);
            }
            Prepared::LowRank {
                l,
                r,
                rank,
                weight,
                dora: Some((mag, axis)),
            } => {
                let norm = norm.as_ref().expect("norm computed for every DoRA op");
                // V = W + ΔW on the current weight; W' = (m / ‖V₀‖) ⊙ V, blended by weight.
                let mut v = w.to_vec();
                add_low_rank(
                    &mut v,
                    cols,
                    &l[row0 * rank..(row0 + rows) * rank],
                    r,
                    *rank,
                );
                for (i, (row, vrow)) in w
                    .chunks_exact_mut(cols)
                    .zip(v.chunks_exact(cols))
                    .enumerate()
                {
                    match axis {
                        NormAxis::Rows => {
                            let f = mag[row0 + i] / norm[i];
                            for (x, y) in row.iter_mut().zip(vrow) {
                                *x = if *weight == 1.0 {
                                    f * y
                                } else {
                                    *x + weight * (f * y - *x)
                                };
                            }
                        }
                        NormAxis::Cols => {
                            for (j, (x, y)) in row.iter_mut().zip(vrow).enumerate() {
                                let f = mag[j] / norm[j];
                                *x = if *weight == 1.0 {
                                    f * y
                                } else {
                                    *x + weight * (f * y - *x)
                                };
                            }
                        }
                    }
                }
            }
        }
    }
}
