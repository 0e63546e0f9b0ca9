//! Shared helpers for adapterkit's fuzz targets: one scratch directory per process (on
//! `/dev/shm` when it exists, so the file-based targets stay fast), the fixed tiny base
//! checkpoint and the fixed valid LoRA tensors, both compiled into the binaries.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use adapterkit_formats::Checkpoint;

/// `fixtures/peft/bases/llama/model.safetensors`: a 2-layer Llama with hidden size 32.
pub const BASE_MODEL: &[u8] = include_bytes!("../../fixtures/peft/bases/llama/model.safetensors");
/// `fixtures/peft/bases/llama/config.json`.
pub const BASE_CONFIG: &[u8] = include_bytes!("../../fixtures/peft/bases/llama/config.json");
/// `fixtures/check/clean/adapter_model.safetensors`: a valid r=4 LoRA on q_proj/v_proj of that
/// base.
pub const CLEAN_ADAPTER: &[u8] =
    include_bytes!("../../fixtures/check/clean/adapter_model.safetensors");

const DIR_PREFIX: &str = "adapterkit-fuzz-";

/// Remove scratch directories left by fuzzing processes that no longer exist (libFuzzer exits
/// without running destructors, so a process cannot clean up after itself).
fn remove_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// This process's scratch directory, created on first use and reused afterwards.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        remove_stale(&root);
        let dir = root.join(format!("{DIR_PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
        dir
    })
}

/// A sub-directory of the scratch directory (created once).
pub fn scratch_sub(name: &str) -> PathBuf {
    let d = scratch().join(name);
    fs::create_dir_all(&d).expect("create a fuzz scratch sub-directory");
    d
}

/// Write `bytes` to `path`, replacing what was there.
pub fn write(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).expect("write a fuzz input file");
}

/// The fixed base checkpoint (a model directory with `model.safetensors` and `config.json`),
/// written and opened once per process.
pub fn base() -> &'static Checkpoint {
    static BASE: OnceLock<Checkpoint> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = scratch_sub("base");
        write(&dir.join("model.safetensors"), BASE_MODEL);
        write(&dir.join("config.json"), BASE_CONFIG);
        Checkpoint::open(&dir).expect("the fixed base checkpoint opens")
    })
}

/// Whether `ADAPTERKIT_FUZZ_DEBUG` is set: the targets then print what each input led to
/// (useful with `cargo fuzz run <target> <file>` to see why an input is refused).
pub fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("ADAPTERKIT_FUZZ_DEBUG").is_some())
}

/// Open the adapter in `dir` (`peft::open`), plan a merge of it into [`base`] when it opens, then
/// run the checker on it with the base; with `ADAPTERKIT_FUZZ_DEBUG=1`, print what each step made
/// of it. Errors are expected; only panics matter.
pub fn open_plan_check(dir: PathBuf) {
    use adapterkit_ops::check::{check_target, Target};
    use adapterkit_ops::{plan, OutDType, WeightedAdapter};
    let base = base();
    let opened = adapterkit_formats::peft::open(&dir);
    if debug() {
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
        if debug() {
            eprintln!("plan: {:?}", planned.as_ref().map(|p| p.touched()));
        }
    }
    let findings = check_target(&Target::Adapter(dir), Some(base));
    if debug() {
        for f in &findings {
            eprintln!("{} {:?}: {}", f.rule, f.item, f.message);
        }
    }
}

/// Largest tensor [`read_adapter_tensors`] reads.
const MAX_ADAPTER_READ: u64 = 1 << 20;

/// Read every tensor an opened adapter lists (`tensor_names`, and every tensor a payload names)
/// of at most 1 MiB through its `TensorSource` as f32, as a converter or the planner would.
/// Errors are expected; only panics matter.
pub fn read_adapter_tensors(adapter: &adapterkit_core::ir::Adapter) {
    let names = adapter
        .tensor_names
        .iter()
        .map(String::as_str)
        .chain(adapter.modules.iter().flat_map(|m| m.payload.tensors()));
    for name in names {
        let Some(info) = adapter.tensors.info(name) else {
            continue;
        };
        if info.len > MAX_ADAPTER_READ {
            continue;
        }
        let r = adapter.tensors.read_f32(name);
        if debug() {
            eprintln!("read_f32 {name:?} {:?}: {:?}", info.shape, r.as_ref().map(Vec::len));
        }
    }
}
