//! `combine` against PEFT 0.21.2's own `add_weighted_adapter` (`fixtures/combine`, made by its
//! `generate.py`): `--compat peft` writes PEFT's files (factor for factor; products for the SVD
//! types, whose singular-vector signs are LAPACK's), refuses what PEFT refuses or would write
//! broken, and the default exact mode's products equal the ΔW-space reference (`delta`, what
//! PEFT's `*_svd` types factorise) for every case.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use adapterkit_core::TensorSource;
use adapterkit_formats::safetensors::SafetensorsFile;
use common::{failed, fixtures, manifest, ok, run};
use serde_json::Value;

fn fx(rel: &str) -> PathBuf {
    fixtures("combine").join(rel)
}

fn args_for(c: &Value, method: &str, extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = vec!["combine".into()];
    for a in c["adapter_dirs"].as_array().unwrap() {
        v.push(fx(a.as_str().unwrap()).display().to_string());
    }
    let w: Vec<String> = c["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap().to_string())
        .collect();
    v.push(format!("--weights={}", w.join(",")));
    v.push(format!("--method={method}"));
    if let Some(d) = c["density"].as_f64() {
        v.push(format!("--density={d}"));
    }
    v.push(format!(
        "--majority={}",
        c["majority_sign_method"].as_str().unwrap_or("total")
    ));
    v.extend(extra.iter().cloned());
    v
}

fn combine(args: &[String], out: &Path) -> std::process::Output {
    let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|s| s as _).collect();
    a.push(&"-o");
    a.push(&out);
    run(&a)
}

fn tensors(dir: &Path) -> SafetensorsFile {
    SafetensorsFile::open(dir.join("adapter_model.safetensors")).unwrap()
}

fn matmul(b: &[f32], a: &[f32], rows: usize, k: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; rows * cols];
    for i in 0..rows {
        for t in 0..k {
            let x = b[i * k + t] as f64;
            for j in 0..cols {
                out[i * cols + j] += x * a[t * cols + j] as f64;
            }
        }
    }
    out
}

/// `scale·B·A` of every module of a PEFT LoRA directory, by module name.
fn products(dir: &Path) -> Vec<(String, Vec<f64>)> {
    products_as(dir, None)
}

/// [`products`], with `use_rslora` overridden.
fn products_as(dir: &Path, rslora: Option<bool>) -> Vec<(String, Vec<f64>)> {
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let r = cfg["r"].as_f64().unwrap();
    let alpha = cfg["lora_alpha"].as_f64().unwrap();
    let rank_pattern = cfg["rank_pattern"].as_object().cloned().unwrap_or_default();
    let alpha_pattern = cfg["alpha_pattern"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let rs = rslora.unwrap_or(cfg["use_rslora"].as_bool().unwrap_or(false));
    let f = tensors(dir);
    let mut out = Vec::new();
    for t in f.tensors() {
        let (prefix, bn) = if let Some(p) = t.name.strip_suffix(".lora_A.weight") {
            (p, format!("{p}.lora_B.weight"))
        } else if let Some(p) = t.name.strip_suffix(".lora_embedding_A") {
            (p, format!("{p}.lora_embedding_B"))
        } else {
            continue;
        };
        let module = prefix.trim_start_matches("base_model.model.").to_string();
        let a = f.read_f32(&t.name).unwrap();
        let b = f.read_f32(&bn).unwrap();
        let rows = f.info(&bn).unwrap().shape[0] as usize;
        let k = t.shape[0] as usize;
        let cols = a.len() / k.max(1);
        let rr = rank_pattern
            .get(&module)
            .and_then(Value::as_f64)
            .unwrap_or(r);
        let al = alpha_pattern
            .get(&module)
            .and_then(Value::as_f64)
            .unwrap_or(alpha);
        let s = if rs { al / rr.sqrt() } else { al / rr };
        let mut p = matmul(&b, &a, rows, k, cols);
        p.iter_mut().for_each(|x| *x *= s);
        out.push((module, p));
    }
    out
}

/// Largest |x − y| over a module's product, relative to the largest |y| of all modules.
fn compare_products(got: &[(String, Vec<f64>)], want: &[(String, Vec<f64>)]) -> f64 {
    let scale = want
        .iter()
        .flat_map(|(_, v)| v.iter())
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(1e-30);
    let got_names: BTreeSet<&String> = got.iter().map(|(m, _)| m).collect();
    let want_names: BTreeSet<&String> = want.iter().map(|(m, _)| m).collect();
    assert_eq!(got_names, want_names, "modules differ");
    let mut worst = 0f64;
    for (m, w) in want {
        let g = &got.iter().find(|(n, _)| n == m).unwrap().1;
        assert_eq!(g.len(), w.len(), "{m}: shape");
        for (x, y) in g.iter().zip(w) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    worst
}

fn delta_products(c: &Value) -> Vec<(String, Vec<f64>)> {
    let f = SafetensorsFile::open(fx(c["delta"].as_str().unwrap())).unwrap();
    f.tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                f.read_f32(&t.name)
                    .unwrap()
                    .iter()
                    .map(|&x| x as f64)
                    .collect(),
            )
        })
        .collect()
}

fn is_svd(kind: &str) -> bool {
    kind == "svd" || kind.ends_with("_svd")
}

/// `svd_clamp` clips by a quantile of `U·S` and `Vᵀ` together, which depends on the signs LAPACK
/// gives each singular vector: not reproducible by another SVD, and not offered.
fn sign_dependent(c: &Value) -> bool {
    !c["svd_clamp"].is_null()
}

#[test]
fn compat_peft_writes_what_add_weighted_adapter_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for c in manifest("combine") {
        let name = c["name"].as_str().unwrap();
        let kind = c["combination_type"].as_str().unwrap();
        if c["peft"].is_null() || c["peft_output_broken"] == true || sign_dependent(&c) {
            continue;
        }
        let mut extra = vec!["--compat=peft".to_string()];
        if let Some(seed) = c["torch_manual_seed"].as_u64() {
            // torch.manual_seed right before the call: DARE's masks are torch's own draws.
            extra.push(format!("--seed={seed}"));
        }
        if let Some(r) = c["svd_rank"].as_u64() {
            extra.push(format!("--rank={r}"));
        }
        let out = tmp.path().join(name);
        let o = combine(&args_for(&c, kind, &extra), &out);
        ok(&o);
        let want_dir = fx(c["peft"].as_str().unwrap());
        // Config: PEFT's rank rules and the first adapter's other fields.
        let got: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let want: Value = serde_json::from_str(
            &std::fs::read_to_string(want_dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for k in [
            "r",
            "lora_alpha",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
        ] {
            assert_eq!(got[k], want[k], "{name}: {k}");
        }
        let set = |v: &Value| -> Value {
            match v.as_array() {
                Some(a) => {
                    let mut s: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
                    s.sort();
                    serde_json::json!(s)
                }
                None => v.clone(),
            }
        };
        assert_eq!(
            set(&got["target_modules"]),
            set(&want["target_modules"]),
            "{name}: target_modules"
        );
        if is_svd(kind) && c["adapters"].as_array().unwrap().len() > 1 {
            // Factors are U·S and Vᵀ: equal up to each singular vector's sign.
            let err = compare_products(&products(&out), &products(&want_dir));
            assert!(err < 1e-5, "{name}: products differ by {err:e}");
        } else {
            let (g, w) = (tensors(&out), tensors(&want_dir));
            let gn: BTreeSet<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
            let wn: BTreeSet<&str> = w.tensors().iter().map(|t| t.name.as_str()).collect();
            assert_eq!(gn, wn, "{name}: tensor names");
            for t in w.tensors() {
                assert_eq!(
                    g.info(&t.name).unwrap().shape,
                    t.shape,
                    "{name}: {}",
                    t.name
                );
                let (x, y) = (g.read_f32(&t.name).unwrap(), w.read_f32(&t.name).unwrap());
                let worst = x
                    .iter()
                    .zip(&y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                // Same arithmetic in the same order: bit for bit.
                assert!(worst == 0.0, "{name}: {} differs by {worst:e}", t.name);
            }
        }
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} cases checked");
}

#[test]
fn compat_peft_refuses_what_peft_refuses_or_writes_broken() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for c in manifest("combine") {
        let name = c["name"].as_str().unwrap();
        if !(c["error"].is_string() || c["peft_output_broken"] == true) {
            continue;
        }
        let mut extra = vec!["--compat=peft".to_string()];
        if let Some(r) = c["svd_rank"].as_u64() {
            extra.push(format!("--rank={r}"));
        }
        let out = tmp.path().join(name);
        let kind = c["combination_type"].as_str().unwrap();
        let err = failed(&combine(&args_for(&c, kind, &extra), &out));
        assert!(!out.exists(), "{name}: output left behind");
        assert!(err.len() > 20, "{name}: {err}");
        checked += 1;
    }
    assert!(checked >= 8, "only {checked}");
}

/// The exact mode: `cat`/`linear` write `Σ wᵢ ΔWᵢ` as concatenated factors (rank Σrᵢ), the
/// sparsifying methods' full-rank factorisation equals PEFT's ΔW-space result, and at a lower
/// rank the product is the optimal truncation (PEFT's svd types' own product).
#[test]
fn exact_mode_equals_the_delta_space_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for c in manifest("combine") {
        let name = c["name"].as_str().unwrap();
        let kind = c["combination_type"].as_str().unwrap();
        if c["delta"].is_null() || c["statistical"] == true || kind == "average" {
            continue;
        }
        let single = c["adapters"].as_array().unwrap().len() == 1;
        let method = if single {
            "linear"
        } else {
            kind.trim_end_matches("_svd")
        };
        // Full rank: the combination itself.
        let out = tmp.path().join(format!("{name}-full"));
        let o = combine(&args_for(&c, method, &["--rank=64".into()]), &out);
        ok(&o);
        let err = compare_products(&products(&out), &delta_products(&c));
        assert!(
            err < 2e-6,
            "{name}: exact {method} differs from the reference by {err:e}"
        );
        if method == "cat" || method == "linear" {
            // Exact factors: rank Σ rᵢ per module, no SVD.
            let cfg: Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["lora_alpha"], cfg["r"], "{name}: scale 1");
        }
        // At the case's rank the product is the optimal truncation: PEFT's own.
        if is_svd(kind)
            && !single
            && !c["peft"].is_null()
            && c["peft_output_broken"] != true
            && !sign_dependent(&c)
        {
            let r = c["peft_config"]["r"].as_u64().unwrap();
            let out = tmp.path().join(format!("{name}-r"));
            ok(&combine(
                &args_for(&c, method, &[format!("--rank={r}")]),
                &out,
            ));
            // PEFT's result inherits use_rslora from its first adapter while setting
            // lora_alpha = r, so loaded it is √r too strong; its factors are still the optimal
            // truncation at scale α/r = 1.
            let peft = products_as(&fx(c["peft"].as_str().unwrap()), Some(false));
            let err = compare_products(&products(&out), &peft);
            assert!(
                err < 1e-5,
                "{name}: rank-{r} truncation differs from PEFT's by {err:e}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked}");
}

fn rel_err(got: &[(String, Vec<f64>)], want: &[(String, Vec<f64>)]) -> f64 {
    let (mut e, mut n) = (0f64, 0f64);
    for (m, w) in want {
        let g = &got.iter().find(|(x, _)| x == m).unwrap().1;
        for (x, y) in g.iter().zip(w) {
            e += (x - y).powi(2);
            n += y * y;
        }
    }
    (e / n).sqrt()
}

/// DARE is random: reproducible per seed, different across seeds, and unbiased (the mean of 16
/// draws is ~4× closer to `Σ wᵢ ΔWᵢ` than one draw). (`--compat peft` reproduces PEFT's own
/// seeded draw bit for bit: the compat test above.)
#[test]
fn dare_is_seeded_and_unbiased() {
    let c = common::case_in("combine", "dare_linear_ab_d05_seed0");
    let want = delta_products(&c);
    let tmp = tempfile::tempdir().unwrap();
    let draw = |seed: u64| {
        let out = tmp.path().join(format!("s{seed}"));
        ok(&combine(
            &args_for(
                &c,
                "dare_linear",
                &["--rank=64".into(), format!("--seed={seed}")],
            ),
            &out,
        ));
        products(&out)
    };
    let first = draw(0);
    let again = {
        let out = tmp.path().join("again");
        ok(&combine(
            &args_for(&c, "dare_linear", &["--rank=64".into(), "--seed=0".into()]),
            &out,
        ));
        products(&out)
    };
    assert_eq!(
        compare_products(&first, &again),
        0.0,
        "same seed, same result"
    );
    let single = rel_err(&first, &want);
    let mut mean = first.clone();
    for s in 1..16 {
        let d = draw(s);
        assert!(
            compare_products(&d, &first) > 1e-3,
            "seed {s} repeats seed 0"
        );
        for ((_, m), (_, x)) in mean.iter_mut().zip(&d) {
            m.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        }
    }
    mean.iter_mut()
        .for_each(|(_, v)| v.iter_mut().for_each(|x| *x /= 16.0));
    let averaged = rel_err(&mean, &want);
    let ratio = averaged / single;
    assert!(
        (0.12..0.45).contains(&ratio),
        "mean of 16 draws: error {averaged:.3} vs one draw {single:.3} (ratio {ratio:.3}, expected ~0.25)"
    );

    // The compat mode replays torch's draws (manual_seed, the new adapter's initialisation,
    // then one uniform per pruned element): another seed gives another file.
    let out = tmp.path().join("compat-other-seed");
    ok(&combine(
        &args_for(
            &c,
            "dare_linear",
            &["--compat=peft".into(), "--seed=1".into()],
        ),
        &out,
    ));
    let peft = products(&fx(c["peft"].as_str().unwrap()));
    assert!(
        compare_products(&products(&out), &peft) > 1e-3,
        "seed 1 gave PEFT's seed-0 file"
    );
}

#[test]
fn combine_refuses_bad_requests_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let a = fx("adapters/a");
    let b = fx("adapters/b");
    let out = tmp.path().join("o");
    let cases: Vec<(Vec<&dyn AsRef<std::ffi::OsStr>>, &str)> = vec![
        (
            vec![&"combine", &a, &b, &"--method=ties", &"-o", &out],
            "--density",
        ),
        (
            vec![&"combine", &a, &b, &"--method=nope", &"-o", &out],
            "--method",
        ),
        (
            vec![&"combine", &a, &b, &"--weights=1", &"-o", &out],
            "--weights",
        ),
        (
            vec![
                &"combine",
                &a,
                &b,
                &"--method=ties",
                &"--density=2",
                &"-o",
                &out,
            ],
            "outside",
        ),
        (
            vec![&"combine", &a, &b, &"--compat=mergekit", &"-o", &out],
            "--compat",
        ),
        (
            vec![&"combine", &a, &b, &"-o", &a],
            "output cannot be an input",
        ),
    ];
    for (args, want) in cases {
        let err = failed(&run(&args));
        assert!(err.contains(want), "{want}: {err}");
        assert!(!out.exists());
    }
}

/// Adapters of different families combine through their ΔW: the combined LoRA (LoHa + LoRA,
/// and OFT — a rotation, so against the base — + LoRA) merges to what merging the originals one
/// after the other gives.
#[test]
fn families_combine_through_their_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures("peft").join("bases/llama");
    let lora = fixtures("peft").join("llama_lora/adapter");
    for (other, weights) in [("llama_loha", "1,0.5"), ("llama_oft", "1,-0.7")] {
        let other = fixtures("peft_families").join(other).join("adapter");
        let combined = tmp.path().join(format!(
            "{}-combined",
            other
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
        ));
        let w = format!("--weights={weights}");
        ok(&run(&[
            &"combine", &other, &lora, &w, &"--base", &base, &"-o", &combined,
        ]));
        let via_combined = combined.with_extension("merged.safetensors");
        ok(&run(&[&"merge", &base, &combined, &"-o", &via_combined]));
        let direct = combined.with_extension("direct.safetensors");
        ok(&run(&[&"merge", &base, &other, &lora, &w, &"-o", &direct]));
        let o = run(&[&"diff", &via_combined, &direct, &"--tolerance=1e-5"]);
        ok(&o);
    }
    // Without the base, a family whose update depends on it is refused by name.
    let oft = fixtures("peft_families").join("llama_oft/adapter");
    let out = tmp.path().join("no-base");
    let err = failed(&run(&[&"combine", &oft, &lora, &"-o", &out]));
    assert!(err.contains("--base"), "{err}");
    assert!(!out.exists());
}
