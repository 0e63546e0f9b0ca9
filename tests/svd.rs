//! The SVD commands against numpy's and PEFT's numbers (`fixtures/svd`, made by its
//! `generate.py`): spectra equal numpy's singular values, compression is optimal (its error is the
//! spectrum's tail, and the files realise it), extraction recovers a PEFT merge exactly at its
//! rank, every family converted to LoRA merges to what PEFT merged, and the randomized SVD stays
//! within a stated tolerance of the exact one.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use adapterkit_core::TensorSource;
use adapterkit_formats::safetensors::SafetensorsFile;
use common::{failed, fixtures, ok, run};
use serde_json::Value;

/// Fixtures of families adapterkit refuses to merge (each with its reason, see the README): they
/// have no update to factorise either.
const REFUSED: &[&str] = &["llama_unilora_noidx", "llama_tinylora", "llama_psoft"];

fn refused(c: &Value) -> bool {
    REFUSED.contains(&c["name"].as_str().unwrap_or(""))
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures("svd").join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn svd_path(rel: &str) -> PathBuf {
    fixtures("svd").join(rel)
}

fn json_out(out: &std::process::Output) -> Value {
    ok(out);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `‖a − b‖_F / ‖d‖_F` over one tensor of two files, `d` = `b − base`.
fn rel_fro(a: &dyn TensorSource, b: &dyn TensorSource, base: &dyn TensorSource, name: &str) -> f64 {
    let (x, y, z) = (
        a.read_f32(name).unwrap(),
        b.read_f32(name).unwrap(),
        base.read_f32(name).unwrap(),
    );
    let err: f64 = x
        .iter()
        .zip(&y)
        .map(|(p, q)| ((p - q) as f64).powi(2))
        .sum();
    let norm: f64 = y
        .iter()
        .zip(&z)
        .map(|(p, q)| ((p - q) as f64).powi(2))
        .sum();
    (err / norm).sqrt()
}

/// Spectra of every single-adapter f32 fixture (LoRA and every other family, merged by PEFT)
/// equal numpy's singular values of `expected − base`.
#[test]
fn spectra_match_numpy_for_every_family() {
    let g = golden();
    let mut checked = 0;
    for c in g["cases"].as_array().unwrap() {
        let Some(adapter) = c["adapter"].as_str() else {
            continue;
        };
        if c["dtype"] != "F32" || c["tensors"].as_object().unwrap().is_empty() {
            continue;
        }
        let (ad, base) = (svd_path(adapter), svd_path(c["base"].as_str().unwrap()));
        let out = run(&[&"inspect", &ad, &"--spectrum", &"--base", &base, &"--json"]);
        if refused(c) {
            failed(&out);
            continue;
        }
        ok(&out);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let got: HashMap<String, Vec<f64>> = v["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["target"].as_str().unwrap().to_string(),
                    floats(&m["singular_values"]),
                )
            })
            .collect();
        for (name, t) in c["tensors"].as_object().unwrap() {
            let want = floats(&t["sv"]);
            let s = got
                .get(name)
                .unwrap_or_else(|| panic!("{}: no spectrum for {name}", c["case"]));
            let top = want[0];
            // PEFT's merge leaves f32 noise of ~1e-7·σ₁ in expected − base; ours computes the
            // update directly.
            for (i, w) in want.iter().enumerate() {
                let x = s.get(i).copied().unwrap_or(0.0);
                assert!(
                    (x - w).abs() <= 2e-5 * top,
                    "{} {name} σ{i}: {x} vs numpy {w} (σ₁ {top})",
                    c["case"]
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 150, "only {checked} tensors checked");
}

/// `compress --rank r`: per module, the reported error is the tail of numpy's spectrum, and the
/// written factors realise it (the merged file is that far from PEFT's merge, no further).
#[test]
fn compress_is_optimal_and_the_files_realise_it() {
    let g = golden();
    let case = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "lora_patterns")
        .unwrap()
        .clone();
    let base_dir = svd_path("../peft/bases/llama");
    let base = SafetensorsFile::open(base_dir.join("model.safetensors")).unwrap();
    let expected = SafetensorsFile::open(svd_path("lora_patterns/merged.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for r in [1usize, 2, 3, 8] {
        let out_dir = dir.path().join(format!("r{r}"));
        let v = json_out(&run(&[
            &"compress",
            &svd_path("lora_patterns"),
            &"-o",
            &out_dir,
            &"--rank",
            &r.to_string(),
            &"--per-module",
            &"--json",
        ]));
        let merged = dir.path().join(format!("m{r}.safetensors"));
        ok(&run(&[&"merge", &base_dir, &out_dir, &"-o", &merged]));
        let merged = SafetensorsFile::open(&merged).unwrap();
        for m in v["modules"].as_array().unwrap() {
            let module = m["module"].as_str().unwrap();
            let name = format!("{module}.weight");
            let t = &case["tensors"][&name];
            let sv = floats(&t["sv_factors"]);
            let kept = r.min(sv.len());
            assert_eq!(m["rank"].as_u64().unwrap() as usize, kept, "{name}");
            let total: f64 = sv.iter().map(|s| s * s).sum();
            let tail: f64 = sv[kept..].iter().map(|s| s * s).sum();
            let optimal = (tail / total).sqrt();
            let reported = m["relative_error"].as_f64().unwrap();
            assert!(
                (reported - optimal).abs() <= 1e-6,
                "{name} rank {r}: reported {reported}, optimal {optimal}"
            );
            let real = rel_fro(&merged, &expected, &base, &name);
            assert!(
                (real - optimal).abs() <= 1e-5 + 1e-4 * optimal,
                "{name} rank {r}: merged file error {real}, optimal {optimal}"
            );
        }
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out_dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        // Alphas stay; ranks go to r / rank_pattern.
        assert_eq!(cfg["lora_alpha"], 16);
        assert_eq!(cfg["alpha_pattern"]["v_proj"], 4);
        if r == 8 {
            assert_eq!(cfg["r"], 8);
            assert_eq!(cfg["rank_pattern"]["model.layers.0.mlp.down_proj"], 4);
        }
    }
}

/// `--energy` and `--max-error` choose ranks per module from the spectrum; rsLoRA's `α/√r` is
/// re-derived for the new rank.
#[test]
fn compress_by_energy_and_error_with_rslora() {
    let g = golden();
    let case = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "lora_rslora")
        .unwrap()
        .clone();
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [("--energy", 0.9f64), ("--max-error", 0.2)] {
        let out_dir = dir.path().join(flag.trim_start_matches('-'));
        let v = json_out(&run(&[
            &"compress",
            &svd_path("lora_rslora"),
            &"-o",
            &out_dir,
            &flag,
            &value.to_string(),
            &"--per-module",
            &"--json",
        ]));
        for m in v["modules"].as_array().unwrap() {
            let name = format!("{}.weight", m["module"].as_str().unwrap());
            let sv = floats(&case["tensors"][&name]["sv_factors"]);
            let total: f64 = sv.iter().map(|s| s * s).sum();
            let mut want = sv.len();
            let mut acc = 0.0;
            for (i, s) in sv.iter().enumerate() {
                acc += s * s;
                let ok = if flag == "--energy" {
                    acc >= value * total
                } else {
                    ((total - acc).max(0.0) / total).sqrt() <= value
                };
                if ok {
                    want = i + 1;
                    break;
                }
            }
            assert_eq!(m["rank"].as_u64().unwrap() as usize, want, "{flag} {name}");
        }
        // The merged result equals merging the optimal truncation: check one module through the
        // files.
        let merged = dir.path().join("m.safetensors");
        let base_dir = svd_path("../peft/bases/llama");
        ok(&run(&[
            &"merge", &base_dir, &out_dir, &"-o", &merged, &"--force",
        ]));
        let merged = SafetensorsFile::open(&merged).unwrap();
        let base = SafetensorsFile::open(base_dir.join("model.safetensors")).unwrap();
        let expected = SafetensorsFile::open(svd_path("lora_rslora/merged.safetensors")).unwrap();
        for m in v["modules"].as_array().unwrap() {
            let name = format!("{}.weight", m["module"].as_str().unwrap());
            let real = rel_fro(&merged, &expected, &base, &name);
            let reported = m["relative_error"].as_f64().unwrap();
            assert!((real - reported).abs() <= 1e-5 + 1e-4 * reported, "{name}");
        }
    }
}

/// Extraction from PEFT's own merge recovers the adapter's update exactly at its rank, per
/// module (rank 8, and 4 where `rank_pattern` said so).
#[test]
fn extract_recovers_a_peft_merge_at_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = svd_path("../peft/bases/llama");
    // PEFT's merged file holds every base tensor: make it a checkpoint directory.
    let ft = dir.path().join("ft");
    std::fs::create_dir(&ft).unwrap();
    std::fs::copy(base_dir.join("config.json"), ft.join("config.json")).unwrap();
    std::fs::copy(
        svd_path("lora_patterns/merged.safetensors"),
        ft.join("model.safetensors"),
    )
    .unwrap();
    let out_dir = dir.path().join("x");
    let v = json_out(&run(&[
        &"extract",
        &base_dir,
        &ft,
        &"-o",
        &out_dir,
        &"--max-error",
        &"1e-5",
        &"--json",
    ]));
    let modules = v["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 14);
    for m in modules {
        let want = if m["module"].as_str().unwrap().ends_with("down_proj") {
            4
        } else {
            8
        };
        assert_eq!(m["rank"], want, "{}", m["module"]);
        assert!(m["relative_error"].as_f64().unwrap() < 1e-6);
    }
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["rank_pattern"]["model.layers.1.mlp.down_proj"], 4);
    assert_eq!(cfg["alpha_pattern"]["model.layers.1.mlp.down_proj"], 4);
    let merged = dir.path().join("m.safetensors");
    ok(&run(&[&"merge", &base_dir, &out_dir, &"-o", &merged]));
    let merged = SafetensorsFile::open(&merged).unwrap();
    let names: Vec<String> = merged.tensors().iter().map(|t| t.name.clone()).collect();
    common::assert_close(
        &merged,
        &names,
        &svd_path("lora_patterns/merged.safetensors"),
        2e-6,
    );
}

/// A fine-tune with low-rank, full-rank, embedding, norm and bias changes: low-rank modules are
/// recovered exactly, the full-rank one truncates to numpy's tail, the rest is saved whole, and
/// unchanged tensors are skipped. With `--embed-lora` the embedding becomes an embedding LoRA.
#[test]
fn extract_a_mixed_finetune() {
    let g = golden();
    let case = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "finetuned")
        .unwrap()
        .clone();
    let dir = tempfile::tempdir().unwrap();
    let base_dir = svd_path("../peft/bases/llama");
    for embed in [false, true] {
        let out_dir = dir.path().join(format!("x{embed}"));
        let ft = svd_path("finetuned");
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"extract", &base_dir, &ft, &"-o", &out_dir, &"--rank", &"3", &"--json",
        ];
        if embed {
            args.push(&"--embed-lora");
        }
        let v = json_out(&run(&args));
        let modules: HashMap<String, &Value> = v["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["module"].as_str().unwrap().to_string(), m))
            .collect();
        for low in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.mlp.down_proj",
        ] {
            assert!(modules[low]["relative_error"].as_f64().unwrap() < 1e-6);
        }
        let up = "model.layers.0.mlp.up_proj";
        let sv = floats(&case["tensors"][&format!("{up}.weight")]["sv"]);
        let total: f64 = sv.iter().map(|s| s * s).sum();
        let optimal = (sv[3..].iter().map(|s| s * s).sum::<f64>() / total).sqrt();
        let got = modules[up]["relative_error"].as_f64().unwrap();
        assert!((got - optimal).abs() < 1e-5, "{got} vs {optimal}");
        let saved: Vec<&str> = v["modules_to_save"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert!(saved.contains(&"model.layers.0.input_layernorm"));
        assert!(saved.contains(&"model.layers.1.self_attn.k_proj"));
        assert_eq!(saved.contains(&"model.embed_tokens"), !embed);
        if embed {
            assert!(
                modules["model.embed_tokens"]["relative_error"]
                    .as_f64()
                    .unwrap()
                    < 1e-6
            );
            let st = SafetensorsFile::open(out_dir.join("adapter_model.safetensors")).unwrap();
            let a = st
                .info("base_model.model.model.embed_tokens.lora_embedding_A")
                .unwrap();
            assert_eq!(a.shape, vec![3, 128]);
        }
        assert_eq!(v["unchanged_tensors"], 29);
        // Merging back: low-rank and saved modules exact, up_proj off by its truncation only.
        let merged = dir.path().join(format!("m{embed}.safetensors"));
        ok(&run(&[&"merge", &base_dir, &out_dir, &"-o", &merged]));
        let merged = SafetensorsFile::open(&merged).unwrap();
        let want = SafetensorsFile::open(svd_path("finetuned/model.safetensors")).unwrap();
        let base = SafetensorsFile::open(base_dir.join("model.safetensors")).unwrap();
        for t in want.tensors() {
            let (x, y) = (
                merged.read_f32(&t.name).unwrap(),
                want.read_f32(&t.name).unwrap(),
            );
            if t.name == format!("{up}.weight") {
                let real = rel_fro(&merged, &want, &base, &t.name);
                assert!((real - optimal).abs() < 1e-5, "{real} vs {optimal}");
                continue;
            }
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-5 * scale, "{}: {err}", t.name);
        }
    }
}

/// A bf16 fine-tune gives bf16 factors (the tensors' own dtype) unless `--dtype` says otherwise.
#[test]
fn extract_bf16_keeps_the_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for (dtype, want) in [("auto", "BF16"), ("f32", "F32")] {
        let out_dir = dir.path().join(dtype);
        ok(&run(&[
            &"extract",
            &svd_path("../peft/bases/llama_bf16"),
            &svd_path("finetuned_bf16"),
            &"-o",
            &out_dir,
            &"--rank",
            &"3",
            &"--dtype",
            &dtype,
        ]));
        let st = SafetensorsFile::open(out_dir.join("adapter_model.safetensors")).unwrap();
        let a = st
            .info("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            .unwrap();
        assert_eq!(a.dtype.name(), want);
    }
}

/// Every family adapterkit merges, turned into a LoRA, merges to PEFT's own merged tensors.
#[test]
fn every_family_converts_to_a_lora_that_merges_the_same() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let mut converted = 0;
    for (i, c) in g["cases"].as_array().unwrap().iter().enumerate() {
        let (Some(adapter), "F32") = (c["adapter"].as_str(), c["dtype"].as_str().unwrap()) else {
            continue;
        };
        let base = svd_path(c["base"].as_str().unwrap());
        let out_dir = dir.path().join(format!("c{i}"));
        let out = run(&[
            &"convert",
            &svd_path(adapter),
            &"--to-family",
            &"lora",
            &"--base",
            &base,
            &"-o",
            &out_dir,
        ]);
        if refused(c) {
            failed(&out);
            continue;
        }
        if ["llama_ln_tuning", "llama_beft"].contains(&c["name"].as_str().unwrap()) {
            let err = failed(&out);
            assert!(err.contains("changes no weight matrix"), "{err}");
            continue;
        }
        ok(&out);
        let merged = dir.path().join(format!("m{i}.safetensors"));
        ok(&run(&[&"merge", &base, &out_dir, &"-o", &merged]));
        let m = SafetensorsFile::open(&merged).unwrap();
        let names: Vec<String> = m.tensors().iter().map(|t| t.name.clone()).collect();
        common::assert_close(&m, &names, &svd_path(c["expected"].as_str().unwrap()), 1e-5);
        converted += 1;
    }
    assert_eq!(
        converted, 81,
        "every f32 single-adapter fixture but the refused ones"
    );
}

/// Additive families need no base; multiplicative ones say that they need it.
#[test]
fn convert_without_base() {
    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures("peft_families").join("llama_adalora/adapter");
    ok(&run(&[
        &"convert",
        &lora,
        &"--to-family",
        &"lora",
        &"-o",
        &dir.path().join("a"),
    ]));
    let oft = fixtures("peft_families").join("llama_oft/adapter");
    let err = failed(&run(&[
        &"convert",
        &oft,
        &"--to-family",
        &"lora",
        &"-o",
        &dir.path().join("b"),
    ]));
    assert!(err.contains("--base"), "{err}");
    assert!(!dir.path().join("b").exists());
}

/// Refusals: compress of a non-LoRA, extraction across different shapes, an existing output,
/// a missing rank rule. Nothing is written.
#[test]
fn svd_commands_refuse_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let err = failed(&run(&[
        &"compress",
        &fixtures("peft_families").join("llama_loha/adapter"),
        &"-o",
        &out,
        &"--rank",
        &"2",
    ]));
    assert!(err.contains("convert --to-family lora"), "{err}");
    let err = failed(&run(&[
        &"extract",
        &fixtures("peft/bases/llama"),
        &fixtures("peft/bases/gpt2"),
        &"-o",
        &out,
        &"--rank",
        &"2",
    ]));
    assert!(err.contains("not in the base"), "{err}");
    let err = failed(&run(&[
        &"compress",
        &svd_path("lora_patterns"),
        &"-o",
        &out,
    ]));
    assert!(err.contains("--rank"), "{err}");
    assert!(!out.exists());
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let err = failed(&run(&[
        &"compress",
        &svd_path("lora_patterns"),
        &"-o",
        &out,
        &"--rank",
        &"2",
    ]));
    assert!(err.contains("--force"), "{err}");
    let err = failed(&run(&[
        &"compress",
        &svd_path("lora_patterns"),
        &"-o",
        &dir.path().join("p"),
        &"--energy",
        &"1.5",
    ]));
    assert!(err.contains("(0, 1]"), "{err}");
}

/// The randomized SVD on numpy-made matrices: within 1e-4 (relative) of the exact singular
/// values, reproducible for a seed, and its truncation error within 1% of the optimal one.
#[test]
fn randomized_svd_is_close_to_exact() {
    let text = std::fs::read_to_string(svd_path("randomized/randomized.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    let file = SafetensorsFile::open(svd_path("randomized/matrices.safetensors")).unwrap();
    for (name, m) in meta["matrices"].as_object().unwrap() {
        let shape: Vec<usize> = m["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let exact = floats(&m["sv"]);
        let a = file.read_f32(name).unwrap();
        let opts = adapterkit_linalg::RandomizedOptions {
            rank: 20,
            oversample: 10,
            power_iters: 2,
            seed: 7,
        };
        let r = adapterkit_linalg::randomized_svd(&a, shape[0], shape[1], opts).unwrap();
        for (i, (got, want)) in r.s.iter().zip(&exact).take(20).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4 * want,
                "{name} σ{i}: {got} vs {want}"
            );
        }
        let again = adapterkit_linalg::randomized_svd(&a, shape[0], shape[1], opts).unwrap();
        assert_eq!(r, again);
        // Error of the rank-20 truncation, measured on the matrix.
        let k = r.s.len();
        let (rows, cols) = (shape[0], shape[1]);
        let mut err = 0.0;
        let mut norm = 0.0;
        for i in 0..rows {
            for j in 0..cols {
                let mut x = 0.0;
                for t in 0..20 {
                    x += r.u[i * k + t] * r.s[t] * r.vt[t * cols + j];
                }
                let v = a[i * cols + j] as f64;
                err += (v - x) * (v - x);
                norm += v * v;
            }
        }
        let optimal = (exact[20..].iter().map(|s| s * s).sum::<f64>() / norm).sqrt();
        let got = (err / norm).sqrt();
        assert!(
            got <= optimal * 1.01 + 1e-7,
            "{name}: {got} vs optimal {optimal}"
        );
    }
}

/// `inspect --spectrum --plot` writes a PNG of the stated size, atomically.
#[test]
fn spectrum_plot_is_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("s.png");
    let out = run(&[
        &"inspect",
        &svd_path("lora_patterns"),
        &"--spectrum",
        &"--plot",
        &png,
    ]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("model.layers.0.mlp.down_proj"), "{text}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (900, 560));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
