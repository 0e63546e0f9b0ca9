//! GGUF against llama.cpp's own files (`fixtures/gguf`, made by its `generate.py` with
//! `convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, `llama-export-lora` and gguf-py from the
//! llama-cpp-python 0.3.36 sdist): the container (every metadata type, alignment 64, every tensor
//! type), LoRA adapters read and written as llama.cpp's converter writes them (names, the q/k
//! permute, token_embd's transpose, alpha), and merges into GGUF bases equal to export-lora's.

mod common;

use std::path::Path;

use adapterkit_core::TensorSource;
use adapterkit_formats::gguf::{GgufFile, Value as G};
use adapterkit_formats::quants::dequantize;
use adapterkit_formats::safetensors::SafetensorsFile;
use common::{failed, fixtures, manifest, ok, run};
use serde_json::Value;

fn values(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f
        .tensor(name)
        .unwrap_or_else(|| panic!("no {name} in {}", f.path().display()));
    let mut raw = vec![0u8; t.len as usize];
    f.read_raw(name, 0, &mut raw).unwrap();
    dequantize(t.ggml_type, &raw, t.numel() as usize)
        .unwrap_or_else(|| panic!("{name}: {} not readable", t.ggml_type))
}

/// Every tensor of `want` is in `got` with the same ne, each value within `rel` of the tensor's
/// largest magnitude. Returns the worst relative difference.
fn gguf_close(got: &Path, want: &Path, rel: f64) -> f64 {
    let g = GgufFile::open(got).unwrap();
    let w = GgufFile::open(want).unwrap();
    let mut worst = 0f64;
    for t in w.tensors() {
        let gt = g.tensor(&t.name).unwrap_or_else(|| panic!("no {}", t.name));
        assert_eq!(gt.ne, t.ne, "{}", t.name);
        let (x, y) = (values(&g, &t.name), values(&w, &t.name));
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) as f64;
        let d = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0f64, f64::max)
            / scale;
        assert!(
            d <= rel,
            "{}: {} differs by {d:e} of its scale",
            got.display(),
            t.name
        );
        worst = worst.max(d);
    }
    worst
}

fn json_value(v: &G) -> Value {
    match v {
        G::Array(_, items) => Value::Array(items.iter().map(json_value).collect()),
        G::F32(x) => serde_json::json!(*x as f64),
        other => other.to_json(),
    }
}

#[test]
fn container_reads_every_metadata_and_tensor_type() {
    let dir = fixtures("gguf").join("container");
    let f = GgufFile::open(dir.join("all_types.gguf")).unwrap();
    let e: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("all_types.expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(f.version() as u64, e["version"].as_u64().unwrap());
    assert_eq!(f.alignment(), e["alignment"].as_u64().unwrap());
    assert_eq!(f.data_start(), e["data_offset"].as_u64().unwrap());
    let order: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    let want: Vec<&str> = e["kv_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(order, want);
    for (k, v) in f.metadata() {
        let ev = &e["metadata"][k];
        let ty = ev["type"].as_str().unwrap();
        let mine = format!("{:?}", v.value_type()).to_uppercase();
        let mine = match mine.as_str() {
            "U8" => "UINT8",
            "I8" => "INT8",
            "U16" => "UINT16",
            "I16" => "INT16",
            "U32" => "UINT32",
            "I32" => "INT32",
            "F32" => "FLOAT32",
            "U64" => "UINT64",
            "I64" => "INT64",
            "F64" => "FLOAT64",
            other => other,
        }
        .to_string();
        assert_eq!(mine, ty, "{k}: type");
        assert_eq!(json_value(v), ev["value"], "{k}: value");
    }
    // Every tensor: type, ne, offset; the plain and legacy-block types dequantize to gguf-py's
    // values exactly; the k-quants are located exactly (their dequantizers are the quantize work).
    let vals = SafetensorsFile::open(dir.join("all_types.expected.safetensors")).unwrap();
    let mut checked = 0;
    for t in f.tensors() {
        let et = &e["tensors"][&t.name];
        assert_eq!(
            t.ggml_type.name(),
            et["ggml_type"].as_str().unwrap(),
            "{}",
            t.name
        );
        assert_eq!(serde_json::json!(t.ne), et["ne"], "{}", t.name);
        assert_eq!(
            t.offset,
            et["absolute_offset"].as_u64().unwrap(),
            "{}",
            t.name
        );
        assert_eq!(t.len, et["n_bytes"].as_u64().unwrap(), "{}", t.name);
        let mut raw = vec![0u8; t.len as usize];
        f.read_raw(&t.name, 0, &mut raw).unwrap();
        if let Some(v) = dequantize(t.ggml_type, &raw, t.numel() as usize) {
            assert_eq!(v, vals.read_f32(&t.name).unwrap(), "{}", t.name);
            checked += 1;
        }
    }
    assert!(checked >= 8, "{checked} tensors dequantized");
    for other in ["extra_types.gguf", "nested_array.gguf"] {
        let g = GgufFile::open(dir.join(other)).unwrap();
        let e: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(other.replace(".gguf", ".expected.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            g.tensors().len(),
            e["tensors"].as_object().unwrap().len(),
            "{other}"
        );
        for t in g.tensors() {
            assert_eq!(
                t.ggml_type.name(),
                e["tensors"][&t.name]["ggml_type"].as_str().unwrap()
            );
        }
    }
    // inspect describes a GGUF model.
    let o = run(&[&"inspect", &dir.join("all_types.gguf"), &"--json"]);
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["tensor_count"], 14);
}

#[test]
fn gguf_lora_adapters_read_back_to_peft_merges() {
    let dir = fixtures("gguf");
    let tmp = tempfile::tempdir().unwrap();
    for c in manifest("gguf") {
        let name = c["name"].as_str().unwrap();
        for conv in c["conversions"].as_array().into_iter().flatten() {
            let Some(p) = conv["path"].as_str() else {
                continue;
            };
            let out = tmp.path().join(format!(
                "{name}-{}.safetensors",
                conv["outtype"].as_str().unwrap()
            ));
            ok(&run(&[
                &"merge",
                &dir.join("base_hf"),
                &dir.join(p),
                &"-o",
                &out,
            ]));
            // llama.cpp keeps one alpha: PEFT's patterns and rsLoRA are lost by its converter,
            // so the GGUF file equals PEFT only where the scales agree.
            let agree = c["modules"]
                .as_object()
                .is_none_or(|o| o.values().all(|m| m["scales_agree"] == true));
            let tol = match conv["outtype"].as_str().unwrap() {
                "f32" => 1e-5,
                "f16" => 2e-3,
                _ => 2e-2,
            };
            let got = adapterkit_formats::Checkpoint::open(&out).unwrap();
            let want = SafetensorsFile::open(dir.join(c["merged_peft"].as_str().unwrap())).unwrap();
            let mut worst = 0f64;
            for t in want.tensors() {
                let (x, y) = (
                    got.read_f32(&t.name).unwrap(),
                    want.read_f32(&t.name).unwrap(),
                );
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let d = x
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (a - b).abs() as f64)
                    .fold(0f64, f64::max)
                    / scale;
                worst = worst.max(d);
            }
            if agree {
                assert!(worst <= tol, "{name} {p}: {worst:e}");
            } else {
                assert!(
                    worst > 1e-3,
                    "{name} {p}: llama.cpp's converter drops these scales, yet it matches PEFT"
                );
            }
        }
    }
}

#[test]
fn peft_to_gguf_matches_convert_lora_to_gguf_and_keeps_every_scale() {
    let dir = fixtures("gguf");
    let tmp = tempfile::tempdir().unwrap();
    for c in manifest("gguf") {
        let name = c["name"].as_str().unwrap();
        let Some(adapter) = c["adapter"].as_str().map(|a| dir.join(a)) else {
            continue;
        };
        let out = tmp.path().join(format!("{name}.gguf"));
        let o = run(&[
            &"convert",
            &adapter,
            &"--to",
            &"gguf",
            &"--base",
            &dir.join("base_hf"),
            &"-o",
            &out,
        ]);
        let reference = c["conversions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["outtype"] == "f32")
            .unwrap();
        if reference["path"].is_null() {
            // llama.cpp refuses lora_bias and DoRA; so does adapterkit, saying what would be lost.
            let e = failed(&o);
            assert!(
                e.contains("DoRA") || e.contains("bias") || e.contains("add"),
                "{name}: {e}"
            );
            continue;
        }
        ok(&o);
        let mine = GgufFile::open(&out).unwrap();
        let theirs = GgufFile::open(dir.join(reference["path"].as_str().unwrap())).unwrap();
        for key in ["general.architecture", "general.type", "adapter.type"] {
            assert_eq!(mine.get(key), theirs.get(key), "{name}: {key}");
        }
        let agree = c["modules"]
            .as_object()
            .is_none_or(|o| o.values().all(|m| m["scales_agree"] == true));
        let names = |f: &GgufFile| {
            let mut v: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&mine), names(&theirs), "{name}: tensor names");
        if agree {
            // Same alpha, same tensors, value for value.
            assert_eq!(
                mine.get("adapter.lora.alpha"),
                theirs.get("adapter.lora.alpha"),
                "{name}"
            );
            for t in theirs.tensors() {
                assert_eq!(mine.tensor(&t.name).unwrap().ne, t.ne, "{name}: {}", t.name);
                assert_eq!(
                    values(&mine, &t.name),
                    values(&theirs, &t.name),
                    "{name}: {}",
                    t.name
                );
            }
        }
        // Read back with the HF base: PEFT's merge, every scale kept (where llama.cpp's own
        // converter loses alpha_pattern and rsLoRA).
        let merged = tmp.path().join(format!("{name}.safetensors"));
        ok(&run(&[
            &"merge",
            &dir.join("base_hf"),
            &out,
            &"-o",
            &merged,
        ]));
        let got = adapterkit_formats::Checkpoint::open(&merged).unwrap();
        let want = SafetensorsFile::open(dir.join(c["merged_peft"].as_str().unwrap())).unwrap();
        for t in want.tensors() {
            let (x, y) = (
                got.read_f32(&t.name).unwrap(),
                want.read_f32(&t.name).unwrap(),
            );
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d <= 1e-5 * scale, "{name}: {}: {d}", t.name);
        }
    }
}

#[test]
fn merges_into_gguf_bases_equal_export_lora() {
    let dir = fixtures("gguf");
    let tmp = tempfile::tempdir().unwrap();
    let mut compared = 0;
    for c in manifest("gguf") {
        for e in c["exports"].as_array().unwrap() {
            let Some(want) = e["path"].as_str() else {
                continue;
            };
            let adapters = e["adapters"].as_array().unwrap();
            let out = tmp.path().join(format!("{compared}.gguf"));
            let mut cmd = common::bin();
            cmd.arg("merge").arg(dir.join(e["base"].as_str().unwrap()));
            for a in adapters {
                cmd.arg(dir.join(a["path"].as_str().unwrap()));
            }
            let w: Vec<String> = adapters
                .iter()
                .map(|a| a["scale"].as_f64().unwrap().to_string())
                .collect();
            cmd.arg("--weights").arg(w.join(",")).arg("-o").arg(&out);
            ok(&cmd.output().unwrap());
            // export-lora writes merged tensors as F16 for F16, BF16 and Q8_0 bases; adapterkit keeps
            // every tensor in its own type: F16/BF16 rounded once, Q8_0 requantized with ggml's
            // quantizer (within one Q8_0 step of export-lora's F16 values).
            let base = e["base"].as_str().unwrap();
            let tol = if base.contains("f32") { 1e-6 } else { 1e-2 };
            gguf_close(&out, &dir.join(want), tol);
            let (b, o) = (
                GgufFile::open(dir.join(base)).unwrap(),
                GgufFile::open(&out).unwrap(),
            );
            for (tb, to) in b.tensors().iter().zip(o.tensors()) {
                assert_eq!(
                    (&tb.name, tb.ggml_type),
                    (&to.name, to.ggml_type),
                    "{base}: types kept"
                );
            }
            compared += 1;
        }
        // A PEFT adapter goes into the GGUF base directly (names and q/k permute mapped).
        if c["adapter"].is_null() {
            continue;
        }
        let out = tmp
            .path()
            .join(format!("{}-peft.gguf", c["name"].as_str().unwrap()));
        let o = run(&[
            &"merge",
            &dir.join("base_f32.gguf"),
            &dir.join(c["adapter"].as_str().unwrap()),
            &"-o",
            &out,
        ]);
        ok(&o);
        // Every case, DoRA and lora_bias included (llama.cpp's converter refuses those), equals
        // PEFT's merge once names are mapped back and the q/k rows un-permuted.
        same_as_peft_merge(&out, &dir.join(c["merged_peft"].as_str().unwrap()));
        if c["name"] == "dora" || c["name"] == "lora_bias" {
            continue;
        }
        if let Some(e) = c["exports"].as_array().unwrap().iter().find(|e| {
            e["base"] == "base_f32.gguf"
                && e["adapters"].as_array().unwrap().len() == 1
                && e["adapters"][0]["scale"] == 1.0
                && e["path"].is_string()
                && e["adapters"][0]["path"]
                    .as_str()
                    .unwrap()
                    .ends_with("adapter_f32.gguf")
        }) {
            let agree = c["modules"]
                .as_object()
                .is_none_or(|o| o.values().all(|m| m["scales_agree"] == true));
            if agree {
                gguf_close(&out, &dir.join(e["path"].as_str().unwrap()), 1e-6);
            }
        }
    }
    assert!(compared >= 10, "{compared} exports compared");
}

/// A merged GGUF (Llama, base_f32) against PEFT's merged safetensors: names through the table,
/// q/k rows through the inverse of convert_hf_to_gguf's permute.
fn same_as_peft_merge(got: &Path, peft: &Path) {
    use adapterkit_formats::gguf_lora::{permute_rows, ArchMap};
    let g = GgufFile::open(got).unwrap();
    let want = SafetensorsFile::open(peft).unwrap();
    let map = ArchMap::for_arch("llama").unwrap();
    for t in want.tensors() {
        let (module, suffix) = t.name.rsplit_once('.').unwrap();
        let gname = format!("{}.{suffix}", map.to_gguf(module).unwrap());
        let mut x = values(&g, &gname);
        let y = want.read_f32(&t.name).unwrap();
        let heads = if module.ends_with("q_proj") {
            Some(4)
        } else if module.ends_with("k_proj") {
            Some(2)
        } else {
            None
        };
        if let Some(h) = heads {
            let rows = t.shape[0] as usize;
            let w = y.len() / rows;
            let perm = permute_rows(rows, h);
            let mut un = vec![0f32; x.len()];
            for (gr, &hr) in perm.iter().enumerate() {
                un[hr * w..(hr + 1) * w].copy_from_slice(&x[gr * w..(gr + 1) * w]);
            }
            x = un;
        }
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            d <= 1e-5 * scale,
            "{}: {} differs by {d}",
            got.display(),
            t.name
        );
    }
}

#[test]
fn gguf_errors_are_specific() {
    let dir = fixtures("gguf");
    let tmp = tempfile::tempdir().unwrap();
    // A model is not an adapter, an adapter is not a base, and GGUF bases write GGUF.
    let e = failed(&run(&[
        &"merge",
        &dir.join("base_hf"),
        &dir.join("base_f32.gguf"),
        &"-o",
        &tmp.path().join("x.safetensors"),
    ]));
    assert!(e.contains("not an adapter") || e.contains("model"), "{e}");
    let e = failed(&run(&[
        &"merge",
        &dir.join("plain/adapter_f32.gguf"),
        &dir.join("plain/adapter"),
        &"-o",
        &tmp.path().join("x.gguf"),
    ]));
    assert!(e.contains("adapter, not a model"), "{e}");
    let e = failed(&run(&[
        &"merge",
        &dir.join("base_f32.gguf"),
        &dir.join("plain/adapter"),
        &"-o",
        &tmp.path().join("x.safetensors"),
    ]));
    assert!(e.contains(".gguf"), "{e}");
    // Truncated: the error names the tensor that runs past the end.
    let bytes = std::fs::read(dir.join("plain/adapter_f32.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let e = failed(&run(&[&"inspect", &cut]));
    assert!(e.contains("past the end"), "{e}");
    // Without a base, GGUF's architecture and head counts are unknown.
    let e = failed(&run(&[
        &"convert",
        &dir.join("plain/adapter"),
        &"--to",
        &"gguf",
        &"-o",
        &tmp.path().join("y.gguf"),
    ]));
    assert!(e.contains("--base") && e.contains("--arch"), "{e}");
    assert!(!tmp.path().join("y.gguf").exists());
}
