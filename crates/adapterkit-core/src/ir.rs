//! The adapter IR: what every format reader produces and every writer and the merge executor
//! consume.
//!
//! An [`Adapter`] is a list of [`ModuleAdapter`]s, each bound to one base tensor name and carrying
//! one family's [`Payload`] with its scale already resolved. Payload tensors are referred to by
//! name inside the adapter's own [`TensorSource`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::tensor::TensorSource;

/// The PEFT family an adapter (or one of its modules) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Family {
    /// Low-rank adaptation (plain, rsLoRA, DoRA, embedding, conv).
    Lora,
    /// AdaLoRA: SVD-parameterised low rank (`B·(A⊙E)`).
    AdaLora,
    /// IA3: learned rescaling of outputs or inputs.
    Ia3,
    /// LoHa: Hadamard product of two low-rank products.
    Loha,
    /// LoKr: Kronecker product of two (possibly low-rank) factors.
    Lokr,
    /// LN tuning: trained copies of normalisation layers.
    LnTuning,
    /// Trainable tokens: replaced rows of an embedding.
    TrainableTokens,
    /// OFT: block-diagonal orthogonal rotation of the input space.
    Oft,
    /// HRA: a chain of Householder reflections of the input space.
    Hra,
    /// VeRA: shared frozen random projections with trained per-module scaling vectors.
    Vera,
    /// FourierFT: a sparse learned spectrum, inverse-DFT'd into the update.
    FourierFt,
    /// BOFT: butterfly-factorised orthogonal rotation plus an output scaling.
    Boft,
    /// MiSS (formerly Bone): block-shared updates of the weight's column blocks.
    Miss,
    /// VB-LoRA: low-rank factors assembled from a shared vector bank.
    VbLora,
    /// A full (dense) difference of the weights (LyCORIS `full`, task vectors).
    Full,
    /// One of PEFT's newer tuners (RandLoRA, SHiRA, C3A, RoAd, DeLoRA, GraLoRA, PVeRA, BEFT,
    /// UniLoRA, HiRA), by its lowercase PEFT type.
    Tuner(&'static str),
}

impl Family {
    /// A short lowercase name ("lora").
    pub fn name(self) -> &'static str {
        match self {
            Family::Lora => "lora",
            Family::AdaLora => "adalora",
            Family::Ia3 => "ia3",
            Family::Loha => "loha",
            Family::Lokr => "lokr",
            Family::LnTuning => "ln_tuning",
            Family::TrainableTokens => "trainable_tokens",
            Family::Oft => "oft",
            Family::Hra => "hra",
            Family::Vera => "vera",
            Family::FourierFt => "fourierft",
            Family::Boft => "boft",
            Family::Miss => "miss",
            Family::VbLora => "vblora",
            Family::Full => "full",
            Family::Tuner(name) => name,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of layer a low-rank update is applied to, which fixes how `B·A` maps onto the stored
/// base tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerKind {
    /// A linear layer. With `fan_in_fan_out` the base weight is stored `(in, out)` (GPT-2's
    /// `Conv1D`), otherwise `(out, in)`.
    Linear {
        /// Whether the stored base weight is transposed.
        fan_in_fan_out: bool,
    },
    /// An embedding table `(num_embeddings, dim)`; `A` is `(r, num_embeddings)`, `B` is `(dim, r)`.
    Embedding,
    /// A convolution `(out, in, k…)`; `A` is `(r, in, k…)`, `B` is `(out, r, 1…)`.
    Conv {
        /// The kernel's spatial dimensions.
        kernel: Vec<u64>,
    },
}

/// A low-rank update `ΔW = scale · B·A`, optionally with a DoRA magnitude.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// Layer kind (how `B·A` lands on the stored tensor).
    pub layer: LayerKind,
    /// Name of the `A` ("down") tensor in the adapter's source.
    pub a: String,
    /// Name of the `B` ("up") tensor in the adapter's source.
    pub b: String,
    /// The rank `r`.
    pub rank: u64,
    /// The alpha the scale was derived from.
    pub alpha: f64,
    /// Whether the scale is rank-stabilised (`α/√r` instead of `α/r`).
    pub rslora: bool,
    /// The resolved scale applied to `B·A`.
    pub scale: f64,
    /// DoRA magnitude vector, if this is a DoRA module.
    pub magnitude: Option<String>,
    /// AdaLoRA's singular values `E` (r×1): the update is `B·(A⊙E)`.
    pub singular_values: Option<String>,
}

/// One factor of a Kronecker product.
#[derive(Debug, Clone, PartialEq)]
pub enum KronFactor {
    /// A full matrix (2-D, or 4-D for a conv factor).
    Full(String),
    /// A low-rank product `a·b`.
    Product {
        /// Left factor.
        a: String,
        /// Right factor.
        b: String,
    },
    /// A Tucker (CP) conv factor: `einsum("ijkl,ip,jr->prkl", t, a, b)`.
    Tucker {
        /// Core `(r, r, kh, kw)`.
        t: String,
        /// `(r, out)`.
        a: String,
        /// `(r, in)`.
        b: String,
    },
}

/// A LoHa update `ΔW = scale · (w1a·w1b) ⊙ (w2a·w2b)`, or its CP (effective conv) form.
#[derive(Debug, Clone, PartialEq)]
pub struct Hadamard {
    /// First pair.
    pub w1a: String,
    /// First pair, right factor.
    pub w1b: String,
    /// Second pair.
    pub w2a: String,
    /// Second pair, right factor.
    pub w2b: String,
    /// CP cores `(t1, t2)` for the effective-conv form.
    pub cp: Option<(String, String)>,
    /// Rank.
    pub rank: u64,
    /// Alpha.
    pub alpha: f64,
    /// `alpha / r`.
    pub scale: f64,
}

/// A LoKr update `ΔW = scale · kron(w1, w2)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Kronecker {
    /// Left factor.
    pub w1: KronFactor,
    /// Right factor.
    pub w2: KronFactor,
    /// Rank.
    pub rank: u64,
    /// Alpha.
    pub alpha: f64,
    /// The scale applied.
    pub scale: f64,
}

/// How an OFT block's rotation is built from its skew-symmetric generator `Q`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cayley {
    /// The truncated series `I + 2Q + 2Q² + … + Q^{n−1}` with `n` terms (PEFT's default), which
    /// approximates `(I + Q)(I − Q)⁻¹`.
    Neumann(u32),
    /// The exact `(I − Q)(I + Q)⁻¹` (the transpose of the series' limit).
    Exact,
}

/// An OFT update: `W' = W · Rᵀ` with `R` block-diagonal, each block the Cayley transform of a
/// skew-symmetric matrix packed as its strict upper triangle.
#[derive(Debug, Clone, PartialEq)]
pub struct Oft {
    /// `(blocks or 1, b(b−1)/2)` packed generators.
    pub tensor: String,
    /// Block size `b`.
    pub block_size: u64,
    /// One generator shared by every block.
    pub block_share: bool,
    /// Rotation construction.
    pub cayley: Cayley,
    /// Constrained OFT: the generator's Frobenius norm is clamped to `eps / √blocks`.
    pub coft_eps: Option<f64>,
    /// Whether the stored weight is `(in, out)`.
    pub fan_in_fan_out: bool,
    /// An embedding's rotation, applied as `W' = W · R` (over the embedding dimension) instead of
    /// a linear layer's `W · Rᵀ`.
    pub embedding: bool,
}

/// How a MiSS block updates the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissMode {
    /// `block (r, out)`: `ΔW[o, c] = block[c mod r, o]`.
    Default,
    /// `block (r, mini_r)` tiled over the outputs: `ΔW[o, c] = block[c mod r, o mod mini_r]`.
    Mini,
    /// `block (out/r, r, r)`: every `r×r` tile `T` of row block `i` becomes `T + T·B_i + B_i`.
    Bat,
}

/// One VB-LoRA factor's selection logits.
#[derive(Debug, Clone, PartialEq)]
pub enum VbLogits {
    /// Full logits `(…, num_vectors)`: top-k then softmax.
    Full(String),
    /// Saved top-k: indices `(…, k)` and the first `k − 1` softmax weights `(…, k − 1)`.
    TopK {
        /// Indices into the bank.
        indices: String,
        /// Weights, the last one implied.
        weights: String,
    },
}

/// A VB-LoRA update `ΔW = B · A`, each row tile a weighted sum of `topk` bank vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct VbLora {
    /// `A` logits `(r, in/L, …)`.
    pub a: VbLogits,
    /// `B` logits `(out/L, r, …)`.
    pub b: VbLogits,
    /// The shared bank `(num_vectors, L)`.
    pub bank: String,
    /// `topk`.
    pub topk: u64,
    /// Whether the stored weight is `(in, out)`.
    pub fan_in_fan_out: bool,
}

/// A newer PEFT tuner's module: see [`Payload::Tuner`].
#[derive(Debug, Clone, PartialEq)]
pub struct Tuner {
    /// The PEFT type (`"RANDLORA"`, `"SHIRA"`, …).
    pub method: String,
    /// `(role, tensor name)`, roles being PEFT's key suffixes (`"shira_weight"`) or shared names.
    pub tensors: Vec<(String, String)>,
    /// Numbers from the config (`"scale"`, `"group_size"`, …).
    pub params: Vec<(String, f64)>,
    /// Whether the stored weight is `(in, out)`.
    pub fan_in_fan_out: bool,
}

impl Tuner {
    /// The tensor playing `role`.
    pub fn tensor(&self, role: &str) -> Option<&str> {
        self.tensors
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, n)| n.as_str())
    }

    /// The parameter `name`.
    pub fn param(&self, name: &str) -> Option<f64> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// An HRA update: `W' = W · H`, `H = Π_i (I − 2 u_i u_iᵀ)` over the normalised columns of `u`, or
/// `I − 2UUᵀ` after Gram–Schmidt.
#[derive(Debug, Clone, PartialEq)]
pub struct Householder {
    /// `(in, r)` vectors.
    pub tensor: String,
    /// Number of reflections.
    pub rank: u64,
    /// Orthonormalise the vectors first (`apply_GS`).
    pub gram_schmidt: bool,
    /// Whether the stored weight is `(in, out)`.
    pub fan_in_fan_out: bool,
}

/// Which axis of the weight (in PEFT's `(out, in, …)` orientation) a scaling vector runs along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleAxis {
    /// One factor per output unit (rows).
    Output,
    /// One factor per input unit (columns; for convs, per input channel).
    Input,
}

/// What a module adapter does to its base tensor.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Payload {
    /// A low-rank (LoRA-family) update.
    LowRank(LowRank),
    /// Add `scale · tensor` to the base tensor (LoRA's `lora_bias`, full diffs).
    Add {
        /// Name of the delta tensor in the adapter's source.
        tensor: String,
        /// Scale applied to it.
        scale: f64,
    },
    /// Replace the base tensor (PEFT's `modules_to_save`, saved embedding layers, LN tuning).
    Replace {
        /// Name of the replacement tensor in the adapter's source.
        tensor: String,
    },
    /// Multiply the weight by a vector along one axis (IA3; also a bias when `axis` is Output).
    Scale {
        /// The vector's tensor name.
        tensor: String,
        /// The axis it scales.
        axis: ScaleAxis,
        /// Whether the stored weight is `(in, out)` (`fan_in_fan_out`).
        fan_in_fan_out: bool,
        /// With an output axis: also scale the module's bias (PEFT's IA3 scales the layer's
        /// output, bias included; LyCORIS's IA3 and rescale leave the bias alone).
        bias: bool,
    },
    /// LoHa.
    Hadamard(Hadamard),
    /// LoKr.
    Kronecker(Kronecker),
    /// OFT rotation.
    Oft(Oft),
    /// HRA reflections.
    Householder(Householder),
    /// VeRA: `ΔW = (λ_b ⊙ B[:out]) · (λ_d ⊙ A[:, :in])` with shared `A (r, max_in)`,
    /// `B (max_out, r)`.
    Vera {
        /// Shared `A`.
        a: String,
        /// Shared `B`.
        b: String,
        /// `λ_b (out,)`.
        lambda_b: String,
        /// `λ_d (r,)`.
        lambda_d: String,
        /// Whether the stored weight is `(in, out)`.
        fan_in_fan_out: bool,
    },
    /// FourierFT: `ΔW = scaling · Re(ifft2(F))` where `F` holds `spectrum` at the first
    /// `len(spectrum)` positions of `torch.randperm(out·in)` seeded with `seed`.
    Fourier {
        /// `(n_frequency,)` spectrum.
        spectrum: String,
        /// `random_loc_seed`.
        seed: u64,
        /// `scaling`.
        scaling: f64,
        /// Whether the stored weight is `(in, out)`.
        fan_in_fan_out: bool,
    },
    /// BOFT: `W' = (W · Mᵀ) ⊙ s` with `M = B_{m−1}⋯B_0`, `B_i = P_i · blockdiag(Cayley(R_i)) · P_iᵀ`
    /// and PEFT's block-butterfly permutations `P_i`.
    Butterfly {
        /// `(m, blocks, b, b)` generators.
        r: String,
        /// Output scaling `(out, 1)` or `(1, out)`.
        s: String,
        /// Whether the stored weight is `(in, out)`.
        fan_in_fan_out: bool,
    },
    /// MiSS / Bone.
    Miss {
        /// The block tensor.
        block: String,
        /// How it applies.
        mode: MissMode,
    },
    /// VB-LoRA.
    VbLora(VbLora),
    /// One of PEFT's newer tuners: its tensors by role (the suffix PEFT saves them under) and
    /// the config numbers its math needs. The math lives with the executor's family code.
    Tuner(Tuner),
    /// `W ← W + (W·U)·V`, i.e. `W·(I + U·V)`: every input-space row of the weight (PEFT's
    /// `(out, in·k…)` orientation), over the input channels at every kernel position (LyCORIS
    /// GLoRA's `W + s·W·a1·a2`: `U = a1`, `V = s·a2`).
    RightMultiply {
        /// `U (in, r)`.
        u: String,
        /// `V (r, in)`.
        v: String,
        /// Kernel positions `k…` (1 for a linear layer): the weight's rows are `(in, k…)`.
        kernel: u64,
        /// Whether the stored weight is `(in, out)`.
        fan_in_fan_out: bool,
    },
    /// A chain of permuted block transforms of the input-space rows (LyCORIS BOFT): for each
    /// stage `i`, `y = Pᵢᵀx` (`y[perm[j]] = x[j]`), every `b`-slice of `y` times its block
    /// (`y_k ← y_k·M_k`), then `x = Pᵢy` (`x[j] = y[perm[j]]`).
    Stages {
        /// `(stages, blocks, b, b)` block matrices, row-major.
        blocks: String,
        /// `(stages, n)` integer permutations.
        perms: String,
        /// Whether the stored weight is `(in, out)`.
        fan_in_fan_out: bool,
    },
    /// Replace rows `indices` of an embedding with the rows of `tensor`.
    ReplaceRows {
        /// `(len(indices), dim)` replacement rows.
        tensor: String,
        /// Row indices.
        indices: Vec<u64>,
    },
}

impl Payload {
    /// The adapter tensors this payload reads, in a fixed order.
    pub fn tensors(&self) -> Vec<&str> {
        match self {
            Payload::LowRank(lr) => {
                let mut v = vec![lr.a.as_str(), lr.b.as_str()];
                if let Some(m) = &lr.magnitude {
                    v.push(m);
                }
                if let Some(e) = &lr.singular_values {
                    v.push(e);
                }
                v
            }
            Payload::Add { tensor, .. }
            | Payload::Replace { tensor }
            | Payload::Scale { tensor, .. }
            | Payload::ReplaceRows { tensor, .. } => vec![tensor.as_str()],
            Payload::Oft(o) => vec![o.tensor.as_str()],
            Payload::RightMultiply { u, v, .. } => vec![u.as_str(), v.as_str()],
            Payload::Stages { blocks, perms, .. } => vec![blocks.as_str(), perms.as_str()],
            Payload::Vera {
                a,
                b,
                lambda_b,
                lambda_d,
                ..
            } => vec![a.as_str(), b.as_str(), lambda_b.as_str(), lambda_d.as_str()],
            Payload::Fourier { spectrum, .. } => vec![spectrum.as_str()],
            Payload::Butterfly { r, s, .. } => vec![r.as_str(), s.as_str()],
            Payload::Miss { block, .. } => vec![block.as_str()],
            Payload::Tuner(t) => t.tensors.iter().map(|(_, n)| n.as_str()).collect(),
            Payload::VbLora(v) => {
                let mut out = Vec::new();
                for l in [&v.a, &v.b] {
                    match l {
                        VbLogits::Full(x) => out.push(x.as_str()),
                        VbLogits::TopK { indices, weights } => {
                            out.extend([indices.as_str(), weights.as_str()])
                        }
                    }
                }
                out.push(v.bank.as_str());
                out
            }
            Payload::Householder(h) => vec![h.tensor.as_str()],
            Payload::Hadamard(h) => {
                let mut v = vec![
                    h.w1a.as_str(),
                    h.w1b.as_str(),
                    h.w2a.as_str(),
                    h.w2b.as_str(),
                ];
                if let Some((t1, t2)) = &h.cp {
                    v.push(t1);
                    v.push(t2);
                }
                v
            }
            Payload::Kronecker(k) => {
                let mut v = Vec::new();
                for f in [&k.w1, &k.w2] {
                    match f {
                        KronFactor::Full(x) => v.push(x.as_str()),
                        KronFactor::Product { a, b } => v.extend([a.as_str(), b.as_str()]),
                        KronFactor::Tucker { t, a, b } => {
                            v.extend([t.as_str(), a.as_str(), b.as_str()])
                        }
                    }
                }
                v
            }
        }
    }

    /// A short description of the payload kind ("lora", "dora", "bias", "replace").
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::LowRank(lr) if lr.magnitude.is_some() => "dora",
            Payload::LowRank(lr) if lr.singular_values.is_some() => "adalora",
            Payload::LowRank(_) => "lora",
            Payload::Add { .. } => "add",
            Payload::Replace { .. } => "replace",
            Payload::Scale { .. } => "scale",
            Payload::Hadamard(_) => "loha",
            Payload::Kronecker(_) => "lokr",
            Payload::ReplaceRows { .. } => "rows",
            Payload::Oft(_) => "oft",
            Payload::Vera { .. } => "vera",
            Payload::Fourier { .. } => "fourierft",
            Payload::Butterfly { .. } => "boft",
            Payload::Miss { .. } => "miss",
            Payload::Tuner(_) => "tuner",
            Payload::VbLora(_) => "vblora",
            Payload::Householder(_) => "hra",
            Payload::RightMultiply { .. } => "matmul",
            Payload::Stages { .. } => "stages",
        }
    }
}

/// One module's adapter, bound to one base tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleAdapter {
    /// The module path in the base model (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The base tensor this module adapter changes (`model.layers.0.self_attn.q_proj.weight`).
    pub target: String,
    /// The family this module belongs to.
    pub family: Family,
    /// What it does.
    pub payload: Payload,
}

/// A parsed adapter: its modules plus where their tensors come from.
#[derive(Clone)]
pub struct Adapter {
    /// The file or directory it was read from.
    pub path: PathBuf,
    /// The format it was read from ("peft").
    pub format: &'static str,
    /// The format's own name for the method (`LORA`).
    pub method: String,
    /// The family of the adapter as a whole.
    pub family: Family,
    /// The base model the adapter was trained on, when recorded.
    pub base_model: Option<String>,
    /// Module adapters, in the order the file lists them.
    pub modules: Vec<ModuleAdapter>,
    /// The tensors the payloads refer to.
    pub tensors: Arc<dyn TensorSource>,
    /// The names of every tensor in the source, so a consumer can check each is used once.
    pub tensor_names: Vec<String>,
    /// Tensors shared by several modules (VeRA's projections): used at least once instead of
    /// exactly once.
    pub shared_tensors: Vec<String>,
    /// Things the reader decided that a user should know (e.g. where the config and the tensors
    /// disagree and the tensors were followed).
    pub notes: Vec<String>,
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("method", &self.method)
            .field("modules", &self.modules.len())
            .finish_non_exhaustive()
    }
}
