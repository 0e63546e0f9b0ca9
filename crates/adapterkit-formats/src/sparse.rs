//! Sparse weight differences: selective fine-tuning stored as (index, value) pairs per tensor.
//!
//! Two layouts are read:
//! - adapterkit's own, which `extract --sparse` writes: `<tensor>.indices` (I64, row-major flat
//!   indices, ascending), `<tensor>.values` (F32, `W_ft − W_base` there) and `<tensor>.shape`
//!   (I64, the tensor's shape); `<tensor>.dense` holds a tensor tuned densely (its full new
//!   value); `__metadata__` has `"format": "adapterkit-sparse"`;
//! - LT-SFT's (composable-sft) diff layout, transcribed to safetensors: `diffs.<tensor>.index_steps`
//!   (I64: the first flat index, then the differences between consecutive ones; flat indices are
//!   **column-major**, first dimension fastest), `diffs.<tensor>.values`, `diffs.<tensor>.size`,
//!   and `abs.<tensor>` for densely tuned tensors. (composable-sft's own files are pickles, which
//!   adapterkit does not load.)
//!
//! A merge adds each value at its index (`W[i] += v`) and replaces the dense tensors. BitFit,
//! LN-only and head-only fine-tunes are sparse differences with density 1 on the tensors they
//! change.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use adapterkit_core::ir::{Adapter, Family, ModuleAdapter, Payload, Tuner};
use adapterkit_core::{DType, TensorSource};
use serde_json::Value;

use crate::memory::MemorySource;
use crate::peft::PeftAdapter;
use crate::safetensors::SafetensorsFile;
use crate::Result;

/// The `__metadata__` format tag of adapterkit's layout.
pub const FORMAT: &str = "adapterkit-sparse";

fn err(path: &Path, message: impl Into<String>) -> crate::Error {
    crate::convert::fmt_err(path, "sparse", message)
}

/// Which layout a safetensors file is in, if it is a sparse difference.
pub fn sniff(file: &SafetensorsFile) -> bool {
    let tagged = file
        .metadata()
        .is_some_and(|m| m.iter().any(|(k, v)| k == "format" && v == FORMAT));
    let lt = !file.tensors().is_empty()
        && file
            .tensors()
            .iter()
            .all(|t| t.name.starts_with("diffs.") || t.name.starts_with("abs."))
        && file
            .tensors()
            .iter()
            .any(|t| t.name.ends_with(".index_steps"));
    tagged || lt
}

fn read_i64(file: &SafetensorsFile, name: &str, path: &Path) -> Result<Vec<i64>> {
    let info = file
        .info(name)
        .ok_or_else(|| err(path, format!("{name} is missing")))?
        .clone();
    if info.dtype != DType::I64 || info.shape.len() != 1 {
        return Err(err(
            path,
            format!(
                "{name}: {} {:?}, expected a 1-D I64 tensor",
                info.dtype, info.shape
            ),
        ));
    }
    let mut raw = vec![0u8; info.len as usize];
    file.read_bytes(name, 0, &mut raw)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// One tensor's difference, normalised: row-major flat indices (ascending), values, shape.
struct Diff {
    shape: Vec<u64>,
    indices: Vec<u64>,
    values: String,
}

/// Open a sparse difference as IR.
pub fn open(path: &Path) -> Result<PeftAdapter> {
    let file = Arc::new(SafetensorsFile::open_mapped(path)?);
    let lt = !file
        .metadata()
        .is_some_and(|m| m.iter().any(|(k, v)| k == "format" && v == FORMAT));
    let mut diffs: BTreeMap<String, Diff> = BTreeMap::new();
    let mut dense: Vec<(String, String)> = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for t in file.tensors() {
        let n = &t.name;
        let (target, role) = if lt {
            if let Some(rest) = n.strip_prefix("abs.") {
                (rest.to_string(), "dense")
            } else if let Some(rest) = n.strip_prefix("diffs.") {
                match rest.rsplit_once('.') {
                    Some((t, r @ ("index_steps" | "values" | "size"))) => (t.to_string(), r),
                    _ => {
                        return Err(err(
                            path,
                            format!("tensor {n:?}: not diffs.<tensor>.index_steps|values|size"),
                        ))
                    }
                }
            } else {
                return Err(err(
                    path,
                    format!("tensor {n:?}: neither diffs.* nor abs.*"),
                ));
            }
        } else {
            match n.rsplit_once('.') {
                Some((t, r @ ("indices" | "values" | "shape" | "dense"))) => (t.to_string(), r),
                _ => {
                    return Err(err(
                        path,
                        format!("tensor {n:?}: not <tensor>.indices|values|shape|dense"),
                    ))
                }
            }
        };
        if role == "dense" {
            dense.push((target, n.clone()));
            used.insert(n.clone());
            continue;
        }
        if role != "values" {
            continue;
        }
        let prefix = if lt {
            format!("diffs.{target}")
        } else {
            target.clone()
        };
        let shape_name = if lt {
            format!("{prefix}.size")
        } else {
            format!("{prefix}.shape")
        };
        let shape: Vec<u64> = read_i64(&file, &shape_name, path)?
            .into_iter()
            .map(|d| {
                u64::try_from(d)
                    .map_err(|_| err(path, format!("{shape_name}: negative dimension {d}")))
            })
            .collect::<Result<_>>()?;
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&x| x < 1 << 48)
            .ok_or_else(|| err(path, format!("{shape_name}: shape {shape:?} is too large")))?;
        let idx_name = if lt {
            format!("{prefix}.index_steps")
        } else {
            format!("{prefix}.indices")
        };
        let raw = read_i64(&file, &idx_name, path)?;
        let vinfo = file.info(n).expect("listed").clone();
        if vinfo.shape != vec![raw.len() as u64] || !vinfo.dtype.is_float() {
            return Err(err(
                path,
                format!(
                    "{n}: {} {:?}, expected {} float values (one per index)",
                    vinfo.dtype,
                    vinfo.shape,
                    raw.len()
                ),
            ));
        }
        // Flat indices, checked, then row-major.
        let mut flat = Vec::with_capacity(raw.len());
        let mut acc: i64 = 0;
        for (k, &v) in raw.iter().enumerate() {
            let i = if lt {
                acc = acc
                    .checked_add(v)
                    .ok_or_else(|| err(path, format!("{idx_name}: index overflow")))?;
                acc
            } else {
                v
            };
            if i < 0 || i as u64 >= numel {
                return Err(err(
                    path,
                    format!("{idx_name}[{k}] = {i}: outside a tensor of {numel} elements"),
                ));
            }
            flat.push(i as u64);
        }
        if lt {
            // Column-major (first dimension fastest) → row-major.
            for f in flat.iter_mut() {
                let mut rest = *f;
                let mut coords = vec![0u64; shape.len()];
                for (c, &d) in coords.iter_mut().zip(&shape) {
                    *c = rest % d;
                    rest /= d;
                }
                *f = coords.iter().zip(&shape).fold(0u64, |a, (c, d)| a * d + c);
            }
        }
        if flat.windows(2).any(|w| w[0] == w[1]) || (!lt && flat.windows(2).any(|w| w[0] > w[1])) {
            return Err(err(
                path,
                format!("{idx_name}: indices repeat or are not ascending"),
            ));
        }
        for x in [&shape_name, &idx_name, n] {
            used.insert(x.clone());
        }
        diffs.insert(
            target,
            Diff {
                shape,
                indices: flat,
                values: n.clone(),
            },
        );
    }
    if let Some(t) = file.tensors().iter().find(|t| !used.contains(&t.name)) {
        return Err(err(
            path,
            format!(
                "tensor {:?} belongs to no difference (no values beside it)",
                t.name
            ),
        ));
    }
    let mut mem = MemorySource::over(file.clone());
    let mut modules = Vec::new();
    for (target, d) in &diffs {
        let module = target
            .rsplit_once('.')
            .map_or(target.as_str(), |(m, _)| m)
            .to_string();
        let values = file.read_f32(&d.values)?;
        if d.shape.len() == 2 {
            // Scattered at merge time, one tensor at a time: (rows, cols) as PEFT's SHiRA stores them.
            let cols = d.shape[1];
            let mut coo = Vec::with_capacity(8 * d.indices.len());
            for &i in &d.indices {
                coo.extend_from_slice(&((i / cols) as i32).to_le_bytes());
            }
            for &i in &d.indices {
                coo.extend_from_slice(&((i % cols) as i32).to_le_bytes());
            }
            let (iname, vname) = (format!("{target}·coo"), format!("{target}·values"));
            mem.insert(&iname, DType::I32, vec![2, d.indices.len() as u64], coo);
            mem.insert_f32(&vname, DType::F32, vec![values.len() as u64], &values)?;
            modules.push(ModuleAdapter {
                module,
                target: target.clone(),
                family: Family::Tuner("sparse"),
                payload: Payload::Tuner(Tuner {
                    method: "SHIRA".into(),
                    tensors: vec![
                        ("shira_weight".into(), vname),
                        ("shira_indices".into(), iname),
                    ],
                    params: Vec::new(),
                    fan_in_fan_out: false,
                }),
            });
        } else {
            // Vectors (biases, norms) and other shapes: a dense delta, small.
            let n: u64 = d.shape.iter().product();
            let mut delta = vec![0f32; n as usize];
            for (&i, v) in d.indices.iter().zip(&values) {
                delta[i as usize] = *v;
            }
            let name = format!("{target}·delta");
            mem.insert_f32(&name, DType::F32, d.shape.clone(), &delta)?;
            modules.push(ModuleAdapter {
                module,
                target: target.clone(),
                family: Family::Full,
                payload: Payload::Add {
                    tensor: name,
                    scale: 1.0,
                },
            });
        }
    }
    for (target, name) in dense {
        if diffs.contains_key(&target) {
            return Err(err(
                path,
                format!("{target}: both a sparse difference and a dense value"),
            ));
        }
        modules.push(ModuleAdapter {
            module: target
                .rsplit_once('.')
                .map_or(target.as_str(), |(m, _)| m)
                .to_string(),
            target,
            family: Family::Full,
            payload: Payload::Replace { tensor: name },
        });
    }
    let tensor_names = modules
        .iter()
        .flat_map(|m| m.payload.tensors().into_iter().map(str::to_string))
        .collect();
    let meta: serde_json::Map<String, Value> = file
        .metadata()
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Ok(PeftAdapter {
        dir: path.to_path_buf(),
        config_json: Value::Object(meta),
        adapter: Adapter {
            path: path.to_path_buf(),
            format: if lt { "lt-sft" } else { FORMAT },
            method: "SPARSE".into(),
            family: Family::Tuner("sparse"),
            base_model: None,
            modules,
            tensors: Arc::new(mem),
            tensor_names,
            shared_tensors: Vec::new(),
            notes: Vec::new(),
        },
    })
}

/// The `k` entries of `delta` with the largest magnitude (ties at the threshold to the lower
/// index), without the zeros among them: row-major indices ascending, and their values. A
/// selection (one `select_nth_unstable` over the magnitudes), not a sort.
pub fn top_k(delta: &[f32], k: usize) -> (Vec<u64>, Vec<f32>) {
    let k = k.min(delta.len());
    if k == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut mags: Vec<u32> = delta.iter().map(|v| v.abs().to_bits()).collect();
    let pos = delta.len() - k;
    let (_, &mut thr, _) = mags.select_nth_unstable(pos);
    let above = delta.iter().filter(|v| v.abs().to_bits() > thr).count();
    let mut ties_left = k - above;
    let (mut idx, mut val) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for (i, v) in delta.iter().enumerate() {
        let m = v.abs().to_bits();
        let keep = if m > thr {
            true
        } else if m == thr && ties_left > 0 {
            ties_left -= 1;
            true
        } else {
            false
        };
        if keep && *v != 0.0 {
            idx.push(i as u64);
            val.push(*v);
        }
    }
    (idx, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_index_and_drops_zeros() {
        let d = [0.5f32, -2.0, 2.0, 0.0, 1.0, -2.0];
        assert_eq!(top_k(&d, 2), (vec![1, 2], vec![-2.0, 2.0]));
        assert_eq!(top_k(&d, 3), (vec![1, 2, 5], vec![-2.0, 2.0, -2.0]));
        assert_eq!(top_k(&d, 6).0, vec![0, 1, 2, 4, 5]);
        assert_eq!(top_k(&[0.0; 4], 2).0, Vec::<u64>::new());
    }
}
