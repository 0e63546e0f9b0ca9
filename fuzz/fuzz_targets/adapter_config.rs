//! Arbitrary bytes as `adapter_config.json` beside a fixed, valid LoRA
//! `adapter_model.safetensors` (fixtures/check/clean): `peft::open`, and on success a merge plan
//! against the fixed tiny Llama base; then the checker on the directory, with the base.
#![no_main]

use adapterkit_formats::peft;
use adapterkit_ops::check::{check_target, Target};
use adapterkit_ops::{plan, OutDType, WeightedAdapter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let base = adapterkit_fuzz::base();
    let dir = adapterkit_fuzz::scratch_sub("adapter");
    let st = dir.join("adapter_model.safetensors");
    if !st.exists() {
        adapterkit_fuzz::write(&st, adapterkit_fuzz::CLEAN_ADAPTER);
    }
    adapterkit_fuzz::write(&dir.join("adapter_config.json"), data);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = peft::LoraConfig::from_json(&dir.join("adapter_config.json"), &v);
    }
    let opened = peft::open(&dir);
    if adapterkit_fuzz::debug() {
        eprintln!(
            "peft::open: {:?}",
            opened.as_ref().map(|pa| pa.adapter.modules.len())
        );
    }
    if let Ok(pa) = opened {
        let planned = plan(
            base.root(),
            base,
            base.tensors(),
            vec![WeightedAdapter {
                adapter: pa.adapter,
                weight: 1.0,
            }],
            OutDType::Auto,
        );
        if adapterkit_fuzz::debug() {
            eprintln!("plan: {:?}", planned.as_ref().map(|p| p.touched()));
        }
    }
    let findings = check_target(&Target::Adapter(dir), Some(base));
    if adapterkit_fuzz::debug() {
        for f in &findings {
            eprintln!("{} {:?}: {}", f.rule, f.item, f.message);
        }
    }
});
