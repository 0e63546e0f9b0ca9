//! Hugging Face → GGUF conversion and llama.cpp's quantization schemes against llama.cpp itself
//! (`fixtures/gguf_convert`, made by its `generate.py` with `convert_hf_to_gguf.py` and
//! `llama-quantize` from the llama-cpp-python 0.3.36 sdist): for every committed model
//! (llama/mistral with SentencePiece, qwen2 with biases, qwen3 with q/k norms, tied or not, rows
//! that are and are not multiples of 256 and of 32, 8 layers for llama-quantize's layer pattern),
//! `adapterkit quantize HF -o x.gguf --type T` writes the converter's file for f32/f16/bf16 (every
//! KV, tensor name, type, order and byte) and llama-quantize's file for nine schemes (types chosen
//! per tensor, fallbacks, tensor order, KVs and every byte).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use adapterkit_formats::gguf::{GgufFile, Value};
use common::{failed, fixtures, ok, run};
use serde_json::Value as Json;

fn sha256(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(b))
}

/// A KV as the manifest writes it: `[key, type, value]`, arrays as `{element_type, count,
/// sha256, value|first20}`.
fn kv_matches(v: &Value, want_ty: &str, want: &Json) -> Result<(), String> {
    let ty = format!("{:?}", v.value_type()).to_uppercase();
    let map_ty = |t: &str| {
        match t {
            "U8" => "UINT8",
            "I8" => "INT8",
            "U16" => "UINT16",
            "I16" => "INT16",
            "U32" => "UINT32",
            "I32" => "INT32",
            "U64" => "UINT64",
            "I64" => "INT64",
            "F32" => "FLOAT32",
            "F64" => "FLOAT64",
            other => other,
        }
        .to_string()
    };
    let ty = map_ty(&ty);
    if ty != want_ty {
        return Err(format!("type {ty}, expected {want_ty}"));
    }
    match v {
        Value::Array(et, items) => {
            let et = map_ty(&format!("{et:?}").to_uppercase());
            if want["element_type"] != Json::String(et.clone()) {
                return Err(format!("array of {et}, expected {}", want["element_type"]));
            }
            if want["count"].as_u64() != Some(items.len() as u64) {
                return Err(format!("{} items, expected {}", items.len(), want["count"]));
            }
            let mut payload = Vec::new();
            for it in items {
                match it {
                    Value::String(s) => {
                        payload.extend_from_slice(&(s.len() as u64).to_le_bytes());
                        payload.extend_from_slice(s.as_bytes());
                    }
                    Value::F32(x) => payload.extend_from_slice(&x.to_le_bytes()),
                    Value::I32(x) => payload.extend_from_slice(&x.to_le_bytes()),
                    Value::U32(x) => payload.extend_from_slice(&x.to_le_bytes()),
                    other => return Err(format!("unexpected array item {other:?}")),
                }
            }
            if want["sha256"].as_str() != Some(sha256(&payload).as_str()) {
                let first: Vec<String> = items.iter().take(5).map(|i| format!("{i}")).collect();
                return Err(format!(
                    "array payload differs (first items {first:?}, expected {:?})",
                    want.get("first20").or(want.get("value"))
                ));
            }
            Ok(())
        }
        Value::String(s) => (want.as_str() == Some(s))
            .then_some(())
            .ok_or(format!("{s:?} vs {want}")),
        Value::Bool(b) => (want.as_bool() == Some(*b))
            .then_some(())
            .ok_or(format!("{b} vs {want}")),
        Value::F32(x) => (want.as_f64() == Some(f64::from(*x)))
            .then_some(())
            .ok_or(format!("{x} vs {want}")),
        other => {
            let n = other.as_u64().map(|u| u as f64).or(other.as_f64());
            (n == want.as_f64())
                .then_some(())
                .ok_or(format!("{other} vs {want}"))
        }
    }
}

fn check_file(got: &Path, want: &Json, kvs: &[Json], label: &str) {
    let f = GgufFile::open(got).unwrap_or_else(|e| panic!("{label}: {e}"));
    let md = f.metadata();
    let keys: Vec<&str> = md.iter().map(|(k, _)| k.as_str()).collect();
    let want_keys: Vec<&str> = kvs.iter().map(|k| k[0].as_str().unwrap()).collect();
    assert_eq!(keys, want_keys, "{label}: KV keys and order");
    for ((k, v), w) in md.iter().zip(kvs) {
        if let Err(e) = kv_matches(v, w[1].as_str().unwrap(), &w[2]) {
            panic!("{label}: {k}: {e}");
        }
    }
    let want_t = want["tensors"].as_array().unwrap();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    let want_names: Vec<&str> = want_t.iter().map(|t| t[0].as_str().unwrap()).collect();
    assert_eq!(names, want_names, "{label}: tensor order");
    for (t, w) in f.tensors().iter().zip(want_t) {
        assert_eq!(
            t.ggml_type.name(),
            w[1].as_str().unwrap(),
            "{label}: {} type",
            t.name
        );
        let ne: Vec<u64> = w[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(t.ne, ne, "{label}: {} ne", t.name);
        let mut raw = vec![0u8; t.len as usize];
        f.read_raw(&t.name, 0, &mut raw).unwrap();
        assert_eq!(
            sha256(&raw),
            w[5].as_str().unwrap(),
            "{label}: {} ({}) bytes",
            t.name,
            t.ggml_type
        );
    }
    assert_eq!(
        std::fs::metadata(got).unwrap().len(),
        want["file_size"].as_u64().unwrap(),
        "{label}: file size"
    );
}

#[test]
fn conversions_and_schemes_equal_llama_cpp() {
    let dir = fixtures("gguf_convert");
    let m: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut files = 0;
    let mut cases = BTreeMap::new();
    for c in m["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let hf = dir.join(name).join("hf");
        if !hf.join("config.json").is_file() {
            continue; // cache-only cases (the full Llama 3 / Qwen2 vocabularies)
        }
        match name {
            // Refused on purpose, checked below.
            "mixtral_moe" | "bpe_unrecognized" | "llama_hf_tokjson" => continue,
            _ => {}
        }
        for conv in c["conversions"].as_array().unwrap() {
            let t = conv["outtype"].as_str().unwrap();
            if conv["rc"].as_i64() != Some(0) || t == "q8_0" {
                // convert --outtype q8_0 writes llama-quantize's types in the converter's order;
                // adapterkit's q8_0 is llama-quantize's file (checked with the schemes).
                continue;
            }
            let out = tmp.path().join(format!("{name}-{t}.gguf"));
            ok(&run(&[&"quantize", &hf, &"-o", &out, &"--type", &t]));
            let kvs = conv["output"]["kv"].as_array().unwrap();
            check_file(&out, &conv["output"], kvs, &format!("{name} {t}"));
            files += 1;
        }
        let f32_kv = c["conversions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["outtype"] == "f32")
            .unwrap()["output"]["kv"]
            .as_array()
            .unwrap()
            .clone();
        for q in c["quantizations"].as_array().into_iter().flatten() {
            let s = q["scheme"].as_str().unwrap();
            if q["rc"].as_i64() != Some(0) {
                continue;
            }
            let rel = &q["output"]["kv"]["relative_to_input"];
            let moved: Vec<Json> = rel["moved_to_end"].as_array().unwrap().clone();
            let mut kvs: Vec<Json> = f32_kv
                .iter()
                .filter(|k| !moved.iter().any(|m| m[0] == k[0]))
                .cloned()
                .collect();
            kvs.extend(moved);
            let out = tmp.path().join(format!("{name}-{s}.gguf"));
            ok(&run(&[
                &"quantize",
                &hf,
                &"-o",
                &out,
                &"--type",
                &s.to_ascii_lowercase(),
            ]));
            check_file(&out, &q["output"], &kvs, &format!("{name} {s}"));
            files += 1;
        }
        cases.insert(name.to_string(), ());
    }
    assert!(cases.len() >= 6, "cases checked: {:?}", cases.keys());
    assert!(files >= 61, "{files} files checked");
}

#[test]
fn requantizing_a_gguf_model_equals_llama_quantize() {
    // llama-quantize from the converter's bf16 file (the committed input) gives the same file as
    // from f32; adapterkit reads the GGUF and requantizes it.
    let dir = fixtures("gguf_convert");
    let m: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let c = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mistral_spm")
        .unwrap();
    let input = dir.join(c["quantize_input_committed"].as_str().unwrap());
    let bf16 = c["conversions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["outtype"] == "bf16")
        .unwrap();
    for q in c["quantizations"].as_array().unwrap() {
        let s = q["scheme"].as_str().unwrap();
        let out = tmp.path().join(format!("{s}.gguf"));
        ok(&run(&[&"quantize", &input, &"-o", &out, &"--type", &s]));
        let moved: Vec<Json> = q["output"]["kv"]["relative_to_input"]["moved_to_end"]
            .as_array()
            .unwrap()
            .clone();
        let mut kvs: Vec<Json> = bf16["output"]["kv"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| !moved.iter().any(|m| m[0] == k[0]))
            .cloned()
            .collect();
        kvs.extend(moved);
        check_file(&out, &q["output"], &kvs, &format!("mistral_spm bf16 → {s}"));
    }
}

#[test]
fn unknown_architectures_and_tokenizers_are_refused() {
    let dir = fixtures("gguf_convert");
    let tmp = tempfile::tempdir().unwrap();
    for (case, needle) in [
        ("mixtral_moe", "MixtralForCausalLM"),
        ("llama_hf_tokjson", "tokenizer"),
    ] {
        let hf = dir.join(case).join("hf");
        if !hf.is_dir() {
            continue;
        }
        let out = tmp.path().join(format!("{case}.gguf"));
        let e = failed(&run(&[&"quantize", &hf, &"-o", &out, &"--type", &"f16"]));
        assert!(e.contains(needle), "{case}: {e}");
        assert!(!out.exists(), "{case}: no output after a refusal");
    }
    // llama.cpp refuses this locally trained byte-level BPE because the hash of its token ids is
    // not in its list; adapterkit reads the pre-tokenizer's definition (GPT-2's ByteLevel regex).
    let out = tmp.path().join("bpe.gguf");
    ok(&run(&[
        &"quantize",
        &dir.join("bpe_unrecognized/hf"),
        &"-o",
        &out,
        &"--type",
        &"f16",
    ]));
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("tokenizer.ggml.pre"), Some("gpt-2"));
    assert_eq!(f.get_str("tokenizer.ggml.model"), Some("gpt2"));
    // One shard of a split model is refused: its tensors are only part of the model.
    let shard = tmp.path().join("shard-00001-of-00002.gguf");
    adapterkit_formats::gguf::write_small(
        &shard,
        &[
            ("general.architecture".into(), Value::String("llama".into())),
            ("split.count".into(), Value::U16(2)),
        ],
        &[(
            adapterkit_formats::gguf::GgufSpec::from_shape(
                "token_embd.weight",
                &[2, 32],
                adapterkit_formats::gguf::GgmlType::F32,
            ),
            vec![0u8; 256],
        )],
    )
    .unwrap();
    let e = failed(&run(&[
        &"quantize",
        &shard,
        &"-o",
        &tmp.path().join("s.gguf"),
        &"--type",
        &"q8_0",
    ]));
    assert!(e.contains("shard") && e.contains("2 files"), "{e}");
    // An architecture the converter does not know is named with what is missing.
    let hf = tmp.path().join("gpt2");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        r#"{"architectures":["GPT2LMHeadModel"],"n_layer":1}"#,
    )
    .unwrap();
    adapterkit_formats::safetensors::write_small(
        &hf.join("model.safetensors"),
        &[(
            adapterkit_formats::safetensors::TensorSpec {
                name: "wte.weight".into(),
                dtype: adapterkit_core::DType::F32,
                shape: vec![2, 2],
            },
            vec![0u8; 16],
        )],
        None,
    )
    .unwrap();
    let e = failed(&run(&[
        &"quantize",
        &hf,
        &"-o",
        &tmp.path().join("g.gguf"),
        &"--type",
        &"q8_0",
    ]));
    assert!(
        e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM"),
        "{e}"
    );
}

#[test]
fn merging_into_gguf_equals_merging_then_quantizing() {
    // One streaming command equals the two-step route through a merged checkpoint, byte for byte
    // (merged tensors are rounded to the base dtype before conversion), for a float and a
    // quantized scheme, DoRA included.
    let g = fixtures("gguf");
    let tmp = tempfile::tempdir().unwrap();
    for case in ["plain", "dora"] {
        let adapter = g.join(case).join("adapter");
        let merged = tmp.path().join(format!("{case}-merged"));
        ok(&run(&[
            &"merge",
            &g.join("base_hf"),
            &adapter,
            &"-o",
            &merged,
        ]));
        for q in ["f16", "q8_0", "q4_k_m"] {
            let one = tmp.path().join(format!("{case}-{q}-one.gguf"));
            let two = tmp.path().join(format!("{case}-{q}-two.gguf"));
            ok(&run(&[
                &"merge",
                &g.join("base_hf"),
                &adapter,
                &"-o",
                &one,
                &"--quant",
                &q,
            ]));
            // The merged checkpoint has no tokenizer: give it the base's.
            for f in ["tokenizer.model", "tokenizer_config.json"] {
                std::fs::copy(g.join("base_hf").join(f), merged.join(f)).unwrap();
            }
            ok(&run(&[&"quantize", &merged, &"-o", &two, &"--type", &q]));
            // general.name comes from the directory name; everything else must be equal.
            let (a, b) = (GgufFile::open(&one).unwrap(), GgufFile::open(&two).unwrap());
            assert_eq!(a.tensors().len(), b.tensors().len());
            for (x, y) in a.tensors().iter().zip(b.tensors()) {
                assert_eq!(
                    (&x.name, x.ggml_type, &x.ne),
                    (&y.name, y.ggml_type, &y.ne),
                    "{case} {q}"
                );
                let (mut rx, mut ry) = (vec![0u8; x.len as usize], vec![0u8; y.len as usize]);
                a.read_raw(&x.name, 0, &mut rx).unwrap();
                b.read_raw(&y.name, 0, &mut ry).unwrap();
                assert!(rx == ry, "{case} {q}: {} differs", x.name);
            }
            for ((k1, v1), (k2, v2)) in a.metadata().iter().zip(b.metadata()) {
                assert_eq!(k1, k2);
                if k1 != "general.name" {
                    assert_eq!(v1, v2, "{case} {q}: {k1}");
                }
            }
        }
    }
}
