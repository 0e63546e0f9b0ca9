//! mergekit's YAML merge recipes (`mergekit-yaml recipe.yml`), read as they are.
//!
//! Supported keys: `merge_method`, `base_model`, `models` (each `model` with optional
//! `parameters`), global `parameters`, `dtype`, `out_dtype`. A model reference is a path, or
//! `path+adapter` (mergekit's `model+lora`). A parameter is a scalar, a gradient (a list of
//! numbers interpolated over the layers), or a list of `{filter, value}` conditions: the first
//! whose `filter` is absent, `"*"`, or a substring of the tensor name applies, and its value may
//! itself be a gradient. Keys this version does not implement (`slices`, `modules`, tokenizer
//! surgery, …) are refused by name rather than ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::error::{Error, Result};

/// A parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// A number.
    Num(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

impl Scalar {
    /// As a number (booleans are 0/1), if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Num(x) => Some(*x),
            Scalar::Bool(b) => Some(f64::from(u8::from(*b))),
            Scalar::Str(s) => s.parse().ok(),
        }
    }
}

/// A parameter setting: scalar, layer gradient, or filtered conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// One value everywhere.
    Scalar(Scalar),
    /// Values spread evenly over the layers, interpolated between.
    Gradient(Vec<Scalar>),
    /// `(filter, value)` conditions, first match wins.
    Conditions(Vec<(Option<String>, Setting)>),
}

impl Setting {
    /// The value for tensor `tensor` at layer position `t` (`layer / (layers − 1)`, 0 outside
    /// the layers), or `None` when no condition matches.
    pub fn evaluate(&self, tensor: &str, t: f64) -> Option<Scalar> {
        match self {
            Setting::Scalar(s) => Some(s.clone()),
            Setting::Gradient(v) if v.is_empty() => None,
            Setting::Gradient(v) => {
                let nums: Option<Vec<f64>> = v
                    .iter()
                    .map(|s| match s {
                        Scalar::Num(x) => Some(*x),
                        _ => None,
                    })
                    .collect();
                let Some(nums) = nums else {
                    return Some(v[(t * (v.len() - 1) as f64) as usize].clone());
                };
                let scaled = t * (nums.len() - 1) as f64;
                let i0 = scaled as usize;
                let i1 = (i0 + 1).min(nums.len() - 1);
                let frac = scaled - i0 as f64;
                Some(Scalar::Num((1.0 - frac) * nums[i0] + frac * nums[i1]))
            }
            Setting::Conditions(cs) => cs
                .iter()
                .find(|(f, _)| match f.as_deref() {
                    None | Some("*") => true,
                    Some(f) => tensor.contains(f),
                })
                .and_then(|(_, v)| v.evaluate(tensor, t)),
        }
    }
}

/// A model reference: a checkpoint, optionally with a PEFT adapter applied (`model+lora`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRef {
    /// The checkpoint.
    pub model: PathBuf,
    /// The adapter.
    pub lora: Option<PathBuf>,
    /// As written.
    pub text: String,
}

/// One `models` entry (or one source of a single whole-model slice).
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeModel {
    /// The model.
    pub model: ModelRef,
    /// Its own parameters.
    pub parameters: BTreeMap<String, Setting>,
    /// `layer_range` when the entry came from `slices`: the merge checks it covers every layer.
    pub layer_range: Option<(u64, u64)>,
}

/// A parsed recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The file read.
    pub path: PathBuf,
    /// `merge_method`.
    pub merge_method: String,
    /// `base_model`.
    pub base_model: Option<ModelRef>,
    /// `models`.
    pub models: Vec<RecipeModel>,
    /// Global `parameters`.
    pub parameters: BTreeMap<String, Setting>,
    /// `dtype`: the dtype mergekit computes in.
    pub dtype: Option<String>,
    /// `out_dtype`.
    pub out_dtype: Option<String>,
}

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Recipe {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn scalar(path: &Path, key: &str, y: &Yaml) -> Result<Scalar> {
    Ok(match y {
        Yaml::Real(s) => Scalar::Num(
            s.parse()
                .map_err(|_| err(path, format!("{key}: {s:?} is not a number")))?,
        ),
        Yaml::Integer(i) => Scalar::Num(*i as f64),
        Yaml::Boolean(b) => Scalar::Bool(*b),
        Yaml::String(s) => match s.parse::<f64>() {
            // YAML 1.1 scientific notation without a dot (`1e-3`) reads as a string.
            Ok(x) => Scalar::Num(x),
            Err(_) => Scalar::Str(s.clone()),
        },
        other => {
            return Err(err(
                path,
                format!("{key}: expected a number, boolean or string, found {other:?}"),
            ))
        }
    })
}

fn setting(path: &Path, key: &str, y: &Yaml) -> Result<Setting> {
    match y {
        Yaml::Array(items) if items.iter().all(|i| !matches!(i, Yaml::Hash(_))) => {
            Ok(Setting::Gradient(
                items
                    .iter()
                    .map(|i| scalar(path, key, i))
                    .collect::<Result<_>>()?,
            ))
        }
        Yaml::Array(items) => {
            let mut conds = Vec::new();
            for i in items {
                let Yaml::Hash(h) = i else {
                    return Err(err(
                        path,
                        format!("{key}: a list mixing conditions and plain values"),
                    ));
                };
                let mut filter = None;
                let mut value = None;
                for (k, v) in h {
                    match k.as_str() {
                        Some("filter") => filter = Some(match v {
                            Yaml::String(s) => s.clone(),
                            other => return Err(err(path, format!("{key}: filter {other:?} is not a string"))),
                        }),
                        Some("value") => value = Some(setting(path, key, v)?),
                        other => return Err(err(path, format!("{key}: unknown condition key {other:?} (expected filter and value)"))),
                    }
                }
                let value = value
                    .ok_or_else(|| err(path, format!("{key}: a condition without a value")))?;
                conds.push((filter, value));
            }
            Ok(Setting::Conditions(conds))
        }
        Yaml::Hash(h) if h.keys().any(|k| k.as_str() == Some("value")) => {
            setting(path, key, &Yaml::Array(vec![y.clone()]))
        }
        other => Ok(Setting::Scalar(scalar(path, key, other)?)),
    }
}

fn parameters(path: &Path, y: &Yaml) -> Result<BTreeMap<String, Setting>> {
    let mut out = BTreeMap::new();
    match y {
        Yaml::Null | Yaml::BadValue => {}
        Yaml::Hash(h) => {
            for (k, v) in h {
                let k = k
                    .as_str()
                    .ok_or_else(|| err(path, format!("parameters: key {k:?} is not a string")))?;
                out.insert(k.to_string(), setting(path, k, v)?);
            }
        }
        other => {
            return Err(err(
                path,
                format!("parameters: expected a mapping, found {other:?}"),
            ))
        }
    }
    Ok(out)
}

fn model_ref(path: &Path, key: &str, y: &Yaml) -> Result<ModelRef> {
    let Yaml::String(s) = y else {
        return Err(err(path, format!("{key}: expected a path (or path+adapter), found {y:?}; structured model references are not supported")));
    };
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() || p.exists() {
            return p;
        }
        // mergekit resolves against the working directory; fall back to the recipe's folder.
        match path.parent() {
            Some(dir) if dir.join(&p).exists() => dir.join(&p),
            _ => p,
        }
    };
    let (model, lora) = match s.split_once('+') {
        Some((m, l)) if !Path::new(s).exists() => (resolve(m), Some(resolve(l))),
        _ => (resolve(s), None),
    };
    Ok(ModelRef {
        model,
        lora,
        text: s.clone(),
    })
}

/// The one form of `slices` that is a whole-model merge: a single slice whose sources each
/// give `model` and `layer_range` (and optional `parameters`). Ranges are checked against the
/// model once it is open ([`RecipeModel::layer_range`]).
fn whole_slice(path: &Path, v: &Yaml) -> Result<Vec<RecipeModel>> {
    let unsupported = |why: &str| {
        err(
            path,
            format!("`slices`: {why}; only one slice covering every layer of every source is supported (layer stacking / frankenmerges are not yet)"),
        )
    };
    let Yaml::Array(slices) = v else {
        return Err(unsupported("expected a list"));
    };
    if slices.len() != 1 {
        return Err(unsupported(&format!("{} slices", slices.len())));
    }
    let Yaml::Hash(slice) = &slices[0] else {
        return Err(unsupported("a slice is not a mapping"));
    };
    let mut out = Vec::new();
    for (k, sv) in slice {
        match k.as_str() {
            Some("sources") => {
                let Yaml::Array(sources) = sv else {
                    return Err(unsupported("sources is not a list"));
                };
                for (i, src) in sources.iter().enumerate() {
                    let Yaml::Hash(h) = src else {
                        return Err(unsupported("a source is not a mapping"));
                    };
                    let (mut model, mut params, mut range) = (None, BTreeMap::new(), None);
                    for (sk, x) in h {
                        match sk.as_str() {
                            Some("model") => {
                                model = Some(model_ref(
                                    path,
                                    &format!("slices[0].sources[{i}].model"),
                                    x,
                                )?)
                            }
                            Some("parameters") => params = parameters(path, x)?,
                            Some("layer_range") => {
                                let r: Vec<u64> = x
                                    .as_vec()
                                    .map(|v| {
                                        v.iter()
                                            .filter_map(|y| y.as_i64())
                                            .map(|y| y.max(0) as u64)
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                if r.len() != 2 {
                                    return Err(unsupported("layer_range is not [start, end]"));
                                }
                                range = Some((r[0], r[1]));
                            }
                            other => return Err(unsupported(&format!("source key {other:?}"))),
                        }
                    }
                    out.push(RecipeModel {
                        model: model.ok_or_else(|| unsupported("a source without `model`"))?,
                        parameters: params,
                        layer_range: Some(
                            range.ok_or_else(|| unsupported("a source without `layer_range`"))?,
                        ),
                    });
                }
            }
            other => return Err(unsupported(&format!("slice key {other:?}"))),
        }
    }
    Ok(out)
}

impl Recipe {
    /// Read and parse `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(path, &text)
    }

    /// Parse recipe text (`path` names it in messages and anchors relative paths).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let docs =
            YamlLoader::load_from_str(text).map_err(|e| err(path, format!("not YAML: {e}")))?;
        let Some(Yaml::Hash(top)) = docs.into_iter().next() else {
            return Err(err(path, "expected a mapping at the top level"));
        };
        let mut r = Recipe {
            path: path.to_path_buf(),
            merge_method: String::new(),
            base_model: None,
            models: Vec::new(),
            parameters: BTreeMap::new(),
            dtype: None,
            out_dtype: None,
        };
        let string = |k: &str, v: &Yaml| -> Result<String> {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| err(path, format!("{k}: expected a string, found {v:?}")))
        };
        for (k, v) in &top {
            let k = k
                .as_str()
                .ok_or_else(|| err(path, format!("key {k:?} is not a string")))?;
            match k {
                "merge_method" => r.merge_method = string(k, v)?,
                "base_model" => r.base_model = Some(model_ref(path, k, v)?),
                "dtype" => r.dtype = Some(string(k, v)?),
                "out_dtype" => r.out_dtype = Some(string(k, v)?),
                "parameters" => r.parameters = parameters(path, v)?,
                "models" => {
                    let Yaml::Array(items) = v else {
                        return Err(err(path, "models: expected a list"));
                    };
                    for (i, item) in items.iter().enumerate() {
                        let Yaml::Hash(h) = item else {
                            return Err(err(path, format!("models[{i}]: expected a mapping with `model`")));
                        };
                        let mut model = None;
                        let mut params = BTreeMap::new();
                        for (mk, mv) in h {
                            match mk.as_str() {
                                Some("model") => model = Some(model_ref(path, &format!("models[{i}].model"), mv)?),
                                Some("parameters") => params = parameters(path, mv)?,
                                other => {
                                    return Err(err(path, format!("models[{i}]: key {other:?} is not supported (expected model and parameters)")))
                                }
                            }
                        }
                        r.models.push(RecipeModel {
                            model: model.ok_or_else(|| err(path, format!("models[{i}]: no `model`")))?,
                            parameters: params,
                            layer_range: None,
                        });
                    }
                }
                "name" | "chat_template" if v.is_null() => {}
                "slices" => r.models = whole_slice(path, v)?,
                "modules" => {
                    return Err(err(path, "`modules` (per-module recipes) is not supported yet; use `models` with `base_model`"))
                }
                "tokenizer_source" | "tokenizer" => {
                    return Err(err(path, format!("`{k}` (tokenizer surgery) is not supported yet; the output keeps the base's tokenizer files")))
                }
                other => return Err(err(path, format!("`{other}` is not a key adapterkit supports in a recipe (supported: merge_method, base_model, models, parameters, dtype, out_dtype)"))),
            }
        }
        if r.merge_method.is_empty() {
            return Err(err(path, "no merge_method"));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_and_filters_resolve_like_mergekit() {
        let r = Recipe::parse(
            Path::new("r.yml"),
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a+l\n    parameters:\n      weight: [0.2, 0.8]\n      density:\n        - filter: mlp\n          value: 0.7\nparameters:\n  density: 0.5\n",
        )
        .unwrap();
        assert_eq!(r.models[0].model.lora.as_deref(), Some(Path::new("l")));
        let w = &r.models[0].parameters["weight"];
        assert_eq!(w.evaluate("x", 0.0), Some(Scalar::Num(0.2)));
        assert_eq!(w.evaluate("x", 0.5), Some(Scalar::Num(0.5)));
        let d = &r.models[0].parameters["density"];
        assert_eq!(d.evaluate("layers.0.mlp.up", 0.0), Some(Scalar::Num(0.7)));
        assert_eq!(d.evaluate("layers.0.self_attn.q", 0.0), None);
    }

    #[test]
    fn unsupported_keys_are_named() {
        let e = Recipe::parse(Path::new("r.yml"), "merge_method: slerp\nslices: []\n").unwrap_err();
        assert!(e.to_string().contains("`slices`"), "{e}");
    }
}
