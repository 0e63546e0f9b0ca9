//! The other adapter formats' readers behind `convert::detect` / `convert::open`.
//!
//! Input: one mode byte `m`, then the bytes of a file.
//! - `m` even: the bytes are written as a lone file (`adapter.safetensors`), and go through
//!   `convert::detect(path)` and `convert::open(path, None, None)` (GGUF by magic, kohya/LyCORIS
//!   or diffusers by their keys).
//! - `m` odd: the bytes are written as `adapters.safetensors` into a directory beside one of the
//!   fixed valid mlx-lm `adapter_config.json`s below (`(m >> 1) % 5`), and the directory goes
//!   through `convert::detect` (must say mlx) and `convert::open`.
//!
//! When an adapter opens, every tensor it lists of at most 1 MiB is read as f32.
#![no_main]

use adapterkit_formats::convert::{self, AdapterFormat};
use libfuzzer_sys::fuzz_target;

/// mlx-lm configs (only the fields adapterkit reads, plus `model`), matching
/// `fixtures/mlx/{lora_default, dora, full, lora_toplevel, dora_embed}`: append, never reorder.
const MLX_CONFIGS: &[&str] = &[
    r#"{"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}, "model": "base", "num_layers": 2}"#,
    r#"{"fine_tune_type": "dora", "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}, "model": "base", "num_layers": 2}"#,
    r#"{"fine_tune_type": "full", "lora_parameters": null, "model": "base", "num_layers": 1}"#,
    r#"{"fine_tune_type": "lora", "lora_parameters": {"rank": 2, "scale": -0.5, "dropout": 0.0, "keys": ["self_attn.v_proj", "lm_head", "model.embed_tokens"]}, "model": "base", "num_layers": 1}"#,
    r#"{"fine_tune_type": "dora", "lora_parameters": {"rank": 2, "scale": 1.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "model.embed_tokens"]}, "model": "base", "num_layers": 1}"#,
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let path = if mode & 1 == 0 {
        let p = adapterkit_fuzz::scratch_sub("formats").join("adapter.safetensors");
        adapterkit_fuzz::write(&p, body);
        p
    } else {
        let dir = adapterkit_fuzz::scratch_sub("mlx");
        let cfg = MLX_CONFIGS[usize::from(mode >> 1) % MLX_CONFIGS.len()];
        adapterkit_fuzz::write(&dir.join("adapter_config.json"), cfg.as_bytes());
        adapterkit_fuzz::write(&dir.join("adapters.safetensors"), body);
        dir
    };
    let detected = convert::detect(&path);
    if mode & 1 == 1 {
        assert_eq!(detected.as_ref().ok(), Some(&AdapterFormat::Mlx));
    }
    let opened = convert::open(&path, None, None);
    if adapterkit_fuzz::debug() {
        eprintln!("detect: {detected:?}");
        match &opened {
            Ok(pa) => eprintln!(
                "open: {} {} modules, notes {:?}",
                pa.adapter.format,
                pa.adapter.modules.len(),
                pa.adapter.notes
            ),
            Err(e) => eprintln!("open: {e}"),
        }
    }
    match (&detected, &opened) {
        (Err(_), Ok(_)) => panic!("convert::open succeeded where convert::detect failed"),
        (Ok(f), Ok(pa)) => {
            assert_eq!(pa.adapter.format, f.name());
            adapterkit_fuzz::read_adapter_tensors(&pa.adapter);
        }
        _ => {}
    }
});
