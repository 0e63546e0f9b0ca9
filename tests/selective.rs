//! Selective fine-tuning (`fixtures/selective`, made by its `generate.py` with numpy, torch and
//! PEFT 0.21.2): `extract --sparse --density d` keeps exactly numpy's top-d entries per tensor
//! (indices and values, ties to the lower index) with its reconstruction errors; sparse
//! differences in adapterkit's layout and in LT-SFT's merge back to the fine-tune bit for bit;
//! BitFit, LN-only and head-only fine-tunes are sparse differences at density 1; PEFT's SHiRA
//! merges as PEFT merges it.

mod common;

use std::path::Path;

use adapterkit_core::TensorSource;
use adapterkit_formats::safetensors::SafetensorsFile;
use common::{failed, fixtures, ok, run};
use serde_json::Value;

fn manifest() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures("selective").join("manifest.json")).unwrap(),
    )
    .unwrap()
}

fn raw(f: &SafetensorsFile, name: &str) -> Vec<u8> {
    let info = f.info(name).unwrap_or_else(|| panic!("no {name}")).clone();
    let mut b = vec![0u8; info.len as usize];
    f.read_bytes(name, 0, &mut b).unwrap();
    b
}

/// Every tensor of `got` equals the fine-tune's, bit for bit.
fn same_as(got: &Path, want: &Path, label: &str) {
    let (g, w) = (
        SafetensorsFile::open(got).unwrap(),
        SafetensorsFile::open(want).unwrap(),
    );
    for t in w.tensors() {
        assert!(raw(&g, &t.name) == raw(&w, &t.name), "{label}: {}", t.name);
    }
}

#[test]
fn sparse_extraction_equals_numpys_top_k() {
    let dir = fixtures("selective");
    let m = manifest();
    let case = dir.join("cases/llama_dense_extract");
    let tmp = tempfile::tempdir().unwrap();
    for (d, spec) in m["extraction"]["densities"].as_object().unwrap() {
        let out = tmp.path().join(format!("d{d}.safetensors"));
        let o = run(&[
            &"extract",
            &case.join("base"),
            &case.join("finetuned"),
            &"--sparse",
            &"--density",
            &d.as_str(),
            &"-o",
            &out,
            &"--json",
        ]);
        ok(&o);
        let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
        let got = SafetensorsFile::open(&out).unwrap();
        let want = SafetensorsFile::open(dir.join(spec["file"].as_str().unwrap())).unwrap();
        for t in want.tensors() {
            assert!(
                raw(&got, &t.name) == raw(&want, &t.name),
                "d={d}: {}",
                t.name
            );
        }
        for r in rep["tensors"].as_array().unwrap() {
            let name = r["tensor"].as_str().unwrap();
            let w = &spec["tensors"][name];
            assert_eq!(r["k"], w["k"], "d={d}: {name}");
            assert_eq!(r["nnz"], w["nnz"], "d={d}: {name}");
            let (a, b) = (
                r["rel_error"].as_f64().unwrap(),
                w["rel_error"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-9 * b.max(1e-12),
                "d={d}: {name}: {a} vs {b}"
            );
        }
        let (a, b) = (
            rep["total_rel_error"].as_f64().unwrap(),
            spec["total_rel_error"].as_f64().unwrap(),
        );
        assert!((a - b).abs() <= 1e-9, "d={d}: {a} vs {b}");
        // At density 1 the merge gives the fine-tune back exactly.
    }
    let full = tmp.path().join("full.safetensors");
    ok(&run(&[
        &"extract",
        &case.join("base"),
        &case.join("finetuned"),
        &"--sparse",
        &"--density",
        &"1",
        &"-o",
        &full,
    ]));
    let merged = tmp.path().join("merged");
    ok(&run(&[&"merge", &case.join("base"), &full, &"-o", &merged]));
    same_as(
        &merged.join("model.safetensors"),
        &case.join("finetuned/model.safetensors"),
        "density 1",
    );
}

#[test]
fn sparse_differences_merge_to_the_fine_tune() {
    let dir = fixtures("selective");
    let tmp = tempfile::tempdir().unwrap();
    for c in manifest()["sparse_cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let base = dir.join("bases").join(c["base"].as_str().unwrap());
        let ft = dir
            .join(c["finetuned"].as_str().unwrap())
            .join("model.safetensors");
        // LT-SFT's layout (column-major index steps, dense `abs` tensors).
        let out = tmp.path().join(format!("{name}-lt"));
        ok(&run(&[
            &"merge",
            &base,
            &dir.join(c["lt_sft_transcribed"].as_str().unwrap()),
            &"-o",
            &out,
        ]));
        same_as(&out.join("model.safetensors"), &ft, name);
        // Re-extracted at the fine-tune's own density: the same entries.
        let sp = tmp.path().join(format!("{name}.safetensors"));
        ok(&run(&[
            &"extract",
            &base,
            &dir.join(c["finetuned"].as_str().unwrap()),
            &"--sparse",
            &"--density",
            &"1",
            &"-o",
            &sp,
        ]));
        let out = tmp.path().join(format!("{name}-sparse"));
        ok(&run(&[&"merge", &base, &sp, &"-o", &out]));
        same_as(&out.join("model.safetensors"), &ft, name);
    }
}

#[test]
fn bitfit_ln_and_head_only_are_sparse_at_density_one() {
    let dir = fixtures("selective");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for c in manifest()["dense_cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let base = dir.join("bases").join(c["base"].as_str().unwrap());
        let ft = dir.join(c["finetuned"].as_str().unwrap());
        let sp = tmp.path().join(format!("{name}.safetensors"));
        let o = run(&[
            &"extract",
            &base,
            &ft,
            &"--sparse",
            &"--density",
            &"1",
            &"-o",
            &sp,
            &"--json",
        ]);
        ok(&o);
        let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut stored: Vec<String> = rep["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tensor"].as_str().unwrap().to_string())
            .collect();
        let mut changed: Vec<String> = c["changed_tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        stored.sort();
        changed.sort();
        assert_eq!(stored, changed, "{name}: only the tuned tensors are stored");
        assert_eq!(rep["total_rel_error"], 0.0, "{name}");
        let out = tmp.path().join(name);
        ok(&run(&[&"merge", &base, &sp, &"-o", &out]));
        same_as(
            &out.join("model.safetensors"),
            &ft.join("model.safetensors"),
            name,
        );
        n += 1;
    }
    assert!(n >= 6, "{n} cases");
}

#[test]
fn shira_merges_as_peft() {
    let dir = fixtures("selective");
    let s = &manifest()["shira"];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shira");
    ok(&run(&[
        &"merge",
        &dir.join("bases").join(s["base"].as_str().unwrap()),
        &dir.join(s["adapter"].as_str().unwrap()),
        &"-o",
        &out,
    ]));
    let merged = dir.join(s["merged_state"].as_str().unwrap());
    same_as(&out.join("model.safetensors"), &merged, "SHiRA");
}

#[test]
fn sparse_errors_are_specific() {
    let dir = fixtures("selective");
    let case = dir.join("cases/llama_dense_extract");
    let tmp = tempfile::tempdir().unwrap();
    let e = failed(&run(&[
        &"extract",
        &case.join("base"),
        &case.join("finetuned"),
        &"--sparse",
        &"--density",
        &"0",
        &"-o",
        &tmp.path().join("x.safetensors"),
    ]));
    assert!(e.contains("--density 0"), "{e}");
    let e = failed(&run(&[
        &"extract",
        &case.join("base"),
        &dir.join("bases/bert"),
        &"--sparse",
        &"--density",
        &"0.1",
        &"-o",
        &tmp.path().join("y.safetensors"),
    ]));
    assert!(e.contains("not in the base"), "{e}");
    // An index outside its tensor is named.
    let bad = tmp.path().join("bad.safetensors");
    let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    adapterkit_formats::safetensors::write_small(
        &bad,
        &[
            (
                spec(
                    "lm_head.weight.indices",
                    adapterkit_core::DType::I64,
                    vec![1],
                ),
                i64s(&[1 << 40]),
            ),
            (
                spec("lm_head.weight.shape", adapterkit_core::DType::I64, vec![2]),
                i64s(&[128, 32]),
            ),
            (
                spec(
                    "lm_head.weight.values",
                    adapterkit_core::DType::F32,
                    vec![1],
                ),
                1f32.to_le_bytes().to_vec(),
            ),
        ],
        Some(&[("format".to_string(), "adapterkit-sparse".to_string())]),
    )
    .unwrap();
    let e = failed(&run(&[
        &"merge",
        &case.join("base"),
        &bad,
        &"-o",
        &tmp.path().join("m"),
    ]));
    assert!(
        e.contains("lm_head.weight.indices") && e.contains("outside"),
        "{e}"
    );
}

fn spec(
    name: &str,
    dtype: adapterkit_core::DType,
    shape: Vec<u64>,
) -> adapterkit_formats::safetensors::TensorSpec {
    adapterkit_formats::safetensors::TensorSpec {
        name: name.into(),
        dtype,
        shape,
    }
}

#[test]
fn check_and_inspect_read_sparse_differences() {
    let dir = fixtures("selective");
    let c = &manifest()["sparse_cases"][0];
    let lt = dir.join(c["lt_sft_transcribed"].as_str().unwrap());
    let o = run(&[&"check", &lt]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = run(&[&"inspect", &lt, &"--json"]);
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "lt-sft");
}
