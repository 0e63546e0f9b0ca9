//! Every PEFT family against PEFT's own merges: for each case of fixtures/peft_families (made by
//! fixtures/peft_families/generate.py with PEFT 0.21.2), `adapterkit merge` must reproduce
//! `merge_and_unload()` to 1e-5 of each tensor's scale, or refuse with a clear error where the
//! manifest says PEFT cannot be reproduced or the method is not mergeable.

mod common;

use std::path::Path;

use adapterkit_formats::safetensors::SafetensorsFile;
use common::{assert_close, bin, failed, fixtures, manifest, ok};
use serde_json::Value;

fn run_case(set: &str, c: &Value, out: &Path) -> std::process::Output {
    common::merge_manifest_case(set, c, out, &[])
}

/// Merge every case of `set`; returns the names of cases that failed, with why.
pub fn check_set(set: &str, rel: f32) -> Vec<String> {
    let mut failures = Vec::new();
    for c in manifest(set) {
        let name = c["name"].as_str().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.safetensors");
        let result = std::panic::catch_unwind(|| {
            let o = run_case(set, &c, &out);
            match c["expected"].as_str() {
                Some(expected) => {
                    ok(&o);
                    let f = SafetensorsFile::open(&out).unwrap();
                    let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
                    assert_close(&f, &names, &fixtures(set).join(expected), rel);
                }
                None => {
                    let err = failed(&o);
                    assert!(!out.exists(), "output written for a refused case");
                    let family = c["family"].as_str().unwrap_or_default();
                    assert!(
                        err.contains(family) || err.contains(&family.to_uppercase()),
                        "the error should name {family}: {err}"
                    );
                }
            }
        });
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!(
                "{name}: {}",
                msg.lines().take(6).collect::<Vec<_>>().join(" | ")
            ));
        }
    }
    failures
}

#[test]
fn every_peft_family_matches_merge_and_unload() {
    let failures = check_set("peft_families", 1e-5);
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `unmerge` of PEFT's merged file recovers the base: for every family whose merge is
/// invertible, to 1e-4 of each tensor's scale; the others are refused with the reason.
fn check_unmerge(set: &str, skip: &[&str]) -> (Vec<String>, Vec<String>) {
    let (mut failures, mut refused) = (Vec::new(), Vec::new());
    for c in manifest(set) {
        let Some(expected) = c["expected"].as_str() else {
            continue;
        };
        let name = c["name"].as_str().unwrap().to_string();
        if skip.contains(&name.as_str()) {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("base.safetensors");
        let d = fixtures(set);
        let mut cmd = bin();
        cmd.arg("unmerge").arg(d.join(expected));
        for a in c["adapters"].as_array().unwrap() {
            cmd.arg(d.join(a.as_str().unwrap()));
        }
        let w: Vec<String> = c["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap().to_string())
            .collect();
        let o = cmd
            .arg("--weights")
            .arg(w.join(","))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            if err.contains("cannot unmerge") && !err.contains("panicked") && !out.exists() {
                refused.push(name);
            } else {
                failures.push(format!(
                    "{name}: {}",
                    err.lines().take(3).collect::<Vec<_>>().join(" | ")
                ));
            }
            continue;
        }
        let base = d.join(c["base"].as_str().unwrap());
        let base_file = if base.is_dir() {
            base.join("model.safetensors")
        } else {
            base
        };
        let result = std::panic::catch_unwind(|| {
            let f = SafetensorsFile::open(&out).unwrap();
            let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
            assert_close(&f, &names, &base_file, 1e-4);
        });
        if let Err(e) = result {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            failures.push(format!("{name}: {msg}"));
        }
    }
    (failures, refused)
}

#[test]
fn unmerge_inverts_every_invertible_family() {
    let (failures, mut refused) = check_unmerge("peft_families", &[]);
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    refused.sort();
    // Exactly the merges that destroy information: replaced tensors (LN tuning, trainable
    // tokens, a saved embedding base layer).
    assert_eq!(
        refused,
        vec![
            "llama_ln_tuning",
            "llama_lora_trainable_tokens",
            "llama_oft_embed",
            "llama_trainable_tokens"
        ],
    );
}

/// `adapterkit merge` of `adapter` into the base of manifest case `c` of `set`.
fn merge_into_base(set: &str, c: &Value, adapter: &Path, out: &Path) -> std::process::Output {
    bin()
        .arg("merge")
        .arg(fixtures(set).join(c["base"].as_str().unwrap()))
        .arg(adapter)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

/// fixtures/peft_more cases adapterkit refuses, each with the reason the README gives.
const REFUSED_BY_DESIGN: &[&str] = &["llama_unilora_noidx", "llama_tinylora", "llama_psoft"];

/// The newer tuners (fixtures/peft_more, made by its generate.py with PEFT 0.21.2): the ones
/// adapterkit merges must match PEFT; the others must be refused with the reason.
#[test]
fn newer_peft_tuners_match_or_are_refused_with_a_reason() {
    let refused_by_design = REFUSED_BY_DESIGN;
    let mut failures = Vec::new();
    for c in manifest("peft_more") {
        let name = c["name"].as_str().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.safetensors");
        let o = run_case("peft_more", &c, &out);
        if refused_by_design.contains(&name.as_str()) {
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            if o.status.success()
                || err.contains("panicked")
                || out.exists()
                || !err.starts_with("error: ")
            {
                failures.push(format!("{name}: expected a clean refusal, got: {err}"));
            }
            continue;
        }
        let result = std::panic::catch_unwind(|| {
            ok(&o);
            let f = SafetensorsFile::open(&out).unwrap();
            let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
            assert_close(
                &f,
                &names,
                &fixtures("peft_more").join(c["expected"].as_str().unwrap()),
                1e-5,
            );
        });
        if let Err(e) = result {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            failures.push(format!(
                "{name}: {}",
                msg.lines().take(4).collect::<Vec<_>>().join(" | ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn unmerge_newer_tuners() {
    let (failures, mut refused) = check_unmerge("peft_more", REFUSED_BY_DESIGN);
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    refused.sort();
    // RoAd and GLoRA are not inverted yet; DEFT and SuperTuning without saved positions are
    // functions of the original weight (as is PEANuT's), which the merged file no longer holds; llama_hira
    // carries a saved embedding base layer (a replacement).
    assert_eq!(
        refused,
        vec![
            "llama_deft",
            "llama_deft_para",
            "llama_deft_qr",
            "llama_frod",
            "llama_glora",
            "llama_glora_vec",
            "llama_hira",
            "llama_osf",
            "llama_peanut",
            "llama_road1",
            "llama_road2",
            "llama_road4",
            "llama_supertuning_noidx"
        ]
    );
}

/// The methods that cannot be merged are still described by `inspect`: what they are, their
/// virtual-token dimensions and tensors, and why `merge` refuses them.
#[test]
fn inspect_describes_prompt_learning_adapters() {
    for c in manifest("peft_families")
        .iter()
        .filter(|c| c["expect_error"] == "not_mergeable")
    {
        let dir = fixtures("peft_families").join(c["adapters"][0].as_str().unwrap());
        let out = common::run(&[&"inspect", &dir, &"--json"]);
        ok(&out);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["kind"], "adapter");
        assert_eq!(v["supported"], false);
        assert!(
            v["reason"].as_str().unwrap().contains("cannot")
                || v["reason"].as_str().unwrap().contains("no weights")
                || v["reason"].as_str().unwrap().contains("run time"),
            "{v}"
        );
        assert!(v["tensor_count"].as_u64().unwrap() > 0);
        assert!(!v["tensors"].as_object().unwrap().is_empty());
        if c["family"] != "ADAPTION_PROMPT" {
            assert!(
                v["num_virtual_tokens"].as_u64().unwrap() > 0,
                "{}: {v}",
                c["name"]
            );
        }
    }
}

/// Hostile shapes: every fixture adapter with any one of its tensors replaced by a wrongly shaped one
/// is refused with a clean error (or, where the shape happens to be consistent, merged) — never a
/// panic, never a partial output.
#[test]
fn malformed_family_tensors_are_errors_not_panics() {
    use adapterkit_core::{DType, TensorSource};
    use adapterkit_formats::safetensors::{write_small, TensorSpec};
    let mut runs = 0;
    for set in ["peft", "peft_families", "peft_more"] {
        for c in manifest(set) {
            let adapter = fixtures(set).join(c["adapters"][0].as_str().unwrap());
            let file = adapter.join("adapter_model.safetensors");
            if !file.is_file() {
                continue;
            }
            let src = SafetensorsFile::open(&file).unwrap();
            let names: Vec<String> = src.tensors().iter().map(|t| t.name.clone()).collect();
            for (k, victim) in names.iter().enumerate() {
                // Wrong rank, an unrelated 3-D shape, a scalar, and the right rank one too long.
                let mut longer = src.info(victim).unwrap().shape.clone();
                if let Some(last) = longer.last_mut() {
                    *last += 1;
                }
                for bad_shape in [vec![3u64], vec![2, 3, 5], vec![], longer] {
                    let dir = tempfile::tempdir().unwrap();
                    let a = dir.path().join("adapter");
                    std::fs::create_dir_all(&a).unwrap();
                    std::fs::copy(
                        adapter.join("adapter_config.json"),
                        a.join("adapter_config.json"),
                    )
                    .unwrap();
                    let mut tensors = Vec::new();
                    for t in src.tensors() {
                        let (shape, bytes) = if &t.name == victim {
                            let n: u64 = bad_shape.iter().product();
                            (
                                bad_shape.clone(),
                                (0..n)
                                    .flat_map(|i| (0.01 * i as f32 + 0.5).to_le_bytes())
                                    .collect(),
                            )
                        } else {
                            let mut b = vec![0u8; t.len as usize];
                            src.read_bytes(&t.name, 0, &mut b).unwrap();
                            (t.shape.clone(), b)
                        };
                        let dtype = if &t.name == victim {
                            DType::F32
                        } else {
                            t.dtype
                        };
                        tensors.push((
                            TensorSpec {
                                name: t.name.clone(),
                                dtype,
                                shape,
                            },
                            bytes,
                        ));
                    }
                    write_small(&a.join("adapter_model.safetensors"), &tensors, None).unwrap();
                    let out = dir.path().join("m.safetensors");
                    let o = merge_into_base(set, &c, &a, &out);
                    let err = String::from_utf8_lossy(&o.stderr);
                    assert!(
                        !err.contains("panicked"),
                        "{} (tensor {k} {victim} as {bad_shape:?}): {err}",
                        c["name"]
                    );
                    if !o.status.success() {
                        assert!(err.contains("error: "), "{}: {err}", c["name"]);
                        assert!(!out.exists(), "{}: output left behind", c["name"]);
                    }
                    runs += 1;
                }
            }
        }
    }
    assert!(runs > 300, "{runs}");
}

/// Hostile configs: for one adapter of each PEFT type, every config field set in turn to values of
/// the wrong type or range gives a clean error or a valid merge — never a panic or a partial file.
#[test]
fn hostile_config_values_are_errors_not_panics() {
    let mut seen = std::collections::BTreeSet::new();
    let mut runs = 0;
    for set in ["peft", "peft_families", "peft_more"] {
        for c in manifest(set) {
            let adapter = fixtures(set).join(c["adapters"][0].as_str().unwrap());
            let Ok(text) = std::fs::read_to_string(adapter.join("adapter_config.json")) else {
                continue;
            };
            let cfg: Value = serde_json::from_str(&text).unwrap();
            if !seen.insert(cfg["peft_type"].as_str().unwrap_or_default().to_string())
                || !adapter.join("adapter_model.safetensors").is_file()
            {
                continue;
            }
            let keys: Vec<String> = cfg.as_object().unwrap().keys().cloned().collect();
            for key in keys {
                for bad in [
                    serde_json::json!("x"),
                    serde_json::json!(-1),
                    serde_json::json!(1e30),
                    serde_json::json!({"a": [1]}),
                ] {
                    let dir = tempfile::tempdir().unwrap();
                    let a = dir.path().join("adapter");
                    std::fs::create_dir_all(&a).unwrap();
                    std::fs::copy(
                        adapter.join("adapter_model.safetensors"),
                        a.join("adapter_model.safetensors"),
                    )
                    .unwrap();
                    let mut v = cfg.clone();
                    v[&key] = bad.clone();
                    std::fs::write(a.join("adapter_config.json"), v.to_string()).unwrap();
                    let out = dir.path().join("m.safetensors");
                    let o = merge_into_base(set, &c, &a, &out);
                    let err = String::from_utf8_lossy(&o.stderr);
                    assert!(
                        !err.contains("panicked"),
                        "{} with {key} = {bad}: {err}",
                        c["name"]
                    );
                    if !o.status.success() {
                        assert!(!out.exists(), "{}: output left behind", c["name"]);
                    }
                    runs += 1;
                }
            }
        }
    }
    assert!(runs > 500, "{runs}");
}
