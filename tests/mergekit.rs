//! `merge --recipe` against mergekit 0.1.5's own outputs (`fixtures/mergekit`, made by its
//! `generate.py` with `mergekit-yaml`): every deterministic recipe — linear, task arithmetic,
//! TIES (filters, layer gradients, rescale, negative weights), DARE and DELLA at density 1,
//! breadcrumbs, SLERP, Model Stock, bf16, `model+lora`, tied embeddings, sharded output — runs
//! unchanged and gives mergekit's tensors; the random methods agree with mergekit in distribution;
//! what mergekit refuses (a vocabulary mismatch) is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use adapterkit_core::{DType, TensorSource};
use adapterkit_formats::Checkpoint;
use common::{failed, fixtures, manifest, ok};
use serde_json::Value;

fn mk() -> PathBuf {
    fixtures("mergekit")
}

fn run_in_fixtures(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = common::bin();
    c.current_dir(mk());
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

fn merge_recipe(case: &Value, out: &Path, extra: &[&str]) -> Output {
    let recipe = case["recipe"].as_str().unwrap();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"merge", &"--recipe", &recipe, &"-o", &out];
    for e in extra {
        args.push(e);
    }
    run_in_fixtures(&args)
}

fn expected_dir(case: &Value) -> PathBuf {
    match case["identical_to"].as_str() {
        Some(other) => mk().join("cases").join(other).join("expected"),
        None => mk().join(case["expected"].as_str().unwrap()),
    }
}

/// Largest |got − want| over each tensor relative to its largest |want|, asserting the same
/// names, shapes and dtypes.
fn worst_difference(got: &Path, want: &Path) -> (f64, String) {
    let g = Checkpoint::open(got).unwrap();
    let w = Checkpoint::open(want).unwrap();
    let mut names: Vec<&str> = g.tensors().map(|t| t.name.as_str()).collect();
    let mut wnames: Vec<&str> = w.tensors().map(|t| t.name.as_str()).collect();
    names.sort();
    wnames.sort();
    assert_eq!(names, wnames, "{}: tensor names", got.display());
    let mut worst = (0f64, String::new());
    for t in w.tensors() {
        let gi = g.info(&t.name).unwrap();
        assert_eq!(gi.shape, t.shape, "{}", t.name);
        assert_eq!(gi.dtype, t.dtype, "{}: dtype", t.name);
        let (x, y) = (g.read_f32(&t.name).unwrap(), w.read_f32(&t.name).unwrap());
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) as f64;
        let d = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0f64, f64::max)
            / scale;
        if d > worst.0 {
            worst = (d, t.name.clone());
        }
    }
    worst
}

fn is_bf16(dir: &Path) -> bool {
    Checkpoint::open(dir)
        .unwrap()
        .tensors()
        .any(|t| t.dtype == DType::BF16)
}

#[test]
fn every_deterministic_recipe_gives_mergekits_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    for c in manifest("mergekit") {
        let name = c["name"].as_str().unwrap();
        if c["deterministic"] != true || !c["mergekit_error"].is_null() || name == "vocab_truncate"
        {
            continue;
        }
        let out = tmp.path().join(name);
        let o = merge_recipe(&c, &out, &[]);
        ok(&o);
        let want = expected_dir(&c);
        let (d, tensor) = worst_difference(&out, &want);
        // f32: mergekit's own arithmetic order up to whole-tensor sums (≤ 2.4e-7 in the
        // generator's numpy check). bf16: both round inputs, task vectors, weights and results
        // to bf16, but not at exactly the same steps: a few bf16 steps (2⁻⁸) apart at most.
        let recipe = std::fs::read_to_string(mk().join(c["recipe"].as_str().unwrap())).unwrap();
        let bf16_math = is_bf16(&want) || recipe.contains("dtype: bfloat16");
        let tol = if bf16_math { 2e-2 } else { 1e-5 };
        assert!(
            d <= tol,
            "{name}: {tensor} differs by {d:e} of its scale (tolerance {tol:e})"
        );
        checked.push(name.to_string());
    }
    assert!(checked.len() >= 30, "only {checked:?}");
}

/// mergekit refuses differing vocabularies (`Tensor size mismatch for lm_head.weight`) unless
/// told to truncate; adapterkit never truncates, and names the tensors.
#[test]
fn vocabulary_mismatches_are_refused_with_the_tensors_named() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["vocab_mismatch", "vocab_truncate"] {
        let c = common::case_in("mergekit", name);
        let out = tmp.path().join(name);
        let err = failed(&merge_recipe(&c, &out, &[]));
        assert!(
            err.contains("lm_head.weight") && err.contains("embed_tokens"),
            "{err}"
        );
        assert!(err.contains("vocabularies differ"), "{err}");
        assert!(!out.exists());
    }
}

/// `‖a − b‖ / ‖b − base‖` over every tensor of two checkpoints.
fn rel_distance(a: &Path, b: &Path, base: &Path) -> f64 {
    let (a, b, base) = (
        Checkpoint::open(a).unwrap(),
        Checkpoint::open(b).unwrap(),
        Checkpoint::open(base).unwrap(),
    );
    let (mut e, mut n) = (0f64, 0f64);
    for t in b.tensors() {
        let (x, y, z) = (
            a.read_f32(&t.name).unwrap(),
            b.read_f32(&t.name).unwrap(),
            base.read_f32(&t.name).unwrap(),
        );
        for ((p, q), r) in x.iter().zip(&y).zip(&z) {
            e += ((p - q) as f64).powi(2);
            n += ((q - r) as f64).powi(2);
        }
    }
    (e / n).sqrt()
}

/// DARE and DELLA draw masks from torch's generator in mergekit and from a counter-based one
/// here: not the same draws, the same distribution. Our draw is as far from mergekit's as from
/// another of our own draws, and a seed reproduces its file.
#[test]
fn random_methods_match_mergekit_in_distribution() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["dare_ties_stat", "della_stat"] {
        let c = common::case_in("mergekit", name);
        let a = tmp.path().join(format!("{name}-0"));
        let b = tmp.path().join(format!("{name}-1"));
        let again = tmp.path().join(format!("{name}-0-again"));
        ok(&merge_recipe(&c, &a, &["--seed", "0"]));
        ok(&merge_recipe(&c, &b, &["--seed", "1"]));
        ok(&merge_recipe(&c, &again, &["--seed", "0"]));
        assert_eq!(
            worst_difference(&a, &again).0,
            0.0,
            "{name}: a seed reproduces its file"
        );
        let recipe = std::fs::read_to_string(mk().join(c["recipe"].as_str().unwrap())).unwrap();
        let base_rel = recipe
            .lines()
            .find_map(|l| l.strip_prefix("base_model: "))
            .unwrap()
            .trim()
            .to_string();
        let base = mk().join(base_rel);
        let want = expected_dir(&c);
        let ours = rel_distance(&a, &b, &base);
        let theirs = rel_distance(&a, &want, &base);
        assert!(ours > 1e-3, "{name}: different seeds should differ");
        let ratio = theirs / ours;
        assert!(
            (0.8..1.25).contains(&ratio),
            "{name}: distance to mergekit's draw {theirs:.4} vs to our other draw {ours:.4} (ratio {ratio:.3})"
        );
    }
}

#[test]
fn recipe_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("merge_method: ties\nbase_model: models/base\nslices: []\n", "`slices`"),
        ("merge_method: nuslerp\nbase_model: models/base\nmodels:\n  - model: models/ft1\n", "nuslerp"),
        ("merge_method: ties\nbase_model: models/base\nmodels:\n  - model: models/ft1\n    parameters: {weight: 1, density: 0.5, alpha: 3}\n", "`alpha`"),
        ("merge_method: ties\nbase_model: models/base\nmodels:\n  - model: models/ft1\n    parameters: {density: 0.5}\n", "`weight`"),
        ("merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/ft1\n", "`t`"),
        ("merge_method: ties\nbase_model: models/base\ntokenizer_source: union\nmodels:\n  - model: models/ft1\n", "tokenizer"),
        ("merge_method: ties\nbase_model: models/base\nmodels: [\n", "not YAML"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let recipe = tmp.path().join(format!("r{i}.yml"));
        std::fs::write(&recipe, text).unwrap();
        let out = tmp.path().join(format!("o{i}"));
        let err = failed(&run_in_fixtures(&[
            &"merge",
            &"--recipe",
            &recipe,
            &"-o",
            &out,
        ]));
        assert!(err.contains(want), "{want}: {err}");
        assert!(!out.exists());
    }
}

/// The command-line form runs the same arithmetic as a recipe.
#[test]
fn method_flags_equal_the_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mk();
    let out = tmp.path().join("ta");
    ok(&run_in_fixtures(&[
        &"merge",
        &m.join("models/base"),
        &m.join("models/ft1"),
        &m.join("models/ft2"),
        &m.join("models/ft3"),
        &"--method=task_arithmetic",
        &"--weights=1.0,0.6,-0.4",
        &"--lambda=0.8",
        &"-o",
        &out,
    ]));
    let (d, t) = worst_difference(&out, &m.join("cases/task_arithmetic/expected"));
    assert!(d <= 1e-5, "{t}: {d:e}");
    // An adapter directory as a source is the base with the adapter merged (model+lora).
    let out = tmp.path().join("lora");
    ok(&run_in_fixtures(&[
        &"merge",
        &m.join("models/base"),
        &m.join("models/lora1"),
        &m.join("models/ft2"),
        &"--method=task_arithmetic",
        &"--weights=1.0,0.5",
        &"-o",
        &out,
    ]));
    let (d, t) = worst_difference(&out, &m.join("cases/lora_source/expected"));
    assert!(d <= 1e-5, "{t}: {d:e}");
}

#[test]
fn method_flag_errors_are_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mk();
    let (base, ft1, ft2) = (
        m.join("models/base"),
        m.join("models/ft1"),
        m.join("models/ft2"),
    );
    let vocab = m.join("models/ft_vocab");
    let out = tmp.path().join("o");
    let recipe = m.join("cases/ties/recipe.yml");
    let cases: Vec<(Vec<&dyn AsRef<std::ffi::OsStr>>, &str)> = vec![
        (
            vec![&"merge", &base, &"--method=ties", &"-o", &out],
            "no models",
        ),
        (
            vec![&"merge", &base, &ft1, &"--method=nope", &"-o", &out],
            "--method",
        ),
        (
            vec![
                &"merge",
                &base,
                &ft1,
                &ft2,
                &"--method=slerp",
                &"--t=0.5",
                &"-o",
                &out,
            ],
            "exactly one model",
        ),
        (
            vec![&"merge", &base, &ft1, &"--method=model_stock", &"-o", &out],
            "at least two",
        ),
        (
            vec![&"merge", &base, &ft1, &"--method=slerp", &"-o", &out],
            "`t`",
        ),
        (
            vec![
                &"merge",
                &base,
                &ft1,
                &ft2,
                &"--method=ties",
                &"--weights=1",
                &"-o",
                &out,
            ],
            "--weights",
        ),
        (
            vec![&"merge", &base, &ft1, &"--recipe", &recipe, &"-o", &out],
            "--recipe",
        ),
        (
            vec![&"unmerge", &base, &ft1, &"--method=ties", &"-o", &out],
            "unmerge",
        ),
        (
            vec![
                &"merge",
                &base,
                &ft1,
                &ft2,
                &"--method=linear",
                &"--weights=1,-1",
                &"-o",
                &out,
            ],
            "sum to zero",
        ),
        (
            vec![&"merge", &base, &ft1, &vocab, &"--method=ties", &"-o", &out],
            "vocabularies differ",
        ),
        (
            vec![
                &"merge",
                &base,
                &ft1,
                &"--method=della",
                &"--density=0.1",
                &"--epsilon=0.2",
                &"-o",
                &out,
            ],
            "epsilon",
        ),
        (
            vec![&"merge", &base, &ft1, &"--method=ties", &"-o", &ft1],
            "output cannot be an input",
        ),
    ];
    for (args, want) in cases {
        let err = failed(&run_in_fixtures(&args));
        assert!(err.contains(want), "{want}: {err}");
        assert!(!out.exists());
    }
}
