//! `adapterkit diff`: compare two checkpoints tensor by tensor, streaming one tensor at a time.

use std::path::Path;

use adapterkit_core::TensorSource;
use adapterkit_formats::Checkpoint;
use anyhow::{bail, Context, Result};
use serde_json::json;

/// Compare `a` and `b`; with `tolerance`, fail when a tensor differs by more than that fraction of
/// its largest magnitude.
pub fn run(a: &Path, b: &Path, tolerance: Option<f64>, as_json: bool) -> Result<()> {
    let ca = Checkpoint::open(a).with_context(|| format!("opening {}", a.display()))?;
    let cb = Checkpoint::open(b).with_context(|| format!("opening {}", b.display()))?;
    let only_a: Vec<String> = ca
        .tensors()
        .filter(|t| cb.info(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    let only_b: Vec<String> = cb
        .tensors()
        .filter(|t| ca.info(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    let mut rows = Vec::new();
    let (mut worst_rel, mut worst_name) = (0f64, String::new());
    let mut mismatched = Vec::new();
    for ta in ca.tensors() {
        let Some(tb) = cb.info(&ta.name) else {
            continue;
        };
        if ta.shape != tb.shape {
            mismatched.push(format!(
                "{}: shape {:?} vs {:?}",
                ta.name, ta.shape, tb.shape
            ));
            continue;
        }
        let (max_abs, rel, identical) = if ta.dtype.is_float() && tb.dtype.is_float() {
            let x = ca.read_f32(&ta.name)?;
            let y = cb.read_f32(&ta.name)?;
            let scale = y.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let d = x.iter().zip(&y).fold(0f64, |m, (p, q)| {
                let e = (*p as f64 - *q as f64).abs();
                if e.is_nan() {
                    f64::INFINITY
                } else {
                    m.max(e)
                }
            });
            (
                d,
                if scale > 0.0 { d / scale } else { d },
                d == 0.0 && ta.dtype == tb.dtype,
            )
        } else {
            let mut x = vec![0u8; ta.len as usize];
            let mut y = vec![0u8; tb.len as usize];
            ca.read_bytes(&ta.name, 0, &mut x)?;
            cb.read_bytes(&ta.name, 0, &mut y)?;
            let same = x == y;
            (
                if same { 0.0 } else { f64::INFINITY },
                if same { 0.0 } else { f64::INFINITY },
                same,
            )
        };
        if rel > worst_rel || worst_name.is_empty() {
            worst_rel = rel;
            worst_name = ta.name.clone();
        }
        rows.push(json!({"tensor": ta.name, "dtype_a": ta.dtype.name(), "dtype_b": tb.dtype.name(), "max_abs": max_abs, "max_rel": rel, "identical": identical}));
    }
    let differing = rows.iter().filter(|r| r["identical"] == false).count();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"compared": rows.len(), "differing": differing, "only_in_a": only_a, "only_in_b": only_b,
                "shape_mismatches": mismatched, "worst": {"tensor": worst_name, "max_rel": worst_rel}, "tensors": rows})
            )?
        );
    } else {
        println!(
            "compared {} tensors: {} identical, {} differ",
            rows.len(),
            rows.len() - differing,
            differing
        );
        if !rows.is_empty() {
            println!("largest difference: {worst_rel:.3e} of the tensor's scale in {worst_name}");
        }
        for n in &only_a {
            println!("only in {}: {n}", a.display());
        }
        for n in &only_b {
            println!("only in {}: {n}", b.display());
        }
        for m in &mismatched {
            println!("shape mismatch: {m}");
        }
    }
    if !only_a.is_empty() || !only_b.is_empty() || !mismatched.is_empty() {
        bail!("the checkpoints do not hold the same tensors");
    }
    if let Some(tol) = tolerance {
        if worst_rel > tol {
            bail!(
                "{worst_name} differs by {worst_rel:.3e} of its scale, above the tolerance {tol:e}"
            );
        }
    }
    Ok(())
}
