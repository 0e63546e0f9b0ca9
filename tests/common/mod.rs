//! Helpers shared by the CLI test files: run the real binary, compare checkpoints.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use adapterkit_core::TensorSource;
use adapterkit_formats::safetensors::SafetensorsFile;
use serde_json::Value;

/// `fixtures/<set>`.
pub fn fixtures(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(set)
}

/// The `cases` of `fixtures/<set>/manifest.json`.
pub fn manifest(set: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures(set).join("manifest.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// The `adapterkit` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_adapterkit"))
}

/// Run the binary with `args`.
pub fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = bin();
    for a in args {
        c.arg(a);
    }
    c.output().expect("spawn adapterkit")
}

/// Assert success, showing the output otherwise.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "adapterkit failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assert a clean failure (an `error:` message, no panic) and return stderr.
pub fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.starts_with("error: ") || err.contains("\nerror: "),
        "stderr should carry 'error: ': {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

pub fn case_in(set: &str, name: &str) -> Value {
    manifest(set)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// Every tensor of `got` equals `want` within `rel` of the tensor's largest magnitude; same names.
pub fn assert_close(got: &dyn TensorSource, got_names: &[String], want: &Path, rel: f32) {
    let want = SafetensorsFile::open(want).unwrap();
    let mut names: Vec<String> = want.tensors().iter().map(|t| t.name.clone()).collect();
    let mut g = got_names.to_vec();
    names.sort();
    g.sort();
    assert_eq!(g, names, "tensor names differ");
    for n in &names {
        let (gi, wi) = (got.info(n).unwrap(), want.info(n).unwrap());
        assert_eq!(gi.shape, wi.shape, "{n}: shape");
        assert_eq!(gi.dtype, wi.dtype, "{n}: dtype");
        let a = got.read_f32(n).unwrap();
        let b = want.read_f32(n).unwrap();
        let scale = b
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()))
            .max(f32::MIN_POSITIVE);
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err <= rel * scale,
            "{n}: max abs error {err} > {rel} × {scale}"
        );
    }
}

/// Run `adapterkit merge` on a manifest case of `set` (its base, adapters and weights) into `out`,
/// with `extra` arguments.
pub fn merge_manifest_case(set: &str, c: &Value, out: &Path, extra: &[&str]) -> Output {
    let dir = fixtures(set);
    let mut cmd = bin();
    cmd.arg("merge").arg(dir.join(c["base"].as_str().unwrap()));
    for a in c["adapters"].as_array().unwrap() {
        cmd.arg(dir.join(a.as_str().unwrap()));
    }
    let w: Vec<String> = c["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap().to_string())
        .collect();
    cmd.arg("--weights")
        .arg(w.join(","))
        .arg("-o")
        .arg(out)
        .args(extra);
    cmd.output().unwrap()
}
