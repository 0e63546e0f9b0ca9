//! The base model's real module names, for formats that flatten them (kohya, LyCORIS: `.` → `_`).
//!
//! Un-flattening is ambiguous (`to_q`, `proj_in`, `text_model` all hold underscores), so names are
//! never guessed: every module of the base is flattened and looked up. A base is one checkpoint
//! (a Hugging Face directory, a `.safetensors` file or a GGUF file) or a diffusers pipeline
//! directory whose components (`unet/`, `transformer/`, `text_encoder/`, …) are each one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// The diffusers pipeline components adapterkit knows, in the order they are looked for.
pub const COMPONENTS: &[&str] = &[
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
];

/// One model's tensors: names and shapes.
#[derive(Debug, Clone, Default)]
pub struct ModelNames {
    /// `(tensor name, row-major shape)`.
    pub tensors: Vec<(String, Vec<u64>)>,
    flat: HashMap<String, Vec<String>>,
}

impl ModelNames {
    /// Index `tensors`.
    pub fn new(tensors: Vec<(String, Vec<u64>)>) -> Self {
        let mut flat: HashMap<String, Vec<String>> = HashMap::new();
        for (name, _) in &tensors {
            if let Some(module) = name.strip_suffix(".weight") {
                flat.entry(flatten(module))
                    .or_default()
                    .push(module.to_string());
            }
        }
        ModelNames { tensors, flat }
    }

    /// The modules (paths whose `.weight` exists) that flatten to `flat`.
    pub fn unflatten(&self, flat: &str) -> &[String] {
        self.flat.get(flat).map_or(&[], Vec::as_slice)
    }

    /// The shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Option<&[u64]> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_slice())
    }

    /// Whether tensor `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.iter().any(|(n, _)| n == name)
    }
}

/// `module.path` → `module_path`.
pub fn flatten(module: &str) -> String {
    module.replace('.', "_")
}

/// A base model's names: one model (component `""`) or a pipeline's components.
#[derive(Debug, Clone, Default)]
pub struct BaseNames {
    /// Where it was read from.
    pub path: PathBuf,
    /// `(component, names)`; a single model is the one component `""`.
    pub components: Vec<(String, ModelNames)>,
    /// The architecture recorded with the base (`LlamaForCausalLM`, GGUF `llama`), if any.
    pub architecture: Option<String>,
    /// The base's `config.json` (HF) when it has one.
    pub config: Option<serde_json::Value>,
    /// Take only the modules of this pipeline component (`unet`, `transformer`, `text_encoder`,
    /// …) from adapters that cover several; the others are left out by request, and counted.
    pub only: Option<String>,
}

impl BaseNames {
    /// Read the names of `path`: a diffusers pipeline directory, a checkpoint or a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() && GgufFile::sniff(path) {
            let g = GgufFile::open(path)?;
            let names = g
                .tensors()
                .iter()
                .map(|t| (t.name.clone(), t.shape()))
                .collect();
            return Ok(BaseNames {
                path: path.to_path_buf(),
                components: vec![(String::new(), ModelNames::new(names))],
                architecture: g.get_str("general.architecture").map(str::to_string),
                config: None,
                only: None,
            });
        }
        if path.is_dir() && !has_weights(path) {
            let mut components = Vec::new();
            for c in COMPONENTS {
                let d = path.join(c);
                if d.is_dir() && has_weights(&d) {
                    components.push((c.to_string(), names_of(&Checkpoint::open(&d)?)));
                }
            }
            if !components.is_empty() {
                return Ok(BaseNames {
                    path: path.to_path_buf(),
                    components,
                    architecture: None,
                    config: None,
                    only: None,
                });
            }
        }
        let ck = Checkpoint::open(path)?;
        Ok(Self::from_checkpoint(&ck))
    }

    /// The names of an open checkpoint.
    pub fn from_checkpoint(ck: &Checkpoint) -> Self {
        BaseNames {
            path: ck.root().to_path_buf(),
            components: vec![(String::new(), names_of(ck))],
            architecture: ck.architecture(),
            config: ck.config().cloned(),
            only: None,
        }
    }

    /// The component named `c`.
    pub fn component(&self, c: &str) -> Option<&ModelNames> {
        self.components.iter().find(|(n, _)| n == c).map(|(_, m)| m)
    }

    /// Whether this is a pipeline (several named components) rather than one model.
    pub fn is_pipeline(&self) -> bool {
        !self.components.iter().any(|(c, _)| c.is_empty())
    }
}

fn has_weights(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json")
            })
        })
        .unwrap_or(false)
}

fn names_of(ck: &Checkpoint) -> ModelNames {
    ModelNames::new(
        ck.tensors()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect(),
    )
}

/// An error for a flattened name that is not in the base.
pub(crate) fn unresolved(
    path: &Path,
    format: &'static str,
    names: &[String],
    base: &Path,
) -> Error {
    let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
    Error::Format {
        path: path.to_path_buf(),
        format,
        message: format!(
            "{} module name(s) match no module of the base {} (first: {}{}); names are resolved by flattening the base's own module names, so the base must be the model the adapter was trained on (a diffusers pipeline directory, a component directory, or the original single-file checkpoint)",
            names.len(),
            base.display(),
            shown.join(", "),
            if names.len() > shown.len() { ", …" } else { "" }
        ),
    }
}
