//! Arbitrary bytes written as a `.gguf` file: `GgufFile::open`; when it opens, every metadata
//! value is rendered (`Display` and `to_json`), every tensor's raw bytes are read (`read_raw`)
//! and dequantized (`quants::dequantize`), the plain-typed ones are also read through
//! `TensorSource` (`read_f32`), and the same file goes through `gguf_lora::open` (no base).
#![no_main]

use std::fmt::Write as _;

use adapterkit_core::TensorSource;
use adapterkit_formats::gguf::GgufFile;
use adapterkit_formats::{gguf_lora, quants};
use libfuzzer_sys::fuzz_target;

const MAX_READ: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let path = adapterkit_fuzz::scratch_sub("gguf").join("fuzz.gguf");
    adapterkit_fuzz::write(&path, data);
    let opened = GgufFile::open(&path);
    if adapterkit_fuzz::debug() {
        eprintln!("GgufFile::open: {opened:?}");
    }
    let Ok(f) = opened else {
        return;
    };
    assert!(GgufFile::sniff(&path));
    assert!(matches!(f.version(), 2 | 3));
    assert!(f.alignment().is_power_of_two());
    assert_eq!(f.data_start() % f.alignment(), 0);
    let mut s = String::new();
    for (k, v) in f.metadata() {
        s.clear();
        write!(s, "{k} = {v}").expect("formatting into a String");
        let _ = v.to_json();
        // Keys are unique, so `get` finds this very entry (compared by address: NaN != NaN).
        assert!(f.get(k).is_some_and(|g| std::ptr::eq(g, v)));
    }
    let mut end = f.data_start();
    for t in f.tensors() {
        // Packed in order, aligned, inside the file.
        assert!(t.offset >= end, "tensor {:?} overlaps the previous one", t.name);
        assert_eq!(t.offset % f.alignment(), 0);
        assert!(t.offset + t.len <= data.len() as u64);
        assert!(!t.ne.is_empty() && t.ne.len() <= adapterkit_formats::gguf::MAX_DIMS);
        end = t.offset + t.len;
        assert_eq!(f.tensor(&t.name), Some(t));
        if t.len > MAX_READ {
            continue;
        }
        let mut raw = vec![0u8; t.len as usize];
        f.read_raw(&t.name, 0, &mut raw).expect("in-bounds read");
        assert_eq!(&raw[..], &data[t.offset as usize..(t.offset + t.len) as usize]);
        let mut one = [0u8; 1];
        assert!(f.read_raw(&t.name, t.len, &mut one).is_err());
        let n = t.numel();
        let deq = quants::dequantize(t.ggml_type, &raw, n as usize);
        if let Some(v) = &deq {
            assert_eq!(v.len() as u64, n);
        }
        // Plain element types are visible through TensorSource as well.
        if let Some(dt) = t.ggml_type.dtype() {
            let info = f.info(&t.name).expect("plain-typed tensors have a TensorInfo");
            assert_eq!(info.dtype, dt);
            assert_eq!(info.len, t.len);
            let _ = info.rows_cols();
            let via_source = f.read_f32(&t.name);
            // Only the float types: `dequantize` does not read the integer types and (before a
            // fix) answers zeros instead of `None` for fewer than 32 of them (see README).
            if let (Ok(a), Some(b), true) = (&via_source, &deq, dt.is_float()) {
                assert_eq!(
                    a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "read_f32 and dequantize disagree on {:?}",
                    t.name
                );
            }
        } else {
            assert!(f.info(&t.name).is_none());
        }
    }
    let _ = gguf_lora::is_adapter(&f);
    drop(f);
    let lora = gguf_lora::open(&path, None);
    if adapterkit_fuzz::debug() {
        eprintln!(
            "gguf_lora::open: {:?}",
            lora.as_ref().map(|pa| pa.adapter.modules.len())
        );
    }
    if let Ok(pa) = lora {
        adapterkit_fuzz::read_adapter_tensors(&pa.adapter);
    }
});
