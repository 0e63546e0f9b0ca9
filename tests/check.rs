//! `adapterkit check` and hardening: every rule has a fixture that triggers it and one that does
//! not (`fixtures/check/manifest.json`), the SARIF output validates against the official SARIF
//! 2.1.0 schema, exit codes are 0/1/2, every malformed file of `fixtures/malformed` is refused by
//! every command with nothing left behind, and interrupted or failing writes leave no output.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, failed, fixtures, ok, run};
use serde_json::Value;

fn check_json(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (Option<i32>, Value) {
    let mut c = bin();
    c.arg("check");
    for a in args {
        c.arg(a);
    }
    c.args(["--format", "json"]);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), v)
}

fn rules_of(v: &Value) -> BTreeSet<String> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap().to_string())
        .collect()
}

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures("check").join("manifest.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    match v {
        Value::Array(a) => a,
        other => other["cases"].as_array().unwrap().clone(),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Each fixture triggers exactly the rules it is made for and not the ones it must not; every
/// rule of the catalogue is triggered by some fixture and left alone by another.
#[test]
fn every_rule_has_a_triggering_and_a_clean_fixture() {
    let dir = fixtures("check");
    let mut triggered = BTreeSet::new();
    let mut forbidden = BTreeSet::new();
    for c in manifest() {
        let path = dir.join(c["path"].as_str().unwrap());
        // Bases are named from the repository root.
        let base = c["base"].as_str().map(|b| dir.join("../..").join(b));
        let (code, v) = match &base {
            Some(b) => check_json(&[&path, &"--base", b]),
            None => check_json(&[&path]),
        };
        let got = rules_of(&v);
        let expect = strings(&c["expect_rules"]);
        for r in &expect {
            assert!(got.contains(r), "{}: expected {r}, got {got:?}", c["path"]);
            triggered.insert(r.clone());
        }
        for r in strings(&c["forbid_rules"]) {
            assert!(!got.contains(&r), "{}: {r} must not fire: {v}", c["path"]);
            forbidden.insert(r);
        }
        // Exit code: 1 exactly when an error-severity finding is present.
        let has_error = v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["severity"] == "error");
        assert_eq!(code, Some(if has_error { 1 } else { 0 }), "{}", c["path"]);
    }
    // Config-level failures live in the malformed corpus.
    for (case, rule) in [
        ("config_not_json", "AK010"),
        ("config_missing_peft_type", "AK010"),
        ("config_unknown_peft_type", "AK013"),
    ] {
        let (_, v) = check_json(&[&fixtures("malformed").join(case)]);
        assert!(rules_of(&v).contains(rule), "{case}: {v}");
        triggered.insert(rule.to_string());
    }
    for r in adapterkit_ops::check::RULES {
        if r.id == "AK001" {
            continue; // unreadable files: see `unreadable_files_are_ak001`
        }
        assert!(triggered.contains(r.id), "no fixture triggers {}", r.id);
        assert!(
            forbidden.contains(r.id),
            "no fixture shows {} not firing",
            r.id
        );
    }
}

#[test]
fn a_clean_adapter_is_clean_with_and_without_base() {
    let clean = fixtures("check").join("clean");
    for base in [None, Some(fixtures("peft/bases/llama"))] {
        let (code, v) = match &base {
            Some(b) => check_json(&[&clean, &"--base", b]),
            None => check_json(&[&clean]),
        };
        assert_eq!(code, Some(0), "{v}");
        assert!(v["findings"].as_array().unwrap().is_empty(), "{v}");
    }
}

#[test]
fn unreadable_files_are_ak001() {
    let dir = tempfile::tempdir().unwrap();
    let ad = dir.path().join("ad");
    std::fs::create_dir(&ad).unwrap();
    std::fs::copy(
        fixtures("check").join("clean/adapter_config.json"),
        ad.join("adapter_config.json"),
    )
    .unwrap();
    // A directory where the weights file should be.
    std::fs::create_dir(ad.join("adapter_model.safetensors")).unwrap();
    let (code, v) = check_json(&[&ad]);
    assert_eq!(code, Some(1));
    assert!(rules_of(&v).contains("AK001"), "{v}");
}

/// Exit codes and severity controls: 2 for usage and I/O errors, --strict, --allow, --deny,
/// --rules.
#[test]
fn exit_codes_and_severity_controls() {
    let f = fixtures("check");
    let out = run(&[&"check", &"/nonexistent/path"]);
    assert_eq!(out.status.code(), Some(2));
    failed(&out);
    let out = run(&[&"check", &f.join("clean"), &"--deny", &"AK999"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&[&"check", &f.join("clean"), &"--format", &"xml"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&[&"check", &f.join("clean"), &"--base", &f.join("nope")]);
    assert_eq!(out.status.code(), Some(2));
    // A warning only: 0, or 1 with --strict; --deny makes it an error; --allow hides it.
    let zero = f.join("zero_lora_b_one");
    let (code, v) = check_json(&[&zero]);
    assert!(rules_of(&v).contains("AK031"));
    assert_eq!(code, Some(0));
    let (code, _) = check_json(&[&zero, &"--strict"]);
    assert_eq!(code, Some(1));
    let (code, v) = check_json(&[&zero, &"--deny", &"AK031"]);
    assert_eq!(code, Some(1));
    let denied = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["rule"] == "AK031")
        .unwrap();
    assert_eq!(denied["severity"], "error");
    let (code, v) = check_json(&[&zero, &"--allow", &"AK031", &"--strict"]);
    assert_eq!(code, Some(0), "{v}");
    let (_, v) = check_json(&[&f.join("nan_values"), &"--rules", &"AK031"]);
    assert!(v["findings"].as_array().unwrap().is_empty());
    let out = run(&[&"check", &"--list-rules"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for r in adapterkit_ops::check::RULES {
        assert!(text.contains(r.id));
    }
}

/// A directory of many adapters is searched and checked (in parallel); findings name the files.
#[test]
fn directories_are_searched() {
    let many = fixtures("check").join("many");
    let (code, v) = check_json(&[&many]);
    assert_eq!(code, Some(1));
    let targets = v["targets"].as_array().unwrap().len();
    assert!(targets >= 40, "{targets} targets");
    let nan: BTreeSet<String> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["rule"] == "AK030")
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nan.len(), 2, "{nan:?}");
}

/// The whole fixture tree, checked in one run, well under a second in release builds (the
/// README quotes the release figure; debug builds get more room).
#[test]
fn the_whole_fixture_tree_is_quick() {
    let started = std::time::Instant::now();
    let (code, v) = check_json(&[&fixtures("")]);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(code, Some(1), "the malformed corpus must fail");
    assert!(v["targets"].as_array().unwrap().len() > 200);
    assert!(secs < 10.0, "{secs} s");
}

/// SARIF output validates against the official SARIF 2.1.0 schema (fixtures/sarif).
#[test]
fn sarif_is_valid_sarif_2_1_0() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures("sarif").join("sarif-schema-2.1.0.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::draft4::new(&schema).expect("the schema compiles");
    for path in [fixtures("check"), fixtures("check").join("clean")] {
        let out = run(&[&"check", &path, &"--format", &"sarif"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&v)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}", errors.join("\n"));
        assert_eq!(v["version"], "2.1.0");
        let results = v["runs"][0]["results"].as_array().unwrap();
        if path.ends_with("check") {
            assert!(results.len() > 20);
            // Every result's ruleIndex points at its rule.
            let rules = v["runs"][0]["tool"]["driver"]["rules"].as_array().unwrap();
            for r in results {
                let i = r["ruleIndex"].as_u64().unwrap() as usize;
                assert_eq!(rules[i]["id"], r["ruleId"]);
            }
        } else {
            assert!(results.is_empty());
        }
    }
}

#[test]
fn github_annotations() {
    let out = run(&[
        &"check",
        &fixtures("check").join("nan_values"),
        &"--format",
        &"github",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("AK030"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.starts_with("::error file="), "{line}");
    assert!(line.contains(",title=AK030 non-finite::"), "{line}");
}

fn malformed() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures("malformed").join("manifest.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    match v {
        Value::Array(a) => a,
        other => other["cases"].as_array().unwrap().clone(),
    }
}

fn no_output(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Every malformed file is refused by every command that reads it (an `error:` line naming
/// what is wrong, no panic, nothing written), and `check` reports it as an error.
#[test]
fn the_malformed_corpus_is_refused_everywhere() {
    let root = fixtures("malformed");
    let base = fixtures("peft/bases/llama");
    let cases = malformed();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for c in cases {
        let path = root.join(c["path"].as_str().unwrap());
        let expect = c["expect"].as_str().unwrap_or("");
        let out_dir = tempfile::tempdir().unwrap();
        let o = out_dir.path().join("out");
        let adapter = c["kind"] == "adapter";
        let valid = root.join("valid");
        let per_command = |cmd: &str| {
            c["expect_per_command"][cmd]
                .as_str()
                .unwrap_or(expect)
                .to_string()
        };
        let mut runs: Vec<Vec<&dyn AsRef<std::ffi::OsStr>>> = Vec::new();
        if adapter {
            runs.push(vec![&"merge", &base, &path, &"-o", &o]);
            runs.push(vec![
                &"convert",
                &path,
                &"--to-family",
                &"lora",
                &"--base",
                &base,
                &"-o",
                &o,
            ]);
        } else {
            runs.push(vec![&"merge", &path, &valid, &"-o", &o]);
            runs.push(vec![&"inspect", &path]);
            runs.push(vec![&"diff", &path, &path]);
        }
        for args in runs {
            let out = run(&args);
            // Paths in messages as the corpus recorded them (relative to the repository).
            let err = failed(&out).replace(concat!(env!("CARGO_MANIFEST_DIR"), "/../../"), "");
            let cmd = args[0].as_ref().to_string_lossy().to_string();
            let expect = per_command(&cmd);
            assert!(
                err.contains(&expect),
                "{}: {:?}: expected {expect:?} in {err}",
                c["path"],
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy().to_string())
                    .collect::<Vec<_>>()
            );
            no_output(out_dir.path());
        }
        let (code, v) = if adapter {
            check_json(&[&path, &"--base", &base])
        } else {
            check_json(&[&path])
        };
        assert_eq!(code, Some(1), "{}: check must fail: {v}", c["path"]);
    }
}

fn write_f32(path: &Path, tensors: &[(&str, Vec<u64>, f32)]) {
    use adapterkit_formats::safetensors::{write_small, TensorSpec};
    let t: Vec<(TensorSpec, Vec<u8>)> = tensors
        .iter()
        .map(|(n, shape, v)| {
            let count: u64 = shape.iter().product();
            let bytes: Vec<u8> = (0..count)
                .flat_map(|i| (v + (i % 7) as f32 * 1e-3).to_le_bytes())
                .collect();
            (
                TensorSpec {
                    name: n.to_string(),
                    dtype: adapterkit_core::DType::F32,
                    shape: shape.clone(),
                },
                bytes,
            )
        })
        .collect();
    write_small(path, &t, None).unwrap();
}

/// A big-enough base and a LoRA on all of its tensors, for interrupting merges.
fn big_case(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.safetensors");
    let names: Vec<String> = (0..8).map(|i| format!("l{i}.weight")).collect();
    let specs: Vec<(&str, Vec<u64>, f32)> = names
        .iter()
        .map(|n| (n.as_str(), vec![1024, 1024], 0.5))
        .collect();
    write_f32(&base, &specs);
    let ad = dir.join("adapter");
    std::fs::create_dir(&ad).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["l0","l1","l2","l3","l4","l5","l6","l7"]}"#,
    )
    .unwrap();
    let mut t: Vec<(String, Vec<u64>, f32)> = Vec::new();
    for i in 0..8 {
        t.push((
            format!("base_model.model.l{i}.lora_A.weight"),
            vec![8, 1024],
            0.01,
        ));
        t.push((
            format!("base_model.model.l{i}.lora_B.weight"),
            vec![1024, 8],
            0.01,
        ));
    }
    let refs: Vec<(&str, Vec<u64>, f32)> = t
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), *v))
        .collect();
    write_f32(&ad.join("adapter_model.safetensors"), &refs);
    (base, ad)
}

/// A merge killed with SIGKILL while it writes leaves nothing at OUT.
#[test]
fn a_killed_merge_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ad) = big_case(dir.path());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("merged.safetensors");
    let mut child = bin()
        .args(["merge"])
        .arg(&base)
        .arg(&ad)
        .arg("-o")
        .arg(&out)
        .args(["--threads", "1"])
        .spawn()
        .unwrap();
    // Kill as soon as the temporary output exists: the merge is then certainly mid-write.
    let started = std::time::Instant::now();
    let mut killed_mid_write = false;
    while started.elapsed().as_secs() < 20 {
        let tmp = std::fs::read_dir(&out_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with(".adapterkit-"));
        if tmp {
            child.kill().unwrap(); // SIGKILL on Unix
            killed_mid_write = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        killed_mid_write,
        "the merge finished before it could be killed ({status:?})"
    );
    assert!(!out.exists(), "a killed merge left {}", out.display());
}

/// A write that fails (here: the file-size limit, as on a full disk) is a clear error and
/// leaves nothing at OUT; a destination that cannot be created is a clear error.
#[test]
fn failing_writes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ad) = big_case(dir.path());
    let out = dir.path().join("merged.safetensors");
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{}' merge '{}' '{}' -o '{}'",
        env!("CARGO_BIN_EXE_adapterkit"),
        base.display(),
        ad.display(),
        out.display()
    );
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let err = failed(&o);
    assert!(
        err.to_lowercase().contains("file too large") || err.contains("EFBIG"),
        "{err}"
    );
    assert!(!out.exists());
    let o = run(&[
        &"merge",
        &base,
        &ad,
        &"-o",
        &"/proc/adapterkit-no-such-dir/out.safetensors",
    ]);
    failed(&o);
}

/// `-o` naming an input is refused by every command that writes.
#[test]
fn output_equal_to_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures("peft/bases/llama");
    let ad_src = fixtures("check").join("clean");
    let ad = dir.path().join("ad");
    std::fs::create_dir(&ad).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(ad_src.join(f), ad.join(f)).unwrap();
    }
    let before = std::fs::read(ad.join("adapter_model.safetensors")).unwrap();
    for args in [
        vec![
            &"merge" as &dyn AsRef<std::ffi::OsStr>,
            &base,
            &ad,
            &"-o",
            &ad,
            &"--force",
        ],
        vec![&"compress", &ad, &"-o", &ad, &"--rank", &"2", &"--force"],
        vec![
            &"convert",
            &ad,
            &"--to-family",
            &"lora",
            &"-o",
            &ad,
            &"--force",
        ],
        vec![
            &"extract", &base, &base, &"-o", &base, &"--rank", &"2", &"--force",
        ],
    ] {
        let err = failed(&run(&args));
        assert!(err.contains("input") || err.contains("base"), "{err}");
    }
    assert_eq!(
        std::fs::read(ad.join("adapter_model.safetensors")).unwrap(),
        before
    );
}

/// Fuzzing regressions: zero-element tensors with huge dimensions once overflowed the family
/// readers' and planner's dimension products. Every command refuses them cleanly now.
#[test]
fn fuzz_regressions_are_refused() {
    let dir = fixtures("fuzz-regressions").join("adapter_names");
    let base = fixtures("peft/bases/llama");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if !p.to_string_lossy().ends_with(".adapter") {
            continue;
        }
        let out_dir = tempfile::tempdir().unwrap();
        let o = out_dir.path().join("m.safetensors");
        failed(&run(&[&"merge", &base, &p, &"-o", &o]));
        no_output(out_dir.path());
        let (code, _) = check_json(&[&p, &"--base", &base]);
        assert_eq!(code, Some(1), "{}", p.display());
        n += 1;
    }
    assert!(n >= 6);
}
