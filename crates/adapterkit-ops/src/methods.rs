//! Task-vector merge arithmetic: the sparsifiers (magnitude, random/DARE, outlier-trimming
//! "breadcrumbs", DELLA's rank-dependent sampling), sign consensus and the weighted mixes, in the
//! two dialects the field uses:
//!
//! - PEFT's `peft.utils.merge_utils` (what `add_weighted_adapter` runs): prune the unweighted
//!   tensors, majority sign of the *unweighted* pruned stack, then the weighted sum divided by the
//!   *number* of agreeing inputs ([`peft_mix`], in memory);
//! - mergekit's generalized task arithmetic: sparsify each `δᵢ = xᵢ − b` (optionally rescaled
//!   to keep its L1 norm), weight, majority sign of the *weighted* sum, divide by the sum of the
//!   agreeing *weights* when normalising, `× λ`, add the base ([`task_arithmetic`], streaming).
//!
//! Top-k selection never sorts: a two-pass radix select over the bit patterns of `|δ|` finds the
//! exact cut with 2 × 65 536 counters, so a tensor is read in row chunks and never held whole.
//! Ties at the cut are broken by element order. Random masks come from a counter-based generator
//! (SplitMix64 of seed, stream and element index), so a mask is the same however the tensor is
//! chunked, threaded or re-read.

use adapterkit_core::DType;

use crate::error::{Error, Result};

/// Rows of f32 elements per chunk target.
const CHUNK_ELEMS: usize = 1 << 15;

/// The value called `name` in a table of named methods.
pub(crate) fn by_name<T: Copy>(table: &[(&'static str, T)], name: &str) -> Option<T> {
    table.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}

/// The name of `value` in a table of named methods.
pub(crate) fn name_in<T: PartialEq>(table: &[(&'static str, T)], value: &T) -> &'static str {
    table
        .iter()
        .find(|(_, m)| m == value)
        .map(|(n, _)| *n)
        .unwrap_or("?")
}

/// How the majority sign is decided (PEFT's `majority_sign_method`, mergekit's `consensus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Majority {
    /// Sign of the sum of values (TIES's "sum"/"total").
    #[default]
    Total,
    /// Sign of the count of positive minus negative values ("frequency"/"count").
    Frequency,
}

/// A sparsifier applied to each input's task vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    /// Keep the largest `density` fraction by magnitude.
    Magnitude,
    /// Keep each element with probability `density` (DARE).
    Random,
    /// Drop the largest `gamma` fraction, then the smallest, keeping `density` (Model Breadcrumbs).
    Outliers,
    /// Per row, keep with a probability that grows with the magnitude's rank (DELLA).
    Della,
}

/// SplitMix64's finaliser.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stream of reproducible uniforms in `[0, 1)`, addressed by element index.
#[derive(Debug, Clone, Copy)]
pub struct Uniforms(u64);

impl Uniforms {
    /// The stream for `seed`, one input (`input`) and one tensor name.
    pub fn new(seed: u64, input: usize, tensor: &str) -> Self {
        let mut h = mix64(seed ^ 0x6164_6170_7465_726b);
        h = mix64(h ^ input as u64);
        for b in tensor.bytes() {
            h = mix64(h ^ b as u64);
        }
        Uniforms(h)
    }

    /// The uniform for element `i`.
    #[inline]
    pub fn at(self, i: u64) -> f64 {
        (mix64(self.0 ^ mix64(i)) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// `|x|`'s bit pattern: ordered like `|x|` for finite values.
#[inline]
fn key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The set of the `j` largest magnitudes of a tensor, ties broken by element order: elements with
/// a key above `key` are in, and so are the first `take_eq` whose key equals it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    key: u32,
    take_eq: u64,
    /// `j == 0`: nothing is in.
    empty: bool,
}

impl Cut {
    const NONE: Cut = Cut {
        key: u32::MAX,
        take_eq: 0,
        empty: true,
    };

    /// Whether an element with key `k` is in, given how many elements equal to the cut were
    /// already seen (`seen_eq`, updated).
    #[inline]
    fn contains(&self, k: u32, seen_eq: &mut u64) -> bool {
        if self.empty || k < self.key {
            false
        } else if k > self.key {
            true
        } else {
            *seen_eq += 1;
            *seen_eq <= self.take_eq
        }
    }
}

/// Two-pass radix selection of several cuts over one stream of values.
struct Radix {
    targets: Vec<u64>,
    /// Whether |x| sums are kept (for L1 rescaling).
    sums: bool,
    hi: Vec<u64>,
    hi_sum: Vec<f64>,
    /// Per target: the high bucket, count strictly above it and their |x| sum.
    bucket: Vec<(u32, u64, f64)>,
    lo: Vec<Vec<u64>>,
    lo_sum: Vec<Vec<f64>>,
}

impl Radix {
    fn new(targets: Vec<u64>, sums: bool) -> Self {
        Radix {
            targets,
            sums,
            hi: vec![0; 1 << 16],
            hi_sum: if sums { vec![0.0; 1 << 16] } else { Vec::new() },
            bucket: Vec::new(),
            lo: Vec::new(),
            lo_sum: Vec::new(),
        }
    }

    fn pass1(&mut self, xs: &[f32]) {
        if self.sums {
            for &x in xs {
                let k = key(x);
                self.hi[(k >> 16) as usize] += 1;
                self.hi_sum[(k >> 16) as usize] += x.abs() as f64;
            }
        } else {
            for &x in xs {
                self.hi[(key(x) >> 16) as usize] += 1;
            }
        }
    }

    fn end_pass1(&mut self) {
        self.bucket = self
            .targets
            .iter()
            .map(|&j| {
                let (mut above, mut sum) = (0u64, 0f64);
                for h in (0..1usize << 16).rev() {
                    if above + self.hi[h] >= j {
                        return (h as u32, above, sum);
                    }
                    above += self.hi[h];
                    sum += self.hi_sum.get(h).copied().unwrap_or(0.0);
                }
                (0, above, sum)
            })
            .collect();
        self.lo = vec![vec![0; 1 << 16]; self.targets.len()];
        let n = if self.sums { 1 << 16 } else { 0 };
        self.lo_sum = vec![vec![0.0; n]; self.targets.len()];
    }

    fn pass2(&mut self, xs: &[f32]) {
        for &x in xs {
            let k = key(x);
            for (t, &(h, _, _)) in self.bucket.iter().enumerate() {
                if k >> 16 == h {
                    self.lo[t][(k & 0xffff) as usize] += 1;
                    if self.sums {
                        self.lo_sum[t][(k & 0xffff) as usize] += x.abs() as f64;
                    }
                }
            }
        }
    }

    /// The cuts, and the |x| sum of each selected set.
    fn finish(&self) -> Vec<(Cut, f64)> {
        self.targets
            .iter()
            .enumerate()
            .map(|(t, &j)| {
                if j == 0 {
                    return (Cut::NONE, 0.0);
                }
                let (h, mut above, mut sum) = self.bucket[t];
                for l in (0..1usize << 16).rev() {
                    let c = self.lo[t][l];
                    if above + c >= j {
                        let k = (h << 16) | l as u32;
                        let take = j - above;
                        sum += take as f64 * f32::from_bits(k) as f64;
                        return (
                            Cut {
                                key: k,
                                take_eq: take,
                                empty: false,
                            },
                            sum,
                        );
                    }
                    above += c;
                    sum += self.lo_sum[t].get(l).copied().unwrap_or(0.0);
                }
                // Fewer elements than j: everything is in.
                (
                    Cut {
                        key: 0,
                        take_eq: u64::MAX,
                        empty: false,
                    },
                    sum,
                )
            })
            .collect()
    }
}

/// Rows of the inputs of one tensor merge, decoded to f32 on request. `base` may be all zeros
/// (combining adapter updates).
pub trait Rows: Sync {
    /// Number of inputs (the base not counted).
    fn inputs(&self) -> usize;
    /// Rows and columns of the tensor (a vector is one row).
    fn shape(&self) -> (usize, usize);
    /// Fill `out` with rows `row0..row0 + n` of the base.
    fn base(&self, row0: usize, n: usize, out: &mut [f32]) -> Result<()>;
    /// Fill `out` with rows `row0..row0 + n` of input `i`.
    fn input(&self, i: usize, row0: usize, n: usize, out: &mut [f32]) -> Result<()>;
}

/// Per-input parameters of a task-arithmetic merge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputParams {
    /// `weight`.
    pub weight: f64,
    /// `density` (fraction kept).
    pub density: f64,
    /// `gamma` (breadcrumbs: fraction of the largest dropped).
    pub gamma: f64,
    /// `epsilon` (DELLA: spread of keep probabilities).
    pub epsilon: f64,
}

/// A mergekit generalized-task-arithmetic merge of one tensor.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// Sparsifier, if any.
    pub sparsify: Option<Sparsify>,
    /// Sign consensus, if any.
    pub consensus: Option<Majority>,
    /// Divide by the (agreeing) weight sum.
    pub normalize: bool,
    /// Rescale each sparsified task vector to its original L1 norm.
    pub rescale: bool,
    /// `λ`.
    pub lambda: f64,
    /// One entry per input.
    pub params: Vec<InputParams>,
    /// Seed for random masks.
    pub seed: u64,
    /// Tensor name (random streams, messages).
    pub tensor: String,
    /// mergekit's working `dtype` when it is narrower than f32: inputs, task vectors, weights
    /// and every intermediate are rounded to it as mergekit's arithmetic in that dtype does.
    pub work: Option<DType>,
}

/// Round `xs` to `dt` (bf16 or f16) and back, as storing them in that dtype would.
pub fn round_to(dt: Option<DType>, xs: &mut [f32]) {
    match dt {
        Some(DType::BF16) => xs
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        Some(DType::F16) => xs
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        _ => {}
    }
}

fn round1(dt: Option<DType>, x: f64) -> f32 {
    let mut v = [x as f32];
    round_to(dt, &mut v);
    v[0]
}

/// How one input's task vector is masked, fixed before the output pass.
enum Mask {
    All,
    Nothing,
    /// Magnitude (`upper` empty) or breadcrumbs: in `lower` and not in `upper`.
    Cuts {
        lower: Cut,
        upper: Cut,
    },
    Random {
        p: f64,
        u: Uniforms,
    },
    Della {
        lo: f64,
        span: f64,
        u: Uniforms,
    },
}

struct Chunks {
    rows: usize,
    step: usize,
}

impl Chunks {
    /// Row blocks of about [`CHUNK_ELEMS`] elements (always whole rows).
    fn new(rows: usize, cols: usize) -> Self {
        let step = (CHUNK_ELEMS / cols.max(1)).max(1);
        Chunks { rows, step }
    }
    fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.rows)
            .step_by(self.step.max(1))
            .map(|r| (r, self.step.min(self.rows - r)))
    }
}

/// Scratch for one chunk: the base and every input's task vector.
struct Buffers {
    base: Vec<f32>,
    deltas: Vec<Vec<f32>>,
}

impl Buffers {
    fn new(n: usize, inputs: usize) -> Self {
        Buffers {
            base: vec![0.0; n],
            deltas: vec![vec![0.0; n]; inputs],
        }
    }

    fn load(
        &mut self,
        src: &dyn Rows,
        row0: usize,
        n: usize,
        cols: usize,
        work: Option<DType>,
    ) -> Result<()> {
        let len = n * cols;
        src.base(row0, n, &mut self.base[..len])?;
        for i in 0..src.inputs() {
            let d = &mut self.deltas[i][..len];
            src.input(i, row0, n, d)?;
            for (x, b) in d.iter_mut().zip(&self.base[..len]) {
                *x -= b;
            }
            round_to(work, d);
        }
        Ok(())
    }
}

/// DELLA's keep decisions for one row: probability `(d − ε) + 2ε·rank/(n − 1)` by ascending
/// magnitude rank (ties by element order).
fn della_row(
    row: &[f32],
    lo: f64,
    span: f64,
    u: Uniforms,
    first: u64,
    order: &mut Vec<u32>,
    keep: &mut Vec<bool>,
) {
    let n = row.len();
    order.clear();
    order.extend(0..n as u32);
    order.sort_by(|&a, &b| {
        row[a as usize]
            .abs()
            .total_cmp(&row[b as usize].abs())
            .then(a.cmp(&b))
    });
    keep.clear();
    keep.resize(n, false);
    let denom = (n.max(2) - 1) as f64;
    for (rank, &i) in order.iter().enumerate() {
        let p = lo + span * rank as f64 / denom;
        keep[i as usize] = u.at(first + i as u64) < p;
    }
}

fn check_density(tensor: &str, d: f64, what: &str) -> Result<()> {
    if !d.is_finite() {
        return Err(Error::Options(format!(
            "{tensor}: {what} {d} is not a number"
        )));
    }
    Ok(())
}

/// Run a mergekit generalized-task-arithmetic merge of one tensor. `emit(row0, rows)` receives
/// each finished chunk of output rows (`base + λ·mix`, f32) in order.
pub fn task_arithmetic(
    src: &dyn Rows,
    spec: &TaskSpec,
    emit: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let (rows, cols) = src.shape();
    let inputs = src.inputs();
    let total = (rows * cols) as u64;
    let chunks = Chunks::new(rows, cols);
    let cap = chunks.step * cols;
    let mut buf = Buffers::new(cap, inputs);

    // Decide every input's mask.
    let mut masks: Vec<Mask> = Vec::with_capacity(inputs);
    let mut radix: Vec<Option<Radix>> = Vec::with_capacity(inputs);
    for (i, p) in spec.params.iter().enumerate() {
        check_density(&spec.tensor, p.density, "density")?;
        let m = match spec.sparsify {
            None => Mask::All,
            Some(_) if p.density >= 1.0 => Mask::All,
            Some(Sparsify::Magnitude) => {
                if p.density <= 0.0 || total == 0 {
                    Mask::Nothing
                } else {
                    let k = ((p.density * total as f64) as u64).max(1);
                    radix.push(Some(Radix::new(vec![k], spec.rescale)));
                    masks.push(Mask::Cuts {
                        lower: Cut::NONE,
                        upper: Cut::NONE,
                    });
                    continue;
                }
            }
            Some(Sparsify::Outliers) => {
                let target = (p.density * total as f64) as u64;
                let n_top = (p.gamma * total as f64) as u64;
                let n_bot = total.saturating_sub(target + n_top);
                // Kept: ascending ranks [n_bot, n_bot + target) = the (total − n_bot) largest
                // minus the (total − n_bot − target) largest.
                let keep_top = total - n_bot;
                let drop_top = keep_top.saturating_sub(target);
                radix.push(Some(Radix::new(vec![keep_top, drop_top], spec.rescale)));
                masks.push(Mask::Nothing);
                continue;
            }
            Some(Sparsify::Random) => Mask::Random {
                p: p.density.max(0.0),
                u: Uniforms::new(spec.seed, i, &spec.tensor),
            },
            Some(Sparsify::Della) => {
                if p.density <= 0.0 {
                    Mask::Nothing
                } else {
                    if p.density + p.epsilon >= 1.0 || p.density - p.epsilon <= 0.0 {
                        return Err(Error::Options(format!(
                            "{}: della needs density ± epsilon inside (0, 1), got density {} and epsilon {}",
                            spec.tensor, p.density, p.epsilon
                        )));
                    }
                    Mask::Della {
                        lo: p.density - p.epsilon,
                        span: 2.0 * p.epsilon,
                        u: Uniforms::new(spec.seed, i, &spec.tensor),
                    }
                }
            }
        };
        radix.push(None);
        masks.push(m);
    }

    // Radix passes for magnitude cuts (and the L1 norms rescaling needs).
    let mut l1 = vec![0f64; inputs];
    let mut kept_l1 = vec![0f64; inputs];
    let need_radix = radix.iter().any(Option::is_some);
    let random_rescale = spec.rescale
        && masks
            .iter()
            .any(|m| matches!(m, Mask::Random { .. } | Mask::Della { .. }));
    if need_radix || random_rescale {
        let mut order = Vec::new();
        let mut keep = Vec::new();
        for (r0, n) in chunks.iter() {
            buf.load(src, r0, n, cols, spec.work)?;
            let len = n * cols;
            for i in 0..inputs {
                let d = &buf.deltas[i][..len];
                if let Some(r) = radix[i].as_mut() {
                    r.pass1(d);
                }
                if spec.rescale {
                    l1[i] += d.iter().map(|x| x.abs() as f64).sum::<f64>();
                    let first = (r0 * cols) as u64;
                    match masks[i] {
                        Mask::Random { p, u } => {
                            kept_l1[i] += d
                                .iter()
                                .enumerate()
                                .filter(|(j, _)| u.at(first + *j as u64) < p)
                                .map(|(_, x)| x.abs() as f64)
                                .sum::<f64>();
                        }
                        Mask::Della { lo, span, u } => {
                            for (rr, row) in d.chunks(cols.max(1)).enumerate() {
                                let f = first + (rr * cols) as u64;
                                della_row(row, lo, span, u, f, &mut order, &mut keep);
                                kept_l1[i] += row
                                    .iter()
                                    .zip(&keep)
                                    .filter(|(_, k)| **k)
                                    .map(|(x, _)| x.abs() as f64)
                                    .sum::<f64>();
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        if need_radix {
            for r in radix.iter_mut().flatten() {
                r.end_pass1();
            }
            for (r0, n) in chunks.iter() {
                buf.load(src, r0, n, cols, spec.work)?;
                for (r, d) in radix.iter_mut().zip(&buf.deltas) {
                    if let Some(r) = r.as_mut() {
                        r.pass2(&d[..n * cols]);
                    }
                }
            }
            for i in 0..inputs {
                if let Some(r) = &radix[i] {
                    let cuts = r.finish();
                    masks[i] = if cuts.len() == 1 {
                        kept_l1[i] = cuts[0].1;
                        Mask::Cuts {
                            lower: cuts[0].0,
                            upper: Cut::NONE,
                        }
                    } else {
                        kept_l1[i] = cuts[0].1 - cuts[1].1;
                        Mask::Cuts {
                            lower: cuts[0].0,
                            upper: cuts[1].0,
                        }
                    };
                }
            }
        }
    }
    let scale: Vec<f64> = (0..inputs)
        .map(|i| {
            let rescalable = spec.rescale && !matches!(masks[i], Mask::All | Mask::Nothing);
            if rescalable && l1[i] >= 1e-7 && kept_l1[i] >= 1e-7 {
                l1[i] / kept_l1[i]
            } else {
                1.0
            }
        })
        .collect();

    // Output pass, in f32 like mergekit's CPU path: mask, rescale and weight each task vector in
    // place, elect signs on the weighted values, mix, normalise, scale, add the base.
    let weights: Vec<f64> = spec.params.iter().map(|p| p.weight).collect();
    let mut seen_lower = vec![0u64; inputs];
    let mut seen_upper = vec![0u64; inputs];
    let mut out = vec![0f32; cap];
    let mut votes = vec![0f32; cap];
    let mut divisor = vec![0f32; cap];
    let mut order = Vec::new();
    let mut keep = Vec::new();
    let mut keeps: Vec<bool> = Vec::new();
    let flat_divisor = {
        let d: f64 = weights.iter().sum();
        if d.abs() < 1e-8 {
            1.0
        } else {
            d
        }
    };
    let lambda = spec.lambda as f32;
    for (r0, n) in chunks.iter() {
        buf.load(src, r0, n, cols, spec.work)?;
        let len = n * cols;
        let first = (r0 * cols) as u64;
        for i in 0..inputs {
            let d = &mut buf.deltas[i][..len];
            let f = if scale[i] == 1.0 {
                round1(spec.work, weights[i])
            } else {
                (weights[i] * scale[i]) as f32
            };
            match &masks[i] {
                Mask::All => d.iter_mut().for_each(|x| *x *= f),
                Mask::Nothing => d.iter_mut().for_each(|x| *x = 0.0),
                Mask::Cuts { lower, upper } if upper.empty && !lower.empty => {
                    // Top-k. Only elements equal to the cut need counting, and only the chunk
                    // where the count runs out needs it element by element.
                    let (lk, take, sl) = (lower.key, lower.take_eq, &mut seen_lower[i]);
                    let eq = d.iter().map(|x| u64::from(key(*x) == lk)).sum::<u64>();
                    if *sl >= take || *sl + eq <= take {
                        let with_eq = *sl + eq <= take;
                        for x in d.iter_mut() {
                            let k = key(*x);
                            let kept = (k > lk) | (with_eq & (k == lk));
                            *x *= f * f32::from(u8::from(kept));
                        }
                        *sl += eq;
                    } else {
                        for x in d.iter_mut() {
                            let k = key(*x);
                            let kept = if k != lk {
                                k > lk
                            } else {
                                *sl += 1;
                                *sl <= take
                            };
                            *x = if kept { *x * f } else { 0.0 };
                        }
                    }
                }
                Mask::Cuts { lower, upper } => {
                    let (sl, su) = (&mut seen_lower[i], &mut seen_upper[i]);
                    for x in d.iter_mut() {
                        let k = key(*x);
                        let kept = lower.contains(k, sl) && !upper.contains(k, su);
                        *x = if kept { *x * f } else { 0.0 };
                    }
                }
                Mask::Random { p, u } => {
                    for (j, x) in d.iter_mut().enumerate() {
                        *x = if u.at(first + j as u64) < *p {
                            *x * f
                        } else {
                            0.0
                        };
                    }
                }
                Mask::Della { lo, span, u } => {
                    keeps.clear();
                    for (rr, row) in d.chunks(cols.max(1)).enumerate() {
                        della_row(
                            row,
                            *lo,
                            *span,
                            *u,
                            first + (rr * cols) as u64,
                            &mut order,
                            &mut keep,
                        );
                        keeps.extend_from_slice(&keep);
                    }
                    for (x, kk) in d.iter_mut().zip(&keeps) {
                        *x = if *kk { *x * f } else { 0.0 };
                    }
                }
            }
        }
        if spec.work.is_some() {
            for d in buf.deltas.iter_mut() {
                round_to(spec.work, &mut d[..len]);
            }
        }
        let o = &mut out[..len];
        o.iter_mut().for_each(|x| *x = 0.0);
        match spec.consensus {
            Some(rule) => {
                let v = &mut votes[..len];
                v.iter_mut().for_each(|x| *x = 0.0);
                for d in &buf.deltas {
                    match rule {
                        Majority::Total => v.iter_mut().zip(&d[..len]).for_each(|(s, x)| *s += x),
                        Majority::Frequency => v.iter_mut().zip(&d[..len]).for_each(|(s, x)| {
                            *s += (*x > 0.0) as u8 as f32 - (*x < 0.0) as u8 as f32
                        }),
                    }
                }
                let dv = &mut divisor[..len];
                dv.iter_mut().for_each(|x| *x = 0.0);
                for (d, &w) in buf.deltas.iter().zip(&weights) {
                    let w = w as f32;
                    let (o, dv, x, v) = (&mut o[..len], &mut dv[..len], &d[..len], &v[..len]);
                    for j in 0..len {
                        // Zeros never agree. Branch-free (`&`, `|`, × 0/1) so it vectorises.
                        let (xj, sj) = (x[j], v[j]);
                        let agree = ((xj > 0.0) & (sj >= 0.0)) | ((xj < 0.0) & (sj < 0.0));
                        let a = f32::from(u8::from(agree));
                        o[j] += xj * a;
                        dv[j] += w * a;
                    }
                }
                round_to(spec.work, o);
                round_to(spec.work, dv);
                if spec.normalize {
                    for (m, dsum) in o.iter_mut().zip(dv.iter()) {
                        *m /= if *dsum == 0.0 { 1.0 } else { *dsum };
                    }
                }
            }
            None => {
                for d in &buf.deltas {
                    o.iter_mut().zip(&d[..len]).for_each(|(m, x)| *m += x);
                }
                round_to(spec.work, o);
                if spec.normalize {
                    let dv = round1(spec.work, flat_divisor);
                    o.iter_mut().for_each(|m| *m /= dv);
                }
            }
        }
        round_to(spec.work, o);
        if lambda != 1.0 {
            o.iter_mut().for_each(|m| *m *= lambda);
            round_to(spec.work, o);
        }
        for (m, b) in o.iter_mut().zip(&buf.base[..len]) {
            *m += b;
        }
        emit(r0, o)?;
    }
    Ok(())
}

#[inline]
fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// mergekit's `linear`: `Σ wᵢ·xᵢ` over the inputs (not the base), accumulated in f32 with fused
/// multiply-adds as torch's `addcmul_` does, divided by `Σ wᵢ` when `normalize`.
pub fn linear(
    src: &dyn Rows,
    weights: &[f64],
    normalize: bool,
    emit: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let (rows, cols) = src.shape();
    let chunks = Chunks::new(rows, cols);
    let cap = chunks.step * cols;
    let mut x = vec![0f32; cap];
    let mut acc = vec![0f32; cap];
    let total: f32 = weights.iter().map(|&w| w as f32).sum();
    for (r0, n) in chunks.iter() {
        let len = n * cols;
        acc[..len].iter_mut().for_each(|a| *a = 0.0);
        for (i, &w) in weights.iter().enumerate() {
            src.input(i, r0, n, &mut x[..len])?;
            let w = w as f32;
            for (a, v) in acc[..len].iter_mut().zip(&x[..len]) {
                *a = v.mul_add(w, *a);
            }
        }
        if normalize {
            acc[..len].iter_mut().for_each(|a| *a /= total);
        }
        emit(r0, &acc[..len])?;
    }
    Ok(())
}

/// mergekit's `slerp` between the base (`t = 0`) and input 0 (`t = 1`), over the whole tensor
/// flattened: linear interpolation where the normalised vectors are nearly collinear
/// (`|cos| > 0.9995`).
pub fn slerp(
    src: &dyn Rows,
    t: f64,
    emit: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let (rows, cols) = src.shape();
    let chunks = Chunks::new(rows, cols);
    let cap = chunks.step * cols;
    let mut a = vec![0f32; cap];
    let mut b = vec![0f32; cap];
    let (mut na, mut nb, mut dot) = (0f64, 0f64, 0f64);
    for (r0, n) in chunks.iter() {
        let len = n * cols;
        src.base(r0, n, &mut a[..len])?;
        src.input(0, r0, n, &mut b[..len])?;
        for (x, y) in a[..len].iter().zip(&b[..len]) {
            let (x, y) = (*x as f64, *y as f64);
            na += x * x;
            nb += y * y;
            dot += x * y;
        }
    }
    let eps = 1e-8;
    let (na, nb) = (na.sqrt(), nb.sqrt());
    let na = if na > eps { na } else { 1.0 };
    let nb = if nb > eps { nb } else { 1.0 };
    let cos = (dot / (na * nb)).clamp(-1.0, 1.0);
    let (ca, cb) = if cos.abs() > 0.9995 || rows * cols == 0 {
        (1.0 - t, t)
    } else {
        let theta = cos.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    let mut out = vec![0f32; cap];
    for (r0, n) in chunks.iter() {
        let len = n * cols;
        src.base(r0, n, &mut a[..len])?;
        src.input(0, r0, n, &mut b[..len])?;
        for ((o, x), y) in out[..len].iter_mut().zip(&a[..len]).zip(&b[..len]) {
            *o = (ca * *x as f64 + cb * *y as f64) as f32;
        }
        emit(r0, &out[..len])?;
    }
    Ok(())
}

/// mergekit's `model_stock`: `t = N·cos / (1 + (N − 1)·cos)` from the mean pairwise cosine of the
/// task vectors (over the whole tensor, or per row with `filter_wise`), then
/// `t·mean(xᵢ) + (1 − t)·b`.
pub fn model_stock(
    src: &dyn Rows,
    filter_wise: bool,
    emit: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let (rows, cols) = src.shape();
    let inputs = src.inputs();
    let chunks = Chunks::new(rows, cols);
    let cap = chunks.step * cols;
    let mut buf = Buffers::new(cap, inputs);
    let groups = if filter_wise { rows } else { 1 };
    let pairs: Vec<(usize, usize)> = (0..inputs)
        .flat_map(|a| (a + 1..inputs).map(move |b| (a, b)))
        .collect();
    // Per group: per-input squared norms and per-pair dots.
    let mut norms = vec![vec![0f64; inputs]; groups];
    let mut dots = vec![vec![0f64; pairs.len()]; groups];
    for (r0, n) in chunks.iter() {
        buf.load(src, r0, n, cols, None)?;
        for rr in 0..n {
            let g = if filter_wise { r0 + rr } else { 0 };
            let s = rr * cols..(rr + 1) * cols;
            for (nrm, d) in norms[g].iter_mut().zip(&buf.deltas) {
                *nrm += d[s.clone()]
                    .iter()
                    .map(|x| (*x as f64).powi(2))
                    .sum::<f64>();
            }
            for (p, &(a, b)) in pairs.iter().enumerate() {
                dots[g][p] += buf.deltas[a][s.clone()]
                    .iter()
                    .zip(&buf.deltas[b][s.clone()])
                    .map(|(x, y)| *x as f64 * *y as f64)
                    .sum::<f64>();
            }
        }
    }
    let count = inputs as f64;
    let ts: Vec<f64> = (0..groups)
        .map(|g| {
            let cos: f64 = pairs
                .iter()
                .enumerate()
                .map(|(p, &(a, b))| {
                    let np = norms[g][a].sqrt() * norms[g][b].sqrt();
                    (dots[g][p] / np.max(1e-6)).clamp(-1.0, 1.0)
                })
                .sum::<f64>()
                / pairs.len().max(1) as f64;
            let den = 1.0 + (count - 1.0) * cos;
            if den.abs() < 1e-6 {
                0.0
            } else {
                count * cos / den
            }
        })
        .collect();
    let mut out = vec![0f32; cap];
    let mut x = vec![0f32; cap];
    let mut sum = vec![0f64; cap];
    for (r0, n) in chunks.iter() {
        let len = n * cols;
        src.base(r0, n, &mut buf.base[..len])?;
        let avg = &mut sum[..len];
        avg.iter_mut().for_each(|a| *a = 0.0);
        for i in 0..inputs {
            src.input(i, r0, n, &mut x[..len])?;
            for (a, v) in avg.iter_mut().zip(&x[..len]) {
                *a += *v as f64;
            }
        }
        for j in 0..len {
            let t = ts[if filter_wise { r0 + j / cols.max(1) } else { 0 }];
            out[j] = (t * avg[j] / count + (1.0 - t) * buf.base[j] as f64) as f32;
        }
        emit(r0, &out[..len])?;
    }
    Ok(())
}

/// PEFT's `merge_utils` combination of in-memory task tensors (one flat slice per input, equal
/// lengths). `random` draws DARE's masks: `random(i, j)` is input `i`'s uniform for element `j`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftKind {
    /// `task_arithmetic`: `Σ wᵢ tᵢ`.
    Linear,
    /// `ties`: magnitude prune, majority sign of the unweighted stack, disjoint mean.
    Ties,
    /// `dare_linear`: random prune rescaled by `1/d`, weighted sum.
    DareLinear,
    /// `dare_ties`: random prune rescaled, majority sign, disjoint mean.
    DareTies,
    /// `magnitude_prune`: magnitude prune, weighted sum.
    MagnitudePrune,
}

/// PEFT's `magnitude_based_pruning`: keep the `int(d·n)` largest magnitudes (ties by element
/// order). `d ≥ 1` keeps everything.
pub fn peft_magnitude_prune(t: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let n = t.len();
    let k = (density * n as f64) as usize;
    if k == 0 {
        t.iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    let mut r = Radix::new(vec![k as u64], false);
    r.pass1(t);
    r.end_pass1();
    r.pass2(t);
    let (cut, _) = r.finish()[0];
    let mut seen = 0;
    for x in t.iter_mut() {
        if !cut.contains(key(*x), &mut seen) {
            *x = 0.0;
        }
    }
}

/// Combine task tensors as PEFT's `merge_utils` does (`density` ignored by `Linear`).
pub fn peft_mix(
    kind: PeftKind,
    mut tensors: Vec<Vec<f32>>,
    weights: &[f64],
    density: f64,
    majority: Majority,
    random: &dyn Fn(usize, usize) -> f64,
) -> Vec<f32> {
    let n = tensors.first().map_or(0, Vec::len);
    match kind {
        PeftKind::Ties | PeftKind::MagnitudePrune => {
            tensors
                .iter_mut()
                .for_each(|t| peft_magnitude_prune(t, density));
        }
        PeftKind::DareLinear | PeftKind::DareTies => {
            if density < 1.0 {
                // torch.bernoulli(full_like(t, d)) keeps where a uniform < d (in f32), then
                // divides by d (in f32).
                let d = density as f32;
                for (i, t) in tensors.iter_mut().enumerate() {
                    for (j, x) in t.iter_mut().enumerate() {
                        *x = if random(i, j) < d as f64 { *x / d } else { 0.0 };
                    }
                }
            }
        }
        PeftKind::Linear => {}
    }
    let ties = matches!(kind, PeftKind::Ties | PeftKind::DareTies);
    // torch's arithmetic: f32 weights, f32 products, sums over the stack in order.
    let weights: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    (0..n)
        .map(|j| {
            if !ties {
                return tensors
                    .iter()
                    .zip(&weights)
                    .fold(0f32, |acc, (t, w)| acc + t[j] * w);
            }
            let s: f32 = tensors
                .iter()
                .map(|t| match majority {
                    Majority::Total => t[j],
                    Majority::Frequency => sign(t[j] as f64) as f32,
                })
                .fold(0f32, |a, b| a + b);
            let maj = if s >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0f32, 0f32);
            for (t, w) in tensors.iter().zip(&weights) {
                if sign(t[j] as f64) == maj {
                    sum += t[j] * w;
                    count += 1.0;
                }
            }
            sum / count.max(1.0)
        })
        .collect()
}

/// In-memory [`Rows`] over dense task tensors with a zero base (combining adapter updates).
pub struct DenseRows<'a> {
    /// `rows × cols` row-major tensors, one per input.
    pub tensors: &'a [Vec<f32>],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

impl Rows for DenseRows<'_> {
    fn inputs(&self) -> usize {
        self.tensors.len()
    }
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn base(&self, _row0: usize, _n: usize, out: &mut [f32]) -> Result<()> {
        out.iter_mut().for_each(|x| *x = 0.0);
        Ok(())
    }
    fn input(&self, i: usize, row0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&self.tensors[i][row0 * self.cols..(row0 + n) * self.cols]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(spec: &TaskSpec, tensors: &[Vec<f32>], rows: usize, cols: usize) -> Vec<f32> {
        let src = DenseRows {
            tensors,
            rows,
            cols,
        };
        let mut out = Vec::new();
        task_arithmetic(&src, spec, &mut |_, o| {
            out.extend_from_slice(o);
            Ok(())
        })
        .unwrap();
        out
    }

    fn spec(sp: Option<Sparsify>, density: f64, gamma: f64) -> TaskSpec {
        TaskSpec {
            sparsify: sp,
            consensus: None,
            normalize: false,
            rescale: false,
            lambda: 1.0,
            params: vec![InputParams {
                weight: 1.0,
                density,
                gamma,
                epsilon: 0.1,
            }],
            seed: 7,
            tensor: "t".into(),
            work: None,
        }
    }

    #[test]
    fn magnitude_cut_matches_a_sort() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.37)
            .collect();
        let out = run(
            &spec(Some(Sparsify::Magnitude), 0.3, 0.0),
            std::slice::from_ref(&xs),
            10,
            100,
        );
        let mut mags: Vec<f32> = xs.iter().map(|x| x.abs()).collect();
        mags.sort_by(|a, b| b.total_cmp(a));
        let kept = out.iter().filter(|x| **x != 0.0).count();
        assert_eq!(kept, 300);
        let min_kept = out
            .iter()
            .filter(|x| **x != 0.0)
            .map(|x| x.abs())
            .fold(f32::MAX, f32::min);
        assert_eq!(min_kept, mags[299]);
    }

    #[test]
    fn ties_at_the_cut_are_taken_in_order() {
        let xs = vec![1.0f32; 10];
        let out = run(&spec(Some(Sparsify::Magnitude), 0.35, 0.0), &[xs], 1, 10);
        assert_eq!(out, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn breadcrumbs_drop_both_ends() {
        let xs: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let out = run(&spec(Some(Sparsify::Outliers), 0.5, 0.1), &[xs], 1, 100);
        // Ascending ranks [40, 90): values 41..=90 kept.
        let kept: Vec<f32> = out.iter().copied().filter(|x| *x != 0.0).collect();
        assert_eq!(kept, (41..=90).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn random_masks_keep_about_density_and_do_not_depend_on_chunking() {
        let xs = vec![1.0f32; 200_000];
        let mut s = spec(Some(Sparsify::Random), 0.3, 0.0);
        s.rescale = true;
        let a = run(&s, std::slice::from_ref(&xs), 1, 200_000);
        let b = run(&s, std::slice::from_ref(&xs), 2000, 100);
        assert_eq!(a, b);
        let kept = a.iter().filter(|x| **x != 0.0).count() as f64 / 200_000.0;
        assert!((kept - 0.3).abs() < 0.005, "{kept}");
        // L1 rescale keeps the sum.
        let sum: f64 = a.iter().map(|x| *x as f64).sum();
        assert!((sum - 200_000.0).abs() < 1.0, "{sum}");
    }

    #[test]
    fn peft_ties_divides_by_the_agreeing_count() {
        let t = vec![vec![1.0f32, -2.0], vec![3.0, 1.0]];
        let out = peft_mix(
            PeftKind::Ties,
            t,
            &[1.0, 0.5],
            1.0,
            Majority::Total,
            &|_, _| 0.0,
        );
        assert_eq!(out, [(1.0 + 1.5) / 2.0, -2.0]);
    }
}
