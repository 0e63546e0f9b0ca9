//! Arbitrary bytes as a lone `.safetensors` file through the checker
//! (`check_target(Target::Safetensors(path), None)`) and target discovery.
#![no_main]

use adapterkit_ops::check::{check_target, discover, Target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = adapterkit_fuzz::scratch_sub("check");
    let path = dir.join("lone.safetensors");
    adapterkit_fuzz::write(&path, data);
    let targets = discover(&dir).expect("discover a directory holding one file");
    assert_eq!(targets, vec![Target::Safetensors(path.clone())]);
    let findings = check_target(&Target::Safetensors(path), None);
    for f in &findings {
        assert!(!f.message.is_empty());
    }
});
