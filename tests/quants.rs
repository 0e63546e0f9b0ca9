//! ggml block quantization against ggml itself (`fixtures/quants`, made by its `generate.py`
//! with a C harness linked to llama.cpp's `libggml-base`, the llama-cpp-python 0.3.36 sdist):
//! every quantizer adapterkit has gives ggml's bytes, and every type llama.cpp writes dequantizes
//! to ggml's floats, bit for bit, on 15 inputs (ties, zeros, outliers, tiny, huge, …).

mod common;

use adapterkit_formats::gguf::GgmlType;
use adapterkit_formats::quants::{can_quantize, dequantize, quantize};
use common::fixtures;

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn quantizers_and_dequantizers_match_ggml_bit_for_bit() {
    let dir = fixtures("quants");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let (mut quantized, mut dequantized) = (0, 0);
    let mut qtypes = std::collections::BTreeSet::new();
    let mut dtypes = std::collections::BTreeSet::new();
    for case in m["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input =
            f32s(&std::fs::read(dir.join(case["input"]["path"].as_str().unwrap())).unwrap());
        for o in case["outputs"].as_array().unwrap() {
            let ty = GgmlType::from_name(o["type"].as_str().unwrap())
                .unwrap_or_else(|| panic!("unknown type {}", o["type"]));
            let q = std::fs::read(dir.join(o["q"]["path"].as_str().unwrap())).unwrap();
            let want = f32s(&std::fs::read(dir.join(o["deq"]["path"].as_str().unwrap())).unwrap());
            let variant = o["variant"].as_str().unwrap();
            if o["imatrix"].is_null() && can_quantize(ty) {
                let mut got = vec![0u8; q.len()];
                quantize(ty, &input, &mut got).unwrap();
                if let Some(i) = (0..q.len()).find(|&i| got[i] != q[i]) {
                    panic!(
                        "{name}/{variant}: quantized byte {i} (block {}) is {:#04x}, ggml wrote {:#04x}",
                        i / ty.type_size() as usize,
                        got[i],
                        q[i]
                    );
                }
                quantized += 1;
                qtypes.insert(ty.name());
            }
            let got = dequantize(ty, &q, want.len())
                .unwrap_or_else(|| panic!("{name}/{variant}: {ty} cannot be dequantized"));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
                assert!(
                    same,
                    "{name}/{variant}: element {i} is {g:e}, ggml gives {w:e}"
                );
            }
            dequantized += 1;
            dtypes.insert(ty.name());
        }
    }
    // Every type adapterkit writes was checked, and every type llama.cpp writes was read.
    for t in [
        "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K",
    ] {
        assert!(qtypes.contains(t), "no quantize golden for {t}");
    }
    assert!(dtypes.len() >= 26, "dequantized types: {dtypes:?}");
    assert!(quantized >= 15 * 12, "{quantized} quantizations checked");
    assert!(dequantized >= 400, "{dequantized} dequantizations checked");
}
