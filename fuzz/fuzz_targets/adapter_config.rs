//! Arbitrary bytes as `adapter_config.json` beside a fixed, valid LoRA
//! `adapter_model.safetensors` (fixtures/check/clean): `peft::open`, and on success a merge plan
//! against the fixed tiny Llama base; then the checker on the directory, with the base.
#![no_main]

use adapterkit_formats::peft;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = adapterkit_fuzz::scratch_sub("adapter");
    let st = dir.join("adapter_model.safetensors");
    if !st.exists() {
        adapterkit_fuzz::write(&st, adapterkit_fuzz::CLEAN_ADAPTER);
    }
    adapterkit_fuzz::write(&dir.join("adapter_config.json"), data);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = peft::LoraConfig::from_json(&dir.join("adapter_config.json"), &v);
    }
    adapterkit_fuzz::open_plan_check(dir);
});
