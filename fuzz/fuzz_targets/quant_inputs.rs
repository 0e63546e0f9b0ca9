//! The quantization inputs that come from untrusted files: a SentencePiece `tokenizer.model`
//! (protobuf) and a `tokenizer.json`/`tokenizer_config.json` pair read for a GGUF conversion, and
//! arbitrary f32 values (NaN, infinities, subnormals) through every ggml quantizer and back.
//! The first byte picks the part; nothing may panic, and a quantized block must dequantize.
#![no_main]

use adapterkit_formats::gguf::GgmlType;
use adapterkit_formats::{gguf_vocab, quants};
use libfuzzer_sys::fuzz_target;

const WRITABLE: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            let _ = gguf_vocab::sentencepiece_pieces(rest);
            let dir = adapterkit_fuzz::scratch_sub("spm");
            adapterkit_fuzz::write(&dir.join("tokenizer.model"), rest);
            let _ = gguf_vocab::tokenizer_metadata(&dir, 300, "llama");
        }
        1 => {
            // tokenizer.json and tokenizer_config.json, split at the first NUL.
            let dir = adapterkit_fuzz::scratch_sub("tokjson");
            let _ = std::fs::remove_file(dir.join("tokenizer.model"));
            let (a, b) = match rest.iter().position(|&c| c == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            adapterkit_fuzz::write(&dir.join("tokenizer.json"), a);
            adapterkit_fuzz::write(&dir.join("tokenizer_config.json"), b);
            let _ = gguf_vocab::tokenizer_metadata(&dir, 64, "qwen2");
        }
        _ => {
            let vals: Vec<f32> = rest
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            if vals.is_empty() {
                return;
            }
            // Whole 256-element super-blocks, the data repeated to fill them.
            let n = vals.len().div_ceil(256) * 256;
            let x: Vec<f32> = (0..n).map(|i| vals[i % vals.len()]).collect();
            for ty in WRITABLE {
                let len = ty.byte_len(n as u64).unwrap() as usize;
                let mut q = vec![0u8; len];
                quants::quantize(ty, &x, &mut q).expect("whole blocks of a writable type");
                assert!(quants::dequantize(ty, &q, n).is_some(), "{ty} reads back");
            }
        }
    }
});
