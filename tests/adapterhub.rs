//! AdapterHub's `adapters` library (`fixtures/adapterhub`, made by its `generate.py` with
//! adapters 1.3.0 / transformers 4.57.6 in their own venv): LoRA, IA3, DoRA and VeRA adapters merge as
//! the library's own `merge_adapter` computes them (its merged state dicts); every part that adds
//! computation (bottleneck adapters, Compacter, prefix and prompt tuning, ReFT, and the unions
//! holding them) is refused with the reason, naming the mergeable parts; pickled weights are
//! refused; `inspect` lists every part.

mod common;

use adapterkit_core::TensorSource;
use adapterkit_formats::safetensors::SafetensorsFile;
use common::{failed, fixtures, ok, run};
use serde_json::Value;

/// Every tensor of `w` (the library's merged state) in `g` within 1e-6 of its scale.
fn close_to(g: &SafetensorsFile, w: &SafetensorsFile, label: &str) {
    for t in w.tensors() {
        let (x, y) = (g.read_f32(&t.name).unwrap(), w.read_f32(&t.name).unwrap());
        let scale = y.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-30);
        let d = x
            .iter()
            .zip(&y)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        assert!(d <= 1e-6 * scale, "{label}: {}: {d}", t.name);
    }
}

fn manifest() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures("adapterhub").join("manifest.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn mergeable_adapters_equal_the_librarys_merge() {
    let dir = fixtures("adapterhub");
    let tmp = tempfile::tempdir().unwrap();
    let mut merged = 0;
    for c in manifest()["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let m = &c["merge"];
        let only_mergeable = m["non_mergeable_parts"]
            .as_array()
            .is_some_and(|a| a.is_empty());
        if m["status"] != "ok" || !only_mergeable {
            continue;
        }
        let out = tmp.path().join(format!("{name}.safetensors"));
        let base = dir.join("bases").join(c["base"].as_str().unwrap());
        ok(&run(&[
            &"merge",
            &base,
            &dir.join(c["dir"].as_str().unwrap()),
            &"-o",
            &out,
        ]));
        let got = SafetensorsFile::open(&out).unwrap();
        let want = SafetensorsFile::open(dir.join(m["merged_state"].as_str().unwrap())).unwrap();
        close_to(&got, &want, name);
        merged += 1;
    }
    // LoRA (q/v, all, leave_out, BERT and Llama), IA3 (α = 1 and 2), scale mode, DoRA, VeRA.
    assert!(merged >= 11, "{merged} cases merged");
}

#[test]
fn parts_that_add_computation_are_refused_with_the_reason() {
    let dir = fixtures("adapterhub");
    let tmp = tempfile::tempdir().unwrap();
    let mut refused = 0;
    for c in manifest()["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let parts = c["merge"]["non_mergeable_parts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let gated = c["merge"]["status"] == "error" && parts.is_empty();
        if parts.is_empty() && !gated {
            continue;
        }
        let out = tmp.path().join(format!("{name}.safetensors"));
        let base = dir.join("bases").join(c["base"].as_str().unwrap());
        let e = failed(&run(&[
            &"merge",
            &base,
            &dir.join(c["dir"].as_str().unwrap()),
            &"-o",
            &out,
        ]));
        assert!(
            e.contains("cannot be folded into the weights"),
            "{name}: {e}"
        );
        for p in &parts {
            let word = match p.as_str().unwrap() {
                "bottleneck" => "bottleneck",
                "prefix_tuning" => "prefix tuning",
                "prompt_tuning" => "prompt tuning",
                "reft" => "ReFT",
                other => other,
            };
            assert!(e.contains(word), "{name}: {word} not named: {e}");
        }
        // A union whose LoRA part the library merges names that part.
        if c["merge"]["status"] == "ok" && !parts.is_empty() {
            assert!(e.contains("mergeable part"), "{name}: {e}");
        }
        assert!(!out.exists(), "{name}: nothing written");
        refused += 1;
    }
    assert!(refused >= 18, "{refused} cases refused");
}

#[test]
fn pickles_are_refused_and_inspect_lists_every_part() {
    let dir = fixtures("adapterhub");
    let m = manifest();
    let pickle = dir.join(m["pickle_case"]["dir"].as_str().unwrap());
    let e = failed(&run(&[&"inspect", &pickle]));
    assert!(
        e.contains("pickle") && e.contains("use_safetensors=True"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let e = failed(&run(&[
        &"merge",
        &dir.join("bases/bert"),
        &pickle,
        &"-o",
        &tmp.path().join("x"),
    ]));
    assert!(e.contains("pickle"), "{e}");
    for c in m["cases"].as_array().unwrap() {
        let o = run(&[&"inspect", &dir.join(c["dir"].as_str().unwrap()), &"--json"]);
        ok(&o);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["format"], "adapterhub", "{}", c["name"]);
        let n: u64 = v["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["tensors"].as_u64().unwrap())
            .sum();
        assert_eq!(
            n as usize,
            c["tensors"].as_object().unwrap().len(),
            "{}: every tensor in a part",
            c["name"]
        );
        let mergeable = c["merge"]["non_mergeable_parts"]
            .as_array()
            .is_some_and(|a| a.is_empty())
            && c["merge"]["status"] == "ok";
        assert_eq!(v["mergeable"], mergeable, "{}", c["name"]);
    }
}

#[test]
fn lora_and_ia3_convert_to_the_peft_twin_exactly() {
    // The generator saved each LoRA and IA3 case's weights as a PEFT adapter too (IA3 scaled by
    // α); `convert --to peft` must give the same tensors, byte for byte.
    let dir = fixtures("adapterhub");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for c in manifest()["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        // IA3 converts where the layers have no bias (PEFT's IA3 scales the bias, the library's
        // merge does not): the Llama cases, with the base to show it.
        let ia3 = c["family"] == "ia3" && c["base"] == "llama";
        if (c["family"] != "lora" && !ia3) || c["peft"]["dir"].as_str().is_none() {
            continue;
        }
        let out = tmp.path().join(name);
        let base = dir.join("bases").join(c["base"].as_str().unwrap());
        ok(&run(&[
            &"convert",
            &dir.join(c["dir"].as_str().unwrap()),
            &"--to",
            &"peft",
            &"-o",
            &out,
            &"--base",
            &base,
        ]));
        let got = SafetensorsFile::open(out.join("adapter_model.safetensors")).unwrap();
        let twin = dir
            .join(c["peft"]["dir"].as_str().unwrap())
            .join("adapter_model.safetensors");
        let want = SafetensorsFile::open(twin).unwrap();
        assert_eq!(got.tensors().len(), want.tensors().len(), "{name}");
        for t in want.tensors() {
            let mut a = vec![0u8; t.len as usize];
            let mut b = vec![0u8; t.len as usize];
            got.read_bytes(&t.name, 0, &mut a)
                .unwrap_or_else(|e| panic!("{name}: {}: {e}", t.name));
            want.read_bytes(&t.name, 0, &mut b).unwrap();
            assert!(a == b, "{name}: {}", t.name);
        }
        n += 1;
    }
    assert!(n >= 6, "{n} LoRA and IA3 cases converted");
}

#[test]
fn check_reads_every_adapter_and_refuses_the_pickle() {
    let dir = fixtures("adapterhub");
    let m = manifest();
    for c in m["cases"].as_array().unwrap() {
        let o = run(&[&"check", &dir.join(c["dir"].as_str().unwrap())]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}: {}",
            c["name"],
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let o = run(&[
        &"check",
        &dir.join(m["pickle_case"]["dir"].as_str().unwrap()),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("pickle"));
}

#[test]
fn composition_setups_are_metadata() {
    let dir = fixtures("adapterhub");
    let tmp = tempfile::tempdir().unwrap();
    for c in manifest()["setup_cases"].as_array().unwrap() {
        let setup = dir.join(c["dir"].as_str().unwrap());
        let o = run(&[&"inspect", &setup, &"--json"]);
        ok(&o);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let ty = c["adapter_setup_json"]["adapter_setup"]["type"]
            .as_str()
            .unwrap();
        assert!(
            v["composition"].as_str().unwrap().starts_with(ty),
            "{}: {}",
            c["name"],
            v["composition"]
        );
        assert_eq!(v["mergeable"], false);
        let e = failed(&run(&[
            &"merge",
            &dir.join("bases/bert"),
            &setup,
            &"-o",
            &tmp.path().join("x.safetensors"),
        ]));
        assert!(e.contains("composition setup") && e.contains(ty), "{e}");
        // Its adapters are checked one by one.
        let o = run(&[&"check", &setup]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn peft_twins_convert_back_to_the_librarys_files() {
    // PEFT → adapters: the library's own adapter_config (targets by role, leave_out) and tensors,
    // byte for byte; and the written adapter merges as the library merged the original.
    let dir = fixtures("adapterhub");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for c in manifest()["cases"].as_array().unwrap() {
        let ia3 = c["family"] == "ia3" && c["base"] == "llama";
        if (c["family"] != "lora" && !ia3) || c["peft"]["dir"].as_str().is_none() {
            continue;
        }
        let case = c["name"].as_str().unwrap();
        let orig = dir.join(c["dir"].as_str().unwrap());
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(orig.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let out = tmp.path().join(case).join(cfg["name"].as_str().unwrap());
        let base = dir.join("bases").join(c["base"].as_str().unwrap());
        ok(&run(&[
            &"convert",
            &dir.join(c["peft"]["dir"].as_str().unwrap()),
            &"--to",
            &"adapterhub",
            &"-o",
            &out,
            &"--base",
            &base,
        ]));
        let got: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        // PEFT's IA3 holds lora_B·α: with α ≠ 1 the same update comes back as α = 1.
        let alpha_one = !ia3 || cfg["config"]["alpha"] == 1;
        if alpha_one {
            assert_eq!(got["config"], cfg["config"], "{case}");
            let (g, w) = (
                SafetensorsFile::open(out.join("adapter.safetensors")).unwrap(),
                SafetensorsFile::open(orig.join("adapter.safetensors")).unwrap(),
            );
            assert_eq!(g.tensors().len(), w.tensors().len(), "{case}");
            for t in w.tensors() {
                assert_eq!(
                    g.read_f32(&t.name).unwrap(),
                    w.read_f32(&t.name).unwrap(),
                    "{case}: {}",
                    t.name
                );
            }
        }
        for k in ["name", "model_class", "model_type", "hidden_size"] {
            assert_eq!(got[k], cfg[k], "{case}: {k}");
        }
        let merged = tmp.path().join(format!("{case}.safetensors"));
        ok(&run(&[&"merge", &base, &out, &"-o", &merged]));
        let (g, w) = (
            SafetensorsFile::open(&merged).unwrap(),
            SafetensorsFile::open(dir.join(c["merge"]["merged_state"].as_str().unwrap())).unwrap(),
        );
        close_to(&g, &w, case);
        n += 1;
    }
    assert!(n >= 6, "{n} cases");
    // Modules the library cannot target (o_proj, gate_proj) are refused by name, nothing written.
    let out = tmp.path().join("plain");
    let e = failed(&run(&[
        &"convert",
        &fixtures("gguf").join("plain/adapter"),
        &"--to",
        &"adapterhub",
        &"-o",
        &out,
    ]));
    assert!(
        e.contains("cannot target") && (e.contains("o_proj") || e.contains("gate_proj")),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn mergeable_parts_of_a_union_merge_as_the_library_merges_them() {
    // `merge --mergeable-parts`: the union's LoRA/IA3 part folded in as merge_adapter does, the
    // bottleneck/prefix part named as left out (it is still needed at inference).
    let dir = fixtures("adapterhub");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for c in manifest()["cases"].as_array().unwrap() {
        let parts = c["merge"]["non_mergeable_parts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if c["merge"]["status"] != "ok" || parts.is_empty() {
            continue;
        }
        let name = c["name"].as_str().unwrap();
        let out = tmp.path().join(format!("{name}.safetensors"));
        let base = dir.join("bases").join(c["base"].as_str().unwrap());
        let o = run(&[
            &"merge",
            &base,
            &dir.join(c["dir"].as_str().unwrap()),
            &"-o",
            &out,
            &"--mergeable-parts",
        ]);
        ok(&o);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("not merged") && err.contains("at inference"),
            "{name}: {err}"
        );
        let (g, w) = (
            SafetensorsFile::open(&out).unwrap(),
            SafetensorsFile::open(dir.join(c["merge"]["merged_state"].as_str().unwrap())).unwrap(),
        );
        close_to(&g, &w, name);
        n += 1;
    }
    assert!(n >= 2, "{n} unions");
    // An adapter with no mergeable part is still refused.
    let e = failed(&run(&[
        &"merge",
        &dir.join("bases/bert"),
        &dir.join("cases/bert_seq_bn/adapter"),
        &"-o",
        &tmp.path().join("x.safetensors"),
        &"--mergeable-parts",
    ]));
    assert!(e.contains("No part of it is a weight update"), "{e}");
}
