//! Arbitrary bytes as a mergekit YAML recipe: `Recipe::parse`, then every parameter setting
//! resolved for a few tensor names at a few layer positions (filters, gradients, conditions).
#![no_main]

use std::path::Path;

use adapterkit_formats::recipe::Recipe;
use libfuzzer_sys::fuzz_target;

const TENSORS: [&str; 4] = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.7.mlp.down_proj.weight",
    "lm_head.weight",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = Recipe::parse(Path::new("fuzz.yml"), text) else {
        return;
    };
    let settings = r
        .parameters
        .values()
        .chain(r.models.iter().flat_map(|m| m.parameters.values()));
    for s in settings {
        for t in TENSORS {
            for pos in [0.0, 0.25, 1.0] {
                if let Some(v) = s.evaluate(t, pos) {
                    let _ = v.as_f64();
                }
            }
        }
    }
});
