//! Quantized safetensors against the real tools (`fixtures/quant_safetensors`, made by its
//! `generate.py` with compressed-tensors 0.20.0, bitsandbytes 0.50.2, transformers 5.24 and PEFT
//! 0.21.2): `quantize --type fp8|int8|int4` writes compressed-tensors' bytes and config; NF4 is
//! bitsandbytes' CPU quantizer byte for byte; bitsandbytes NF4/FP4 (double quant or not) and
//! LLM.int8 bases read back to bitsandbytes' own dequantization; a QLoRA adapter merges into the
//! NF4 base as PEFT merges it.

mod common;

use std::path::Path;

use adapterkit_core::convert::decode_to_f32;
use adapterkit_core::{DType, TensorSource};
use adapterkit_formats::bnb::{nf4_quantize, BnbView};
use adapterkit_formats::safetensors::SafetensorsFile;
use adapterkit_formats::Checkpoint;
use common::{fixtures, ok, run};

fn values(f: &dyn TensorSource, name: &str) -> Vec<f32> {
    let info = f.info(name).unwrap_or_else(|| panic!("no {name}")).clone();
    let mut raw = vec![0u8; info.len as usize];
    f.read_bytes(name, 0, &mut raw).unwrap();
    let mut v = vec![0f32; info.numel() as usize];
    decode_to_f32(info.dtype, &raw, &mut v).unwrap();
    v
}

fn raw(f: &SafetensorsFile, name: &str) -> (DType, Vec<u64>, Vec<u8>) {
    let info = f.info(name).unwrap_or_else(|| panic!("no {name}")).clone();
    let mut b = vec![0u8; info.len as usize];
    f.read_bytes(name, 0, &mut b).unwrap();
    (info.dtype, info.shape, b)
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

#[test]
fn compressed_tensors_bytes_and_config() {
    let dir = fixtures("quant_safetensors");
    let tmp = tempfile::tempdir().unwrap();
    for (ty, case) in [
        ("fp8", "fp8_channel_w8a16"),
        ("int8", "int8_channel_w8a16"),
        ("int4", "int4_g32_w4a16"),
    ] {
        let out = tmp.path().join(ty);
        ok(&run(&[
            &"quantize",
            &dir.join("base"),
            &"-o",
            &out,
            &"--type",
            &ty,
        ]));
        let want =
            SafetensorsFile::open(dir.join("ct").join(case).join("model.safetensors")).unwrap();
        let got = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
        let names: Vec<String> = want.tensors().iter().map(|t| t.name.clone()).collect();
        let mut got_names: Vec<String> = got.tensors().iter().map(|t| t.name.clone()).collect();
        got_names.sort();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(got_names, sorted, "{ty}: tensor names");
        for n in &names {
            assert_eq!(raw(&got, n), raw(&want, n), "{ty}: {n}");
        }
        let cfg = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        let (g, w) = (cfg(&out), cfg(&dir.join("ct").join(case)));
        assert_eq!(g["quantization_config"], w["quantization_config"], "{ty}");
        assert_eq!(g["hidden_size"], w["hidden_size"]);
    }
}

#[test]
fn compressed_tensors_refuses_partial_groups() {
    // int4 needs whole groups of 32 inputs; a 48-wide Linear cannot be written.
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(
        base.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let w: Vec<u8> = (0..48 * 4)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect();
    adapterkit_formats::safetensors::write_small(
        &base.join("model.safetensors"),
        &[(
            adapterkit_formats::safetensors::TensorSpec {
                name: "model.layers.0.mlp.up_proj.weight".into(),
                dtype: DType::F32,
                shape: vec![4, 48],
            },
            w,
        )],
        None,
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = run(&[&"quantize", &base, &"-o", &out, &"--type", &"int4"]);
    let e = common::failed(&o);
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("groups of 32"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn nf4_quantizer_is_bitsandbytes_cpu() {
    let k =
        SafetensorsFile::open(fixtures("quant_safetensors").join("nf4_known/known.safetensors"))
            .unwrap();
    let mut checked = 0;
    for input in ["main_f32", "main_bf16", "odd_f32"] {
        let x = values(&k, &format!("{input}.input"));
        let (packed, absmax) = nf4_quantize(&x, 64);
        let p = format!("{input}.nf4.bs64.nodq.");
        assert_eq!(
            raw(&k, &format!("{p}packed")).2,
            packed,
            "{input}: packed codes"
        );
        assert_eq!(values(&k, &format!("{p}absmax")), absmax, "{input}: absmax");
        let want = values(&k, &format!("{p}dequantized_f32"));
        let mut got = vec![0f32; x.len()];
        adapterkit_formats::bnb::dequantize_4bit(
            &packed,
            &absmax,
            &adapterkit_formats::bnb::NF4,
            64,
            &mut got,
            0,
        );
        assert_eq!(got, want, "{input}: dequantized");
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn bitsandbytes_bases_read_as_bitsandbytes_dequantizes() {
    let dir = fixtures("quant_safetensors").join("bnb");
    for case in ["nf4_dq", "nf4", "fp4_dq", "int8"] {
        let ck = Checkpoint::open(dir.join(case)).unwrap();
        assert!(adapterkit_formats::bnb::is_bnb(&ck));
        let view = BnbView::open(&ck).unwrap();
        let exp = SafetensorsFile::open(dir.join(case).join("expected.safetensors")).unwrap();
        let mut n = 0;
        for t in exp.tensors() {
            let Some(name) = t.name.strip_prefix("dequantized_f32.") else {
                continue;
            };
            assert!(view.is_quantized(name), "{case}: {name}");
            let want = values(&exp, &t.name);
            let got = values(&view, name);
            let dt = view.info(name).unwrap().dtype;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let w = if dt == DType::BF16 { bf16(*w) } else { *w };
                assert_eq!(g.to_bits(), w.to_bits(), "{case}: {name}[{i}]: {g} vs {w}");
            }
            n += 1;
        }
        assert_eq!(n, 14, "{case}: every Linear weight");
        // The quantization state is hidden; norms, embeddings and lm_head pass through.
        assert!(view
            .info("model.layers.0.self_attn.q_proj.weight.absmax")
            .is_none());
        assert!(view.info("lm_head.weight").is_some());
    }
}

#[test]
fn qlora_merges_into_the_nf4_base_as_peft_does() {
    let dir = fixtures("quant_safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    ok(&run(&[
        &"merge",
        &dir.join("bnb/nf4_dq"),
        &dir.join("qlora/adapter"),
        &"-o",
        &out,
    ]));
    let got = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    let exp = SafetensorsFile::open(dir.join("qlora/expected.safetensors")).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(
        cfg.get("quantization_config").is_none(),
        "a dequantized model loses its quantization_config"
    );
    let (mut total, mut off) = (0usize, 0usize);
    for t in exp.tensors() {
        let Some(name) = t.name.strip_prefix("merged_peft_f32.") else {
            continue;
        };
        assert_eq!(got.info(name).unwrap().dtype, DType::BF16, "{name}");
        let (g, w) = (values(&got, name), values(&exp, &t.name));
        for (a, b) in g.iter().zip(&w) {
            total += 1;
            if *a != bf16(*b) {
                off += 1;
                // One bf16 step at most: PEFT adds (B@A)·s in its own f32 order.
                let ulp = (bf16(*b).abs() * 2f32.powi(-7)).max(f32::MIN_POSITIVE);
                assert!((a - bf16(*b)).abs() <= ulp, "{name}: {a} vs {}", bf16(*b));
            }
        }
    }
    assert!(
        total > 50_000 && off * 10_000 < total,
        "{off} of {total} one bf16 step off"
    );

    // And back to NF4: the merged bf16 weights, quantized by bitsandbytes' rules.
    let nf4 = tmp.path().join("nf4");
    ok(&run(&[
        &"merge",
        &dir.join("bnb/nf4_dq"),
        &dir.join("qlora/adapter"),
        &"-o",
        &nf4,
        &"--quant",
        &"nf4",
    ]));
    let ck = Checkpoint::open(&nf4).unwrap();
    let view = BnbView::open(&ck).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let merged = values(&got, name);
    let (packed, _) = nf4_quantize(&merged, 64);
    let file = SafetensorsFile::open(nf4.join("model.safetensors")).unwrap();
    assert_eq!(raw(&file, name).2, packed);
    let back = values(&view, name);
    let rel = back
        .iter()
        .zip(&merged)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt()
        / merged.iter().map(|b| b * b).sum::<f32>().sqrt();
    assert!(rel < 0.15, "NF4 round trip error {rel}");
}
