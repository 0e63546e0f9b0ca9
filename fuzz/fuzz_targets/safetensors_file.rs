//! Arbitrary bytes written as a `.safetensors` file, opened both positionally and memory-mapped
//! (and as a bare-file checkpoint); every tensor of at most 1 MiB is read back and decoded.
#![no_main]

use adapterkit_core::TensorSource;
use adapterkit_formats::safetensors::SafetensorsFile;
use adapterkit_formats::Checkpoint;
use libfuzzer_sys::fuzz_target;

const MAX_READ: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let path = adapterkit_fuzz::scratch_sub("file").join("fuzz.safetensors");
    adapterkit_fuzz::write(&path, data);
    let Ok(f) = SafetensorsFile::open(&path) else {
        assert!(SafetensorsFile::open_mapped(&path).is_err());
        return;
    };
    let m = SafetensorsFile::open_mapped(&path).expect("opens mapped when it opens positionally");
    assert_eq!(f.header(), m.header());
    for t in f.tensors() {
        assert!(t.offset + t.len <= data.len() as u64);
        if t.len > MAX_READ {
            continue;
        }
        let mut buf = vec![0u8; t.len as usize];
        f.read_bytes(&t.name, 0, &mut buf).expect("in-bounds read");
        assert_eq!(m.mapped_bytes(&t.name), Some(&buf[..]));
        assert_eq!(
            &buf[..],
            &data[t.offset as usize..(t.offset + t.len) as usize]
        );
        // A one-past-the-end read is refused, not a panic.
        let mut one = [0u8; 1];
        assert!(f.read_bytes(&t.name, t.len, &mut one).is_err());
        let a = f.read_f32(&t.name);
        let b = m.read_f32(&t.name);
        match (&a, &b) {
            (Ok(x), Ok(y)) => {
                assert_eq!(x.len() as u64, t.numel());
                assert_eq!(
                    x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
            (Err(_), Err(_)) => {}
            _ => panic!("positional and mapped reads disagree on {:?}", t.name),
        }
    }
    let _ = f.metadata();
    let c = Checkpoint::open(&path).expect("a valid safetensors file opens as a checkpoint");
    assert_eq!(c.len(), f.tensors().len());
});
