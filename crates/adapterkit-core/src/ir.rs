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
}

impl Family {
    /// A short lowercase name ("lora").
    pub fn name(self) -> &'static str {
        match self {
            Family::Lora => "lora",
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
    /// Replace the base tensor (PEFT's `modules_to_save`, saved embedding layers).
    Replace {
        /// Name of the replacement tensor in the adapter's source.
        tensor: String,
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
                v
            }
            Payload::Add { tensor, .. } | Payload::Replace { tensor } => vec![tensor.as_str()],
        }
    }

    /// A short description of the payload kind ("lora", "dora", "bias", "replace").
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::LowRank(lr) if lr.magnitude.is_some() => "dora",
            Payload::LowRank(_) => "lora",
            Payload::Add { .. } => "add",
            Payload::Replace { .. } => "replace",
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
