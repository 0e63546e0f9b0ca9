//! Arbitrary bytes into `safetensors::parse_header`, with invariants checked on success.
//!
//! Input: 8 bytes little-endian `x`, then the JSON header bytes. The file length handed to the
//! parser is `8 + json.len() + (x >> 1) % 65536` when `x` is even (a plausible data section) and
//! `x >> 1` when it is odd (any length at all, including ones shorter than the header).
#![no_main]

use std::path::Path;

use adapterkit_formats::safetensors::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let x = u64::from_le_bytes(data[..8].try_into().unwrap());
    let json = &data[8..];
    let file_len = if x & 1 == 0 {
        8 + json.len() as u64 + (x >> 1) % 65536
    } else {
        x >> 1
    };
    let Ok(h) = parse_header(Path::new("fuzz.safetensors"), json, file_len) else {
        return;
    };
    // What the parser promises: tensors in offset order, tiling the data section exactly.
    assert_eq!(h.header_len, json.len() as u64);
    let mut pos = 8 + h.header_len;
    for t in &h.tensors {
        assert_eq!(
            t.offset, pos,
            "tensor {:?} does not start where the previous ended",
            t.name
        );
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .expect("validated shape product");
        assert_eq!(t.dtype.byte_len(numel), Some(t.len));
        pos += t.len;
    }
    assert_eq!(pos, file_len, "tensors do not cover the data section");
});
